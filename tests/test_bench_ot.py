"""Smoke tests of benchmarks/bench_ot.py.

``main`` runs on a tiny batch (the hidden ``--tiny``: B=4, 6 x 8, 5 iterations;
well under a second) and appends to a temporary CSV; the tracked
``benchmarks/results/*.csv`` must stay untouched.  The eager UNITER-style baseline is
checked against ``vlfast.ops.ipot``, and the target lines on synthetic rows.  The
script is not part of the installed package: it is loaded from the checkout.
"""
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

COLUMNS = {"timestamp", "device", "device_type", "torch", "git_commit", "op", "provider", "backend", "B", "Lx",
           "Ly", "n_iters", "median_ms", "p20_ms", "p80_ms", "problems_per_s", "peak_mem_mb", "quick"}


@pytest.fixture(scope="module")
def bo() -> ModuleType:
    spec = importlib.util.spec_from_file_location("vlfast_bench_ot", BENCH / "bench_ot.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _snapshot() -> dict[str, str]:
    if not RESULTS.is_dir():
        return {}
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(RESULTS.iterdir()) if p.is_file()}


def _read(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def test_bench_ot_smoke(bo: ModuleType, device: str, tmp_path: Path, capsys: pytest.CaptureFixture):
    before = _snapshot()
    out = tmp_path / "ot.csv"
    assert bo.main(["--tiny", "--quick", "--device", device, "--out", str(out)]) == 0
    assert _snapshot() == before, "benchmarks/results/ was modified"
    header, rows = _read(out)
    assert not COLUMNS - set(header), sorted(COLUMNS - set(header))
    dev = torch.device(device)
    expected = {p for p in bo.PROVIDERS if bo.static_skip(p, dev) is None}
    if device == "cpu":
        assert "cuda_graph" not in expected and {"vlfast", "eager", "vlfast_sinkhorn"} <= expected
    assert {r["provider"] for r in rows} == expected
    assert len(rows) == len(expected)  # one batch size under --tiny
    for r in rows:
        assert (r["B"], r["Lx"], r["Ly"], r["n_iters"]) == ("4", "6", "8", "5"), r
        for col in ("median_ms", "p20_ms", "p80_ms", "problems_per_s"):
            assert math.isfinite(float(r[col])) and float(r[col]) > 0, (col, r)
        assert float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"]), r
        assert float(r["problems_per_s"]) == pytest.approx(4 / (float(r["median_ms"]) / 1e3), rel=1e-3)
        assert r["device_type"] == device and r["device"] and r["quick"] == "1", r
        assert (r["peak_mem_mb"] == "") == (device == "cpu"), r  # no CPU peak: empty, not a guess
        if r["provider"] in ("vlfast", "vlfast_sinkhorn"):
            assert r["backend"] == bo.vlfast_backend("ipot", dev), r  # what dispatch runs (cpp on CPU)
    stdout = capsys.readouterr()
    assert "vlfast (" in stdout.out and "at B=4, 6x8: " in stdout.out
    if device == "cpu":
        assert "skip cuda_graph" in stdout.err


def test_no_save_and_append(bo: ModuleType, tmp_path: Path):
    out = tmp_path / "ot.csv"
    argv = ["--tiny", "--device", "cpu", "--providers", "vlfast,eager", "--out", str(out)]
    assert bo.main(argv + ["--no-save"]) == 0
    assert not out.exists()
    assert bo.main(argv) == 0 and bo.main(argv) == 0
    _, rows = _read(out)
    assert [r["provider"] for r in rows] == ["vlfast", "eager"] * 2


def test_eager_baseline_is_uniters_ipot(bo: ModuleType):
    """The eager loop (padding masks, regions x text, + 1e4) computes ops.ipot's plan, transposed."""
    import vlfast.ops as vops

    case = bo.make_case(5, 9, 13, (1, 9), (1, 13), torch.device("cpu"), seed=3)
    assert not bool(case.x_mask.all()) and not bool(case.y_mask.all())  # ragged
    for k in (1, 2):
        eager = bo.eager_ipot(case.cost, ~case.x_mask, ~case.y_mask, 0.5, 20, k)
        assert eager.shape == (5, 13, 9)
        with vops.backend("reference"):
            plan = vops.ipot(case.cost, case.x_mask, case.y_mask, beta=0.5, n_iters=20, k=k)
        torch.testing.assert_close(eager.transpose(1, 2), plan, rtol=1e-4, atol=1e-6)


def test_make_case_is_seeded_and_ragged(bo: ModuleType):
    a = bo.make_case(64, bo.LX, bo.LY, bo.TEXT_LEN, bo.REGIONS, torch.device("cpu"), seed=0)
    b = bo.make_case(64, bo.LX, bo.LY, bo.TEXT_LEN, bo.REGIONS, torch.device("cpu"), seed=0)
    assert torch.equal(a.cost, b.cost) and torch.equal(a.x_mask, b.x_mask)
    nx, ny = a.x_mask.sum(1), a.y_mask.sum(1)
    assert 20 <= int(nx.min()) and int(nx.max()) <= 60 and 10 <= int(ny.min()) and int(ny.max()) <= 100
    assert int(nx.min()) < 60 and int(ny.min()) < 100
    joint = a.x_mask[:, :, None] & a.y_mask[:, None, :]
    assert bool((a.cost[~joint] == 0).all()) and float(a.cost.max()) <= 2.0


def test_headlines_on_synthetic_rows(bo: ModuleType):
    def row(prov: str, ms: float, B: int = 128) -> dict:
        return {"provider": prov, "backend": "cuda" if prov == "vlfast" else prov, "B": B, "Lx": 60, "Ly": 100,
                "median_ms": ms}

    cpu = "\n".join(bo.headlines([row("vlfast", 10.0), row("eager", 80.0), row("eager", 1.0, B=32)], "cpu"))
    assert "vs eager 80.000 ms at B=128, 60x100: 8.00x (target >= 3x: ok)" in cpu
    gpu = "\n".join(bo.headlines([row("vlfast", 0.1), row("eager", 2.0), row("cuda_graph", 0.4)], "cuda"))
    assert "vs eager 2.000 ms at B=128, 60x100: 20.00x (target >= 30x: MISSED)" in gpu
    assert "vs cuda_graph 0.400 ms at B=128, 60x100: 4.00x (target >= 5x: MISSED)" in gpu
    assert "n/a" in "\n".join(bo.headlines([row("eager", 1.0)], "cpu"))


def test_script_runs_as_a_file():
    import subprocess

    r = subprocess.run([sys.executable, str(BENCH / "bench_ot.py"), "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "--quick" in r.stdout and "--tiny" not in r.stdout
