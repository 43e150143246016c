#!/usr/bin/env python3
"""Compile every Triton launch specialisation of vlfast for sm_80 and sm_90 -- no GPU needed.

The tests run the Triton kernels under ``TRITON_INTERPRET=1``, which accepts code the
real compiler rejects.  This script closes that gap in three steps:

1. **Capture** (a child process with ``TRITON_INTERPRET=1`` and the Triton backend
   forced): the real host launchers -- the public ops of ``vlfast.ops`` forward and
   backward, and the four models (UNITER, VisualBERT, VL-BERT, ViLBERT) forward and
   backward, padded and padding-free, eval and train (dropout), fp32 and autocast
   fp16/bf16, at the small test sizes and at base width with one layer -- run on CPU
   tensors.  The launchers see the *GPU* configuration (each ``kernels/*/triton.py``'s
   ``_interpret()`` answers False, and ``torch.cuda.get_device_properties`` gives an
   H100's 132 SMs), and every ``kernel[grid](...)`` launch is recorded instead of
   run: argument types and the divisibility-by-16 / equal-to-1 specialisation exactly
   as Triton computes them (``native_specialize_impl``), constexpr values, num_warps and
   num_stages.  The kernels' outputs are left uninitialised: nothing on the host reads
   them.
2. **Compile** (a child process *without* ``TRITON_INTERPRET``, optionally with another
   Triton first on ``sys.path``): each distinct specialisation is compiled with
   ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` for every
   arch in a pool of processes; registers and spills are read from the ptxas log
   (``TRITON_DUMP_PTXAS_LOG=1``), shared memory from the compiled kernel's metadata, and
   the PTX is searched for ``cp.async`` (sm_80 pipelining) and ``wgmma`` /
   ``cp.async.bulk.tensor`` (sm_90 Hopper MMA / TMA).
3. **CUDA** (``--full`` or ``--cuda``): every ``csrc/**/*.cu`` is compiled with
   ``nvcc -Xptxas -v -arch=sm_XX -cubin`` and its kernels' figures join the report.

Modes:

* ``--subset`` (default): a covering subset, fast enough for CI -- for every kernel and
  arch the captured specialisation that covers the most (flags on, half precision);
  ``--per-kernel N`` adds, greedily, up to N-1 more that cover the pointer dtypes and
  constexpr values not yet covered.
* ``--full``: every captured specialisation, and the CUDA files; writes
  ``benchmarks/results/kernel_resources.csv`` (``--csv`` to choose another path).

``--triton-path DIR`` (repeatable) compiles once more with the Triton installed in DIR
(e.g. ``pip install --no-deps --target DIR triton==3.6.0``) first on ``sys.path``.
``--no-default-triton`` skips the interpreter's own Triton for the compile step.

Exit status: 0 when everything compiled, 1 on any compile error (each failure is listed
with kernel, specialisation, arch, Triton version, the workload that launched it and the
error) or a kernel of ``kernels/*/triton.py`` that no workload launches, 2 on a usage
error or a failed capture.  ``--json PATH`` writes a machine-readable summary (the CI test reads it).

Examples::

    .venv/bin/python benchmarks/gpu_compile.py --subset --triton-path .venv/triton36
    .venv/bin/python benchmarks/gpu_compile.py --full --triton-path .venv/triton36
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import csv
import hashlib
import importlib
import importlib.util
import inspect
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CSV = ROOT / "benchmarks" / "results" / "kernel_resources.csv"
ARCHS = (80, 90)
FAKE_SMS = 132  # H100 SXM; what torch.cuda.get_device_properties answers during the capture
CSV_COLUMNS = ("kernel", "spec_id", "specialisation", "arch", "compiler", "status", "registers", "spill_stores",
               "spill_loads", "shared_mem", "num_warps", "num_stages", "cp_async", "wgmma", "tma", "compile_s",
               "error", "workload", "n_workloads")


def _log(msg: str) -> None:
    print(f"[gpu_compile] {msg}", file=sys.stderr, flush=True)


# ==================================================================================
# Which functions are kernels
# ==================================================================================

def kernel_modules() -> list[str]:
    """The ops with Triton kernels: every ``kernels/<op>/triton.py`` of the installed package."""
    kernels_dir = Path(importlib.import_module("vlfast.kernels").__path__[0])
    return sorted(p.parent.name for p in kernels_dir.glob("*/triton.py"))


def kernel_names(module: Any) -> list[str]:
    """The launchable ``@triton.jit`` functions of a ``kernels/*/triton.py`` module: those
    defined there that no other jitted function of vlfast calls (``philox_keep``, the
    attention tile bodies, ``_cast`` ... are device helpers, not kernels)."""
    jitted = _jitted_functions(module)
    called: set[str] = set()
    for mod_name in kernel_modules():
        try:
            mod = importlib.import_module(f"vlfast.kernels.{mod_name}.triton")
        except Exception:  # noqa: BLE001 -- a module that does not import has no callers to offer
            continue
        for jf in _jitted_functions(mod).values():
            tree = ast.parse(textwrap.dedent(inspect.getsource(jf.fn)))
            for node in ast.walk(tree):
                if isinstance(node, ast.Call):
                    f = node.func
                    called.add(f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else "")
    return sorted(n for n in jitted if n not in called)


def _jitted_functions(module: Any) -> dict[str, Any]:
    out = {}
    for name, obj in vars(module).items():
        if type(obj).__name__ in ("JITFunction", "InterpretedFunction") and \
                getattr(obj.fn, "__module__", None) == module.__name__:
            out[name] = obj
    return out


def all_kernels() -> list[str]:
    """``"<module>.<kernel>"`` for every kernel of every ``kernels/*/triton.py``."""
    out = []
    for m in kernel_modules():
        mod = importlib.import_module(f"vlfast.kernels.{m}.triton")
        out += [f"{m}.{k}" for k in kernel_names(mod)]
    return out


# ==================================================================================
# Step 1: capture (child process, TRITON_INTERPRET=1)
# ==================================================================================

class _Recorder:
    """Records launches of the interpreter's jitted functions instead of running them."""

    def __init__(self) -> None:
        self.specs: dict[str, dict] = {}      # spec_id -> spec
        self.sources: dict[str, set] = {}     # spec_id -> workload names
        self.launches = 0
        self.workload = ""

    def record(self, jf: Any, args: tuple, kwargs: dict) -> None:
        from triton.backends.nvidia.compiler import CUDABackend, CUDAOptions
        from triton.runtime.jit import native_specialize_impl

        fn = jf.fn
        sig = inspect.signature(fn)
        names = list(sig.parameters)
        opts = {k: kwargs.pop(k) for k in list(kwargs) if k not in names}
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        dns = set((jf.kwargs or {}).get("do_not_specialize") or ())
        dnsa = set((jf.kwargs or {}).get("do_not_specialize_on_alignment") or ())
        params = []
        for i, (name, par) in enumerate(sig.parameters.items()):
            value = bound.arguments[name]
            if "constexpr" in str(par.annotation):
                params.append(["constexpr", _json_value(value, f"{fn.__name__}.{name}")])
                continue
            ty, attr = native_specialize_impl(CUDABackend, value, False, not (i in dns or name in dns),
                                              not (i in dnsa or name in dnsa))[:2]
            if ty == "constexpr":
                params.append(["constexpr", _json_value(attr, f"{fn.__name__}.{name}")])
            else:
                params.append([ty, attr or ""])
        unknown = set(opts) - {"num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion"}
        if unknown:
            raise RuntimeError(f"{fn.__name__}: launch options this script does not carry: {sorted(unknown)}")
        spec = {
            "module": fn.__module__, "name": fn.__name__,
            "kernel": f"{fn.__module__.split('.')[-2]}.{fn.__name__}",
            "arg_names": names, "params": params,
            "num_warps": int(opts.get("num_warps", CUDAOptions.num_warps)),
            "num_stages": int(opts.get("num_stages", CUDAOptions.num_stages)),
            "extra_options": {k: v for k, v in opts.items() if k not in ("num_warps", "num_stages")},
        }
        sid = spec_id(spec)
        spec["spec_id"] = sid
        spec["label"] = spec_label(spec)
        self.specs.setdefault(sid, spec)
        self.sources.setdefault(sid, set()).add(self.workload)
        self.launches += 1


