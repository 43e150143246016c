"""Attention custom ops, their autograd, dispatch and the public functions.

Custom ops (opaque to torch.compile, checked by ``torch.library.opcheck``):

* ``vlfast::attention_fwd(q, k, v, key_mask?, dropout_p, scale, seed, offset, backend) -> (out, lse)``
* ``vlfast::attention_bwd(do, q, k, v, key_mask?, out, lse, dropout_p, scale, seed, offset, backend) -> (dq, dk, dv)``
* ``vlfast::varlen_attention_fwd`` / ``varlen_attention_bwd``: the same over packed
  sequences with ``cu_seqlens_q/k`` and ``max_seqlen_q/k``.

``backend`` is the *requested* backend ("auto" or a forced name) at the time of the
forward; the implementation resolves it for the actual device and inputs, and the
backward receives the same request, so a forward forced to Triton is differentiated
by Triton wherever ``backward()`` runs.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from vlfast import _dispatch
from vlfast.kernels import _common as C
from vlfast.kernels.attention import reference as ref
from vlfast.kernels.dropout_mask import keep_mask as _keep_mask

MAX_TRITON_HEAD_DIM = 256


def _check_triton_inputs(device_type: str, head_dim: int = 64, dtype: torch.dtype = torch.float16,
                         **_: object) -> Optional[str]:
    why = _dispatch.check_triton(device_type)
    if why is not None:
        return why
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"the Triton kernel takes fp16/bf16/fp32, inputs are {str(dtype).replace('torch.', '')}"
    if head_dim > MAX_TRITON_HEAD_DIM:
        return f"the Triton kernel takes head dims up to {MAX_TRITON_HEAD_DIM}, inputs have {head_dim}"
    return None


for _op in ("attention", "varlen_attention"):
    _dispatch.register_op(_op, cuda_order=("triton",), cpu_order=(),
                          checks={"reference": _dispatch.check_reference, "triton": _check_triton_inputs})


def lse_dtype(q: Tensor) -> torch.dtype:
    """dtype of the saved log-sum-exp: fp64 for fp64 inputs (the oracle path), else fp32."""
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _resolve(op: str, backend: str, q: Tensor) -> str:
    return _dispatch.select(op, q.device.type, requested=backend, head_dim=q.shape[-1], dtype=q.dtype)


def _triton():
    from vlfast.kernels.attention import triton as tk  # imported on first use (TRITON_INTERPRET)
    return tk


# ----------------------------------------------------------------------------------
# Keep-mask helpers (the exact dropout pattern of the kernels)
# ----------------------------------------------------------------------------------

def attention_keep_mask(batch: int, heads: int, len_q: int, len_k: int, dropout_p: float, seed: int,
                        offset: int = 0, device: torch.device | str = "cpu") -> Tensor:
    """Keep-mask (B,H,Lq,Lk) bool that ``attention`` with this seed/offset applies:
    element (b,h,i,j) uses Philox counter ``offset + ((b*H+h)*Lq+i)*Lk+j``."""
    return _keep_mask((batch, heads, len_q, len_k), dropout_p, seed, offset, device=device)


def varlen_keep_mask(total_q: int, heads: int, max_seqlen_k: int, dropout_p: float, seed: int,
                     offset: int = 0, device: torch.device | str = "cpu") -> Tensor:
    """Keep-mask (total_q,H,max_seqlen_k) bool of ``varlen_attention``: packed row r,
    head h, key j of r's sequence uses counter ``offset + (r*H+h)*max_seqlen_k + j``."""
    return _keep_mask((total_q, heads, max_seqlen_k), dropout_p, seed, offset, device=device)


# ----------------------------------------------------------------------------------
# Padded attention
# ----------------------------------------------------------------------------------

def _padded_problem(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor]):
    tk = _triton()
    km = None if key_mask is None else key_mask.view(torch.uint8)
    return tk.Problem(q, k, v, km, None, None, q.shape[0], q.shape[1], q.shape[2], k.shape[2])


@torch.library.custom_op("vlfast::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], dropout_p: float,
                  scale: float, seed: int, offset: int, backend: str) -> tuple[Tensor, Tensor]:
    b = _resolve("attention", backend, q)
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    if q.numel() == 0 or Lk == 0:
        return torch.zeros_like(q), torch.full((B, H, Lq), float("inf"), dtype=lse_dtype(q), device=q.device)
    if b == "triton":
        return _triton().forward(_padded_problem(q, k, v, key_mask), scale, dropout_p, seed, offset)
    keep = attention_keep_mask(B, H, Lq, Lk, dropout_p, seed, offset, q.device) if dropout_p > 0 else None
    out, lse = ref.attention_forward(q, k, v, key_mask, dropout_p=dropout_p, scale=scale, keep_mask=keep)
    return _like(q, out), lse.to(lse_dtype(q))


