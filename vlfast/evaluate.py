"""``python -m vlfast.evaluate --run-dir DIR``: score a trained checkpoint.

Rebuilds the run's job from ``DIR/config.yaml``, loads the checkpoint (``--checkpoint``:
``best`` (default when the run kept one), ``latest``, or a path), and

* fine-tuning runs: predicts ``--split`` (val by default; test works without labels),
  prints the metric (VQA score / accuracy) and writes the benchmark's submission
  file into ``--out`` (default ``DIR/predictions``): VQA JSON, NLVR2 CSV, VCR CSV,
  RefCOCO+ boxes JSON, retrieval rankings JSON (R@1/5/10 printed), grounding boxes JSON;
* pretraining runs: prints the validation loss of every task.

The metrics are also written as ``--out/metrics_<split>.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional


def evaluate_run(run_dir: str | Path, checkpoint: str = "auto", split: str = "val",
                 out: Optional[str | Path] = None) -> dict[str, Any]:
    """Evaluate a run directory; returns {"metrics", "checkpoint", "predictions"?}."""
    import torch

    from vlfast.training.checkpoint import best_checkpoint_path, latest_checkpoint, load_model_weights
    from vlfast.training.config import load_config
    from vlfast.training.jobs import VLJob
    from vlfast.training.submission import atomic_write_text

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"evaluate: --run-dir: expected a run directory with config.yaml, got {run_dir}")
    cfg = load_config(cfg_path)
    if checkpoint in ("auto", "best", "latest"):
        best = best_checkpoint_path(run_dir)
        path = best if checkpoint in ("auto", "best") and best.is_file() else latest_checkpoint(run_dir)
        if checkpoint == "best" and not best.is_file():
            raise FileNotFoundError(f"evaluate: --checkpoint best: {run_dir} kept no best checkpoint")
        if path is None:
            raise FileNotFoundError(f"evaluate: {run_dir} holds no checkpoint")
    else:
        path = Path(checkpoint)
    job = VLJob(cfg)
    report = load_model_weights(job.model, path)
    if report.missing or report.unexpected or report.mismatched:
        raise RuntimeError(f"evaluate: {path} does not fit the run's model:\n{report}")
    model = job.model.eval()
    out_dir = Path(out) if out is not None else run_dir / "predictions"
    result: dict[str, Any] = {"checkpoint": str(path), "split": split}
    with torch.no_grad():
        if job.kind == "finetune":
            pred_path, metrics = job.write_predictions(model, split, out_dir)
            result["predictions"] = str(pred_path)
        else:
            metrics = job.evaluate(model, split)
    result["metrics"] = metrics
    atomic_write_text(out_dir / f"metrics_{split}.json", json.dumps(result, indent=2))
    return result


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vlfast.evaluate", description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", required=True, help="a training run directory (with config.yaml)")
    ap.add_argument("--checkpoint", default="auto", help="best | latest | a checkpoint path (default: best, else latest)")
    ap.add_argument("--split", default="val", choices=["train", "val", "test"])
    ap.add_argument("--out", help="output directory (default: RUN_DIR/predictions)")
    args = ap.parse_args(argv)
    res = evaluate_run(args.run_dir, args.checkpoint, args.split, args.out)
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
