"""Fine-tuning task heads for the four models, as their official code builds them.

Each head wraps a backbone (a model instance, or a config from which one is built) and
runs ``forward(batch: VLBatch) -> TaskOutput(loss, logits, predictions)``: the loss is
computed when the batch carries the task's targets (else ``None``), and each head scores
only what its task needs (one pooled vector or one token per sample, the visual slots
for region scoring, the phrase tokens for grounding).

Which model supports which task (official code: UNITER ``model/*.py``; vilbert-multi-task
``VILBertForVLTasks`` + ``task_utils.py``; VL-BERT ``{vqa,refcoco,vcr}/modules``;
VisualBERT uclanlp ``TrainVisualBERTObjective`` / HF ``modeling_visual_bert``)::

    task \\ model       UNITER                  ViLBERT                    VL-BERT            VisualBERT
    VQA               UniterForVQA            ViLBertForVQA              VLBertForVQA       VisualBertForVQA
    NLVR2             UniterForNLVR2          ViLBertForNLVR2            --                 VisualBertForNLVR2
    VCR / multi-ch.   UniterForVCR            ViLBertForVCR              VLBertForVCR       VisualBertForMultipleChoice
    RefCOCO(+/g)      UniterForRefCOCO        ViLBertForRefCOCO          VLBertForRefCOCO   --
    retrieval (ITM)   UniterForRetrieval      ViLBertForRetrieval        --                 --
    phrase grounding  --                      ViLBertForPhraseGrounding  --                 VisualBertForPhraseGrounding

Heads and losses (B samples; A answers; K choices / rows per group; Lv regions):

* VQA.  UNITER: ``vqa_output`` = Linear(E,2E) GELU LayerNorm Linear(2E,A) on the pooled
  output; ViLBERT: ``vil_prediction`` (the same MLP on Eb) on dropout(fused pooled);
  VL-BERT: the hidden state of the answer token (the ``[MASK]`` before the final
  ``[SEP]``: real text length - 2) through ``final_mlp`` ("mlm": dense GELU LayerNorm,
  dropout, Linear; or "2fc"/"1fc").  Loss: ``BCE-with-logits(logits, soft scores)``
  averaged over all B*A entries, times A (= summed over answers, averaged over samples).
  VisualBERT: the hidden state at real text length - 2 (the ``[MASK]`` of
  ``[CLS] question ? [MASK] [SEP]``), dropout, ``cls`` Linear(E,A); loss "kl" (official):
  ``KLDiv(log_softmax(logits), targets, batchmean)`` = sum t*(log t - log p) / B with the
  soft scores used as given (not renormalised), or "bce" as above.
* NLVR2.  UNITER "paired": rows 2i, 2i+1 are (statement, left image), (statement, right
  image); regions get token types 1 and 2 (the type table is extended to 3 rows, row 2 a
  copy of row 1, as ``init_type_embedding``); ``nlvr2_output`` Linear(2E,2) on the two
  pooled outputs concatenated; "triplet": one row with both images (types 1/2 by
  ``img_index``), Linear(E,2); "paired-attn" (the released config): bidirectional
  multi-head attention between the two rows' sequences, a Linear-ReLU fusion, attention
  pooling, Linear(2E,2).  Cross-entropy.  ViLBERT: paired rows,
  ``vil_binary_prediction`` MLP(2Eb -> 2Eb -> 2) on the two fused pooled vectors
  concatenated, BCE-with-logits against the one-hot label averaged over N*2 entries.
  VisualBERT: one row with both images' regions (visual token types 0/1 by
  ``img_index``, as the original), dropout, Linear(E,2), cross-entropy.
* VCR-style multiple choice: rows are (question, choice) pairs grouped by
  ``pair_index``.  UNITER: ``vcr_output`` Linear(E,2E) ReLU LayerNorm Linear(2E,2) per
  row, 2-way cross-entropy against "this row is the answer", averaged over rows; the
  choice score is the class-1 logit.  ViLBERT: ``vil_logit`` Linear(Eb,1) on
  dropout(fused pooled); VisualBERT: dropout, Linear(E,1); both cross-entropy over the K
  choices.  VL-BERT: ``final_mlp`` ("1fc" dropout+Linear, or "2fc") on the pooled
  output; loss "sigmoid" (the released configs: BCE-with-logits against the one-hot
  choice, positive weight w, rescaled by (w+1)/(2w), mean over N*K) or "ce".
* RefCOCO+-style region scoring over the visual slots.  UNITER: ``re_output``
  (Linear(E,1), or mlp=2: Linear GELU LayerNorm Linear), padding scored -1e4, loss
  "cls" (cross-entropy over regions, averaged over samples; the official script sums)
  or "rank" (hinge on sigmoid scores, margin 0.2, the negative the highest-scoring
  other region with probability ``hard_ratio`` else a random one).  ViLBERT:
  ``vision_logit`` Linear(Ev,1) on dropout(region states), padding -10000; BCE-with-
  logits against per-region targets, mean over B*Lv times Lv (= summed over regions,
  averaged over samples).  VL-BERT: ``final_mlp`` dense+GELU, dropout, Linear(E,1);
  BCE-with-logits averaged over the real regions of the batch.
* Image-text retrieval: rows are image-text pairs grouped by ``pair_index``, one
  positive per group (``itm_labels``).  UNITER: ``rank_output`` Linear(E,1); loss
  ``clamp(margin + sigmoid(s_neg) - sigmoid(s_pos), 0)`` averaged over (group, negative)
  pairs (margin 0.2); hard negatives: :meth:`RetrievalHead.mine_hard_negatives` scores
  every candidate without gradient and keeps the positive and the k highest-scoring
  negatives of each group (``UniterForImageTextRetrievalHardNeg``).  ViLBERT:
  ``vil_logit`` on dropout(fused pooled), cross-entropy over each group's rows (the
  official 4 rows: positive, random caption, random image, hard negative).
* Phrase grounding.  ViLBERT (FlickrGrounding): the text is the phrase; the RefCOCO head
  (``vision_logit``).  VisualBERT (``VisualBertForRegionToPhraseAlignment``): the phrase
  tokens' states query the region states through one attention head of size
  E / num_attention_heads (``attention.query``/``attention.key``); scores are
  q.k / sqrt(d), padding masked; loss ``KLDiv(log_softmax(scores), targets, batchmean)``.

Batch layout and target names.  The shared names of ``vlfast.data.batch`` are used:
``vqa_targets`` (B,A), ``nlvr2_labels`` (N,), ``mc_labels`` (N,), ``ref_targets`` (B,),
``itm_labels`` (B',), ``pair_index`` (B',).  When a sample spans several rows (NLVR2
paired, multiple choice, retrieval groups) the batch rows are image-text pairs and
``pair_index[j]`` is the sample of row j; the k-th row of a sample (in batch order) is
its choice k (its left/right image for NLVR2).  Without ``pair_index``, consecutive rows
form the groups (2 per NLVR2 sample; B'/N per choice group).  Target names added here:

* ``img_index`` (B, Lv) long: for the one-row NLVR2 formats (UNITER triplet,
  VisualBERT), which of the sample's two images (0 = left, 1 = right) each region is from;
* ``ref_region_targets`` (B, Lv) float, optional: per-region targets for region scoring
  (ViLBERT: IoU with the gold box, zeroed below 0.5; VL-BERT: 1 where IoU > 0.5); the
  one-hot of ``ref_targets`` when absent;
* ``phrase_positions`` (B, P) long: the text position of each phrase's token (-1 =
  padding); ``phrase_targets`` (B, P, Lv) float: each phrase's target distribution over
  the regions (VisualBERT phrase grounding).

Checkpoints: ``head.save_pretrained(dir)`` writes the backbone (``config.json`` +
``model.safetensors``, loadable by the backbone class alone), the head weights
(``head.safetensors``), the head's class and arguments (``task.json``) and, for VQA, the
answer label map (``answers.json``: the answers in label order); every file atomically.
``TaskHead.from_pretrained(dir)`` (or ``<HeadClass>.from_pretrained``) rebuilds it.
Head parameter names are the official ones (``vqa_output.*``, ``nlvr2_output.*``,
``vil_prediction.logit_fc.*``, ``final_mlp.*``, ``cls.*``, ...).
"""
from __future__ import annotations

import abc
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NoReturn, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlfast.data.batch import VLBatch
from vlfast.models import (ModelConfig, PretrainedModel, Uniter, UniterConfig, ViLBert, ViLBertConfig, VisualBert,
                           VisualBertConfig, VLBert, VLBertConfig)
from vlfast.models.base import CONFIG_NAME, PathLike, _atomic_write
from vlfast.models.layers import init_bert_weights

HEAD_WEIGHTS_NAME = "head.safetensors"
TASK_NAME = "task.json"
ANSWERS_NAME = "answers.json"
DEFAULT_NUM_ANSWERS = 3129

# vilbert-multi-task task numbers (vilbert_tasks.yml), used as task tokens when the
# backbone has ``task_specific_tokens``
VILBERT_TASK_IDS = {"vqa": 1, "vcr_q_a": 5, "vcr_qa_r": 6, "retrieval_coco": 7, "retrieval_flickr30k": 8,
                    "refcoco": 9, "refcoco+": 10, "refcocog": 11, "nlvr2": 12, "flickr_grounding": 18}


def _fail(name: str, arg: str, expected: str, got: object) -> NoReturn:
    raise ValueError(f"{name}: {arg}: expected {expected}, got {got}")


