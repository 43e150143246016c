"""LayerNorm and dropout + residual + LayerNorm in plain PyTorch: the oracle and the
CPU path.

Shapes: x, residual (..., E); weight, bias (E,); mean, rstd (N,) over the N = prod(...)
rows.  The forwards are exactly the torch ops a BERT layer runs (``F.layer_norm``,
dropout as ``x * keep / (1 - p)``, ``+ residual``) in the inputs' dtypes, so a model
switched to the op keeps bitwise-identical outputs on CPU (dropout off).  The
backward (:func:`layer_norm_backward`) is written out in fp32 (fp64 for fp64 inputs)
from the saved statistics: the formula the Triton kernel implements.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the saved mean/rstd and of the backward's math: fp64 for fp64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-12) -> Tensor:
    """``F.layer_norm`` over the last dim: x (..., E), weight/bias (E,) -> (..., E)."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def dropout_add(x: Tensor, residual: Tensor, keep: Optional[Tensor] = None, dropout_p: float = 0.0) -> Tensor:
    """``dropout(x) + residual`` with the given keep mask (bool, like x; None = no dropout):
    ``x * keep / (1 - p) + residual``."""
    if keep is not None and dropout_p > 0.0:
        x = x * keep / (1.0 - dropout_p)
    return x + residual


def dropout_add_layer_norm(x: Tensor, residual: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-12,
                           dropout_p: float = 0.0, keep: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """(LayerNorm(prenorm), prenorm) with ``prenorm = dropout(x) + residual``; x, residual
    (..., E), keep bool (..., E) or None."""
    prenorm = dropout_add(x, residual, keep, dropout_p)
    return layer_norm(prenorm, weight, bias, eps), prenorm


def layer_norm_stats(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Per-row mean and 1/sqrt(var + eps) (biased variance) of x (N, E), in
    :func:`stats_dtype`: (N,), (N,)."""
    xf = x.to(stats_dtype(x.dtype))
    mean = xf.mean(-1)
    var = (xf - mean[:, None]).square().mean(-1)
    return mean, torch.rsqrt(var + eps)


def layer_norm_backward(dout: Tensor, x: Tensor, weight: Tensor, mean: Tensor, rstd: Tensor,
                        dprenorm: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``y = (x - mean) * rstd * weight + bias`` from the saved statistics.

    dout, x (N, E); weight (E,); mean, rstd (N,); dprenorm (N, E) or None: a gradient
    arriving at x from elsewhere (the returned pre-norm sum), added to dx.  With
    ``xhat = (x - mean) * rstd`` and ``g = dout * weight``::

        dx = rstd * (g - mean_E(g) - xhat * mean_E(g * xhat)) (+ dprenorm)
        dweight = sum_N(dout * xhat),  dbias = sum_N(dout)

    Returns dx (N, E), dweight (E,), dbias (E,) in fp32 (fp64 for fp64 inputs).
    """
    ct = stats_dtype(x.dtype)
    dy = dout.to(ct)
    xhat = (x.to(ct) - mean.to(ct)[:, None]) * rstd.to(ct)[:, None]
    g = dy * weight.to(ct)
    c1 = (g * xhat).mean(-1, keepdim=True)
    c2 = g.mean(-1, keepdim=True)
    dx = (g - c2 - xhat * c1) * rstd.to(ct)[:, None]
    if dprenorm is not None:
        dx = dx + dprenorm.to(ct)
    return dx, (dy * xhat).sum(0), dy.sum(0)
