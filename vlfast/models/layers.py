"""Shared BERT layers of the four models, on vlfast ops.

Parameter names follow HF's ``modeling_bert`` (``attention.self.query``,
``attention.output.LayerNorm``, ``intermediate.dense``, ...), so official and HF
checkpoints map onto them by renaming prefixes only.

Shapes: B batch, L length, E hidden, H heads, D = E / H.  Masks inside the layers are
bool (B, L), True = real token.  A layer runs either padded (``mask`` given, attention
through ``vlfast.ops.attention`` with a key mask) or packed (``packed`` given: the
real tokens of the batch as (total, E) with ``cu_seqlens``, attention through
``vlfast.ops.varlen_attention``): both give the same outputs on real tokens.  The
packing comes from the caller's metadata (a ``VLPacking``, see models/packing.py) when
it has one -- then the padding-free forward and backward never wait on the device --
else from the mask (``Packed.from_mask``, two host syncs on a GPU).  Input checks that
read tensor values (:func:`value_checks`) run on CPU always, on CUDA only with
``VLFAST_CHECK=1``.

The embedding sum + LayerNorm + dropout (``ops.text_embeddings``), bias + GELU
(``ops.bias_gelu``) and dropout + residual + LayerNorm (``ops.dropout_add_layer_norm``)
run through the fused ops with the modules' own parameters, so state_dicts keep the
HF names; on CPU (the reference backend) they are the same torch ops as before.
"""
from __future__ import annotations

import math
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlfast import ops
from vlfast.kernels import _common as C
from vlfast.kernels.attention import reference as attn_ref
from vlfast.models.packing import Packed, PackedLayout, VLPacking  # noqa: F401  (Packed's old home: re-exported)


# ----------------------------------------------------------------------------------
# Outputs and input checks
# ----------------------------------------------------------------------------------

class ModelOutput:
    """Named outputs that also index and unpack like a tuple of the primary fields.

    ``out.last_hidden_state`` or ``out[0]``; ``seq, pooled = out``.  Optional fields
    (``attentions``, ``hidden_states``) are attributes only, None when not asked for.
    """

    _primary: tuple[str, ...] = ()

    def __init__(self, **fields: Any):
        for k, v in fields.items():
            setattr(self, k, v)

    def to_tuple(self) -> tuple:
        return tuple(getattr(self, k) for k in self._primary)

    def __getitem__(self, i):
        return self.to_tuple()[i]

    def __iter__(self) -> Iterator:
        return iter(self.to_tuple())

    def __len__(self) -> int:
        return len(self._primary)

    def __repr__(self) -> str:
        parts = []
        for k, v in self.__dict__.items():
            parts.append(f"{k}={tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__}")
        return f"{type(self).__name__}({', '.join(parts)})"


class SingleStreamOutput(ModelOutput):
    """last_hidden_state (B, Lt+Lv, E): text slots then visual slots, padding zeroed;
    pooler_output (B, E); attentions / hidden_states when asked for."""
    _primary = ("last_hidden_state", "pooler_output")


class TwoStreamOutput(ModelOutput):
    """ViLBERT: seq_t (B,Lt,Et), seq_v (B,Lv,Ev), pooled_t (B,Eb), pooled_v (B,Eb)."""
    _primary = ("seq_t", "seq_v", "pooled_t", "pooled_v")


def fail(model: str, arg: str, expected: str, got: object) -> None:
    raise ValueError(f"{model}: {arg}: expected {expected}, got {got}")


