"""Config base class and the save/load format shared by the four models.

Our checkpoint format is a directory with ``config.json`` (the dataclass config, plus
``model_type``) and ``model.safetensors`` (the state_dict).  ``save_pretrained`` writes
both atomically (temporary files, then rename), so an interrupted save never leaves a
half-written checkpoint under the final names.
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any, ClassVar, TypeVar, Union

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
    """save_pretrained / from_pretrained for a model holding ``self.config``."""

    config_class: ClassVar[type[ModelConfig]] = ModelConfig

    def save_pretrained(self, directory: PathLike) -> Path:
        """Write config.json and model.safetensors into ``directory`` (atomically)."""
        from safetensors.torch import save_file

        d = Path(directory)
        sd = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        _atomic_write(d / WEIGHTS_NAME, lambda p: save_file(sd, p, metadata={"format": "pt"}))
        cfg = json.dumps(self.config.to_dict(), indent=2, sort_keys=True)
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
           "CONFIG_NAME", "WEIGHTS_NAME"]