def _json_value(v: Any, where: str) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"{where}: constexpr value {v!r} ({type(v).__name__}) is not a JSON scalar")


def spec_id(spec: dict) -> str:
    """A short stable id of a specialisation (kernel, parameters, launch options)."""
    key = json.dumps([spec["module"], spec["name"], spec["params"], spec["num_warps"], spec["num_stages"],
                      spec.get("extra_options", {})], sort_keys=True)
    return hashlib.sha1(key.encode()).hexdigest()[:10]


def spec_label(spec: dict) -> str:
    """Human-readable specialisation: pointer dtypes, constexprs (incl. ints specialised to
    1 / None), the arguments with divisibility 16, and the launch options."""
    ptr_types: list[str] = []
    consts, div = [], []
    for name, (ty, attr) in zip(spec["arg_names"], spec["params"]):
        if ty == "constexpr":
            consts.append(f"{name}={attr}")
        else:
            if ty.startswith("*") and ty not in ptr_types:
                ptr_types.append(ty)
            if attr and "D" in attr:
                div.append(name)
    parts = ["ptr " + "/".join(ptr_types) if ptr_types else "no ptr", " ".join(consts),
             "div16 " + (",".join(div) if div else "-"), f"w{spec['num_warps']} s{spec['num_stages']}"]
    return " | ".join(p for p in parts if p)


def _patch_gpu_view(stack: contextlib.ExitStack) -> None:
    """Make the launchers choose their GPU configuration on CPU tensors: every kernel
    module's ``_interpret()`` answers False and its ``INTERPRET`` flag is False (and
    linear_cross_entropy's ``MAX_BLOCK_V``, fixed at import from it, is the GPU's);
    ``torch.cuda.get_device_properties`` describes an H100 (SM count)."""
    import torch

    from vlfast.kernels.linear_cross_entropy import triton as lce

    def setattr_undo(obj: Any, name: str, value: Any) -> None:
        if not hasattr(obj, name):
            raise AttributeError(f"{getattr(obj, '__name__', obj)} has no attribute {name!r}: "
                                 "benchmarks/gpu_compile.py needs updating")
        old = getattr(obj, name)
        setattr(obj, name, value)
        stack.callback(setattr, obj, name, old)

    for name in kernel_modules():
        mod = importlib.import_module(f"vlfast.kernels.{name}.triton")
        if callable(getattr(mod, "_interpret", None)):
            setattr_undo(mod, "_interpret", lambda: False)
        if isinstance(getattr(mod, "INTERPRET", None), bool):
            setattr_undo(mod, "INTERPRET", False)
    setattr_undo(lce, "MAX_BLOCK_V", 4096)

    class _Props:
        multi_processor_count = FAKE_SMS
        name = "captured (no GPU)"
        major, minor = 9, 0

    setattr_undo(torch.cuda, "get_device_properties", lambda *a, **k: _Props())