def as_bool_mask(model: str, name: str, mask: Optional[Tensor], shape: tuple[int, int],
                 device: torch.device) -> Tensor:
    """A (B, L) mask as bool: accepts bool or 0/1 integer tensors (HF's convention),
    None = all real.  Errors name the argument.  That an integer mask holds only 0/1
    is a value check (:func:`value_checks`): on CUDA without ``VLFAST_CHECK=1`` any
    nonzero value counts as real."""
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if not isinstance(mask, Tensor):
        fail(model, name, f"a tensor of shape {shape}", type(mask).__name__)
    if tuple(mask.shape) != tuple(shape):
        fail(model, name, f"shape {tuple(shape)}", f"shape {tuple(mask.shape)}")
    if mask.dtype == torch.bool:
        return mask.to(device)
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        fail(model, name, "a bool or 0/1 integer mask", str(mask.dtype).replace("torch.", ""))
    if value_checks(mask) and bool(((mask != 0) & (mask != 1)).any()):
        fail(model, name, "values 0/1 (1 = real)", f"values {sorted(set(mask.unique().tolist()))[:6]}")
    return (mask != 0).to(device)


def zero_padding(x: Tensor, mask: Tensor) -> Tensor:
    """``x`` (B, L, ...) with the slots where ``mask`` (B, L) bool is False set to 0.

    The models call it once per float input (region features, boxes) at their input
    boundary, so padding is inert: whatever a padded slot holds -- NaN and inf
    included -- never reaches a real output or a gradient.  A multiplication by the
    mask would not do (0 * NaN = NaN), and neither would masking alone: attention
    gives a masked key probability 0, but p @ v still multiplies that 0 by the key's
    value, and the Linear / LayerNorm backward multiplies a padded row's zero
    gradient by its (NaN) input -- even on the padding-free path.  For finite inputs
    the real outputs are unchanged (padded slots never reach them)."""
    return torch.where(mask.reshape(mask.shape + (1,) * (x.dim() - mask.dim())), x, 0)


def value_checks(t: Tensor) -> bool:
    """Whether the input checks that read tensor values run for ``t``: on CPU always,
    on CUDA only with ``VLFAST_CHECK=1`` -- reading a value back waits on the device,
    and the padding-free forward and backward must never do that (the ops' own value
    checks follow the same rule: ``vlfast.kernels._common.value_checks_enabled``)."""
    return C.value_checks_enabled(t)


def check_ids(model: str, name: str, ids: Optional[Tensor], shape: Optional[tuple[int, int]] = None,
              upper: Optional[int] = None) -> Optional[Tensor]:
    """A (B, L) integer id tensor (or None): type, dtype and ``shape`` always; values
    in [0, ``upper``) where :func:`value_checks` run.  Errors name the argument."""
    if ids is None:
        return None
    if not isinstance(ids, Tensor) or ids.dim() != 2:
        fail(model, name, "a 2-d integer tensor (B, L)",
             f"shape {tuple(ids.shape)}" if isinstance(ids, Tensor) else type(ids).__name__)
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        fail(model, name, "an integer tensor", str(ids.dtype).replace("torch.", ""))
    if shape is not None and tuple(ids.shape) != tuple(shape):
        fail(model, name, f"shape {tuple(shape)}", f"shape {tuple(ids.shape)}")
    if upper is not None and ids.numel() and value_checks(ids) and (int(ids.min()) < 0
                                                                    or int(ids.max()) >= upper):
        fail(model, name, f"values in [0, {upper})", f"values in [{int(ids.min())}, {int(ids.max())}]")
    return ids


