"""Dropout keep masks from a counter-based RNG, in plain PyTorch (the oracle).

Every dropout in vlfast decides element by element from a *counter*: the element
at C-order linear index ``i`` of a mask generated with ``(seed, offset)`` uses
counter ``offset + i`` and is kept iff::

    (philox_u32(seed, offset + i) >> 8) >= dropout_threshold(p)

``philox_u32`` is the first output word of Philox4x32-10 (Salmon et al., SC'11)
with key ``(seed & 0xffffffff, seed >> 32)`` and counter
``(counter & 0xffffffff, counter >> 32, 0, 0)`` -- exactly what Triton's
``tl.randint(seed, offset)`` returns for an int64 ``offset``.  The keep probability
is ``1 - threshold / 2**24``.  The C++/CUDA (``csrc/dropout/philox.cuh``) and Triton
(``triton.py``) versions agree with this file bit for bit.

torch has no uint32 arithmetic, so the 32-bit words live in int64 tensors; the
32x32-bit products are formed from 16-bit halves so no intermediate exceeds 2**34.
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch
from torch import Tensor

PHILOX_ROUND_A = 0xD2511F53
PHILOX_ROUND_B = 0xCD9E8D57
PHILOX_KEY_A = 0x9E3779B9
PHILOX_KEY_B = 0xBB67AE85
PHILOX_ROUNDS = 10
THRESHOLD_BITS = 24
THRESHOLD_MAX = 1 << THRESHOLD_BITS  # threshold 2**24 keeps nothing
MASK32 = 0xFFFFFFFF
MAX_SEED = 1 << 63  # seeds live in [0, 2**63): a Triton int64 kernel argument
MAX_COUNTER = 1 << 63  # offset + numel <= 2**63: counters are int64

ShapeLike = Union[int, Sequence[int], torch.Size]


def dropout_threshold(p: float) -> int:
    """The integer threshold of drop probability ``p``: ``min(2**24, int(p * 2**24 + 0.5))``.

    An element is kept iff the top 24 bits of its Philox word are ``>= threshold``, so
    the keep probability is ``1 - threshold / 2**24`` (``p`` rounded to a multiple of
    ``2**-24``).  ``p`` must be a float in ``[0, 1)``; ``p = 0`` keeps everything.
    """
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise ValueError(f"dropout_p: expected a float in [0, 1), got {p!r} ({type(p).__name__})")
    pf = float(p)
    if not (0.0 <= pf < 1.0):  # also rejects NaN
        raise ValueError(f"dropout_p: expected a float in [0, 1), got {pf!r}")
    return min(THRESHOLD_MAX, int(pf * THRESHOLD_MAX + 0.5))


def _mul32(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """(hi, lo) 32-bit words of the 64-bit product of the constant ``a`` and the uint32
    values in ``b`` (int64 tensor), computed from 16-bit halves so nothing overflows."""
    ah, al = a >> 16, a & 0xFFFF
    bh, bl = b >> 16, b & 0xFFFF
    mid = ah * bl + al * bh  # < 2**33
    t = al * bl + ((mid & 0xFFFF) << 16)  # < 2**33
    lo = t & MASK32
    hi = (ah * bh + (mid >> 16) + (t >> 32)) & MASK32
    return hi, lo


def philox_u32(seed: int, counters: Tensor) -> Tensor:
    """First word of Philox4x32-10 for each counter.

    Args:
        seed: int in ``[0, 2**64)``; key = (seed low 32 bits, seed high 32 bits).
        counters: int64 tensor of any shape, values in ``[0, 2**63)``; counter words =
            (low 32 bits, high 32 bits, 0, 0).
    Returns:
        int64 tensor of the same shape holding the uint32 results in ``[0, 2**32)``.
    """
    if counters.dtype != torch.int64:
        raise ValueError(f"philox_u32: counters: expected an int64 tensor, got {counters.dtype}")
    seed = int(seed)
    if not (0 <= seed < (1 << 64)):
        raise ValueError(f"philox_u32: seed: expected an int in [0, 2**64), got {seed}")
    c0 = counters & MASK32
    c1 = (counters >> 32) & MASK32
    c2 = torch.zeros_like(counters)
    c3 = torch.zeros_like(counters)
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    for _ in range(PHILOX_ROUNDS):
        hi_b, lo_b = _mul32(PHILOX_ROUND_B, c2)
        hi_a, lo_a = _mul32(PHILOX_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + PHILOX_KEY_A) & MASK32
        k1 = (k1 + PHILOX_KEY_B) & MASK32
    return c0


def keep_from_counters(seed: int, counters: Tensor, threshold: int) -> Tensor:
    """Bool tensor shaped like ``counters``: True where ``philox_u32 >> 8 >= threshold``."""
    return (philox_u32(seed, counters) >> 8) >= threshold


def normalize_shape(shape: ShapeLike) -> tuple[int, ...]:
    """``shape`` as a tuple of non-negative ints (an int ``n`` means ``(n,)``)."""
    if isinstance(shape, bool):
        raise ValueError(f"keep_mask: shape: expected an int or a sequence of non-negative ints, got {shape!r}")
    if isinstance(shape, int) or (isinstance(shape, Tensor) and shape.dim() == 0):
        shape = (int(shape),)
    try:
        dims = tuple(shape)
    except TypeError:
        raise ValueError(f"keep_mask: shape: expected an int or a sequence of non-negative ints, "
                         f"got {shape!r} ({type(shape).__name__})") from None
    out = []
    for d in dims:
        if isinstance(d, bool) or not hasattr(d, "__index__"):
            raise ValueError(f"keep_mask: shape: expected a sequence of non-negative ints, got {shape!r}")
        d = d.__index__()
        if d < 0:
            raise ValueError(f"keep_mask: shape: expected non-negative sizes, got {tuple(shape)!r}")
        out.append(d)
    return tuple(out)


def keep_mask(shape: ShapeLike, p: float, seed: int, offset: int = 0,
              device: Union[str, torch.device] = "cpu") -> Tensor:
    """Reference keep mask: bool tensor of ``shape`` on ``device``, True = keep.

    The element at C-order linear index ``i`` is kept iff
    ``philox_u32(seed, offset + i) >> 8 >= dropout_threshold(p)``.  Arguments are not
    re-validated beyond ``p``; :func:`vlfast.kernels.dropout_mask.keep_mask` checks them.
    """
    dims = normalize_shape(shape)
    threshold = dropout_threshold(p)
    n = math.prod(dims)
    counters = torch.arange(n, dtype=torch.int64, device=device) + int(offset)
    return keep_from_counters(seed, counters, threshold).reshape(dims)
