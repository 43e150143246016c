"""``python -m vlfast.convert --model {visualbert,vlbert,vilbert,uniter} --src PATH --out DIR``

Converts a checkpoint in the model's official layout (UNITER ``uniter.*``, ViLBERT
``bert.*`` with ``v_layer``/``c_layer``, VL-BERT ``vlbert.*`` with or without
``module.``, VisualBERT in HF's layout) into vlfast's format (``config.json`` +
``model.safetensors``, loadable with ``<Model>.from_pretrained(DIR)``), and lists every
unmatched key both ways: our parameters the source lacked, and source keys not used.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Optional

MODELS = {"visualbert": "vlfast.models.visualbert", "vlbert": "vlfast.models.vlbert",
          "vilbert": "vlfast.models.vilbert", "uniter": "vlfast.models.uniter"}


def convert(model: str, src: str, out: str, config: Optional[str] = None):
    """Convert ``src`` (a state_dict file) for ``model``; write to ``out``; returns
    (model, ConversionReport)."""
    if model not in MODELS:
        raise ValueError(f"convert: model: expected one of {', '.join(MODELS)}, got {model!r}")
    mod = importlib.import_module(MODELS[model])
    cfg = None
    if config is not None:
        cfg = mod.CONFIG_CLASS.from_dict(json.loads(Path(config).read_text()))
    net, report = mod.MODEL_CLASS.from_official(src, config=cfg)
    net.save_pretrained(out)
    return net, report


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vlfast.convert", description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, choices=sorted(MODELS))
    ap.add_argument("--src", required=True, help="official checkpoint (.pt/.pth/.bin/.ckpt/.safetensors)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--config", help="config JSON of ours (default: inferred from the checkpoint's shapes)")
    args = ap.parse_args(argv)
    if not Path(args.src).is_file():
        ap.error(f"--src: expected an existing file, got {args.src}")
    _, report = convert(args.model, args.src, args.out, args.config)
    print(f"wrote {args.out} (config.json, model.safetensors)")
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
