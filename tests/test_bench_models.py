"""Smoke tests of benchmarks/bench_models.py (training step of the four models).

``main`` runs the hidden ``--tiny`` set (small configs, batch 2, one step per
provider, HF VisualBERT with the same tiny sizes) into a temporary CSV; the tracked
``benchmarks/results/*.csv`` must stay untouched.  The batches, the heads (checked
against HF ``VisualBertForPreTraining``'s loss on shared weights) and the target
lines are checked directly.  The script is not part of the installed package: it is
loaded from the checkout next to this file.
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

COLUMNS = {"timestamp", "device", "device_type", "torch", "git_commit", "model", "size", "provider", "backend",
           "step", "dtype", "B", "Lt", "Lv", "real_tokens", "real_frac", "params_m", "median_ms", "p20_ms",
           "p80_ms", "tokens_per_s", "peak_mem_mb", "quick"}


@pytest.fixture(scope="module")
def bm() -> ModuleType:
    spec = importlib.util.spec_from_file_location("vlfast_bench_models", BENCH / "bench_models.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _snapshot() -> dict[str, str]:
    if not RESULTS.is_dir():
        return {}
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(RESULTS.iterdir()) if p.is_file()}


def test_tiny_run_writes_rows(bm: ModuleType, device: str, tmp_path: Path):
    before = _snapshot()
    out = tmp_path / "m.csv"
    assert bm.main(["--tiny", "--device", device, "--out", str(out)]) == 0
    assert _snapshot() == before, "benchmarks/results/ was modified"
    with open(out, newline="") as f:
        reader = csv.DictReader(f)
        header, rows = list(reader.fieldnames or []), list(reader)
    assert not COLUMNS - set(header), sorted(COLUMNS - set(header))
    got = {(r["model"], r["provider"]) for r in rows}
    want = {(m, p) for m in bm.MODELS for p in ("vlfast_padded", "vlfast_packed", "reference")}
    assert got == want | {("visualbert", "hf")}, got ^ (want | {("visualbert", "hf")})
    for r in rows:
        assert r["size"] == "small" and r["B"] == "2" and r["step"] == "fwd_bwd" and r["quick"] == "1", r
        assert r["device_type"] == device and r["backend"], r
        for col in ("median_ms", "p20_ms", "p80_ms", "tokens_per_s", "params_m", "real_frac"):
            assert math.isfinite(float(r[col])) and float(r[col]) > 0, (col, r)
        assert float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"]), r
        tok = int(r["real_tokens"])
        assert float(r["tokens_per_s"]) == pytest.approx(tok / float(r["median_ms"]) * 1e3, rel=1e-3)
        assert 2 * (8 + 10) <= tok <= 2 * (60 + 100) and float(r["real_frac"]) <= 1, r
        if device == "cuda":
            assert float(r["peak_mem_mb"]) > 0, r
        else:
            assert r["peak_mem_mb"] == "", r  # torch keeps no CPU peak
    # one batch for every model and provider
    assert len({(r["Lt"], r["Lv"], r["real_tokens"]) for r in rows}) == 1


def test_batches_are_ragged_seeded_and_shared(bm: ModuleType):
    cpu = torch.device("cpu")
    batches = {m: bm.make_batch(m, bm.make_config(m, "small"), 16, 0, cpu) for m in bm.MODELS}
    b = batches["visualbert"]
    for other in batches.values():
        assert other.t_lens == b.t_lens and other.v_lens == b.v_lens
    assert all(8 <= n <= 60 for n in b.t_lens) and all(10 <= n <= 100 for n in b.v_lens)
    assert len(set(b.t_lens)) > 1 and len(set(b.v_lens)) > 1
    assert b.input_ids.shape == (16, max(b.t_lens)) and b.feats.shape[:2] == (16, max(b.v_lens))
    again = bm.make_batch("visualbert", bm.make_config("visualbert", "small"), 16, 0, cpu)
    assert torch.equal(again.input_ids, b.input_ids) and torch.equal(again.feats, b.feats)
    assert bm.make_batch("visualbert", bm.make_config("visualbert", "small"), 16, 1, cpu).t_lens != b.t_lens
    # MLM: ~15 % of the real words, only real words, never [CLS]; labels in HF's layout
    assert not (b.mlm_mask & ~b.t_mask).any() and not b.mlm_mask[:, 0].any()
    assert b.mlm_mask.sum(1).min() >= 1
    assert 0.1 < b.mlm_mask.sum() / b.t_mask.sum() < 0.2
    lab = b.hf_labels()
    assert lab.shape == (16, b.t_mask.shape[1] + b.v_mask.shape[1])
    assert torch.equal(lab[lab != -100], b.mlm_labels)
    assert batches["uniter"].boxes.shape[-1] == 7 and batches["vilbert"].boxes.shape[-1] == 5
    assert batches["vlbert"].boxes.shape[-1] == 4 and batches["vlbert"].image_size.shape == (16, 2)
    assert batches["visualbert"].boxes is None


def test_heads_give_hf_pretraining_loss(bm: ModuleType):
    """Our VisualBERT + the benchmark's heads, on HF's weights, compute HF
    VisualBertForPreTraining's loss (MLM only at the masked words is the same loss as
    HF's logits everywhere with labels -100 elsewhere), padded and packed."""
    from vlfast.models import VisualBert

    torch.manual_seed(0)
    cfg = bm.make_config("visualbert", "small")
    hf = bm.hf_model(cfg).eval()
    net = VisualBert.from_hf(hf)
    heads = bm.Heads("visualbert", net)
    sd = hf.state_dict()
    with torch.no_grad():
        for name in ("dense.weight", "dense.bias", "LayerNorm.weight", "LayerNorm.bias"):
            heads.mlm.transform.get_parameter(name).copy_(sd[f"cls.predictions.transform.{name}"])
        heads.mlm.bias.copy_(sd["cls.predictions.bias"])
        heads.seq_relationship.weight.copy_(sd["cls.seq_relationship.weight"])
        heads.seq_relationship.bias.copy_(sd["cls.seq_relationship.bias"])
    net.eval()
    b = bm.make_batch("visualbert", cfg, 3, 0, torch.device("cpu"))
    with torch.no_grad():
        want = bm.hf_loss(hf, b)
        for packed in (False, True):
            torch.testing.assert_close(bm.vlfast_loss("visualbert", net, heads, b, packed), want)


