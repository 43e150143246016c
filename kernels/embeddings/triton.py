"""Triton kernels of the embedding ops: one row kernel (forward and backward), specialised
by constexpr flags per op, and a deterministic segment reduction for the tables.

Per row r of the N = B*L output rows (E columns, one block of BLOCK_E >= E):

    x1  = X1[r]  (relu, then * MASK1[r], when asked; its own LayerNorm LN1 when asked)
    x2  = X2[r]  (its own LayerNorm LN2 when asked)
    s   = ROW + x1 + x2 + mean_j(APOS[ALIGN[r, j]]) + T0[ID0[r]] + T1[ID1[r]] + T2[ID2[r]]
    out = dropout(LN(s))             (every term optional)

with fp32 math, the LayerNorm statistics (mean, rstd) of LN, LN1, LN2 saved per row.

The backward recomputes s from the inputs (no (N,E) pre-norm tensor is saved), applies
the dropout mask and the LayerNorm backward, and writes ``ds = dL/ds`` (fp32, (N,E)) when
a table needs it, dX1/dX2 through their LayerNorms/ReLU, and per-program partial sums of
the LayerNorm weight/bias and ROW gradients (summed on the host: deterministic).

Table gradients: ``table_grad`` sorts the ids (stable), and one program per run of equal
ids sums the rows of ``ds`` of that run in sorted order (blocks of BLOCK_R rows, a
tree sum each) and writes the table row.  No atomics: the result is the same bit for
bit from run to run.  The ``padding_idx`` row (and ``-1`` entries of an alignment) get
no gradient.

Dropout: output element (r, c) uses Philox counter ``offset + r*E + c`` (C order of the
(B,L,E) output), the same as ``vlfast.ops.keep_mask``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from vlfast.kernels.dropout_mask.reference import dropout_threshold
from vlfast.kernels.dropout_mask.triton import philox_keep

MAX_HIDDEN = 8192


@triton.jit
def _to(x, dtype: tl.constexpr, ROUND_BF16: tl.constexpr):
    """fp32 -> dtype rounding to nearest even.  Triton 3.9's interpreter truncates
    fp32 -> bf16, so there (ROUND_BF16) the rounding is done on the bits first."""
    if ROUND_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        x = ((bits >> 16) << 16).to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _ln_stats(x, cm, E, eps):
    """Row mean and rstd of x [BM, BE] over the E real columns (cm)."""
    mean = tl.sum(x, 1) / E
    xc = tl.where(cm[None, :], x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, 1) / E
    return mean, 1.0 / tl.sqrt(var + eps)


@triton.jit
def _gather(T, ID, rows, rm, cols, cm, E):
    ids = tl.load(ID + rows, mask=rm, other=0).to(tl.int64)
    return tl.load(T + ids[:, None] * E + cols[None, :], mask=rm[:, None] & cm[None, :], other=0.0).to(tl.float32)


@triton.jit
def _terms(rows, rm, cols, cm, E, A, eps,
           X1, MASK1, G1, B1, X2, G2, B2, ROW, ALIGN, APOS, ID0, T0, ID1, T1, ID2, T2,
           HAS_X1: tl.constexpr, LN1: tl.constexpr, RELU1: tl.constexpr, HAS_MASK1: tl.constexpr,
           HAS_X2: tl.constexpr, LN2: tl.constexpr, HAS_ROW: tl.constexpr, HAS_ALIGN: tl.constexpr,
           NT: tl.constexpr):
    """The pre-norm sum s [BM, BE] (fp32, 0 outside the block), and what the backward
    needs: x1 before its LayerNorm (after relu/mask), its stats, x2 and its stats."""
    m2 = rm[:, None] & cm[None, :]
    off = rows[:, None].to(tl.int64) * E + cols[None, :]
    s = tl.zeros(m2.shape, tl.float32)
    x1 = s
    x2 = s
    mean1 = tl.zeros(rows.shape, tl.float32)
    rstd1 = mean1
    mean2 = mean1
    rstd2 = mean1
    if HAS_ROW:
        s += tl.load(ROW + cols, mask=cm, other=0.0).to(tl.float32)[None, :]
    if HAS_X1:
        x1 = tl.load(X1 + off, mask=m2, other=0.0).to(tl.float32)
        if RELU1:
            x1 = tl.maximum(x1, 0.0)
        if HAS_MASK1:
            keep1 = tl.load(MASK1 + rows, mask=rm, other=0) != 0
            x1 = tl.where(keep1[:, None], x1, 0.0)
        if LN1:
            mean1, rstd1 = _ln_stats(x1, cm, E, eps)
            g1 = tl.load(G1 + cols, mask=cm, other=0.0).to(tl.float32)
            b1 = tl.load(B1 + cols, mask=cm, other=0.0).to(tl.float32)
            s += (x1 - mean1[:, None]) * rstd1[:, None] * g1[None, :] + b1[None, :]
        else:
            s += x1
    if HAS_X2:
        x2 = tl.load(X2 + off, mask=m2, other=0.0).to(tl.float32)
        if LN2:
            mean2, rstd2 = _ln_stats(x2, cm, E, eps)
            g2 = tl.load(G2 + cols, mask=cm, other=0.0).to(tl.float32)
            b2 = tl.load(B2 + cols, mask=cm, other=0.0).to(tl.float32)
            s += (x2 - mean2[:, None]) * rstd2[:, None] * g2[None, :] + b2[None, :]
        else:
            s += x2
    if HAS_ALIGN:
        acc = tl.zeros(m2.shape, tl.float32)
        cnt = tl.zeros(rows.shape, tl.float32)
        for j in range(A):
            a = tl.load(ALIGN + rows.to(tl.int64) * A + j, mask=rm, other=-1).to(tl.int64)
            real = a != -1
            acc += tl.load(APOS + tl.maximum(a, 0)[:, None] * E + cols[None, :],
                           mask=(rm & real)[:, None] & cm[None, :], other=0.0).to(tl.float32)
            cnt += real.to(tl.float32)
        s += acc / tl.maximum(cnt, 1.0)[:, None]
    if NT >= 1:
        s += _gather(T0, ID0, rows, rm, cols, cm, E)
    if NT >= 2:
        s += _gather(T1, ID1, rows, rm, cols, cm, E)
    if NT >= 3:
        s += _gather(T2, ID2, rows, rm, cols, cm, E)
    s = tl.where(m2, s, 0.0)
    return s, x1, mean1, rstd1, x2, mean2, rstd2


@triton.jit
def _emb_fwd_kernel(OUT, STATS,
                    X1, MASK1, G1, B1, X2, G2, B2, ROW, ALIGN, APOS, ID0, T0, ID1, T1, ID2, T2, G, B,
                    N, E, A, eps, seed, offset, thresh, drop_scale,
                    HAS_X1: tl.constexpr, LN1: tl.constexpr, RELU1: tl.constexpr, HAS_MASK1: tl.constexpr,
                    HAS_X2: tl.constexpr, LN2: tl.constexpr, HAS_ROW: tl.constexpr, HAS_ALIGN: tl.constexpr,
                    NT: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr,
                    ROUND_BF16: tl.constexpr):
    # OUT (N,E); STATS (6,N) fp32: mean, rstd of LN, LN1, LN2.
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_E)
    rm = rows < N
    cm = cols < E
    s, x1, mean1, rstd1, x2, mean2, rstd2 = _terms(
        rows, rm, cols, cm, E, A, eps, X1, MASK1, G1, B1, X2, G2, B2, ROW, ALIGN, APOS, ID0, T0, ID1, T1, ID2, T2,
        HAS_X1, LN1, RELU1, HAS_MASK1, HAS_X2, LN2, HAS_ROW, HAS_ALIGN, NT)
    mean, rstd = _ln_stats(s, cm, E, eps)
    g = tl.load(G + cols, mask=cm, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=cm, other=0.0).to(tl.float32)
    y = (s - mean[:, None]) * rstd[:, None] * g[None, :] + b[None, :]
    off = rows[:, None].to(tl.int64) * E + cols[None, :]
    if DROPOUT:
        keep = philox_keep(seed, offset + off, thresh)
        y = tl.where(keep, y * drop_scale, 0.0)
    tl.store(OUT + off, _to(y, OUT.dtype.element_ty, ROUND_BF16), mask=rm[:, None] & cm[None, :])
    tl.store(STATS + rows, mean, mask=rm)
    tl.store(STATS + N + rows, rstd, mask=rm)
    tl.store(STATS + 2 * N + rows, mean1, mask=rm)
    tl.store(STATS + 3 * N + rows, rstd1, mask=rm)
    tl.store(STATS + 4 * N + rows, mean2, mask=rm)
    tl.store(STATS + 5 * N + rows, rstd2, mask=rm)


@triton.jit
def _ln_bwd(dy, xhat, rstd, g, cm, E):
    """dx of y = xhat * g + b given dy (rows x cols), xhat and rstd."""
    wdy = tl.where(cm[None, :], dy * g[None, :], 0.0)
    c1 = tl.sum(xhat * wdy, 1) / E
    c2 = tl.sum(wdy, 1) / E
    return (wdy - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]


@triton.jit
def _emb_bwd_kernel(DOUT, STATS, DS, DX1, DX2, PART,
                    X1, MASK1, G1, B1, X2, G2, B2, ROW, ALIGN, APOS, ID0, T0, ID1, T1, ID2, T2, G, B,
                    N, E, A, eps, seed, offset, thresh, drop_scale, n_blocks,
                    HAS_X1: tl.constexpr, LN1: tl.constexpr, RELU1: tl.constexpr, HAS_MASK1: tl.constexpr,
                    HAS_X2: tl.constexpr, LN2: tl.constexpr, HAS_ROW: tl.constexpr, HAS_ALIGN: tl.constexpr,
                    NT: tl.constexpr, WRITE_DS: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_E: tl.constexpr, ROUND_BF16: tl.constexpr):
    # PART (P, 7, E) fp32 partial sums of this program: dG, dB, dG1, dB1, dG2, dB2, dROW.
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    cols = tl.arange(0, BLOCK_E)
    cm = cols < E
    g = tl.load(G + cols, mask=cm, other=0.0).to(tl.float32)
    acc_g = tl.zeros([BLOCK_E], tl.float32)
    acc_b = tl.zeros([BLOCK_E], tl.float32)
    acc_g1 = tl.zeros([BLOCK_E], tl.float32)
    acc_b1 = tl.zeros([BLOCK_E], tl.float32)
    acc_g2 = tl.zeros([BLOCK_E], tl.float32)
    acc_b2 = tl.zeros([BLOCK_E], tl.float32)
    acc_row = tl.zeros([BLOCK_E], tl.float32)
    for blk in range(pid, n_blocks, nprog):
        rows = blk * BLOCK_M + tl.arange(0, BLOCK_M)
        rm = rows < N
        m2 = rm[:, None] & cm[None, :]
        off = rows[:, None].to(tl.int64) * E + cols[None, :]
        s, x1, mean1, rstd1, x2, mean2, rstd2 = _terms(
            rows, rm, cols, cm, E, A, eps, X1, MASK1, G1, B1, X2, G2, B2, ROW, ALIGN, APOS, ID0, T0, ID1, T1,
            ID2, T2, HAS_X1, LN1, RELU1, HAS_MASK1, HAS_X2, LN2, HAS_ROW, HAS_ALIGN, NT)
        mean = tl.load(STATS + rows, mask=rm, other=0.0)
        rstd = tl.load(STATS + N + rows, mask=rm, other=0.0)
        xhat = tl.where(m2, (s - mean[:, None]) * rstd[:, None], 0.0)
        dy = tl.load(DOUT + off, mask=m2, other=0.0).to(tl.float32)
        if DROPOUT:
            keep = philox_keep(seed, offset + off, thresh)
            dy = tl.where(keep, dy * drop_scale, 0.0)
        acc_g += tl.sum(dy * xhat, 0)
        acc_b += tl.sum(dy, 0)
        ds = tl.where(m2, _ln_bwd(dy, xhat, rstd, g, cm, E), 0.0)
        if WRITE_DS:
            tl.store(DS + off, ds, mask=m2)
        if HAS_ROW:
            acc_row += tl.sum(ds, 0)
        if HAS_X1:
            if LN1:
                xh1 = tl.where(m2, (x1 - mean1[:, None]) * rstd1[:, None], 0.0)
                acc_g1 += tl.sum(ds * xh1, 0)
                acc_b1 += tl.sum(ds, 0)
                g1 = tl.load(G1 + cols, mask=cm, other=0.0).to(tl.float32)
                dx1 = _ln_bwd(ds, xh1, rstd1, g1, cm, E)
            else:
                dx1 = ds
            if HAS_MASK1:
                keep1 = tl.load(MASK1 + rows, mask=rm, other=0) != 0
                dx1 = tl.where(keep1[:, None], dx1, 0.0)
            if RELU1:
                raw = tl.load(X1 + off, mask=m2, other=0.0).to(tl.float32)
                dx1 = tl.where(raw > 0.0, dx1, 0.0)
            tl.store(DX1 + off, _to(dx1, DX1.dtype.element_ty, ROUND_BF16), mask=m2)
        if HAS_X2:
            if LN2:
                xh2 = tl.where(m2, (x2 - mean2[:, None]) * rstd2[:, None], 0.0)
                acc_g2 += tl.sum(ds * xh2, 0)
                acc_b2 += tl.sum(ds, 0)
                g2 = tl.load(G2 + cols, mask=cm, other=0.0).to(tl.float32)
                dx2 = _ln_bwd(ds, xh2, rstd2, g2, cm, E)
            else:
                dx2 = ds
            tl.store(DX2 + off, _to(dx2, DX2.dtype.element_ty, ROUND_BF16), mask=m2)
    base = PART + pid.to(tl.int64) * 7 * E
    tl.store(base + cols, acc_g, mask=cm)
    tl.store(base + E + cols, acc_b, mask=cm)
    tl.store(base + 2 * E + cols, acc_g1, mask=cm)
    tl.store(base + 3 * E + cols, acc_b1, mask=cm)
    tl.store(base + 4 * E + cols, acc_g2, mask=cm)
    tl.store(base + 5 * E + cols, acc_b2, mask=cm)
    tl.store(base + 6 * E + cols, acc_row, mask=cm)


@triton.jit
def _segment_sum_kernel(SID, PERM, DS, CNT, DW, NS, E, GROUP, skip,
                        HAS_CNT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_E: tl.constexpr,
                        ROUND_BF16: tl.constexpr):
    """DW[id] = sum over the sorted entries i with SID[i] == id of DS[PERM[i] // GROUP]
    (divided by CNT[row] when HAS_CNT), for the program whose entry starts a run."""
    i = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_E + tl.arange(0, BLOCK_E)
    cm = cols < E
    sid = tl.load(SID + i)
    prev = tl.load(SID + tl.maximum(i - 1, 0))
    if ((i == 0) | (prev != sid)) & (sid != skip):
        acc = tl.zeros([BLOCK_E], tl.float32)
        j = i
        more = j < NS
        while more:
            r = j + tl.arange(0, BLOCK_R)
            ids = tl.load(SID + r, mask=r < NS, other=-3)
            sel = (r < NS) & (ids == sid)
            src = tl.load(PERM + r, mask=sel, other=0).to(tl.int64) // GROUP
            d = tl.load(DS + src[:, None] * E + cols[None, :], mask=sel[:, None] & cm[None, :], other=0.0)
            if HAS_CNT:
                d = d / tl.load(CNT + src, mask=sel, other=1.0)[:, None]
            acc += tl.sum(d, 0)
            j += BLOCK_R
            more = (j < NS) & (tl.sum(sel.to(tl.int32), 0) == BLOCK_R)
        tl.store(DW + sid.to(tl.int64) * E + cols, _to(acc, DW.dtype.element_ty, ROUND_BF16), mask=cm)


# ----------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------

def _interpret() -> bool:
    return type(_emb_fwd_kernel).__name__ == "InterpretedFunction"


@dataclass
class RowProblem:
    """One embedding problem in kernel terms (see the module docstring).

    All dense tensors are (N,E) contiguous; ids (N,) contiguous integer; align (N,A);
    mask1 (N,) uint8; tables (V,E) contiguous; row (E,) contiguous."""
    N: int
    E: int
    dtype: torch.dtype
    device: torch.device
    g: Tensor
    b: Tensor
    x1: Optional[Tensor] = None
    ln1: Optional[tuple[Tensor, Tensor]] = None
    relu1: bool = False
    mask1: Optional[Tensor] = None
    x2: Optional[Tensor] = None
    ln2: Optional[tuple[Tensor, Tensor]] = None
    row: Optional[Tensor] = None
    align: Optional[Tensor] = None
    apos: Optional[Tensor] = None
    tables: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # (ids (N,), weight (V,E))


def _block_e(E: int) -> int:
    return max(16, triton.next_power_of_2(E))


def _block_m(E: int, interpret: bool) -> int:
    if interpret:
        return 16
    return max(1, min(16, 4096 // _block_e(E)))


def _warps(E: int) -> int:
    be = _block_e(E)
    return 4 if be <= 1024 else 8


def _rng(dropout_p: float, seed: int, offset: int) -> tuple[int, int, int, float]:
    if dropout_p <= 0.0:
        return 0, 0, 0, 1.0
    return seed, offset, dropout_threshold(dropout_p), 1.0 / (1.0 - dropout_p)


def _ptr_args(p: RowProblem) -> tuple:
    d = p.g  # dummy pointer for absent inputs (never read)
    t = list(p.tables) + [(d, d)] * (3 - len(p.tables))
    return (d if p.x1 is None else p.x1, d if p.mask1 is None else p.mask1,
            *(p.ln1 if p.ln1 is not None else (d, d)), d if p.x2 is None else p.x2,
            *(p.ln2 if p.ln2 is not None else (d, d)), d if p.row is None else p.row,
            d if p.align is None else p.align, d if p.apos is None else p.apos,
            t[0][0], t[0][1], t[1][0], t[1][1], t[2][0], t[2][1], p.g, p.b)


def _flags(p: RowProblem) -> dict:
    return dict(HAS_X1=p.x1 is not None, LN1=p.ln1 is not None, RELU1=p.relu1, HAS_MASK1=p.mask1 is not None,
                HAS_X2=p.x2 is not None, LN2=p.ln2 is not None, HAS_ROW=p.row is not None,
                HAS_ALIGN=p.align is not None, NT=len(p.tables))


def _round(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and _interpret()


def forward(p: RowProblem, eps: float, dropout_p: float, seed: int, offset: int) -> tuple[Tensor, Tensor]:
    """out (N,E) in p.dtype and stats (6,N) fp32."""
    out = torch.empty(p.N, p.E, dtype=p.dtype, device=p.device)
    stats = torch.zeros(6, p.N, dtype=torch.float32, device=p.device)
    if p.N == 0:
        return out, stats
    interp = _interpret()
    bm = _block_m(p.E, interp)
    A = 0 if p.align is None else p.align.shape[1]
    _emb_fwd_kernel[(triton.cdiv(p.N, bm),)](
        out, stats, *_ptr_args(p), p.N, p.E, A, float(eps), *_rng(dropout_p, seed, offset),
        **_flags(p), DROPOUT=dropout_p > 0.0, BLOCK_M=bm, BLOCK_E=_block_e(p.E), ROUND_BF16=_round(p.dtype),
        num_warps=_warps(p.E))
    return out, stats


def _num_programs(n_blocks: int, device: torch.device, interpret: bool) -> int:
    if interpret:
        return min(n_blocks, 4)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_blocks, 4 * sms))


@dataclass
class Grads:
    """Gradients of one backward: ds (N,E) fp32 (None unless tables/align), dx1, dx2,
    and the summed LayerNorm/row parameter gradients (fp32, (E,) each)."""
    ds: Optional[Tensor]
    dx1: Optional[Tensor]
    dx2: Optional[Tensor]
    dg: Tensor
    db: Tensor
    dg1: Tensor
    db1: Tensor
    dg2: Tensor
    db2: Tensor
    drow: Tensor


def backward(p: RowProblem, dout: Tensor, stats: Tensor, eps: float, dropout_p: float, seed: int,
             offset: int) -> Grads:
    interp = _interpret()
    bm = _block_m(p.E, interp)
    n_blocks = triton.cdiv(p.N, bm)
    write_ds = bool(p.tables) or p.align is not None
    dev = p.device
    ds = torch.empty(p.N, p.E, dtype=torch.float32, device=dev) if write_ds else None
    dx1 = torch.empty(p.N, p.E, dtype=p.x1.dtype, device=dev) if p.x1 is not None else None
    dx2 = torch.empty(p.N, p.E, dtype=p.x2.dtype, device=dev) if p.x2 is not None else None
    if p.N == 0:
        z = torch.zeros(p.E, dtype=torch.float32, device=dev)
        return Grads(ds, dx1, dx2, *(z.clone() for _ in range(7)))
    P = _num_programs(n_blocks, dev, interp)
    part = torch.empty(P, 7, p.E, dtype=torch.float32, device=dev)
    d = p.g
    _emb_bwd_kernel[(P,)](
        dout.contiguous(), stats, d if ds is None else ds, d if dx1 is None else dx1, d if dx2 is None else dx2,
        part, *_ptr_args(p), p.N, p.E, 0 if p.align is None else p.align.shape[1], float(eps),
        *_rng(dropout_p, seed, offset), n_blocks, **_flags(p), WRITE_DS=write_ds, DROPOUT=dropout_p > 0.0,
        BLOCK_M=bm, BLOCK_E=_block_e(p.E), ROUND_BF16=_round(p.dtype), num_warps=_warps(p.E))
    tot = part.sum(0)
    return Grads(ds, dx1, dx2, *(t.clone() for t in tot.unbind(0)))


def table_grad(ids: Tensor, ds: Tensor, num_rows: int, dtype: torch.dtype, *, skip: Optional[int] = None,
               group: int = 1, count: Optional[Tensor] = None) -> Tensor:
    """Deterministic gradient of a gathered table: (num_rows, E) in ``dtype`` with
    ``dW[v] = sum_{i: ids[i] == v} ds[i // group] (/ count[i // group])``, entries equal
    to ``skip`` left out.  ids (N*group,) integer; ds (N,E) fp32; count (N,) fp32."""
    E = ds.shape[1]
    dw = torch.zeros(num_rows, E, dtype=dtype, device=ds.device)
    n = ids.numel()
    if n == 0 or num_rows == 0:
        return dw
    sid, perm = torch.sort(ids.reshape(-1), stable=True)
    be = min(_block_e(E), 1024)
    _segment_sum_kernel[(n, triton.cdiv(E, be))](
        sid, perm, ds, ds if count is None else count, dw, n, E, group, -1 if skip is None else int(skip),
        HAS_CNT=count is not None, BLOCK_R=16 if _interpret() else 32, BLOCK_E=be, ROUND_BF16=_round(dtype),
        num_warps=4)
    return dw
