"""Smoke tests of benchmarks/bench_linear_cross_entropy.py: its ``main`` on tiny problems
(the hidden ``--tiny``; torch.compile left out, Inductor alone takes ~10 s) into a
temporary CSV (the tracked ``benchmarks/results/*.csv`` stay untouched), the baselines
against the op, the FLOP/byte counts and the GPU headline on synthetic rows.  The
script is loaded from the checkout next to this file."""
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
COLUMNS = {"timestamp", "device", "device_type", "torch", "git_commit", "op", "kind", "provider", "backend", "mode",
           "N", "E", "V", "dtype", "median_ms", "p20_ms", "p80_ms", "gbps", "tflops", "peak_mem_mb", "quick"}


@pytest.fixture(scope="module")
def bl() -> ModuleType:
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("vlfast_bench_linear_cross_entropy",
                                                  BENCH / "bench_linear_cross_entropy.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _snapshot() -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(RESULTS.iterdir()) if p.is_file()}


def test_bench_smoke(bl: ModuleType, device: str, tmp_path: Path):
    before = _snapshot()
    out = tmp_path / "x.csv"
    assert bl.main(["--tiny", "--quick", "--device", device, "--providers", "eager,vlfast", "--out", str(out)]) == 0
    assert _snapshot() == before, "benchmarks/results/ was modified"
    with open(out, newline="") as f:
        reader = csv.DictReader(f)
        header, rows = set(reader.fieldnames or []), list(reader)
    assert not COLUMNS - header, sorted(COLUMNS - header)
    assert {(r["kind"], r["provider"], r["mode"]) for r in rows} == {
        (k, p, m) for k in bl.KINDS for p in ("eager", "vlfast") for m in bl.MODES}
    for r in rows:
        for col in ("median_ms", "p20_ms", "p80_ms", "gbps", "tflops"):
            assert math.isfinite(float(r[col])) and float(r[col]) > 0, (col, r)
        assert float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"]), r
        assert int(r["V"]) == bl.KINDS[r["kind"]] and r["quick"] == "1" and r["device_type"] == device
        if device == "cpu":
            assert r["peak_mem_mb"] == ""
            if r["provider"] == "vlfast" and bl.vops.requested_backend() == "auto":
                assert r["backend"] == "reference"
        else:
            assert float(r["peak_mem_mb"]) > 0


def test_no_save_writes_nothing(bl: ModuleType, tmp_path: Path):
    out = tmp_path / "x.csv"
    assert bl.main(["--tiny", "--device", "cpu", "--providers", "vlfast", "--kinds", "mrc", "--modes", "fwd",
                    "--no-save", "--out", str(out)]) == 0
    assert not out.exists()


def test_baselines_compute_the_op(bl: ModuleType):
    for kind in bl.KINDS:
        case = bl.Case(kind, 20, 16, torch.float32, torch.device("cpu"))
        h, w, b, y = case.tensors()
        eager = bl.eager_kl if case.soft else bl.eager_hard
        fused = bl.vlfast_kl if case.soft else bl.vlfast_hard
        torch.testing.assert_close(fused(h, w, b, y), eager(h, w, b, y))
        if not case.soft:
            assert (y == -100).sum() == 3


def test_counts(bl: ModuleType):
    case = bl.Case("mlm", 10, 8, torch.bfloat16, torch.device("cpu"))
    assert case.flops("fwd") == 2 * 10 * 30522 * 8
    assert case.flops("fwd_bwd") == 3 * case.flops("fwd")
    assert case.min_bytes("fwd") == (10 * 8 + 30522 * 8 + 30522) * 2 + 10 * 8
    assert case.min_bytes("fwd_bwd") == case.min_bytes("fwd") + (10 * 8 + 30522 * 8 + 30522) * 2
    soft = bl.Case("mrc_kl", 10, 8, torch.float32, torch.device("cpu"))
    assert soft.min_bytes("fwd") == (10 * 8 + 1601 * 8 + 1601) * 4 + 10 * 1601 * 4


def test_headline_on_synthetic_rows(bl: ModuleType):
    rows = [{"provider": p, "kind": "mlm", "N": 32768, "V": 30522, "E": 768, "mode": "fwd_bwd", "dtype": "bf16",
             "median_ms": ms, "peak_mem_mb": mb} for p, ms, mb in (("eager", 100.0, 20000.0),
                                                                   ("vlfast", 110.0, 2000.0))]
    text = "\n".join(bl.headlines(rows))
    assert "= 10.0% (target <= 30%: ok)" in text and "= 1.10x (target <= 1.2x: ok)" in text
    rows[1]["median_ms"] = 130.0
    assert "1.30x (target <= 1.2x: MISSED)" in "\n".join(bl.headlines(rows))