def _capture(out_path: Path, quick: bool) -> None:
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["VLFAST_BACKEND"] = "triton"
    import torch
    from triton.runtime.interpreter import InterpretedFunction

    torch.set_num_threads(1)  # tiny matmuls: one thread is much faster than two contending ones
    import vlfast  # noqa: F401
    from vlfast import ops

    rec = _Recorder()
    orig_run = InterpretedFunction.run

    def run(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        rec.record(self, args, dict(kwargs))
        return None

    t0 = time.perf_counter()
    failures = []
    with contextlib.ExitStack() as stack:
        _patch_gpu_view(stack)
        InterpretedFunction.run = run
        stack.callback(setattr, InterpretedFunction, "run", orig_run)
        stack.enter_context(ops.backend("triton"))
        for name, work in workloads(quick):
            rec.workload = name
            torch.manual_seed(0)
            try:
                work()
            except Exception as e:  # noqa: BLE001 -- reported, and the capture fails
                failures.append(f"{name}: {type(e).__name__}: {e}")
    kernels = all_kernels()
    data = {
        "triton": _triton_version(), "torch": torch.__version__, "capture_s": round(time.perf_counter() - t0, 2),
        "launches": rec.launches, "kernels": kernels, "failures": failures,
        "specs": [dict(s, workloads=sorted(rec.sources[sid])) for sid, s in sorted(rec.specs.items())],
    }
    out_path.write_text(json.dumps(data, indent=1))


def _triton_version() -> str:
    import triton

    return triton.__version__


# ----------------------------------------------------------------------------------
# Workloads: every public op, and the four models
# ----------------------------------------------------------------------------------

def _backward(out: Any, inputs: Sequence[Any]) -> None:
    """Backward of a fixed projection of every floating output onto ``inputs``."""
    import torch

    outs = [o for o in (out if isinstance(out, (tuple, list)) else [out])
            if isinstance(o, torch.Tensor) and o.is_floating_point() and o.requires_grad]
    if not outs:
        return
    loss = sum((o.float() * 0.5).sum() for o in outs)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    torch.autograd.grad(loss, leaves, allow_unused=True)


def workloads(quick: bool = False) -> list[tuple[str, Callable[[], None]]]:
    """(name, thunk) pairs; each thunk calls public ops / models forward and backward."""
    import torch

    from vlfast import ops

    dtypes = (torch.float32, torch.float16, torch.bfloat16)
    work: list[tuple[str, Callable[[], None]]] = []

    def rnd(*shape: int, dt: torch.dtype, grad: bool = True) -> torch.Tensor:
        return torch.randn(*shape, dtype=torch.float32).to(dt).requires_grad_(grad)

    # head dims: 16 (small configs: 64/4 heads, co-attention 32/2), 12 (ViLBERT small vision
    # 48/4), 64 (base text 768/12), 128 (ViLBERT base vision and co-attention 1024/8)
    head_dims = (12, 16, 64, 128)
    for dt in dtypes:
        dn = str(dt).replace("torch.", "")
        for D in head_dims:
            for masked in (False, True):
                for p in (0.0, 0.1):
                    def attn(dt=dt, D=D, masked=masked, p=p) -> None:
                        q, k, v = rnd(2, 3, 37, D, dt=dt), rnd(2, 3, 29, D, dt=dt), rnd(2, 3, 29, D, dt=dt)
                        mask = (torch.arange(29)[None] < torch.tensor([29, 17])[:, None]) if masked else None
                        _backward(ops.attention(q, k, v, mask, dropout_p=p), (q, k, v))
                    work.append((f"attention/{dn}/D{D}/mask{int(masked)}/p{p}", attn))

                if D not in (16, 128):
                    continue  # co-attention runs in ViLBERT only: 32/2 heads (small), 1024/8 (base)

                def coattn(dt=dt, D=D, masked=masked) -> None:
                    for p in (0.0, 0.1):
                        qt, kt, vt = (rnd(2, 2, 11, D, dt=dt) for _ in range(3))
                        qv, kv, vv = (rnd(2, 2, 7, D, dt=dt) for _ in range(3))
                        tm = (torch.arange(11)[None] < torch.tensor([11, 5])[:, None]) if masked else None
                        vm = (torch.arange(7)[None] < torch.tensor([7, 3])[:, None]) if masked else None
                        _backward(ops.co_attention(qt, kt, vt, tm, qv, kv, vv, vm, dropout_p=p),
                                  (qt, kt, vt, qv, kv, vv))
                        if masked:  # one mask only, each side
                            _backward(ops.co_attention(qt, kt, vt, tm, qv, kv, vv, None, dropout_p=p),
                                      (qt, kt, vt, qv, kv, vv))
                            _backward(ops.co_attention(qt, kt, vt, None, qv, kv, vv, vm, dropout_p=p),
                                      (qt, kt, vt, qv, kv, vv))
                work.append((f"co_attention/{dn}/D{D}/mask{int(masked)}", coattn))

            def varlen(dt=dt, D=D) -> None:
                for p in (0.0, 0.1):
                    lens = torch.tensor([5, 13, 1])
                    cu = torch.zeros(4, dtype=torch.int32)
                    cu[1:] = lens.cumsum(0)
                    T = int(lens.sum())
                    q, k, v = (rnd(T, 3, D, dt=dt) for _ in range(3))
                    _backward(ops.varlen_attention(q, k, v, cu, cu, 13, 13, dropout_p=p), (q, k, v))
            work.append((f"varlen_attention/{dn}/D{D}", varlen))

        # hidden widths: 32/48/64 (small configs), 768 (base), 1024 (ViLBERT base vision)
        for E in (32, 48, 64, 768, 1024):
            def lnorm(dt=dt, E=E) -> None:
                for n in (6, 2048):
                    x, w, b = rnd(n, E, dt=dt), rnd(E, dt=dt), rnd(E, dt=dt)
                    _backward(ops.layer_norm(x, w, b), (x, w, b))
                    for p in (0.0, 0.1):
                        r = rnd(n, E, dt=dt)
                        _backward(ops.dropout_add_layer_norm(x, r, w, b, dropout_p=p), (x, r, w, b))
            work.append((f"layer_norm/{dn}/E{E}", lnorm))

        # intermediate widths: 64/96/128 (small), 1024 (ViLBERT base vision), 3072 (base)
        for E in (64, 96, 128, 1024, 3072):
            def bgelu(dt=dt, E=E) -> None:
                for n in (6, 2048):
                    x, b = rnd(n, E, dt=dt), rnd(E, dt=dt)
                    _backward(ops.bias_gelu(x, b), (x, b))
            work.append((f"bias_gelu/{dn}/E{E}", bgelu))

        for E in (64, 768):
            def text_emb(dt=dt, E=E) -> None:
                for p in (0.0, 0.1):
                    ids = torch.randint(0, 50, (2, 9))
                    tt = torch.randint(0, 2, (2, 9))
                    pos = torch.arange(9)[None].expand(2, 9).contiguous()
                    tabs = [rnd(50, E, dt=dt), rnd(16, E, dt=dt), rnd(2, E, dt=dt)]
                    g, b = rnd(E, dt=dt), rnd(E, dt=dt)
                    out = ops.text_embeddings(ids, tt, pos, *tabs, g, b, padding_idx=0, dropout_p=p)
                    _backward(out, (*tabs, g, b))
            work.append((f"text_embeddings/{dn}/E{E}", text_emb))

        # the kernel sees V (BLOCK_V, warps, the row stride), not E: E stays small
        for V, E in ((100, 64), (30522, 32)):
            def lce(dt=dt, V=V, E=E) -> None:
                h, w, b = rnd(12, E, dt=dt), rnd(V, E, dt=dt), rnd(V, dt=dt)
                labels = torch.randint(0, V, (12,))
                labels[3] = -100
                for red in ("mean", "none"):
                    _backward(ops.linear_cross_entropy(h, w, b, labels, reduction=red), (h, w, b))
                    t = torch.softmax(torch.randn(12, V), -1).to(dt)
                    for kl in (False, True):
                        _backward(ops.linear_soft_cross_entropy(h, w, None, t, reduction=red, kl=kl), (h, w))
            work.append((f"linear_cross_entropy/{dn}/V{V}", lce))

    def keep_mask() -> None:
        for p in (0.0, 0.1, 0.5):
            ops.keep_mask((2, 3, 37, 29), p, seed=1234, offset=16)
    work.append(("keep_mask", keep_mask))

    for model in ("uniter", "visualbert", "vlbert", "vilbert"):
        for size in ("small", "base1"):
            for pf in (False, True):
                for train in (False, True):
                    for amp in (None, torch.float16, torch.bfloat16):
                        if quick and (size == "base1" or amp is not None):
                            continue
                        def run_model(model=model, size=size, pf=pf, train=train, amp=amp) -> None:
                            _run_model(model, size, pf, train, amp)
                        an = "fp32" if amp is None else str(amp).replace("torch.", "autocast_")
                        work.append((f"model/{model}/{size}/{'padding_free' if pf else 'padded'}/"
                                     f"{'train' if train else 'eval'}/{an}", run_model))
    return work


_MODEL_CACHE: dict[tuple[str, str], Any] = {}


def _model(name: str, size: str) -> Any:
    """A model of ``size``: ``small`` (the configs' ``small()``, as the tests use) or
    ``base1`` (the default, base-width config with one layer per stack)."""
    from vlfast.models import Uniter, UniterConfig, ViLBert, VisualBert, VLBert
    from vlfast.models.vilbert import ViLBertConfig
    from vlfast.models.visualbert import VisualBertConfig
    from vlfast.models.vlbert import VLBertConfig

    key = (name, size)
    if key in _MODEL_CACHE:
        return _MODEL_CACHE[key]
    if size == "small":
        cfg = {"uniter": lambda: UniterConfig.small(img_dim=24),
               "visualbert": lambda: VisualBertConfig.small(visual_embedding_dim=24),
               "vlbert": lambda: VLBertConfig.small().replace(visual_feat_dim=24),
               "vilbert": lambda: ViLBertConfig.small(v_feature_size=24)}[name]()
    else:
        one = dict(num_hidden_layers=1, vocab_size=1000)  # the kernels see E and ids, not the vocab size
        cfg = {"uniter": lambda: UniterConfig(img_dim=24, **one),
               "visualbert": lambda: VisualBertConfig(visual_embedding_dim=24, **one),
               "vlbert": lambda: VLBertConfig(visual_feat_dim=24, **one),
               "vilbert": lambda: ViLBertConfig(v_feature_size=24, v_num_hidden_layers=1, v_biattention_id=[0],
                                                t_biattention_id=[0], **one)}[name]()
    cls = {"uniter": Uniter, "visualbert": VisualBert, "vlbert": VLBert, "vilbert": ViLBert}[name]
    m = cls(cfg)
    _MODEL_CACHE[key] = m
    return m


def _model_inputs(name: str, cfg: Any) -> dict[str, Any]:
    """A ragged batch (text lengths 6 and 3 of 7 slots, regions 5 and 2 of 6)."""
    import torch

    txt, reg, LT, LV = [6, 3], [5, 2], 7, 6
    B = len(txt)
    t_mask = torch.arange(LT)[None] < torch.tensor(txt)[:, None]
    v_mask = torch.arange(LV)[None] < torch.tensor(reg)[:, None]
    F = getattr(cfg, {"uniter": "img_dim", "visualbert": "visual_embedding_dim", "vlbert": "visual_feat_dim",
                      "vilbert": "v_feature_size"}[name])
    ids = torch.randint(1, min(cfg.vocab_size, 1000), (B, LT)).masked_fill(~t_mask, 0)
    types = torch.randint(0, 2, (B, LT)).masked_fill(~t_mask, 0)
    feats = torch.randn(B, LV, F).masked_fill(~v_mask[..., None], 0.0)
    xy = torch.rand(B, LV, 2) * 0.5
    wh = torch.rand(B, LV, 2) * 0.4 + 0.1
    boxes = {"uniter": lambda: torch.cat([xy, xy + wh, wh, wh.prod(-1, keepdim=True)], -1),
             "vilbert": lambda: torch.cat([xy, xy + wh, wh.prod(-1, keepdim=True)], -1),
             "vlbert": lambda: torch.cat([xy, xy + wh], -1) * 200.0,
             "visualbert": lambda: None}[name]()
    x: dict[str, Any] = dict(input_ids=ids, attention_mask=t_mask, token_type_ids=types, visual_feats=feats,
                             visual_mask=v_mask)
    if boxes is not None:
        x["visual_boxes"] = boxes.masked_fill(~v_mask[..., None], 0.0)
    if name == "vlbert":
        x["image_size"] = torch.full((B, 2), 200.0)
    if name == "visualbert":
        a = torch.full((B, LV, 2), -1, dtype=torch.long)
        for i, (t, n) in enumerate(zip(txt, reg)):
            for r in range(n):
                a[i, r, 0] = r % t
        x["image_text_alignment"] = a
    return x


def _run_model(name: str, size: str, padding_free: bool, train: bool, amp: Optional[Any]) -> None:
    import torch

    m = _model(name, size)
    m.train(train)
    x = _model_inputs(name, m.config)
    ctx = torch.autocast("cpu", dtype=amp) if amp is not None else contextlib.nullcontext()
    with ctx:
        out = m(**x, padding_free=padding_free)
        fields = [v for v in (out.values() if hasattr(out, "values") else vars(out).values())
                  if isinstance(v, torch.Tensor) and v.is_floating_point() and v.requires_grad]
        loss = sum(f.float().sum() for f in fields)
    params = [p for p in m.parameters() if p.requires_grad]
    torch.autograd.grad(loss, params, allow_unused=True)


# ==================================================================================
# Covering subset
# ==================================================================================

def _features(spec: dict) -> set[str]:
    """What a specialisation exercises: each pointer dtype, each constexpr value."""
    out = set()
    for name, (ty, attr) in zip(spec["arg_names"], spec["params"]):
        if ty == "constexpr":
            out.add(f"{name}={attr}")
        elif ty.startswith("*"):
            out.add(f"ptr {ty}")
    out.add(f"w{spec['num_warps']}s{spec['num_stages']}")
    return out


def _richness(spec: dict) -> int:
    """Tie-break of the subset: prefer the most code (flags on) in a half dtype."""
    on = sum(1 for ty, attr in spec["params"] if ty == "constexpr" and attr is True)
    half = any(ty in ("*fp16", "*bf16") for ty, _ in spec["params"])
    return on + 2 * half


def covering_subset(specs: list[dict], per_kernel: int) -> list[dict]:
    """Per kernel, greedily the specialisations covering the most not-yet-covered features
    (pointer dtypes and constexpr values), at most ``per_kernel`` of them (at least one);
    ties go to the richest (most flags on, half precision)."""
    by_kernel: dict[str, list[dict]] = {}
    for s in specs:
        by_kernel.setdefault(s["kernel"], []).append(s)
    chosen = []
    for kernel in sorted(by_kernel):
        cands = sorted(by_kernel[kernel], key=lambda s: s["spec_id"])
        covered: set[str] = set()
        for _ in range(max(1, per_kernel)):
            best = max(cands, key=lambda s: (len(_features(s) - covered), _richness(s), s["spec_id"]))
            if covered and not (_features(best) - covered):
                break  # nothing new left to cover
            chosen.append(best)
            covered |= _features(best)
            cands = [c for c in cands if c is not best]
            if not cands:
                break
    return chosen


# ==================================================================================
# Step 2: compile (child process, no TRITON_INTERPRET)
# ==================================================================================

_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(log: str) -> dict[str, int]:
    """registers, spill_stores, spill_loads and static smem of the (one) function in a ptxas -v log."""
    regs = _PTXAS_REGS.findall(log)
    spill = _PTXAS_SPILL.findall(log)
    smem = _PTXAS_SMEM.findall(log)
    return {"registers": int(regs[-1]) if regs else -1,
            "spill_stores": int(spill[-1][0]) if spill else -1, "spill_loads": int(spill[-1][1]) if spill else -1,
            "static_smem": int(smem[-1]) if smem else 0}


def ptx_features(ptx: str) -> dict[str, bool]:
    """Ampere async copies, Hopper warpgroup MMA and TMA in a PTX text."""
    return {"cp_async": bool(re.search(r"\bcp\.async\.(ca|cg)\b", ptx)),
            "wgmma": "wgmma.mma_async" in ptx,
            "tma": "cp.async.bulk.tensor" in ptx}


def _compile_task(task: tuple[dict, int]) -> dict:
    """Compile one specialisation for one arch (in a worker of the compile process)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec, arch = task
    row = {"kernel": spec["kernel"], "spec_id": spec["spec_id"], "specialisation": spec["label"], "arch": f"sm_{arch}",
           "compiler": f"triton {triton.__version__}", "num_warps": spec["num_warps"],
           "num_stages": spec["num_stages"]}
    t0 = time.perf_counter()
    buf = io.StringIO()
    try:
        mod = importlib.import_module(spec["module"])
        fn = getattr(mod, spec["name"])
        if type(fn).__name__ != "JITFunction":
            raise RuntimeError(f"{spec['module']}.{spec['name']} is a {type(fn).__name__}, not a JITFunction "
                               "(is TRITON_INTERPRET set?)")
        if list(fn.arg_names) != spec["arg_names"]:
            raise RuntimeError(f"parameters changed since the capture: {fn.arg_names} != {spec['arg_names']}")
        from triton.backends.compiler import BaseBackend

        signature, constexprs, attrs = {}, {}, {}
        for i, (name, (ty, attr)) in enumerate(zip(spec["arg_names"], spec["params"])):
            signature[name] = ty
            if ty == "constexpr":
                constexprs[(i,)] = attr
            elif attr:
                attrs[(i,)] = BaseBackend.parse_attr(attr)
        options = {"num_warps": spec["num_warps"], "num_stages": spec["num_stages"], **spec.get("extra_options", {})}
        with contextlib.redirect_stdout(buf):
            k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", arch, 32),
                               options=options)
        log = parse_ptxas_log(buf.getvalue())
        ptx = k.asm["ptx"]
        row.update(status="ok", registers=log["registers"], spill_stores=log["spill_stores"],
                   spill_loads=log["spill_loads"], shared_mem=int(k.metadata.shared) + log["static_smem"],
                   **ptx_features(ptx), error="")
        row["num_warps"] = int(k.metadata.num_warps)
        row["num_stages"] = int(k.metadata.num_stages)
    except Exception as e:  # noqa: BLE001 -- every failure is a row
        msg = f"{type(e).__name__}: {e}"
        row.update(status="error", registers="", spill_stores="", spill_loads="", shared_mem="", cp_async="",
                   wgmma="", tma="", error=" ".join(msg.split())[:1500])
    row["compile_s"] = round(time.perf_counter() - t0, 2)
    return row


def _compile_main(specs_path: Path, out_path: Path, archs: Sequence[int], jobs: int) -> None:
    """The compile process: a pool of ``jobs`` workers over (spec, arch)."""
    import concurrent.futures as cf
    import multiprocessing as mp

    import triton

    specs = json.loads(specs_path.read_text())
    # the costliest first (attention/co-attention backward), so the pool finishes together
    weight = lambda s: (("bwd" in s["name"]) + 2 * ("attn" in s["name"] or "co_" in s["name"]))  # noqa: E731
    tasks = [(s, a) for s in sorted(specs, key=weight, reverse=True) for a in archs]
    # import the kernel modules once in the parent: forked workers inherit them
    for s in specs:
        importlib.import_module(s["module"])
    t0 = time.perf_counter()
    rows: list[Optional[dict]] = [None] * len(tasks)
    last = t0

    def progress(done: int) -> None:
        nonlocal last
        now = time.perf_counter()
        if now - last > 60 or done == len(tasks):
            last = now
            el = now - t0
            _log(f"  triton {triton.__version__}: {done}/{len(tasks)} compiled in {el:.0f} s"
                 + (f", ~{el / done * (len(tasks) - done):.0f} s to go" if done < len(tasks) else ""))

    if jobs <= 1:
        for i, t in enumerate(tasks):
            rows[i] = _compile_task(t)
            progress(i + 1)
    else:
        with cf.ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("fork")) as pool:
            futures = {pool.submit(_compile_task, t): i for i, t in enumerate(tasks)}
            for n, fut in enumerate(cf.as_completed(futures), 1):
                rows[futures[fut]] = fut.result()
                progress(n)
    out_path.write_text(json.dumps({"triton": triton.__version__, "triton_file": triton.__file__,
                                    "compile_wall_s": round(time.perf_counter() - t0, 2), "rows": rows}))


# ==================================================================================
# Step 3: the CUDA files
# ==================================================================================

def _nvcc() -> Optional[Path]:
    """The real nvcc (setup.py's search: $CUDACXX, $CUDA_HOME, /usr/local/cuda, PATH)."""
    for c in filter(None, [os.environ.get("CUDACXX"),
                           os.environ.get("CUDA_HOME") and os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc"),
                           "/usr/local/cuda/bin/nvcc", shutil.which("nvcc")]):
        p = Path(c)
        if p.is_file() and os.access(p, os.X_OK):
            return p
    return None


def _demangle(names: list[str]) -> dict[str, str]:
    filt = shutil.which("c++filt") or shutil.which("cu++filt")
    if not filt or not names:
        return {n: n for n in names}
    p = subprocess.run([filt], input="\n".join(names), capture_output=True, text=True)
    out = p.stdout.splitlines()
    return {n: re.sub(r"\(anonymous namespace\)::", "", d) for n, d in zip(names, out)} if len(out) == len(names) \
        else {n: n for n in names}


def compile_cuda(archs: Sequence[int]) -> list[dict]:
    """nvcc -Xptxas -v for every csrc/**/*.cu and arch: one row per kernel."""
    nvcc = _nvcc()
    sources = sorted((ROOT / "csrc").rglob("*.cu"))
    if not sources:
        return []
    if nvcc is None:
        _log("nvcc not found: the CUDA files are not in the report")
        return []
    version = re.search(r"release ([\d.]+)", subprocess.run([str(nvcc), "--version"], capture_output=True,
                                                            text=True).stdout or "")
    compiler = f"nvcc {version.group(1) if version else '?'}"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for src in sources:
            for arch in archs:
                t0 = time.perf_counter()
                cubin = Path(tmp) / f"{src.stem}_{arch}.cubin"
                cmd = [str(nvcc), "-O3", "--expt-relaxed-constexpr", "-std=c++17", f"-I{ROOT / 'csrc'}",
                       "-Xptxas", "-v", f"-arch=sm_{arch}", "-cubin", "-o", str(cubin), str(src)]
                p = subprocess.run(cmd, capture_output=True, text=True)
                rel = str(src.relative_to(ROOT))
                spec = f"{rel} -O3" + ("; + dynamic smem set at launch" if "extern __shared__" in src.read_text()
                                      else "")
                base = {"spec_id": hashlib.sha1(f"{rel}{arch}".encode()).hexdigest()[:10], "arch": f"sm_{arch}",
                        "workload": "", "n_workloads": "",
                        "compiler": compiler, "num_warps": "", "num_stages": "", "wgmma": "", "tma": "",
                        "cp_async": "", "compile_s": round(time.perf_counter() - t0, 2)}
                if p.returncode != 0:
                    rows.append(dict(base, kernel=rel, specialisation=rel, status="error", registers="",
                                     spill_stores="", spill_loads="", shared_mem="",
                                     error=" ".join((p.stderr or p.stdout).split())[-1500:]))
                    continue
                sass = _sass(cubin)
                blocks = re.split(r"ptxas info\s+: Compiling entry function '", p.stderr)[1:]
                names = [b.split("'", 1)[0] for b in blocks]
                pretty = _demangle(names)
                for name, block in zip(names, blocks):
                    log = parse_ptxas_log(block)
                    short = re.sub(r"\(.*\)$", "", pretty[name]).replace("vlfast::", "")
                    feats = _sass_features(sass.get(name, ""))
                    rows.append(dict(base, kernel=f"{src.stem}.cu:{short}", specialisation=spec,
                                     status="ok", registers=log["registers"], spill_stores=log["spill_stores"],
                                     spill_loads=log["spill_loads"], shared_mem=log["static_smem"],
                                     error="", **feats))
    return rows


def _cuobjdump() -> Optional[str]:
    """Triton's bundled cuobjdump (backends/nvidia/bin), else one on PATH."""
    spec = importlib.util.find_spec("triton")
    if spec and spec.origin:
        bundled = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if bundled.is_file():
            return str(bundled)
    return shutil.which("cuobjdump")


def _sass(cubin: Path) -> dict[str, str]:
    """SASS per function of a cubin, or {} without cuobjdump."""
    tool = _cuobjdump()
    if tool is None:
        return {}
    p = subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True)
    out, cur = {}, None
    for line in p.stdout.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            cur = m.group(1)
            out[cur] = ""
        elif cur:
            out[cur] += line + "\n"
    return out


def _sass_features(sass: str) -> dict[str, Any]:
    if not sass:
        return {"cp_async": "", "wgmma": "", "tma": ""}
    return {"cp_async": "LDGSTS" in sass, "wgmma": "HGMMA" in sass, "tma": "UTMALDG" in sass}


# ==================================================================================
# Driver
# ==================================================================================

def _run_child(args: list[str], env: dict[str, str], what: str, timeout: int = 3000) -> None:
    p = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], env=env, timeout=timeout)
    if p.returncode != 0:
        _log(f"the {what} process failed (exit {p.returncode}); see its output above")
        raise SystemExit(2)


