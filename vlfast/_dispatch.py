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

The ``cuda`` backend also needs an NVIDIA driver new enough for the CUDA runtime
linked (statically) into ``vlfast._C``: :func:`cuda_driver_check` compares the two
the first time a CUDA tensor asks for it (at import when ``cuda`` is in
``VLFAST_REQUIRE_BACKENDS``, which then fails); with an older driver ``auto`` falls
back to Triton or the reference with one warning, naming the driver and the runtime.
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


# ----------------------------------------------------------------------------------
# Can the CUDA runtime of vlfast._C run on this driver?
# ----------------------------------------------------------------------------------

# Minimum NVIDIA driver (release major) for each CUDA runtime major, with CUDA's
# minor-version compatibility: a runtime of CUDA M.x runs on any driver of the M family
# or newer (one that reports CUDA >= M.0), except that PTX built by a newer toolkit
# cannot be JIT-compiled by an older driver -- vlfast._C ships SASS for its
# VLFAST_CUDA_ARCHS, so that only matters on newer GPUs.
#   CUDA 13.x: driver >= 580
#   CUDA 12.x: driver >= 525 (525.60.13 on Linux, 527.41 on Windows)
#   CUDA 11.x: driver >= 450 (450.80.02 on Linux, 452.39 on Windows)
# Source: NVIDIA, "CUDA Compatibility", section "Minor Version Compatibility", Table 1
# "CUDA Toolkit 11.x, 12.x, and 13.x Driver Version Ranges"
# (https://docs.nvidia.com/deploy/cuda-compatibility/minor-version-compatibility.html),
# and the CUDA Toolkit Release Notes' driver table for the exact minimum releases.
MIN_DRIVER_FOR_CUDA_RUNTIME: dict[int, int] = {13: 580, 12: 525, 11: 450}

_PROC_DRIVER_VERSION = "/proc/driver/nvidia/version"


def _cuda_version_str(v: int) -> str:
    """13000 -> "13.0", 12020 -> "12.2" (CUDA's 1000 * major + 10 * minor)."""
    return f"{v // 1000}.{(v % 1000) // 10}"


def cuda_runtime_version() -> Optional[int]:
    """CUDART_VERSION of the CUDA runtime inside ``vlfast._C`` (e.g. 13000); 0 when it was
    built without CUDA; None when unknown (no extension, or one too old to say).

    An extension older than ``_C.cuda_runtime_version`` still names its CUDA version in
    ``build_info()["cuda_version"]`` ("13.0"), which is used instead.
    """
    mod, _ = cpp_extension()
    if mod is None:
        return None
    try:
        if not mod.has_cuda():
            return 0
        fn = getattr(mod, "cuda_runtime_version", None)
        if fn is not None:
            return int(fn())
        major, minor = str(dict(mod.build_info())["cuda_version"]).split(".")[:2]
        return 1000 * int(major) + 10 * int(minor)
    except Exception:  # noqa: BLE001 -- an odd or old build: unknown, never a crash
        return None


def cuda_driver_version() -> Optional[int]:
    """The newest CUDA version the installed driver supports (``cudaDriverGetVersion``,
    e.g. 12020 for CUDA 12.2); 0 when no driver is installed; None when unknown (no
    extension, an extension without ``_C.cuda_driver_version``, or a failed query)."""
    mod, _ = cpp_extension()
    fn = getattr(mod, "cuda_driver_version", None) if mod is not None else None
    if fn is None:
        return None
    try:
        return int(fn())
    except Exception:  # noqa: BLE001
        return None


def _release_from_proc(path: Optional[str] = None) -> Optional[str]:
    """The release in the first line of ``path`` (default ``/proc/driver/nvidia/version``:
    "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug ..."), or None."""
    try:
        with open(path or _PROC_DRIVER_VERSION, encoding="utf-8", errors="replace") as f:
            line = f.readline()
    except OSError:
        return None
    for tok in line.split():
        if tok[:1].isdigit() and "." in tok and tok.replace(".", "").isdigit():
            return tok
    return None


def nvidia_driver_release() -> tuple[Optional[str], Optional[str]]:
    """(release, source) of the NVIDIA kernel driver, e.g. ``("535.104.05",
    "/proc/driver/nvidia/version")`` or ``(..., "nvml")``; ``(None, None)`` when unknown.

    Asks ``_C.nvidia_driver_release`` (``/proc``, then NVML through dlopen); an extension
    without it falls back to reading ``/proc/driver/nvidia/version`` here.
    """
    mod, _ = cpp_extension()
    fn = getattr(mod, "nvidia_driver_release", None) if mod is not None else None
    if fn is not None:
        try:
            got = fn()
        except Exception:  # noqa: BLE001
            got = None
        if got:
            return str(got[0]), str(got[1])
        return None, None
    rel = _release_from_proc()
    return (rel, _PROC_DRIVER_VERSION) if rel else (None, None)


def _release_major(release: Optional[str]) -> Optional[int]:
    try:
        return int(str(release).split(".")[0]) if release else None
    except ValueError:
        return None


