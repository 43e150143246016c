"""ViLBERT (Lu et al., 2019) on vlfast ops: two streams joined by co-attention.

Follows facebookresearch/vilbert-multi-task ``vilbert/vilbert.py`` with the config
``bert_base_6layer_6conect.json``:

- text stream: BERT embeddings and 12 BertLayers of 768 (12 heads);
- vision stream: ``BertImageEmbeddings`` (Linear(2048 -> 1024) of the region feature +
  Linear(5 -> 1024) of its location ``(x1, y1, x2, y2, area)``, normalised to the
  image; LayerNorm; dropout) and 6 BertLayers of 1024 (8 heads, intermediate 1024);
- 6 co-attentional layers (``BertConnectionLayer``) in a 1024-wide space with 8
  heads: each stream's queries attend to the other stream's keys/values (one
  ``vlfast.ops.co_attention`` launch for both directions), then ``BertBiOutput``
  (dense + residual + LayerNorm per stream) and a feed-forward block per stream;
- the co-attention layers sit after vision layer ids ``v_biattention_id`` and text
  layer ids ``t_biattention_id`` (see :func:`layer_schedule` for the exact order the
  official ``BertEncoder.forward`` runs the layers in);
- poolers (first token -> Linear to ``bi_hidden_size`` -> ReLU) per stream, fused
  by product (``fusion_method = "mul"``, as ``VILBertForVLTasks`` does) or sum.

Shapes: B batch, Lt words, Lv regions, E text hidden, Ev vision hidden, Eb co-attention
hidden.  Parameter names are the official ones without the ``bert.`` prefix, so
:func:`convert_official` / :func:`to_official` only add or drop that prefix.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlfast import ops
from vlfast.kernels.attention import reference as attn_ref
from vlfast.models.base import (ConversionReport, ModelConfig, PathLike, PretrainedModel, finish_loading,
                                load_hf_bert, load_state_dict_file, load_with_report, strip_prefix)
from vlfast.models.layers import (BertIntermediate, BertLayer, BertOutput, BertTextEmbeddings, Packed,
                                  TwoStreamOutput, as_bool_mask, bind_packing, check_feats, check_ids,
                                  dense_dropout_add_layer_norm, fail, init_bert_weights, zero_padding)
from vlfast.models.packing import VLPacking

_NAME = "ViLBert"
logger = logging.getLogger(__name__)
LOCATION_SIZE = 5  # (x1, y1, x2, y2, area), normalised by the image size


# ----------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------

@dataclass
class ViLBertConfig(ModelConfig):
    """ViLBERT's configuration (the official ``BertConfig`` field names).

    Text stream: ``hidden_size``, ``num_hidden_layers``, ... as in BERT.  Vision stream:
    ``v_*`` (``v_feature_size`` is the region feature width).  Co-attention: ``bi_*``,
    and the layer ids ``v_biattention_id`` / ``t_biattention_id`` (equal length; the
    i-th co-attention layer runs once vision layers ``< v_biattention_id[i]`` and text
    layers ``< t_biattention_id[i]`` have run).  ``fixed_t_layer`` / ``fixed_v_layer``:
    the first layers of each stream run without gradient (the official freezing of
    the lower text layers during pretraining; 0 = none).  ``task_specific_tokens``:
    the multi-task model's learned task token, inserted after [CLS] (the text stream
    is then one slot longer).
    """

    model_type: ClassVar[str] = "vilbert"

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    v_feature_size: int = 2048
    v_hidden_size: int = 1024
    v_num_hidden_layers: int = 6
    v_num_attention_heads: int = 8
    v_intermediate_size: int = 1024
    v_hidden_dropout_prob: float = 0.1
    v_attention_probs_dropout_prob: float = 0.1
    bi_hidden_size: int = 1024
    bi_num_attention_heads: int = 8
    v_biattention_id: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4, 5])
    t_biattention_id: list[int] = field(default_factory=lambda: [6, 7, 8, 9, 10, 11])
    fixed_t_layer: int = 0
    fixed_v_layer: int = 0
    fusion_method: str = "mul"
    task_specific_tokens: bool = False
    num_task_tokens: int = 20

    def __post_init__(self) -> None:
        self.v_biattention_id = [int(i) for i in self.v_biattention_id]
        self.t_biattention_id = [int(i) for i in self.t_biattention_id]
        for hid, heads in (("hidden_size", "num_attention_heads"), ("v_hidden_size", "v_num_attention_heads"),
                           ("bi_hidden_size", "bi_num_attention_heads")):
            if getattr(self, heads) <= 0 or getattr(self, hid) % getattr(self, heads):
                fail("ViLBertConfig", heads, f"a positive divisor of {hid}={getattr(self, hid)}",
                     getattr(self, heads))
        v_ids, t_ids = self.v_biattention_id, self.t_biattention_id
        if len(v_ids) != len(t_ids):
            fail("ViLBertConfig", "t_biattention_id", f"{len(v_ids)} ids (one per entry of v_biattention_id)",
                 t_ids)
        for name, ids, n, fixed_name in (("v_biattention_id", v_ids, self.v_num_hidden_layers, "fixed_v_layer"),
                                         ("t_biattention_id", t_ids, self.num_hidden_layers, "fixed_t_layer")):
            if any(i < 0 or i >= n for i in ids) or any(a > b for a, b in zip(ids, ids[1:])):
                fail("ViLBertConfig", name, f"non-decreasing layer ids in [0, {n})", ids)
            fixed, upper = getattr(self, fixed_name), (ids[0] if ids else n)
            if not 0 <= fixed <= upper:  # the official encoder asserts fixed <= every co-layer id
                fail("ViLBertConfig", fixed_name, f"a value in [0, {upper}] ({name}[0] bounds it)", fixed)
        if self.fusion_method not in ("mul", "sum"):
            fail("ViLBertConfig", "fusion_method", "'mul' or 'sum'", repr(self.fusion_method))

    @classmethod
    def from_official_config(cls, src: Union[PathLike, dict[str, Any]]) -> "ViLBertConfig":
        """A config from an official config JSON (e.g. ``config/bert_base_6layer_6conect.json``)
        or its dict: every field we share is taken; fields that only concern heads or
        training (``v_target_size``, ``bi_intermediate_size``, ``bi_attention_type``,
        ``pooling_method``, ``*initializer_range`` of the vision stream, ...) are ignored.
        Only GELU activations are supported (every official config uses them)."""
        if not isinstance(src, dict):
            src = json.loads(Path(src).read_text())
        for act in ("hidden_act", "v_hidden_act"):
            if src.get(act, "gelu") != "gelu":
                fail("ViLBertConfig.from_official_config", act, "'gelu'", repr(src[act]))
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in src.items() if k in names})

    @property
    def num_co_layers(self) -> int:
        return len(self.v_biattention_id)

    @classmethod
    def base(cls, **kw: Any) -> "ViLBertConfig":
        """bert_base_6layer_6conect: text 12 x 768, vision 6 x 1024 (8 heads), 6 co-layers."""
        return cls(**kw)

    @classmethod
    def large(cls, **kw: Any) -> "ViLBertConfig":
        """bert_large_6layer_6conect: text 24 x 1024 (16 heads), vision 6 x 1024, co-layers at
        text ids 18-23."""
        d: dict[str, Any] = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                 intermediate_size=4096, t_biattention_id=list(range(18, 24)))
        d.update(kw)
        return cls(**d)

    @classmethod
    def small(cls, **kw: Any) -> "ViLBertConfig":
        """Tiny, for tests and the CPU default: text 4 x 64 (4 heads), vision 2 x 48 (4 heads),
        co-attention 32 wide with 2 heads at vision ids [0, 1] / text ids [2, 3] (so the
        schedule has text layers before, between and after the co-layers)."""
        d: dict[str, Any] = dict(vocab_size=100, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                 intermediate_size=128, max_position_embeddings=128, v_hidden_size=48,
                                 v_num_hidden_layers=2, v_num_attention_heads=4, v_intermediate_size=96,
                                 bi_hidden_size=32, bi_num_attention_heads=2, v_biattention_id=[0, 1],
                                 t_biattention_id=[2, 3])
        d.update(kw)
        return cls(**d)


class Step(NamedTuple):
    """One layer of the encoder's schedule: kind "t" (text BertLayer), "v" (vision
    BertLayer) or "c" (co-attention layer), its index in its list, and whether it runs
    without gradient (below fixed_t_layer / fixed_v_layer)."""
    kind: str
    index: int
    frozen: bool = False


def layer_schedule(config: ViLBertConfig) -> list[Step]:
    """The order in which the official ``BertEncoder.forward`` runs the layers.

    For the i-th pair (v_id, t_id): the text layers from where the previous pair stopped
    up to t_id (exclusive), then the vision layers up to v_id (exclusive), then
    co-attention layer i.  After the last pair: the remaining vision layers, then the
    remaining text layers.  Base config: text 0-5, c0, then (text k+6, vision k, c(k+1))
    for k = 0..4, then vision 5 and text 11.
    """
    steps: list[Step] = []
    t_start = v_start = 0
    for i, (v_end, t_end) in enumerate(zip(config.v_biattention_id, config.t_biattention_id)):
        steps += [Step("t", j, j < config.fixed_t_layer) for j in range(t_start, t_end)]
        steps += [Step("v", j, j < config.fixed_v_layer) for j in range(v_start, v_end)]
        steps.append(Step("c", i))
        t_start, v_start = t_end, v_end
    steps += [Step("v", j, j < config.fixed_v_layer) for j in range(v_start, config.v_num_hidden_layers)]
    steps += [Step("t", j, j < config.fixed_t_layer) for j in range(t_start, config.num_hidden_layers)]
    return steps


# ----------------------------------------------------------------------------------
# Layers (official names: embeddings, v_embeddings, encoder.{layer,v_layer,c_layer}, t_pooler, v_pooler)
# ----------------------------------------------------------------------------------

class ViLBertTextEmbeddings(BertTextEmbeddings):
    """BERT's word + position + token type embeddings, plus (task_specific_tokens) the
    multi-task model's task embedding inserted after the first token, before the
    LayerNorm.  Names: word_embeddings, position_embeddings, token_type_embeddings,
    task_embeddings, LayerNorm."""

    def __init__(self, c: ViLBertConfig):
        super().__init__(c.vocab_size, c.hidden_size, c.max_position_embeddings, c.type_vocab_size,
                         c.hidden_dropout_prob, c.pad_token_id, c.layer_norm_eps)
        self.task_embeddings = nn.Embedding(c.num_task_tokens, c.hidden_size) if c.task_specific_tokens else None

    def forward(self, input_ids: Tensor, token_type_ids: Optional[Tensor] = None,  # type: ignore[override]
                task_ids: Optional[Tensor] = None) -> Tensor:
        """input_ids (B,Lt), token_type_ids (B,Lt), task_ids (B,1) -> (B,Lt[+1],E)."""
        if self.task_embeddings is None:
            return super().forward(input_ids, token_type_ids)
        B, L = input_ids.shape
        pos = torch.arange(L, device=input_ids.device)[None].expand(B, L)
        tt = torch.zeros_like(input_ids) if token_type_ids is None else token_type_ids
        e = self.word_embeddings(input_ids) + self.position_embeddings(pos) + self.token_type_embeddings(tt)
        e = torch.cat([e[:, :1], self.task_embeddings(task_ids), e[:, 1:]], dim=1)
        return self.dropout(self.LayerNorm(e))


class BertImageEmbeddings(nn.Module):
    """Region feature and location, projected and summed: LayerNorm, dropout.
    Names: image_embeddings, image_location_embeddings, LayerNorm."""

    def __init__(self, c: ViLBertConfig):
        super().__init__()
        self.image_embeddings = nn.Linear(c.v_feature_size, c.v_hidden_size)
        self.image_location_embeddings = nn.Linear(LOCATION_SIZE, c.v_hidden_size)
        self.LayerNorm = nn.LayerNorm(c.v_hidden_size, eps=c.layer_norm_eps)
        self.dropout = nn.Dropout(c.hidden_dropout_prob)  # the official code uses the text rate here

    def forward(self, feats: Tensor, boxes: Tensor) -> Tensor:
        """feats (B,Lv,F), boxes (B,Lv,5) -> (B,Lv,Ev)."""
        # the two matmuls stay here (cuBLAS); sum, LayerNorm and dropout fused
        ln = self.LayerNorm
        return ops.vilbert_visual_embeddings(self.image_embeddings(feats), self.image_location_embeddings(boxes),
                                             ln.weight, ln.bias, eps=ln.eps,
                                             dropout_p=self.dropout.p if self.training else 0.0)


class BertBiAttention(nn.Module):
    """Both directions of co-attention in one ``vlfast.ops.co_attention`` launch.

    query1/key1/value1 project the vision stream (Ev -> Eb), query2/key2/value2 the text
    stream (E -> Eb).  Text queries attend to the regions (the official
    ``context_layer1``, dropout ``v_attention_probs_dropout_prob``); region queries
    attend to the words (``context_layer2``, dropout ``attention_probs_dropout_prob``).
    """

    def __init__(self, c: ViLBertConfig):
        super().__init__()
        self.heads = c.bi_num_attention_heads
        self.head_dim = c.bi_hidden_size // c.bi_num_attention_heads
        self.query1 = nn.Linear(c.v_hidden_size, c.bi_hidden_size)
        self.key1 = nn.Linear(c.v_hidden_size, c.bi_hidden_size)
        self.value1 = nn.Linear(c.v_hidden_size, c.bi_hidden_size)
        self.query2 = nn.Linear(c.hidden_size, c.bi_hidden_size)
        self.key2 = nn.Linear(c.hidden_size, c.bi_hidden_size)
        self.value2 = nn.Linear(c.hidden_size, c.bi_hidden_size)
        self.dropout_t = c.v_attention_probs_dropout_prob   # on text-query probabilities (over regions)
        self.dropout_v = c.attention_probs_dropout_prob     # on region-query probabilities (over words)

    def _split(self, x: Tensor) -> Tensor:  # (B,L,Eb) -> (B,H,L,D) view
        B, L, _ = x.shape
        return x.view(B, L, self.heads, self.head_dim).transpose(1, 2)

    @staticmethod
    def _merge(x: Tensor) -> Tensor:  # (B,H,L,D) -> (B,L,H*D)
        B, H, L, D = x.shape
        return x.transpose(1, 2).reshape(B, L, H * D)

    def forward(self, x_v: Tensor, v_mask: Tensor, x_t: Tensor, t_mask: Tensor, output_attentions: bool = False
                ) -> tuple[Tensor, Tensor, Optional[tuple[Tensor, Tensor]]]:
        """x_v (B,Lv,Ev), v_mask (B,Lv) bool, x_t (B,Lt,E), t_mask (B,Lt) bool.  Returns
        ctx_t (B,Lt,Eb), ctx_v (B,Lv,Eb) and, when asked, the probabilities
        (text->regions (B,H,Lt,Lv), regions->text (B,H,Lv,Lt))."""
        q_v, k_v, v_v = self._split(self.query1(x_v)), self._split(self.key1(x_v)), self._split(self.value1(x_v))
        q_t, k_t, v_t = self._split(self.query2(x_t)), self._split(self.key2(x_t)), self._split(self.value2(x_t))
        p_t = self.dropout_t if self.training else 0.0
        p_v = self.dropout_v if self.training else 0.0
        probs = None
        if output_attentions:
            # the fused kernel does not expose probabilities: the reference computes them
            scale = 1.0 / math.sqrt(self.head_dim)
            pr_t, _ = attn_ref.attention_probs(q_t, k_v, v_mask, scale)
            pr_v, _ = attn_ref.attention_probs(q_v, k_t, t_mask, scale)
            ctx_t = torch.matmul(F.dropout(pr_t, p_t) if p_t > 0 else pr_t, v_v.to(pr_t.dtype)).to(q_t.dtype)
            ctx_v = torch.matmul(F.dropout(pr_v, p_v) if p_v > 0 else pr_v, v_t.to(pr_v.dtype)).to(q_v.dtype)
            probs = (pr_t.to(q_t.dtype), pr_v.to(q_v.dtype))
        elif p_t == p_v:
            ctx_t, ctx_v = ops.co_attention(q_t, k_t, v_t, t_mask, q_v, k_v, v_v, v_mask, dropout_p=p_t)
        else:  # two dropout rates: one op cannot take both
            ctx_t = ops.attention(q_t, k_v, v_v, v_mask, dropout_p=p_t)
            ctx_v = ops.attention(q_v, k_t, v_t, t_mask, dropout_p=p_v)
        return self._merge(ctx_t), self._merge(ctx_v), probs


class _UnusedLinear(nn.Module):
    """A Linear's weight and bias kept as buffers: the official BertBiOutput defines
    q_dense1 / q_dense2 but never calls them.  Buffers keep checkpoints round-tripping
    key for key while no trainable parameter goes without a gradient (DDP-safe)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.register_buffer("weight", torch.zeros(n_out, n_in))
        self.register_buffer("bias", torch.zeros(n_out))


