"""Smoke tests of benchmarks/bench_attention.py and benchmarks/bench_co_attention.py.

Each script's ``main`` runs on a tiny problem (the hidden ``--tiny``: seconds on a
2-core CPU; torch.compile is left out, Inductor alone takes ~10 s) and appends to a
temporary CSV; the tracked ``benchmarks/results/*.csv`` must stay untouched.  The
GPU-only headline printing is checked on synthetic rows.  The scripts are not part
of the installed package: they are loaded from the checkout next to this file.
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

COLUMNS = {"timestamp", "device", "device_type", "torch", "git_commit", "op", "provider", "backend", "mode",
           "B", "H", "D", "dtype", "real_frac", "median_ms", "p20_ms", "p80_ms", "tflops", "tflops_real",
           "peak_mem_mb", "quick"}
MODES = {"fwd", "bwd", "fwd_bwd"}


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"vlfast_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None, BENCH / f"{name}.py"
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def ba() -> ModuleType:
    return _load("bench_attention")


@pytest.fixture(scope="module")
def bco() -> ModuleType:
    return _load("bench_co_attention")


def _snapshot() -> dict[str, str]:
    """Name -> sha256 of every file in benchmarks/results."""
    if not RESULTS.is_dir():
        return {}
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(RESULTS.iterdir()) if p.is_file()}


def _read(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def _check_csv(path: Path, providers: set[str], extra_columns: set[str], device: str) -> list[dict[str, str]]:
    assert path.exists(), f"{path} was not written"
    header, rows = _read(path)
    missing = (COLUMNS | extra_columns) - set(header)
    assert not missing, f"columns missing from {path.name}: {sorted(missing)} (header {header})"
    assert rows, "no rows"
    assert {r["provider"] for r in rows} == providers
    for prov in providers:
        assert {r["mode"] for r in rows if r["provider"] == prov} == MODES, prov
    for r in rows:
        for col in ("median_ms", "p20_ms", "p80_ms", "tflops", "tflops_real"):
            x = float(r[col])
            assert math.isfinite(x) and x > 0, (col, r)
        assert float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"]), r
        assert 0 < float(r["real_frac"]) <= 1, r
        assert r["device_type"] == device, r
        assert r["quick"] == "1", r
        assert r["backend"], r
        if device == "cuda":
            assert float(r["peak_mem_mb"]) > 0, r
        else:
            assert r["peak_mem_mb"] == "", r  # torch keeps no CPU peak: empty, not a guess
    return rows


def _expected_attention_providers(ba: ModuleType, device: str) -> set[str]:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    dev = torch.device(device)
    return {p for p in ba.PROVIDERS if p != "compile" and ba.static_skip(p, dev, 16, dtype) is None}


def test_bench_attention_smoke(ba: ModuleType, device: str, tmp_path: Path, capsys: pytest.CaptureFixture):
    before = _snapshot()
    out = tmp_path / "x.csv"
    providers = [p for p in ba.PROVIDERS if p != "compile"]
    rc = ba.main(["--tiny", "--quick", "--device", device, "--providers", ",".join(providers), "--out", str(out)])
    assert rc == 0
    assert _snapshot() == before, "benchmarks/results/ was modified"
    expected = _expected_attention_providers(ba, device)
    if device == "cpu" and ba.vops.requested_backend() == "auto":
        assert expected == {"eager", "sdpa", "vlfast", "vlfast_varlen"}
    rows = _check_csv(out, expected, {"L"}, device)
    err = capsys.readouterr().err
    if "flash_varlen" not in expected:
        assert "skip flash_varlen" in err
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    for r in rows:
        if r["provider"] in ("vlfast", "vlfast_varlen"):  # labelled with what dispatch runs
            op = "attention" if r["provider"] == "vlfast" else "varlen_attention"
            assert r["backend"] == ba.vlfast_backend(op, torch.device(device), 16, dtype)[0], r
            if device == "cpu":
                assert r["backend"] == "reference", r
        if r["provider"] in ("vlfast_varlen", "flash_varlen"):  # no padding: both counts agree
            assert float(r["tflops"]) == pytest.approx(float(r["tflops_real"]), rel=1e-4)
        else:
            assert float(r["tflops"]) >= float(r["tflops_real"]), r


def test_bench_co_attention_smoke(bco: ModuleType, device: str, tmp_path: Path):
    before = _snapshot()
    out = tmp_path / "x.csv"
    providers = [p for p in bco.PROVIDERS if p != "compile"]
    rc = bco.main(["--tiny", "--quick", "--device", device, "--providers", ",".join(providers), "--out", str(out)])
    assert rc == 0
    assert _snapshot() == before, "benchmarks/results/ was modified"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    expected = {p for p in providers if bco.static_skip(p, torch.device(device), 16, dtype) is None}
    rows = _check_csv(out, expected, {"Lt", "Lv"}, device)
    for r in rows:
        assert float(r["tflops"]) >= float(r["tflops_real"]), r


def test_no_save_writes_nothing(ba: ModuleType, tmp_path: Path):
    out = tmp_path / "x.csv"
    assert ba.main(["--tiny", "--device", "cpu", "--providers", "eager", "--modes", "fwd", "--no-save",
                    "--out", str(out)]) == 0
    assert not out.exists()


def test_rows_append_to_an_existing_csv(ba: ModuleType, tmp_path: Path):
    out = tmp_path / "x.csv"
    argv = ["--tiny", "--device", "cpu", "--providers", "sdpa", "--modes", "fwd", "--out", str(out)]
    assert ba.main(argv) == 0
    assert ba.main(argv) == 0
    _, rows = _read(out)
    assert len(rows) == 2


def test_flop_counts(ba: ModuleType, bco: ModuleType):
    case = ba.Case(2, 3, 10, 8, torch.float32, (4, 10), torch.device("cpu"))
    assert case.flops("fwd") == 4 * 2 * 3 * 10 * 10 * 8
    assert case.flops("bwd") == 2.5 * case.flops("fwd")
    assert case.flops("fwd_bwd") == 3.5 * case.flops("fwd")
    assert case.real_flops("fwd") == 4 * 3 * 8 * (4 * 4 + 10 * 10)
    assert case.real_frac == pytest.approx(14 / 20)
    q, k, v, cu, max_len = case.packed()
    assert q.shape == (14, 3, 8) and cu.tolist() == [0, 4, 14] and cu.dtype == torch.int32 and max_len == 10
    qp, _, _, mask = case.padded()
    assert torch.equal(q[4:], qp[1].transpose(0, 1)) and mask.sum(1).tolist() == [4, 10]

    co = bco.CoCase(2, 3, 5, 7, 8, torch.float32, (2, 5), (7, 3), torch.device("cpu"))
    assert co.flops("fwd") == 2 * 4 * 2 * 3 * 5 * 7 * 8
    assert co.real_flops("fwd_bwd") == 3.5 * 8 * 3 * 8 * (2 * 7 + 5 * 3)
    assert co.real_frac == pytest.approx((7 + 10) / (2 * 12))


def test_ragged_lengths_are_seeded_and_never_empty(ba: ModuleType, bco: ModuleType):
    a = ba.ragged_lengths(64, 128, [ba.TEXT_LEN, ba.REGIONS], seed=0)
    assert a == ba.ragged_lengths(64, 128, [ba.TEXT_LEN, ba.REGIONS], seed=0)
    assert a != ba.ragged_lengths(64, 128, [ba.TEXT_LEN, ba.REGIONS], seed=1)
    assert all(15 <= n <= 128 for n in a) and min(a) < 128
    # the same samples, clipped to another L
    assert ba.ragged_lengths(64, 40, [ba.TEXT_LEN, ba.REGIONS], seed=0) == [min(n, 40) for n in a]
    co = bco.make_case(256, 8, 23, 101, 128, torch.float32, torch.device("cpu"), 0)
    assert all(5 <= n <= 23 for n in co.t_lens) and all(11 <= n <= 101 for n in co.v_lens)


def test_eager_and_sdpa_baselines_agree_with_vlfast(ba: ModuleType, bco: ModuleType):
    """The baselines compute the same attention as the op they are compared with."""
    case = ba.Case(3, 2, 12, 8, torch.float32, (3, 12, 7), torch.device("cpu"))
    q, k, v, mask = case.padded()
    scale = 8 ** -0.5
    ref = ba.vops.attention(q, k, v, mask)
    torch.testing.assert_close(ba.eager_attention(q, k, v, mask, scale), ref)
    torch.testing.assert_close(ba.sdpa_attention(q, k, v, mask, scale), ref)
    fwd, _, _ = ba.build("vlfast_varlen", case, ba.eager_attention)
    torch.testing.assert_close(fwd(), ref.transpose(1, 2)[mask])

    co = bco.make_case(2, 2, 5, 9, 8, torch.float32, torch.device("cpu"), 0)
    outs = {p: bco.build(p, co, bco.eager_co_attention)[0]() for p in ("eager", "sdpa_x2", "vlfast", "vlfast_x2")}
    for p in ("eager", "sdpa_x2", "vlfast_x2"):
        for a, b in zip(outs[p], outs["vlfast"]):
            torch.testing.assert_close(a, b)


def _fake_rows(op: str, providers: dict[str, float], shape: dict, lengths: list[int]) -> list[dict]:
    rows = []
    for mode in ("fwd", "fwd_bwd"):
        for L in lengths:
            for prov, ms in providers.items():
                rows.append({"op": op, "provider": prov, "mode": mode, "dtype": "bf16", **shape, "L": L,
                             "real_frac": 0.6, "median_ms": ms * L / 128, "peak_mem_mb": 10.0 * L})
    return rows


def test_headlines_on_synthetic_rows(ba: ModuleType, bco: ModuleType):
    rows = _fake_rows("attention", {"vlfast": 1.0, "sdpa": 1.5, "eager": 2.0, "vlfast_varlen": 0.55,
                                    "flash_varlen": 0.5}, {"B": 64, "H": 12, "D": 64}, [40, 128, 200])
    text = "\n".join(ba.headlines(rows, [40, 128, 200]))
    assert "sdpa 1.500 ms -> 1.50x (ok)" in text
    assert "eager 2.000 ms -> 2.00x (MISSED)" in text
    assert "vlfast/flash 1.10 (ok)" in text
    assert "exponent 1.00" in text
    co_rows = [{**r, "Lt": 23, "Lv": 101} for r in _fake_rows(
        "co_attention", {"vlfast": 1.0, "sdpa_x2": 1.6, "eager": 4.0}, {"B": 64, "H": 8, "D": 128}, [128])]
    co_text = "\n".join(bco.headlines(co_rows))
    assert "sdpa_x2 1.600 ms -> 1.60x (ok)" in co_text


def test_script_runs_as_a_file():
    """`python benchmarks/bench_co_attention.py --help` works: the script finds _common and
    bench_attention itself (and --tiny stays hidden)."""
    import subprocess

    r = subprocess.run([sys.executable, str(BENCH / "bench_co_attention.py"), "--help"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "--modes" in r.stdout and "--tiny" not in r.stdout
