"""Input checks shared by the ops: every message names the argument, what was
expected and what was given."""
from __future__ import annotations

import functools
import inspect
import math
import os
from typing import Any, Callable, Optional, Sequence, TypeVar

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def fail(op: str, arg: str, expected: str, got: object) -> None:
    raise ValueError(f"vlfast.ops.{op}: {arg}: expected {expected}, got {got}")


def check_tensor(op: str, name: str, t: object, *, ndim: Optional[int] = None, shape_doc: str = "",
                 dtypes: Optional[Sequence[torch.dtype]] = None) -> Tensor:
    if not isinstance(t, torch.Tensor):
        fail(op, name, "a torch.Tensor", type(t).__name__)
    if ndim is not None and t.dim() != ndim:
        fail(op, name, f"a {ndim}-d tensor {shape_doc}".rstrip(), f"shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        fail(op, name, "dtype " + " or ".join(str(d).replace("torch.", "") for d in dtypes),
             str(t.dtype).replace("torch.", ""))
    return t


def check_same(op: str, names: Sequence[str], tensors: Sequence[Tensor]) -> None:
    """Same device and dtype for all."""
    d0, t0 = names[0], tensors[0]
    for n, t in zip(names[1:], tensors[1:]):
        if t.device != t0.device:
            fail(op, n, f"the device of {d0} ({t0.device})", t.device)
        if t.dtype != t0.dtype:
            fail(op, n, f"the dtype of {d0} ({str(t0.dtype).replace('torch.', '')})",
                 str(t.dtype).replace("torch.", ""))


def check_dropout(op: str, dropout_p: float) -> float:
    if not isinstance(dropout_p, (int, float)) or isinstance(dropout_p, bool):
        fail(op, "dropout_p", "a float in [0, 1)", repr(dropout_p))
    p = float(dropout_p)
    if not (0.0 <= p < 1.0):
        fail(op, "dropout_p", "a float in [0, 1)", p)
    return p


def check_scale(op: str, scale: Optional[float], head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(float(scale)):
        fail(op, "scale", "a finite float or None", repr(scale))
    return float(scale)


def value_checks_enabled(t: Tensor) -> bool:
    """Checks that read tensor values: always on CPU, on CUDA only with VLFAST_CHECK=1
    (they cost a host sync)."""
    return t.device.type == "cpu" or os.environ.get("VLFAST_CHECK", "0") == "1"


def draw_seed() -> int:
    """A Philox seed drawn from torch's default generator (so torch.manual_seed
    makes dropout reproducible)."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64).item())


# ----------------------------------------------------------------------------------
# Autocast rule of the public ops
# ----------------------------------------------------------------------------------

_F = TypeVar("_F", bound=Callable[..., Any])
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")
AUTOCAST_POLICIES = ("lower", "fp32")


def _first_device_type(args: Sequence[Any], kwargs: dict[str, Any]) -> Optional[str]:
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a.device.type
    return None


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast computes in on ``device_type``, or None when autocast is off there."""
    if device_type not in _AUTOCAST_DEVICES or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def autocast_op(policy: str = "lower", *, keep: Sequence[str] = ()) -> Callable[[_F], _F]:
    """The autocast rule of a public op, as torch applies its own at the op boundary
    (``torch.library.register_autocast`` semantics, with the dtype of the autocast region
    that is active instead of a fixed one).

    Outside autocast the op is called as is.  Inside an autocast region on the inputs'
    device, every floating-point tensor argument (fp16/bf16/fp32; fp64 is left alone, as
    torch does) except those named in ``keep`` is cast to

    * ``"lower"``: the autocast dtype (fp16 or bf16) -- the op computes in it and keeps
      its statistics (LayerNorm moments, softmax sums, loss accumulation) in fp32, as its
      kernels always do; like ``F.linear`` under autocast, the parameters (fp32) are cast
      down, the activations (already half) pass through, and gradients flow back to the
      parameters' dtype through the cast;
    * ``"fp32"``: fp32 -- for the iterative optimal-transport solvers, which torch would
      put on its fp32 list (UNITER runs its OT in fp32 for stability too).

    The op body then runs with autocast disabled, so the reference's own torch calls do
    not re-cast what the rule decided.  The same on CPU and CUDA.
    """
    if policy not in AUTOCAST_POLICIES:
        raise ValueError(f"autocast_op: policy: expected one of {AUTOCAST_POLICIES}, got {policy!r}")
    skip = frozenset(keep)

    def deco(fn: _F) -> _F:
        names = list(inspect.signature(fn).parameters)
        kept_pos = frozenset(i for i, n in enumerate(names) if n in skip)

        def cast(t: Any, dtype: torch.dtype) -> Any:
            if isinstance(t, torch.Tensor) and t.dtype in (torch.float16, torch.bfloat16, torch.float32) \
                    and t.dtype != dtype:
                return t.to(dtype)
            return t

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            dev = _first_device_type(args, kwargs)
            low = None if dev is None else autocast_dtype(dev)
            if low is None:
                return fn(*args, **kwargs)
            dtype = low if policy == "lower" else torch.float32
            args = tuple(a if i in kept_pos else cast(a, dtype) for i, a in enumerate(args))
            kwargs = {k: v if k in skip else cast(v, dtype) for k, v in kwargs.items()}
            with torch.autocast(device_type=dev, enabled=False):
                return fn(*args, **kwargs)

        return wrapper  # type: ignore[return-value]

    return deco
