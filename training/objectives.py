"""Pretraining objectives of the four models, with heads that compute logits only
where a loss needs them.

Every objective is an ``nn.Module`` holding its head parameters, called as
``objective(model, batch, out) -> ObjectiveResult`` where ``model`` is the backbone
(``Uniter``, ``VisualBert``, ``ViLBert`` or ``VLBert``), ``batch`` a
:class:`~vlfast.data.batch.VLBatch` and ``out`` the backbone's output for that batch
(the pretraining wrapper runs the backbone once per batch; several objectives may read
the same ``out``).  Hidden states are read from ``out``: single-stream models return
``last_hidden_state`` (B, Lt+Lv, E) with the text slots first, then the visual slots;
ViLBERT returns ``seq_t`` (B, Lt, E) and ``seq_v`` (B, Lv, Ev).

Targets are ``batch.targets`` under the shared names of ``vlfast.data.batch``
(``mlm_labels``, ``img_masks``, ``masked_feats``, ``masked_soft_labels``,
``itm_labels``); Nm masked items are taken in ``mask.nonzero()`` (row-major) order.

The objectives (name in brackets), their losses and the official names of their head
parameters (so official heads can be loaded; see :meth:`Objective.official_keys`):

* MaskedLanguageModeling ("mlm"): cross-entropy at the masked words only, mean over
  Nm; head dense + GELU + LayerNorm, decoder tied to the backbone's word embeddings,
  own bias.  ``cls.predictions.*`` (VL-BERT: ``vlbert.mlm_head.predictions.*``).
* ImageTextMatching ("itm"): UNITER's 2-way cross-entropy on the pooled output, mean
  over B.  ``itm_output`` (VL-BERT: ``vlbert.relationsip_head.caption_image_relationship``).
* SentenceImagePrediction ("sip"): VisualBERT's (HF) 2-way head on the pooled output.
  ``cls.seq_relationship``.
* AlignmentPrediction ("alignment"): ViLBERT's 2-way head on dropout(pooled_t *
  pooled_v) (the config's fusion; dropout 0.1 as officially).  ``cls.bi_seq_relationship``.
* WordRegionAlignment ("wra"): UNITER's OT term, ``lambda * (sum d(pos) - sum d(neg)) /
  (n_pos + n_neg)`` with d = ``vlfast.ops.wra_distance`` over the real words and regions,
  lambda 0.1.  No parameters.
* MaskedRegionFeatureRegression ("mrfr"): MSE between the regression of the masked
  regions' states and their original features, mean over Nm x F.  ``feat_regress.*``
  (weight tied to the backbone's region projection, UNITER's ``img_linear``).
* MaskedRegionClassification ("mrc"): cross-entropy to the argmax of the detector's soft
  labels, background class 0 skipped (UNITER), mean over Nm.  ``region_classifier.*``.
* MaskedRegionClassificationKL ("mrc-kl"): KL(soft labels || softmax(logits)); UNITER
  averages over the Nm x C elements (``reduction="elements"``, the default),
  ``"regions"`` averages the per-region KL over Nm.  ``region_classifier.*`` (shared
  with MRC, as officially).
* MaskedMultimodalModeling ("masked_multimodal"): ViLBERT's KL summed over classes and
  masked regions, divided by Nm.  ``cls.imagePredictions.*``.
* MaskedRoIClassification ("masked_roi"): VL-BERT's soft cross-entropy
  ``-sum_c t_c log softmax(z)_c`` against the detector's class distribution, mean over
  Nm (head dense + GELU, no LayerNorm).  ``vlbert.mvrc_head.*``.

Loss normalisation follows each official training script, so official
hyper-parameters transfer.

A batch with no masked item gives a zero loss that is still connected to the head (so
gradients exist and are zero).

Fused ops: the masked-word and masked-region classification losses run through
``vlfast.ops.linear_cross_entropy`` (MLM, MRC) or ``linear_soft_cross_entropy`` (MRC-kl
and ViLBERT's masked multimodal with ``kl=True``, VL-BERT's masked RoI), which go from
the head's hidden states to the loss in chunks of rows and never hold the (Nm, vocab)
logits on GPU; the accuracy metrics use the op's argmax by-product.  The head
transforms (dense -> GELU -> LayerNorm) run their LayerNorm on ``ops.layer_norm``.  On
CPU (the ops' reference path) every loss, metric and gradient is bitwise the
plain-torch formula.  The 2-way pair heads keep ``F.cross_entropy``.
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlfast import ops
from vlfast.data.batch import VLBatch
from vlfast.models.layers import init_bert_weights

MODEL_TYPES = ("uniter", "visualbert", "vilbert", "vlbert")
IGNORE_INDEX = -100


# ----------------------------------------------------------------------------------
# Result and helpers
# ----------------------------------------------------------------------------------

@dataclass
class ObjectiveResult:
    """loss: scalar tensor (already weighted, e.g. WRA's lambda); metrics: floats for
    logging (``loss``, ``acc``, ...); count: the number of loss units (masked words,
    masked regions or pairs) the loss averages over."""
    loss: Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    count: int = 0


def _fail(where: str, arg: str, expected: str, got: object) -> None:
    raise ValueError(f"{where}: {arg}: expected {expected}, got {got}")


def model_type(model: nn.Module) -> str:
    """The backbone's ``config.model_type`` (one of :data:`MODEL_TYPES`)."""
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt not in MODEL_TYPES:
        _fail("objectives", "model", f"one of the four backbones ({', '.join(MODEL_TYPES)})",
              f"{type(model).__name__} with model_type {mt!r}")
    return mt


def _shape(t: Any) -> object:
    return f"shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__


def get_target(batch: VLBatch, key: str, where: str, doc: str) -> Tensor:
    """``batch.targets[key]``, or an error naming the key and what was expected."""
    t = batch.targets.get(key)
    if t is None:
        _fail(where, f"batch.targets[{key!r}]", doc, f"no such target (targets: {sorted(batch.targets)})")
    if not isinstance(t, Tensor):
        _fail(where, f"batch.targets[{key!r}]", doc, type(t).__name__)
    return t


def text_states(model: nn.Module, batch: VLBatch, out: Any) -> Tensor:
    """(B, Lt, E): the text slots of ``out``."""
    B, Lt = batch.input_ids.shape
    h = out.seq_t if model_type(model) == "vilbert" else out.last_hidden_state[:, :Lt]
    if h.shape[:2] != (B, Lt):
        _fail("objectives", "out", f"text states of shape (B={B}, Lt={Lt}, E)", f"shape {tuple(h.shape)}")
    return h


def visual_states(model: nn.Module, batch: VLBatch, out: Any) -> Tensor:
    """(B, Lv, Ev): the visual slots of ``out``."""
    B, Lt = batch.input_ids.shape
    Lv = batch.visual_feats.shape[1]
    h = out.seq_v if model_type(model) == "vilbert" else out.last_hidden_state[:, Lt:Lt + Lv]
    if h.shape[:2] != (B, Lv):
        _fail("objectives", "out", f"visual states of shape (B={B}, Lv={Lv}, Ev)", f"shape {tuple(h.shape)}")
    return h


def word_embeddings(model: nn.Module) -> nn.Embedding:
    """The backbone's word embedding table (the tied MLM decoder)."""
    return model.word_embeddings if model_type(model) == "vlbert" else model.embeddings.word_embeddings


def region_projection(model: nn.Module) -> Optional[Tensor]:
    """The backbone's linear map of region features to its visual width, weight
    (Ev, F), that MRFR's regression ties to (UNITER: ``img_embeddings.img_linear``);
    None for VL-BERT (its projection also takes the box geometry)."""
    mt = model_type(model)
    if mt == "uniter":
        return model.img_embeddings.img_linear.weight
    if mt == "visualbert":
        return model.embeddings.visual_projection.weight
    if mt == "vilbert":
        return model.v_embeddings.image_embeddings.weight
    return None


def text_width(config: Any) -> int:
    return int(config.hidden_size)


def visual_width(config: Any) -> int:
    return int(config.v_hidden_size if config.model_type == "vilbert" else config.hidden_size)


def pooled_width(config: Any) -> int:
    return int(config.bi_hidden_size if config.model_type == "vilbert" else config.hidden_size)


_FEATURE_FIELD = {"uniter": "img_dim", "visualbert": "visual_embedding_dim", "vilbert": "v_feature_size",
                  "vlbert": "visual_feat_dim"}


def feature_dim(config: Any) -> int:
    """The region feature width F of a config."""
    return int(getattr(config, _FEATURE_FIELD[config.model_type]))


def _metrics(**values: Tensor | float) -> dict[str, float]:
    """Detached scalars -> floats in one host sync."""
    keys = list(values)
    tens = [v.detach().float().reshape(()) if isinstance(v, Tensor) else torch.tensor(float(v))
            for v in values.values()]
    if not tens:
        return {}
    dev = next((t.device for t in tens if t.device.type != "cpu"), torch.device("cpu"))
    return dict(zip(keys, torch.stack([t.to(dev) for t in tens]).tolist()))


def _zero_loss(*outputs: Tensor) -> Tensor:
    """A zero that is connected to ``outputs`` (empty head outputs): backward works and
    leaves zero gradients, so every rank runs the same graph."""
    return sum((o.float().sum() * 0.0 for o in outputs), torch.zeros((), device=outputs[0].device))


def _masked_rows(h: Tensor, mask: Tensor, where: str, mask_name: str) -> Tensor:
    """h (B, L, E), mask (B, L) bool -> (Nm, E) rows in nonzero order."""
    if mask.dtype != torch.bool:
        _fail(where, mask_name, "a bool tensor", str(mask.dtype).replace("torch.", ""))
    if mask.shape != h.shape[:2]:
        _fail(where, mask_name, f"shape {tuple(h.shape[:2])}", f"shape {tuple(mask.shape)}")
    return h[mask]


def _img_masks(batch: VLBatch, where: str) -> Tensor:
    B, Lv = batch.visual_mask.shape
    m = get_target(batch, "img_masks", where, f"a (B={B}, Lv={Lv}) bool tensor of masked regions")
    if m.dtype != torch.bool or tuple(m.shape) != (B, Lv):
        _fail(where, "batch.targets['img_masks']", f"a (B={B}, Lv={Lv}) bool tensor",
              f"{str(m.dtype).replace('torch.', '')} {_shape(m)}")
    return m


def _masked_target(batch: VLBatch, key: str, n: int, width: int, where: str, what: str) -> Tensor:
    t = get_target(batch, key, where, f"a (Nm={n}, {width}) float tensor of {what}")
    if t.dim() != 2 or t.shape[0] != n or t.shape[1] != width or not t.dtype.is_floating_point:
        _fail(where, f"batch.targets[{key!r}]",
              f"a float tensor of shape (Nm={n}, {width}) (one row per masked region of img_masks)",
              f"{str(t.dtype).replace('torch.', '')} {_shape(t)}")
    return t


# ----------------------------------------------------------------------------------
# Fused pieces of the heads
# ----------------------------------------------------------------------------------

def head_transform(dense: nn.Linear, ln: nn.LayerNorm, h: Tensor) -> Tensor:
    """BERT's head transform ``ln(gelu(dense(h)))`` with the LayerNorm on ``ops.layer_norm``
    (the module's parameters and eps): (N, E) -> (N, E).  The dense layer stays a module
    call (its bias rides in the GEMM; hooks on it keep working), so ``ops.bias_gelu``,
    which needs the bias split off the matmul, is not used here: these heads run on the
    masked rows only, a few percent of the encoder's rows."""
    return ops.layer_norm(F.gelu(dense(h)), ln.weight, ln.bias, eps=ln.eps)


def _decode_hard(x: Tensor, decoder_weight: Tensor, decoder_bias: Optional[Tensor], target: Tensor
                 ) -> tuple[Tensor, Tensor]:
    """(mean cross-entropy, argmax (N,)) of ``F.linear(x, W, b)`` against class ids,
    without the (N, C) logits (``ops.linear_cross_entropy``)."""
    return ops.linear_cross_entropy(x, decoder_weight, decoder_bias, target, return_argmax=True)


def _decode_soft(x: Tensor, decoder_weight: Tensor, decoder_bias: Optional[Tensor], soft: Tensor, *,
                 reduction: str, kl: bool) -> tuple[Tensor, Tensor]:
    """(loss, argmax (N,)) of ``F.linear(x, W, b)`` against a class distribution: the
    soft cross-entropy or (``kl``) the KL divergence, ``ops.linear_soft_cross_entropy``."""
    return ops.linear_soft_cross_entropy(x, decoder_weight, decoder_bias, soft, reduction=reduction, kl=kl,
                                         return_argmax=True)


# ----------------------------------------------------------------------------------
# Base class and heads
# ----------------------------------------------------------------------------------

class Objective(nn.Module, abc.ABC):
    """A pretraining objective: ``objective(model, batch, out) -> ObjectiveResult``.

    ``official`` lists (local prefix, official prefix) pairs: a local parameter key
    ``local + rest`` is ``official + rest`` in the official checkpoints."""

    name: ClassVar[str] = ""
    official: tuple[tuple[str, str], ...] = ()
    #: official keys of tensors tied to the backbone (not ours to load)
    official_tied: tuple[str, ...] = ()

    @abc.abstractmethod
    def forward(self, model: nn.Module, batch: VLBatch, out: Any) -> ObjectiveResult:
        ...

    def official_keys(self) -> dict[str, str]:
        """Local state_dict key -> the official checkpoint's key (heads tied to the
        backbone, like the MLM decoder, are not listed: they live in the backbone)."""
        keys: dict[str, str] = {}
        for k in self.state_dict():
            for local, official in self.official:
                if k.startswith(local):
                    keys[k] = official + k[len(local):]
                    break
        return keys


class PredictionHeadTransform(nn.Module):
    """BERT's head transform: dense -> GELU -> LayerNorm (names ``dense``, ``LayerNorm``)."""

    def __init__(self, hidden: int, eps: float = 1e-12):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, h: Tensor) -> Tensor:
        return head_transform(self.dense, self.LayerNorm, h)


