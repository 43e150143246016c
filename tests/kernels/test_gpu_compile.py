"""`make gpu-compile` in CI: every Triton kernel compiles for sm_80 and sm_90, with Triton
3.9 (the tests' version) and 3.6 (what torch 2.11 brings), no GPU needed.

The interpreter the other tests run (``TRITON_INTERPRET=1``) accepts code the compiler
rejects (issue 16: bias_gelu read a plain Python global and crashed every model on a
GPU).  ``benchmarks/gpu_compile.py --subset`` runs the real host launchers on CPU tensors
with the launches captured, and compiles a covering subset of the captured
specialisations -- at least one per kernel and arch -- in processes without the
interpreter; this test runs it once and checks its figures.

Triton 3.6 lives in its own ``pip install --target`` directory: ``$VLFAST_TRITON36_DIR``,
else ``<venv>/triton36`` (what ``make triton36`` / ``make gpu-compile`` install).  When it
is missing the test installs it there (``pip install --no-deps --target``, ~190 MB from
the package registry).  If that fails the test fails when ``VLFAST_REQUIRE_BACKENDS``
names ``triton`` (CI), and otherwise compiles with 3.9 alone and skips the 3.6 check.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

import pytest

pytest.importorskip("triton")

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "gpu_compile.py"
TRITON36_SPEC = "triton==3.6.0"
ARCHS = ("sm_80", "sm_90")


def _script() -> Any:
    spec = importlib.util.spec_from_file_location("vlfast_gpu_compile", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _required() -> bool:
    return "triton" in os.environ.get("VLFAST_REQUIRE_BACKENDS", "").lower()


def _triton36_dir() -> tuple[Optional[Path], str]:
    """(the Triton 3.6 target directory, "") or (None, why it is not there)."""
    d = Path(os.environ.get("VLFAST_TRITON36_DIR") or Path(sys.prefix) / "triton36")
    if (d / "triton" / "__init__.py").is_file():
        return d, ""
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(d), TRITON36_SPEC]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except subprocess.TimeoutExpired:
        return None, f"`{' '.join(cmd)}` timed out"
    if p.returncode != 0 or not (d / "triton" / "__init__.py").is_file():
        return None, f"`{' '.join(cmd)}` failed: {(p.stderr or p.stdout)[-1500:]}"
    return d, ""


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict:
    t36, why = _triton36_dir()
    if t36 is None and _required():
        pytest.fail(f"Triton 3.6 is needed to compile the kernels with it (VLFAST_REQUIRE_BACKENDS names "
                    f"triton): {why}")
    out = tmp_path_factory.mktemp("gpu_compile") / "summary.json"
    cmd = [sys.executable, str(SCRIPT), "--subset", "--json", str(out)]
    if t36 is not None:
        cmd += ["--triton-path", str(t36)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert out.is_file(), f"gpu_compile.py wrote no summary (exit {p.returncode}):\n{p.stderr[-5000:]}"
    summary = json.loads(out.read_text())
    summary["returncode"], summary["stderr"] = p.returncode, p.stderr
    summary["triton36_missing"] = why
    return summary


def _expected_kernels() -> list[str]:
    return _script().all_kernels()


def test_every_kernel_compiles_for_both_archs_with_both_tritons(report: dict) -> None:
    assert report["returncode"] == 0, report["stderr"][-6000:]
    assert report["errors"] == 0, [r for r in report["rows"] if r["status"] != "ok"]
    kernels = _expected_kernels()
    # the kernels of kernels/*/triton.py, as this (interpreted) process sees them
    assert len(kernels) >= 16 and "bias_gelu._fwd_kernel" in kernels and "attention._attn_fwd_kernel" in kernels
    assert sorted(report["kernels"]) == sorted(kernels)
    versions = [v["triton"] for v in report["versions"]]
    import triton

    assert versions[0] == triton.__version__
    if not report["triton36_missing"]:
        assert any(v.startswith("3.6") for v in versions), versions
    rows = report["rows"]
    for v in versions:
        for k in kernels:
            for arch in ARCHS:
                got = [r for r in rows if r["kernel"] == k and r["arch"] == arch and r["compiler"] == f"triton {v}"]
                assert got, f"{k} was not compiled for {arch} with triton {v}"
                for r in got:
                    assert r["status"] == "ok", r
                    assert 0 < int(r["registers"]) <= 255, r
                    assert int(r["spill_stores"]) >= 0 and int(r["spill_loads"]) >= 0, r
                    assert int(r["shared_mem"]) >= 0 and int(r["num_warps"]) in (1, 2, 4, 8, 16), r
    assert report["compiles"] == len(rows) == report["compiled_specs"] * len(ARCHS) * len(versions)
    assert report["compiled_specs"] >= len(kernels)
    # the capture saw the launches of the ops and the four models
    assert report["captured_specs"] > 100 and report["launches"] > 1000
    if report["triton36_missing"]:
        pytest.skip(f"compiled with triton {versions[0]} only: {report['triton36_missing']}")


def test_bias_gelu_compiles(report: dict) -> None:
    """The kernel of issue 16 (a plain Python global read in the kernel body)."""
    for name in ("bias_gelu._fwd_kernel", "bias_gelu._bwd_kernel"):
        for arch in ARCHS:
            rows = [r for r in report["rows"] if r["kernel"] == name and r["arch"] == arch]
            assert rows and all(r["status"] == "ok" and int(r["registers"]) > 0 for r in rows), (name, arch, rows)


def test_attention_uses_tensor_cores(report: dict) -> None:
    """sm_90: the attention kernels' dots are Hopper warpgroup MMAs (wgmma); sm_80: the
    dK/dV kernel pipelines its loads with cp.async."""
    att = [r for r in report["rows"] if r["kernel"].split(".")[0] in ("attention", "co_attention")]
    assert att
    assert all(r["wgmma"] for r in att if r["arch"] == "sm_90"), [r for r in att if not r["wgmma"]]
    assert any(r["cp_async"] for r in att if r["arch"] == "sm_80" and "dkdv" in r["kernel"])


# ----------------------------------------------------------------------------------
# The script's pieces (no compile)
# ----------------------------------------------------------------------------------

PTXAS_LOG = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_fwd_kernel' for 'sm_80'
ptxas info    : Function properties for _fwd_kernel
    0 bytes stack frame, 8 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers, 32 bytes smem, 400 bytes cmem[0]
"""


