"""Smoke test of benchmarks/bench_embeddings.py: its main runs on a tiny problem (the
hidden ``--tiny``; torch.compile left out) into a temporary CSV; the tracked
``benchmarks/results/*.csv`` must stay untouched."""
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


@pytest.fixture(scope="module")
def be() -> ModuleType:
    spec = importlib.util.spec_from_file_location("vlfast_bench_embeddings", BENCH / "bench_embeddings.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _snapshot() -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(RESULTS.iterdir()) if p.is_file()}


def test_bench_embeddings_smoke(be: ModuleType, tmp_path: Path):
    before = _snapshot()
    out = tmp_path / "x.csv"
    assert be.main(["--tiny", "--quick", "--device", "cpu", "--providers", "eager,vlfast", "--out", str(out)]) == 0
    assert _snapshot() == before, "benchmarks/results/ was modified"
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert {r["op"] for r in rows} == set(be.OP_NAMES.values())
    assert {(r["provider"], r["mode"]) for r in rows} == {(p, m) for p in ("eager", "vlfast")
                                                          for m in ("fwd", "fwd_bwd")}
    for r in rows:
        for col in ("median_ms", "p20_ms", "p80_ms", "gbps"):
            assert math.isfinite(float(r[col])) and float(r[col]) > 0, (col, r)
        assert float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"]), r
        assert r["device_type"] == "cpu" and r["quick"] == "1" and r["peak_mem_mb"] == ""
        if r["provider"] == "vlfast":
            assert r["backend"] == "reference", r  # what auto runs on CPU


def test_eager_baselines_compute_what_the_ops_compute(be: ModuleType):
    for op in be.OPS:
        inputs, _ = be.make_inputs(op, 2, 5, 32, torch.float32, torch.device("cpu"))
        torch.testing.assert_close(be.eager_fn(op, 0.0)(*inputs), be.vlfast_fn(op, 0.0)(*inputs))


def test_min_bytes(be: ModuleType):
    assert be.min_bytes("vilbert", 10, 8, 4, "fwd") == 4 * 10 * 8 * 3
    assert be.min_bytes("text", 10, 8, 2, "fwd_bwd") == 2 * 10 * 8 * (4 + 4)