class RegionFeatureRegressionHead(nn.Module):
    """UNITER's ``RegionFeatureRegression``: ``net`` = Linear, GELU, LayerNorm, then a
    linear map to the feature width whose weight is the backbone's region projection
    (Ev, F) used transposed, plus an own ``bias`` (F,).  With ``tied=False`` the head
    holds its own ``weight`` (Ev, F) (VL-BERT, whose projection also sees the boxes)."""

    def __init__(self, hidden: int, feat_dim: int, eps: float = 1e-12, tied: bool = True):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=eps))
        self.bias = nn.Parameter(torch.zeros(feat_dim))
        self.weight: Optional[nn.Parameter] = None if tied else nn.Parameter(torch.empty(hidden, feat_dim))

    def forward(self, h: Tensor, tied_weight: Optional[Tensor]) -> Tensor:
        """h (N, Ev), tied_weight (Ev, F) (ignored when the head holds its own) -> (N, F)."""
        w = self.weight if self.weight is not None else tied_weight
        if w is None:
            _fail("RegionFeatureRegressionHead", "tied_weight", "the backbone's (Ev, F) region projection",
                  "None (build the head with tied=False for a backbone without one)")
        return F.linear(head_transform(self.net[0], self.net[2], h), w.t(), self.bias)


class RegionClassificationHead(nn.Module):
    """UNITER's ``RegionClassification``: ``net`` = Linear, GELU, LayerNorm, Linear(C)."""

    def __init__(self, hidden: int, num_classes: int, eps: float = 1e-12):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.LayerNorm(hidden, eps=eps),
                                 nn.Linear(hidden, num_classes))

    @property
    def decoder(self) -> nn.Linear:
        """The last Linear(Ev, C)."""
        return self.net[3]

    def features(self, h: Tensor) -> Tensor:
        """h (N, Ev) -> the decoder's input (N, Ev): Linear, GELU, LayerNorm."""
        return head_transform(self.net[0], self.net[2], h)

    def forward(self, h: Tensor) -> Tensor:
        """h (N, Ev) -> logits (N, C)."""
        return self.decoder(self.features(h))


