"""DDP: 2 gloo processes under torchrun == 1 process at the same global batch (dropout
off; parameters within 1e-5), with only rank 0 writing; environment checks."""
from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from vlfast.training import distributed as D
from vlfast.training.checkpoint import list_checkpoints, load_checkpoint
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

CHILD = textwrap.dedent("""
    import importlib.util, os, sys
    spec = importlib.util.spec_from_file_location("toy", sys.argv[1])
    toy = importlib.util.module_from_spec(spec); sys.modules["toy"] = toy; spec.loader.exec_module(toy)
    import torch.distributed as dist
    from vlfast.training.config import load_config
    from vlfast.training.loop import train
    job = toy.ToyJob(batch_size=2)
    train(job, load_config(toy.TOY_CONFIG, sys.argv[3:]), sys.argv[2])
    assert not dist.is_initialized()  # train() created the process group, so it destroys it
    print(f"rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']}: {job.calls} steps", flush=True)
""")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _records(run: Path) -> list[dict]:
    return [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def test_two_gloo_processes_equal_one_process_at_the_same_global_batch(tmp_path):
    overrides = ["logging.tensorboard=null", "optim.total_steps=6", "optim.grad_accum_steps=2",
                 "checkpoint.every=3", "eval.every=3", "logging.every=3"]
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {k: v for k, v in os.environ.items() if k not in D.ENV_VARS}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-P", "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           str(script), str(TOY_PATH), str(tmp_path / "ddp"), *overrides]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "rank 0 of 2: 12 steps" in p.stdout and "rank 1 of 2: 12 steps" in p.stdout, p.stdout + p.stderr

    single = toy.ToyJob(batch_size=4)  # the global batch of 2 ranks x 2 samples
    train(single, load_config(toy.TOY_CONFIG, overrides), tmp_path / "one")

    ddp_ck = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "step_00000006.pt")
    assert ddp_ck["world_size"] == 2 and len(ddp_ck["rng"]) == 2 and len(ddp_ck["data"]) == 2
    assert toy.max_param_diff(ddp_ck["model"], toy.params_of(single.model)) <= 1e-5
    assert [s for s, _ in list_checkpoints(tmp_path / "ddp")] == [3, 6]

    # Rank 0 alone logged: one record per log step, with losses averaged over both ranks
    # and samples summed over them -- the single process's numbers.
    ddp, one = _records(tmp_path / "ddp"), _records(tmp_path / "one")
    assert [(r["kind"], r["step"]) for r in ddp] == [(r["kind"], r["step"]) for r in one] == [
        ("train", 3), ("eval", 3), ("train", 6), ("eval", 6)]
    for a, b in zip(ddp, one):
        for k in ("loss", "eval/val_mse", "samples", "tokens"):
            if k in b:
                assert a[k] == pytest.approx(b[k], abs=1e-5), k


def test_init_distributed_reads_torchrun_variables(monkeypatch):
    for v in D.ENV_VARS:
        monkeypatch.delenv(v, raising=False)
    info = D.init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main, info.distributed, info.backend) == (0, 1, True, False, None)
    assert D.wrap_model(torch.nn.Linear(2, 2), info).__class__ is torch.nn.Linear
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(RuntimeError, match="WORLD_SIZE=2 but LOCAL_RANK, MASTER_ADDR, MASTER_PORT not set"):
        D.init_distributed("cpu")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE: expected an int, got 'two'"):
        D.init_distributed("cpu")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ValueError, match="backend: expected 'auto', 'gloo' or 'nccl', got 'mpi'"):
        D.init_distributed("cpu", backend="mpi")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="device='cuda' was asked for"):
            D.resolve_device("cuda")
