"""Smoke test of benchmarks/bench_layer_norm.py: ``main`` on a tiny problem (the hidden
``--tiny``; torch.compile left out, Inductor alone takes ~10 s) into a temporary CSV;
the tracked ``benchmarks/results/*.csv`` stay untouched.  The GPU-only headlines are
checked on synthetic rows."""
from __future__ import annotations

import csv
import hashlib
import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
RESULTS = BENCH / "results"
COLUMNS = {"timestamp", "device", "device_type", "torch", "git_commit", "op", "provider", "backend", "mode",
           "tokens", "hidden", "dtype", "median_ms", "p20_ms", "p80_ms", "gbps", "peak_mem_mb", "quick"}
MODES = {"fwd", "bwd", "fwd_bwd"}


def load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"vlfast_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def snapshot() -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(RESULTS.iterdir()) if p.is_file()}


def check_rows(path: Path, ops: set[str], device: str) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        header, rows = set(reader.fieldnames or []), list(reader)
    assert not COLUMNS - header, sorted(COLUMNS - header)
    assert {r["op"] for r in rows} == ops
    assert {r["provider"] for r in rows} == {"eager", "vlfast"}
    for r in rows:
        assert {x["mode"] for x in rows if x["op"] == r["op"] and x["provider"] == r["provider"]} == MODES
        t = float(r["median_ms"])
        assert math.isfinite(t) and t > 0 and float(r["p20_ms"]) <= t <= float(r["p80_ms"]), r
        assert r["device_type"] == device and r["quick"] == "1" and r["backend"], r
        assert r["peak_mem_mb"] == "" if device == "cpu" else float(r["peak_mem_mb"]) > 0, r
        if device == "cpu" and r["provider"] == "vlfast":
            assert r["backend"] == "reference", r
    return rows


@pytest.fixture(scope="module")
def bln() -> ModuleType:
    return load("bench_layer_norm")


def test_bench_layer_norm_smoke(bln: ModuleType, device: str, tmp_path: Path):
    before = snapshot()
    out = tmp_path / "x.csv"
    assert bln.main(["--tiny", "--quick", "--device", device, "--providers", "eager,vlfast", "--out", str(out)]) == 0
    assert snapshot() == before, "benchmarks/results/ was modified"
    rows = check_rows(out, {"layer_norm", "dropout_add_layer_norm"}, device)
    for r in rows:  # bytes moved: gbps * seconds / (N E esize) is the per-mode multiple
        per = float(r["gbps"]) * 1e9 * float(r["median_ms"]) / 1e3 / (int(r["tokens"]) * int(r["hidden"]))
        esize = 2 if r["dtype"] in ("bf16", "fp16") else 4
        assert per / esize == pytest.approx(bln.OPS[r["op"]].bytes_per_elem[r["mode"]], rel=1e-3), r
        assert float(r["dropout_p"]) == (0.1 if r["op"] == "dropout_add_layer_norm" else 0.0)


def test_no_save_and_op_subset(bln: ModuleType, tmp_path: Path):
    out = tmp_path / "x.csv"
    assert bln.main(["--tiny", "--device", "cpu", "--providers", "eager", "--ops", "layer_norm", "--modes", "bwd",
                     "--no-save", "--out", str(out)]) == 0
    assert not out.exists()


def test_baselines_compute_what_the_ops_compute(bln: ModuleType):
    (x, r), (w, b) = bln.make_inputs(2, 9, 48, torch.float32, torch.device("cpu"), 0)
    torch.testing.assert_close(bln.eager_layer_norm(x, w, b, 1e-12), bln.OPS["layer_norm"].vlfast(x, w, b, 1e-12))
    torch.testing.assert_close(bln.eager_dropout_add_layer_norm(x, r, w, b, 0.0, 1e-12),
                               bln.OPS["dropout_add_layer_norm"].vlfast(x, r, w, b, 0.0, 1e-12))


def test_headlines_on_synthetic_rows(bln: ModuleType):
    def row(prov, mode, ms, op="layer_norm"):
        return {"op": op, "provider": prov, "mode": mode, "tokens": 32768, "hidden": 768, "dtype": "bf16",
                "median_ms": ms, "gbps": 3000.0 if prov == "vlfast" else 1000.0}

    rows = [row("eager", "bwd", 0.10), row("vlfast", "bwd", 0.08), row("eager", "fwd_bwd", 0.3),
            row("vlfast", "fwd_bwd", 0.25), row("compile", "fwd_bwd", 0.2)]
    text = "\n".join(bln.headlines(rows, 3350.0, ln_bwd=True))
    assert "torch's backward 1.25x (ok >= 1x)" in text
    assert "eager 1.20x (MISSED >= 1.5x)" in text
    assert "(90% of 3350: ok)" in text and "compile 0.80x" in text