class ImagePredictionHead(nn.Module):
    """ViLBERT's ``BertImagePredictionHead``: ``transform`` (dense, GELU, LayerNorm on
    the vision width) then ``decoder`` Linear(Ev, C)."""

    def __init__(self, hidden: int, num_classes: int, eps: float = 1e-12):
        super().__init__()
        self.transform = PredictionHeadTransform(hidden, eps)
        self.decoder = nn.Linear(hidden, num_classes)

    def features(self, h: Tensor) -> Tensor:
        """h (N, Ev) -> the decoder's input (N, Ev)."""
        return self.transform(h)

    def forward(self, h: Tensor) -> Tensor:
        return self.decoder(self.features(h))


class _DenseGelu(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)

    def forward(self, h: Tensor) -> Tensor:
        return F.gelu(self.dense(h))


class MVRCHead(nn.Module):
    """VL-BERT's ``VisualLinguisticBertMVRCHead``: ``transform.dense`` + GELU (no
    LayerNorm), then ``region_cls_pred`` Linear(E, C)."""

    def __init__(self, hidden: int, num_classes: int):
        super().__init__()
        self.transform = _DenseGelu(hidden)
        self.region_cls_pred = nn.Linear(hidden, num_classes)

    @property
    def decoder(self) -> nn.Linear:
        return self.region_cls_pred

    def features(self, h: Tensor) -> Tensor:
        """h (N, E) -> the decoder's input (N, E): dense + GELU."""
        return self.transform(h)

    def forward(self, h: Tensor) -> Tensor:
        return self.region_cls_pred(self.features(h))


