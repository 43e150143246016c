"""Eager co-attention (ViLBERT's co-attentional layer, both directions): the oracle
and the CPU path.

ctx_t = attention(q_t, k_v, v_v, v_mask): text queries over regions, (B,H,Lt,D);
ctx_v = attention(q_v, k_t, v_t, t_mask): region queries over words, (B,H,Lv,D).
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from vlfast.kernels.attention.reference import attention_reference


def co_attention_reference(q_t: Tensor, k_t: Tensor, v_t: Tensor, t_mask: Optional[Tensor],
                           q_v: Tensor, k_v: Tensor, v_v: Tensor, v_mask: Optional[Tensor], *,
                           dropout_p: float = 0.0, scale: Optional[float] = None,
                           keep_t: Optional[Tensor] = None, keep_v: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Returns (ctx_t (B,H,Lt,D), ctx_v (B,H,Lv,D)); keep_t (B,H,Lt,Lv) and keep_v
    (B,H,Lv,Lt) are the dropout keep-masks of the two directions."""
    ctx_t = attention_reference(q_t, k_v, v_v, v_mask, dropout_p=dropout_p, scale=scale, keep_mask=keep_t)
    ctx_v = attention_reference(q_v, k_t, v_t, t_mask, dropout_p=dropout_p, scale=scale, keep_mask=keep_v)
    return ctx_t, ctx_v