def _like(template: Tensor, value: Tensor) -> Tensor:
    """``value`` laid out like ``torch.empty_like(template)`` (what the fake impl
    promises); no copy when it already is."""
    want = torch.empty_like(template, device="meta").stride()
    if value.stride() == want and value.dtype == template.dtype and value.storage_offset() == 0:
        return value
    out = torch.empty_like(template, dtype=value.dtype)
    out.copy_(value)
    return out


@attention_fwd.register_fake
def _(q, k, v, key_mask, dropout_p, scale, seed, offset, backend):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=lse_dtype(q))


@torch.library.custom_op("vlfast::attention_bwd", mutates_args=())
def attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], out: Tensor,
                  lse: Tensor, dropout_p: float, scale: float, seed: int, offset: int,
                  backend: str) -> tuple[Tensor, Tensor, Tensor]:
    b = _resolve("attention", backend, q)
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    if q.numel() == 0 or Lk == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if b == "triton":
        return _triton().backward(_padded_problem(q, k, v, key_mask), do, out, lse, scale, dropout_p, seed, offset)
    keep = attention_keep_mask(B, H, Lq, Lk, dropout_p, seed, offset, q.device) if dropout_p > 0 else None
    dq, dk, dv = ref.attention_backward(do, q, k, v, key_mask, out, lse, dropout_p=dropout_p, scale=scale,
                                        keep_mask=keep)
    return _like(q, dq), _like(k, dk), _like(v, dv)


@attention_bwd.register_fake
def _(do, q, k, v, key_mask, out, lse, dropout_p, scale, seed, offset, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _attn_setup(ctx, inputs, output):
    q, k, v, key_mask, dropout_p, scale, seed, offset, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, key_mask, out, lse)
    ctx.args = (dropout_p, scale, seed, offset, backend)


def _attn_backward(ctx, dout, dlse):
    q, k, v, key_mask, out, lse = ctx.saved_tensors
    dropout_p, scale, seed, offset, backend = ctx.args
    dq, dk, dv = attention_bwd(dout, q, k, v, key_mask, out, lse, dropout_p, scale, seed, offset, backend)
    return dq, dk, dv, None, None, None, None, None, None


attention_fwd.register_autograd(_attn_backward, setup_context=_attn_setup)


def check_attention_inputs(op: str, q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor],
                           qn: str = "q", kn: str = "k", vn: str = "v", mn: str = "key_mask") -> None:
    """Shapes (B,H,Lq,D), (B,H,Lk,D), (B,H,Lk,D), mask (B,Lk) bool; same device/dtype."""
    C.check_tensor(op, qn, q, ndim=4, shape_doc="(B,H,Lq,D)", dtypes=C.FLOAT_DTYPES)
    C.check_tensor(op, kn, k, ndim=4, shape_doc="(B,H,Lk,D)", dtypes=C.FLOAT_DTYPES)
    C.check_tensor(op, vn, v, ndim=4, shape_doc="(B,H,Lk,D)", dtypes=C.FLOAT_DTYPES)
    C.check_same(op, (qn, kn, vn), (q, k, v))
    B, H, _, D = q.shape
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        C.fail(op, kn, f"shape (B={B}, H={H}, Lk, D={D}) to match {qn} {tuple(q.shape)}", f"shape {tuple(k.shape)}")
    if v.shape != k.shape:
        C.fail(op, vn, f"the shape of {kn} {tuple(k.shape)}", f"shape {tuple(v.shape)}")
    if D == 0:
        C.fail(op, qn, "a head dim D >= 1", f"shape {tuple(q.shape)}")
    if key_mask is not None:
        C.check_tensor(op, mn, key_mask, ndim=2, shape_doc=f"(B={B}, Lk={k.shape[2]})", dtypes=(torch.bool,))
        if tuple(key_mask.shape) != (B, k.shape[2]):
            C.fail(op, mn, f"shape (B={B}, Lk={k.shape[2]})", f"shape {tuple(key_mask.shape)}")
        if key_mask.device != q.device:
            C.fail(op, mn, f"the device of {qn} ({q.device})", key_mask.device)