def check_feats(model: str, name: str, t: Optional[Tensor], batch: int, last: int, what: str) -> Tensor:
    """(B, Lv, last) float tensor check; ``what`` documents the last dim."""
    if t is None:
        fail(model, name, f"a (B={batch}, Lv, {what}) float tensor", "None")
    if not isinstance(t, Tensor) or t.dim() != 3:
        fail(model, name, f"a (B={batch}, Lv, {what}) float tensor",
             f"shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__)
    if not t.dtype.is_floating_point:
        fail(model, name, "a float tensor", str(t.dtype).replace("torch.", ""))
    if t.shape[0] != batch:
        fail(model, name, f"batch size {batch} (that of input_ids)", f"shape {tuple(t.shape)}")
    if t.shape[2] != last:
        fail(model, name, f"last dim {last} ({what})", f"shape {tuple(t.shape)}")
    return t


# ----------------------------------------------------------------------------------
# Packing for the padding-free path (Packed, PackedLayout, VLPacking: models/packing.py)
# ----------------------------------------------------------------------------------

def bind_packing(model: str, packing: Optional[VLPacking], which: str, mask: Tensor, *, before: int = 0,
                 after: int = 0) -> Optional[Packed]:
    """The :class:`Packed` of the encoder mask ``mask`` (B, L) from the caller's
    ``packing`` (a :class:`VLPacking`; ``which`` = "text", "visual" or "joint"),
    with ``before`` / ``after`` real columns added to every row (ViLBERT's task token,
    VL-BERT's [END] slot) by :meth:`PackedLayout.extended` -- no host sync.  None when
    ``packing`` is None (the encoder then packs from the mask, with a sync).  Errors
    name ``packing.<which>``."""
    if packing is None:
        return None
    if not isinstance(packing, VLPacking):
        fail(model, "packing", "a VLPacking (VLBatch.model_inputs passes one) or None", type(packing).__name__)
    layout = getattr(packing, which).extended(before, after)
    return Packed.from_layout(layout, mask, where=model, arg=f"packing.{which}")


# ----------------------------------------------------------------------------------
# BERT layers
# ----------------------------------------------------------------------------------

def gelu(x: Tensor) -> Tensor:
    """erf GELU (BERT's)."""
    return F.gelu(x)


def dense_gelu(dense: nn.Linear, x: Tensor) -> Tensor:
    """``gelu(dense(x))`` as a bias-free matmul then ``ops.bias_gelu`` with the layer's
    bias (cast like the matmul's output, as autocast casts it inside F.linear): x (..., In)
    -> (..., Out).  On CPU fp32 bitwise the plain-torch formula."""
    h = F.linear(x, dense.weight)
    return ops.bias_gelu(h, dense.bias.to(h.dtype))


def dense_dropout_add_layer_norm(dense: nn.Linear, dropout: nn.Dropout, ln: nn.LayerNorm, x: Tensor,
                                 residual: Tensor, training: bool) -> Tensor:
    """``ln(dropout(dense(x)) + residual)`` through ``ops.dropout_add_layer_norm`` with the
    modules' parameters, rate and eps: x (..., In), residual (..., Out) -> (..., Out).
    Dropout only in training; in eval, on CPU fp32, bitwise the plain-torch formula."""
    return ops.dropout_add_layer_norm(dense(x), residual, ln.weight, ln.bias,
                                      dropout_p=dropout.p if training else 0.0, eps=ln.eps)[0]


class BertSelfAttention(nn.Module):
    """Multi-head self-attention on ``vlfast.ops.attention`` (padded) or
    ``varlen_attention`` (packed).  Names: query, key, value."""

    def __init__(self, hidden: int, heads: int, dropout: float, kv_hidden: Optional[int] = None):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden_size ({hidden}) must be a multiple of num_attention_heads ({heads})")
        self.heads, self.head_dim = heads, hidden // heads
        kv = hidden if kv_hidden is None else kv_hidden
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv, hidden)
        self.value = nn.Linear(kv, hidden)
        self.dropout_p = dropout

    def _split(self, x: Tensor) -> Tensor:  # (B,L,E) -> (B,H,L,D) view
        B, L, _ = x.shape
        return x.view(B, L, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, packed: Optional[Packed] = None,
                output_attentions: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        p = self.dropout_p if self.training else 0.0
        if packed is not None:  # x: (total, E)
            H, D = self.heads, self.head_dim
            q, k, v = (lin(x).view(-1, H, D) for lin in (self.query, self.key, self.value))
            ctx = ops.varlen_attention(q, k, v, packed.cu_seqlens, packed.cu_seqlens, packed.max_seqlen,
                                       packed.max_seqlen, dropout_p=p)
            return ctx.reshape(x.shape[0], H * D), None
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        probs = None
        if output_attentions:
            # the fused kernel does not expose probabilities: the reference computes them
            probs, _ = attn_ref.attention_probs(q, k, mask, 1.0 / math.sqrt(self.head_dim))
            pd = F.dropout(probs, p) if p > 0 else probs
            ctx = torch.matmul(pd, v.float()).to(q.dtype)
            probs = probs.to(q.dtype)
        else:
            ctx = ops.attention(q, k, v, mask, dropout_p=p)
        B, H, L, D = ctx.shape
        return ctx.transpose(1, 2).reshape(B, L, H * D), probs


class BertSelfOutput(nn.Module):
    """dense -> dropout -> LayerNorm(+ residual).  Names: dense, LayerNorm."""

    def __init__(self, hidden: int, dropout: float, eps: float = 1e-12):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return dense_dropout_add_layer_norm(self.dense, self.dropout, self.LayerNorm, x, residual, self.training)


class BertAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, attn_dropout: float, dropout: float, eps: float = 1e-12):
        super().__init__()
        self.self = BertSelfAttention(hidden, heads, attn_dropout)
        self.output = BertSelfOutput(hidden, dropout, eps)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, packed: Optional[Packed] = None,
                output_attentions: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        ctx, probs = self.self(x, mask, packed, output_attentions)
        return self.output(ctx, x), probs


