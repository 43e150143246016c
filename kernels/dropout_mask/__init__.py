"""Counter-based (Philox4x32-10) dropout RNG shared by every dropout in vlfast.

``keep_mask(shape, p, seed, offset=0, device="cpu")`` -> bool mask, True = keep;
``dropout_threshold(p)`` -> the 24-bit integer threshold the kernels compare against.
Triton kernels import ``philox_keep`` from ``vlfast.kernels.dropout_mask.triton``.
"""
from .op import keep_mask
from .reference import dropout_threshold

__all__ = ["keep_mask", "dropout_threshold"]