def _desc(t: Any) -> str:
    if isinstance(t, Tensor):
        return f"a {str(t.dtype).replace('torch.', '')} tensor of shape {tuple(t.shape)}"
    return f"a {type(t).__name__}"


# ----------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------

@dataclass
class TaskOutput:
    """loss: scalar, or None when the batch has no targets for the task;
    logits: the task's scores (shapes per head); predictions: the argmax decisions."""
    loss: Optional[Tensor]
    logits: Tensor
    predictions: Tensor


# ----------------------------------------------------------------------------------
# Row grouping (samples spanning several rows)
# ----------------------------------------------------------------------------------

@dataclass
class Groups:
    """index (N, K) rows of each group (0 where invalid); valid (N, K) bool;
    position (B',) rank of each row inside its group."""
    index: Tensor
    valid: Tensor
    position: Tensor

    @property
    def num_groups(self) -> int:
        return int(self.index.shape[0])

    def gather(self, x: Tensor, fill: float = 0.0) -> Tensor:
        """(B', ...) per row -> (N, K, ...) with ``fill`` at invalid slots."""
        out = x[self.index]
        mask = self.valid.view(self.valid.shape + (1,) * (x.dim() - 1))
        return out.masked_fill(~mask, fill)


def group_rows(name: str, n_rows: int, pair_index: Optional[Tensor], *, num_groups: Optional[int] = None,
               per_group: Optional[int] = None, device: Optional[torch.device] = None) -> Groups:
    """Groups of rows: from ``pair_index`` (B',) (row j belongs to sample
    pair_index[j]; rows keep their batch order inside a group) or, without it,
    consecutive runs of ``per_group`` rows (or n_rows / num_groups)."""
    if pair_index is None:
        if per_group is None:
            if not num_groups:
                _fail(name, "pair_index", "a (B',) long tensor (or labels giving the number of samples)", "None")
            if n_rows % num_groups:
                _fail(name, "pair_index", f"given, since {n_rows} rows do not split into {num_groups} equal groups",
                      "None")
            per_group = n_rows // num_groups
        if per_group <= 0 or n_rows % per_group:
            _fail(name, "batch rows", f"a multiple of {per_group} (rows per sample)", n_rows)
        n = n_rows // per_group
        if num_groups is not None and n != num_groups:
            _fail(name, "batch rows", f"{num_groups} samples x {per_group} rows = {num_groups * per_group}", n_rows)
        index = torch.arange(n_rows, device=device).view(n, per_group)
        return Groups(index, torch.ones_like(index, dtype=torch.bool),
                      torch.arange(n_rows, device=device) % per_group)
    if not isinstance(pair_index, Tensor) or pair_index.shape != (n_rows,) or pair_index.dtype.is_floating_point \
            or pair_index.dtype == torch.bool:
        _fail(name, "targets['pair_index']", f"a ({n_rows},) integer tensor (one sample index per row)",
              _desc(pair_index))
    pi = pair_index.long()
    if n_rows == 0:
        _fail(name, "batch rows", "at least one row", 0)
    if int(pi.min()) < 0:
        _fail(name, "targets['pair_index']", "values >= 0", f"min {int(pi.min())}")
    n = int(pi.max()) + 1 if num_groups is None else num_groups
    if int(pi.max()) >= n:
        _fail(name, "targets['pair_index']", f"values in [0, {n}) ({n} samples by the labels)",
              f"max {int(pi.max())}")
    counts = torch.bincount(pi, minlength=n)
    if bool((counts == 0).any()):
        _fail(name, "targets['pair_index']", f"every sample 0..{n - 1} to have rows",
              f"no rows for sample(s) {(counts == 0).nonzero().flatten().tolist()[:8]}")
    if per_group is not None and bool((counts != per_group).any()):
        _fail(name, "targets['pair_index']", f"{per_group} rows per sample", f"counts {counts.tolist()[:8]}")
    order = torch.sort(pi, stable=True).indices
    starts = torch.cumsum(counts, 0) - counts
    pos_sorted = torch.arange(n_rows, device=pi.device) - starts[pi[order]]
    position = torch.empty_like(pi)
    position[order] = pos_sorted
    K = int(counts.max())
    index = torch.zeros(n, K, dtype=torch.long, device=pi.device)
    valid = torch.zeros(n, K, dtype=torch.bool, device=pi.device)
    index[pi[order], pos_sorted] = order
    valid[pi[order], pos_sorted] = True
    return Groups(index, valid, position)


# ----------------------------------------------------------------------------------
# Target checks
# ----------------------------------------------------------------------------------

def _labels(name: str, batch: VLBatch, key: str, n: Optional[int] = None, upper: Optional[int] = None
            ) -> Optional[Tensor]:
    t = batch.targets.get(key)
    if t is None:
        return None
    if not isinstance(t, Tensor) or t.dim() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
        _fail(name, f"targets[{key!r}]", "a 1-d integer tensor" + (f" of shape ({n},)" if n is not None else ""),
              _desc(t))
    if n is not None and t.shape[0] != n:
        _fail(name, f"targets[{key!r}]", f"shape ({n},)", f"shape {tuple(t.shape)}")
    if t.numel() and int(t.min()) < 0:
        _fail(name, f"targets[{key!r}]", "values >= 0", f"min {int(t.min())}")
    if upper is not None and t.numel() and int(t.max()) >= upper:
        _fail(name, f"targets[{key!r}]", f"values in [0, {upper})", f"max {int(t.max())}")
    return t.long()


def _float_target(name: str, batch: VLBatch, key: str, shape: tuple[int, ...]) -> Optional[Tensor]:
    t = batch.targets.get(key)
    if t is None:
        return None
    if not isinstance(t, Tensor) or not t.dtype.is_floating_point or tuple(t.shape) != tuple(shape):
        _fail(name, f"targets[{key!r}]", f"a float tensor of shape {tuple(shape)}", _desc(t))
    return t.float()


def _check_batch(name: str, batch: Any) -> VLBatch:
    if not isinstance(batch, VLBatch):
        _fail(name, "batch", "a vlfast.data.batch.VLBatch", f"a {type(batch).__name__}")
    return batch


def _answer_index(name: str, batch: VLBatch) -> Tensor:
    """(B,) position of the answer token: real text length - 2 (the token before the
    final [SEP])."""
    n = batch.attention_mask.long().sum(1)
    if batch.batch_size and int(n.min()) < 2:
        _fail(name, "batch.attention_mask", "at least 2 real text tokens per row (the answer token precedes the "
              "final [SEP])", f"a row with {int(n.min())}")
    return n - 2


def _one_hot_region_targets(name: str, batch: VLBatch) -> Optional[Tensor]:
    B, Lv = batch.visual_mask.shape
    soft = _float_target(name, batch, "ref_region_targets", (B, Lv))
    if soft is not None:
        return soft
    idx = _labels(name, batch, "ref_targets", B, Lv)
    if idx is None:
        return None
    if not bool(batch.visual_mask[torch.arange(B, device=idx.device), idx].all()):
        _fail(name, "targets['ref_targets']", "indices of real regions (visual_mask True)", idx.tolist()[:8])
    return F.one_hot(idx, Lv).float()


# ----------------------------------------------------------------------------------
# Shared head modules (official names)
# ----------------------------------------------------------------------------------