@C.autocast_op()
def attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor] = None, *,
              dropout_p: float = 0.0, scale: Optional[float] = None) -> Tensor:
    """Scaled dot-product attention with a key-padding mask and dropout.

    Args:
        q: (B,H,Lq,D); k, v: (B,H,Lk,D); fp16/bf16/fp32 (fp64 runs on the reference).
        key_mask: (B,Lk) bool, True = real key; None = all real.  A query row whose
            keys are all masked gives zeros (and zero gradients), never NaN.
        dropout_p: probability of dropping an attention probability (Philox seeded
            from torch's generator; see :func:`attention_keep_mask`).
        scale: multiplies q k^T; default 1/sqrt(D).
    Returns:
        (B,H,Lq,D) in q's dtype.
    """
    op = "attention"
    check_attention_inputs(op, q, k, v, key_mask)
    p = C.check_dropout(op, dropout_p)
    s = C.check_scale(op, scale, q.shape[-1])
    seed = C.draw_seed() if p > 0 else 0
    out, _ = attention_fwd(q, k, v, key_mask, p, s, seed, 0, _dispatch.requested_backend())
    return out


# ----------------------------------------------------------------------------------
# Packed varlen attention
# ----------------------------------------------------------------------------------

def _varlen_problem(q, k, v, cu_q, cu_k, max_q, max_k):
    tk = _triton()
    return tk.Problem(q, k, v, None, cu_q, cu_k, cu_q.shape[0] - 1, q.shape[1], max_q, max_k)


def _check_cu_values(op: str, name: str, cu: Tensor, total: int, max_len: int, max_name: str) -> None:
    c = cu.tolist()
    if c[0] != 0:
        C.fail(op, name, "cu_seqlens[0] == 0", f"{c[0]}")
    lens = [c[i + 1] - c[i] for i in range(len(c) - 1)]
    if any(n < 0 for n in lens):
        i = next(i for i, n in enumerate(lens) if n < 0)
        C.fail(op, name, "non-decreasing offsets", f"{name}[{i}]={c[i]} > {name}[{i + 1}]={c[i + 1]}")
    if c[-1] != total:
        C.fail(op, name, f"{name}[-1] == total rows ({total})", f"{c[-1]}")
    if lens and max(lens) > max_len:
        C.fail(op, max_name, f">= the longest sequence ({max(lens)})", max_len)


@torch.library.custom_op("vlfast::varlen_attention_fwd", mutates_args=())
def varlen_attention_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                         max_seqlen_q: int, max_seqlen_k: int, dropout_p: float, scale: float, seed: int,
                         offset: int, backend: str) -> tuple[Tensor, Tensor]:
    op = "varlen_attention"
    if C.value_checks_enabled(cu_seqlens_q):
        _check_cu_values(op, "cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q, "max_seqlen_q")
        _check_cu_values(op, "cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k, "max_seqlen_k")
    b = _resolve(op, backend, q)
    if q.numel() == 0 or k.shape[0] == 0 or cu_seqlens_q.shape[0] == 1:
        return torch.zeros_like(q), torch.full(q.shape[:2], float("inf"), dtype=lse_dtype(q), device=q.device)
    if b == "triton":
        return _triton().forward(_varlen_problem(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k),
                                 scale, dropout_p, seed, offset)
    keep = (varlen_keep_mask(q.shape[0], q.shape[1], max_seqlen_k, dropout_p, seed, offset, q.device)
            if dropout_p > 0 else None)
    out, lse = ref.varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_k, dropout_p=dropout_p,
                                  scale=scale, keep_mask=keep)
    return _like(q, out), lse.to(lse_dtype(q))


@varlen_attention_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, scale, seed, offset, backend):
    return torch.empty_like(q), q.new_empty(q.shape[:2], dtype=lse_dtype(q))


