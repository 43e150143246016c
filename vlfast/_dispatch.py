"""Backend choice per op, with a readable reason for every backend that cannot run.

Backends:

* ``reference`` -- eager PyTorch (``kernels/<op>/reference.py``); always available.
* ``triton``    -- ``@triton.jit`` kernels; CUDA tensors, or CPU tensors under
  ``TRITON_INTERPRET=1`` when forced (``auto`` never picks the interpreter).
* ``cuda``      -- the CUDA kernels of ``csrc/`` inside ``vlfast._C``.
* ``cpp``       -- the C++ (OpenMP) CPU drivers of ``csrc/`` inside ``vlfast._C``.

The backend is requested with ``VLFAST_BACKEND=auto|reference|triton|cuda|cpp`` or,
taking precedence, the context manager :func:`backend`.  Under ``auto`` an op picks,
in its declared order, the first backend whose check passes for the given device
and inputs.  Forcing a backend that cannot run raises :class:`BackendError` naming
every backend and why it cannot run.

``VLFAST_REQUIRE_BACKENDS=cpp,triton`` (``.ci/run`` sets it) makes a missing
extension an error at import instead of a warning, so CI never tests the
reference in place of a kernel.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

BACKENDS: tuple[str, ...] = ("reference", "triton", "cuda", "cpp")
_CHOICES = ("auto",) + BACKENDS

# Stack of forced backends.  A plain module global (not a ContextVar) so that
# torch.compile can read it while tracing: dynamo guards on it and recompiles when a
# ``backend()`` block changes it.
_FORCED: list[str] = []


class BackendError(RuntimeError):
    """A requested backend cannot run the op on the given inputs."""


def _check_name(name: str, where: str) -> str:
    if name not in _CHOICES:
        raise ValueError(f"{where}: expected one of {', '.join(_CHOICES)}, got {name!r}")
    return name


def requested_backend() -> str:
    """The backend asked for right now: the innermost :func:`backend` context, else
    ``$VLFAST_BACKEND``, else ``"auto"``."""
    if _FORCED:
        return _FORCED[-1]
    return _check_name(os.environ.get("VLFAST_BACKEND", "auto").strip().lower() or "auto", "VLFAST_BACKEND")


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """Force a backend for every vlfast op called inside the block.

    ``with vlfast.ops.backend("triton"): out = attention(q, k, v)``.  The backward of
    an op runs on the backend its forward ran on, wherever ``backward()`` is called.
    """
    _FORCED.append(_check_name(str(name).strip().lower(), "backend(name)"))
    try:
        yield
    finally:
        _FORCED.pop()


# ----------------------------------------------------------------------------------
# What is installed and built
# ----------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def cpp_extension() -> tuple[object, Optional[str]]:
    """(module, None) when ``vlfast._C`` imports, else (None, reason)."""
    try:
        mod = importlib.import_module("vlfast._C")
    except Exception as e:  # noqa: BLE001 -- any failure means "not built / broken"
        return None, f"vlfast._C could not be imported ({type(e).__name__}: {e})"
    return mod, None


def cuda_built() -> tuple[bool, Optional[str]]:
    """Whether ``vlfast._C`` carries the CUDA kernels."""
    mod, why = cpp_extension()
    if mod is None:
        return False, why
    if not mod.has_cuda():
        return False, "vlfast._C was built without CUDA (no nvcc at build time, or VLFAST_SKIP_CUDA_BUILD=1)"
    return True, None


@functools.lru_cache(maxsize=None)
def triton_module() -> tuple[object, Optional[str]]:
    """(triton, None) when triton imports, else (None, reason)."""
    try:
        mod = importlib.import_module("triton")
    except Exception as e:  # noqa: BLE001
        return None, f"triton could not be imported ({type(e).__name__}: {e})"
    return mod, None


def triton_interpret() -> bool:
    """True when ``TRITON_INTERPRET=1`` is set (it must be set before kernels are imported)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# ----------------------------------------------------------------------------------
# Per-op registry
# ----------------------------------------------------------------------------------

Check = Callable[..., Optional[str]]


@dataclass(frozen=True)
class _Impl:
    backend: str
    check: Check  # check(device_type, **facts) -> None when it can run, else the reason


_REGISTRY: dict[str, dict[str, _Impl]] = {}
_ORDER: dict[str, dict[str, tuple[str, ...]]] = {}


def register_op(op: str, *, cuda_order: tuple[str, ...], cpu_order: tuple[str, ...],
                checks: dict[str, Check]) -> None:
    """Declare an op's backends.

    ``checks`` maps each backend the op implements to a function
    ``check(device_type, **facts) -> Optional[str]``; backends not listed get the
    reason "<op> has no <backend> implementation".  ``cuda_order``/``cpu_order`` give
    the preference of ``auto`` for CUDA and CPU tensors (``reference`` is always last).
    """
    _REGISTRY[op] = {b: _Impl(b, c) for b, c in checks.items()}
    _ORDER[op] = {"cuda": tuple(cuda_order), "cpu": tuple(cpu_order)}


def ops() -> list[str]:
    return sorted(_REGISTRY)


def _reason(op: str, b: str, device_type: str, facts: dict) -> Optional[str]:
    impl = _REGISTRY[op].get(b)
    if impl is None:
        return f"{op} has no {b} implementation"
    return impl.check(device_type, **facts)


