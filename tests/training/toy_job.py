"""A tiny Job for the loop tests: a 2-layer MLP with two task heads on synthetic tensors.

Loaded by path (``load_toy()``) from the test files and from the subprocess scripts
(torchrun children, the SIGTERM child), so it needs no package of its own.  Its config
is ``toy.yaml`` next to it (:data:`TOY_CONFIG`, loaded by path).

* Data: ``n`` samples ``x`` (n, 6); task ``reg`` regresses ``y`` (n,), task ``cls``
  classifies ``c`` (n,) into 3 classes.  ``train_batches(task, epoch, start)`` shuffles
  with a generator seeded by (seed, task, epoch) and cuts global batches of
  ``batch_size * world`` samples, of which rank r takes the r-th slice -- the sharding
  that makes 2 ranks x b samples equal 1 rank x 2b samples.
* ``rng_noise=True`` makes each step draw from torch's, Python's and NumPy's global RNGs
  (input noise and a loss weight), so resume equivalence needs every RNG state restored.
* ``sleep_s`` slows each step (the SIGTERM test); ``crash_after`` raises after that many
  ``step`` calls (a crash mid-run); ``marker`` is a file touched once ``marker_after``
  steps ran.
"""
from __future__ import annotations

import importlib.util
import random
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vlfast.training.loop import StepOutput

TASKS = ("reg", "cls")
TOY_CONFIG = Path(__file__).with_name("toy.yaml")  # the toy job's config, loaded by path (not a shipped config)


class ToyModel(nn.Module):
    def __init__(self, d_in: int = 6, hidden: int = 8):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden))
        self.norm = nn.LayerNorm(hidden)
        self.heads = nn.ModuleDict({"reg": nn.Linear(hidden, 1), "cls": nn.Linear(hidden, 3)})
        self.seen_dtype: Optional[torch.dtype] = None

    def forward(self, batch: dict[str, torch.Tensor], task: str) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (loss, output) of ``task`` on ``batch``."""
        h = self.norm(torch.tanh(self.enc(batch["x"])))
        out = self.heads[task](h)
        self.seen_dtype = out.dtype
        if task == "reg":
            return F.mse_loss(out.squeeze(-1).float(), batch["y"]), out
        return F.cross_entropy(out.float(), batch["c"]), out


def make_data(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + seed)
    x = torch.randn(n, 6, generator=g)
    w = torch.randn(6, generator=g)
    y = torch.tanh(x @ w)
    c = torch.bucketize(x[:, 0] + x[:, 1], torch.tensor([-0.5, 0.5]))
    return {"x": x, "y": y, "c": c}


class ToyJob:
    def __init__(self, n: int = 32, batch_size: int = 4, seed: int = 0, rng_noise: bool = False,
                 sleep_s: float = 0.0, crash_after: Optional[int] = None, marker: Optional[str] = None,
                 marker_after: int = 0, eval_scores: Optional[list[float]] = None):
        torch.manual_seed(seed)
        self.model = ToyModel()
        self.data = make_data(n, seed)
        self.val = make_data(16, seed + 1)
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rng_noise, self.sleep_s = rng_noise, sleep_s
        self.crash_after, self.marker, self.marker_after = crash_after, marker, marker_after
        self.eval_scores = eval_scores
        self.calls = 0           # step() calls, part of data_state
        self.losses: list[tuple[str, float]] = []
        self.batches: list[list[int]] = []
        self.n_evals = 0

    def _world(self) -> tuple[int, int]:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def train_batches(self, task: str, epoch: int, start: int):
        rank, world = self._world()
        g = torch.Generator().manual_seed(self.seed * 7919 + TASKS.index(task) * 101 + epoch)
        perm = torch.randperm(self.n, generator=g)
        gb = self.batch_size * world
        for i in range(start, self.n // gb):
            idx = perm[i * gb + rank * self.batch_size: i * gb + (rank + 1) * self.batch_size]
            yield {"x": self.data["x"][idx], "y": self.data["y"][idx], "c": self.data["c"][idx], "idx": idx}

    def step(self, model: nn.Module, batch: dict[str, torch.Tensor], task: str) -> StepOutput:
        self.calls += 1
        if self.crash_after is not None and self.calls > self.crash_after:
            raise RuntimeError(f"toy crash at step() call {self.calls}")
        if self.sleep_s:
            time.sleep(self.sleep_s)
        if self.marker and self.calls == self.marker_after:
            Path(self.marker).write_text(str(self.calls))
        if self.rng_noise:
            batch = dict(batch, x=batch["x"] + 0.05 * torch.randn_like(batch["x"]))
        loss, _ = model(batch, task)
        if self.rng_noise:
            loss = loss * (1.0 + 0.1 * random.random() + 0.1 * float(np.random.rand()))
        self.losses.append((task, float(loss.detach())))
        self.batches.append(batch["idx"].tolist())
        b = int(batch["x"].shape[0])
        return StepOutput(loss, {"abs_loss": loss.detach().abs()}, b, 6 * b)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        self.n_evals += 1
        loss, _ = model(self.val, "reg")
        out = {"val_mse": float(loss)}
        if self.eval_scores is not None:
            out["score"] = self.eval_scores[self.n_evals - 1]
        return out

    def data_state(self) -> dict[str, Any]:
        return {"calls": self.calls}

    def load_data_state(self, state: dict[str, Any]) -> None:
        self.calls = int(state["calls"])


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def max_param_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def load_toy():
    """This module, imported by path (tests use --import-mode=importlib)."""
    name = "vlfast_tests_toy_job"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod
