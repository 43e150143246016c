"""The Triton compiler rejects a kernel that reads a plain Python global (``NameError:
Cannot access global variable ... from within @jit'ed function``); the interpreter
(``TRITON_INTERPRET=1``, what the CPU tests run) accepts it.  So every ``@triton.jit``
kernel of ``kernels/*/triton.py`` is checked here: each global name it reads must be a
``tl.constexpr``, another jitted function, a module, or a builtin.  That every kernel --
bias_gelu's, which had the bug (``INV_SQRT2``), included -- compiles for sm_80 and sm_90
with Triton 3.9 and 3.6 is tests/kernels/test_gpu_compile.py (``make gpu-compile``)."""
from __future__ import annotations

import ast
import builtins
import importlib
import inspect
import textwrap
import types
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

KERNEL_DIR = Path(importlib.import_module("vlfast.kernels").__path__[0])
MODULES = sorted(p.parent.name for p in KERNEL_DIR.glob("*/triton.py"))


_JIT_TYPES = ("JITFunction", "InterpretedFunction")  # the compiler's, and TRITON_INTERPRET=1's


def _kernel_of(obj: object):
    """The jitted function behind ``obj`` (through autotune/heuristics wrappers), or None."""
    seen = 0
    while obj is not None and seen < 8:
        if type(obj).__name__ in _JIT_TYPES:
            return obj
        obj, seen = getattr(obj, "fn", None), seen + 1
    return None


def _jitted(mod: types.ModuleType) -> dict[str, object]:
    out = {}
    for name, obj in vars(mod).items():
        k = _kernel_of(obj)
        if k is not None and getattr(k.fn, "__module__", None) == mod.__name__:
            out[name] = k
    return out


def _allowed(value: object) -> bool:
    return (isinstance(value, (tl.constexpr, types.ModuleType)) or _kernel_of(value) is not None
            or getattr(value, "__module__", "").startswith("triton"))


@pytest.mark.parametrize("op", MODULES)
def test_kernels_read_no_plain_python_global(op):
    mod = importlib.import_module(f"vlfast.kernels.{op}.triton")
    kernels = _jitted(mod)
    assert kernels, f"no @triton.jit kernel found in kernels/{op}/triton.py"
    bad = []
    for kname, jf in kernels.items():
        tree = ast.parse(textwrap.dedent(inspect.getsource(jf.fn)))
        fn = tree.body[0]
        local = {a.arg for a in fn.args.args + fn.args.kwonlyargs}
        local |= {n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        for node in ast.walk(fn):
            if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id not in local:
                if hasattr(builtins, node.id) or node.id not in jf.fn.__globals__:
                    continue
                if not _allowed(jf.fn.__globals__[node.id]):
                    bad.append(f"{kname} reads {node.id} = {jf.fn.__globals__[node.id]!r}")
    assert not bad, (f"kernels/{op}/triton.py: kernels read plain Python globals, which the Triton compiler "
                     f"rejects (make them tl.constexpr(...)): {bad}")

