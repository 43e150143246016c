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
    """softmax(q k^T * scale, masked) [* keep/(1-p)] @ v.

    q (B,H,Lq,D), k/v (B,H,Lk,D), key_mask (B,Lk) bool (True = real key),
    keep_mask (B,H,Lq,Lk) bool, required when dropout_p > 0.  Returns (B,H,Lq,D) in
    q's dtype.
    """
    out, _ = attention_forward(q, k, v, key_mask, dropout_p=dropout_p, scale=scale, keep_mask=keep_mask)
    return out


def attention_forward(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], *,
                      dropout_p: float = 0.0, scale: Optional[float] = None,
                      keep_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Like :func:`attention_reference` but also returns lse (B,H,Lq) fp32 (+inf on
    rows with no real key)."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    ct = _compute_dtype(q)
    p, lse = attention_probs(q, k, key_mask, scale)
    if dropout_p > 0.0:
        if keep_mask is None:
            raise ValueError("attention_reference: dropout_p > 0 needs keep_mask (B,H,Lq,Lk)")
        p = p * keep_mask.to(ct) * (1.0 / (1.0 - dropout_p))
    out = torch.matmul(p, v.to(ct))
    return out.to(q.dtype), lse.to(torch.float32 if ct == torch.float32 else ct)


def attention_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor], *,
                       dropout_p: float, scale: float,
                       keep_mask: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) of :func:`attention_reference`, written out:

    Pd = P * keep/(1-p); dV = Pd^T dO; dP = (dO V^T) * keep/(1-p);
    dS = P * (dP - rowsum(P * dP)); dQ = scale * dS K; dK = scale * dS^T Q.
    (Explicit, because custom-op implementations run below autograd.)
    """
    ct = _compute_dtype(q)
    p, _ = attention_probs(q, k, key_mask, scale)
    do_, v_ = do.to(ct), v.to(ct)
    dp = torch.matmul(do_, v_.transpose(-1, -2))
    if dropout_p > 0.0:
        if keep_mask is None:
            raise ValueError("attention_backward: dropout_p > 0 needs keep_mask (B,H,Lq,Lk)")
        drop = keep_mask.to(ct) * (1.0 / (1.0 - dropout_p))
        pd = p * drop
        dp = dp * drop
    else:
        pd = p
    dv = torch.matmul(pd.transpose(-1, -2), do_)
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))
    dq = torch.matmul(ds, k.to(ct)) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q.to(ct)) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def varlen_split(cu_seqlens: Tensor) -> list[tuple[int, int]]:
    """[(start, end)] per sequence from int32 cu_seqlens (B+1,)."""
    c = cu_seqlens.tolist()
    return [(c[i], c[i + 1]) for i in range(len(c) - 1)]


def varlen_forward(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                   max_seqlen_k: int, *, dropout_p: float = 0.0, scale: Optional[float] = None,
                   keep_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Packed attention, each sequence alone.

    q (total_q,H,D), k/v (total_k,H,D), cu_seqlens (B+1,) int32, keep_mask
    (total_q,H,max_seqlen_k) bool when dropout_p > 0 (row r of sequence b, key j of
    that sequence).  Returns out (total_q,H,D) in q's dtype and lse (total_q,H) fp32.
    """
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    out = torch.zeros_like(q)
    lse = torch.full(q.shape[:2], float("inf"), dtype=torch.float32, device=q.device)
    for (qs, qe), (ks, ke) in zip(varlen_split(cu_seqlens_q), varlen_split(cu_seqlens_k)):
        if qe == qs:
            continue
        qb = q[qs:qe].transpose(0, 1)[None]
        kb = k[ks:ke].transpose(0, 1)[None]
        vb = v[ks:ke].transpose(0, 1)[None]
        km = None
        if dropout_p > 0.0:
            if keep_mask is None:
                raise ValueError("varlen_attention reference: dropout_p > 0 needs keep_mask (total_q,H,max_seqlen_k)")
            km = keep_mask[qs:qe, :, : ke - ks].transpose(0, 1)[None]
        if ke == ks:
            continue  # no keys: zeros, lse +inf
        o, l_ = attention_forward(qb, kb, vb, None, dropout_p=dropout_p, scale=scale, keep_mask=km)
        out[qs:qe] = o[0].transpose(0, 1)
        lse[qs:qe] = l_[0].transpose(0, 1).float()
    return out, lse


def varlen_reference(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                     max_seqlen_k: int, *, dropout_p: float = 0.0, scale: Optional[float] = None,
                     keep_mask: Optional[Tensor] = None) -> Tensor:
    """Output (total_q,H,D) of :func:`varlen_forward`."""
    return varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_k,
                          dropout_p=dropout_p, scale=scale, keep_mask=keep_mask)[0]


def varlen_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                    max_seqlen_k: int, *, dropout_p: float, scale: float,
                    keep_mask: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv) of :func:`varlen_reference`, sequence by sequence."""
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for (qs, qe), (ks, ke) in zip(varlen_split(cu_seqlens_q), varlen_split(cu_seqlens_k)):
        if qe == qs or ke == ks:
            continue
        km = None
        if dropout_p > 0.0:
            if keep_mask is None:
                raise ValueError("varlen_backward: dropout_p > 0 needs keep_mask (total_q,H,max_seqlen_k)")
            km = keep_mask[qs:qe, :, : ke - ks].transpose(0, 1)[None]
        g = attention_backward(do[qs:qe].transpose(0, 1)[None], q[qs:qe].transpose(0, 1)[None],
                               k[ks:ke].transpose(0, 1)[None], v[ks:ke].transpose(0, 1)[None], None,
                               dropout_p=dropout_p, scale=scale, keep_mask=km)
        dq[qs:qe], dk[ks:ke], dv[ks:ke] = (t[0].transpose(0, 1) for t in g)
    return dq, dk, dv