def cuda_driver_problem(runtime_version: Optional[int], driver_version: Optional[int],
                        driver_release: Optional[str]) -> Optional[str]:
    """Why a CUDA runtime of ``runtime_version`` cannot run on this driver, or None when it
    can or when it cannot be told (unknown versions: the kernels then run and raise
    CUDA's own error, as before this check).

    ``driver_version`` (``cudaDriverGetVersion``) decides: it is what the CUDA runtime
    itself checks, and it also counts a CUDA forward-compatibility package whose libcuda
    is newer than the kernel module.  ``driver_release`` gives the message its driver
    number; when ``driver_version`` is unknown the release is compared with
    :data:`MIN_DRIVER_FOR_CUDA_RUNTIME`.
    """
    if not runtime_version:
        return None  # built without CUDA (cuda_built says so) or unknown
    if driver_version is not None and driver_version < 0:
        driver_version = None
    rt_major = runtime_version // 1000
    need = MIN_DRIVER_FOR_CUDA_RUNTIME.get(rt_major)
    need_txt = f"driver >= {need}" if need is not None else f"a driver that supports CUDA {rt_major}.0"
    rel_major = _release_major(driver_release)
    built = f"vlfast._C was built with CUDA {_cuda_version_str(runtime_version)}"
    update = f"update the NVIDIA driver to {need} or newer" if need is not None else "update the NVIDIA driver"
    if driver_version == 0:
        if driver_release:
            return (f"the NVIDIA kernel driver {driver_release} is loaded but its CUDA library (libcuda.so.1) "
                    f"was not found: cudaDriverGetVersion reports 0 ({built}, which needs {need_txt})")
        return f"no NVIDIA driver: cudaDriverGetVersion reports 0 ({built}, which needs {need_txt})"
    if driver_version is None:  # an extension that cannot ask the driver: judge by the release
        if rel_major is None or need is None or rel_major >= need:
            return None
        return (f"driver {rel_major} < {need} needed by the CUDA {rt_major} runtime ({built}): {update}, "
                "or rebuild vlfast._C with an older CUDA toolkit")
    if driver_version // 1000 >= rt_major:
        return None  # same major (minor-version compatibility) or newer (backward compatibility)
    dv = _cuda_version_str(driver_version)
    toolkit = f"CUDA {driver_version // 1000}.x" if driver_version >= 11000 else f"CUDA {dv} or older"
    fix = f"{update}, or rebuild vlfast._C with a {toolkit} toolkit"
    if rel_major is not None and need is not None and rel_major < need:
        return (f"driver {rel_major} < {need} needed by the CUDA {rt_major} runtime "
                f"(the driver supports CUDA {dv}, {built}): {fix}")
    drv = f"driver {driver_release}" if driver_release else "the driver"
    return f"{drv} supports CUDA {dv} < {rt_major}.0, {need_txt} needed by the CUDA {rt_major} runtime ({built}): {fix}"


@dataclass(frozen=True)
class CudaDriverCheck:
    """What :func:`cuda_driver_check` found."""

    runtime_version: Optional[int]  # CUDART_VERSION of vlfast._C; 0: built without CUDA; None: unknown
    driver_version: Optional[int]   # cudaDriverGetVersion; 0: no driver; None: unknown
    driver_release: Optional[str]   # e.g. "535.104.05"; None: unknown
    driver_release_source: Optional[str]  # "/proc/driver/nvidia/version", "nvml" or None
    problem: Optional[str]          # None: the CUDA kernels can run (or it cannot be told); else why not

    @property
    def driver_present(self) -> bool:
        """Whether there is an NVIDIA driver at all (then CUDA tensors may exist even when
        vlfast._C's kernels cannot run on it)."""
        return bool(self.driver_version) or self.driver_release is not None


@functools.lru_cache(maxsize=None)
def cuda_driver_check() -> CudaDriverCheck:
    """Compare the CUDA runtime of ``vlfast._C`` with the driver, once per process
    (``cuda_driver_check.cache_clear()`` asks again).  Creates no CUDA context."""
    runtime = cuda_runtime_version()
    if not runtime:  # no extension, built without CUDA, or unknown: nothing to compare
        return CudaDriverCheck(runtime, None, None, None, None)
    driver = cuda_driver_version()
    release, source = nvidia_driver_release()
    return CudaDriverCheck(runtime, driver, release, source, cuda_driver_problem(runtime, driver, release))


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
                _warn_driver_fallback(op, device_type, b)
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


_DRIVER_WARNED = ("*", "cuda-driver")  # the key in _warned once the driver warning was given


def _warn_driver_fallback(op: str, device_type: str, chosen: str) -> None:
    """One warning per process when ``auto`` passes over the ``cuda`` backend of an op on
    CUDA tensors because the driver is too old for the CUDA runtime of ``vlfast._C``."""
    if device_type != "cuda" or chosen == "cuda" or "cuda" not in _REGISTRY[op] or _DRIVER_WARNED in _warned:
        return
    if "cuda" not in _auto_order(op, device_type) or not cuda_built()[0]:
        return
    check = cuda_driver_check()
    if check.problem is None or not check.driver_present:
        return  # no driver, no CUDA tensors: nothing falls back
    _warned.add(_DRIVER_WARNED)
    with_cuda = ", ".join(o for o in ops() if "cuda" in _REGISTRY[o])
    warnings.warn(f"vlfast: the CUDA kernels of vlfast._C cannot run: {check.problem}. On CUDA tensors "
                  f"{with_cuda} fall back to Triton or the reference (vlfast.ops.{op} -> {chosen}); this is "
                  "warned once, and `python -m vlfast.info` lists every op's backend.", RuntimeWarning, stacklevel=4)


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
    """The CUDA kernels of ``vlfast._C`` run on CUDA tensors when the extension was built
    with CUDA and the driver supports its CUDA runtime (:func:`cuda_driver_check`)."""
    ok, why = cuda_built()
    if not ok:
        return why
    if device_type != "cuda":
        return f"the CUDA kernel runs on CUDA tensors, these are on {device_type}"
    return cuda_driver_check().problem


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
    backend is missing.  With ``cuda`` required, a driver too old for the CUDA runtime of
    ``vlfast._C`` (or no driver) is an error here too."""
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
        elif "cuda" in required:
            # Only when asked for: the driver lookups stay off the import of everyone else.
            check = cuda_driver_check()
            if check.problem is not None:
                problems["cuda"] = check.problem
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
