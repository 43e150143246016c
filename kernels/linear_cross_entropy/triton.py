"""The row kernel of the fused linear + cross-entropy: log-sum-exp, loss, argmax and
the logits' gradient, in place, for one chunk of logits rows.

Shapes: n rows of the chunk, V classes; one program per row, the row streamed in
blocks of ``BLOCK_V`` columns (fp32 math whatever the logits' dtype).

Pass 1 keeps an online maximum ``m``, ``s = sum exp(z - m)`` and the first argmax
(a block's first maximum replaces the running one only when strictly larger, so ties
go to the smallest index, as ``torch.argmax``).  Soft targets also accumulate
``S = sum t``, ``sum t (z - m)`` (re-based when ``m`` grows, so the loss is a
difference of well-scaled numbers) and, for KL, ``sum xlogy(t, t)``.

Loss: hard ``(m - z_label) + log s`` (0 on an ``ignore_index`` row, NaN for a label
outside [0, V)); soft ``S log s - sum t (z - m)`` (+ ``sum t log t`` for KL).

Pass 2 (``WRITE_GRAD``) overwrites the row with ``scale * (softmax - onehot)`` (hard;
0 on ignored rows) or ``scale * (softmax * S - t)`` (soft), rounded to the logits'
dtype.  ``scale`` is per row (stride 1) or one number (stride 0): 1/n for "mean",
1 for "sum", ``grad_output[i]`` for the recomputing backward of "none".

The specification in torch is ``reference.chunk_loss_and_grad``.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

INTERPRET = bool(getattr(triton.knobs.runtime, "interpret", False)) if hasattr(triton, "knobs") else False
#: widest column block; the interpreter uses narrow blocks so tests stream several per row
MAX_BLOCK_V = 128 if INTERPRET else 4096


@triton.jit
def _round_to(x, dtype: tl.constexpr, RNE_BF16: tl.constexpr):
    """fp32 -> ``dtype``, round to nearest even.  Under the interpreter Triton 3.9
    truncates fp32 -> bf16, so (RNE_BF16) the bits are rounded first and the cast is
    then exact."""
    if RNE_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        x = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _lce_rows_kernel(Z, stride_z, LABELS, T, stride_t, SCALE, stride_s, LOSS, ARGMAX, V, ignore_index,
                     SOFT: tl.constexpr, KL: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
                     RNE_BF16: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = Z + row * stride_z
    t_row = T + row * stride_t
    offs = tl.arange(0, BLOCK_V)

    m = tl.zeros([], tl.float32) + float("-inf")
    s = tl.zeros([], tl.float32)
    best = tl.zeros([], tl.float32) + float("-inf")
    best_idx = tl.zeros([], tl.int32)
    st = tl.zeros([], tl.float32)       # sum t
    stz = tl.zeros([], tl.float32)      # sum t (z - m)
    stlogt = tl.zeros([], tl.float32)   # sum xlogy(t, t)

    for start in range(0, V, BLOCK_V):
        cols = start + offs
        ok = cols < V
        x = tl.load(z_row + cols, mask=ok, other=float("-inf")).to(tl.float32)
        bm = tl.max(x, 0)
        bidx = tl.min(tl.where(x == bm, cols, V), 0)
        better = bm > best
        best_idx = tl.where(better, bidx, best_idx)
        best = tl.where(better, bm, best)
        m_new = tl.maximum(m, bm)
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), 0)
        if SOFT:
            t = tl.load(t_row + cols, mask=ok, other=0.0).to(tl.float32)
            grow = tl.where(m == float("-inf"), 0.0, m_new - m)
            stz = stz - st * grow + tl.sum(t * tl.where(ok, x - m_new, 0.0), 0)
            st = st + tl.sum(t, 0)
            if KL:
                stlogt = stlogt + tl.sum(t * tl.log(tl.where(t > 0.0, t, 1.0)), 0)
        m = m_new

    log_s = tl.log(s)
    lse = m + log_s
    if SOFT:
        loss = st * log_s - stz
        if KL:
            loss = loss + stlogt
        coef = tl.load(SCALE + row * stride_s).to(tl.float32)
        label = tl.zeros([], tl.int64) - 1
    else:
        label = tl.load(LABELS + row).to(tl.int64)
        valid = label != ignore_index
        in_range = (label >= 0) & (label < V)
        zl = tl.load(z_row + label, mask=valid & in_range, other=0.0).to(tl.float32)
        loss = tl.where(valid, tl.where(in_range, (m - zl) + log_s, float("nan")), 0.0)
        coef = tl.where(valid, tl.load(SCALE + row * stride_s).to(tl.float32), 0.0)
    tl.store(LOSS + row, loss)
    tl.store(ARGMAX + row, best_idx.to(tl.int64))

    if WRITE_GRAD:
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            ok = cols < V
            x = tl.load(z_row + cols, mask=ok, other=0.0).to(tl.float32)
            p = tl.exp(x - lse)
            if SOFT:
                t = tl.load(t_row + cols, mask=ok, other=0.0).to(tl.float32)
                g = (p * st - t) * coef
            else:
                g = (p - tl.where(cols == label, 1.0, 0.0)) * coef
            tl.store(z_row + cols, _round_to(g, Z.dtype.element_ty, RNE_BF16), mask=ok)


def block_v(v: int) -> int:
    return max(16, min(MAX_BLOCK_V, triton.next_power_of_2(v)))


def chunk_loss_and_grad(logits: Tensor, labels: Optional[Tensor], targets: Optional[Tensor], ignore_index: int,
                        kl: bool, scale: Tensor, write_grad: bool) -> tuple[Tensor, Tensor]:
    """Launch the row kernel on a chunk (the contract of ``reference.chunk_loss_and_grad``).

    logits (n,V) with unit column stride (overwritten by the gradient when
    ``write_grad``), labels (n,) int64 or targets (n,V) with unit column stride,
    scale (n,) or (1,) fp32.  Returns (loss (n,) fp32, argmax (n,) int64).
    """
    n, v = logits.shape
    loss = torch.empty(n, dtype=torch.float32, device=logits.device)
    argmax = torch.empty(n, dtype=torch.int64, device=logits.device)
    if n == 0:
        return loss, argmax
    soft = targets is not None
    bv = block_v(v)
    scale = scale.to(torch.float32)
    _lce_rows_kernel[(n,)](
        logits, logits.stride(0),
        loss if soft else labels,                 # LABELS (unused for soft targets)
        targets if soft else logits, targets.stride(0) if soft else 0,
        scale, scale.stride(0) if scale.numel() > 1 else 0,
        loss, argmax, v, int(ignore_index),
        SOFT=soft, KL=bool(kl), WRITE_GRAD=bool(write_grad), BLOCK_V=bv,
        RNE_BF16=INTERPRET and logits.dtype == torch.bfloat16,
        num_warps=8 if bv >= 2048 else 4)
    return loss, argmax
