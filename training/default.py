"""The embedded default of ``python -m vlfast.train``: pretrain, fine-tune, compare.

1. Pretrain a small UNITER on the synthetic world with MLM + ITM (with WRA) + MRFR +
   MRC-kl under conditional masking (``configs/default_pretrain.yaml``).
2. Fine-tune it on the world's VQA (``configs/default_vqa.yaml``), starting from the
   pretrained weights.
3. Fine-tune the same architecture on VQA from scratch (same seed, data, steps).
4. Evaluate both on the validation split and print a results table.

The VisualBERT and UNITER papers' central finding -- pretraining on image-text pairs
helps downstream VQA -- reproduced in miniature; ``--quick`` is the shortened form CI
runs (fewer images and steps).
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Optional

from .config import TrainConfig, load_config
from .jobs import SyntheticSource, VLJob
from .loop import train

QUICK = {"data.options.n_images": 300, "optim.total_steps": 40, "logging.every": 10, "checkpoint.every": 0,
         "data.eval_batch_size": 64}
QUICK_VQA = {"optim.total_steps": 30, "eval.every": 0}


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


def run_default(out_dir: Path, *, quick: bool = False, seed: int = 0, overrides: tuple[str, ...] = (),
                verbose: bool = True) -> dict[str, Any]:
    """Run the three trainings into ``out_dir`` (pretrain/, vqa_pretrained/,
    vqa_scratch/) and return the results (also printed as a table)."""
    say = print if verbose else (lambda *a, **k: None)
    out_dir = Path(out_dir)
    extra = _overrides(QUICK) if quick else []
    pre_cfg: TrainConfig = load_config("default_pretrain", extra + [f"seed={seed}", *overrides])
    vqa_cfg: TrainConfig = load_config("default_vqa", extra + (_overrides(QUICK_VQA) if quick else [])
                                       + [f"seed={seed}", *overrides])
    t0 = time.time()
    source = SyntheticSource(pre_cfg.data.options)
    say(f"vlfast default run -> {out_dir}\n  synthetic world: {len(source.records)} images, "
        f"{source.feat_dim}-d region features, {source.num_region_classes} region classes, "
        f"{len(source.answers)} answers, vocab {source.tokenizer.vocab_size}")

    say(f"\n[1/3] pretraining UNITER ({', '.join(pre_cfg.tasks)}), {pre_cfg.optim.total_steps} steps")
    pre_job = VLJob(pre_cfg, source)
    pre = train(pre_job, pre_cfg, out_dir / "pretrain")
    t_pre = time.time() - t0

    say(f"\n[2/3] fine-tuning on VQA from the pretrained model, {vqa_cfg.optim.total_steps} steps")
    ft_job = VLJob(vqa_cfg, source)
    ft = train(ft_job, vqa_cfg, out_dir / "vqa_pretrained", init_checkpoint=pre.checkpoint)

    say(f"\n[3/3] fine-tuning on VQA from scratch, {vqa_cfg.optim.total_steps} steps")
    sc_job = VLJob(vqa_cfg, source)
    sc = train(sc_job, vqa_cfg, out_dir / "vqa_scratch")

    def best(r) -> float:
        if r.best is not None:
            return float(r.best["value"])
        return float(r.last_eval.get("vqa_score", math.nan))

    # tasks alternate during pretraining, so its falling loss is read per task (MLM, the largest share)
    mlm = _loss_series(out_dir / "pretrain", "loss/mlm") or [math.nan]
    ftl = _loss_series(out_dir / "vqa_pretrained") or [math.nan]
    scl = _loss_series(out_dir / "vqa_scratch") or [math.nan]
    res = {
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
    say(f"  pretraining MLM loss {res['pretrain_first_loss']:.4f} -> {res['pretrain_last_loss']:.4f}; "
        f"validation " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(pre.last_eval.items()) if k.startswith("loss")))
    ev = pre.last_eval
    if "mlm/image_gain" in ev:
        # does pretraining ground words in regions?  MLM accuracy on the true images vs shuffled ones
        say(f"  pretraining MLM accuracy {ev['mlm/acc']:.4f} with the true images, "
            f"{ev['mlm/acc_shuffled_images']:.4f} with shuffled ones (image gain {ev['mlm/image_gain']:+.4f})")
    say(f"  wall time {res['seconds']:.0f} s (pretraining {t_pre:.0f} s); seed {seed}")
    return res