class SimpleClassifier(nn.Module):
    """ViLBERT's ``SimpleClassifier``: logit_fc = Linear(in, hid), GELU, LayerNorm(hid,
    eps 1e-12), Linear(hid, out).  (B, in) -> (B, out)."""

    def __init__(self, in_dim: int, hid_dim: int, out_dim: int):
        super().__init__()
        self.logit_fc = nn.Sequential(nn.Linear(in_dim, hid_dim), nn.GELU(), nn.LayerNorm(hid_dim, eps=1e-12),
                                      nn.Linear(hid_dim, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        return self.logit_fc(x)


class ScoreLinear(nn.Linear):
    """A Linear that ranks: its output is computed in fp32, also under autocast.

    Retrieval and region scores are compared across many candidates (argmax, recall@k);
    in bf16 (8 mantissa bits) near-equal scores round to ties, and a tie-breaking rule
    then decides the metric.  The inputs (half under autocast) are read in fp32 and the
    small (E, 1) projection runs in fp32, so distinct states give distinct scores.  The
    parameters and their names are those of ``nn.Linear`` (checkpoints are unchanged)."""

    def forward(self, x: Tensor) -> Tensor:
        dev = x.device.type
        if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
            with torch.autocast(device_type=dev, enabled=False):
                return F.linear(x.float(), self.weight.float(), None if self.bias is None else self.bias.float())
        return super().forward(x)


class PredictionHeadTransform(nn.Module):
    """BERT's ``BertPredictionHeadTransform``: dense, GELU, LayerNorm.  (..., E) -> (..., E)."""

    def __init__(self, hidden: int, eps: float = 1e-12):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        return self.LayerNorm(F.gelu(self.dense(x)))


class DenseGelu(nn.Module):
    """VL-BERT's ``VisualLinguisticBertMVRCHeadTransform``: dense, GELU (no LayerNorm)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return F.gelu(self.dense(x))


class AttentionPool(nn.Module):
    """UNITER's attention pooling: score = ReLU(Linear(E,1)), padding -1e4, softmax,
    dropout, weighted sum.  x (N,T,E), pad (N,T) True = padding -> (N,E)."""

    def __init__(self, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(hidden, 1), nn.ReLU())
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, pad: Tensor) -> Tensor:
        score = self.fc(x).squeeze(-1) + pad.to(x.dtype) * -1e4
        w = self.dropout(F.softmax(score, dim=1))
        return torch.bmm(w.unsqueeze(1), x).squeeze(1)


def _init_xavier(module: nn.Module) -> None:
    """VL-BERT's head init: xavier-uniform Linear weights, zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------------
# Base class: backbone handling, save / load
# ----------------------------------------------------------------------------------

_REGISTRY: dict[str, type["TaskHead"]] = {}
_BACKBONES: dict[str, type[PretrainedModel]] = {"uniter": Uniter, "vilbert": ViLBert, "vlbert": VLBert,
                                                "visualbert": VisualBert}


class TaskHead(nn.Module):
    """A backbone plus a task head.  Subclasses set ``backbone_class`` and build their
    head modules; ``self.head_config`` holds the JSON-able constructor arguments saved
    in task.json."""

    backbone_class: ClassVar[type[PretrainedModel]] = PretrainedModel
    task: ClassVar[str] = ""

    def __init_subclass__(cls, **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if cls.task:
            _REGISTRY[cls.__name__] = cls

    def __init__(self, backbone_or_config: Union[PretrainedModel, ModelConfig], *, padding_free: bool = False):
        super().__init__()
        bc = self.backbone_class
        if isinstance(backbone_or_config, bc):
            backbone = backbone_or_config
        elif isinstance(backbone_or_config, bc.config_class):
            backbone = bc(backbone_or_config)
        else:
            _fail(type(self).__name__, "backbone_or_config", f"a {bc.__name__} or a {bc.config_class.__name__}",
                  f"a {type(backbone_or_config).__name__}")
        self.backbone = backbone
        self.padding_free = bool(padding_free)
        self.head_config: dict[str, Any] = {"padding_free": self.padding_free}

    @property
    def config(self) -> ModelConfig:
        return self.backbone.config

    def _encode(self, batch: VLBatch, **extra: Any) -> Any:
        if self.padding_free:   # through model_inputs, so it passes the batch's packing metadata too
            extra["padding_free"] = True
        return self.backbone(**batch.model_inputs(self.backbone, **extra))

    def head_modules(self) -> list[nn.Module]:
        return [m for n, m in self.named_children() if n != "backbone"]

    # -- gradient checkpointing (the backbone's encoder layers) -------------------------

    def gradient_checkpointing_enable(self) -> None:
        """Checkpoint the backbone's encoder layers in training (heads are small)."""
        self.backbone.gradient_checkpointing_enable()

    def gradient_checkpointing_disable(self) -> None:
        self.backbone.gradient_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.backbone.is_gradient_checkpointing

    # -- checkpoints ------------------------------------------------------------------

    def _extra_files(self) -> dict[str, str]:
        return {}

    def head_state_dict(self) -> dict[str, Tensor]:
        """The head's weights (everything outside ``backbone.``)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("backbone.")}

    def save_pretrained(self, directory: PathLike) -> Path:
        """Write the backbone (config.json, model.safetensors), head.safetensors,
        task.json and any label map (answers.json), each atomically."""
        from safetensors.torch import save_file

        d = Path(directory)
        self.backbone.save_pretrained(d)
        sd = {k: v.detach().contiguous().cpu() for k, v in self.head_state_dict().items()}
        _atomic_write(d / HEAD_WEIGHTS_NAME, lambda p: save_file(sd, p, metadata={"format": "pt"}))
        for fname, text in self._extra_files().items():
            _atomic_write(d / fname, lambda p, text=text: Path(p).write_text(text))
        task = {"head_class": type(self).__name__, "task": self.task, "model_type": self.config.model_type,
                "head_config": self.head_config}
        text = json.dumps(task, indent=2, sort_keys=True)
        _atomic_write(d / TASK_NAME, lambda p: Path(p).write_text(text))
        return d

    @classmethod
    def _load_kwargs(cls, directory: Path) -> dict[str, Any]:
        return {}

    @classmethod
    def from_pretrained(cls, directory: PathLike, *, map_location: Union[str, torch.device] = "cpu"
                        ) -> "TaskHead":
        """Rebuild a head saved by :meth:`save_pretrained`.  On ``TaskHead`` the class
        comes from task.json; on a subclass it must match."""
        from safetensors.torch import load_file

        d = Path(directory)
        for name in (TASK_NAME, CONFIG_NAME, HEAD_WEIGHTS_NAME):
            if not (d / name).is_file():
                raise FileNotFoundError(f"{cls.__name__}.from_pretrained: no {name} in {d}")
        task = json.loads((d / TASK_NAME).read_text())
        name = task.get("head_class")
        if name not in _REGISTRY:
            _fail(f"{cls.__name__}.from_pretrained", f"{d / TASK_NAME}: head_class", f"one of {sorted(_REGISTRY)}",
                  repr(name))
        head_cls = _REGISTRY[name]
        if cls is not TaskHead and head_cls is not cls:
            _fail(f"{cls.__name__}.from_pretrained", f"{d / TASK_NAME}: head_class", repr(cls.__name__), repr(name))
        backbone = head_cls.backbone_class.from_pretrained(d, map_location=map_location)
        kwargs = dict(task.get("head_config", {}))
        kwargs.update(head_cls._load_kwargs(d))
        head = head_cls(backbone, **kwargs)
        sd = load_file(str(d / HEAD_WEIGHTS_NAME), device=str(map_location))
        own = head.head_state_dict()
        missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
        if missing or unexpected:
            _fail(f"{head_cls.__name__}.from_pretrained", f"{d / HEAD_WEIGHTS_NAME}",
                  f"the head's keys {sorted(own)}", f"missing {missing}, unexpected {unexpected}")
        head.load_state_dict(sd, strict=False)
        return head


def _vilbert_extra(head: TaskHead, batch: VLBatch) -> dict[str, Any]:
    """task_ids for a ViLBERT with task tokens (the multi-task model)."""
    if getattr(head.config, "task_specific_tokens", False):
        tid = head.head_config["task_id"]
        return {"task_ids": torch.full((batch.batch_size, 1), tid, dtype=torch.long,
                                       device=batch.input_ids.device)}
    return {}


# ----------------------------------------------------------------------------------
# VQA
# ----------------------------------------------------------------------------------

def load_answer_map(path: PathLike) -> list[str]:
    """Answers in label order from a JSON file: a list (answers.json) or a dict
    answer -> label (UNITER's ans2label.json)."""
    obj = json.loads(Path(path).read_text())
    if isinstance(obj, list) and all(isinstance(a, str) for a in obj):
        return list(obj)
    if isinstance(obj, dict) and all(isinstance(v, int) for v in obj.values()):
        labels = sorted(obj.values())
        if labels != list(range(len(obj))):
            _fail("load_answer_map", str(path), "labels 0..n-1, each once", f"labels {labels[:8]}...")
        out = [""] * len(obj)
        for a, i in obj.items():
            out[i] = a
        return out
    _fail("load_answer_map", str(path), "a JSON list of answers or a dict answer -> label",
          f"a JSON {type(obj).__name__}")


class _VQAHead(TaskHead):
    """Answer label map handling shared by the VQA heads."""

    task = ""

    def _setup_answers(self, num_answers: Optional[int], answers: Optional[Sequence[str]]) -> int:
        name = type(self).__name__
        if answers is not None:
            answers = list(answers)
            if not all(isinstance(a, str) for a in answers):
                _fail(name, "answers", "a sequence of strings", "non-string entries")
            if len(set(answers)) != len(answers):
                _fail(name, "answers", "distinct answers", f"{len(answers) - len(set(answers))} duplicates")
            if num_answers is not None and num_answers != len(answers):
                _fail(name, "num_answers", f"len(answers) = {len(answers)}", num_answers)
            num_answers = len(answers)
        if num_answers is None:
            num_answers = DEFAULT_NUM_ANSWERS
        if not isinstance(num_answers, int) or num_answers < 1:
            _fail(name, "num_answers", "a positive int", num_answers)
        self.answers: Optional[list[str]] = answers
        self.num_answers = num_answers
        self.head_config["num_answers"] = num_answers
        return num_answers

    def _extra_files(self) -> dict[str, str]:
        return {} if self.answers is None else {ANSWERS_NAME: json.dumps(self.answers, indent=0)}

    @classmethod
    def _load_kwargs(cls, directory: Path) -> dict[str, Any]:
        p = directory / ANSWERS_NAME
        return {"answers": load_answer_map(p)} if p.is_file() else {}

    def answer_strings(self, predictions: Tensor) -> list[str]:
        """Label indices (B,) -> answer strings, through the label map."""
        if self.answers is None:
            _fail(type(self).__name__, "answers", "a label map (pass answers=... to the head)", "None")
        return [self.answers[i] for i in predictions.tolist()]

    def _targets(self, batch: VLBatch) -> Optional[Tensor]:
        return _float_target(type(self).__name__, batch, "vqa_targets", (batch.batch_size, self.num_answers))

    def _output(self, logits: Tensor, targets: Optional[Tensor], loss: str = "bce") -> TaskOutput:
        lf = logits.float()
        value = None
        if targets is not None:
            if loss == "bce":
                value = F.binary_cross_entropy_with_logits(lf, targets) * targets.shape[1]
            else:
                logp = F.log_softmax(lf, dim=-1)
                kl = torch.where(targets > 0, targets * (torch.log(targets.clamp_min(1e-30)) - logp),
                                 torch.zeros_like(logp))
                value = kl.sum() / max(1, targets.shape[0])
        return TaskOutput(value, logits, logits.argmax(-1))


class UniterForVQA(_VQAHead):
    """UNITER VQA (``UniterForVisualQuestionAnswering``).  logits (B, A)."""

    backbone_class = Uniter
    task = "vqa"

    def __init__(self, backbone_or_config: Union[Uniter, UniterConfig], num_answers: Optional[int] = None,
                 answers: Optional[Sequence[str]] = None, *, padding_free: bool = False):
        super().__init__(backbone_or_config, padding_free=padding_free)
        A = self._setup_answers(num_answers, answers)
        E = self.config.hidden_size
        self.vqa_output = nn.Sequential(nn.Linear(E, 2 * E), nn.GELU(), nn.LayerNorm(2 * E, eps=1e-12),
                                        nn.Linear(2 * E, A))
        init_bert_weights(self.vqa_output, self.config.initializer_range)

    def forward(self, batch: VLBatch) -> TaskOutput:
        batch = _check_batch(type(self).__name__, batch)
        targets = self._targets(batch)
        pooled = self._encode(batch).pooler_output
        return self._output(self.vqa_output(pooled), targets)


class ViLBertForVQA(_VQAHead):
    """ViLBERT VQA (``vil_prediction`` of ``VILBertForVLTasks``).  logits (B, A)."""

    backbone_class = ViLBert
    task = "vqa"

    def __init__(self, backbone_or_config: Union[ViLBert, ViLBertConfig], num_answers: Optional[int] = None,
                 answers: Optional[Sequence[str]] = None, *, dropout_prob: float = 0.1,
                 task_id: int = VILBERT_TASK_IDS["vqa"], padding_free: bool = False):
        super().__init__(backbone_or_config, padding_free=padding_free)
        A = self._setup_answers(num_answers, answers)
        Eb = self.config.bi_hidden_size
        self.head_config.update(dropout_prob=dropout_prob, task_id=task_id)
        self.dropout = nn.Dropout(dropout_prob)
        self.vil_prediction = SimpleClassifier(Eb, 2 * Eb, A)
        init_bert_weights(self.vil_prediction, self.config.initializer_range)

    def forward(self, batch: VLBatch) -> TaskOutput:
        batch = _check_batch(type(self).__name__, batch)
        targets = self._targets(batch)
        pooled = self._encode(batch, **_vilbert_extra(self, batch)).pooler_output
        return self._output(self.vil_prediction(self.dropout(pooled)), targets)


class VisualBertForVQA(_VQAHead):
    """VisualBERT VQA (``training_head_type == "vqa"`` / HF ``VisualBertForQuestionAnswering``):
    the state at real text length - 2, dropout, Linear(E, A).  loss "kl" (official) or
    "bce".  logits (B, A) (raw, before log_softmax)."""

    backbone_class = VisualBert
    task = "vqa"

    def __init__(self, backbone_or_config: Union[VisualBert, VisualBertConfig], num_answers: Optional[int] = None,
                 answers: Optional[Sequence[str]] = None, *, loss: str = "kl", padding_free: bool = False):
        super().__init__(backbone_or_config, padding_free=padding_free)
        if loss not in ("kl", "bce"):
            _fail(type(self).__name__, "loss", "'kl' or 'bce'", repr(loss))
        A = self._setup_answers(num_answers, answers)
        self.loss_type = loss
        self.head_config["loss"] = loss
        self.dropout = nn.Dropout(self.config.hidden_dropout_prob)
        self.cls = nn.Linear(self.config.hidden_size, A)
        init_bert_weights(self.cls, self.config.initializer_range)

    def forward(self, batch: VLBatch) -> TaskOutput:
        name = type(self).__name__
        batch = _check_batch(name, batch)
        targets = self._targets(batch)
        idx = _answer_index(name, batch)
        seq = self._encode(batch).last_hidden_state
        h = seq[torch.arange(batch.batch_size, device=seq.device), idx.to(seq.device)]
        return self._output(self.cls(self.dropout(h)), targets, self.loss_type)


class VLBertForVQA(_VQAHead):
    """VL-BERT VQA (``ResNetVLBERT`` of vqa/modules): the answer [MASK] token's state
    (real text length - 2) through ``final_mlp``.  classifier "mlm" (the released config:
    dense-GELU-LayerNorm, dropout, Linear), "2fc" (dropout, Linear(E, hidden), ReLU,
    dropout, Linear) or "1fc" (dropout, Linear).  logits (B, A)."""

    backbone_class = VLBert
    task = "vqa"

    def __init__(self, backbone_or_config: Union[VLBert, VLBertConfig], num_answers: Optional[int] = None,
                 answers: Optional[Sequence[str]] = None, *, classifier: str = "mlm",
                 classifier_hidden_size: int = 2048, classifier_dropout: float = 0.1, padding_free: bool = False):
        super().__init__(backbone_or_config, padding_free=padding_free)
        A = self._setup_answers(num_answers, answers)
        E, c = self.config.hidden_size, self.config
        self.head_config.update(classifier=classifier, classifier_hidden_size=classifier_hidden_size,
                                classifier_dropout=classifier_dropout)
        if classifier == "mlm":
            self.final_mlp = nn.Sequential(PredictionHeadTransform(E, c.layer_norm_eps),
                                           nn.Dropout(classifier_dropout), nn.Linear(E, A))
        elif classifier == "2fc":
            self.final_mlp = nn.Sequential(nn.Dropout(classifier_dropout), nn.Linear(E, classifier_hidden_size),
                                           nn.ReLU(), nn.Dropout(classifier_dropout),
                                           nn.Linear(classifier_hidden_size, A))
        elif classifier == "1fc":
            self.final_mlp = nn.Sequential(nn.Dropout(classifier_dropout), nn.Linear(E, A))
        else:
            _fail(type(self).__name__, "classifier", "'mlm', '2fc' or '1fc'", repr(classifier))
        _init_xavier(self.final_mlp)

    def forward(self, batch: VLBatch) -> TaskOutput:
        name = type(self).__name__
        batch = _check_batch(name, batch)
        targets = self._targets(batch)
        idx = _answer_index(name, batch)
        seq = self._encode(batch).last_hidden_state
        h = seq[torch.arange(batch.batch_size, device=seq.device), idx.to(seq.device)]
        return self._output(self.final_mlp(h), targets)


# ----------------------------------------------------------------------------------
# NLVR2
# ----------------------------------------------------------------------------------

def extend_token_types(model: Uniter, n: int, copy_from: dict[int, int]) -> None:
    """UNITER's ``init_type_embedding``: a token-type table of ``n`` rows whose existing
    rows are kept and new row r copies row ``copy_from[r]``; config.type_vocab_size
    follows.  No-op when the table already has ``n`` rows or more."""
    emb = model.embeddings.token_type_embeddings
    if emb.num_embeddings >= n:
        return
    new = nn.Embedding(n, emb.embedding_dim).to(emb.weight.device, emb.weight.dtype)
    nn.init.normal_(new.weight, std=model.config.initializer_range)
    with torch.no_grad():
        new.weight[: emb.num_embeddings] = emb.weight
        for r in range(emb.num_embeddings, n):
            new.weight[r] = emb.weight[copy_from[r]]
    model.embeddings.token_type_embeddings = new
    model.config = model.config.replace(type_vocab_size=n)


def _img_index(name: str, batch: VLBatch) -> Tensor:
    B, Lv = batch.visual_mask.shape
    t = batch.targets.get("img_index")
    if t is None:
        _fail(name, "targets['img_index']", f"a ({B}, {Lv}) long tensor: the image (0/1) of each region "
              "(both images of a sample share one row)", "None")
    if not isinstance(t, Tensor) or tuple(t.shape) != (B, Lv) or t.dtype.is_floating_point or t.dtype == torch.bool:
        _fail(name, "targets['img_index']", f"a ({B}, {Lv}) integer tensor", _desc(t))
    real = t[batch.visual_mask]
    if real.numel() and (int(real.min()) < 0 or int(real.max()) > 1):
        _fail(name, "targets['img_index']", "0 or 1 at real regions", f"values {sorted(set(real.tolist()))[:6]}")
    return t.long().clamp(0, 1)


class UniterForNLVR2(TaskHead):
    """UNITER NLVR2: mode "paired" (``UniterForNlvr2Paired``), "triplet"
    (``UniterForNlvr2Triplet``) or "paired-attn" (``UniterForNlvr2PairedAttn``).
    logits (N, 2)."""

    backbone_class = Uniter
    task = "nlvr2"

    def __init__(self, backbone_or_config: Union[Uniter, UniterConfig], mode: str = "paired", *,
                 padding_free: bool = False):
        super().__init__(backbone_or_config, padding_free=padding_free)
        if mode not in ("paired", "triplet", "paired-attn"):
            _fail(type(self).__name__, "mode", "'paired', 'triplet' or 'paired-attn'", repr(mode))
        self.mode = mode
        self.head_config["mode"] = mode
        extend_token_types(self.backbone, 3, {2: 1})
        c = self.config
        E = c.hidden_size
        if mode == "triplet":
            self.nlvr2_output = nn.Linear(E, 2)
        elif mode == "paired":
            self.nlvr2_output = nn.Linear(2 * E, 2)
        else:
            self.attn1 = nn.MultiheadAttention(E, c.num_attention_heads, dropout=c.attention_probs_dropout_prob,
                                               batch_first=True)
            self.attn2 = nn.MultiheadAttention(E, c.num_attention_heads, dropout=c.attention_probs_dropout_prob,
                                               batch_first=True)
            self.fc = nn.Sequential(nn.Linear(2 * E, E), nn.ReLU(), nn.Dropout(c.hidden_dropout_prob))
            self.attn_pool = AttentionPool(E, c.attention_probs_dropout_prob)
            self.nlvr2_output = nn.Linear(2 * E, 2)
        for m in self.head_modules():
            init_bert_weights(m, c.initializer_range)

    def forward(self, batch: VLBatch) -> TaskOutput:
        name = type(self).__name__
        batch = _check_batch(name, batch)
        B, Lv = batch.visual_mask.shape
        dev = batch.input_ids.device
        if self.mode == "triplet":
            labels = _labels(name, batch, "nlvr2_labels", B, 2)
            types = 1 + _img_index(name, batch)
            logits = self.nlvr2_output(self._encode(batch, visual_token_type_ids=types).pooler_output)
        else:
            labels = _labels(name, batch, "nlvr2_labels", None, 2)
            groups = group_rows(name, B, batch.targets.get("pair_index"), per_group=2,
                                num_groups=None if labels is None else labels.shape[0], device=dev)
            types = (1 + groups.position)[:, None].expand(B, Lv)
            out = self._encode(batch, visual_token_type_ids=types)
            if self.mode == "paired":
                pooled = groups.gather(out.pooler_output)                 # (N, 2, E)
                logits = self.nlvr2_output(pooled.flatten(1))
            else:
                seq = out.last_hidden_state
                pad = ~torch.cat([batch.attention_mask.bool(), batch.visual_mask.bool()], 1).to(seq.device)
                li, ri = groups.index[:, 0], groups.index[:, 1]
                left, right, lpad, rpad = seq[li], seq[ri], pad[li], pad[ri]
                l2r, _ = self.attn1(left, right, right, key_padding_mask=rpad, need_weights=False)
                r2l, _ = self.attn2(right, left, left, key_padding_mask=lpad, need_weights=False)
                left = self.attn_pool(self.fc(torch.cat([l2r, left], -1)), lpad)
                right = self.attn_pool(self.fc(torch.cat([r2l, right], -1)), rpad)
                logits = self.nlvr2_output(torch.cat([left, right], -1))
        loss = None if labels is None else F.cross_entropy(logits.float(), labels.to(logits.device))
        return TaskOutput(loss, logits, logits.argmax(-1))


class ViLBertForNLVR2(TaskHead):
    """ViLBERT NLVR2 (``vil_binary_prediction``): paired rows, the two fused pooled vectors
    concatenated; BCE-with-logits against the one-hot label.  logits (N, 2)."""

    backbone_class = ViLBert
    task = "nlvr2"

    def __init__(self, backbone_or_config: Union[ViLBert, ViLBertConfig], *, dropout_prob: float = 0.1,
                 task_id: int = VILBERT_TASK_IDS["nlvr2"], padding_free: bool = False):
        super().__init__(backbone_or_config, padding_free=padding_free)
        Eb = self.config.bi_hidden_size
        self.head_config.update(dropout_prob=dropout_prob, task_id=task_id)
        self.dropout = nn.Dropout(dropout_prob)
        self.vil_binary_prediction = SimpleClassifier(2 * Eb, 2 * Eb, 2)
        init_bert_weights(self.vil_binary_prediction, self.config.initializer_range)

    def forward(self, batch: VLBatch) -> TaskOutput:
        name = type(self).__name__
        batch = _check_batch(name, batch)
        labels = _labels(name, batch, "nlvr2_labels", None, 2)
        groups = group_rows(name, batch.batch_size, batch.targets.get("pair_index"), per_group=2,
                            num_groups=None if labels is None else labels.shape[0], device=batch.input_ids.device)
        pooled = self.dropout(self._encode(batch, **_vilbert_extra(self, batch)).pooler_output)
        logits = self.vil_binary_prediction(groups.gather(pooled).flatten(1))
        loss = None
        if labels is not None:
            loss = F.binary_cross_entropy_with_logits(logits.float(), F.one_hot(labels.to(logits.device), 2).float())
        return TaskOutput(loss, logits, logits.argmax(-1))


class VisualBertForNLVR2(TaskHead):
    """VisualBERT NLVR2 (``training_head_type == "nlvr"`` / HF
    ``VisualBertForVisualReasoning``): one row per sample holding both images' regions,
    visual token type = ``img_index`` (0 left, 1 right: the original's); dropout,
    Linear(E, 2), cross-entropy.  logits (B, 2)."""

    backbone_class = VisualBert
    task = "nlvr2"

    def __init__(self, backbone_or_config: Union[VisualBert, VisualBertConfig], *, padding_free: bool = False):
        super().__init__(backbone_or_config, padding_free=padding_free)
        self.dropout = nn.Dropout(self.config.hidden_dropout_prob)
        self.cls = nn.Linear(self.config.hidden_size, 2)
        init_bert_weights(self.cls, self.config.initializer_range)

    def forward(self, batch: VLBatch) -> TaskOutput:
        name = type(self).__name__
        batch = _check_batch(name, batch)
        labels = _labels(name, batch, "nlvr2_labels", batch.batch_size, 2)
        pooled = self._encode(batch, visual_token_type_ids=_img_index(name, batch)).pooler_output
        logits = self.cls(self.dropout(pooled))
        loss = None if labels is None else F.cross_entropy(logits.float(), labels.to(logits.device))
        return TaskOutput(loss, logits, logits.argmax(-1))


# ----------------------------------------------------------------------------------
# Multiple choice (VCR-style)
# ----------------------------------------------------------------------------------

class _ChoiceHead(TaskHead):
    """Rows are (question, choice) pairs; scores per row -> (N, K) per sample."""

    task = ""

    def _groups(self, batch: VLBatch) -> tuple[Groups, Optional[Tensor]]:
        name = type(self).__name__
        labels = _labels(name, batch, "mc_labels")
        groups = group_rows(name, batch.batch_size, batch.targets.get("pair_index"),
                            num_groups=None if labels is None else labels.shape[0], device=batch.input_ids.device)
        if labels is not None:
            counts = groups.valid.sum(1)
            if bool((labels.to(counts.device) >= counts).any()):
                _fail(name, "targets['mc_labels']", "choice indices below each sample's number of rows",
                      f"labels {labels.tolist()[:8]} for {counts.tolist()[:8]} rows")
        return groups, labels

    def _choice_output(self, row_scores: Tensor, groups: Groups, labels: Optional[Tensor]) -> TaskOutput:
        """row_scores (B',) -> logits (N, K) (-inf at missing choices), CE loss."""
        logits = groups.gather(row_scores, float("-inf"))
        loss = None if labels is None else F.cross_entropy(logits.float(), labels.to(logits.device))
        return TaskOutput(loss, logits, logits.argmax(-1))


class UniterForVCR(_ChoiceHead):
    """UNITER VCR (``UniterForVisualCommonsenseReasoning``): ``vcr_output`` per row, 2-way
    cross-entropy on "this row is the answer" averaged over rows; logits (N, K) = the
    class-1 logits.  The token-type table grows to 4 rows (rows 2/3, the answer and
    rationale text types, copy row 0) and the vocabulary by ``num_special_tokens`` rows
    (``init_type_embedding`` / ``init_word_embedding``)."""

    backbone_class = Uniter
    task = "vcr"

    def __init__(self, backbone_or_config: Union[Uniter, UniterConfig], *, num_special_tokens: int = 0,
                 padding_free: bool = False):
        super().__init__(backbone_or_config, padding_free=padding_free)
        extend_token_types(self.backbone, 4, {2: 0, 3: 0})
        if num_special_tokens:
            self._extend_words(num_special_tokens)
        self.head_config["num_special_tokens"] = 0  # already in the saved backbone config
        E = self.config.hidden_size
        self.vcr_output = nn.Sequential(nn.Linear(E, 2 * E), nn.ReLU(), nn.LayerNorm(2 * E, eps=1e-12),
                                        nn.Linear(2 * E, 2))
        init_bert_weights(self.vcr_output, self.config.initializer_range)

    def _extend_words(self, n: int) -> None:
        m = self.backbone
        emb = m.embeddings.word_embeddings
        new = nn.Embedding(emb.num_embeddings + n, emb.embedding_dim, padding_idx=emb.padding_idx)
        new = new.to(emb.weight.device, emb.weight.dtype)
        nn.init.normal_(new.weight, std=m.config.initializer_range)
        with torch.no_grad():
            new.weight[: emb.num_embeddings] = emb.weight
        m.embeddings.word_embeddings = new
        m.config = m.config.replace(vocab_size=emb.num_embeddings + n)

    def forward(self, batch: VLBatch) -> TaskOutput:
        batch = _check_batch(type(self).__name__, batch)
        groups, labels = self._groups(batch)
        rows = self.vcr_output(self._encode(batch).pooler_output)        # (B', 2)
        out = self._choice_output(rows[:, 1], groups, None)
        if labels is not None:
            row_target = (groups.position == labels.to(groups.position.device)[_row_group(groups)]).long()
            out.loss = F.cross_entropy(rows.float(), row_target.to(rows.device))
        return out


def _row_group(groups: Groups) -> Tensor:
    """(B',) the group of each row."""
    g = torch.empty(int(groups.valid.sum()), dtype=torch.long, device=groups.index.device)
    gi = torch.arange(groups.num_groups, device=g.device)[:, None].expand_as(groups.index)
    g[groups.index[groups.valid]] = gi[groups.valid]
    return g


class ViLBertForVCR(_ChoiceHead):
    """ViLBERT VCR / multiple choice (``vil_logit``, task type "VL-logit"): Linear(Eb, 1) on
    dropout(fused pooled) per row; cross-entropy over each sample's choices.  logits (N, K)."""

    backbone_class = ViLBert
    task = "vcr"

    def __init__(self, backbone_or_config: Union[ViLBert, ViLBertConfig], *, dropout_prob: float = 0.1,
                 task_id: int = VILBERT_TASK_IDS["vcr_q_a"], padding_free: bool = False):
        super().__init__(backbone_or_config, padding_free=padding_free)
        self.head_config.update(dropout_prob=dropout_prob, task_id=task_id)
        self.dropout = nn.Dropout(dropout_prob)
        self.vil_logit = nn.Linear(self.config.bi_hidden_size, 1)
        init_bert_weights(self.vil_logit, self.config.initializer_range)

    def forward(self, batch: VLBatch) -> TaskOutput:
        batch = _check_batch(type(self).__name__, batch)
        groups, labels = self._groups(batch)
        pooled = self._encode(batch, **_vilbert_extra(self, batch)).pooler_output
        return self._choice_output(self.vil_logit(self.dropout(pooled)).squeeze(-1), groups, labels)


class VisualBertForMultipleChoice(_ChoiceHead):
    """VisualBERT multiple choice (``training_head_type == "multichoice"`` / HF
    ``VisualBertForMultipleChoice``): dropout, Linear(E, 1) per row, cross-entropy over
    the choices.  logits (N, K)."""

    backbone_class = VisualBert
    task = "vcr"

    def __init__(self, backbone_or_config: Union[VisualBert, VisualBertConfig], *, padding_free: bool = False):
        super().__init__(backbone_or_config, padding_free=padding_free)
        self.dropout = nn.Dropout(self.config.hidden_dropout_prob)
        self.cls = nn.Linear(self.config.hidden_size, 1)
        init_bert_weights(self.cls, self.config.initializer_range)

    def forward(self, batch: VLBatch) -> TaskOutput:
        batch = _check_batch(type(self).__name__, batch)
        groups, labels = self._groups(batch)
        pooled = self._encode(batch).pooler_output
        return self._choice_output(self.cls(self.dropout(pooled)).squeeze(-1), groups, labels)


class VLBertForVCR(_ChoiceHead):
    """VL-BERT VCR (vcr/modules ``ResNetVLBERT``): ``final_mlp`` on the pooled output per
    row; classifier "1fc" (dropout, Linear(E, 1); the released configs) or "2fc";
    loss "sigmoid" (``CLASSIFIER_SIGMOID``: BCE-with-logits against the one-hot
    choice, positive weight ``positive_weight``, times (w+1)/(2w), mean over the real
    (sample, choice) entries) or "ce".  logits (N, K).  (The optional object-class
    regulariser of the official model is not part of this head.)"""

    backbone_class = VLBert
    task = "vcr"

    def __init__(self, backbone_or_config: Union[VLBert, VLBertConfig], *, classifier: str = "1fc",
                 classifier_hidden_size: int = 1024, classifier_dropout: float = 0.1, loss: str = "sigmoid",
                 positive_weight: float = 1.0, padding_free: bool = False):
        super().__init__(backbone_or_config, padding_free=padding_free)
        name, E = type(self).__name__, self.config.hidden_size
        if loss not in ("sigmoid", "ce"):
            _fail(name, "loss", "'sigmoid' or 'ce'", repr(loss))
        if positive_weight <= 0:
            _fail(name, "positive_weight", "a positive float", positive_weight)
        self.loss_type, self.positive_weight = loss, float(positive_weight)
        self.head_config.update(classifier=classifier, classifier_hidden_size=classifier_hidden_size,
                                classifier_dropout=classifier_dropout, loss=loss, positive_weight=positive_weight)
        if classifier == "1fc":
            self.final_mlp = nn.Sequential(nn.Dropout(classifier_dropout), nn.Linear(E, 1))
        elif classifier == "2fc":
            self.final_mlp = nn.Sequential(nn.Dropout(classifier_dropout), nn.Linear(E, classifier_hidden_size),
                                           nn.ReLU(), nn.Dropout(classifier_dropout),
                                           nn.Linear(classifier_hidden_size, 1))
        else:
            _fail(name, "classifier", "'1fc' or '2fc'", repr(classifier))
        _init_xavier(self.final_mlp)

    def forward(self, batch: VLBatch) -> TaskOutput:
        batch = _check_batch(type(self).__name__, batch)
        groups, labels = self._groups(batch)
        rows = self.final_mlp(self._encode(batch).pooler_output).squeeze(-1)
        if self.loss_type == "ce":
            return self._choice_output(rows, groups, labels)
        out = self._choice_output(rows, groups, None)
        if labels is not None:
            lg = groups.gather(rows).float()
            K = lg.shape[1]
            target = F.one_hot(labels.to(lg.device), K).float()
            w = self.positive_weight
            weight = torch.where(target > 0, torch.full_like(target, w), torch.ones_like(target))
            weight = weight * groups.valid.to(lg.device)
            bce = F.binary_cross_entropy_with_logits(lg, target, weight=weight, reduction="sum")
            out.loss = (w + 1.0) / (2.0 * w) * bce / groups.valid.sum()
        return out


# ----------------------------------------------------------------------------------
# Region scoring (RefCOCO-style) and phrase grounding
# ----------------------------------------------------------------------------------

class RegionScoringHead(TaskHead):
    """Scores each visual slot; predictions (B,) = the best real region."""

    task = ""

    def predicted_boxes(self, batch: VLBatch, predictions: Tensor, *, pixels: bool = False) -> Tensor:
        """The boxes of the predicted regions: (B, 4) [x1, y1, x2, y2], normalised (or in
        pixels with ``pixels=True``, through ``batch.image_size``)."""
        b = batch.boxes[torch.arange(batch.batch_size, device=batch.boxes.device), predictions.to(batch.boxes.device)]
        if pixels:
            b = b * torch.cat([batch.image_size, batch.image_size], -1).to(b.dtype)
        return b

    def _region_output(self, logits: Tensor, vmask: Tensor) -> tuple[Tensor, Tensor]:
        return logits, logits.masked_fill(~vmask, float("-inf")).argmax(-1)


class UniterForRefCOCO(RegionScoringHead):
    """UNITER referring expressions (``UniterForReferringExpressionComprehension``):
    ``re_output`` on the region states (mlp=1: Linear(E,1); mlp=2, the released
    config: Linear GELU LayerNorm Linear), padding -1e4.  loss "cls" or "rank".
    logits (B, Lv)."""

    backbone_class = Uniter
    task = "refcoco"

    def __init__(self, backbone_or_config: Union[Uniter, UniterConfig], *, loss: str = "cls", mlp: int = 2,
                 margin: float = 0.2, hard_ratio: float = 0.3, padding_free: bool = False):
        super().__init__(backbone_or_config, padding_free=padding_free)
        name, E = type(self).__name__, self.config.hidden_size
        if loss not in ("cls", "rank"):
            _fail(name, "loss", "'cls' or 'rank'", repr(loss))
        if not 0.0 <= hard_ratio <= 1.0:
            _fail(name, "hard_ratio", "a probability in [0, 1]", hard_ratio)
        self.loss_type, self.margin, self.hard_ratio = loss, float(margin), float(hard_ratio)
        self.head_config.update(loss=loss, mlp=mlp, margin=margin, hard_ratio=hard_ratio)
        if mlp == 1:
            self.re_output = ScoreLinear(E, 1)
        elif mlp == 2:
            self.re_output = nn.Sequential(nn.Linear(E, E), nn.GELU(), nn.LayerNorm(E, eps=1e-12), ScoreLinear(E, 1))
        else:
            _fail(name, "mlp", "1 or 2", mlp)
        init_bert_weights(self.re_output, self.config.initializer_range)

    def forward(self, batch: VLBatch) -> TaskOutput:
        name = type(self).__name__
        batch = _check_batch(name, batch)
        B, Lv = batch.visual_mask.shape
        target = _labels(name, batch, "ref_targets", B, Lv)
        seq = self._encode(batch).last_hidden_state
        vmask = batch.visual_mask.bool().to(seq.device)
        scores = self.re_output(seq[:, seq.shape[1] - Lv:]).squeeze(-1).masked_fill(~vmask, -1e4)
        logits, pred = self._region_output(scores, vmask)
        loss = None
        if target is not None:
            target = target.to(scores.device)
            sf = scores.float()
            if self.loss_type == "cls":
                loss = F.cross_entropy(sf, target)
            else:
                loss = self._rank_loss(name, sf, target, vmask)
        return TaskOutput(loss, logits, pred)

    def _rank_loss(self, name: str, scores: Tensor, target: Tensor, vmask: Tensor) -> Tensor:
        B, Lv = scores.shape
        if bool((vmask.sum(1) < 2).any()):
            _fail(name, "batch.visual_mask", "at least 2 real regions per row for the ranking loss",
                  f"rows with {vmask.sum(1).min().item()}")
        is_t = F.one_hot(target, Lv).bool()
        with torch.no_grad():
            hard = scores.masked_fill(is_t | ~vmask, float("-inf")).argmax(1)
            rnd = torch.rand(B, Lv, device=scores.device).masked_fill(is_t | ~vmask, -1.0).argmax(1)
            use_hard = torch.rand(B, device=scores.device) < self.hard_ratio
            neg = torch.where(use_hard, hard, rnd)
        pos_sc = torch.sigmoid(scores.gather(1, target[:, None]).squeeze(1))
        neg_sc = torch.sigmoid(scores.gather(1, neg[:, None]).squeeze(1))
        return torch.clamp(self.margin + neg_sc - pos_sc, min=0).mean()


class ViLBertForRefCOCO(RegionScoringHead):
    """ViLBERT referring expressions ("V-logit": ``vision_logit`` Linear(Ev, 1) on
    dropout(region states), padding -10000); BCE-with-logits against per-region targets
    (``ref_region_targets``, or the one-hot of ``ref_targets``) summed over regions and
    averaged over samples.  logits (B, Lv)."""

    backbone_class = ViLBert
    task = "refcoco"
    default_task_id: ClassVar[int] = VILBERT_TASK_IDS["refcoco+"]

    def __init__(self, backbone_or_config: Union[ViLBert, ViLBertConfig], *, dropout_prob: float = 0.1,
                 task_id: Optional[int] = None, padding_free: bool = False):
        super().__init__(backbone_or_config, padding_free=padding_free)
        task_id = self.default_task_id if task_id is None else task_id
        self.head_config.update(dropout_prob=dropout_prob, task_id=task_id)
        self.dropout = nn.Dropout(dropout_prob)
        self.vision_logit = ScoreLinear(self.config.v_hidden_size, 1)
        init_bert_weights(self.vision_logit, self.config.initializer_range)

    def forward(self, batch: VLBatch) -> TaskOutput:
        name = type(self).__name__
        batch = _check_batch(name, batch)
        target = _one_hot_region_targets(name, batch)
        seq_v = self._encode(batch, **_vilbert_extra(self, batch)).seq_v
        vmask = batch.visual_mask.bool().to(seq_v.device)
        logits = self.vision_logit(self.dropout(seq_v)).squeeze(-1) + (~vmask).to(seq_v.dtype) * -10000.0
        logits, pred = self._region_output(logits, vmask)
        loss = None
        if target is not None:
            bce = F.binary_cross_entropy_with_logits(logits.float(), target.to(logits.device), reduction="none")
            loss = (bce * vmask).sum() / max(1, batch.batch_size)
        return TaskOutput(loss, logits, pred)


class ViLBertForPhraseGrounding(ViLBertForRefCOCO):
    """ViLBERT phrase grounding (FlickrGrounding, task 18): the text is one phrase; the
    same region scoring and loss as :class:`ViLBertForRefCOCO`.  logits (B, Lv)."""

    task = "phrase_grounding"
    default_task_id = VILBERT_TASK_IDS["flickr_grounding"]


class VLBertForRefCOCO(RegionScoringHead):
    """VL-BERT referring expressions (refcoco/modules ``ResNetVLBERT``): ``final_mlp`` =
    dense + GELU, dropout (0.0 in the released configs), Linear(E, 1) on the region
    states; BCE-with-logits against per-region labels (``ref_region_targets``, or the
    one-hot of ``ref_targets``) averaged over the real regions of the batch; padding
    scored -10000.  logits (B, Lv)."""

    backbone_class = VLBert
    task = "refcoco"

    def __init__(self, backbone_or_config: Union[VLBert, VLBertConfig], *, classifier_dropout: float = 0.0,
                 padding_free: bool = False):
        super().__init__(backbone_or_config, padding_free=padding_free)
        E = self.config.hidden_size
        self.head_config["classifier_dropout"] = classifier_dropout
        self.final_mlp = nn.Sequential(DenseGelu(E), nn.Dropout(classifier_dropout), ScoreLinear(E, 1))
        _init_xavier(self.final_mlp)

    def forward(self, batch: VLBatch) -> TaskOutput:
        name = type(self).__name__
        batch = _check_batch(name, batch)
        target = _one_hot_region_targets(name, batch)
        Lv = batch.visual_mask.shape[1]
        seq = self._encode(batch).last_hidden_state
        vmask = batch.visual_mask.bool().to(seq.device)
        logits = self.final_mlp(seq[:, seq.shape[1] - Lv:]).squeeze(-1).masked_fill(~vmask, -10000.0)
        logits, pred = self._region_output(logits, vmask)
        loss = None
        if target is not None:
            loss = F.binary_cross_entropy_with_logits(logits.float()[vmask], target.to(logits.device)[vmask])
        return TaskOutput(loss, logits, pred)


class RegionToPhraseAttention(nn.Module):
    """VisualBERT's region-to-phrase attention: one head of size E / num_attention_heads;
    scores (B,P,Lv) = query(phrases) . key(regions) / sqrt(d), padding regions masked."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.head_size = hidden // heads
        self.query = nn.Linear(hidden, self.head_size)
        self.key = nn.Linear(hidden, self.head_size)

    def forward(self, phrases: Tensor, regions: Tensor, vmask: Tensor) -> Tensor:
        s = torch.matmul(self.query(phrases), self.key(regions).transpose(-1, -2)).float() / math.sqrt(self.head_size)
        return s.masked_fill(~vmask[:, None, :], torch.finfo(torch.float32).min)


class VisualBertForPhraseGrounding(TaskHead):
    """VisualBERT phrase grounding (``VisualBertForRegionToPhraseAlignment``; the original
    "flickr" head).  Targets ``phrase_positions`` (B,P) and ``phrase_targets`` (B,P,Lv);
    loss ``KLDiv(log_softmax(scores), phrase_targets, batchmean)``.  logits (B, P, Lv)
    fp32; predictions (B, P) the best region per phrase, -1 at padded phrases.  (The
    original module also holds unused pretraining heads and an unused ``value``
    projection; they are left out.)"""

    backbone_class = VisualBert
    task = "phrase_grounding"

    def __init__(self, backbone_or_config: Union[VisualBert, VisualBertConfig], *, padding_free: bool = False):
        super().__init__(backbone_or_config, padding_free=padding_free)
        self.attention = RegionToPhraseAttention(self.config.hidden_size, self.config.num_attention_heads)
        init_bert_weights(self.attention, self.config.initializer_range)

    def forward(self, batch: VLBatch) -> TaskOutput:
        name = type(self).__name__
        batch = _check_batch(name, batch)
        B, Lt = batch.input_ids.shape
        Lv = batch.visual_mask.shape[1]
        pos = batch.targets.get("phrase_positions")
        if not isinstance(pos, Tensor) or pos.dim() != 2 or pos.shape[0] != B or pos.dtype.is_floating_point \
                or pos.dtype == torch.bool:
            _fail(name, "targets['phrase_positions']", f"a (B={B}, P) integer tensor of text positions "
                  "(-1 = padding)", _desc(pos) if pos is not None else "None")
        if pos.numel() and (int(pos.min()) < -1 or int(pos.max()) >= Lt):
            _fail(name, "targets['phrase_positions']", f"-1 or positions in [0, {Lt})",
                  f"values in [{int(pos.min())}, {int(pos.max())}]")
        P = pos.shape[1]
        target = _float_target(name, batch, "phrase_targets", (B, P, Lv))
        seq = self._encode(batch).last_hidden_state
        real = pos >= 0
        idx = pos.clamp_min(0).to(seq.device)
        phrases = seq.gather(1, idx[..., None].expand(B, P, seq.shape[-1]))
        vmask = batch.visual_mask.bool().to(seq.device)
        scores = self.attention(phrases, seq[:, Lt:], vmask)
        pred = scores.argmax(-1).masked_fill(~real.to(seq.device), -1)
        loss = None
        if target is not None:
            t = target.to(scores.device)
            logp = F.log_softmax(scores, -1)
            kl = torch.where(t > 0, t * (torch.log(t.clamp_min(1e-30)) - logp), torch.zeros_like(logp))
            loss = kl.sum() / max(1, B)
        return TaskOutput(loss, scores, pred)


# ----------------------------------------------------------------------------------
# Image-text retrieval
# ----------------------------------------------------------------------------------

def select_rows(batch: VLBatch, rows: Tensor) -> VLBatch:
    """A batch of the given rows (B'',): every per-row tensor (inputs, targets whose
    first dim is the row count, meta lists of that length) is indexed."""
    n = batch.batch_size
    rows = rows.to(batch.input_ids.device)

    def pick(x: Any) -> Any:
        if isinstance(x, Tensor) and x.dim() and x.shape[0] == n:
            return x.index_select(0, rows.to(x.device))
        if isinstance(x, (list, tuple)) and len(x) == n:
            return type(x)(x[i] for i in rows.tolist())
        return x

    fields = {f.name: pick(getattr(batch, f.name)) for f in dataclasses.fields(batch)
              if f.name not in ("targets", "meta")}
    return VLBatch(**fields, targets={k: pick(v) for k, v in batch.targets.items()},
                   meta={k: pick(v) for k, v in batch.meta.items()})


class RetrievalHead(TaskHead, abc.ABC):
    """Image-text matching scores per row.  logits (B',); with groups (``pair_index``
    or ``itm_labels``) predictions (N,) = the best row's position in each group, else
    (B',) 1 where the score is positive."""

    task = ""

    @abc.abstractmethod
    def row_scores(self, batch: VLBatch) -> Tensor:
        """(B',) one matching score per row."""

    def _retrieval_groups(self, batch: VLBatch) -> tuple[Optional[Groups], Optional[Tensor]]:
        name = type(self).__name__
        labels = _labels(name, batch, "itm_labels", batch.batch_size, 2)
        pi = batch.targets.get("pair_index")
        if labels is None and pi is None:
            return None, None
        if pi is None:
            _fail(name, "targets['pair_index']", "a (B',) tensor grouping each positive with its negatives", "None")
        groups = group_rows(name, batch.batch_size, pi, device=batch.input_ids.device)
        pos = None
        if labels is not None:
            gl = groups.gather(labels.to(groups.index.device)) * groups.valid
            n_pos = gl.sum(1)
            if bool((n_pos != 1).any()):
                _fail(name, "targets['itm_labels']", "exactly one positive (1) per group",
                      f"{n_pos.tolist()[:8]} positives")
            pos = gl.argmax(1)
        return groups, pos

    def forward(self, batch: VLBatch) -> TaskOutput:
        batch = _check_batch(type(self).__name__, batch)
        groups, pos = self._retrieval_groups(batch)
        scores = self.row_scores(batch)
        if groups is None:
            return TaskOutput(None, scores, (scores > 0).long())
        grouped = groups.gather(scores, float("-inf"))
        loss = None if pos is None else self._loss(grouped, groups.valid, pos.to(grouped.device))
        return TaskOutput(loss, scores, grouped.argmax(-1))

    @abc.abstractmethod
    def _loss(self, grouped: Tensor, valid: Tensor, pos: Tensor) -> Tensor:
        """grouped (N, K) scores (-inf at missing rows), valid (N, K), pos (N,) -> scalar."""

    @torch.no_grad()
    def mine_hard_negatives(self, batch: VLBatch, num_hard: int) -> VLBatch:
        """Hard negatives: score every row in eval mode without gradient and keep, per
        group, the positive and the ``num_hard`` highest-scoring negatives (UNITER's
        ``_get_hard_batch``; groups with fewer negatives keep all).  Needs
        ``pair_index`` and ``itm_labels``; returns the sub-batch (positives first in each
        group), whose ``pair_index`` is renumbered 0..N-1."""
        name = type(self).__name__
        if num_hard < 1:
            _fail(name, "num_hard", "a positive int", num_hard)
        batch = _check_batch(name, batch)
        groups, pos = self._retrieval_groups(batch)
        if groups is None or pos is None:
            _fail(name, "batch.targets", "'pair_index' and 'itm_labels'", sorted(batch.targets))
        was_training = self.training
        self.eval()
        try:
            scores = self.row_scores(batch).float()
        finally:
            self.train(was_training)
        grouped = groups.gather(scores, float("-inf"))
        N, K = grouped.shape
        is_pos = F.one_hot(pos.to(grouped.device), K).bool()
        neg = grouped.masked_fill(is_pos, float("-inf"))
        k = min(num_hard, K - 1)
        top = neg.topk(k, dim=1).indices if k > 0 else neg.new_zeros((N, 0), dtype=torch.long)
        keep_pos = torch.cat([pos.to(top.device)[:, None], top], 1)                        # (N, 1+k)
        ok = torch.gather(groups.valid.to(top.device), 1, keep_pos)
        ok[:, 1:] &= ~torch.isinf(torch.gather(neg, 1, top))
        rows = torch.gather(groups.index.to(top.device), 1, keep_pos)[ok]
        sub = select_rows(batch, rows)
        sub.targets["pair_index"] = torch.arange(N, device=rows.device)[:, None].expand(N, 1 + k)[ok] \
            .to(batch.targets["pair_index"].device)
        return sub


class UniterForRetrieval(RetrievalHead):
    """UNITER image-text retrieval (``UniterForImageTextRetrieval``): ``rank_output``
    Linear(E, 1) on the pooled output; loss = mean over (group, negative) of
    clamp(margin + sigmoid(s_neg) - sigmoid(s_pos), 0).  Hard negatives: see
    :meth:`RetrievalHead.mine_hard_negatives`.  :meth:`init_from_itm_head` is
    ``init_output`` (the pretrained ITM head's "match" row)."""

    backbone_class = Uniter
    task = "retrieval"

    def __init__(self, backbone_or_config: Union[Uniter, UniterConfig], *, margin: float = 0.2,
                 padding_free: bool = False):
        super().__init__(backbone_or_config, padding_free=padding_free)
        self.margin = float(margin)
        self.head_config["margin"] = margin
        self.rank_output = ScoreLinear(self.config.hidden_size, 1)
        init_bert_weights(self.rank_output, self.config.initializer_range)

    @torch.no_grad()
    def init_from_itm_head(self, weight: Tensor, bias: Tensor) -> None:
        """rank_output <- row 1 ("match") of a pretrained 2-way ITM head: weight (2, E), bias (2,)."""
        E = self.config.hidden_size
        if tuple(weight.shape) != (2, E) or tuple(bias.shape) != (2,):
            _fail(type(self).__name__, "weight/bias", f"shapes (2, {E}) and (2,)",
                  f"{tuple(weight.shape)} and {tuple(bias.shape)}")
        self.rank_output.weight.copy_(weight[1:])
        self.rank_output.bias.copy_(bias[1:])

    def row_scores(self, batch: VLBatch) -> Tensor:
        return self.rank_output(self._encode(batch).pooler_output).squeeze(-1)

    def _loss(self, grouped: Tensor, valid: Tensor, pos: Tensor) -> Tensor:
        s = torch.sigmoid(grouped.float())
        ps = s.gather(1, pos[:, None])
        is_neg = valid.to(s.device) & ~F.one_hot(pos, s.shape[1]).bool()
        if not bool(is_neg.any()):
            _fail(type(self).__name__, "targets['pair_index']", "groups holding negatives", "positives only")
        hinge = torch.clamp(self.margin + s - ps, min=0)
        return hinge[is_neg].mean()


class ViLBertForRetrieval(RetrievalHead):
    """ViLBERT image-text retrieval ("VL-logit": ``vil_logit`` Linear(Eb, 1) on
    dropout(fused pooled)); cross-entropy over each group's rows with the positive as
    the target."""

    backbone_class = ViLBert
    task = "retrieval"

    def __init__(self, backbone_or_config: Union[ViLBert, ViLBertConfig], *, dropout_prob: float = 0.1,
                 task_id: int = VILBERT_TASK_IDS["retrieval_flickr30k"], padding_free: bool = False):
        super().__init__(backbone_or_config, padding_free=padding_free)
        self.head_config.update(dropout_prob=dropout_prob, task_id=task_id)
        self.dropout = nn.Dropout(dropout_prob)
        self.vil_logit = ScoreLinear(self.config.bi_hidden_size, 1)
        init_bert_weights(self.vil_logit, self.config.initializer_range)

    def row_scores(self, batch: VLBatch) -> Tensor:
        pooled = self._encode(batch, **_vilbert_extra(self, batch)).pooler_output
        return self.vil_logit(self.dropout(pooled)).squeeze(-1)

    def _loss(self, grouped: Tensor, valid: Tensor, pos: Tensor) -> Tensor:
        return F.cross_entropy(grouped.float(), pos)


HEADS: dict[str, dict[str, type[TaskHead]]] = {
    "vqa": {"uniter": UniterForVQA, "vilbert": ViLBertForVQA, "vlbert": VLBertForVQA,
            "visualbert": VisualBertForVQA},
    "nlvr2": {"uniter": UniterForNLVR2, "vilbert": ViLBertForNLVR2, "visualbert": VisualBertForNLVR2},
    "vcr": {"uniter": UniterForVCR, "vilbert": ViLBertForVCR, "vlbert": VLBertForVCR,
            "visualbert": VisualBertForMultipleChoice},
    "refcoco": {"uniter": UniterForRefCOCO, "vilbert": ViLBertForRefCOCO, "vlbert": VLBertForRefCOCO},
    "retrieval": {"uniter": UniterForRetrieval, "vilbert": ViLBertForRetrieval},
    "phrase_grounding": {"vilbert": ViLBertForPhraseGrounding, "visualbert": VisualBertForPhraseGrounding},
}
"""task -> model_type -> head class: the support table of the module docstring."""


def head_for(task: str, backbone_or_config: Union[PretrainedModel, ModelConfig], **kwargs: Any) -> TaskHead:
    """The head class for ``task`` ("vqa", "nlvr2", "vcr", "refcoco", "retrieval",
    "phrase_grounding") and the backbone's model type, built with ``kwargs``."""
    if task not in HEADS:
        _fail("head_for", "task", f"one of {sorted(HEADS)}", repr(task))
    cfg = backbone_or_config.config if isinstance(backbone_or_config, nn.Module) else backbone_or_config
    mt = getattr(cfg, "model_type", None)
    if mt not in HEADS[task]:
        _fail("head_for", "backbone_or_config", f"a model whose official code supports {task!r} "
              f"({', '.join(sorted(HEADS[task]))})", f"model_type {mt!r}")
    return HEADS[task][mt](backbone_or_config, **kwargs)


__all__ = ["TaskOutput", "TaskHead", "Groups", "group_rows", "select_rows", "load_answer_map", "extend_token_types",
           "SimpleClassifier", "ScoreLinear", "AttentionPool", "RegionToPhraseAttention", "UniterForVQA", "ViLBertForVQA",
           "VisualBertForVQA", "VLBertForVQA", "UniterForNLVR2", "ViLBertForNLVR2", "VisualBertForNLVR2",
           "UniterForVCR", "ViLBertForVCR", "VisualBertForMultipleChoice", "VLBertForVCR", "RegionScoringHead",
           "UniterForRefCOCO", "ViLBertForRefCOCO", "ViLBertForPhraseGrounding", "VLBertForRefCOCO",
           "VisualBertForPhraseGrounding", "RetrievalHead", "UniterForRetrieval", "ViLBertForRetrieval", "HEADS",
           "head_for", "VILBERT_TASK_IDS", "HEAD_WEIGHTS_NAME", "TASK_NAME", "ANSWERS_NAME"]
