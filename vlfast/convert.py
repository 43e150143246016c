"""``python -m vlfast.convert --model {visualbert,vlbert,vilbert,uniter} --src PATH --out DIR`` (or ``vlfast-convert``)

Converts a checkpoint in the model's official layout (UNITER ``uniter.*``, ViLBERT
``bert.*`` with ``v_layer``/``c_layer``, VL-BERT ``vlbert.*`` with or without
``module.``, VisualBERT in HF's layout) into vlfast's format (``config.json`` +
``model.safetensors``, loadable with ``<Model>.from_pretrained(DIR)``; for VisualBERT an
HF directory, which ``transformers.AutoModel.from_pretrained(DIR)`` loads too), and lists every
unmatched key both ways: our parameters the source lacked, and source keys not used.
A user error (a missing or unreadable file, a checkpoint that does not fit the model)
prints one line ``vlfast.convert: <message>`` on stderr and exits 2 (``--debug``: with
the traceback).
"""
from __future__ import annotations

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
    net, report = mod.MODEL_CLASS.from_official(src, config=cfg, output_loading_info=True)
    net.save_pretrained(out)
    return net, report


def _vlfast_kind(path: Path) -> Optional[str]:
    """What a vlfast file is ("a vlfast training checkpoint (step 12, model uniter)"),
    or None for anything else (an official checkpoint, or unreadable: convert says)."""
    if path.suffix == ".safetensors":
        return None
    try:
        import torch

        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 -- not ours to judge here; convert reports it
        return None
    if not isinstance(obj, dict):
        return None
    fmt = obj.get("format")
    if fmt in ("vlfast-train", "vlfast-best"):
        model = (obj.get("config") or {}).get("model", {}).get("name", "?") if isinstance(obj.get("config"), dict) \
            else "?"
        what = "training checkpoint" if fmt == "vlfast-train" else "best-model checkpoint"
        return f"a vlfast {what} (step {obj.get('step', '?')}, model {model})"
    return None


def _main(argv: list[str]) -> int:
    import pickle

    from vlfast.train import ArgParser, one_line, prog_name, user_errors
    from vlfast.training.config import UserError

    ap = ArgParser(prog=prog_name("vlfast.convert", "vlfast-convert"), description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, choices=sorted(MODELS))
    ap.add_argument("--src", required=True, help="official checkpoint (.pt/.pth/.bin/.ckpt/.safetensors)")
    ap.add_argument("--out", required=True, help="output directory")
    ap.add_argument("--config", help="config JSON of ours (default: inferred from the checkpoint's shapes)")
    ap.add_argument("--debug", action="store_true", help="show the traceback of a user error")
    args = ap.parse_args(argv)
    if not Path(args.src).is_file():
        raise UserError(f"--src: expected an existing file, got {args.src}")
    if args.config is not None and not Path(args.config).is_file():
        raise UserError(f"--config: expected an existing JSON file, got {args.config}")
    kind = _vlfast_kind(Path(args.src))
    if kind is not None:
        raise UserError(f"--src: {args.src} is {kind}, not an official {args.model} checkpoint: it needs no "
                        "conversion -- give it to `vlfast.train --init-checkpoint`, or make a shareable model of "
                        "it with `python -m vlfast.export --checkpoint " + str(args.src) + " --out DIR`")
    # reading and mapping the user's files: a checkpoint of another model, an unreadable
    # file or a config that does not fit it are the user's errors
    with user_errors():
        try:
            _, report = convert(args.model, args.src, args.out, args.config)
        except pickle.UnpicklingError as e:
            raise UserError(f"--src: cannot read {args.src}: {one_line(e)}") from e
    print(f"wrote {args.out} (config.json, model.safetensors)")
    print(report)
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """The command line -> the exit code: 0 done, 1 a failure, 2 a user error (one line
    on stderr; ``--debug`` adds the traceback)."""
    from vlfast.train import run_cli

    return run_cli("vlfast.convert", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