@torch.library.custom_op("vlfast::varlen_attention_bwd", mutates_args=())
def varlen_attention_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                         out: Tensor, lse: Tensor, max_seqlen_q: int, max_seqlen_k: int, dropout_p: float,
                         scale: float, seed: int, offset: int, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    b = _resolve("varlen_attention", backend, q)
    if q.numel() == 0 or k.shape[0] == 0 or cu_seqlens_q.shape[0] == 1:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if b == "triton":
        p = _varlen_problem(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
        return _triton().backward(p, do, out, lse, scale, dropout_p, seed, offset)
    keep = (varlen_keep_mask(q.shape[0], q.shape[1], max_seqlen_k, dropout_p, seed, offset, q.device)
            if dropout_p > 0 else None)
    dq, dk, dv = ref.varlen_backward(do, q, k, v, cu_seqlens_q, cu_seqlens_k, out, lse, max_seqlen_k,
                                     dropout_p=dropout_p, scale=scale, keep_mask=keep)
    return _like(q, dq), _like(k, dk), _like(v, dv)


@varlen_attention_bwd.register_fake
def _(do, q, k, v, cu_seqlens_q, cu_seqlens_k, out, lse, max_seqlen_q, max_seqlen_k, dropout_p, scale, seed,
      offset, backend):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _varlen_setup(ctx, inputs, output):
    q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, scale, seed, offset, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, cu_q, cu_k, out, lse)
    ctx.args = (max_q, max_k, dropout_p, scale, seed, offset, backend)


def _varlen_backward(ctx, dout, dlse):
    q, k, v, cu_q, cu_k, out, lse = ctx.saved_tensors
    max_q, max_k, dropout_p, scale, seed, offset, backend = ctx.args
    dq, dk, dv = varlen_attention_bwd(dout, q, k, v, cu_q, cu_k, out, lse, max_q, max_k, dropout_p, scale,
                                      seed, offset, backend)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


varlen_attention_fwd.register_autograd(_varlen_backward, setup_context=_varlen_setup)


@C.autocast_op()
def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                     max_seqlen_q: int, max_seqlen_k: int, *, dropout_p: float = 0.0,
                     scale: Optional[float] = None) -> Tensor:
    """Attention over packed sequences, no FLOPs on padding.

    Args:
        q: (total_q,H,D); k, v: (total_k,H,D).
        cu_seqlens_q, cu_seqlens_k: (B+1,) int32 offsets, ``cu[0] == 0``,
            non-decreasing, ``cu[-1] == total``; sequence b is rows
            ``cu[b]:cu[b+1]`` and attends to keys ``cu_k[b]:cu_k[b+1]``.
        max_seqlen_q, max_seqlen_k: upper bounds of the sequence lengths (the
            kernel's grid and the dropout counter layout use them).
    Values of ``cu_seqlens`` are checked on CPU tensors always and on CUDA tensors
    with ``VLFAST_CHECK=1`` (the check costs a host sync).
    Returns:
        (total_q,H,D) in q's dtype.
    """
    op = "varlen_attention"
    C.check_tensor(op, "q", q, ndim=3, shape_doc="(total_q,H,D)", dtypes=C.FLOAT_DTYPES)
    C.check_tensor(op, "k", k, ndim=3, shape_doc="(total_k,H,D)", dtypes=C.FLOAT_DTYPES)
    C.check_tensor(op, "v", v, ndim=3, shape_doc="(total_k,H,D)", dtypes=C.FLOAT_DTYPES)
    C.check_same(op, ("q", "k", "v"), (q, k, v))
    if k.shape[1:] != q.shape[1:]:
        C.fail(op, "k", f"shape (total_k, H={q.shape[1]}, D={q.shape[2]})", f"shape {tuple(k.shape)}")
    if v.shape != k.shape:
        C.fail(op, "v", f"the shape of k {tuple(k.shape)}", f"shape {tuple(v.shape)}")
    if q.shape[2] == 0:
        C.fail(op, "q", "a head dim D >= 1", f"shape {tuple(q.shape)}")
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        C.check_tensor(op, name, cu, ndim=1, shape_doc="(B+1,)", dtypes=(torch.int32,))
        if cu.shape[0] < 1:
            C.fail(op, name, "B+1 >= 1 entries", f"shape {tuple(cu.shape)}")
        if cu.device != q.device:
            C.fail(op, name, f"the device of q ({q.device})", cu.device)
    if cu_seqlens_k.shape[0] != cu_seqlens_q.shape[0]:
        C.fail(op, "cu_seqlens_k", f"{cu_seqlens_q.shape[0]} entries like cu_seqlens_q",
               f"{cu_seqlens_k.shape[0]}")
    for name, m in (("max_seqlen_q", max_seqlen_q), ("max_seqlen_k", max_seqlen_k)):
        if not isinstance(m, int) or isinstance(m, bool) or m < 0:
            C.fail(op, name, "an int >= 0", repr(m))
    p = C.check_dropout(op, dropout_p)
    s = C.check_scale(op, scale, q.shape[-1])
    seed = C.draw_seed() if p > 0 else 0
    out, _ = varlen_attention_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, p, s, seed, 0,
                                  _dispatch.requested_backend())
    return out
