"""The four vision-language BERTs on vlfast ops: one file per model (model and config),
plus shared layers (layers.py) and the save/load format (base.py).

* :class:`Uniter` / :class:`UniterConfig` -- ChenRocks/UNITER
* :class:`ViLBert` / :class:`ViLBertConfig` -- vilbert-multi-task (two streams, co-attention)
* :class:`VLBert` / :class:`VLBertConfig` -- jackroos/VL-BERT
* :class:`VisualBert` / :class:`VisualBertConfig` -- uclanlp/visualbert and HF's VisualBERT
* :class:`VLPacking` / :class:`PackedLayout` -- the padding-free path's packing
  metadata (packing.py), which every model takes as ``packing=``
"""
from __future__ import annotations

from vlfast.models.base import ConversionReport, ModelConfig, PretrainedModel
from vlfast.models.layers import ModelOutput, SingleStreamOutput, TwoStreamOutput
from vlfast.models.packing import Packed, PackedLayout, VLPacking
from vlfast.models.uniter import Uniter, UniterConfig
from vlfast.models.vilbert import ViLBert, ViLBertConfig
from vlfast.models.visualbert import VisualBert, VisualBertConfig
from vlfast.models.vlbert import VLBert, VLBertConfig

__all__ = ["ModelConfig", "PretrainedModel", "ConversionReport", "ModelOutput", "SingleStreamOutput",
           "TwoStreamOutput", "Uniter", "UniterConfig", "ViLBert", "ViLBertConfig", "VisualBert", "VisualBertConfig",
           "VLBert", "VLBertConfig", "Packed", "PackedLayout", "VLPacking"]
