"""Eager PyTorch optimal transport for word-region alignment: the oracle and the
fallback path.

Shapes: B batch, Lx text length (x), Ly region count (y).  Masks are bool, True =
real entry; n_x / n_y are the real counts of a problem.  Plans are (B,Lx,Ly) in the
compute dtype (fp32, or fp64 for fp64 costs), exactly zero on padding, all zero for a
problem with no real token or no real region.

Both solvers subtract the problem's smallest real cost before exponentiating.  That
multiplies the kernel by a constant, which leaves every plan unchanged (the scalings
absorb it: IPOT's region-side and Sinkhorn's v divide it out), and keeps exp() from
underflowing when all costs are large.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

# Sinkhorn switches to the log domain for a problem when its cost range / eps exceeds
# this (exp(-50) ~ 2e-22: scaling vectors would soon overflow fp32).
LOG_DOMAIN_RANGE = 50.0


def _ct(cost: Tensor) -> torch.dtype:
    return torch.float64 if cost.dtype == torch.float64 else torch.float32


def _prepare(cost: Tensor, x_mask: Tensor, y_mask: Tensor):
    """(cost in the compute dtype, joint mask, n_x, n_y, min and max real cost,
    x_mask, y_mask); the returned masks are all False for a problem with no real
    token or no real region, so its plan is all zero."""
    ct = _ct(cost)
    c = cost.to(ct)
    ok = x_mask.any(1) & y_mask.any(1)
    x_mask = x_mask & ok[:, None]
    y_mask = y_mask & ok[:, None]
    joint = x_mask[:, :, None] & y_mask[:, None, :]
    nx = x_mask.sum(1).to(ct)
    ny = y_mask.sum(1).to(ct)
    big = torch.finfo(ct).max
    cmin = c.masked_fill(~joint, big).amin(dim=(1, 2))
    cmax = c.masked_fill(~joint, -big).amax(dim=(1, 2))
    empty = ~joint.flatten(1).any(1)
    cmin = cmin.masked_fill(empty, 0.0)
    cmax = cmax.masked_fill(empty, 0.0)
    # padding may hold anything (NaN, inf, costs far below the real ones): replace it by
    # the problem's smallest real cost, so exp() of it is finite and the mask zeroes it
    c = torch.where(joint, c, cmin[:, None, None].expand_as(c))
    return c, joint, nx, ny, cmin, cmax, x_mask, y_mask


def _safe_recip(den: Tensor, mask: Tensor) -> Tensor:
    """1/den where mask, else 0 (den of a real entry stays as computed, inf included)."""
    return torch.where(mask, 1.0 / torch.where(mask, den, torch.ones_like(den)), torch.zeros_like(den))


def ipot_reference(cost: Tensor, x_mask: Tensor, y_mask: Tensor, *, beta: float = 0.5, n_iters: int = 50,
                   k: int = 1) -> Tensor:
    """IPOT with UNITER's semantics, text x regions, True = real.

    A = exp(-cost/beta) on real pairs; T = 1; s = 1/n_x; each iteration Q = A*T, then
    k times d = 1/(n_y Q^T s), s = 1/(n_x Q d); then T = diag(s) Q diag(d).
    """
    c, joint, nx, ny, cmin, _, x_mask, y_mask = _prepare(cost, x_mask, y_mask)
    A = torch.exp(-(c - cmin[:, None, None]) / beta) * joint
    T = joint.to(c.dtype)
    s = _safe_recip(nx[:, None].expand_as(x_mask), x_mask)
    for _ in range(n_iters):
        Q = A * T
        for _ in range(k):
            d = _safe_recip(ny[:, None] * torch.einsum("bij,bi->bj", Q, s), y_mask)
            s = _safe_recip(nx[:, None] * torch.einsum("bij,bj->bi", Q, d), x_mask)
        T = s[:, :, None] * Q * d[:, None, :]
    return T


def sinkhorn_reference(cost: Tensor, x_mask: Tensor, y_mask: Tensor, *, eps: float = 0.1, n_iters: int = 100,
                       log_domain: Optional[bool] = None) -> Tensor:
    """Sinkhorn-Knopp with uniform marginals over the real entries, POT's update order
    (v then u), exactly n_iters iterations; K = exp(-cost/eps).

    ``log_domain`` True/False forces the variant; None picks the log domain for each
    problem whose cost range / eps exceeds :data:`LOG_DOMAIN_RANGE`.
    """
    c, joint, nx, ny, cmin, cmax, x_mask, y_mask = _prepare(cost, x_mask, y_mask)
    a = _safe_recip(nx[:, None].expand_as(x_mask), x_mask)
    b = _safe_recip(ny[:, None].expand_as(y_mask), y_mask)
    if log_domain is None:
        use_log = (cmax - cmin) / eps > LOG_DOMAIN_RANGE
    else:
        use_log = torch.full_like(nx, bool(log_domain), dtype=torch.bool)
    out = torch.zeros_like(c)
    if (~use_log).any():
        sel = ~use_log
        out[sel] = _sinkhorn_scaling(c[sel], joint[sel], a[sel], b[sel], cmin[sel], eps, n_iters)
    if use_log.any():
        out[use_log] = _sinkhorn_log(c[use_log], joint[use_log], a[use_log], b[use_log], eps, n_iters)
    return out


def _sinkhorn_scaling(c, joint, a, b, cmin, eps, n_iters):
    K = torch.exp(-(c - cmin[:, None, None]) / eps) * joint
    u = a.clone()  # POT starts from u = 1/n_x
    v = b.clone()
    for _ in range(n_iters):
        v = _safe_recip(torch.einsum("bij,bi->bj", K, u), b > 0) * b
        u = _safe_recip(torch.einsum("bij,bj->bi", K, v), a > 0) * a
    return u[:, :, None] * K * v[:, None, :]


def _sinkhorn_log(c, joint, a, b, eps, n_iters):
    ninf = float("-inf")
    cz = c.masked_fill(~joint, 0.0)
    log_a = torch.where(a > 0, a.clamp_min(1e-300).log(), torch.full_like(a, ninf))
    log_b = torch.where(b > 0, b.clamp_min(1e-300).log(), torch.full_like(b, ninf))
    f = eps * log_a  # u = a = 1/n_x at the start, as POT
    g = torch.full_like(b, ninf)
    for _ in range(n_iters):
        z = (f[:, :, None] - cz) / eps
        z = z.masked_fill(~joint, ninf)
        g = torch.where(b > 0, eps * (log_b - _lse(z, 1)), g)
        z = (g[:, None, :] - cz) / eps
        z = z.masked_fill(~joint, ninf)
        f = torch.where(a > 0, eps * (log_a - _lse(z, 2)), f)
    plan = torch.exp((f[:, :, None] + g[:, None, :] - cz) / eps)
    return torch.where(joint, plan, torch.zeros_like(plan))


def _lse(z: Tensor, dim: int) -> Tensor:
    """logsumexp that returns -inf (not NaN) for an all -inf slice."""
    m = z.amax(dim=dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return torch.exp(z - m).sum(dim).log() + m.squeeze(dim)


def cosine_cost(txt_emb: Tensor, img_emb: Tensor, eps: float = 1e-5) -> Tensor:
    """1 - cosine similarity, (B,Lx,E) x (B,Ly,E) -> (B,Lx,Ly), in fp32 (fp64 stays)."""
    ct = _ct(txt_emb)
    x = torch.nn.functional.normalize(txt_emb.to(ct), p=2, dim=-1, eps=eps)
    y = torch.nn.functional.normalize(img_emb.to(ct), p=2, dim=-1, eps=eps)
    return 1.0 - torch.matmul(x, y.transpose(1, 2))


def wra_distance_reference(txt_emb: Tensor, img_emb: Tensor, txt_mask: Tensor, img_mask: Tensor, *,
                           beta: float = 0.5, n_iters: int = 50, k: int = 1) -> Tensor:
    """UNITER's word-region alignment distance (B,): <cosine cost, IPOT plan>, the plan
    computed without gradient, padding costs zeroed."""
    cost = cosine_cost(txt_emb, img_emb)
    joint = txt_mask[:, :, None] & img_mask[:, None, :]
    cost = cost.masked_fill(~joint, 0.0)
    with torch.no_grad():
        plan = ipot_reference(cost.detach(), txt_mask, img_mask, beta=beta, n_iters=n_iters, k=k)
    return (cost * plan).sum(dim=(1, 2))


__all__ = ["LOG_DOMAIN_RANGE", "ipot_reference", "sinkhorn_reference", "wra_distance_reference", "cosine_cost"]
