"""``python -m vlfast.train``: the main job.

* No arguments: the embedded default (``vlfast.training.default``): pretrain a small
  UNITER on the synthetic world (ITM/WRA, then MLM + ITM/WRA + MRFR + MRC-kl), fine-tune it on VQA,
  fine-tune the same model from scratch, evaluate both and print a results table.
  ``--quick`` runs the shortened form (what CI runs); ``--sequential`` runs the
  scratch fine-tuning after the others instead of in a second process.
* ``--config NAME|PATH [key=value ...]``: one config-driven run (a YAML file in
  ``training/configs/`` or a path, plus dotted overrides such as ``optim.lr=1e-4``)
  into ``--run-dir``; ``--resume`` continues it from its newest checkpoint;
  ``--init-checkpoint`` starts from another run's weights; ``--eval-only`` scores
  the run's checkpoint (as ``python -m vlfast.evaluate``).
* ``torchrun --nproc_per_node N -m vlfast.train --config ...``: DDP (gloo on CPU,
  nccl on GPU).
* ``--demo``: the attention-op training demo (``vlfast.training.demo``).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Optional


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vlfast.train", description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="config overrides key=value (dotted keys)")
    ap.add_argument("--config", help="config name in training/configs/ or a YAML path (default: the embedded default)")
    ap.add_argument("--run-dir", help="run directory (default: runs/<config>-<time>, runs/default-<time>)")
    ap.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its newest checkpoint")
    ap.add_argument("--init-checkpoint", help="initial model weights (a checkpoint of another run)")
    ap.add_argument("--eval-only", action="store_true", help="score the checkpoint of --run-dir and write predictions")
    ap.add_argument("--split", default="val", help="split for --eval-only (val | test)")
    ap.add_argument("--quick", action="store_true", help="the shortened default run (CI)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the default run")
    ap.add_argument("--sequential", action="store_true",
                    help="default run: fine-tune from scratch after pretraining, not in a second process alongside it")
    ap.add_argument("--demo", action="store_true", help="the attention-op training demo")
    ap.add_argument("--steps", type=int, help="steps of --demo")
    args = ap.parse_args(argv)

    if args.demo:
        from vlfast.training import demo

        return demo.main([] if args.steps is None else ["--steps", str(args.steps)])
    if args.steps is not None:
        ap.error("--steps: only with --demo (use optim.total_steps=N with --config)")
    for o in args.overrides:
        if "=" not in o:
            ap.error(f"overrides: expected key=value, got {o!r}")
    stamp = time.strftime("%Y%m%d-%H%M%S")

    if args.eval_only:
        if not args.run_dir:
            ap.error("--eval-only: needs --run-dir")
        from vlfast.evaluate import evaluate_run
        import json

        print(json.dumps(evaluate_run(args.run_dir, split=args.split), indent=2))
        return 0

    if args.config is None:
        if args.resume or args.init_checkpoint:
            ap.error("--resume / --init-checkpoint: need --config (the default run always starts fresh)")
        from vlfast.training.default import run_default

        run_dir = Path(args.run_dir or f"runs/default-{stamp}")
        res = run_default(run_dir, quick=args.quick, seed=args.seed, overrides=tuple(args.overrides),
                          parallel=not args.sequential)
        losses_fell = (res["pretrain_last_loss"] < res["pretrain_first_loss"]
                       and math.isfinite(res["itm_last_loss"]))
        return 0 if losses_fell else 1

    from vlfast.training.config import load_config
    from vlfast.training.jobs import VLJob
    from vlfast.training.loop import train
    from vlfast.training.distributed import cleanup, init_distributed

    cfg = load_config(args.config, args.overrides)
    info = init_distributed(cfg.device, cfg.distributed.backend, cfg.distributed.timeout_s)
    run_dir = Path(args.run_dir or f"runs/{Path(args.config).stem}-{stamp}")
    job = VLJob(cfg, rank=info.rank, world_size=info.world_size)
    try:
        res = train(job, cfg, run_dir, resume=args.resume, init_checkpoint=args.init_checkpoint)
    finally:
        cleanup()
    if info.rank == 0:
        print(f"done: step {res.step}; last eval {res.last_eval}; checkpoint {res.checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
