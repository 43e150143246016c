"""LayerNorm and dropout + residual + LayerNorm in Triton: forward, backward, and the
deterministic column reduction shared with ``bias_gelu``.

Shapes: N rows of E features, row-major contiguous; M rows per block, BLOCK_E = E
rounded up to a power of two (a whole row lives in registers, statistics in fp32).

Forward (``_fwd_kernel``): one program per block of M rows.  With a residual it
forms ``prenorm = dropout(x) + residual`` in fp32, stores it in its dtype and
normalises the *stored* (rounded) value, so ``out == LayerNorm(prenorm)`` exactly as
the backward sees it; it saves the per-row mean and rstd (fp32).

Backward (``_bwd_kernel``): G programs, each owning a contiguous range of rows that it
walks M rows at a time: dx per row from the saved statistics (one read of x and dy),
and running fp32 sums of ``dy * xhat`` and ``dy`` kept in registers; each program
writes its partial dweight/dbias row to a (2, G, E) fp32 buffer and
``_col_sum_kernel`` adds the G rows in a fixed order.  No atomics: the gradients are
deterministic, and x and dy are read once (torch's CUDA LayerNorm backward reads them
twice, once for dx and once for dgamma/dbeta).

Dropout: element (row, col) uses Philox counter ``offset + row*E + col`` -- the C-order
index of the (..., E) input, i.e. ``vlfast.ops.dropout_add_layer_norm_keep_mask``.

bf16 under the interpreter: Triton 3.9's interpreter truncates fp32 -> bf16 casts, so
:func:`_cast` rounds to nearest even on the bits first (``RNE_BF16``), as the GPU does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from vlfast.kernels.dropout_mask.reference import dropout_threshold
from vlfast.kernels.dropout_mask.triton import philox_keep

MAX_HIDDEN = 16384  # a whole row in registers


@triton.jit
def _cast(x, dtype: tl.constexpr, RNE_BF16: tl.constexpr):
    """fp32 ``x`` to ``dtype``, rounding to nearest even (done on the bits for bf16 under
    the interpreter, whose own cast truncates)."""
    if RNE_BF16:
        if dtype == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = bits + 0x7FFF + ((bits >> 16) & 1)
            x = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _fwd_kernel(X, R, W, B, PRE, Y, MEAN, RSTD, n_rows, E, eps, seed, rng_offset, drop_thresh, keep_prob,
                HAS_RES: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr,
                RNE_BF16: tl.constexpr):
    # X, R, PRE, Y: (N, E); W, B: (E,); MEAN, RSTD: (N,) fp32
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_E)
    r_ok = rows < n_rows
    c_ok = cols < E
    ok = r_ok[:, None] & c_ok[None, :]
    offs = rows[:, None].to(tl.int64) * E + cols[None, :]
    x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_RES:
        if DROPOUT:
            keep = philox_keep(seed, rng_offset + offs, drop_thresh)
            x = tl.where(keep, x / keep_prob, 0.0)
        x = x + tl.load(R + offs, mask=ok, other=0.0).to(tl.float32)
        pre = _cast(x, PRE.dtype.element_ty, RNE_BF16)
        tl.store(PRE + offs, pre, mask=ok)
        x = tl.where(ok, pre.to(tl.float32), 0.0)
    mean = tl.sum(x, axis=1) / E
    xc = tl.where(ok, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / E
    rstd = 1.0 / tl.sqrt_rn(var + eps)
    w = tl.load(W + cols, mask=c_ok, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=c_ok, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :] + b[None, :]
    tl.store(Y + offs, _cast(y, Y.dtype.element_ty, RNE_BF16), mask=ok)
    tl.store(MEAN + rows, mean, mask=r_ok)
    tl.store(RSTD + rows, rstd, mask=r_ok)


@triton.jit
def _bwd_kernel(DY, DPRE, X, W, MEAN, RSTD, DX, DXD, DWP, DBP, n_rows, E, rows_per_prog,
                seed, rng_offset, drop_thresh, keep_prob,
                HAS_DPRE: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr,
                RNE_BF16: tl.constexpr):
    # DY, DPRE, X, DX, DXD: (N, E); W: (E,); MEAN, RSTD: (N,); DWP, DBP: (G, E) fp32 partial sums
    # DX = dL/dx (+ DPRE); with DROPOUT also DXD = DX * keep / keep_prob (the dropped input's grad)
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_E)
    c_ok = cols < E
    w = tl.load(W + cols, mask=c_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_M, BLOCK_E], tl.float32)
    db = tl.zeros([BLOCK_M, BLOCK_E], tl.float32)
    row0 = pid * rows_per_prog
    row_end = tl.minimum(row0 + rows_per_prog, n_rows)
    for start in range(row0, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        r_ok = rows < row_end
        ok = r_ok[:, None] & c_ok[None, :]
        offs = rows[:, None].to(tl.int64) * E + cols[None, :]
        x = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + rows, mask=r_ok, other=0.0)
        rstd = tl.load(RSTD + rows, mask=r_ok, other=0.0)
        xhat = tl.where(ok, (x - mean[:, None]) * rstd[:, None], 0.0)
        dy = tl.load(DY + offs, mask=ok, other=0.0).to(tl.float32)
        g = dy * w[None, :]
        c1 = tl.sum(g * xhat, axis=1) / E
        c2 = tl.sum(g, axis=1) / E
        dx = (g - c2[:, None] - xhat * c1[:, None]) * rstd[:, None]
        if HAS_DPRE:
            dx += tl.load(DPRE + offs, mask=ok, other=0.0).to(tl.float32)
        tl.store(DX + offs, _cast(dx, DX.dtype.element_ty, RNE_BF16), mask=ok)
        if DROPOUT:
            keep = philox_keep(seed, rng_offset + offs, drop_thresh)
            dxd = tl.where(keep, dx / keep_prob, 0.0)
            tl.store(DXD + offs, _cast(dxd, DXD.dtype.element_ty, RNE_BF16), mask=ok)
        dw += dy * xhat
        db += dy
    part = pid.to(tl.int64) * E + cols
    tl.store(DWP + part, tl.sum(dw, axis=0), mask=c_ok)
    tl.store(DBP + part, tl.sum(db, axis=0), mask=c_ok)


@triton.jit
def _col_sum_kernel(PART, OUT0, OUT1, G, E, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                    RNE_BF16: tl.constexpr):
    # PART: (K, G, E) fp32 partial sums, K = 1 or 2 (program_id(1)); OUT0/OUT1: (E,)
    # OUTk = sum over G of PART[k], always in the same order.
    k = tl.program_id(1)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = cols < E
    base = PART + k.to(tl.int64) * G * E
    acc = tl.zeros([BLOCK_G, BLOCK_N], tl.float32)
    for g0 in range(0, G, BLOCK_G):
        g = g0 + tl.arange(0, BLOCK_G)
        acc += tl.load(base + g[:, None].to(tl.int64) * E + cols[None, :], mask=(g < G)[:, None] & c_ok[None, :],
                       other=0.0)
    total = tl.sum(acc, axis=0)
    if k == 0:
        tl.store(OUT0 + cols, _cast(total, OUT0.dtype.element_ty, RNE_BF16), mask=c_ok)
    else:
        tl.store(OUT1 + cols, _cast(total, OUT1.dtype.element_ty, RNE_BF16), mask=c_ok)


# ----------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------

def _interpret() -> bool:
    return type(_fwd_kernel).__name__ == "InterpretedFunction"


@dataclass(frozen=True)
class RowConfig:
    """Launch parameters of the row kernels (starting points, not yet tuned on a GPU)."""
    block_e: int
    block_m: int
    num_warps: int
    programs: int  # backward programs G (each owns rows_per_prog rows)
    rows_per_prog: int


def row_config(n_rows: int, hidden: int, device: torch.device) -> RowConfig:
    """Block sizes for N rows of E features.

    GPU: about 4096 elements per block (E = 768 or 1024: 4 rows) with ~16 fp32 values
    per thread; the backward runs 4 programs per SM, each over a contiguous range of
    rows, so the partial dweight/dbias buffer stays small (4 * SMs * E fp32) against
    the N * E tensors it reads.  Interpreter: 4-row blocks and at most 3 backward
    programs, so tests exercise several programs and several blocks per program.
    """
    be = triton.next_power_of_2(max(1, hidden))
    blocks = lambda m: max(1, triton.cdiv(n_rows, m))  # noqa: E731
    if _interpret():
        bm, warps = 4, 1
        g = min(blocks(bm), 3)
    else:
        bm = max(1, min(16, 4096 // be))
        warps = max(1, min(16, (be * bm) // 512))
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
        g = min(blocks(bm), 4 * sms)
    rpp = triton.cdiv(blocks(bm), g) * bm
    g = max(1, triton.cdiv(max(n_rows, 1), rpp))
    return RowConfig(be, bm, warps, g, rpp)


def _rne(*dtypes: torch.dtype) -> bool:
    return _interpret() and torch.bfloat16 in dtypes


def _rng_args(dropout_p: float, seed: int, offset: int) -> tuple[int, int, int, float]:
    if dropout_p <= 0.0:
        return 0, 0, 0, 1.0
    return seed, offset, dropout_threshold(dropout_p), 1.0 - dropout_p


def col_sum(part: Tensor, outs: tuple[Tensor, ...]) -> None:
    """outs[k] = part[k].sum(0) for part (K, G, E) fp32 contiguous, K = len(outs) in {1, 2};
    each out (E,) in its own dtype.  Fixed order: deterministic."""
    K, G, E = part.shape
    if E == 0:
        return
    o0 = outs[0]
    o1 = outs[1] if K == 2 else outs[0]
    block_n = 32 if _interpret() else 256
    block_g = min(32 if _interpret() else 16, triton.next_power_of_2(max(G, 1)))
    grid = (triton.cdiv(E, block_n), K)
    _col_sum_kernel[grid](part, o0, o1, G, E, BLOCK_G=block_g, BLOCK_N=block_n,
                          RNE_BF16=_rne(o0.dtype, o1.dtype), num_warps=4)


def forward(x: Tensor, residual: Optional[Tensor], weight: Tensor, bias: Tensor, eps: float, dropout_p: float,
            seed: int, offset: int, out_dtype: torch.dtype) -> tuple[Tensor, Optional[Tensor], Tensor, Tensor]:
    """x, residual (N, E) contiguous; returns out (N, E) in ``out_dtype``, prenorm (N, E) in
    the promoted dtype of x and residual (None without a residual), mean and rstd (N,) fp32."""
    N, E = x.shape
    cfg = row_config(N, E, x.device)
    out = torch.empty((N, E), dtype=out_dtype, device=x.device)
    mean = torch.empty(N, dtype=torch.float32, device=x.device)
    rstd = torch.empty(N, dtype=torch.float32, device=x.device)
    pre = None
    if residual is not None:
        pre = torch.empty((N, E), dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)
    if N == 0:
        return out, pre, mean, rstd
    s, off, thr, kp = _rng_args(dropout_p if residual is not None else 0.0, seed, offset)
    grid = (triton.cdiv(N, cfg.block_m),)
    _fwd_kernel[grid](x, residual if residual is not None else x, weight, bias, pre if pre is not None else out,
                      out, mean, rstd, N, E, float(eps), s, off, thr, kp,
                      HAS_RES=residual is not None, DROPOUT=residual is not None and dropout_p > 0.0,
                      BLOCK_M=cfg.block_m, BLOCK_E=cfg.block_e,
                      RNE_BF16=_rne(out_dtype, pre.dtype if pre is not None else out_dtype),
                      num_warps=cfg.num_warps)
    return out, pre, mean, rstd


def backward(dout: Tensor, dprenorm: Optional[Tensor], x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor,
             dropout_p: float, seed: int, offset: int, dx_dtype: torch.dtype, dxd_dtype: Optional[torch.dtype],
             bias_dtype: torch.dtype) -> tuple[Tensor, Optional[Tensor], Tensor, Tensor]:
    """Gradients of LayerNorm(x) (x: the normalised input, (N, E) contiguous).

    Returns dx (N, E) in ``dx_dtype`` (= dL/dx + dprenorm), dxd (N, E) in ``dxd_dtype``
    (= dx * keep / (1 - p), only when ``dropout_p > 0``, else None), dweight (E,) in
    weight's dtype and dbias (E,) in ``bias_dtype``."""
    N, E = x.shape
    dev = x.device
    cfg = row_config(N, E, dev)
    dx = torch.empty((N, E), dtype=dx_dtype, device=dev)
    dropout = dropout_p > 0.0
    dxd = torch.empty((N, E), dtype=dxd_dtype, device=dev) if dropout else None
    dw = torch.empty(E, dtype=weight.dtype, device=dev)
    db = torch.empty(E, dtype=bias_dtype, device=dev)
    if N == 0:
        return dx, dxd, dw.zero_(), db.zero_()
    part = torch.empty((2, cfg.programs, E), dtype=torch.float32, device=dev)
    s, off, thr, kp = _rng_args(dropout_p, seed, offset)
    _bwd_kernel[(cfg.programs,)](dout, dprenorm if dprenorm is not None else dout, x, weight, mean, rstd, dx,
                                 dxd if dxd is not None else dx, part[0], part[1], N, E, cfg.rows_per_prog,
                                 s, off, thr, kp,
                                 HAS_DPRE=dprenorm is not None, DROPOUT=dropout, BLOCK_M=cfg.block_m,
                                 BLOCK_E=cfg.block_e, RNE_BF16=_rne(dx_dtype, dxd_dtype or dx_dtype),
                                 num_warps=cfg.num_warps)
    col_sum(part, (dw, db))
    return dx, dxd, dw, db