def explain(op: str, device_type: str, **facts) -> list[tuple[str, Optional[str]]]:
    """For each backend: (name, None) if it can run ``op`` on ``device_type``, else
    (name, reason)."""
    if op not in _REGISTRY:
        raise KeyError(f"unknown op {op!r}; known: {', '.join(ops())}")
    return [(b, _reason(op, b, device_type, facts)) for b in BACKENDS]


def _auto_order(op: str, device_type: str) -> tuple[str, ...]:
    order = _ORDER[op]["cuda" if device_type == "cuda" else "cpu"]
    return tuple(b for b in order if b != "reference") + ("reference",)


def select(op: str, device_type: str, requested: Optional[str] = None, **facts) -> str:
    """The backend that runs ``op`` for tensors on ``device_type`` with the given facts.

    ``requested`` defaults to :func:`requested_backend`.  Raises :class:`BackendError`
    when a forced backend cannot run, listing every backend and why.
    """
    req = _check_name(requested if requested is not None else requested_backend(), "backend")
    if req == "auto":
        for b in _auto_order(op, device_type):
            if b == "triton" and device_type != "cuda":
                continue  # auto never runs the Triton interpreter
            if _reason(op, b, device_type, facts) is None:
                _warn_fallback(op, device_type, b)
                return b
        return "reference"
    why = _reason(op, req, device_type, facts)
    if why is None:
        return req
    lines = [f"vlfast.ops.{op}: backend {req!r} cannot run on {device_type} tensors here."]
    for b, r in explain(op, device_type, **facts):
        lines.append(f"  {b:9s}: {'available' if r is None else r}")
    lines.append("Pick another with VLFAST_BACKEND or vlfast.ops.backend(name), or use 'auto'.")
    raise BackendError("\n".join(lines))


_warned: set[tuple[str, str]] = set()


def _warn_fallback(op: str, device_type: str, chosen: str) -> None:
    """One warning per (op, device) when auto lands on the reference although the op
    has a compiled backend for that device that is missing."""
    if chosen != "reference" or (op, device_type) in _warned:
        return
    preferred = [b for b in _auto_order(op, device_type) if b != "reference"
                 and not (b == "triton" and device_type != "cuda")]
    missing = [(b, _reason(op, b, device_type, {})) for b in preferred if b in _REGISTRY[op]]
    missing = [(b, r) for b, r in missing if r is not None and ("could not be imported" in r or "built without" in r)]
    if missing:
        _warned.add((op, device_type))
        warnings.warn(f"vlfast.ops.{op} falls back to the reference on {device_type}: "
                      + "; ".join(f"{b}: {r}" for b, r in missing), RuntimeWarning, stacklevel=4)


# ----------------------------------------------------------------------------------
# Common checks
# ----------------------------------------------------------------------------------

def check_triton(device_type: str, **_: object) -> Optional[str]:
    """Triton can run on CUDA tensors, or on CPU tensors under the interpreter."""
    mod, why = triton_module()
    if mod is None:
        return why
    if device_type == "cuda":
        return None
    if device_type == "cpu":
        if triton_interpret():
            return None
        return ("CPU tensors run Triton only under the interpreter: set TRITON_INTERPRET=1 "
                "before vlfast's kernels are imported")
    return f"Triton does not run on {device_type} tensors"


def check_cpp(device_type: str, **_: object) -> Optional[str]:
    mod, why = cpp_extension()
    if mod is None:
        return why
    if device_type != "cpu":
        return f"the C++ driver runs on CPU tensors, these are on {device_type}"
    return None


def check_cuda(device_type: str, **_: object) -> Optional[str]:
    ok, why = cuda_built()
    if not ok:
        return why
    if device_type != "cuda":
        return f"the CUDA kernel runs on CUDA tensors, these are on {device_type}"
    return None


def check_reference(device_type: str, **_: object) -> Optional[str]:
    return None


# ----------------------------------------------------------------------------------
# Import-time health check
# ----------------------------------------------------------------------------------

def required_backends() -> list[str]:
    raw = os.environ.get("VLFAST_REQUIRE_BACKENDS", "")
    req = [x.strip().lower() for x in raw.split(",") if x.strip()]
    bad = [x for x in req if x not in BACKENDS]
    if bad:
        raise ValueError(f"VLFAST_REQUIRE_BACKENDS: expected a comma list of {', '.join(BACKENDS)}, "
                         f"got {raw!r}")
    return req


def health_check() -> None:
    """Warn once (or, for backends in ``VLFAST_REQUIRE_BACKENDS``, raise) when a compiled
    backend is missing."""
    required = required_backends()
    problems: dict[str, str] = {}
    mod, why = cpp_extension()
    if mod is None:
        problems["cpp"] = why
        problems["cuda"] = why
    else:
        ok, why_cuda = cuda_built()
        if not ok:
            problems["cuda"] = why_cuda
    tmod, twhy = triton_module()
    if tmod is None:
        problems["triton"] = twhy
    fatal = {b: problems[b] for b in required if b in problems}
    if fatal:
        raise ImportError("VLFAST_REQUIRE_BACKENDS=" + ",".join(required) + " but: "
                          + "; ".join(f"{b}: {r}" for b, r in fatal.items()))
    if "cpp" in problems:
        warnings.warn(f"vlfast: {problems['cpp']}; ops fall back to the reference (PyTorch) path. "
                      "Reinstall with `pip install .` to build it.", RuntimeWarning, stacklevel=3)
