"""Helpers for checking kernels against eager PyTorch and an fp64 oracle.

The rule (flash-attention's): in a given dtype, a kernel's error against the fp64
oracle may be at most ``factor`` times the error of plain PyTorch ops computing the
same thing in that dtype, plus a small absolute floor.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

FLOORS = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 1e-3, torch.bfloat16: 1e-3}


def max_abs_err(a: Tensor, b: Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def assert_close_to_oracle(name: str, got: Tensor, eager: Tensor, oracle: Tensor, *, factor: float = 2.0,
                           floor: Optional[float] = None) -> None:
    """Assert ``|got - oracle| <= factor * |eager - oracle| + floor`` (max norms).

    got: the kernel's result; eager: plain PyTorch in the same dtype; oracle: fp64.
    """
    if got.shape != oracle.shape:
        raise AssertionError(f"{name}: shape {tuple(got.shape)} != oracle {tuple(oracle.shape)}")
    if not torch.isfinite(got).all():
        raise AssertionError(f"{name}: non-finite values in the kernel's result")
    fl = FLOORS.get(got.dtype, 1e-3) if floor is None else floor
    err = max_abs_err(got, oracle)
    base = max_abs_err(eager, oracle)
    if err > factor * base + fl:
        raise AssertionError(f"{name}: error {err:.3e} vs fp64 > {factor} x eager's {base:.3e} + {fl:.0e} "
                             f"({str(got.dtype).replace('torch.', '')})")


def eager_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor] = None,
                    scale: Optional[float] = None, keep_mask: Optional[Tensor] = None,
                    dropout_p: float = 0.0) -> Tensor:
    """Plain PyTorch attention in the inputs' own dtype (matmul, softmax, matmul): the
    baseline whose error the kernels are allowed to double.  q (B,H,Lq,D),
    k/v (B,H,Lk,D), key_mask (B,Lk) bool; rows with no real key give zeros."""
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if key_mask is not None:
        m = key_mask[:, None, None, :]
        s = s.masked_fill(~m, float("-inf"))
        empty = ~key_mask.any(-1)[:, None, None, None]
        s = s.masked_fill(empty, 0.0)
        p = torch.softmax(s, dim=-1).masked_fill(empty | ~m, 0.0)
    else:
        p = torch.softmax(s, dim=-1)
    if keep_mask is not None:
        p = p * keep_mask.to(p.dtype) / (1.0 - dropout_p)
    return torch.matmul(p, v)