class BertIntermediate(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.dense = nn.Linear(hidden, intermediate)

    def forward(self, x: Tensor) -> Tensor:
        return dense_gelu(self.dense, x)


class BertOutput(nn.Module):
    def __init__(self, intermediate: int, hidden: int, dropout: float, eps: float = 1e-12):
        super().__init__()
        self.dense = nn.Linear(intermediate, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, residual: Tensor) -> Tensor:
        return dense_dropout_add_layer_norm(self.dense, self.dropout, self.LayerNorm, x, residual, self.training)


class BertLayer(nn.Module):
    """Post-LN transformer layer (BERT): attention, intermediate, output."""

    def __init__(self, hidden: int, heads: int, intermediate: int, attn_dropout: float = 0.1,
                 dropout: float = 0.1, eps: float = 1e-12):
        super().__init__()
        self.attention = BertAttention(hidden, heads, attn_dropout, dropout, eps)
        self.intermediate = BertIntermediate(hidden, intermediate)
        self.output = BertOutput(intermediate, hidden, dropout, eps)

    def forward(self, x: Tensor, mask: Optional[Tensor] = None, packed: Optional[Packed] = None,
                output_attentions: bool = False) -> tuple[Tensor, Optional[Tensor]]:
        a, probs = self.attention(x, mask, packed, output_attentions)
        return self.output(self.intermediate(a), a), probs


def run_layer(layer: nn.Module, checkpointed: bool, *args: Any, **kwargs: Any) -> Any:
    """``layer(*args, **kwargs)``, under ``torch.utils.checkpoint.checkpoint``
    (non-reentrant, RNG state replayed) when ``checkpointed`` and gradients are on."""
    if checkpointed and torch.is_grad_enabled():
        from torch.utils.checkpoint import checkpoint

        return checkpoint(layer, *args, use_reentrant=False, **kwargs)
    return layer(*args, **kwargs)


class BertEncoder(nn.Module):
    """A stack of BertLayer (name: layer.N).  ``gradient_checkpointing`` (set through
    the model's ``gradient_checkpointing_enable()``): checkpoint each layer in training."""

    def __init__(self, n_layers: int, hidden: int, heads: int, intermediate: int, attn_dropout: float = 0.1,
                 dropout: float = 0.1, eps: float = 1e-12):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(hidden, heads, intermediate, attn_dropout, dropout, eps)
                                   for _ in range(n_layers))
        self.gradient_checkpointing = False

    def forward(self, x: Tensor, mask: Tensor, *, padding_free: bool = False, output_attentions: bool = False,
                output_hidden_states: bool = False, packed: Optional[Packed] = None
                ) -> tuple[Tensor, Optional[list[Tensor]], Optional[list[Tensor]]]:
        """x (B,L,E), mask (B,L) bool.  Returns (B,L,E) with padding zeroed, and the
        per-layer hidden states / attention maps when asked (padded path only for
        attention maps).

        padding_free: run the layers on the packed real tokens.  ``packed``: the
        packing of ``mask`` computed by the caller (``bind_packing``), so the forward
        and backward never wait on the device; None: derived from the mask
        (``Packed.from_mask``: two host syncs on a GPU)."""
        states: Optional[list[Tensor]] = [] if output_hidden_states else None
        attns: Optional[list[Tensor]] = [] if output_attentions else None
        ck = self.gradient_checkpointing and self.training
        if padding_free and not output_attentions:
            if packed is None:
                packed = Packed.from_mask(mask)
            elif tuple(packed.mask.shape) != tuple(mask.shape):
                fail("BertEncoder", "packed", f"the packing of a {tuple(mask.shape)} mask",
                     f"one of a {tuple(packed.mask.shape)} mask")
            h = packed.pack(x)
            if states is not None:
                states.append(packed.unpack(h))
            for layer in self.layer:
                h, _ = run_layer(layer, ck, h, packed=packed)
                if states is not None:
                    states.append(packed.unpack(h))
            return packed.unpack(h), states, attns
        h = x
        if states is not None:
            states.append(h * mask[..., None])
        for layer in self.layer:
            h, probs = run_layer(layer, ck, h, mask, output_attentions=output_attentions)
            if states is not None:
                states.append(h * mask[..., None])
            if attns is not None:
                attns.append(probs)
        return h * mask[..., None].to(h.dtype), states, attns