# ----------------------------------------------------------------------------------
# Text
# ----------------------------------------------------------------------------------

class MaskedLanguageModeling(Objective):
    """MLM at the masked words only (``mlm_labels != -100``): logits (Nm, vocab) =
    LayerNorm(GELU(dense(h))) @ word_embeddings.T + bias; cross-entropy, mean over Nm.

    Parameters: ``transform.dense``, ``transform.LayerNorm``, ``bias`` (official
    ``cls.predictions.*``; VL-BERT ``vlbert.mlm_head.predictions.*``); the decoder weight is the
    backbone's word embedding table, read at call time."""

    name = "mlm"

    def __init__(self, hidden_size: int, vocab_size: int, layer_norm_eps: float = 1e-12,
                 initializer_range: float = 0.02, official_prefix: str = "cls.predictions."):
        super().__init__()
        self.transform = PredictionHeadTransform(hidden_size, layer_norm_eps)
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        self.official = (("", official_prefix),)
        self.official_tied = (official_prefix + "decoder.weight", official_prefix + "decoder.bias")
        init_bert_weights(self, initializer_range)

    def decoder_weight(self, model: nn.Module) -> Tensor:
        """The tied decoder: the backbone's word embedding table (vocab, E)."""
        w = word_embeddings(model).weight
        if w.shape[0] != self.bias.shape[0]:
            _fail("MaskedLanguageModeling", "model", f"a word embedding table of {self.bias.shape[0]} rows "
                  "(the head's vocab_size)", f"{w.shape[0]} rows")
        return w

    def logits(self, model: nn.Module, h: Tensor) -> Tensor:
        """h (N, E) -> (N, vocab).  (The loss never builds these; see :meth:`forward`.)"""
        return F.linear(self.transform(h), self.decoder_weight(model), self.bias)

    def forward(self, model: nn.Module, batch: VLBatch, out: Any) -> ObjectiveResult:
        where = "MaskedLanguageModeling"
        B, Lt = batch.input_ids.shape
        labels = get_target(batch, "mlm_labels", where, f"a (B={B}, Lt={Lt}) long tensor (-100 = not masked)")
        if tuple(labels.shape) != (B, Lt) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            _fail(where, "batch.targets['mlm_labels']", f"a (B={B}, Lt={Lt}) integer tensor",
                  f"{str(labels.dtype).replace('torch.', '')} {_shape(labels)}")
        sel = labels != IGNORE_INDEX
        h = _masked_rows(text_states(model, batch, out), sel, where, "mlm_labels != -100")
        x, w = self.transform(h), self.decoder_weight(model)
        target = labels[sel]
        n = int(target.numel())
        if n == 0:
            return ObjectiveResult(_zero_loss(F.linear(x, w, self.bias)), {"loss": 0.0}, 0)
        loss, pred = _decode_hard(x, w, self.bias, target.long())
        acc = (pred == target).float().mean()
        return ObjectiveResult(loss, _metrics(loss=loss, acc=acc), n)


# ----------------------------------------------------------------------------------
# Pairs
# ----------------------------------------------------------------------------------

class PairClassification(Objective):
    """2-way cross-entropy on a pooled vector against ``itm_labels`` (1 = match), mean
    over B.  ``classifier`` = Linear(pooled width, 2); ``dropout`` before it."""

    name = "pair"

    def __init__(self, pooled_size: int, official_name: str, dropout: float = 0.0,
                 initializer_range: float = 0.02, fused: bool = False):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(pooled_size, 2)
        self.fused = fused
        self.official = (("classifier.", official_name + "."),)
        init_bert_weights(self, initializer_range)

    def pooled(self, model: nn.Module, out: Any) -> Tensor:
        """(B, pooled width): the pooled output (ViLBERT: the fused pair)."""
        if self.fused:
            if model_type(model) != "vilbert":
                _fail(type(self).__name__, "model", "a ViLBert (the fused pooled_t, pooled_v pair)",
                      type(model).__name__)
            return model.fused_pooled(out)
        return out.pooler_output

    def forward(self, model: nn.Module, batch: VLBatch, out: Any) -> ObjectiveResult:
        where = type(self).__name__
        B = batch.batch_size
        labels = get_target(batch, "itm_labels", where, f"a (B={B},) long tensor (1 = matching pair)")
        if tuple(labels.shape) != (B,) or labels.dtype.is_floating_point:
            _fail(where, "batch.targets['itm_labels']", f"a (B={B},) integer tensor",
                  f"{str(labels.dtype).replace('torch.', '')} {_shape(labels)}")
        logits = self.classifier(self.dropout(self.pooled(model, out))).float()
        loss = F.cross_entropy(logits, labels.long())
        acc = (logits.argmax(-1) == labels).float().mean()
        return ObjectiveResult(loss, _metrics(loss=loss, acc=acc), B)


class ImageTextMatching(PairClassification):
    """UNITER's ITM: ``itm_output`` on the pooled output (VL-BERT: its caption-image
    relationship head, ``vlbert.relationsip_head.caption_image_relationship``)."""

    name = "itm"

    def __init__(self, pooled_size: int, initializer_range: float = 0.02, official_name: str = "itm_output"):
        super().__init__(pooled_size, official_name, 0.0, initializer_range)


class SentenceImagePrediction(PairClassification):
    """VisualBERT's sentence-image prediction (HF ``VisualBertForPreTraining``):
    ``cls.seq_relationship`` on the pooled output, no dropout."""

    name = "sip"

    def __init__(self, pooled_size: int, initializer_range: float = 0.02):
        super().__init__(pooled_size, "cls.seq_relationship", 0.0, initializer_range)


