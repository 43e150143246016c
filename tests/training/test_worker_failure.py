"""A training error with DataLoader workers ends the process promptly (issue 15, item 4).

Workers ignore SIGTERM (so SIGTERM to the process group leaves them to the loop's
checkpoint).  Before the fix, an error whose traceback forms a reference cycle (torch's
re-raised worker errors do) kept the DataLoader iterator alive until interpreter exit,
where multiprocessing's exit hook SIGTERMs (ignored) and joins its daemonic children
without a timeout: the traceback printed, then the process hung forever."""
from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from vlfast.training import jobs

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc; fork workers")

SCRIPT = textwrap.dedent('''
    import json, os, sys, time
    import torch
    from vlfast import train as T
    from vlfast.training import jobs

    info, run_dir, grace = sys.argv[1], sys.argv[2], float(sys.argv[3])
    jobs.WORKER_EXIT_GRACE_S = grace
    orig_step, orig_collate = jobs.VLJob.step, jobs._CollateFn.__call__
    state = {"steps": 0, "worker_batches": 0}

    def collate(self, samples):
        if torch.utils.data.get_worker_info() is not None:
            state["worker_batches"] += 1
            if state["worker_batches"] >= 3:  # each worker busy for minutes when the step fails
                time.sleep(600)
        return orig_collate(self, samples)

    def sigterm_ignored(pid):
        with open(f"/proc/{pid}/status") as f:
            mask = int(next(l for l in f if l.startswith("SigIgn:")).split()[1], 16)
        return bool(mask >> (15 - 1) & 1)

    def step(self, model, batch, task):
        state["steps"] += 1
        if state["steps"] <= 2:
            return orig_step(self, model, batch, task)
        import multiprocessing as mp
        workers = [p.pid for p in mp.active_children()]
        rec = {"pid": os.getpid(), "t": time.time(), "workers": workers,
               "sigterm_ignored": [sigterm_ignored(p) for p in workers]}
        with open(info + ".tmp", "w") as f:
            json.dump(rec, f)
        os.replace(info + ".tmp", info)
        try:
            raise RuntimeError("the step failed")
        except RuntimeError as e:
            err = e  # exception -> traceback -> this frame -> err: a cycle that outlives the except
        raise err

    jobs.VLJob.step, jobs._CollateFn.__call__ = step, collate
    sys.exit(T.main(["--config", "default_pretrain", "--run-dir", run_dir,
                     "data.options.n_images=80", "data.batch_size=4", "logging.every=1", "logging.progress=off",
                     "checkpoint.every=0", "device=cpu", "logging.tensorboard=null", "eval.every=0",
                     "model.config.hidden_size=32", "model.config.num_hidden_layers=1",
                     "model.config.intermediate_size=64", "model.config.num_attention_heads=2",
                     "optim.lr_multipliers={}", "optim.total_steps=20", "tasks={mlm: 1.0}",
                     "data.num_workers=2"]))
''')


def _processes_running(marker: str) -> list[int]:
    """Pids of live (non-zombie) processes whose command line contains ``marker``."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = next(l for l in (d / "status").read_text().splitlines() if l.startswith("State:"))
        except (OSError, StopIteration):
            continue
        if marker in cmd and "Z" not in state.split()[1]:
            out.append(int(d.name))
    return out


def test_failed_step_exits_within_10s_and_leaves_no_worker(tmp_path):
    script = tmp_path / "failing_train.py"
    script.write_text(SCRIPT)
    info = tmp_path / "info.json"
    cmd = [sys.executable, "-P", str(script), str(info), str(tmp_path / "run"), "1.0"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=30, env=env, cwd=tmp_path)
    except subprocess.TimeoutExpired as e:
        for pid in _processes_running(str(script)):  # the workers this test started
            os.kill(pid, signal.SIGKILL)
        pytest.fail(f"the failed run hung (killed after 30 s): {(e.stderr or b'')[-2000:]!r}")
    end = time.time()
    assert info.is_file(), p.stdout[-3000:] + p.stderr[-3000:]
    rec = json.loads(info.read_text())
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:]
    assert "RuntimeError: the step failed" in p.stderr
    assert "killed by signal" not in p.stderr  # torch's SIGCHLD check does not fire on the kill
    assert len(rec["workers"]) == 2 and all(rec["sigterm_ignored"]), rec  # workers keep ignoring SIGTERM
    assert end - rec["t"] < 10, f"exited {end - rec['t']:.1f} s after the error"
    left = _processes_running(str(script))
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert not left, f"worker processes left behind: {left}"


class _SleepyCollate:
    """Worker-side collate that blocks for minutes on items >= 2."""

    def __call__(self, samples):
        if torch.utils.data.get_worker_info() is not None and samples[0] >= 2:
            time.sleep(600)
        return samples


def test_loader_kills_stuck_workers_after_the_grace():
    fake = SimpleNamespace(cfg=SimpleNamespace(data=SimpleNamespace(num_workers=2, on_bad_record="error"), device="cpu"),
                           _unwrap=lambda b: b)
    items, batches = list(range(12)), [[i] for i in range(12)]
    # a loader run to its end: torch stops the workers, nothing waits for the grace
    t0 = time.monotonic()
    assert list(jobs.VLJob._loader(fake, items, batches, lambda s: s, seed=0)) == batches
    assert time.monotonic() - t0 < 4

    before = set(multiprocessing.active_children())
    gen = jobs.VLJob._loader(fake, items, batches, _SleepyCollate(), seed=0)
    assert next(gen) == [0]
    workers = [p for p in multiprocessing.active_children() if p not in before]
    try:
        assert len(workers) == 2
        time.sleep(0.3)  # both workers are in their sleeping batch (items 2 and 3)
        t0 = time.monotonic()
        gen.close()
        dt = time.monotonic() - t0
        time.sleep(0.2)  # a "worker killed by signal" from torch's SIGCHLD handler would be raised here
        assert jobs.WORKER_EXIT_GRACE_S - 0.5 <= dt < jobs.WORKER_EXIT_GRACE_S + 2.5, dt
        assert [w.exitcode for w in workers] == [-signal.SIGKILL] * 2
        assert not [i for i in list(jobs._LIVE_ITERATORS) if set(getattr(i, "_workers", ())) & set(workers)]
    finally:
        for w in workers:  # on failure: never leave this session's exit to hang on them
            if w.is_alive():
                os.kill(w.pid, signal.SIGKILL)
                w.join(1)
