"""Input checks shared by the ops: every message names the argument, what was
expected and what was given."""
from __future__ import annotations

import math
import os
from typing import Optional, Sequence

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
