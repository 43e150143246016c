"""The four vision-language BERTs on vlfast ops: one file per model (model and config),
plus shared layers (layers.py) and the save/load format (base.py)."""
from __future__ import annotations

from vlfast.models.base import ModelConfig, PretrainedModel
from vlfast.models.layers import ModelOutput, SingleStreamOutput, TwoStreamOutput

__all__ = ["ModelConfig", "PretrainedModel", "ModelOutput", "SingleStreamOutput", "TwoStreamOutput"]
