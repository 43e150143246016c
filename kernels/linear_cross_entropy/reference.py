"""Eager PyTorch linear + cross-entropy: the test oracle and the CPU path.

Shapes: N rows (tokens / regions), E hidden width, V classes (vocabulary).

``hidden (N,E) -> logits = F.linear(hidden, weight, bias) (N,V) -> loss``, written
exactly as the training objectives wrote it before the fused op existed: the logits
are made in the inputs' dtype (so autocast and bf16 behave as ``F.linear`` does),
cast to the compute dtype (fp32; fp64 for fp64 inputs, so the same code is the fp64
oracle) and fed to ``F.cross_entropy`` / ``F.log_softmax``.  On CPU fp32 the
objectives' losses therefore stay bitwise what they were.

Two conventions differ from ``F.cross_entropy``:

* ``reduction="mean"`` with every row ignored (or N = 0) gives 0.0 with zero
  gradients (``F.cross_entropy`` gives NaN): a batch without a masked word must not
  poison a training step.
* the soft-target loss never differentiates the targets (they are data).

The second half of this file is the chunk step of the fused algorithm written in
torch (:func:`chunk_loss_and_grad`): the Triton kernel's specification, and what the
custom op runs when its backend resolves to the reference.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

REDUCTIONS = ("mean", "sum", "none")


def compute_dtype(t: Tensor) -> torch.dtype:
    """fp64 for fp64 inputs (the oracle), else fp32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def logits_reference(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """(N,V) logits in the compute dtype: ``F.linear`` in the inputs' dtype, then cast."""
    return F.linear(hidden, weight, bias).to(compute_dtype(hidden))


def _argmax(logits: Tensor, want: bool) -> Optional[Tensor]:
    return logits.argmax(-1) if want else None


def linear_cross_entropy_reference(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, *,
                                   ignore_index: int = -100, reduction: str = "mean",
                                   return_argmax: bool = True) -> tuple[Tensor, Optional[Tensor]]:
    """Hard-label loss and the logits' argmax.

    hidden (N,E), weight (V,E), bias (V,) or None, labels (N,) int64 in [0, V) or
    ``ignore_index``.  Returns (loss, argmax): loss a scalar ("mean": over the rows
    that are not ignored, 0.0 when there is none; "sum") or (N,) ("none", 0 on ignored
    rows) in the compute dtype; argmax (N,) int64 of the logits (first maximum), or
    None without ``return_argmax``.
    """
    logits = logits_reference(hidden, weight, bias)
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)
    if reduction == "mean":
        # F.cross_entropy's NaN (0/0) when every row is ignored -> 0.  Its backward is
        # zero then (no row is touched), so the NaN never reaches a gradient.
        loss = torch.where((labels != ignore_index).any(), loss, 0.0)
    return loss, _argmax(logits, return_argmax)


def soft_elements(logits: Tensor, targets: Tensor, kl: bool) -> Tensor:
    """(N,V) per-element terms: ``-t * log_softmax(z)`` (cross entropy) or, with
    ``kl``, ``F.kl_div``'s ``t * (log t - log_softmax(z))`` (0 where t = 0)."""
    logp = F.log_softmax(logits, -1)
    if kl:
        return F.kl_div(logp, targets, reduction="none")
    return -(targets * logp)


def linear_soft_cross_entropy_reference(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor,
                                        *, reduction: str = "mean", kl: bool = False,
                                        return_argmax: bool = True) -> tuple[Tensor, Optional[Tensor]]:
    """Soft-target loss and the logits' argmax.

    hidden (N,E), weight (V,E), bias (V,) or None, targets (N,V) (probabilities; rows
    need not sum to 1).  Row loss ``sum_c -t_c log_softmax(z)_c``, or with ``kl`` the
    KL divergence ``sum_c t_c (log t_c - log_softmax(z)_c)`` (the same minus the
    targets' entropy, a constant: same gradient).  "mean": over the N rows (0.0 when
    N = 0); "sum": the sum of every (N,V) term; "none": (N,).  argmax (N,) int64 or None.
    """
    logits = logits_reference(hidden, weight, bias)
    el = soft_elements(logits, targets.detach().to(logits.dtype), kl)
    if reduction == "sum" or (reduction == "mean" and logits.shape[0] == 0):
        loss = el.sum()
    else:
        rows = el.sum(-1)
        loss = rows.mean() if reduction == "mean" else rows
    return loss, _argmax(logits, return_argmax)


# ----------------------------------------------------------------------------------
# The chunk step of the fused algorithm, in torch
# ----------------------------------------------------------------------------------

def chunk_loss_and_grad(logits: Tensor, labels: Optional[Tensor], targets: Optional[Tensor], ignore_index: int,
                        kl: bool, scale: Tensor, write_grad: bool) -> tuple[Tensor, Tensor]:
    """One chunk of rows: per-row loss and argmax; with ``write_grad`` the logits are
    overwritten (in place, in their dtype) by the gradient of ``sum_i scale_i * loss_i``.

    logits (n,V) in the inputs' dtype (fp32/fp16/bf16/fp64), labels (n,) int64 or
    targets (n,V); scale (n,) or (1,) in the compute dtype.  Hard labels: loss
    ``lse - z_label`` (0 on ignored rows), gradient ``softmax - onehot`` (0 on ignored
    rows); an out-of-range label gives a NaN loss.  Soft: loss ``S*lse - sum t z``
    with ``S = sum t`` (plus ``sum xlogy(t, t)`` for KL), gradient ``softmax * S - t``.
    Returns (loss (n,) compute dtype, argmax (n,) int64).
    """
    ct = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(ct)
    V = z.shape[1]
    lse = torch.logsumexp(z, -1)
    argmax = z.argmax(-1)
    if labels is not None:
        valid = labels != ignore_index
        in_range = (labels >= 0) & (labels < V)
        safe = torch.where(valid & in_range, labels, 0)
        zl = z.gather(1, safe[:, None])[:, 0]
        loss = torch.where(valid, torch.where(in_range, lse - zl, float("nan")), 0.0)
        if write_grad:
            g = torch.exp(z - lse[:, None])
            g.scatter_add_(1, safe[:, None], -(valid & in_range).to(ct)[:, None])
            g.mul_(torch.where(valid, scale.to(ct).expand(z.shape[0]), 0.0)[:, None])
            logits.copy_(g)
    else:
        t = targets.to(ct)
        s = t.sum(-1)
        loss = s * lse - (t * z).sum(-1)
        if kl:
            loss = loss + torch.xlogy(t, t).sum(-1)
        if write_grad:
            g = torch.exp(z - lse[:, None]) * s[:, None] - t
            g.mul_(scale.to(ct).expand(z.shape[0])[:, None])
            logits.copy_(g)
    return loss, argmax
