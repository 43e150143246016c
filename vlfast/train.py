"""``python -m vlfast.train`` (or ``vlfast-train``): the main job.

* No arguments: the embedded default (``vlfast.training.default``): pretrain a small
  UNITER on the synthetic world (ITM/WRA, then MLM + ITM/WRA + MRFR + MRC-kl), fine-tune it on VQA,
  fine-tune the same model from scratch, evaluate both and print a results table.
  ``--quick`` runs the shortened form (what CI runs); ``--sequential`` runs the
  scratch fine-tuning after the others instead of in a second process; ``--seed`` and
  ``key=value`` overrides apply to every stage.
* ``--config NAME|PATH [key=value ...]``: one config-driven run (a YAML file in
  ``training/configs/`` or a path, plus dotted overrides such as ``optim.lr=1e-4``)
  into ``--run-dir``; ``--seed N`` sets the config's ``seed`` (an override ``seed=M``
  that disagrees is an error); ``--resume`` continues the run in ``--run-dir`` from its
  newest checkpoint (a fresh start when it has none yet; ``--init-checkpoint`` then
  applies); ``--init-checkpoint`` starts from another run's weights.
* ``--print-config``: print the resolved config as YAML (after the file, the overrides
  and ``--seed``; the default run prints its three stages as YAML documents), check
  the names, files and flags, and exit 0 without building anything.
* ``--eval-only --run-dir DIR [--split val|test|train]``: score the run's checkpoint (as
  ``python -m vlfast.evaluate``), with the run's own ``config.yaml``.
* ``torchrun --nproc_per_node N -m vlfast.train --config ...``: DDP (gloo on CPU,
  nccl on GPU).
* ``--demo [--steps N] [--seed N]``: the attention-op training demo (``vlfast.training.demo``).

A flag applies or is rejected: one that does nothing in the chosen mode (``--quick``
with ``--config``, ``--split`` without ``--eval-only``, overrides with
``--eval-only``, ...) is an error naming it.  Errors of the user (a flag, a config
key or value, an unknown model, task or config name, a missing file) print one line
``vlfast.train: <message>`` on stderr and exit 2; ``--debug`` adds the traceback.  An
error while training prints its traceback and a last one-line summary and exits 1 (on
every rank under torchrun).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

NAME = "vlfast.train"


# ----------------------------------------------------------------------------------
# Shared by the command-line tools (vlfast.train, vlfast.evaluate, vlfast.convert)
# ----------------------------------------------------------------------------------

def _user_error(message: str) -> Exception:
    from vlfast.training.config import UserError

    return UserError(message)


class ArgParser(argparse.ArgumentParser):
    """argparse whose usage errors raise :class:`~vlfast.training.config.UserError`
    (printed as one line, exit 2) instead of printing the usage block."""

    def error(self, message: str):  # type: ignore[override]
        raise _user_error(f"{message} (see --help)")


def prog_name(module: str, script: str) -> str:
    """``script`` when run as that console script, else ``python -m module``."""
    return script if Path(sys.argv[0]).name == script else f"python -m {module}"


def one_line(e: BaseException, first: bool = False) -> str:
    """The message of ``e`` on one line (its lines joined with "; ", or the first line
    alone with ``first``; a KeyError's own text, not its repr)."""
    if (isinstance(e, KeyError) and type(e).__str__ is KeyError.__str__ and len(e.args) == 1
            and isinstance(e.args[0], str)):
        msg = e.args[0]
    else:
        msg = str(e)
    lines = [line.strip() for line in msg.splitlines() if line.strip()]
    if first and len(lines) > 1 and lines[0].startswith("Caught ") and "DataLoader worker" in lines[0]:
        # a DataLoader worker's exception, re-raised with the worker's traceback: its own
        # message is the traceback's last line ("KeyError: ..."), not "Caught ... in worker"
        last = lines[-1]
        return last.split(": ", 1)[1].strip("\"'") if last.startswith(type(e).__name__ + ": ") else last
    return (lines[0] if first else "; ".join(lines)) if lines else type(e).__name__


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Around parsing, validating and building (the config, names, files, the job):
    a ValueError, KeyError or OSError raised inside is the user's -> UserError (chained,
    so ``--debug`` shows where it came from).  Outside it (the training loop, the
    evaluation itself) such errors are bugs and keep their traceback."""
    from vlfast.training.config import UserError

    try:
        yield
    except UserError:
        raise
    except (ValueError, KeyError, OSError) as e:
        raise UserError(one_line(e)) from e


def _say(name: str, message: str) -> None:
    prefix = ""
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            prefix = f"[rank {os.environ.get('RANK', '?')}] "
    except ValueError:
        pass
    print(f"{name}: {prefix}{message}", file=sys.stderr, flush=True)


def run_cli(name: str, body: Callable[[list[str]], int], argv: Optional[Sequence[str]]) -> int:
    """Run ``body(argv)`` as a command: a UserError -> one line on stderr, exit code 2
    (``--debug`` in argv: the traceback first); any other exception -> its traceback
    and a one-line summary, exit code 1.  SystemExit (``--help``, SIGTERM's clean stop)
    and KeyboardInterrupt pass through."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    from vlfast.training.config import UserError

    try:
        return int(body(args))
    except UserError as e:
        if debug:
            traceback.print_exc()
        _say(name, one_line(e))
        return 2
    except Exception as e:  # noqa: BLE001 -- reported, then a non-zero exit
        traceback.print_exc()
        _say(name, f"failed: {type(e).__name__}: {one_line(e, first=True)}")
        return 1


# ----------------------------------------------------------------------------------
# vlfast.train
# ----------------------------------------------------------------------------------

def _parser() -> ArgParser:
    ap = ArgParser(prog=prog_name(NAME, "vlfast-train"), description=__doc__.splitlines()[0].replace("``", ""))
    ap.add_argument("overrides", nargs="*", help="config overrides key=value (dotted keys), for --config and the "
                                                  "default run")
    ap.add_argument("--config", help="config name in training/configs/ or a YAML path (default: the embedded default)")
    ap.add_argument("--run-dir", help="run directory (default: runs/<config>-<time>, runs/default-<time>); "
                                      "with --eval-only, the run to score")
    ap.add_argument("--resume", action="store_true",
                    help="--config: continue the run in --run-dir from its newest checkpoint (a fresh start, "
                         "from --init-checkpoint if given, while it has none)")
    ap.add_argument("--init-checkpoint", help="--config: initial model weights (a checkpoint of another run)")
    ap.add_argument("--eval-only", action="store_true", help="score the checkpoint of --run-dir and write predictions")
    ap.add_argument("--split", choices=["train", "val", "test"], help="split for --eval-only (default: val)")
    ap.add_argument("--quick", action="store_true", help="the shortened default run (CI); not with --config")
    ap.add_argument("--seed", type=int, help="the run's seed: --config (sets `seed`), the default run (default 0), "
                                             "--demo")
    ap.add_argument("--sequential", action="store_true",
                    help="default run: fine-tune from scratch after pretraining, not in a second process alongside it")
    ap.add_argument("--print-config", action="store_true",
                    help="print the resolved config (YAML, after overrides and --seed), check names, files and "
                         "flags, and exit without building anything")
    ap.add_argument("--demo", action="store_true", help="the attention-op training demo")
    ap.add_argument("--steps", type=int, help="steps of --demo")
    ap.add_argument("--debug", action="store_true", help="show the traceback of a user error")
    return ap


MODES = {"demo": "with --demo", "eval": "with --eval-only", "config": "with --config",
         "default": "in the default run (no --config)"}
# flag -> the modes it applies to, and what to say when it is given elsewhere
APPLIES: dict[str, tuple[tuple[str, ...], str]] = {
    "overrides": (("config", "default"), "key=value overrides apply to a --config run or the default run"),
    "--config": (("config",), "--eval-only reads RUN_DIR/config.yaml, --demo has no config"),
    "--run-dir": (("config", "default", "eval"), "it applies to --config, --eval-only and the default run"),
    "--resume": (("config",), "only a --config run resumes (the default run always starts fresh)"),
    "--init-checkpoint": (("config",), "only a --config run starts from other weights (the default run always "
                                       "starts fresh)"),
    "--eval-only": (("eval",), "--demo evaluates nothing"),
    "--split": (("eval",), "only --eval-only takes a split"),
    "--quick": (("default",), "only the default run has a quick form; shorten a --config run with "
                              "optim.total_steps=N"),
    "--seed": (("config", "default", "demo"), "the evaluated run's config.yaml fixes its seed"),
    "--sequential": (("default",), "only the default run has a second process"),
    "--steps": (("demo",), "only --demo takes --steps (use optim.total_steps=N with --config)"),
    "--print-config": (("config", "default"), "only a --config run or the default run has a config to print"),
}


def _check_flags(args: argparse.Namespace, mode: str) -> None:
    given = {"overrides": bool(args.overrides), "--config": args.config is not None,
             "--run-dir": args.run_dir is not None, "--resume": args.resume,
             "--init-checkpoint": args.init_checkpoint is not None, "--eval-only": args.eval_only,
             "--split": args.split is not None, "--quick": args.quick, "--seed": args.seed is not None,
             "--sequential": args.sequential, "--steps": args.steps is not None, "--print-config": args.print_config}
    for flag, on in given.items():
        modes, why = APPLIES[flag]
        if on and mode not in modes:
            what = f"key=value overrides ({args.overrides[0]!r}...)" if flag == "overrides" else flag
            raise _user_error(f"{what}: not {MODES[mode]}; {why}")
    for o in args.overrides:
        if "=" not in o:
            raise _user_error(f"overrides: expected key=value, got {o!r}")
    if mode == "eval" and not args.run_dir:
        raise _user_error("--eval-only: needs --run-dir (the run to score)")
    if args.resume and not args.run_dir:
        raise _user_error("--resume: needs --run-dir (the run to continue)")
    if args.steps is not None and args.steps < 1:
        raise _user_error(f"--steps: expected an int >= 1, got {args.steps}")


def with_seed(seed: Optional[int], overrides: Sequence[str]) -> list[str]:
    """``overrides`` plus ``seed=<seed>`` for ``--seed``; an override ``seed=M`` that
    disagrees with it is a UserError (one of them would be ignored)."""
    import yaml

    out = list(overrides)
    if seed is None:
        return out
    for o in reversed(out):
        key, _, raw = o.partition("=")
        if key.strip() == "seed":
            try:
                value: Any = yaml.safe_load(raw)
            except yaml.YAMLError:
                value = raw
            if isinstance(value, bool) or value != seed:
                raise _user_error(f"--seed {seed}: disagrees with the override {o!r} (give one of them)")
            break
    return out + [f"seed={seed}"]


def _check_init_checkpoint(path: str) -> None:
    p = Path(path)
    if p.is_dir():
        if not (p / "model.safetensors").is_file():
            raise _user_error(f"--init-checkpoint: directory {path} has no model.safetensors")
    elif not p.is_file():
        raise _user_error(f"--init-checkpoint: {path} does not exist")


def _check_device(device: str) -> None:
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise _user_error("device: 'cuda' was asked for, but torch.cuda.is_available() is False "
                              "(use device=auto or device=cpu)")


def _check_fresh(run_dir: Path, flag: str = "--run-dir") -> None:
    from vlfast.training.checkpoint import best_checkpoint_path, checkpoint_dir, list_checkpoints

    if list_checkpoints(run_dir) or best_checkpoint_path(run_dir).exists():
        raise _user_error(f"{flag}: {run_dir} already holds checkpoints ({checkpoint_dir(run_dir)}); pass --resume "
                          "to continue that run, or choose another run directory")


def _main(argv: list[str]) -> int:
    args = _parser().parse_intermixed_args(argv)
    mode = ("demo" if args.demo else "eval" if args.eval_only else "config" if args.config is not None
            else "default")
    _check_flags(args, mode)
    stamp = time.strftime("%Y%m%d-%H%M%S")

    if mode == "demo":
        from vlfast.training import demo

        extra = [] if args.steps is None else ["--steps", str(args.steps)]
        return demo.main(extra + ([] if args.seed is None else ["--seed", str(args.seed)]))

    if mode == "eval":
        import json

        from vlfast.evaluate import evaluate_job, prepare

        with user_errors():
            job, path = prepare(args.run_dir)
        print(json.dumps(evaluate_job(job, path, args.run_dir, split=args.split or "val"), indent=2))
        return 0

    overrides = with_seed(args.seed, args.overrides)
    from vlfast.training.jobs import check_names

    if mode == "default":
        from vlfast.training.default import STAGE_DIRS, default_configs, run_default

        with user_errors():
            cfgs = default_configs(quick=args.quick, seed=args.seed or 0, overrides=tuple(overrides))
            for c in cfgs.values():
                check_names(c)
                _check_device(c.device)
            if args.run_dir:
                for d in STAGE_DIRS:
                    _check_fresh(Path(args.run_dir) / d)
        if args.print_config:
            sys.stdout.write("\n---\n".join(f"# the default run, stage {stage}\n{c.to_yaml()}"
                                            for stage, c in cfgs.items()))
            return 0
        run_dir = Path(args.run_dir or f"runs/default-{stamp}")
        res = run_default(run_dir, quick=args.quick, seed=cfgs["pretrain"].seed, overrides=tuple(overrides),
                          parallel=not args.sequential)
        losses_fell = (res["pretrain_last_loss"] < res["pretrain_first_loss"]
                       and math.isfinite(res["itm_last_loss"]))
        return 0 if losses_fell else 1

    from vlfast.training.config import load_config

    run_dir = Path(args.run_dir or f"runs/{Path(args.config).stem}-{stamp}")
    with user_errors():
        cfg = load_config(args.config, overrides)
        check_names(cfg)
        _check_device(cfg.device)
        if args.init_checkpoint is not None:
            _check_init_checkpoint(args.init_checkpoint)
        if not args.resume:
            _check_fresh(run_dir)
    if args.print_config:
        sys.stdout.write(cfg.to_yaml())
        return 0

    from vlfast.training.distributed import cleanup, init_distributed
    from vlfast.training.jobs import VLJob
    from vlfast.training.loop import train

    with user_errors():
        info = init_distributed(cfg.device, cfg.distributed.backend, cfg.distributed.timeout_s)
    try:
        with user_errors():
            job = VLJob(cfg, rank=info.rank, world_size=info.world_size)
        res = train(job, cfg, run_dir, resume=args.resume, init_checkpoint=args.init_checkpoint)
    finally:
        cleanup()
    if info.rank == 0:
        print(f"done: step {res.step}; last eval {res.last_eval}; checkpoint {res.checkpoint}")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """The command line (``argv``: the arguments, default ``sys.argv[1:]``) -> the exit
    code: 0 done, 1 a failure while running (or the default run's losses did not fall),
    2 a user error."""
    return run_cli(NAME, _main, argv)


if __name__ == "__main__":
    sys.exit(main())
