"""``python -m vlfast.info``: versions, what was built, and the backend each op would
use on CPU and on CUDA tensors, with the reason every other backend cannot run.

``--json`` prints the same as one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Any, Optional

# Typical inputs each op is asked about (dispatch facts such as head dim and dtype).
_FACTS: dict[str, dict[str, Any]] = {}


def _facts(op: str, device_type: str) -> dict[str, Any]:
    import torch

    if op in ("attention", "varlen_attention", "co_attention"):
        return {"head_dim": 64, "dtype": torch.bfloat16 if device_type == "cuda" else torch.float32}
    return _FACTS.get(op, {})


def _cuda_driver(dispatch: Any) -> dict[str, Any]:
    """The CUDA runtime of vlfast._C against the driver (``_dispatch.cuda_driver_check``)."""
    check = dispatch.cuda_driver_check()
    return {"runtime_version": check.runtime_version, "driver_version": check.driver_version,
            "driver_release": check.driver_release, "driver_release_source": check.driver_release_source,
            "problem": check.problem}


def _cuda_driver_lines(d: dict[str, Any]) -> list[str]:
    """The report's lines on the CUDA runtime and the driver, in plain words."""
    rt, dv, rel = d["runtime_version"], d["driver_version"], d["driver_release"]
    if rt is None:
        return ["  CUDA runtime of vlfast._C: unknown"]
    if rt == 0:
        return ["  CUDA runtime of vlfast._C: none (built without CUDA)"]
    lines = [f"  CUDA runtime of vlfast._C: {rt // 1000}.{(rt % 1000) // 10} (CUDART_VERSION {rt}, static)"]
    if rel is not None:
        driver = f"{rel} (from {d['driver_release_source']})"
    elif dv == 0:
        driver = "none found"
    else:
        driver = "release unknown"
    if dv is None:
        driver += "; supported CUDA version unknown (this vlfast._C cannot ask: reinstall with `pip install .`)"
    elif dv > 0:
        driver += f"; supports CUDA {dv // 1000}.{(dv % 1000) // 10} (cudaDriverGetVersion {dv})"
    else:
        driver += " (cudaDriverGetVersion reports 0)"
    lines.append(f"  NVIDIA driver: {driver}")
    if d["problem"]:
        verdict = "cannot run -- " + d["problem"]
    elif dv:
        verdict = "can run"
    elif rel is not None:
        verdict = "can run (judged from the driver release)"
    else:
        verdict = "not checked (the driver's CUDA version is unknown)"
    lines.append("  CUDA kernels of vlfast._C: " + verdict)
    return lines


def collect() -> dict[str, Any]:
    """Everything the report shows, as plain data."""
    import torch

    import vlfast
    from vlfast import _dispatch, _source_tree

    info: dict[str, Any] = {
        "versions": {"python": platform.python_version(), "vlfast": vlfast.__version__, "torch": torch.__version__},
        "imported_from": _source_tree.describe(),
        "platform": platform.platform(),
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "env": {k: os.environ.get(k) for k in ("VLFAST_BACKEND", "VLFAST_REQUIRE_BACKENDS", "VLFAST_CHECK",
                                               "TRITON_INTERPRET")},
        "requested_backend": _dispatch.requested_backend(),
    }
    tmod, twhy = _dispatch.triton_module()
    info["versions"]["triton"] = getattr(tmod, "__version__", None) if tmod else None
    mod, why = _dispatch.cpp_extension()
    build: dict[str, Any] = {"cpp_extension": mod is not None, "cpp_error": why}
    if mod is not None:
        build["has_cuda"] = bool(mod.has_cuda())
        try:
            build["build_info"] = {k: (v if isinstance(v, (str, int, float, bool, list)) or v is None else str(v))
                                   for k, v in dict(mod.build_info()).items()}
        except Exception as e:  # noqa: BLE001
            build["build_info"] = f"unavailable ({e})"
    build["cuda_driver"] = _cuda_driver(_dispatch)
    info["build"] = build
    info["triton"] = {"importable": tmod is not None, "error": twhy, "interpreter": _dispatch.triton_interpret()}

    ops: dict[str, Any] = {}
    for op in _dispatch.ops():
        per_dev = {}
        for dev in ("cpu", "cuda"):
            facts = _facts(op, dev)
            try:
                chosen: Optional[str] = _dispatch.select(op, dev, **facts)
                err = None
            except _dispatch.BackendError as e:
                chosen, err = None, str(e).splitlines()[0]
            reasons = {b: r for b, r in _dispatch.explain(op, dev, **facts)}
            if dev == "cpu" and reasons.get("triton") is None and _dispatch.requested_backend() == "auto":
                reasons["triton"] = "runs only when forced (auto never picks the Triton interpreter)"
            per_dev[dev] = {"backend": chosen, "error": err, "reasons": reasons}
        ops[op] = per_dev
    info["ops"] = ops
    return info


def render(info: dict[str, Any]) -> str:
    v = info["versions"]
    lines = ["vlfast " + v["vlfast"],
             f"  python {v['python']}, torch {v['torch']}, triton {v['triton'] or 'not importable'}",
             f"  platform {info['platform']}",
             f"  imported from: {info['imported_from']}",
             f"  CUDA available: {info['cuda_available']}" + (f" ({info['gpu']})" if info["gpu"] else ""),
             "", "build"]
    b = info["build"]
    if b["cpp_extension"]:
        lines.append(f"  vlfast._C: built; CUDA kernels: {'yes' if b.get('has_cuda') else 'no'}")
        bi = b.get("build_info")
        if isinstance(bi, dict):
            for k in sorted(bi):
                lines.append(f"    {k}: {bi[k]}")
        lines += _cuda_driver_lines(b["cuda_driver"])
    else:
        lines.append(f"  vlfast._C: MISSING -- {b['cpp_error']}")
    t = info["triton"]
    lines.append(f"  triton: {'importable' if t['importable'] else 'MISSING -- ' + str(t['error'])}"
                 f"; interpreter (TRITON_INTERPRET=1): {'on' if t['interpreter'] else 'off'}")
    lines += ["", "environment"]
    for k, val in info["env"].items():
        lines.append(f"  {k}={val if val is not None else '(unset)'}")
    lines += ["", f"ops (requested backend: {info['requested_backend']})"]
    for op, per_dev in info["ops"].items():
        lines.append(f"  {op}")
        for dev, d in per_dev.items():
            head = f"    {dev:4s} -> {d['backend']}" if d["backend"] else f"    {dev:4s} -> cannot run: {d['error']}"
            if dev == "cuda" and not info["cuda_available"]:
                head += "   (for CUDA tensors; no CUDA device here)"
            lines.append(head)
            for bk, r in d["reasons"].items():
                if bk == d["backend"]:
                    continue
                lines.append(f"           {bk:9s} {'available' if r is None else 'no: ' + r}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vlfast.info", description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = ap.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=2, default=str) if args.json else render(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