class AlignmentPrediction(PairClassification):
    """ViLBERT's alignment prediction: ``cls.bi_seq_relationship`` on
    dropout(pooled_t * pooled_v) (the config's fusion; the official heads' dropout 0.1)."""

    name = "alignment"

    def __init__(self, pooled_size: int, dropout: float = 0.1, initializer_range: float = 0.02):
        super().__init__(pooled_size, "cls.bi_seq_relationship", dropout, initializer_range, fused=True)


class WordRegionAlignment(Objective):
    """UNITER's WRA (optimal transport) term of the ITM task.

    d = ``vlfast.ops.wra_distance`` (B,) between the text states (all real words,
    [CLS]/[SEP] included) and the region states (all real regions), in fp32; the loss
    is ``lam * (sum d[itm_labels == 1] - sum d[itm_labels == 0]) / B`` (UNITER's
    ``(ot_pos.sum() - ot_neg.sum()) / (n_pos + n_neg)`` times ``itm_ot_lambda``).
    Metrics: ``ot`` (the unweighted term), ``ot_pos`` / ``ot_neg`` (mean distances,
    when there are such pairs).  Single-stream models only (the text and visual
    states must share a width)."""

    name = "wra"

    def __init__(self, lam: float = 0.1, beta: float = 0.5, n_iters: int = 50, k: int = 1):
        super().__init__()
        if not (isinstance(lam, (int, float)) and math.isfinite(lam)):
            _fail("WordRegionAlignment", "lam", "a finite number", lam)
        self.lam, self.beta, self.n_iters, self.k = float(lam), beta, n_iters, k

    def distances(self, model: nn.Module, batch: VLBatch, out: Any) -> Tensor:
        """(B,) fp32 WRA distances of the batch's pairs."""
        if model_type(model) == "vilbert":
            _fail("WordRegionAlignment", "model", "a single-stream backbone (UNITER, VisualBERT, VL-BERT)",
                  "ViLBert (its text and visual states have different widths)")
        t, v = text_states(model, batch, out), visual_states(model, batch, out)
        return ops.wra_distance(t, v, batch.attention_mask.bool(), batch.visual_mask.bool(), beta=self.beta,
                                n_iters=self.n_iters, k=self.k)

    def forward(self, model: nn.Module, batch: VLBatch, out: Any) -> ObjectiveResult:
        where = "WordRegionAlignment"
        B = batch.batch_size
        labels = get_target(batch, "itm_labels", where, f"a (B={B},) long tensor (1 = matching pair)")
        if tuple(labels.shape) != (B,) or labels.dtype.is_floating_point:
            _fail(where, "batch.targets['itm_labels']", f"a (B={B},) integer tensor",
                  f"{str(labels.dtype).replace('torch.', '')} {_shape(labels)}")
        d = self.distances(model, batch, out)
        pos, neg = labels == 1, labels == 0
        sign = pos.float() - neg.float()
        n = pos.sum() + neg.sum()
        ot = (d * sign).sum() / n.clamp(min=1)
        m: dict[str, Tensor | float] = {"loss": self.lam * ot, "ot": ot}
        if bool(pos.any()):
            m["ot_pos"] = d[pos].mean()
        if bool(neg.any()):
            m["ot_neg"] = d[neg].mean()
        return ObjectiveResult(self.lam * ot, _metrics(**m), B)


# ----------------------------------------------------------------------------------
# Regions
# ----------------------------------------------------------------------------------

class MaskedRegionFeatureRegression(Objective):
    """UNITER's MRFR: regress the masked regions' original features
    (``masked_feats`` (Nm, F)) from their states; MSE, mean over Nm x F.  The weight is
    tied to the backbone's region projection (``region_projection``)."""

    name = "mrfr"

    def __init__(self, hidden_size: int, feat_dim: int, layer_norm_eps: float = 1e-12,
                 initializer_range: float = 0.02, tied: bool = True):
        super().__init__()
        self.head = RegionFeatureRegressionHead(hidden_size, feat_dim, layer_norm_eps, tied)
        self.official = (("head.", "feat_regress."),)
        self.official_tied = ("feat_regress.weight",) if tied else ()
        init_bert_weights(self, initializer_range)
        if self.head.weight is not None:
            nn.init.normal_(self.head.weight, std=initializer_range)

    def forward(self, model: nn.Module, batch: VLBatch, out: Any) -> ObjectiveResult:
        where = "MaskedRegionFeatureRegression"
        m = _img_masks(batch, where)
        h = _masked_rows(visual_states(model, batch, out), m, where, "batch.targets['img_masks']")
        tied = None if self.head.weight is not None else region_projection(model)
        pred = self.head(h, tied).float()
        target = _masked_target(batch, "masked_feats", h.shape[0], pred.shape[1], where,
                                "original features of the masked regions")
        n = h.shape[0]
        if n == 0:
            return ObjectiveResult(_zero_loss(pred), {"loss": 0.0}, 0)
        loss = F.mse_loss(pred, target.float())
        return ObjectiveResult(loss, _metrics(loss=loss), n)


