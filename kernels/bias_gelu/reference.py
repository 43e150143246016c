"""Bias + erf GELU in plain PyTorch: the oracle and the CPU path.

Shapes: x (..., E), bias (E,).  The forward is exactly ``F.gelu(x + bias)`` (BERT's
``gelu(dense(h))`` with the dense layer's bias split off: on CPU fp32,
``F.gelu(F.linear(h, W) + b)`` is bitwise ``F.gelu(F.linear(h, W, b))``).  The
backward (:func:`bias_gelu_backward`) is written out in fp32 (fp64 for fp64 inputs):
the formula the Triton kernel implements.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

INV_SQRT2 = 1.0 / math.sqrt(2.0)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 for fp64 inputs, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def bias_gelu(x: Tensor, bias: Tensor) -> Tensor:
    """``F.gelu(x + bias)`` (erf GELU): x (..., E), bias (E,) -> (..., E) in the
    promoted dtype of x and bias."""
    return F.gelu(x + bias)


def gelu_grad(h: Tensor) -> Tensor:
    """d gelu(h) / dh = Phi(h) + h * phi(h), with Phi/phi the normal cdf/pdf."""
    return 0.5 * (1.0 + torch.erf(h * INV_SQRT2)) + h * torch.exp(-0.5 * h * h) * INV_SQRT_2PI


def bias_gelu_backward(dout: Tensor, x: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """dx = dout * gelu'(x + bias) (..., E) and dbias = dx summed over all rows (E,), both
    in :func:`compute_dtype` (x + bias formed in that dtype)."""
    ct = compute_dtype(torch.promote_types(x.dtype, bias.dtype))
    h = x.to(ct) + bias.to(ct)
    dx = dout.to(ct) * gelu_grad(h)
    return dx, dx.reshape(-1, x.shape[-1]).sum(0)
