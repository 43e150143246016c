"""Triton side of vlfast's dropout RNG.

``philox_keep(seed, counters, threshold)`` is the one helper every Triton kernel with
dropout calls (``from vlfast.kernels.dropout_mask.triton import philox_keep``): for an
int64 block of counters it returns the bool block "kept", bit-for-bit equal to
``reference.keep_from_counters`` and to ``philox_keep`` in ``csrc/dropout/philox.cuh``.

``keep_mask_triton`` fills a whole mask (element ``i`` uses counter ``offset + i``); on
CPU tensors it runs only under ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def philox_keep(seed, counters, threshold):
    """Keep flags for a block of int64 ``counters`` (values in [0, 2**63)).

    ``tl.randint`` on an int64 block is Philox4x32-10 with key (seed lo, seed hi) and
    counter (lo, hi, 0, 0); an element is kept iff its top 24 bits are >= ``threshold``
    (an int in [0, 2**24]).
    """
    r = tl.randint(seed, counters.to(tl.int64)).to(tl.uint32, bitcast=True)
    return (r >> 8).to(tl.int32) >= threshold


@triton.jit
def _keep_mask_kernel(out_ptr, n, seed, offset, threshold, BLOCK: tl.constexpr):
    # out: (n,) bool/uint8.  Element i of the mask uses counter offset + i.
    pid = tl.program_id(0).to(tl.int64)
    idx = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    in_range = idx < n
    keep = philox_keep(seed, idx + offset, threshold)
    tl.store(out_ptr + idx, keep.to(tl.uint8), mask=in_range)


def keep_mask_triton(out: Tensor, seed: int, offset: int, threshold: int, block: int = 1024) -> Tensor:
    """Fill the contiguous bool/uint8 tensor ``out`` (any shape, n elements) in C order
    with keep flags: ``out.view(-1)[i] = philox_keep(seed, offset + i, threshold)``.
    Returns ``out``."""
    if not out.is_contiguous() or out.dtype not in (torch.bool, torch.uint8):
        raise ValueError(f"keep_mask_triton: out: expected a contiguous bool/uint8 tensor, "
                         f"got {out.dtype}, contiguous={out.is_contiguous()}")
    n = out.numel()
    if n == 0:
        return out
    flat = out.view(torch.uint8).view(-1)
    grid = (triton.cdiv(n, block),)
    _keep_mask_kernel[grid](flat, n, int(seed), int(offset), int(threshold), BLOCK=block)
    return out