class BertBiOutput(nn.Module):
    """Per stream: dense (Eb -> stream width), dropout, LayerNorm with the residual.
    Names: dense1/LayerNorm1 (vision), dense2/LayerNorm2 (text), q_dense1/q_dense2
    (unused by the official forward; buffers here)."""

    def __init__(self, c: ViLBertConfig):
        super().__init__()
        eps = c.layer_norm_eps
        self.dense1 = nn.Linear(c.bi_hidden_size, c.v_hidden_size)
        self.LayerNorm1 = nn.LayerNorm(c.v_hidden_size, eps=eps)
        self.dropout1 = nn.Dropout(c.v_hidden_dropout_prob)
        self.q_dense1 = _UnusedLinear(c.bi_hidden_size, c.v_hidden_size)
        self.dense2 = nn.Linear(c.bi_hidden_size, c.hidden_size)
        self.LayerNorm2 = nn.LayerNorm(c.hidden_size, eps=eps)
        self.dropout2 = nn.Dropout(c.hidden_dropout_prob)
        self.q_dense2 = _UnusedLinear(c.bi_hidden_size, c.hidden_size)

    def forward(self, ctx_v: Tensor, x_v: Tensor, ctx_t: Tensor, x_t: Tensor) -> tuple[Tensor, Tensor]:
        """ctx_v (B,Lv,Eb) + residual x_v (B,Lv,Ev); ctx_t (B,Lt,Eb) + residual x_t (B,Lt,E)."""
        return (dense_dropout_add_layer_norm(self.dense1, self.dropout1, self.LayerNorm1, ctx_v, x_v, self.training),
                dense_dropout_add_layer_norm(self.dense2, self.dropout2, self.LayerNorm2, ctx_t, x_t, self.training))