class BertPooler(nn.Module):
    """tanh(dense(first token)).  Names: dense."""

    def __init__(self, hidden: int, out: Optional[int] = None):
        super().__init__()
        self.dense = nn.Linear(hidden, hidden if out is None else out)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.dense(x[:, 0]))


class BertTextEmbeddings(nn.Module):
    """word + position + token type, LayerNorm, dropout.  Names: word_embeddings,
    position_embeddings, token_type_embeddings, LayerNorm."""

    def __init__(self, vocab: int, hidden: int, max_positions: int, type_vocab: int, dropout: float,
                 pad_token_id: int = 0, eps: float = 1e-12):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, hidden, padding_idx=pad_token_id)
        self.position_embeddings = nn.Embedding(max_positions, hidden)
        self.token_type_embeddings = nn.Embedding(type_vocab, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, input_ids: Tensor, token_type_ids: Optional[Tensor] = None,
                position_ids: Optional[Tensor] = None) -> Tensor:
        B, L = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(L, device=input_ids.device)[None].expand(B, L)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        # (word + position) + type -> LayerNorm -> dropout, fused (ops.text_embeddings)
        ln = self.LayerNorm
        return ops.text_embeddings(input_ids, token_type_ids, position_ids, self.word_embeddings.weight,
                                   self.position_embeddings.weight, self.token_type_embeddings.weight, ln.weight,
                                   ln.bias, padding_idx=self.word_embeddings.padding_idx, eps=ln.eps,
                                   dropout_p=self.dropout.p if self.training else 0.0)


def init_bert_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT's initialisation: normal(0, std) for Linear/Embedding weights, zero biases,
    LayerNorm to (1, 0); the padding row of embeddings stays zero."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def rename_state_dict(sd: dict[str, Tensor], rules: Sequence[tuple[str, str]]) -> dict[str, Tensor]:
    """Rename keys by the first matching prefix rule (old_prefix, new_prefix); keys
    matching no rule are kept as they are."""
    out = {}
    for k, v in sd.items():
        for old, new in rules:
            if k.startswith(old):
                k = new + k[len(old):]
                break
        out[k] = v
    return out
