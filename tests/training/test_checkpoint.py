"""vlfast.training.checkpoint: atomic writes (a crash mid-write keeps the previous file),
RNG states, pruning, the weights_only format; SIGTERM: a checkpoint, exit 0, and a resume
equal to an uninterrupted run."""
from __future__ import annotations

import importlib.util
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from vlfast.training import checkpoint as ck
from vlfast.training.config import load_config
from vlfast.training.loop import train

TOY_PATH = Path(__file__).with_name("toy_job.py")


def _load_toy():
    name = "vlfast_tests_toy_job"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, TOY_PATH)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


toy = _load_toy()


class Boom(Exception):
    pass


def _torn_save(obj, f):
    """torch.save that dies halfway: some bytes reach the file, then the process 'crashes'."""
    f.write(b"PK\x03\x04 half a checkpoint")
    raise Boom("killed mid-write")


def test_atomic_save_keeps_the_previous_file_when_the_write_dies(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    ck.atomic_torch_save({"v": torch.arange(5)}, path)
    monkeypatch.setattr(torch, "save", _torn_save)
    with pytest.raises(Boom):
        ck.atomic_torch_save({"v": torch.zeros(5)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["v"], torch.arange(5))
    # no temp file left behind; the sidecar still holds the intact file's digest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.pt", "ck.pt.sha256"]
    assert ck.verify_checkpoint(path) is None


def test_a_crash_while_writing_a_checkpoint_in_the_loop_leaves_the_last_one_usable(tmp_path, monkeypatch):
    """The step-8 checkpoint write dies: step 4's stays the latest, intact, and resuming
    from it reproduces the uninterrupted run."""
    cfg = load_config(toy.TOY_CONFIG, ["logging.tensorboard=null", "checkpoint.every=4"])
    straight = toy.ToyJob(rng_noise=True)
    train(straight, cfg, tmp_path / "a")

    real_save = torch.save
    calls = {"n": 0}

    def flaky_save(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("format") == ck.FORMAT:
            calls["n"] += 1
            if calls["n"] == 2:
                _torn_save(obj, f)
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", flaky_save)
    with pytest.raises(Boom):
        train(toy.ToyJob(rng_noise=True), cfg, tmp_path / "b")
    monkeypatch.undo()
    assert [s for s, _ in ck.list_checkpoints(tmp_path / "b")] == [4]
    assert sorted(p.name for p in (tmp_path / "b" / "checkpoints").iterdir()) == ["step_00000004.pt",
                                                                                "step_00000004.pt.sha256"]
    assert ck.load_checkpoint(ck.latest_checkpoint(tmp_path / "b"))["step"] == 4

    resumed = toy.ToyJob(rng_noise=True)
    train(resumed, cfg, tmp_path / "b", resume=True)
    assert toy.max_param_diff(toy.params_of(straight.model), toy.params_of(resumed.model)) <= 1e-6


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    torch.manual_seed(3), random.seed(3), np.random.seed(3)
    np.random.randn()  # leaves a cached gaussian in NumPy's state
    ck.atomic_torch_save({"rng": ck.rng_state()}, tmp_path / "r.pt")
    first = (torch.rand(4), random.random(), np.random.randn(3))
    ck.set_rng_state(torch.load(tmp_path / "r.pt", weights_only=True)["rng"])
    again = (torch.rand(4), random.random(), np.random.randn(3))
    assert torch.equal(first[0], again[0]) and first[1] == again[1] and np.array_equal(first[2], again[2])


def test_data_state_must_be_weights_only_loadable():
    ck.check_weights_only_safe({"a": [1, 2.0, "x", None, torch.ones(2)], "b": (3, {"c": True})})
    with pytest.raises(TypeError, match=r"job\.data_state\(\)\['pool'\]\[1\]: a numpy\.ndarray cannot be stored"):
        ck.check_weights_only_safe({"pool": [0, np.zeros(3)]}, "job.data_state()")


def test_prune_listing_and_stale_temp_files(tmp_path):
    for s in (3, 10, 7, 12):
        ck.atomic_torch_save({"s": s}, ck.step_checkpoint_path(tmp_path, s))
    ck.atomic_torch_save({"best": 1}, ck.best_checkpoint_path(tmp_path))
    stale = ck.checkpoint_dir(tmp_path) / f".step_00000013.pt{ck.TMP_MARK}999"
    stale.write_bytes(b"torn")
    assert [s for s, _ in ck.list_checkpoints(tmp_path)] == [3, 7, 10, 12]
    assert ck.latest_checkpoint(tmp_path).name == "step_00000012.pt"
    removed = ck.prune_checkpoints(tmp_path, keep_last=2)
    assert sorted(p.name for p in removed) == ["step_00000003.pt", "step_00000007.pt"]
    assert ck.remove_stale_temp_files(ck.checkpoint_dir(tmp_path)) == [stale]
    assert sorted(p.name for p in ck.checkpoint_dir(tmp_path).iterdir()) == [
        "best.pt", "best.pt.sha256", "step_00000010.pt", "step_00000010.pt.sha256", "step_00000012.pt",
        "step_00000012.pt.sha256"]  # pruning removes a checkpoint's sidecar with it


def test_load_checkpoint_rejects_foreign_and_torn_files(tmp_path):
    torch.save({"weights": torch.ones(1)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a vlfast training checkpoint"):
        ck.load_checkpoint(tmp_path / "other.pt")
    (tmp_path / "torn.pt").write_bytes(b"PK\x03\x04 half")
    with pytest.raises(RuntimeError, match="cannot read .*torn.pt"):
        ck.load_checkpoint(tmp_path / "torn.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt does not exist"):
        ck.load_checkpoint(tmp_path / "missing.pt")


CHILD = textwrap.dedent("""
    import importlib.util, sys
    spec = importlib.util.spec_from_file_location("toy", sys.argv[1])
    toy = importlib.util.module_from_spec(spec); sys.modules["toy"] = toy; spec.loader.exec_module(toy)
    from vlfast.training.config import load_config
    from vlfast.training.loop import train
    cfg = load_config(toy.TOY_CONFIG, sys.argv[4:])
    job = toy.ToyJob(rng_noise=True, sleep_s=0.02, marker=sys.argv[3], marker_after=6)
    train(job, cfg, sys.argv[2])
    print("FINISHED", flush=True)
""")


def test_sigterm_saves_a_checkpoint_exits_0_and_the_run_resumes(tmp_path):
    overrides = ["logging.tensorboard=null", "optim.total_steps=40", "checkpoint.every=0", "eval.every=0"]
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    marker = tmp_path / "marker"
    run = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-P", str(script), str(TOY_PATH), str(run), str(marker), *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "the child never reached step 3"
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert "FINISHED" not in out and "SIGTERM: stopped after step" in out, out
    steps = [s for s, _ in ck.list_checkpoints(run)]
    assert len(steps) == 1 and 3 <= steps[0] < 40, (steps, out)

    cfg = load_config(toy.TOY_CONFIG, overrides)
    resumed = toy.ToyJob(rng_noise=True)
    train(resumed, cfg, run, resume=True)
    straight = toy.ToyJob(rng_noise=True)
    train(straight, cfg, tmp_path / "straight")
    assert resumed.calls == straight.calls == 80
    assert toy.max_param_diff(toy.params_of(straight.model), toy.params_of(resumed.model)) <= 1e-6