class BertConnectionLayer(nn.Module):
    """A co-attentional transformer layer: BertBiAttention, BertBiOutput, then a
    feed-forward block per stream.  Names: biattention, biOutput, v_intermediate,
    v_output, t_intermediate, t_output."""

    def __init__(self, c: ViLBertConfig):
        super().__init__()
        eps = c.layer_norm_eps
        self.biattention = BertBiAttention(c)
        self.biOutput = BertBiOutput(c)
        self.v_intermediate = BertIntermediate(c.v_hidden_size, c.v_intermediate_size)
        self.v_output = BertOutput(c.v_intermediate_size, c.v_hidden_size, c.v_hidden_dropout_prob, eps)
        self.t_intermediate = BertIntermediate(c.hidden_size, c.intermediate_size)
        self.t_output = BertOutput(c.intermediate_size, c.hidden_size, c.hidden_dropout_prob, eps)

    def forward(self, x_v: Tensor, v_mask: Tensor, x_t: Tensor, t_mask: Tensor, output_attentions: bool = False
                ) -> tuple[Tensor, Tensor, Optional[tuple[Tensor, Tensor]]]:
        """-> (new x_v (B,Lv,Ev), new x_t (B,Lt,E), probabilities or None)."""
        ctx_t, ctx_v, probs = self.biattention(x_v, v_mask, x_t, t_mask, output_attentions)
        a_v, a_t = self.biOutput(ctx_v, x_v, ctx_t, x_t)
        return (self.v_output(self.v_intermediate(a_v), a_v), self.t_output(self.t_intermediate(a_t), a_t),
                probs)


