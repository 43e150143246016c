"""Bias + erf GELU in Triton: forward and backward (dx and dbias).

Shapes: x (N, E) row-major contiguous, bias (E,); tiles of M rows x BLOCK_N columns.

Forward (``_fwd_kernel``): one program per tile, ``y = gelu(x + bias)`` in fp32
(``0.5 h (1 + erf(h / sqrt 2))``), stored in the output dtype.

Backward (``_bwd_kernel``): grid (G row ranges, column blocks); each program walks
its contiguous row range M rows at a time, stores ``dx = dy * gelu'(x + bias)`` and
keeps a running fp32 sum of dx for its columns; the (G, E) partial sums are added in
a fixed order by the LayerNorm module's ``col_sum`` -- no atomics, deterministic.
Nothing is saved by the forward but its inputs: the backward recomputes ``x + bias``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from vlfast.kernels.layer_norm.triton import _cast, col_sum

INV_SQRT2 = tl.constexpr(0.7071067811865476)  # constexpr: a kernel may read no plain Python global
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _fwd_kernel(X, BIAS, Y, n_rows, E, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RNE_BF16: tl.constexpr):
    # X, Y: (N, E); BIAS: (E,)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = cols < E
    ok = (rows < n_rows)[:, None] & c_ok[None, :]
    offs = rows[:, None].to(tl.int64) * E + cols[None, :]
    h = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32) \
        + tl.load(BIAS + cols, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    y = 0.5 * h * (1.0 + tl.math.erf(h * INV_SQRT2))
    tl.store(Y + offs, _cast(y, Y.dtype.element_ty, RNE_BF16), mask=ok)


@triton.jit
def _bwd_kernel(DY, X, BIAS, DX, DBP, n_rows, E, rows_per_prog,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, RNE_BF16: tl.constexpr):
    # DY, X, DX: (N, E); BIAS: (E,); DBP: (G, E) fp32 partial sums of DX over each row range
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = cols < E
    bias = tl.load(BIAS + cols, mask=c_ok, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    row0 = pid * rows_per_prog
    row_end = tl.minimum(row0 + rows_per_prog, n_rows)
    for start in range(row0, row_end, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        ok = (rows < row_end)[:, None] & c_ok[None, :]
        offs = rows[:, None].to(tl.int64) * E + cols[None, :]
        h = tl.load(X + offs, mask=ok, other=0.0).to(tl.float32) + bias[None, :]
        dy = tl.load(DY + offs, mask=ok, other=0.0).to(tl.float32)
        grad = 0.5 * (1.0 + tl.math.erf(h * INV_SQRT2)) + h * tl.exp(-0.5 * h * h) * INV_SQRT_2PI
        dx = tl.where(ok, dy * grad, 0.0)
        tl.store(DX + offs, _cast(dx, DX.dtype.element_ty, RNE_BF16), mask=ok)
        acc += dx
    tl.store(DBP + pid.to(tl.int64) * E + cols, tl.sum(acc, axis=0), mask=c_ok)


def _interpret() -> bool:
    return type(_fwd_kernel).__name__ == "InterpretedFunction"


@dataclass(frozen=True)
class TileConfig:
    """Launch parameters (starting points, not yet tuned on a GPU)."""
    block_m: int
    block_n: int
    num_warps: int
    programs: int  # backward row ranges G
    rows_per_prog: int


def tile_config(n_rows: int, hidden: int, device: torch.device) -> TileConfig:
    """GPU: 16 x 256 tiles (4096 elements, 16 per thread with 8 warps); the backward
    splits the rows into about 4 programs per SM in total over the column blocks.
    Interpreter: 8 x 32 tiles and at most 3 row ranges."""
    col_blocks = lambda bn: triton.cdiv(max(hidden, 1), bn)  # noqa: E731
    if _interpret():
        bm, bn, warps = 8, 32, 1
        g = 3
    else:
        bn = min(256, triton.next_power_of_2(max(hidden, 1)))
        bm = max(1, 4096 // bn)
        warps = 8
        sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
        g = max(1, (4 * sms) // col_blocks(bn))
    row_blocks = max(1, triton.cdiv(n_rows, bm))
    g = min(g, row_blocks)
    rpp = triton.cdiv(row_blocks, g) * bm
    g = max(1, triton.cdiv(max(n_rows, 1), rpp))
    return TileConfig(bm, bn, warps, g, rpp)


def _rne(*dtypes: torch.dtype) -> bool:
    return _interpret() and torch.bfloat16 in dtypes


def forward(x: Tensor, bias: Tensor) -> Tensor:
    """gelu(x + bias): x (N, E) contiguous, bias (E,) -> (N, E) in their promoted dtype."""
    N, E = x.shape
    out = torch.empty((N, E), dtype=torch.promote_types(x.dtype, bias.dtype), device=x.device)
    if N == 0:
        return out
    cfg = tile_config(N, E, x.device)
    grid = (triton.cdiv(N, cfg.block_m), triton.cdiv(E, cfg.block_n))
    _fwd_kernel[grid](x, bias, out, N, E, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, RNE_BF16=_rne(out.dtype),
                      num_warps=cfg.num_warps)
    return out


def backward(dout: Tensor, x: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """dx (N, E) in x's dtype and dbias (E,) in bias's dtype; all inputs contiguous."""
    N, E = x.shape
    dx = torch.empty_like(x)
    dbias = torch.empty_like(bias)
    if N == 0:
        return dx, dbias.zero_()
    cfg = tile_config(N, E, x.device)
    part = torch.empty((1, cfg.programs, E), dtype=torch.float32, device=x.device)
    grid = (cfg.programs, triton.cdiv(E, cfg.block_n))
    _bwd_kernel[grid](dout, x, bias, dx, part, N, E, cfg.rows_per_prog, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                      RNE_BF16=_rne(dx.dtype), num_warps=cfg.num_warps)
    col_sum(part, (dbias,))
    return dx, dbias
