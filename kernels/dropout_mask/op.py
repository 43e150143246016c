"""Public keep-mask helper: the dropout decisions of vlfast's counter-based RNG.

``keep_mask(shape, p, seed, offset)`` returns the bool mask (True = keep) that every
vlfast dropout with this ``(seed, offset)`` applies, element ``i`` (C order) using
Philox counter ``offset + i``.  The backends -- ``cpp`` (OpenMP, CPU), ``cuda``
(``vlfast._C``), ``triton`` (CUDA, or CPU under ``TRITON_INTERPRET=1`` when forced) and
``reference`` (PyTorch) -- agree bit for bit; ``vlfast._dispatch`` chooses among them.

There is no autograd here, so this is a plain function rather than a custom op.
"""
from __future__ import annotations

import math
import operator
from typing import Optional, Union

import torch
from torch import Tensor

from vlfast import _dispatch

from . import reference as _ref
from .reference import MAX_COUNTER, MAX_SEED, ShapeLike, dropout_threshold, normalize_shape

OP = "keep_mask"


# ----------------------------------------------------------------------------------
# Backend checks
# ----------------------------------------------------------------------------------

def _has_fn(name: str) -> Optional[str]:
    mod, why = _dispatch.cpp_extension()
    if mod is None:
        return why
    if not hasattr(mod, name):
        return f"vlfast._C has no {name} (an old build? reinstall with `pip install .`)"
    return None


def check_reference(device_type: str, **facts: object) -> Optional[str]:
    return _dispatch.check_reference(device_type, **facts)


def check_cpp(device_type: str, **facts: object) -> Optional[str]:
    return _dispatch.check_cpp(device_type, **facts) or _has_fn("keep_mask_cpu")


def check_cuda(device_type: str, **facts: object) -> Optional[str]:
    return _dispatch.check_cuda(device_type, **facts) or _has_fn("keep_mask_cuda")


def check_triton(device_type: str, **facts: object) -> Optional[str]:
    return _dispatch.check_triton(device_type, **facts)


_dispatch.register_op(OP, cuda_order=("cuda", "triton"), cpu_order=("cpp",),
                      checks={"reference": check_reference, "cpp": check_cpp, "cuda": check_cuda,
                              "triton": check_triton})


# ----------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------

def _fail(arg: str, expected: str, got: object) -> None:
    raise ValueError(f"vlfast.ops.{OP}: {arg}: expected {expected}, got {got}")


def _as_int(arg: str, value: object, lo: int, hi: int, expected: str) -> int:
    if isinstance(value, bool) or isinstance(value, float):
        _fail(arg, expected, f"{value!r} ({type(value).__name__})")
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.dtype.is_floating_point or value.dtype == torch.bool:
            _fail(arg, expected, f"a {value.dtype} tensor of shape {tuple(value.shape)}")
        value = int(value.item())
    try:
        v = operator.index(value)
    except TypeError:
        _fail(arg, expected, f"{value!r} ({type(value).__name__})")
    if not (lo <= v < hi):
        _fail(arg, expected, v)
    return v


def _as_device(device: Union[str, torch.device, int, None]) -> torch.device:
    try:
        dev = torch.device("cpu") if device is None else torch.device(device)
    except (RuntimeError, TypeError) as e:
        _fail("device", "a torch.device or a string like 'cpu' / 'cuda:0'", f"{device!r} ({e})")
    if dev.type not in ("cpu", "cuda"):
        _fail("device", "a cpu or cuda device", dev)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


# ----------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------

def keep_mask(shape: ShapeLike, p: float, seed: int, offset: int = 0,
              device: Union[str, torch.device] = "cpu") -> Tensor:
    """Dropout keep mask of ``shape`` (bool, True = keep) for drop probability ``p``.

    Args:
        shape: an int ``n`` or a sequence of non-negative ints, e.g. ``(B, H, Lq, Lk)``.
        p: drop probability, a float in ``[0, 1)``; ``p = 0`` keeps everything.  The
            keep probability is ``1 - dropout_threshold(p) / 2**24``.
        seed: Philox key, an int in ``[0, 2**63)``.
        offset: first Philox counter, an int ``>= 0`` with ``offset + numel <= 2**63``.
        device: where the mask is made (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...).
    Returns:
        bool tensor of ``shape`` on ``device``; the element at C-order linear index ``i``
        is ``(philox_u32(seed, offset + i) >> 8) >= dropout_threshold(p)``.

    The backend follows ``VLFAST_BACKEND`` / ``vlfast.ops.backend(...)``: ``auto`` uses
    the C++ driver on CPU and the CUDA kernel (else Triton) on GPU; all agree bit for bit.
    """
    dims = normalize_shape(shape)
    try:
        threshold = dropout_threshold(p)
    except ValueError as e:
        raise ValueError(f"vlfast.ops.{OP}: {e}") from None
    seed = _as_int("seed", seed, 0, MAX_SEED, "an int in [0, 2**63)")
    offset = _as_int("offset", offset, 0, MAX_COUNTER, "an int in [0, 2**63)")
    n = math.prod(dims)
    if offset + n > MAX_COUNTER:
        _fail("offset", f"offset + numel <= 2**63 (numel = {n})", offset)
    dev = _as_device(device)

    backend = _dispatch.select(OP, dev.type)
    if backend == "reference":
        return _ref.keep_mask(dims, p, seed, offset, device=dev)
    out = torch.empty(dims, dtype=torch.bool, device=dev)
    if n == 0:
        return out
    if backend == "cpp":
        mod, _ = _dispatch.cpp_extension()
        mod.keep_mask_cpu(out.data_ptr(), n, seed, offset, threshold)
    elif backend == "cuda":
        mod, _ = _dispatch.cpp_extension()
        with torch.cuda.device(dev):
            stream = torch.cuda.current_stream(dev).cuda_stream
            mod.keep_mask_cuda(out.data_ptr(), n, seed, offset, threshold, stream)
    elif backend == "triton":
        from .triton import keep_mask_triton

        if dev.type == "cuda":
            with torch.cuda.device(dev):
                keep_mask_triton(out, seed, offset, threshold)
        else:
            keep_mask_triton(out, seed, offset, threshold)
    else:  # pragma: no cover -- select() only returns registered backends
        raise AssertionError(f"unexpected backend {backend!r}")
    return out


__all__ = ["keep_mask", "dropout_threshold", "OP"]