def test_every_model_step_reaches_its_heads(bm: ModuleType):
    cpu = torch.device("cpu")
    for model in bm.MODELS:
        cfg = bm.make_config(model, "small")
        b = bm.make_batch(model, cfg, 2, 0, cpu)
        step, n = bm.build_step("vlfast_packed", model, cfg, b, cpu, torch.float32, True, 0)
        loss = step()
        assert torch.isfinite(loss) and n > 0, model


def _row(model: str, provider: str, ms: float, mem: float = float("nan")) -> dict:
    return {"model": model, "size": "base", "provider": provider, "B": 16, "dtype": "fp32", "median_ms": ms,
            "tokens_per_s": 1000.0 / ms, "peak_mem_mb": mem}


def test_headlines(bm: ModuleType):
    rows = [_row("visualbert", "vlfast_padded", 8.0), _row("visualbert", "vlfast_packed", 5.0),
            _row("visualbert", "hf", 10.0)]
    text = "\n".join(bm.headlines(rows, on_gpu=False))
    assert "vlfast_packed" in text and "2.00x (ok)" in text and "vlfast_padded 125 tok/s (1.25x)" in text
    assert "MISSED" in "\n".join(bm.headlines([_row("visualbert", "vlfast_padded", 9.0),
                                               _row("visualbert", "hf", 10.0)], on_gpu=False))
    gpu = [_row("uniter", "vlfast_padded", 4.0, 500.0), _row("uniter", "vlfast_packed", 3.0, 400.0),
           _row("uniter", "reference", 9.0, 1000.0)]
    text = "\n".join(bm.headlines(gpu, on_gpu=True))
    assert "uniter B=16 fp32: vlfast_packed 3.0 ms vs reference 9.0 ms -> 3.00x (ok)" in text
    assert "400 / 1000 MB -> 0.40x (ok)" in text


def test_script_help_hides_tiny():
    import subprocess

    r = subprocess.run([sys.executable, str(BENCH / "bench_models.py"), "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "--models" in r.stdout and "--tiny" not in r.stdout
