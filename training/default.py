"""The embedded default of ``python -m vlfast.train``: pretrain, fine-tune, compare.

1. Pretrain a small UNITER on the synthetic world, stage 1: ITM with WRA alone
   (``configs/default_pretrain_itm.yaml``); at this scale any mix with MLM keeps ITM
   at chance, so ITM comes first.
2. Stage 2, from that checkpoint: MLM + ITM (with WRA) + MRFR + MRC-kl under
   conditional masking (``configs/default_pretrain.yaml``).
3. Fine-tune it on the world's VQA (``configs/default_vqa.yaml``: 2000 training
   questions, the low-data regime), starting from the pretrained weights.
4. Fine-tune the same architecture on VQA from scratch (same seed, data, steps), in a
   second process alongside steps 1-3 unless ``parallel=False``.
Then print a results table of both validation VQA scores.

The VisualBERT and UNITER papers' central finding -- pretraining on image-text pairs
helps downstream VQA -- in miniature (the README records the margins per seed);
``--quick`` is the shortened form CI runs (fewer images and steps).
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Optional

from .config import TrainConfig, load_config
from .jobs import SyntheticSource, VLJob
from .loop import TrainResult, train

QUICK = {"data.options.n_images": 300, "optim.total_steps": 40, "logging.every": 10, "checkpoint.every": 0,
         "data.eval_batch_size": 64}
QUICK_VQA = {"optim.total_steps": 30, "eval.every": 0}
STAGE_DIRS = ("pretrain_itm", "pretrain", "vqa_pretrained", "vqa_scratch")  # run directories under out_dir


def _overrides(d: dict[str, Any]) -> list[str]:
    return [f"{k}={v}" for k, v in d.items()]


def _loss_series(run_dir: Path, key: str = "loss") -> list[float]:
    """The logged training values of ``key`` (e.g. "loss", "loss/mlm"), in step order."""
    import json

    p = run_dir / "metrics.jsonl"
    if not p.is_file():
        return []
    out = []
    for line in p.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("kind") == "train" and key in rec:
            out.append(float(rec[key]))
    return out


def _threads_split(parallel: bool) -> tuple[int, int]:
    """(threads for this process, threads for the concurrent scratch run): the
    cores torch would use, split in two when the runs overlap."""
    import torch

    total = max(1, torch.get_num_threads())
    if not parallel:
        return total, 0
    child = max(1, total // 2)
    return max(1, total - child), child


def _finetune_scratch(vqa_cfg: TrainConfig, run_dir: Path, threads: int, log_path: Optional[Path],
                      source: Optional[SyntheticSource] = None) -> TrainResult:
    """Step 4 on its own: fine-tune from scratch into ``run_dir`` with ``threads``
    torch threads (in a worker process, its output to ``log_path``); ``source``: the
    world already built in this process (a worker builds its own)."""
    import contextlib
    import torch

    torch.set_num_threads(threads)
    if source is None:
        source = SyntheticSource(vqa_cfg.data.options)
    if log_path is None:
        return train(VLJob(vqa_cfg, source), vqa_cfg, run_dir)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        return train(VLJob(vqa_cfg, source), vqa_cfg, run_dir)


def default_configs(*, quick: bool = False, seed: int = 0, overrides: tuple[str, ...] = ()) -> dict[str, TrainConfig]:
    """The resolved configs of the default run's stages: ``{"pretrain_itm", "pretrain",
    "vqa"}`` (``vqa`` serves both fine-tunings) -- ``overrides`` apply to every stage,
    after ``seed`` and the ``quick`` shortening."""
    extra = _overrides(QUICK) if quick else []
    common = [f"seed={seed}", *overrides]
    return {"pretrain_itm": load_config("default_pretrain_itm", extra + common),
            "pretrain": load_config("default_pretrain", extra + common),
            "vqa": load_config("default_vqa", extra + (_overrides(QUICK_VQA) if quick else []) + common)}


def run_default(out_dir: Path, *, quick: bool = False, seed: int = 0, overrides: tuple[str, ...] = (),
                verbose: bool = True, parallel: bool = True) -> dict[str, Any]:
    """Run the four trainings into ``out_dir`` (pretrain_itm/, pretrain/,
    vqa_pretrained/, vqa_scratch/) and return the results (also printed as a table).

    ``overrides`` apply to every stage.  ``parallel``: fine-tune from scratch in a
    second process while this one pretrains and then fine-tunes the pretrained model
    (the torch threads split between the two; the scratch run's output goes to
    ``vqa_scratch/output.log``).  On a 2-core CPU the small models here train no
    faster on two threads than on one, so this takes the scratch run off the wall
    time.  ``False`` runs the stages one after another."""
    import multiprocessing as mp

    import torch

    say = print if verbose else (lambda *a, **k: None)
    out_dir = Path(out_dir)
    cfgs = default_configs(quick=quick, seed=seed, overrides=overrides)
    itm_cfg, pre_cfg, vqa_cfg = cfgs["pretrain_itm"], cfgs["pretrain"], cfgs["vqa"]
    t0 = time.time()
    source = SyntheticSource(pre_cfg.data.options)
    n_vqa = len(source.examples("vqa", "train"))
    cap = vqa_cfg.data.options.get("max_train_examples")
    say(f"vlfast default run -> {out_dir}\n  synthetic world: {len(source.records)} images, "
        f"{source.feat_dim}-d region features, {source.num_region_classes} region classes, "
        f"{len(source.answers)} answers, vocab {source.tokenizer.vocab_size}; pretraining on the captions of "
        f"{len(source.world.splits['train'])} train images, VQA fine-tuning on "
        f"{min(n_vqa, cap) if cap else n_vqa} of {n_vqa} train questions")

    mine, theirs = _threads_split(parallel)
    prev_threads = torch.get_num_threads()
    pool = None
    scratch_async = None
    ok = False
    if parallel:
        # a spawned worker (no fork of a process holding threads or CUDA state); terminated on error
        pool = mp.get_context("spawn").Pool(1)
        scratch_async = pool.apply_async(_finetune_scratch, (vqa_cfg, out_dir / "vqa_scratch", theirs,
                                                             out_dir / "vqa_scratch" / "output.log"))
        torch.set_num_threads(mine)
        say(f"\n[4/4] fine-tuning on VQA from scratch, {vqa_cfg.optim.total_steps} steps, runs alongside in a "
            f"second process ({theirs} thread(s), {mine} here); its output: {out_dir / 'vqa_scratch' / 'output.log'}")
    try:
        say(f"\n[1/4] pretraining UNITER, stage 1: {', '.join(itm_cfg.tasks)} (with WRA), "
            f"{itm_cfg.optim.total_steps} steps")
        itm = train(VLJob(itm_cfg, source), itm_cfg, out_dir / "pretrain_itm")
        say(f"\n[2/4] pretraining UNITER, stage 2: {', '.join(pre_cfg.tasks)}, {pre_cfg.optim.total_steps} steps")
        pre = train(VLJob(pre_cfg, source), pre_cfg, out_dir / "pretrain", init_checkpoint=itm.checkpoint)
        t_pre = time.time() - t0

        say(f"\n[3/4] fine-tuning on VQA from the pretrained model, {vqa_cfg.optim.total_steps} steps")
        ft = train(VLJob(vqa_cfg, source), vqa_cfg, out_dir / "vqa_pretrained", init_checkpoint=pre.checkpoint)

        if scratch_async is not None:
            if not scratch_async.ready():
                say("\n[4/4] waiting for the scratch run")
            sc = scratch_async.get()  # re-raises the worker's exception
        else:
            say(f"\n[4/4] fine-tuning on VQA from scratch, {vqa_cfg.optim.total_steps} steps")
            sc = _finetune_scratch(vqa_cfg, out_dir / "vqa_scratch", prev_threads, None, source)
        ok = True
    finally:
        if pool is not None:
            if ok:
                pool.close()
            else:
                pool.terminate()
            pool.join()
        torch.set_num_threads(prev_threads)

    def best(r) -> float:
        if r.best is not None:
            return float(r.best["value"])
        return float(r.last_eval.get("vqa_score", math.nan))

    # stage 1 trains ITM (+WRA) alone; stage 2 alternates tasks, so its falling loss is read per task (MLM)
    itml = _loss_series(out_dir / "pretrain_itm") or [math.nan]
    mlm = _loss_series(out_dir / "pretrain", "loss/mlm") or [math.nan]
    ftl = _loss_series(out_dir / "vqa_pretrained") or [math.nan]
    scl = _loss_series(out_dir / "vqa_scratch") or [math.nan]
    res = {
        "itm_first_loss": itml[0], "itm_last_loss": itml[-1], "itm_eval": itm.last_eval,
        "pretrain_first_loss": mlm[0], "pretrain_last_loss": mlm[-1], "pretrain_eval": pre.last_eval,
        "vqa_pretrained": best(ft), "vqa_scratch": best(sc),
        "vqa_pretrained_first_loss": ftl[0], "vqa_pretrained_last_loss": ftl[-1],
        "vqa_scratch_first_loss": scl[0], "vqa_scratch_last_loss": scl[-1],
        "seconds": time.time() - t0, "pretrain_seconds": t_pre,
    }
    res["margin"] = res["vqa_pretrained"] - res["vqa_scratch"]
    say("\nresults (validation split of the synthetic world)")
    say(f"  {'run':34s} {'VQA score':>10s} {'first loss':>11s} {'last loss':>10s}")
    say(f"  {'UNITER pretrained -> VQA':34s} {res['vqa_pretrained']:10.4f} "
        f"{res['vqa_pretrained_first_loss']:11.4f} {res['vqa_pretrained_last_loss']:10.4f}")
    say(f"  {'UNITER from scratch -> VQA':34s} {res['vqa_scratch']:10.4f} "
        f"{res['vqa_scratch_first_loss']:11.4f} {res['vqa_scratch_last_loss']:10.4f}")
    say(f"  {'margin (pretrained - scratch)':34s} {res['margin']:+10.4f}")
    ev = pre.last_eval
    say(f"  pretraining stage 1 loss (ITM + WRA) {res['itm_first_loss']:.4f} -> {res['itm_last_loss']:.4f}, "
        f"validation ITM accuracy {itm.last_eval.get('itm/acc', math.nan):.4f}")
    say(f"  pretraining stage 2 MLM loss {res['pretrain_first_loss']:.4f} -> {res['pretrain_last_loss']:.4f}; "
        f"validation ITM accuracy {ev.get('itm/acc', math.nan):.4f}, "
        + ", ".join(f"{k} {v:.4f}" for k, v in sorted(ev.items()) if k.startswith("loss")))
    if "mlm/image_gain" in ev:
        # does pretraining ground words in regions?  MLM accuracy on the true images vs shuffled ones
        say(f"  pretraining MLM accuracy {ev['mlm/acc']:.4f} with the true images, "
            f"{ev['mlm/acc_shuffled_images']:.4f} with shuffled ones (image gain {ev['mlm/image_gain']:+.4f})")
    say(f"  wall time {res['seconds']:.0f} s (pretraining {t_pre:.0f} s); seed {seed}")
    return res