class ViLBertEncoder(nn.Module):
    """Text layers (``layer.N``), vision layers (``v_layer.N``) and co-attention layers
    (``c_layer.N``), run in :func:`layer_schedule`'s order.  ``gradient_checkpointing``
    (set through ``ViLBert.gradient_checkpointing_enable()``): each trainable layer --
    within-stream and co-attention -- is checkpointed in training."""

    def __init__(self, c: ViLBertConfig):
        super().__init__()
        eps = c.layer_norm_eps
        self.layer = nn.ModuleList(
            BertLayer(c.hidden_size, c.num_attention_heads, c.intermediate_size, c.attention_probs_dropout_prob,
                      c.hidden_dropout_prob, eps) for _ in range(c.num_hidden_layers))
        self.v_layer = nn.ModuleList(
            BertLayer(c.v_hidden_size, c.v_num_attention_heads, c.v_intermediate_size,
                      c.v_attention_probs_dropout_prob, c.v_hidden_dropout_prob, eps)
            for _ in range(c.v_num_hidden_layers))
        self.c_layer = nn.ModuleList(BertConnectionLayer(c) for _ in range(c.num_co_layers))
        self.schedule = layer_schedule(c)
        self.gradient_checkpointing = False

    def forward(self, x_t: Tensor, t_mask: Tensor, x_v: Tensor, v_mask: Tensor, *, padding_free: bool = False,
                output_attentions: bool = False, output_hidden_states: bool = False,
                packed_t: Optional[Packed] = None, packed_v: Optional[Packed] = None) -> dict[str, Any]:
        """x_t (B,Lt,E), t_mask (B,Lt) bool, x_v (B,Lv,Ev), v_mask (B,Lv) bool.

        padding_free: the within-stream layers run on each stream's packed real tokens
        (varlen attention); co-attention always runs padded, with the masks.
        packed_t / packed_v: the packing of t_mask / v_mask computed by the caller
        (``bind_packing``: no host sync); None: ``Packed.from_mask`` (two host syncs
        per stream on a GPU).  Returns
        {"t": (B,Lt,E), "v": (B,Lv,Ev)} (padding zeroed) plus, when asked, per-stream
        hidden states and the attention maps of text, vision and co-attention layers.
        """
        from vlfast.models.layers import run_layer

        ck = self.gradient_checkpointing and self.training
        masks = {"t": t_mask, "v": v_mask}
        h = {"t": x_t, "v": x_v}
        layers = {"t": self.layer, "v": self.v_layer}
        packs: dict[str, Optional[Packed]] = {"t": None, "v": None}
        if padding_free and not output_attentions:
            given = {"t": packed_t, "v": packed_v}
            for s, m in masks.items():
                pk = given[s]
                if pk is not None and tuple(pk.mask.shape) != tuple(m.shape):
                    fail("ViLBertEncoder", f"packed_{s}", f"the packing of a {tuple(m.shape)} mask",
                         f"one of a {tuple(pk.mask.shape)} mask")
                packs[s] = pk if pk is not None else Packed.from_mask(m)
        is_packed = {"t": False, "v": False}
        states: Optional[dict[str, list[Tensor]]] = {"t": [], "v": []} if output_hidden_states else None
        attns: Optional[dict[str, list]] = {"t": [], "v": [], "c": []} if output_attentions else None

        def padded(s: str) -> Tensor:
            if is_packed[s]:
                h[s] = packs[s].unpack(h[s])
                is_packed[s] = False
            return h[s]

        def record(s: str) -> None:
            if states is not None:
                x = packs[s].unpack(h[s]) if is_packed[s] else h[s] * masks[s][..., None].to(h[s].dtype)
                states[s].append(x)

        record("t")
        record("v")
        for step in self.schedule:
            with torch.no_grad() if step.frozen else contextlib.nullcontext():
                if step.kind == "c":
                    h["v"], h["t"], probs = run_layer(self.c_layer[step.index], ck, padded("v"), v_mask,
                                                      padded("t"), t_mask, output_attentions)
                    record("v")
                    record("t")
                else:
                    s, pk = step.kind, packs[step.kind]
                    if pk is not None:
                        if not is_packed[s]:
                            h[s], is_packed[s] = pk.pack(h[s]), True
                        h[s], probs = run_layer(layers[s][step.index], ck, h[s], packed=pk)
                    else:
                        h[s], probs = run_layer(layers[s][step.index], ck, h[s], masks[s],
                                                output_attentions=output_attentions)
                    record(s)
            if attns is not None:
                attns[step.kind].append(probs)
        out: dict[str, Any] = {s: padded(s) * masks[s][..., None].to(h[s].dtype) for s in ("t", "v")}
        out["states"], out["attns"] = states, attns
        return out


