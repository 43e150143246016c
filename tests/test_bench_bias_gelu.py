"""Smoke test of benchmarks/bench_bias_gelu.py: ``main`` on a tiny problem (the hidden
``--tiny``, torch.compile left out) into a temporary CSV; the tracked
``benchmarks/results/*.csv`` stay untouched."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch


def _helpers():
    """load / snapshot / check_rows of test_bench_layer_norm.py (tests are no package)."""
    path = Path(__file__).resolve().parent / "test_bench_layer_norm.py"
    spec = importlib.util.spec_from_file_location("vlfast_test_bench_layer_norm", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


_h = _helpers()
check_rows, load, snapshot = _h.check_rows, _h.load, _h.snapshot


def test_bench_bias_gelu_smoke(device: str, tmp_path: Path):
    bg = load("bench_bias_gelu")
    before = snapshot()
    out = tmp_path / "x.csv"
    assert bg.main(["--tiny", "--quick", "--device", device, "--providers", "eager,vlfast", "--out", str(out)]) == 0
    assert snapshot() == before, "benchmarks/results/ was modified"
    rows = check_rows(out, {"bias_gelu"}, device)
    for r in rows:
        assert int(r["hidden"]) == bg.EXPANSION * 48  # the intermediate width
        per = float(r["gbps"]) * 1e9 * float(r["median_ms"]) / 1e3 / (int(r["tokens"]) * int(r["hidden"]))
        esize = 2 if r["dtype"] in ("bf16", "fp16") else 4
        assert per / esize == pytest.approx(bg.BYTES_PER_ELEM[r["mode"]], rel=1e-3), r
    x = torch.randn(5, 40)
    b = torch.randn(40)
    torch.testing.assert_close(bg.eager_bias_gelu(x, b), bg.vlfast_bias_gelu(x, b))
