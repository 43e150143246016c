"""Eager PyTorch attention: the test oracle and the CPU path.

Shapes: B batch, H heads, Lq/Lk query/key length, D head dim.

Math is done in fp32 (fp64 inputs stay fp64, so the same code is the fp64 oracle)
and cast back to the input dtype.  A query row whose keys are all masked gives zeros
and zero gradients.  Dropout multiplies the softmax probabilities by a given boolean
keep-mask and rescales by 1/(1-p); the kernels regenerate that exact mask from
(seed, offset), so the reference and the kernels agree bit-for-bit on which
probabilities are dropped.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def attention_probs(q: Tensor, k: Tensor, key_mask: Optional[Tensor], scale: float) -> tuple[Tensor, Tensor]:
    """Softmax probabilities and log-sum-exp.

    q (B,H,Lq,D), k (B,H,Lk,D), key_mask (B,Lk) bool or None.
    Returns probs (B,H,Lq,Lk) and lse (B,H,Lq) in the compute dtype; rows with no
    real key have probs 0 and lse +inf.
    """
    ct = _compute_dtype(q)
    s = torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2)) * scale
    if key_mask is None:
        lse = torch.logsumexp(s, dim=-1)
        return torch.softmax(s, dim=-1), lse
    m = key_mask[:, None, None, :]
    s = s.masked_fill(~m, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    empty = torch.isinf(lse) & (lse < 0)
    # Rows with no real key: softmax of all -inf is NaN; use a finite row and zero it.
    s = s.masked_fill(empty[..., None], 0.0)
    p = torch.softmax(s, dim=-1) * m
    p = p.masked_fill(empty[..., None], 0.0)
    lse = lse.masked_fill(empty, float("inf"))
    return p, lse


def attention_reference(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor] = None, *,
                        dropout_p: float = 0.0, scale: Optional[float] = None,
                        keep_mask: Optional[Tensor] = None) -> Tensor:
    """The oracle: softmax(q k^T * scale, masked) [* keep/(1-p)] @ v, differentiable by
    autograd.

    q (B,H,Lq,D), k/v (B,H,Lk,D), key_mask (B,Lk) bool (True = real key),
    keep_mask (B,H,Lq,Lk) bool, required when dropout_p > 0.  Returns (B,H,Lq,D) in
    q's dtype.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    ct = _compute_dtype(q)
    p, _ = attention_probs(q, k, key_mask, scale)
    if dropout_p > 0.0:
        if keep_mask is None:
            raise ValueError("attention_reference: dropout_p > 0 needs keep_mask (B,H,Lq,Lk)")
        p = p * keep_mask.to(ct) * (1.0 / (1.0 - dropout_p))
    return torch.matmul(p, v.to(ct)).to(q.dtype)


# ----------------------------------------------------------------------------------
# The CPU path: the same math written for speed (log-sum-exp saved by the forward,
# in-place elementwise work, delta = rowsum(dO * O) in the backward), checked against
# the oracle above by the tests.
# ----------------------------------------------------------------------------------

def _probs_from_lse(q: Tensor, k: Tensor, key_mask: Optional[Tensor], lse: Tensor, scale: float) -> Tensor:
    """P = exp(q k^T * scale - lse), 0 on masked keys and on rows with lse = +inf."""
    ct = _compute_dtype(q)
    s = torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2)).mul_(scale)
    if key_mask is not None:
        s.masked_fill_(~key_mask[:, None, None, :], float("-inf"))
    return s.sub_(lse.to(ct)[..., None]).exp_()


