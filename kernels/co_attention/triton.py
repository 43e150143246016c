"""Co-attention in Triton: both directions of ViLBERT's co-attentional layer in one
launch per pass.

Problem A is ``ctx_t = attention(q_t, k_v, v_v, v_mask)`` and problem B is
``ctx_v = attention(q_v, k_t, v_t, t_mask)``.  Each kernel's grid is
(query or key blocks of A + those of B, B*H); a program runs the tile body of
``vlfast.kernels.attention.triton`` for the problem its block index falls in, so
one launch covers both directions (forward: 1 launch, backward: 2).

Dropout counters: A uses ``offset + ((b*H+h)*Lt+i)*Lv+j``, B uses
``offset + B*H*Lt*Lv + ((b*H+h)*Lv+i)*Lt+j`` (B's keep-mask follows A's in one
Philox stream).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from vlfast.kernels.attention import triton as at
from vlfast.kernels.attention.triton import _bwd_dkdv_tile, _bwd_dq_tile, _fwd_tile

# ----------------------------------------------------------------------------------
# Kernels (parameter lists: problem A, problem B, then what both share)
# ----------------------------------------------------------------------------------


@triton.jit
def _co_fwd_kernel(
        Q_a, K_a, V_a, O_a, LSE_a, KMASK_a, CU_Q_a, CU_K_a, sqb_a, sqh_a, sqm_a, sqd_a, skb_a, skh_a, skn_a,
        skd_a, svb_a, svh_a, svn_a, svd_a, sob_a, soh_a, som_a, sod_a, slb_a, slh_a, slm_a, skmb_a, skmn_a,
        LQ_a, LK_a, rng_offset_a, Q_b, K_b, V_b, O_b, LSE_b, KMASK_b, CU_Q_b, CU_K_b, sqb_b, sqh_b, sqm_b,
        sqd_b, skb_b, skh_b, skn_b, skd_b, svb_b, svh_b, svn_b, svd_b, sob_b, soh_b, som_b, sod_b, slb_b,
        slh_b, slm_b, skmb_b, skmn_b, LQ_b, LK_b, rng_offset_b, NB_A, H, D, sm_scale, seed, drop_thresh,
        drop_scale, HAS_MASK_A: tl.constexpr, HAS_MASK_B: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_M:
        tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    if pid < NB_A:
        _fwd_tile(pid, b, h, Q_a, K_a, V_a, O_a, LSE_a, KMASK_a, CU_Q_a, CU_K_a, sqb_a, sqh_a, sqm_a, sqd_a,
            skb_a, skh_a, skn_a, skd_a, svb_a, svh_a, svn_a, svd_a, sob_a, soh_a, som_a, sod_a, slb_a, slh_a,
            slm_a, skmb_a, skmn_a, H, LQ_a, LK_a, D, sm_scale, seed, rng_offset_a, drop_thresh, drop_scale,
            HAS_MASK_A, False, DROPOUT, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PREC)
    else:
        _fwd_tile(pid - NB_A, b, h, Q_b, K_b, V_b, O_b, LSE_b, KMASK_b, CU_Q_b, CU_K_b, sqb_b, sqh_b, sqm_b,
            sqd_b, skb_b, skh_b, skn_b, skd_b, svb_b, svh_b, svn_b, svd_b, sob_b, soh_b, som_b, sod_b, slb_b,
            slh_b, slm_b, skmb_b, skmn_b, H, LQ_b, LK_b, D, sm_scale, seed, rng_offset_b, drop_thresh, drop_scale,
            HAS_MASK_B, False, DROPOUT, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PREC)


@triton.jit
def _co_bwd_dkdv_kernel(
        Q_a, K_a, V_a, DO_a, LSE_a, DELTA_a, DK_a, DV_a, KMASK_a, CU_Q_a, CU_K_a, sqb_a, sqh_a, sqm_a, sqd_a,
        skb_a, skh_a, skn_a, skd_a, svb_a, svh_a, svn_a, svd_a, sdob_a, sdoh_a, sdom_a, sdod_a, slb_a, slh_a,
        slm_a, sdkb_a, sdkh_a, sdkn_a, sdkd_a, sdvb_a, sdvh_a, sdvn_a, sdvd_a, skmb_a, skmn_a, LQ_a, LK_a,
        rng_offset_a, Q_b, K_b, V_b, DO_b, LSE_b, DELTA_b, DK_b, DV_b, KMASK_b, CU_Q_b, CU_K_b, sqb_b, sqh_b,
        sqm_b, sqd_b, skb_b, skh_b, skn_b, skd_b, svb_b, svh_b, svn_b, svd_b, sdob_b, sdoh_b, sdom_b, sdod_b,
        slb_b, slh_b, slm_b, sdkb_b, sdkh_b, sdkn_b, sdkd_b, sdvb_b, sdvh_b, sdvn_b, sdvd_b, skmb_b, skmn_b,
        LQ_b, LK_b, rng_offset_b, NB_A, H, D, sm_scale, seed, drop_thresh, drop_scale, HAS_MASK_A:
        tl.constexpr, HAS_MASK_B: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N:
        tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    if pid < NB_A:
        _bwd_dkdv_tile(pid, b, h, Q_a, K_a, V_a, DO_a, LSE_a, DELTA_a, DK_a, DV_a, KMASK_a, CU_Q_a, CU_K_a,
            sqb_a, sqh_a, sqm_a, sqd_a, skb_a, skh_a, skn_a, skd_a, svb_a, svh_a, svn_a, svd_a, sdob_a, sdoh_a,
            sdom_a, sdod_a, slb_a, slh_a, slm_a, sdkb_a, sdkh_a, sdkn_a, sdkd_a, sdvb_a, sdvh_a, sdvn_a, sdvd_a,
            skmb_a, skmn_a, H, LQ_a, LK_a, D, sm_scale, seed, rng_offset_a, drop_thresh, drop_scale, HAS_MASK_A,
            False, DROPOUT, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PREC)
    else:
        _bwd_dkdv_tile(pid - NB_A, b, h, Q_b, K_b, V_b, DO_b, LSE_b, DELTA_b, DK_b, DV_b, KMASK_b, CU_Q_b,
            CU_K_b, sqb_b, sqh_b, sqm_b, sqd_b, skb_b, skh_b, skn_b, skd_b, svb_b, svh_b, svn_b, svd_b, sdob_b,
            sdoh_b, sdom_b, sdod_b, slb_b, slh_b, slm_b, sdkb_b, sdkh_b, sdkn_b, sdkd_b, sdvb_b, sdvh_b, sdvn_b,
            sdvd_b, skmb_b, skmn_b, H, LQ_b, LK_b, D, sm_scale, seed, rng_offset_b, drop_thresh, drop_scale,
            HAS_MASK_B, False, DROPOUT, BLOCK_M, BLOCK_N, BLOCK_D, DOT_PREC)


@triton.jit
def _co_bwd_dq_kernel(
        Q_a, K_a, V_a, DO_a, LSE_a, DELTA_a, DQ_a, KMASK_a, CU_Q_a, CU_K_a, sqb_a, sqh_a, sqm_a, sqd_a, skb_a,
        skh_a, skn_a, skd_a, svb_a, svh_a, svn_a, svd_a, sdob_a, sdoh_a, sdom_a, sdod_a, slb_a, slh_a, slm_a,
        sdqb_a, sdqh_a, sdqm_a, sdqd_a, skmb_a, skmn_a, LQ_a, LK_a, rng_offset_a, Q_b, K_b, V_b, DO_b, LSE_b,
        DELTA_b, DQ_b, KMASK_b, CU_Q_b, CU_K_b, sqb_b, sqh_b, sqm_b, sqd_b, skb_b, skh_b, skn_b, skd_b, svb_b,
        svh_b, svn_b, svd_b, sdob_b, sdoh_b, sdom_b, sdod_b, slb_b, slh_b, slm_b, sdqb_b, sdqh_b, sdqm_b,
        sdqd_b, skmb_b, skmn_b, LQ_b, LK_b, rng_offset_b, NB_A, H, D, sm_scale, seed, drop_thresh, drop_scale,
        HAS_MASK_A: tl.constexpr, HAS_MASK_B: tl.constexpr, DROPOUT: tl.constexpr, BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    if pid < NB_A:
        _bwd_dq_tile(pid, b, h, Q_a, K_a, V_a, DO_a, LSE_a, DELTA_a, DQ_a, KMASK_a, CU_Q_a, CU_K_a, sqb_a,
            sqh_a, sqm_a, sqd_a, skb_a, skh_a, skn_a, skd_a, svb_a, svh_a, svn_a, svd_a, sdob_a, sdoh_a, sdom_a,
            sdod_a, slb_a, slh_a, slm_a, sdqb_a, sdqh_a, sdqm_a, sdqd_a, skmb_a, skmn_a, H, LQ_a, LK_a, D,
            sm_scale, seed, rng_offset_a, drop_thresh, drop_scale, HAS_MASK_A, False, DROPOUT, BLOCK_M, BLOCK_N,
            BLOCK_D, DOT_PREC)
    else:
        _bwd_dq_tile(pid - NB_A, b, h, Q_b, K_b, V_b, DO_b, LSE_b, DELTA_b, DQ_b, KMASK_b, CU_Q_b, CU_K_b,
            sqb_b, sqh_b, sqm_b, sqd_b, skb_b, skh_b, skn_b, skd_b, svb_b, svh_b, svn_b, svd_b, sdob_b, sdoh_b,
            sdom_b, sdod_b, slb_b, slh_b, slm_b, sdqb_b, sdqh_b, sdqm_b, sdqd_b, skmb_b, skmn_b, H, LQ_b, LK_b, D,
            sm_scale, seed, rng_offset_b, drop_thresh, drop_scale, HAS_MASK_B, False, DROPOUT, BLOCK_M, BLOCK_N,
            BLOCK_D, DOT_PREC)


# ----------------------------------------------------------------------------------
# Host side
# ----------------------------------------------------------------------------------

# Tile-body arguments end with (H, LQ, LK, D, scale, seed, rng_offset, thresh, drop_scale).


def _per_problem(args: tuple) -> tuple:
    return args[:-9] + (args[-8], args[-7], args[-3])


def _shared(args: tuple) -> tuple:
    return (args[-9], args[-6], args[-5], args[-4], args[-2], args[-1])


def _problem(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> at.Problem:
    km = None if mask is None else mask.view(torch.uint8)
    return at.Problem(q, k, v, km, None, None, q.shape[0], q.shape[1], q.shape[2], k.shape[2])


def _constexprs(pa: at.Problem, pb: at.Problem, dropout_p: float, bm: int, bn: int) -> dict:
    return dict(HAS_MASK_A=pa.kmask is not None, HAS_MASK_B=pb.kmask is not None, DROPOUT=dropout_p > 0.0,
                BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=at.block_d(pa.q.shape[-1]), DOT_PREC=at.dot_precision(pa.q.dtype))


def offset_b(q_t: Tensor, q_v: Tensor, offset: int) -> int:
    """Philox offset of direction B (visual queries): right after A's B*H*Lt*Lv counters."""
    B, H, Lt, _ = q_t.shape
    return offset + B * H * Lt * q_v.shape[2]