def _child_env(extra_path: Optional[str], interpret: bool, cache_dir: Optional[str] = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "VLFAST_BACKEND")}
    env.pop("PYTHONSAFEPATH", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
        env["OMP_NUM_THREADS"] = "1"
    if extra_path:
        env["PYTHONPATH"] = os.pathsep.join([str(Path(extra_path).resolve())] +
                                            ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    if cache_dir:
        env["TRITON_CACHE_DIR"] = cache_dir  # a fresh cache: every kernel goes through ptxas, whose log we read
        env["TRITON_DUMP_PTXAS_LOG"] = "1"
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, said out loud (silences its warning)
    return env


def capture(quick: bool = False, tmp: Optional[Path] = None) -> dict:
    """Run the capture child and return its JSON (``specs``, ``kernels``, ``failures`` ...)."""
    tmp = tmp or Path(tempfile.mkdtemp(prefix="vlfast_gpu_compile_"))
    out = tmp / "capture.json"
    _run_child(["_capture", "--out", str(out)] + (["--quick"] if quick else []), _child_env(None, True), "capture")
    return json.loads(out.read_text())


def compile_specs(specs: list[dict], archs: Sequence[int], jobs: int, triton_path: Optional[str],
                  tmp: Path) -> dict:
    """Compile ``specs`` for ``archs`` with the Triton first on ``triton_path`` (None: this
    interpreter's); returns {"triton", "rows", "compile_wall_s"}."""
    tag = hashlib.sha1(str(triton_path).encode()).hexdigest()[:8]
    specs_path, out = tmp / f"specs_{tag}.json", tmp / f"rows_{tag}.json"
    specs_path.write_text(json.dumps(specs))
    cache = tmp / f"cache_{tag}"
    cache.mkdir(exist_ok=True)
    _run_child(["_compile", "--specs", str(specs_path), "--out", str(out), "--archs", ",".join(map(str, archs)),
                "--jobs", str(jobs)], _child_env(triton_path, False, str(cache)), "compile")
    return json.loads(out.read_text())


def write_csv(rows: Iterable[dict], path: Path) -> None:
    """The report: one row per (kernel, specialisation, arch, compiler), columns CSV_COLUMNS."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in sorted(rows, key=lambda r: (r["kernel"], r["compiler"], r["arch"], r["specialisation"])):
            w.writerow(r)
    os.replace(tmp, path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line entry point (see the module docstring); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "_capture":
        p = argparse.ArgumentParser()
        p.add_argument("--out", required=True, type=Path)
        p.add_argument("--quick", action="store_true")
        a = p.parse_args(argv[1:])
        _capture(a.out, a.quick)
        return 0
    if argv and argv[0] == "_compile":
        p = argparse.ArgumentParser()
        p.add_argument("--specs", required=True, type=Path)
        p.add_argument("--out", required=True, type=Path)
        p.add_argument("--archs", required=True)
        p.add_argument("--jobs", type=int, default=2)
        a = p.parse_args(argv[1:])
        _compile_main(a.specs, a.out, [int(x) for x in a.archs.split(",")], a.jobs)
        return 0

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--subset", action="store_true", help="a covering subset (the default)")
    g.add_argument("--full", action="store_true", help="every captured specialisation, and the CUDA files")
    p.add_argument("--per-kernel", type=int, default=1,
                   help="subset: at most this many specialisations per kernel (default 1)")
    p.add_argument("--triton-path", action="append", default=[], metavar="DIR",
                   help="also compile with the Triton installed in DIR (first on sys.path); repeatable")
    p.add_argument("--no-default-triton", action="store_true",
                   help="do not compile with this interpreter's own Triton (only --triton-path ones)")
    p.add_argument("--archs", default=",".join(map(str, ARCHS)), help="compute capabilities (default 80,90)")
    p.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    p.add_argument("--csv", type=Path, default=None,
                   help=f"write the report here (default with --full: {DEFAULT_CSV.relative_to(ROOT)})")
    p.add_argument("--json", type=Path, default=None, help="write a JSON summary here")
    p.add_argument("--cuda", action="store_true", help="also compile csrc/**/*.cu (always with --full)")
    p.add_argument("--kernel", default=None, metavar="REGEX",
                   help="compile only the kernels whose name (e.g. attention._attn_fwd_kernel) matches")
    p.add_argument("--quick-capture", action="store_true",
                   help="capture without the base-width models and autocast (faster, fewer specialisations)")
    a = p.parse_args(argv)
    archs = [int(x) for x in a.archs.split(",") if x.strip()]
    for d in a.triton_path:
        if not (Path(d) / "triton" / "__init__.py").is_file():
            p.error(f"--triton-path {d}: no triton package there (pip install --no-deps --target {d} triton==X)")
    paths: list[Optional[str]] = ([] if a.no_default_triton else [None]) + list(a.triton_path)
    if not paths:
        p.error("nothing to compile with: --no-default-triton without --triton-path")

    t_start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="vlfast_gpu_compile_"))
    try:
        cap = capture(a.quick_capture, tmp)
        if cap["failures"]:
            for f in cap["failures"]:
                _log(f"capture failed: {f}")
            return 2
        specs = cap["specs"]
        chosen = specs if a.full else covering_subset(specs, a.per_kernel)
        if a.kernel:
            chosen = [s for s in chosen if re.search(a.kernel, s["kernel"])]
            cap["kernels"] = [k for k in cap["kernels"] if re.search(a.kernel, k)]
        _log(f"capture: {cap['launches']} launches, {len(specs)} distinct specialisations of "
             f"{len({s['kernel'] for s in specs})} kernels in {cap['capture_s']} s; compiling "
             f"{len(chosen)} x {len(archs)} arch(s) with {len(paths)} Triton version(s)")
        rows: list[dict] = []
        versions = []
        for tp in paths:
            res = compile_specs(chosen, archs, a.jobs, tp, tmp)
            versions.append({"triton": res["triton"], "path": tp or "(default)",
                             "compile_wall_s": res["compile_wall_s"]})
            n_err = sum(r["status"] != "ok" for r in res["rows"])
            _log(f"triton {res['triton']} ({tp or 'default'}): {len(res['rows'])} compiles, {n_err} errors, "
                 f"{res['compile_wall_s']} s")
            by_id = {s["spec_id"]: s for s in chosen}
            for r in res["rows"]:
                w = by_id[r["spec_id"]]["workloads"]
                r["workload"], r["n_workloads"] = w[0], len(w)  # the first of the workloads that launch it
            rows += res["rows"]
        if a.full or a.cuda:
            rows += compile_cuda(archs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    csv_path = a.csv or (DEFAULT_CSV if a.full else None)
    if csv_path:
        write_csv(rows, csv_path)
        _log(f"wrote {csv_path} ({len(rows)} rows)")
    errors = [r for r in rows if r["status"] != "ok"]
    summary = {
        "mode": "full" if a.full else "subset", "archs": [f"sm_{x}" for x in archs], "versions": versions,
        "kernels": cap["kernels"], "captured_specs": len(specs), "compiled_specs": len(chosen),
        "launches": cap["launches"], "capture_s": cap["capture_s"], "wall_s": round(time.perf_counter() - t_start, 1),
        "compiles": len(rows), "errors": len(errors),
        "rows": [{k: r.get(k) for k in CSV_COLUMNS} for r in rows],
    }
    if a.json:
        a.json.write_text(json.dumps(summary, indent=1))
    missing = [(k, v["triton"], f"sm_{x}") for k in cap["kernels"] for v in versions for x in archs
               if not any(r["kernel"] == k and r["compiler"] == f"triton {v['triton']}" and r["arch"] == f"sm_{x}"
                          and r["status"] == "ok" for r in rows)]
    for r in errors:
        _log(f"COMPILE ERROR {r['kernel']} [{r['specialisation']}] {r['arch']} {r['compiler']} "
             f"(launched by {r.get('workload') or '-'}): {r['error']}")
    for k, v, x in missing:
        _log(f"NOT COMPILED: {k} for {x} with triton {v} (no launch captured, or every one failed)")
    _log(f"done in {summary['wall_s']} s: {len(rows)} compiles, {len(errors)} errors")
    return 1 if errors or missing else 0


if __name__ == "__main__":
    sys.exit(main())
