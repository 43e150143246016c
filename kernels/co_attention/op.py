"""Co-attention custom ops, autograd, dispatch and the public function.

* ``vlfast::co_attention_fwd(q_t, k_t, v_t, t_mask?, q_v, k_v, v_v, v_mask?, dropout_p, scale, seed, offset, backend)
  -> (ctx_t, ctx_v, lse_t, lse_v)``
* ``vlfast::co_attention_bwd(...) -> (dq_t, dk_t, dv_t, dq_v, dk_v, dv_v)``
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from vlfast import _dispatch
from vlfast.kernels import _common as C
from vlfast.kernels.attention import reference as aref
from vlfast.kernels.attention.op import (_check_triton_inputs, _like, attention_keep_mask, check_attention_inputs,
                                         lse_dtype)

_dispatch.register_op("co_attention", cuda_order=("triton",), cpu_order=(),
                      checks={"reference": _dispatch.check_reference, "triton": _check_triton_inputs})


def _triton():
    from vlfast.kernels.co_attention import triton as tk
    return tk


def co_attention_keep_masks(batch: int, heads: int, len_t: int, len_v: int, dropout_p: float, seed: int,
                            offset: int = 0, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
    """Keep-masks of ``co_attention`` with this seed/offset: (B,H,Lt,Lv) for ctx_t
    (text queries) and (B,H,Lv,Lt) for ctx_v, the second starting right after the
    first in the Philox counter space."""
    keep_t = attention_keep_mask(batch, heads, len_t, len_v, dropout_p, seed, offset, device)
    keep_v = attention_keep_mask(batch, heads, len_v, len_t, dropout_p, seed,
                                 offset + batch * heads * len_t * len_v, device)
    return keep_t, keep_v


def _keeps(q_t: Tensor, q_v: Tensor, dropout_p: float, seed: int, offset: int):
    if dropout_p <= 0:
        return None, None
    B, H, Lt, _ = q_t.shape
    return co_attention_keep_masks(B, H, Lt, q_v.shape[2], dropout_p, seed, offset, q_t.device)


def _empty_result(q_t, q_v):
    return (torch.zeros_like(q_t), torch.zeros_like(q_v),
            torch.full(q_t.shape[:3], float("inf"), dtype=lse_dtype(q_t), device=q_t.device),
            torch.full(q_v.shape[:3], float("inf"), dtype=lse_dtype(q_v), device=q_v.device))


@torch.library.custom_op("vlfast::co_attention_fwd", mutates_args=())
def co_attention_fwd(q_t: Tensor, k_t: Tensor, v_t: Tensor, t_mask: Optional[Tensor], q_v: Tensor, k_v: Tensor,
                     v_v: Tensor, v_mask: Optional[Tensor], dropout_p: float, scale: float, seed: int, offset: int,
                     backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    b = _dispatch.select("co_attention", q_t.device.type, requested=backend, head_dim=q_t.shape[-1],
                         dtype=q_t.dtype)
    if q_t.numel() == 0 or q_v.numel() == 0:
        # one stream is empty: each direction then attends to no key
        return _empty_result(q_t, q_v)
    if b == "triton":
        return _triton().forward(q_t, k_t, v_t, t_mask, q_v, k_v, v_v, v_mask, scale, dropout_p, seed, offset)
    keep_t, keep_v = _keeps(q_t, q_v, dropout_p, seed, offset)
    ctx_t, lse_t = aref.attention_forward(q_t, k_v, v_v, v_mask, dropout_p=dropout_p, scale=scale, keep_mask=keep_t)
    ctx_v, lse_v = aref.attention_forward(q_v, k_t, v_t, t_mask, dropout_p=dropout_p, scale=scale, keep_mask=keep_v)
    return _like(q_t, ctx_t), _like(q_v, ctx_v), lse_t.to(lse_dtype(q_t)), lse_v.to(lse_dtype(q_v))


@co_attention_fwd.register_fake
def _(q_t, k_t, v_t, t_mask, q_v, k_v, v_v, v_mask, dropout_p, scale, seed, offset, backend):
    return (torch.empty_like(q_t), torch.empty_like(q_v), q_t.new_empty(q_t.shape[:3], dtype=lse_dtype(q_t)),
            q_v.new_empty(q_v.shape[:3], dtype=lse_dtype(q_v)))


@torch.library.custom_op("vlfast::co_attention_bwd", mutates_args=())
def co_attention_bwd(dctx_t: Tensor, dctx_v: Tensor, q_t: Tensor, k_t: Tensor, v_t: Tensor, t_mask: Optional[Tensor],
                     q_v: Tensor, k_v: Tensor, v_v: Tensor, v_mask: Optional[Tensor], ctx_t: Tensor, ctx_v: Tensor,
                     lse_t: Tensor, lse_v: Tensor, dropout_p: float, scale: float, seed: int, offset: int,
                     backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    b = _dispatch.select("co_attention", q_t.device.type, requested=backend, head_dim=q_t.shape[-1],
                         dtype=q_t.dtype)
    if q_t.numel() == 0 or q_v.numel() == 0:
        return tuple(torch.zeros_like(t) for t in (q_t, k_t, v_t, q_v, k_v, v_v))
    if b == "triton":
        return _triton().backward(dctx_t, dctx_v, q_t, k_t, v_t, t_mask, q_v, k_v, v_v, v_mask, ctx_t, ctx_v,
                                  lse_t, lse_v, scale, dropout_p, seed, offset)
    keep_t, keep_v = _keeps(q_t, q_v, dropout_p, seed, offset)
    dq_t, dk_v, dv_v = aref.attention_backward(dctx_t, q_t, k_v, v_v, v_mask, ctx_t, lse_t, dropout_p=dropout_p,
                                               scale=scale, keep_mask=keep_t)
    dq_v, dk_t, dv_t = aref.attention_backward(dctx_v, q_v, k_t, v_t, t_mask, ctx_v, lse_v, dropout_p=dropout_p,
                                               scale=scale, keep_mask=keep_v)
    return (_like(q_t, dq_t), _like(k_t, dk_t), _like(v_t, dv_t), _like(q_v, dq_v), _like(k_v, dk_v),
            _like(v_v, dv_v))


@co_attention_bwd.register_fake
def _(dctx_t, dctx_v, q_t, k_t, v_t, t_mask, q_v, k_v, v_v, v_mask, ctx_t, ctx_v, lse_t, lse_v, dropout_p, scale,
      seed, offset, backend):
    return tuple(torch.empty_like(t) for t in (q_t, k_t, v_t, q_v, k_v, v_v))


def _setup(ctx, inputs, output):
    q_t, k_t, v_t, t_mask, q_v, k_v, v_v, v_mask, dropout_p, scale, seed, offset, backend = inputs
    ctx_t, ctx_v, lse_t, lse_v = output
    ctx.save_for_backward(q_t, k_t, v_t, t_mask, q_v, k_v, v_v, v_mask, ctx_t, ctx_v, lse_t, lse_v)
    ctx.args = (dropout_p, scale, seed, offset, backend)


def _backward(ctx, dctx_t, dctx_v, dlse_t, dlse_v):
    q_t, k_t, v_t, t_mask, q_v, k_v, v_v, v_mask, ctx_t, ctx_v, lse_t, lse_v = ctx.saved_tensors
    if dctx_t is None:
        dctx_t = torch.zeros_like(ctx_t)
    if dctx_v is None:
        dctx_v = torch.zeros_like(ctx_v)
    g = co_attention_bwd(dctx_t, dctx_v, q_t, k_t, v_t, t_mask, q_v, k_v, v_v, v_mask, ctx_t, ctx_v, lse_t, lse_v,
                         *ctx.args)
    dq_t, dk_t, dv_t, dq_v, dk_v, dv_v = g
    return dq_t, dk_t, dv_t, None, dq_v, dk_v, dv_v, None, None, None, None, None, None


co_attention_fwd.register_autograd(_backward, setup_context=_setup)


@C.autocast_op()
def co_attention(q_t: Tensor, k_t: Tensor, v_t: Tensor, t_mask: Optional[Tensor], q_v: Tensor, k_v: Tensor,
                 v_v: Tensor, v_mask: Optional[Tensor], *, dropout_p: float = 0.0,
                 scale: Optional[float] = None) -> tuple[Tensor, Tensor]:
    """Both directions of ViLBERT's co-attentional layer in one kernel launch.

    Args:
        q_t, k_t, v_t: text stream (B,H,Lt,D); t_mask (B,Lt) bool, True = real word.
        q_v, k_v, v_v: visual stream (B,H,Lv,D); v_mask (B,Lv) bool, True = real region.
        dropout_p, scale: as :func:`vlfast.ops.attention` (one seed for both directions;
            see :func:`co_attention_keep_masks`).
    Returns:
        ctx_t = attention(q_t, k_v, v_v, v_mask) (B,H,Lt,D) and
        ctx_v = attention(q_v, k_t, v_t, t_mask) (B,H,Lv,D).
    """
    op = "co_attention"
    check_attention_inputs(op, q_t, k_t, v_t, t_mask, "q_t", "k_t", "v_t", "t_mask")
    check_attention_inputs(op, q_v, k_v, v_v, v_mask, "q_v", "k_v", "v_v", "v_mask")
    C.check_same(op, ("q_t", "q_v"), (q_t, q_v))
    if q_v.shape[0] != q_t.shape[0] or q_v.shape[1] != q_t.shape[1] or q_v.shape[3] != q_t.shape[3]:
        C.fail(op, "q_v", f"shape (B={q_t.shape[0]}, H={q_t.shape[1]}, Lv, D={q_t.shape[3]}) to match q_t",
               f"shape {tuple(q_v.shape)}")
    for qn, kn, q, k in (("q_t", "k_t", q_t, k_t), ("q_v", "k_v", q_v, k_v)):
        if k.shape[2] != q.shape[2]:
            C.fail(op, kn, f"the length of {qn} (L={q.shape[2]}, one stream gives q, k and v)",
                   f"shape {tuple(k.shape)}")
    p = C.check_dropout(op, dropout_p)
    s = C.check_scale(op, scale, q_t.shape[-1])
    seed = C.draw_seed() if p > 0 else 0
    ctx_t, ctx_v, _, _ = co_attention_fwd(q_t, k_t, v_t, t_mask, q_v, k_v, v_v, v_mask, p, s, seed, 0,
                                          _dispatch.requested_backend())
    return ctx_t, ctx_v