def forward(q_t: Tensor, k_t: Tensor, v_t: Tensor, t_mask: Optional[Tensor], q_v: Tensor, k_v: Tensor,
            v_v: Tensor, v_mask: Optional[Tensor], scale: float, dropout_p: float, seed: int,
            offset: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (ctx_t, ctx_v, lse_t, lse_v) from one launch."""
    pa = _problem(q_t, k_v, v_v, v_mask)
    pb = _problem(q_v, k_t, v_t, t_mask)
    cfg = at.tile_config(q_t.shape[-1], q_t.element_size(), at._interpret())
    out_a, out_b = torch.empty_like(q_t), torch.empty_like(q_v)
    lse_a, lse_b = at.new_lse(pa), at.new_lse(pb)
    args_a = at.fwd_args(pa, out_a, lse_a, scale, dropout_p, seed, offset)
    args_b = at.fwd_args(pb, out_b, lse_b, scale, dropout_p, seed, offset_b(q_t, q_v, offset))
    nb_a = triton.cdiv(pa.lq, cfg.fwd_m)
    grid = (nb_a + triton.cdiv(pb.lq, cfg.fwd_m), pa.batch * pa.heads)
    _co_fwd_kernel[grid](*_per_problem(args_a), *_per_problem(args_b), nb_a, *_shared(args_a),
                         **_constexprs(pa, pb, dropout_p, cfg.fwd_m, cfg.fwd_n),
                         num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out_a, out_b, lse_a, lse_b


def backward(dctx_t: Tensor, dctx_v: Tensor, q_t: Tensor, k_t: Tensor, v_t: Tensor, t_mask: Optional[Tensor],
             q_v: Tensor, k_v: Tensor, v_v: Tensor, v_mask: Optional[Tensor], ctx_t: Tensor, ctx_v: Tensor,
             lse_t: Tensor, lse_v: Tensor, scale: float, dropout_p: float, seed: int,
             offset: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Returns (dq_t, dk_t, dv_t, dq_v, dk_v, dv_v) from two launches."""
    pa = _problem(q_t, k_v, v_v, v_mask)
    pb = _problem(q_v, k_t, v_t, t_mask)
    cfg = at.tile_config(q_t.shape[-1], q_t.element_size(), at._interpret())
    delta_a = at.row_delta(ctx_t, dctx_t)
    delta_b = at.row_delta(ctx_v, dctx_v)
    dq_t, dq_v = torch.empty_like(q_t), torch.empty_like(q_v)
    dk_v, dv_v = torch.empty_like(k_v), torch.empty_like(v_v)
    dk_t, dv_t = torch.empty_like(k_t), torch.empty_like(v_t)
    off_b = offset_b(q_t, q_v, offset)
    ce = _constexprs(pa, pb, dropout_p, cfg.bwd_m, cfg.bwd_n)
    a = at.dkdv_args(pa, dctx_t, lse_t, delta_a, dk_v, dv_v, scale, dropout_p, seed, offset)
    b = at.dkdv_args(pb, dctx_v, lse_v, delta_b, dk_t, dv_t, scale, dropout_p, seed, off_b)
    nb_a = triton.cdiv(pa.lk, cfg.bwd_n)
    grid = (nb_a + triton.cdiv(pb.lk, cfg.bwd_n), pa.batch * pa.heads)
    _co_bwd_dkdv_kernel[grid](*_per_problem(a), *_per_problem(b), nb_a, *_shared(a), **ce,
                              num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    a = at.dq_args(pa, dctx_t, lse_t, delta_a, dq_t, scale, dropout_p, seed, offset)
    b = at.dq_args(pb, dctx_v, lse_v, delta_b, dq_v, scale, dropout_p, seed, off_b)
    nb_a = triton.cdiv(pa.lq, cfg.bwd_m)
    grid = (nb_a + triton.cdiv(pb.lq, cfg.bwd_m), pa.batch * pa.heads)
    _co_bwd_dq_kernel[grid](*_per_problem(a), *_per_problem(b), nb_a, *_shared(a), **ce,
                            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return dq_t, dk_t, dv_t, dq_v, dk_v, dv_v