def attention_forward(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], *,
                      dropout_p: float = 0.0, scale: Optional[float] = None,
                      keep_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Forward of the CPU path: out (B,H,Lq,D) in q's dtype and lse (B,H,Lq) in the
    compute dtype (+inf on rows with no real key, so P = exp(S - lse) is 0 there)."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    ct = _compute_dtype(q)
    s = torch.matmul(q.to(ct), k.to(ct).transpose(-1, -2)).mul_(scale)
    if key_mask is not None:
        s.masked_fill_(~key_mask[:, None, None, :], float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    if key_mask is not None:
        lse.masked_fill_(lse == float("-inf"), float("inf"))
    p = s.sub_(lse[..., None]).exp_()
    if dropout_p > 0.0:
        if keep_mask is None:
            raise ValueError("attention_forward: dropout_p > 0 needs keep_mask (B,H,Lq,Lk)")
        p.mul_(keep_mask).mul_(1.0 / (1.0 - dropout_p))
    return torch.matmul(p, v.to(ct)).to(q.dtype), lse


def attention_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], out: Tensor,
                       lse: Tensor, *, dropout_p: float, scale: float,
                       keep_mask: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) of the attention forward, given its out and lse:

    P = exp(S - lse); Pd = P * keep/(1-p); dV = Pd^T dO; dP = (dO V^T) * keep/(1-p);
    dS = P * (dP - rowsum(dO * O)); dQ = scale * dS K; dK = scale * dS^T Q.
    (Written out, because custom-op implementations run below autograd.)
    """
    ct = _compute_dtype(q)
    p = _probs_from_lse(q, k, key_mask, lse, scale)
    do_ = do.to(ct)
    dp = torch.matmul(do_, v.to(ct).transpose(-1, -2))
    if dropout_p > 0.0:
        if keep_mask is None:
            raise ValueError("attention_backward: dropout_p > 0 needs keep_mask (B,H,Lq,Lk)")
        drop = keep_mask.to(ct).mul_(1.0 / (1.0 - dropout_p))
        dv = torch.matmul((p * drop).transpose(-1, -2), do_)
        dp.mul_(drop)
    else:
        dv = torch.matmul(p.transpose(-1, -2), do_)
    delta = (do_ * out.to(ct)).sum(-1, keepdim=True)
    ds = dp.sub_(delta).mul_(p)
    dq = torch.matmul(ds, k.to(ct)).mul_(scale)
    dk = torch.matmul(ds.transpose(-1, -2), q.to(ct)).mul_(scale)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def varlen_split(cu_seqlens: Tensor) -> list[tuple[int, int]]:
    """[(start, end)] per sequence from int32 cu_seqlens (B+1,)."""
    c = cu_seqlens.tolist()
    return [(c[i], c[i + 1]) for i in range(len(c) - 1)]


def _seq(t: Tensor, a: int, b: int) -> Tensor:
    """Rows a:b of a packed (total,H,...) tensor as a batch of one: (1,H,b-a,...)."""
    return t[a:b].transpose(0, 1)[None]


def _seq_keep(keep_mask: Optional[Tensor], qs: int, qe: int, nk: int, dropout_p: float) -> Optional[Tensor]:
    if dropout_p <= 0.0:
        return None
    if keep_mask is None:
        raise ValueError("varlen attention: dropout_p > 0 needs keep_mask (total_q,H,max_seqlen_k)")
    return _seq(keep_mask[:, :, :nk], qs, qe)


def varlen_reference(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                     max_seqlen_k: int, *, dropout_p: float = 0.0, scale: Optional[float] = None,
                     keep_mask: Optional[Tensor] = None) -> Tensor:
    """The oracle for packed attention: :func:`attention_reference` on each sequence
    alone.

    q (total_q,H,D), k/v (total_k,H,D), cu_seqlens (B+1,) int32, keep_mask
    (total_q,H,max_seqlen_k) bool when dropout_p > 0 (row r of sequence b, key j of
    that sequence).  Returns (total_q,H,D); rows of a sequence with no key are 0.
    """
    parts = []
    for (qs, qe), (ks, ke) in zip(varlen_split(cu_seqlens_q), varlen_split(cu_seqlens_k)):
        if ke == ks:
            parts.append(torch.zeros_like(q[qs:qe]))
            continue
        o = attention_reference(_seq(q, qs, qe), _seq(k, ks, ke), _seq(v, ks, ke), None, dropout_p=dropout_p,
                                scale=scale, keep_mask=_seq_keep(keep_mask, qs, qe, ke - ks, dropout_p))
        parts.append(o[0].transpose(0, 1))
    return torch.cat(parts) if parts else torch.zeros_like(q)


def varlen_forward(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                   max_seqlen_k: int, *, dropout_p: float = 0.0, scale: Optional[float] = None,
                   keep_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """CPU path of packed attention, sequence by sequence: out (total_q,H,D) in q's
    dtype and lse (total_q,H) in the compute dtype (+inf where a row has no key)."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:2], float("inf"), dtype=_compute_dtype(q), device=q.device)
    for (qs, qe), (ks, ke) in zip(varlen_split(cu_seqlens_q), varlen_split(cu_seqlens_k)):
        if qe == qs or ke == ks:
            continue
        o, l_ = attention_forward(_seq(q, qs, qe), _seq(k, ks, ke), _seq(v, ks, ke), None, dropout_p=dropout_p,
                                  scale=scale, keep_mask=_seq_keep(keep_mask, qs, qe, ke - ks, dropout_p))
        out[qs:qe] = o[0].transpose(0, 1)
        lse[qs:qe] = l_[0].transpose(0, 1)
    return out, lse


def varlen_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                    out: Tensor, lse: Tensor, max_seqlen_k: int, *, dropout_p: float, scale: float,
                    keep_mask: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) of :func:`varlen_forward`, sequence by sequence."""
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for (qs, qe), (ks, ke) in zip(varlen_split(cu_seqlens_q), varlen_split(cu_seqlens_k)):
        if qe == qs or ke == ks:
            continue
        g = attention_backward(_seq(do, qs, qe), _seq(q, qs, qe), _seq(k, ks, ke), _seq(v, ks, ke), None,
                               _seq(out, qs, qe), lse[qs:qe].transpose(0, 1)[None], dropout_p=dropout_p,
                               scale=scale, keep_mask=_seq_keep(keep_mask, qs, qe, ke - ks, dropout_p))
        dq[qs:qe], dk[ks:ke], dv[ks:ke] = (t[0].transpose(0, 1) for t in g)
    return dq, dk, dv