class BertStreamPooler(nn.Module):
    """ViLBERT's BertTextPooler / BertImagePooler: ReLU(dense(first token)) into the
    co-attention width.  Names: dense."""

    def __init__(self, hidden: int, out: int):
        super().__init__()
        self.dense = nn.Linear(hidden, out)

    def forward(self, x: Tensor) -> Tensor:
        """x (B,L,hidden) -> (B,out)."""
        return F.relu(self.dense(x[:, 0]))


# ----------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------

class ViLBert(PretrainedModel):
    """ViLBERT's two streams and co-attention (the official ``BertModel`` of
    vilbert-multi-task), without the pretraining / task heads.

    ``out = model(input_ids, attention_mask, token_type_ids, visual_feats, visual_boxes,
    visual_mask)``: ``seq_t, seq_v, pooled_t, pooled_v = out``; ``out.pooler_output``
    (= :meth:`fused_pooled`) is the fused pooled vector the task heads use.
    """

    config_class = ViLBertConfig

    def __init__(self, config: Optional[ViLBertConfig] = None):
        super().__init__()
        self.config = config = ViLBertConfig.small() if config is None else config
        self.embeddings = ViLBertTextEmbeddings(config)
        self.v_embeddings = BertImageEmbeddings(config)
        self.encoder = ViLBertEncoder(config)
        self.t_pooler = BertStreamPooler(config.hidden_size, config.bi_hidden_size)
        self.v_pooler = BertStreamPooler(config.v_hidden_size, config.bi_hidden_size)
        init_bert_weights(self, config.initializer_range)

    # -- inputs --------------------------------------------------------------------

    def _check_inputs(self, input_ids: Tensor, attention_mask: Optional[Tensor], token_type_ids: Optional[Tensor],
                      visual_feats: Optional[Tensor], visual_boxes: Optional[Tensor], visual_mask: Optional[Tensor],
                      task_ids: Optional[Tensor]) -> tuple[Tensor, Tensor, Optional[Tensor], Tensor, Tensor, Tensor,
                                                           Optional[Tensor]]:
        c = self.config
        check_ids(_NAME, "input_ids", input_ids, upper=c.vocab_size)
        B, Lt = input_ids.shape
        if Lt > c.max_position_embeddings:
            fail(_NAME, "input_ids", f"at most max_position_embeddings={c.max_position_embeddings} tokens",
                 f"shape {tuple(input_ids.shape)}")
        check_ids(_NAME, "token_type_ids", token_type_ids, shape=(B, Lt), upper=c.type_vocab_size)
        dev = input_ids.device
        t_mask = as_bool_mask(_NAME, "attention_mask", attention_mask, (B, Lt), dev)
        check_feats(_NAME, "visual_feats", visual_feats, B, c.v_feature_size, "region feature")
        Lv = visual_feats.shape[1]
        check_feats(_NAME, "visual_boxes", visual_boxes, B, LOCATION_SIZE, "x1,y1,x2,y2,area normalised")
        if visual_boxes.shape[1] != Lv:
            fail(_NAME, "visual_boxes", f"shape (B={B}, Lv={Lv}, 5) to match visual_feats",
                 f"shape {tuple(visual_boxes.shape)}")
        v_mask = as_bool_mask(_NAME, "visual_mask", visual_mask, (B, Lv), dev)
        if c.task_specific_tokens:
            if task_ids is None:
                fail(_NAME, "task_ids", f"a (B={B}, 1) integer tensor (config.task_specific_tokens)", "None")
            check_ids(_NAME, "task_ids", task_ids, shape=(B, 1), upper=c.num_task_tokens)
            # the official model prepends a real slot to the mask for the task token
            t_mask = torch.cat([t_mask.new_ones(B, 1), t_mask], dim=1)
        elif task_ids is not None:
            fail(_NAME, "task_ids", "None (config.task_specific_tokens is False)", f"shape {tuple(task_ids.shape)}")
        dtype = self.v_embeddings.image_embeddings.weight.dtype
        # padding regions are inert: their features and boxes (NaN, inf, ...) become 0
        return (input_ids, t_mask, token_type_ids, zero_padding(visual_feats.to(dtype), v_mask),
                zero_padding(visual_boxes.to(dtype), v_mask), v_mask, task_ids)

    # -- forward -------------------------------------------------------------------

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                token_type_ids: Optional[Tensor] = None, visual_feats: Optional[Tensor] = None,
                visual_boxes: Optional[Tensor] = None, visual_mask: Optional[Tensor] = None,
                output_attentions: bool = False, output_hidden_states: bool = False, padding_free: bool = False,
                task_ids: Optional[Tensor] = None, *, packing: Optional[VLPacking] = None) -> TwoStreamOutput:
        """Run both streams.

        Args:
            input_ids: (B, Lt) word ids.  attention_mask: (B, Lt) bool or 0/1 (1 = real).
            token_type_ids: (B, Lt), default 0.
            visual_feats: (B, Lv, v_feature_size) region features (the first region is
                the whole-image feature in the official data).
            visual_boxes: (B, Lv, 5) ``(x1, y1, x2, y2, area)`` normalised to [0, 1].
            visual_mask: (B, Lv) bool or 0/1 (1 = real region).
            padding_free: run the within-stream layers on packed real tokens (same outputs).
            task_ids: (B, 1), only with ``config.task_specific_tokens``: the task token
                goes after [CLS], so seq_t is (B, Lt+1, E).
            packing: with padding_free, the batch's precomputed
                :class:`~vlfast.models.packing.VLPacking` (its ``text`` layout, with the
                task token's slot added on the device, and its ``visual`` layout), so the
                forward and backward never wait on the device; None: packed from the
                masks (host syncs on a GPU).
        Returns:
            TwoStreamOutput: seq_t (B,Lt,E), seq_v (B,Lv,Ev) (padding zeroed), pooled_t
            (B,Eb), pooled_v (B,Eb), pooler_output (B,Eb) = the fused pair; with
            output_hidden_states, ``hidden_states = (text, vision)``: each a list of
            (B,L,width) tensors -- the embeddings, then the stream after each of its
            layers and each co-attention layer, in schedule order (text:
            1 + num_hidden_layers + n_co, vision: 1 + v_num_hidden_layers + n_co);
            with output_attentions, ``attentions = (text, vision, co)``: per text layer
            (B,H,Lt,Lt), per vision layer (B,Hv,Lv,Lv), per co-attention layer a pair
            (text->regions (B,Hb,Lt,Lv), regions->text (B,Hb,Lv,Lt)).  Attention maps
            come from the padded path (padding_free is ignored then).
        """
        input_ids, t_mask, token_type_ids, feats, boxes, v_mask, task_ids = self._check_inputs(
            input_ids, attention_mask, token_type_ids, visual_feats, visual_boxes, visual_mask, task_ids)
        x_t = self.embeddings(input_ids, token_type_ids, task_ids)
        x_v = self.v_embeddings(feats, boxes)
        packed_t = packed_v = None
        if padding_free and not output_attentions:
            # with a task token the text mask has one more real column (see _check_inputs)
            extra = t_mask.shape[1] - input_ids.shape[1]
            packed_t = bind_packing(_NAME, packing, "text", t_mask, before=extra)
            packed_v = bind_packing(_NAME, packing, "visual", v_mask)
        enc = self.encoder(x_t, t_mask, x_v, v_mask, padding_free=padding_free,
                           output_attentions=output_attentions, output_hidden_states=output_hidden_states,
                           packed_t=packed_t, packed_v=packed_v)
        seq_t, seq_v = enc["t"], enc["v"]
        pooled_t, pooled_v = self.t_pooler(seq_t), self.v_pooler(seq_v)
        states, attns = enc["states"], enc["attns"]
        return TwoStreamOutput(
            seq_t=seq_t, seq_v=seq_v, pooled_t=pooled_t, pooled_v=pooled_v,
            pooler_output=self._fuse(pooled_t, pooled_v),
            hidden_states=None if states is None else (states["t"], states["v"]),
            attentions=None if attns is None else (attns["t"], attns["v"], attns["c"]))

    def _fuse(self, pooled_t: Tensor, pooled_v: Tensor) -> Tensor:
        return pooled_t * pooled_v if self.config.fusion_method == "mul" else pooled_t + pooled_v

    def fused_pooled(self, out: TwoStreamOutput) -> Tensor:
        """The pooled pair fused as the official task heads do: pooled_t * pooled_v
        (fusion_method "mul") or pooled_t + pooled_v ("sum").  (B, Eb)."""
        return self._fuse(out.pooled_t, out.pooled_v)

    # -- checkpoints ---------------------------------------------------------------

    @classmethod
    def from_bert(cls, src: Any, config: Optional[ViLBertConfig] = None) -> "ViLBert":
        """Text stream (embeddings and encoder.layer.N) from an HF BERT: a directory, an
        HF ``BertModel`` / ``BertForPreTraining`` or a (state_dict, config dict) pair.

        config None: the base config with the BERT's text sizes and co-attention layers
        on its last min(6, num_hidden_layers) layers (vision ids 0..n-1), as every
        official config places them.  A given config must match the BERT's sizes.  The
        BERT's pooler is not used (ViLBERT's text pooler maps to bi_hidden_size with a
        ReLU); everything else keeps its initialisation.
        """
        sd, cfg = load_hf_bert(src)
        sizes = {k: cfg[k] for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                                     "intermediate_size", "max_position_embeddings", "type_vocab_size")
                 if k in cfg}
        act = cfg.get("hidden_act", "gelu")
        if act != "gelu":
            fail(f"{_NAME}.from_bert", "src", "a BERT with hidden_act 'gelu'", repr(act))
        if config is None:
            n_layers = int(sizes.get("num_hidden_layers", 12))
            n_co = min(len(ViLBertConfig().v_biattention_id), n_layers)
            extra = {k: cfg[k] for k in ("layer_norm_eps", "hidden_dropout_prob", "attention_probs_dropout_prob",
                                         "pad_token_id", "initializer_range") if cfg.get(k) is not None}
            config = ViLBertConfig.base(**sizes, **extra, v_biattention_id=list(range(n_co)),
                                        t_biattention_id=list(range(n_layers - n_co, n_layers)))
        else:
            for k, v in sizes.items():
                if getattr(config, k) != v:
                    fail(f"{_NAME}.from_bert", f"config.{k}", f"{v} (the BERT's)", getattr(config, k))
        model = cls(config)
        text = {k: v for k, v in sd.items() if k.startswith(("embeddings.", "encoder.layer."))}
        missing, unexpected = load_with_report(model, text)
        if unexpected:
            fail(f"{_NAME}.from_bert", "src", "BERT keys that match the text stream", f"unused keys {unexpected[:5]}")
        return model

    @classmethod
    def from_official(cls, src: Union[PathLike, dict[str, Tensor]], config: Optional[ViLBertConfig] = None, *,
                      output_loading_info: bool = False) -> Union["ViLBert", tuple["ViLBert", ConversionReport]]:
        """Load an official vilbert-multi-task state_dict (``bert.*`` from
        BertForMultiModalPreTraining or VILBertForVLTasks, with or without ``module.``)
        or a path to one.  Heads (``cls.*``, ``vil_prediction*``, ...) are reported as
        unused source keys (named without ``module.``); ``report.missing`` lists our
        parameters left at their initialisation.

        config None: inferred by :func:`infer_config` from the tensor shapes.

        Returns the model; ``(model, report)`` with ``output_loading_info=True``.  Missing
        keys are logged as a warning; a source with none of the model's tensors raises
        ValueError.
        """
        sd = load_state_dict_file(src) if not isinstance(src, dict) else src
        ours, rest = _split_official(sd)
        if config is None:
            config = infer_config(ours)
        model = cls(config)
        missing, unexpected = load_with_report(model, ours)
        report = ConversionReport(missing=missing, unexpected=sorted(rest + ["bert." + k for k in unexpected]))
        return finish_loading(f"{_NAME}.from_official", model, report, output_loading_info, logger)


