"""``python -m vlfast.evaluate --run-dir DIR`` (or ``vlfast-evaluate``): score a trained checkpoint.

Rebuilds the run's job from ``DIR/config.yaml``, loads the checkpoint (``--checkpoint``:
``best`` (default when the run kept one), ``latest``, or a path), and

* fine-tuning runs: predicts ``--split`` (val by default; test works without labels),
  prints the metric (VQA score / accuracy) and writes the benchmark's submission
  file into ``--out`` (default ``DIR/predictions``): VQA JSON, NLVR2 CSV, VCR CSV,
  RefCOCO+ boxes JSON, retrieval rankings JSON (R@1/5/10 printed), grounding boxes JSON;
* pretraining runs: prints the validation loss of every task.

``DIR`` may also be a directory written by ``python -m vlfast.export`` (config.yaml and
the exported model instead of checkpoints/): its model is scored.

The metrics are also written as ``--out/metrics_<split>.json``.  A user error (a
missing run directory or checkpoint, a checkpoint of another model, a bad flag) prints
one line ``vlfast.evaluate: <message>`` on stderr and exits 2 (``--debug``: with the
traceback).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Optional


def prepare(run_dir: str | Path, checkpoint: str = "auto") -> tuple[Any, Path]:
    """Rebuild the run's job from ``run_dir/config.yaml`` and load the checkpoint into
    it -> (job, checkpoint path).  What can go wrong here is the user's (a missing run
    directory or checkpoint, a config that no longer loads, a checkpoint of another
    model): UserError / ConfigError / FileNotFoundError, raised before the data is
    built where it can be.  A directory from ``python -m vlfast.export`` (config.yaml,
    no checkpoints/) is its own checkpoint: the exported model is loaded."""
    from vlfast.export import is_export_dir, load_exported_weights
    import warnings

    from vlfast.training.checkpoint import (best_checkpoint_path, list_checkpoints, load_model_weights,
                                            newest_intact_checkpoint, sha256_path, verify_checkpoint)
    from vlfast.training.config import UserError, load_config
    from vlfast.training.jobs import VLJob, check_names

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"--run-dir: expected a run directory with config.yaml, got {run_dir}")
    cfg = load_config(cfg_path)
    check_names(cfg)
    if checkpoint in ("auto", "best", "latest"):
        best = best_checkpoint_path(run_dir)
        if checkpoint == "best" and not best.is_file():
            raise FileNotFoundError(f"--checkpoint best: {run_dir} kept no best checkpoint")
        path = None
        if checkpoint in ("auto", "best") and best.is_file():
            why = verify_checkpoint(best)
            if why is None:
                path = best
            elif checkpoint == "best":
                raise UserError(f"--checkpoint best: {best} is corrupt: {why}")
            else:
                warnings.warn(f"{best} is corrupt ({why}); scoring the newest intact step checkpoint instead",
                              RuntimeWarning, stacklevel=2)
        if path is None and list_checkpoints(run_dir):
            path, skipped = newest_intact_checkpoint(run_dir)
            for why in skipped:  # a corrupt newest checkpoint: say so in plain words, use the newest intact one
                warnings.warn(why + ("; scoring " + str(path) + " instead" if path else ""), RuntimeWarning,
                              stacklevel=2)
            if path is None:
                raise UserError(f"--run-dir: every checkpoint in {run_dir / 'checkpoints'} is corrupt ("
                                + "; ".join(skipped) + ")")
        if path is None and is_export_dir(run_dir):
            path = run_dir  # an exported model (python -m vlfast.export)
        if path is None:
            raise FileNotFoundError(f"--run-dir: {run_dir} holds no checkpoint")
    else:
        path = Path(checkpoint)
        if not path.exists():
            raise FileNotFoundError(f"--checkpoint: {path} does not exist")
        if path.is_file() and sha256_path(path).is_file():
            why = verify_checkpoint(path)
            if why is not None:
                raise UserError(f"--checkpoint: {path} is corrupt: {why}")
    job = VLJob(cfg)
    try:
        load = load_exported_weights if is_export_dir(path) else load_model_weights
        report = load(job.model, path)
    except (UserError, FileNotFoundError):
        raise
    except Exception as e:  # an unreadable or foreign file: the user's
        from vlfast.train import one_line

        raise UserError(f"--checkpoint: cannot read {path}: {type(e).__name__}: {one_line(e)}") from e
    if report.missing or report.unexpected or report.mismatched:
        raise UserError(f"--checkpoint: {path} does not fit the run's model ({len(report.missing)} missing, "
                        f"{len(report.unexpected)} unexpected, {len(report.mismatched)} mismatched keys; "
                        f"e.g. {(report.missing + report.unexpected + [m[0] for m in report.mismatched])[0]})")
    return job, Path(path)


def evaluate_job(job: Any, checkpoint: str | Path, run_dir: str | Path, split: str = "val",
                 out: Optional[str | Path] = None) -> dict[str, Any]:
    """Score ``job.model`` (with ``checkpoint``'s weights, from :func:`prepare`) on
    ``split``; write the predictions and ``metrics_<split>.json`` into ``out`` (default
    ``run_dir/predictions``); returns {"metrics", "checkpoint", "split", "predictions"?}."""
    import torch

    from vlfast.training.submission import atomic_write_text

    model = job.model.eval()
    out_dir = Path(out) if out is not None else Path(run_dir) / "predictions"
    result: dict[str, Any] = {"checkpoint": str(checkpoint), "split": split}
    with torch.no_grad():
        if job.kind == "finetune":
            pred_path, metrics = job.write_predictions(model, split, out_dir)
            result["predictions"] = str(pred_path)
        else:
            metrics = job.evaluate(model, split)
    result["metrics"] = metrics
    atomic_write_text(out_dir / f"metrics_{split}.json", json.dumps(result, indent=2))
    return result


def evaluate_run(run_dir: str | Path, checkpoint: str = "auto", split: str = "val",
                 out: Optional[str | Path] = None) -> dict[str, Any]:
    """Evaluate a run directory; returns {"metrics", "checkpoint", "predictions"?}."""
    job, path = prepare(run_dir, checkpoint)
    return evaluate_job(job, path, run_dir, split, out)


def _main(argv: list[str]) -> int:
    from vlfast.train import ArgParser, prog_name, user_errors

    ap = ArgParser(prog=prog_name("vlfast.evaluate", "vlfast-evaluate"), description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", required=True,
                    help="a training run directory (with config.yaml), or a python -m vlfast.export directory")
    ap.add_argument("--checkpoint", default="auto", help="best | latest | a checkpoint path (default: best, else latest)")
    ap.add_argument("--split", default="val", choices=["train", "val", "test"])
    ap.add_argument("--out", help="output directory (default: RUN_DIR/predictions)")
    ap.add_argument("--debug", action="store_true", help="show the traceback of a user error")
    args = ap.parse_args(argv)
    with user_errors():
        job, path = prepare(args.run_dir, args.checkpoint)
    res = evaluate_job(job, path, args.run_dir, args.split, args.out)
    print(json.dumps(res, indent=2))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """The command line -> the exit code: 0 done, 1 a failure while evaluating, 2 a
    user error (one line on stderr; ``--debug`` adds the traceback)."""
    from vlfast.train import run_cli

    return run_cli("vlfast.evaluate", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