def _soft_labels(batch: VLBatch, n: int, num_classes: int, where: str) -> Tensor:
    return _masked_target(batch, "masked_soft_labels", n, num_classes, where,
                          "detector class distributions of the masked regions")


class MaskedRegionClassification(Objective):
    """UNITER's MRC: cross-entropy to the argmax of the masked regions' soft labels,
    mean over Nm.  ``skip_background`` (UNITER): the argmax is taken over classes 1..C-1
    (class 0 is the detector's background and never a target)."""

    name = "mrc"

    def __init__(self, hidden_size: int, num_classes: int, layer_norm_eps: float = 1e-12,
                 initializer_range: float = 0.02, skip_background: bool = True,
                 head: Optional[RegionClassificationHead] = None):
        super().__init__()
        if head is None:
            head = RegionClassificationHead(hidden_size, num_classes, layer_norm_eps)
            init_bert_weights(head, initializer_range)
        self.head = head
        self.skip_background = skip_background
        self.official = (("head.", "region_classifier."),)

    def targets(self, soft: Tensor) -> Tensor:
        """(Nm, C) soft labels -> (Nm,) class targets."""
        if self.skip_background:
            return soft[:, 1:].argmax(-1) + 1
        return soft.argmax(-1)

    def forward(self, model: nn.Module, batch: VLBatch, out: Any) -> ObjectiveResult:
        where = type(self).__name__
        m = _img_masks(batch, where)
        h = _masked_rows(visual_states(model, batch, out), m, where, "batch.targets['img_masks']")
        x, dec = self.head.features(h), self.head.decoder
        soft = _soft_labels(batch, h.shape[0], dec.out_features, where)
        n = h.shape[0]
        if n == 0:
            return ObjectiveResult(_zero_loss(dec(x)), {"loss": 0.0}, 0)
        return self.fused_loss(x, dec, soft.float(), n)

    def fused_loss(self, x: Tensor, decoder: nn.Linear, soft: Tensor, n: int) -> ObjectiveResult:
        """The loss of :meth:`loss` from the decoder's input x (Nm, Ev), without the logits."""
        target = self.targets(soft)
        loss, pred = _decode_hard(x, decoder.weight, decoder.bias, target)
        acc = (pred == target).float().mean()
        return ObjectiveResult(loss, _metrics(loss=loss, acc=acc), n)

    def loss(self, logits: Tensor, soft: Tensor, n: int) -> ObjectiveResult:
        """The same loss from ready logits (Nm, C) (plain torch)."""
        target = self.targets(soft)
        loss = F.cross_entropy(logits, target)
        acc = (logits.argmax(-1) == target).float().mean()
        return ObjectiveResult(loss, _metrics(loss=loss, acc=acc), n)


def _kl_elements(logits: Tensor, soft: Tensor) -> Tensor:
    """(N, C) elementwise KL(soft || softmax(logits)) terms (0 where soft is 0)."""
    return F.kl_div(F.log_softmax(logits, -1), soft, reduction="none")


class MaskedRegionClassificationKL(MaskedRegionClassification):
    """UNITER's MRC-kl: KL(soft labels || softmax(logits)) of the masked regions.
    ``reduction="elements"`` (UNITER: the mean of the (Nm, C) KL terms) or
    ``"regions"`` (the per-region KL, mean over Nm).  Shares UNITER's
    ``region_classifier`` head with MRC when given the same ``head``."""

    name = "mrc-kl"

    def __init__(self, hidden_size: int, num_classes: int, layer_norm_eps: float = 1e-12,
                 initializer_range: float = 0.02, reduction: str = "elements",
                 head: Optional[RegionClassificationHead] = None):
        if reduction not in ("elements", "regions"):
            _fail("MaskedRegionClassificationKL", "reduction", "'elements' or 'regions'", repr(reduction))
        super().__init__(hidden_size, num_classes, layer_norm_eps, initializer_range, head=head)
        self.reduction = reduction

    def fused_loss(self, x: Tensor, decoder: nn.Linear, soft: Tensor, n: int) -> ObjectiveResult:
        # "elements": the mean of the (Nm, C) KL terms = their sum / (Nm * C) (bitwise
        # kl.mean() on the reference path); "regions": the sum / Nm
        kl_sum, pred = _decode_soft(x, decoder.weight, decoder.bias, soft, reduction="sum", kl=True)
        loss = kl_sum / (n * soft.shape[1]) if self.reduction == "elements" else kl_sum / n
        acc = (pred == soft.argmax(-1)).float().mean()
        return ObjectiveResult(loss, _metrics(loss=loss, acc=acc), n)

    def loss(self, logits: Tensor, soft: Tensor, n: int) -> ObjectiveResult:
        kl = _kl_elements(logits, soft)
        loss = kl.mean() if self.reduction == "elements" else kl.sum() / n
        acc = (logits.argmax(-1) == soft.argmax(-1)).float().mean()
        return ObjectiveResult(loss, _metrics(loss=loss, acc=acc), n)


class MaskedMultimodalModeling(Objective):
    """ViLBERT's masked multimodal loss (``visual_target`` 0): KL(detector class
    distribution || softmax(logits)) at the masked regions, summed over classes and
    regions and divided by Nm.  Head: ``cls.imagePredictions`` (transform on the vision
    width, decoder to C classes)."""

    name = "masked_multimodal"

    def __init__(self, hidden_size: int, num_classes: int, layer_norm_eps: float = 1e-12,
                 initializer_range: float = 0.02):
        super().__init__()
        self.head = ImagePredictionHead(hidden_size, num_classes, layer_norm_eps)
        self.official = (("head.", "cls.imagePredictions."),)
        init_bert_weights(self, initializer_range)

    def forward(self, model: nn.Module, batch: VLBatch, out: Any) -> ObjectiveResult:
        where = "MaskedMultimodalModeling"
        m = _img_masks(batch, where)
        h = _masked_rows(visual_states(model, batch, out), m, where, "batch.targets['img_masks']")
        x, dec = self.head.features(h), self.head.decoder
        soft = _soft_labels(batch, h.shape[0], dec.out_features, where)
        n = h.shape[0]
        if n == 0:
            return ObjectiveResult(_zero_loss(dec(x)), {"loss": 0.0}, 0)
        kl_sum, pred = _decode_soft(x, dec.weight, dec.bias, soft.float(), reduction="sum", kl=True)
        loss = kl_sum / n
        acc = (pred == soft.argmax(-1)).float().mean()
        return ObjectiveResult(loss, _metrics(loss=loss, acc=acc), n)


class MaskedRoIClassification(Objective):
    """VL-BERT's masked RoI classification (``mvrc`` in the official code): soft
    cross-entropy ``-sum_c t_c log softmax(z)_c`` against the detector's class
    distribution of each masked RoI, mean over Nm.  Head ``vlbert.mvrc_head``
    (``transform.dense`` + GELU, ``region_cls_pred``).  The masked RoIs are
    ``batch.targets["img_masks"]``, which also reach the backbone (``VLBatch.model_inputs``
    passes them as ``img_masks``: the official ``object_mask_visual_embedding`` /
    ``object_mask_word_embedding`` rows replace their feature and [IMG] token)."""

    name = "masked_roi"

    def __init__(self, hidden_size: int, num_classes: int, initializer_range: float = 0.02):
        super().__init__()
        self.head = MVRCHead(hidden_size, num_classes)
        self.official = (("head.", "vlbert.mvrc_head."),)
        init_bert_weights(self, initializer_range)

    def forward(self, model: nn.Module, batch: VLBatch, out: Any) -> ObjectiveResult:
        where = "MaskedRoIClassification"
        m = _img_masks(batch, where)
        h = _masked_rows(visual_states(model, batch, out), m, where, "batch.targets['img_masks']")
        x, dec = self.head.features(h), self.head.decoder
        soft = _soft_labels(batch, h.shape[0], dec.out_features, where)
        n = h.shape[0]
        if n == 0:
            return ObjectiveResult(_zero_loss(dec(x)), {"loss": 0.0}, 0)
        loss, pred = _decode_soft(x, dec.weight, dec.bias, soft.float(), reduction="mean", kl=False)
        acc = (pred == soft.argmax(-1)).float().mean()
        return ObjectiveResult(loss, _metrics(loss=loss, acc=acc), n)


__all__ = ["ObjectiveResult", "Objective", "MaskedLanguageModeling", "PairClassification", "ImageTextMatching",
           "SentenceImagePrediction", "AlignmentPrediction", "WordRegionAlignment",
           "MaskedRegionFeatureRegression", "MaskedRegionClassification", "MaskedRegionClassificationKL",
           "MaskedMultimodalModeling", "MaskedRoIClassification", "PredictionHeadTransform",
           "RegionFeatureRegressionHead", "RegionClassificationHead", "ImagePredictionHead", "MVRCHead",
           "MODEL_TYPES", "model_type", "text_states", "visual_states", "word_embeddings", "region_projection",
           "text_width", "visual_width", "pooled_width", "feature_dim", "get_target"]