# ----------------------------------------------------------------------------------
# Official key layout
# ----------------------------------------------------------------------------------

_OFFICIAL_PREFIX = "bert."


def _split_official(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """(our state_dict from the ``bert.*`` keys, the other source keys)."""
    sd = strip_prefix(sd, "module.")
    ours: dict[str, Tensor] = {}
    rest: list[str] = []
    for k, v in sd.items():
        if not k.startswith(_OFFICIAL_PREFIX):
            rest.append(k)
            continue
        k = k[len(_OFFICIAL_PREFIX):]
        if "LayerNorm" in k and k.endswith((".gamma", ".beta")):  # TF-era LayerNorm names
            k = k[: k.rfind(".")] + (".weight" if k.endswith(".gamma") else ".bias")
        ours[k] = v
    return ours, rest


def convert_official(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official keys -> ours: drop ``module.`` and ``bert.`` (every module name below it is
    the official one); LayerNorm ``gamma``/``beta`` become ``weight``/``bias``.  Keys
    outside ``bert.*`` (pretraining and task heads) are left out."""
    return _split_official(sd)[0]


def to_official(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our keys -> official (``bert.`` + our key); the inverse of :func:`convert_official`."""
    return {_OFFICIAL_PREFIX + k: v for k, v in sd.items()}


def infer_config(sd: dict[str, Tensor]) -> ViLBertConfig:
    """A config from the shapes of a state_dict in our key layout.

    Inferred: vocab_size, hidden_size, max_position_embeddings, type_vocab_size,
    num_hidden_layers, intermediate_size, v_feature_size, v_hidden_size,
    v_num_hidden_layers, v_intermediate_size, bi_hidden_size, the number of
    co-attention layers, task_specific_tokens / num_task_tokens.  Not in the shapes:
    num_attention_heads (hidden_size // 64, BERT's head width, when it divides; else
    the base value), v_/bi_num_attention_heads (8, every official config's value),
    the co-attention ids (vision 0..n-1, text the last n layers: every official config
    follows this), dropouts, eps, fixed layers and fusion (base defaults).
    """
    def shape(key: str) -> tuple[int, ...]:
        if key not in sd:
            fail(f"{_NAME}.infer_config", "src", f"a ViLBERT state_dict with {_OFFICIAL_PREFIX}{key}", "no such key")
        return tuple(sd[key].shape)

    def count(prefix: str) -> int:
        ids = {int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)}
        return max(ids) + 1 if ids else 0

    base = ViLBertConfig()
    vocab, hidden = shape("embeddings.word_embeddings.weight")
    v_hidden, v_feat = shape("v_embeddings.image_embeddings.weight")
    n_t, n_v, n_c = count("encoder.layer."), count("encoder.v_layer."), count("encoder.c_layer.")
    d: dict[str, Any] = dict(
        vocab_size=vocab, hidden_size=hidden,
        max_position_embeddings=shape("embeddings.position_embeddings.weight")[0],
        type_vocab_size=shape("embeddings.token_type_embeddings.weight")[0],
        num_hidden_layers=n_t, v_feature_size=v_feat, v_hidden_size=v_hidden, v_num_hidden_layers=n_v,
        v_biattention_id=list(range(n_c)), t_biattention_id=list(range(n_t - n_c, n_t)))
    if n_t:
        d["intermediate_size"] = shape("encoder.layer.0.intermediate.dense.weight")[0]
    if n_v:
        d["v_intermediate_size"] = shape("encoder.v_layer.0.intermediate.dense.weight")[0]
    if n_c:
        d["bi_hidden_size"] = shape("encoder.c_layer.0.biattention.query1.weight")[0]
        if not n_t:
            d["intermediate_size"] = shape("encoder.c_layer.0.t_intermediate.dense.weight")[0]
        if not n_v:
            d["v_intermediate_size"] = shape("encoder.c_layer.0.v_intermediate.dense.weight")[0]
    d["num_attention_heads"] = hidden // 64 if hidden % 64 == 0 else base.num_attention_heads
    for f in ("v_num_attention_heads", "bi_num_attention_heads"):
        width = d["v_hidden_size"] if f.startswith("v_") else d.get("bi_hidden_size", base.bi_hidden_size)
        if width % getattr(base, f):
            fail(f"{_NAME}.infer_config", f, f"a divisor of {width}: pass a config", getattr(base, f))
    if "embeddings.task_embeddings.weight" in sd:
        d["task_specific_tokens"] = True
        d["num_task_tokens"] = shape("embeddings.task_embeddings.weight")[0]
    return dataclasses.replace(base, **d)


MODEL_CLASS = ViLBert
CONFIG_CLASS = ViLBertConfig

__all__ = ["ViLBertConfig", "ViLBert", "layer_schedule", "Step", "convert_official", "to_official",
           "infer_config", "MODEL_CLASS", "CONFIG_CLASS", "LOCATION_SIZE"]