def test_parse_ptxas_log() -> None:
    g = _script()
    assert g.parse_ptxas_log(PTXAS_LOG) == {"registers": 168, "spill_stores": 8, "spill_loads": 12,
                                            "static_smem": 32}
    assert g.parse_ptxas_log("")["registers"] == -1


def test_ptx_features() -> None:
    g = _script()
    assert g.ptx_features("cp.async.cg.shared.global [%r1], [%rd2], 16;") == \
        {"cp_async": True, "wgmma": False, "tma": False}
    f = g.ptx_features("wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16\n"
                       "cp.async.bulk.tensor.2d.shared::cluster.global [%r1], [%rd1, {%r2, %r3}];")
    assert f == {"cp_async": False, "wgmma": True, "tma": True}


def test_covering_subset_keeps_every_kernel() -> None:
    g = _script()

    def spec(kernel: str, dt: str, flag: bool, sid: str) -> dict:
        return {"kernel": kernel, "spec_id": sid, "arg_names": ["X", "FLAG"],
                "params": [[dt, "D"], ["constexpr", flag]], "num_warps": 4, "num_stages": 3}

    specs = [spec("a.k", "*fp32", False, "1"), spec("a.k", "*bf16", True, "2"), spec("a.k", "*fp16", False, "3"),
             spec("b.k", "*fp32", False, "4")]
    one = g.covering_subset(specs, 1)
    assert sorted(s["kernel"] for s in one) == ["a.k", "b.k"]
    assert [s["spec_id"] for s in one if s["kernel"] == "a.k"] == ["2"]   # the richest: flag on, half
    three = g.covering_subset(specs, 3)
    assert sorted(s["spec_id"] for s in three) == ["1", "2", "3", "4"]   # fp16 and fp32 too
    assert "FLAG=True" in g.spec_label(dict(specs[1], arg_names=["X", "FLAG"]))


def _bias_gelu_spec(block_m: int) -> dict:
    ptr, i32 = ["*fp32", "D"], ["i32", "D"]
    spec = {"module": "vlfast.kernels.bias_gelu.triton", "name": "_fwd_kernel", "kernel": "bias_gelu._fwd_kernel",
            "arg_names": ["X", "BIAS", "Y", "n_rows", "E", "BLOCK_M", "BLOCK_N", "RNE_BF16"],
            "params": [ptr, ptr, ptr, i32, i32, ["constexpr", block_m], ["constexpr", 32], ["constexpr", False]],
            "num_warps": 4, "num_stages": 3, "extra_options": {}}
    g = _script()
    return dict(spec, spec_id=g.spec_id(spec), label=g.spec_label(spec), workloads=["test"])


def test_compile_step_reports_errors_as_rows(tmp_path: Path) -> None:
    """The compile process on two hand-made specialisations: a good one, and one Triton
    rejects (tl.arange needs a power of two)."""
    specs = tmp_path / "specs.json"
    specs.write_text(json.dumps([_bias_gelu_spec(32), _bias_gelu_spec(48)]))
    out = tmp_path / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "cache"), TRITON_DUMP_PTXAS_LOG="1")
    p = subprocess.run([sys.executable, str(SCRIPT), "_compile", "--specs", str(specs), "--out", str(out),
                        "--archs", "80", "--jobs", "1"], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    good, bad = json.loads(out.read_text())["rows"]
    assert good["status"] == "ok" and int(good["registers"]) > 0 and good["arch"] == "sm_80", good
    assert bad["status"] == "error" and "BLOCK_M=48" in bad["specialisation"] and bad["error"], bad


def test_main_fails_and_lists_compile_errors(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    g = _script()
    ok, bad = _bias_gelu_spec(32), _bias_gelu_spec(48)
    monkeypatch.setattr(g, "capture", lambda quick=False, tmp=None: {
        "specs": [ok, bad], "kernels": ["bias_gelu._fwd_kernel"], "failures": [], "launches": 2, "capture_s": 0.0})

    def fake_compile(specs, archs, jobs, triton_path, tmp):
        rows = [{"kernel": s["kernel"], "spec_id": s["spec_id"], "specialisation": s["label"], "arch": f"sm_{a}",
                 "compiler": "triton 9.9", "status": "ok" if s is ok else "error",
                 "error": "" if s is ok else "CompilationError: arange's range must be a power of 2"}
                for s in specs for a in archs]
        return {"triton": "9.9", "rows": rows, "compile_wall_s": 0.0}

    monkeypatch.setattr(g, "compile_specs", fake_compile)
    assert g.main(["--subset", "--per-kernel", "2", "--archs", "80"]) == 1
    err = capsys.readouterr().err
    assert "COMPILE ERROR bias_gelu._fwd_kernel" in err and "BLOCK_M=48" in err and "power of 2" in err
