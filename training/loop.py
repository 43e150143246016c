"""The training loop: a generic driver of a :class:`Job`.

``train(job, config, run_dir)`` runs ``config.optim.total_steps`` optimizer steps of
``job`` and handles everything that is not model- or data-specific: devices and DDP,
AMP, AdamW with per-module LR multipliers and warmup + linear decay, gradient
accumulation and clipping, task mixing, logging (tqdm, jsonl, TensorBoard), NVTX
ranges, evaluation, checkpoints (every N steps, atomic, the best by a validation
metric), ``resume``, ``init_checkpoint`` and SIGTERM.

The job (see :class:`Job`) owns the model, the data and the losses:

* ``job.model``: the ``nn.Module`` to train (the loop moves it to the device and, under
  torchrun, wraps it in DDP).  Under DDP the model's ``forward`` must be what computes
  the loss (e.g. ``forward(batch, task)`` returning the loss), called once per
  micro-batch through the ``model`` passed to ``step`` -- DDP only syncs gradients of
  work done through the wrapper's ``forward``.
* ``job.train_batches(task, epoch, start)``: the micro-batches of ``task`` for epoch
  ``epoch`` *on this rank*, skipping the first ``start`` (for resuming mid-epoch:
  skip cheaply, in the sampler, without loading the skipped data).  The batches must
  be a function of (seed, task, epoch, position) only -- never of the global RNGs --
  so a resumed run sees the same batches; under DDP every rank must get the same
  number of batches per epoch (a sharded sampler does).  A ``None`` in place of a
  batch is a position the job dropped (it counts for the resume position; an epoch
  of only ``None`` is an error).  The loop chains epochs:
  a gradient-accumulation group may span an epoch boundary.  A batch is moved to the
  device with ``batch.to(device)`` (tensors, objects with ``.to`` such as
  :class:`vlfast.data.batch.VLBatch`, and dicts/lists/tuples of them).
* ``job.step(model, batch, task) -> StepOutput``: forward + loss of one micro-batch
  (under autocast; the loop does the backward).  ``loss`` is the mean over the
  micro-batch; the loop divides it by the accumulation steps, and DDP averages over
  ranks, so equal-size micro-batches make the update that of one big batch.
* ``job.evaluate(model) -> {name: float}``: validation metrics of the (unwrapped)
  model, called on every rank in eval mode under ``torch.no_grad()``, with all RNG
  states restored afterwards (evaluation never changes the training trajectory).
  Under DDP it must return the same values on every rank (evaluate everything, or
  shard and all-reduce); rank 0's values are logged and pick the best checkpoint.
* ``job.data_state() -> dict`` / ``job.load_data_state(state)``: any data-pipeline
  state beyond the per-task positions the loop keeps itself (e.g. a hard-negative
  pool); saved per rank in every checkpoint.  Values: tensors, numbers, strings, None,
  lists/tuples/dicts of them.

Task mixing (UNITER's): optimizer step n runs task :func:`task_for_step` (config.tasks,
config.seed, n) for all of its micro-batches -- drawn by ratio from a generator seeded
with (seed, n), so it is the same on every rank and after a resume.  A job may bring its
own schedule as an optional method ``job.task_for_step(step) -> str`` (step 1-based);
it must then be a pure function of the step, the same on every rank.

SIGTERM: the handler only sets a flag; at the end of the current optimizer step every
rank agrees to stop, a checkpoint is written, and ``train`` raises ``SystemExit(0)``
(so the process exits 0; ``--resume`` continues the run).  Schedulers and torchrun may
signal the whole process group: a job whose DataLoader has worker processes should make
them ignore SIGTERM (``worker_init_fn`` calling ``signal.signal(SIGTERM, SIG_IGN)``), or
the main process loses its workers before it can reach the checkpoint.

Logging: every ``logging.every`` steps rank 0 writes one jsonl record (``kind:
"train"``: ``step``, ``lr`` (the base LR times the schedule factor), ``loss`` (mean
micro-batch loss over the interval and all ranks), ``loss/<task>``,
``<task>/<metric>`` (the job's metrics, averaged the same way), ``grad_norm`` (mean
pre-clip norm, when clipping), ``samples``/``tokens`` (summed over the interval and
ranks), ``samples_per_s``/``tokens_per_s``, ``epoch/<task>``, ``time_s``), and
evaluations as ``kind: "eval"`` records with ``eval/<name>`` keys.  TensorBoard gets
the same scalars under ``train/...`` and ``eval/...``.  On resume, records of steps
after the checkpoint (from the interrupted attempt) are dropped from the jsonl file and
purged from TensorBoard, so both read as one uninterrupted run (a fresh start in a
directory without checkpoints likewise starts them anew).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, NamedTuple, Optional, Protocol, Union, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn

from .checkpoint import (BEST_FORMAT, FORMAT, VERSION, atomic_torch_save, atomic_write, best_checkpoint_path,
                         check_weights_only_safe, checkpoint_dir, list_checkpoints,
                         load_checkpoint, load_model_weights, newest_intact_checkpoint, prune_checkpoints,
                         remove_stale_temp_files,
                         rng_state, seed_everything, set_rng_state, step_checkpoint_path)
from .config import TrainConfig, UserError, config_diff, load_config, save_config
from .distributed import (DistInfo, all_gather_objects, all_reduce_sum, any_rank, barrier, cleanup, global_loss_mean,
                          init_distributed, no_sync_if, wrap_model)
from .optim import build_optimizer, build_scheduler, lr_factor

PathLike = Union[str, os.PathLike]


# ----------------------------------------------------------------------------------------
# The job protocol
# ----------------------------------------------------------------------------------------

class StepOutput(NamedTuple):
    """What ``job.step`` returns for one micro-batch.

    loss: scalar tensor with grad (mean over the micro-batch); metrics: ``{name: scalar
    tensor or float}`` (detached; averaged over the log interval); samples: samples in
    the micro-batch; tokens: real (non-padding) tokens -- words + regions -- in it."""
    loss: Tensor
    metrics: Mapping[str, Union[Tensor, float]]
    samples: int
    tokens: int


@runtime_checkable
class Job(Protocol):
    """What :func:`train` drives (see the module docstring for the contract)."""
    model: nn.Module

    def train_batches(self, task: str, epoch: int, start: int) -> Iterable[Any]: ...

    def step(self, model: nn.Module, batch: Any, task: str) -> StepOutput: ...

    def evaluate(self, model: nn.Module) -> dict[str, float]: ...

    def data_state(self) -> dict[str, Any]: ...

    def load_data_state(self, state: dict[str, Any]) -> None: ...


_JOB_MEMBERS = ("model", "train_batches", "step", "evaluate", "data_state", "load_data_state")


def _check_job(job: Any) -> None:
    missing = [m for m in _JOB_MEMBERS if not hasattr(job, m)]
    if missing:
        raise TypeError(f"train: job: {type(job).__name__} lacks {', '.join(missing)} "
                        f"(a Job has {', '.join(_JOB_MEMBERS)})")
    if not isinstance(job.model, nn.Module):
        raise TypeError(f"train: job.model: expected an nn.Module, got {type(job.model).__name__}")


@dataclass
class TrainResult:
    """What :func:`train` returns: the last ``step``, the last train-log record, the
    last evaluation, the best ``{metric, mode, value, step}`` (or None), and the
    path of the last checkpoint written."""
    step: int
    last_train: dict[str, float] = field(default_factory=dict)
    last_eval: dict[str, float] = field(default_factory=dict)
    best: Optional[dict[str, Any]] = None
    checkpoint: Optional[Path] = None


# ----------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------

def task_for_step(tasks: Mapping[str, float], seed: int, step: int) -> str:
    """The task of optimizer step ``step``: drawn by ratio from a generator seeded with
    (seed, step) -- a pure function, the same on every rank and after a resume."""
    names = [n for n, r in tasks.items() if r > 0]
    if not names:
        raise ValueError(f"task_for_step: tasks: expected at least one ratio > 0, got {dict(tasks)}")
    if len(names) == 1:
        return names[0]
    ratios = np.array([float(tasks[n]) for n in names])
    u = np.random.default_rng([int(seed) % 2**63, int(step)]).random()
    idx = int(np.searchsorted(np.cumsum(ratios) / ratios.sum(), u, side="right"))
    return names[min(idx, len(names) - 1)]


try:  # the `nvtx` package annotates on any machine (a no-op unless a profiler is attached)
    import nvtx as _nvtx_pkg
except ImportError:  # pragma: no cover - depends on the environment
    _nvtx_pkg = None


@contextlib.contextmanager
def nvtx_range(name: str) -> Iterator[None]:
    """An NVTX range (``torch.cuda.nvtx`` when CUDA is available, else the ``nvtx``
    package when installed, else nothing).  Costs ~a microsecond when no profiler
    (Nsight Systems) is attached."""
    if torch.cuda.is_available():
        torch.cuda.nvtx.range_push(name)
        try:
            yield
        finally:
            torch.cuda.nvtx.range_pop()
    elif _nvtx_pkg is not None:
        with _nvtx_pkg.annotate(name, domain="vlfast"):
            yield
    else:
        yield


def move_to(batch: Any, device: torch.device) -> Any:
    """``batch`` on ``device``: tensors, objects with ``.to(device)``, and dicts, lists
    and tuples (NamedTuples included) of them; anything else unchanged."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=device.type == "cuda")
    if isinstance(batch, dict):
        return type(batch)({k: move_to(v, device) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(move_to(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    if hasattr(batch, "to") and callable(batch.to):
        return batch.to(device)
    return batch


class _Stream:
    """The endless micro-batch stream of one task: epochs of ``job.train_batches``
    chained, with its position (epoch, index within the epoch)."""

    def __init__(self, job: Job, task: str, epoch: int = 0, index: int = 0):
        self.job, self.task, self.epoch, self.index = job, task, epoch, index
        self._it: Optional[Iterator[Any]] = None

    def next(self) -> Any:
        while True:
            if self._it is None:
                self._it = iter(self.job.train_batches(self.task, self.epoch, self.index))
                self._from, self._got = self.index, False
            try:
                b = next(self._it)
            except StopIteration:
                if self._from == 0 and not self._got:
                    why = ("yielded no batch: the task has no training data on this rank" if self.index == 0 else
                           f"dropped all its {self.index} batches (every sample read a bad record)")
                    raise RuntimeError(f"job.train_batches(task={self.task!r}, epoch={self.epoch}, start=0) "
                                       + why) from None
                self.epoch, self.index, self._it = self.epoch + 1, 0, None
                continue
            self.index += 1
            if b is None:  # a position the job dropped (every record of the batch bad: data.on_bad_record=skip)
                continue
            self._got = True
            return b

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}


class _StopFlag:
    """Set by SIGTERM (the handler does nothing else)."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self._prev: Any = None
        self._installed = False

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            self._prev = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def restore(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._prev if self._prev is not None else signal.SIG_DFL)
            self._installed = False


@contextlib.contextmanager
def _preserved_rng() -> Iterator[None]:
    """Run a block (evaluation) without changing any global RNG state."""
    saved = rng_state()
    try:
        yield
    finally:
        set_rng_state(saved)


def _to_float(v: Any, what: str) -> float:
    if isinstance(v, Tensor):
        if v.numel() != 1:
            raise ValueError(f"{what}: expected a scalar, got a tensor of shape {tuple(v.shape)}")
        return float(v.detach().item())
    if isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool):
        return float(v)
    raise ValueError(f"{what}: expected a number or a scalar tensor, got {type(v).__name__}")


def _show_progress(mode: str) -> bool:
    if mode == "on":
        return True
    if mode == "off":
        return False
    ci = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")
    return (not ci) and hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


def _truncate_jsonl(path: Path, keep_through_step: int) -> None:
    """Drop the records of steps after ``keep_through_step`` (atomically)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            step = json.loads(line).get("step", 0)
        except (json.JSONDecodeError, AttributeError):
            continue  # a torn last line from a killed process
        if step <= keep_through_step:
            kept.append(line)
    atomic_write(path, lambda f: f.write("".join(k + "\n" for k in kept)), mode="w")


class _Logger:
    """Rank 0's outputs: jsonl, TensorBoard, tqdm or plain lines."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, info: DistInfo, start_step: int):
        self.enabled = info.is_main
        self.jsonl = None
        self.tb = None
        self.bar = None
        self.total = cfg.optim.total_steps
        if not self.enabled:
            return
        lg = cfg.logging
        if lg.jsonl:
            p = run_dir / lg.jsonl
            p.parent.mkdir(parents=True, exist_ok=True)
            _truncate_jsonl(p, start_step)
            self.jsonl = open(p, "a", buffering=1)
        if lg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError(f"logging.tensorboard={lg.tensorboard!r} needs the tensorboard package "
                                  f"(pip install tensorboard), or set logging.tensorboard=null ({e})") from None
            self.tb = SummaryWriter(str(run_dir / lg.tensorboard), purge_step=start_step + 1)
        if _show_progress(lg.progress):
            from tqdm.auto import tqdm
            self.bar = tqdm(total=self.total, initial=start_step, desc="train", dynamic_ncols=True,
                            file=sys.stderr, smoothing=0.1)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, flush=True)

    def tick(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def record(self, rec: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(rec) + "\n")
            self.jsonl.flush()
        if self.tb is not None:
            prefix = "train/" if rec["kind"] == "train" else ""
            for k, v in rec.items():
                if k in ("kind", "step") or not isinstance(v, (int, float)):
                    continue
                self.tb.add_scalar(prefix + k, v, rec["step"])
            self.tb.flush()
        if rec["kind"] == "train":
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{rec['lr']:.2e}",
                                     samples_s=f"{rec['samples_per_s']:.1f}", tok_s=f"{rec['tokens_per_s']:.0f}",
                                     refresh=False)
            else:
                print(f"step {rec['step']}/{self.total} | loss {rec['loss']:.4f} | lr {rec['lr']:.3e} | "
                      f"{rec['samples_per_s']:.1f} samples/s | {rec['tokens_per_s']:.0f} tokens/s", flush=True)
        else:
            evals = " ".join(f"{k}={v:.4f}" for k, v in rec.items() if k.startswith("eval/"))
            self.message(f"step {rec['step']}/{self.total} | {evals}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None


class _Window:
    """Sums over one logging interval (device tensors; synced only when logged)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}
        self.samples = 0
        self.tokens = 0
        self.t0 = time.perf_counter()
        self.excluded = 0.0

    def add(self, key: str, value: Union[Tensor, float]) -> None:
        if isinstance(value, Tensor):
            if value.numel() != 1:
                raise ValueError(f"job.step: metric {key!r}: expected a scalar, got a tensor of shape "
                                 f"{tuple(value.shape)}")
            v = value.detach().float().reshape(())
        else:
            v = torch.tensor(_to_float(value, f"job.step: metric {key!r}"))
        v = v.to(self.device)
        self.sums[key] = self.sums[key] + v if key in self.sums else v
        self.counts[key] = self.counts.get(key, 0) + 1

    def reduce(self, info: DistInfo) -> tuple[dict[str, float], int, int, float]:
        """Means over the interval and all ranks, total samples/tokens, seconds spent."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = max(time.perf_counter() - self.t0 - self.excluded, 1e-9)
        keys = sorted(self.sums)
        if info.distributed:
            # every rank all-reduces the same (sum, count) pairs: the union of the metric
            # names (a metric a rank's batches did not produce -- e.g. WRA's ot_pos on a
            # batch without positives -- counts 0 there)
            keys = sorted({k for ks in all_gather_objects(keys, info) for k in ks})
        zero = torch.zeros((), device=self.device)
        counts = [float(self.counts.get(k, 0)) for k in keys] + [float(self.samples), float(self.tokens)]
        flat = torch.cat([torch.stack([self.sums.get(k, zero) for k in keys]).double() if keys
                          else torch.zeros(0, dtype=torch.float64, device=self.device),
                          torch.tensor(counts, dtype=torch.float64, device=self.device)])
        flat = all_reduce_sum(flat, info).cpu().tolist()
        n = len(keys)
        means = {k: flat[i] / flat[n + i] for i, k in enumerate(keys) if flat[n + i] > 0}
        return means, int(flat[2 * n]), int(flat[2 * n + 1]), seconds


# ----------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------

def _autocast(device: torch.device, amp: str) -> contextlib.AbstractContextManager:
    if amp == "off":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _set_determinism(on: bool) -> tuple[bool, bool, bool]:
    prev = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark)
    if on:
        # cuBLAS needs this before its first use to be deterministic.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    return prev


def _restore_determinism(prev: tuple[bool, bool, bool]) -> None:
    torch.use_deterministic_algorithms(prev[0])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = prev[1], prev[2]


def train(job: Job, config: TrainConfig, run_dir: PathLike, resume: bool = False,
          init_checkpoint: Optional[PathLike] = None) -> TrainResult:
    """Train ``job`` for ``config.optim.total_steps`` optimizer steps in ``run_dir``.

    ``resume=True`` continues from the newest checkpoint in ``run_dir`` (starting fresh,
    with a message, when there is none); the result equals that of an uninterrupted
    run.  Without ``resume``, a ``run_dir`` that already holds checkpoints is an error
    (nothing is overwritten).  ``init_checkpoint`` loads model weights only (non-strict;
    a report of missing/unexpected/mismatched keys is printed) on a fresh start; a
    resumed run ignores it.  ``config.grad_checkpointing`` calls
    ``job.model.gradient_checkpointing_enable()`` (a model without that method is an
    error).  Under torchrun the process group is created from the environment (and
    destroyed at the end if this call created it); only rank 0 writes files.

    On SIGTERM: saves a checkpoint at the end of the current step and raises
    ``SystemExit(0)``.
    """
    _check_job(job)
    if not isinstance(config, TrainConfig):
        raise TypeError(f"train: config: expected a TrainConfig, got {type(config).__name__}")
    config.validate()
    run_dir = Path(run_dir)
    owned_pg = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    info = init_distributed(config.device, config.distributed.backend, config.distributed.timeout_s)
    prev_det = _set_determinism(config.deterministic)
    stop = _StopFlag()
    try:
        stop.install()
        return _train(job, config, run_dir, resume, init_checkpoint, info, stop)
    finally:
        stop.restore()
        _restore_determinism(prev_det)
        if owned_pg:
            cleanup()


class ResumeConfigError(UserError, ValueError):
    """--resume with a config whose model does not fit the run's checkpoint."""


def _resume_mismatch(cfg: TrainConfig, state: Mapping[str, Any], ckpt_path: Optional[Path], run_dir: Path,
                     err: Exception) -> ResumeConfigError:
    """A readable error for a resumed model that does not fit: which config keys
    differ from the run's (the checkpoint's own config, else run_dir/config.yaml)."""
    old: Optional[TrainConfig] = None
    try:
        old = TrainConfig.from_dict(state["config"]) if isinstance(state.get("config"), Mapping) else None
    except Exception:  # noqa: BLE001 -- fall back to the run's config.yaml
        old = None
    if old is None and (run_dir / "config.yaml").is_file():
        try:
            old = load_config(run_dir / "config.yaml")
        except Exception:  # noqa: BLE001
            old = None
    diff = [d for d in (config_diff(old, cfg) if old is not None else [])
            if d.split(":")[0].startswith(("model.", "tasks", "data.options", "data.source", "data.path"))]
    first = str(err).strip().splitlines()
    detail = "; ".join(line.strip() for line in first[1:4] if line.strip()) or (first[0] if first else "")
    what = (f"keys that differ from the run's config: {'; '.join(diff)}" if diff else
            "no model/task key of the config differs from the run's, so the data source (vocabulary or "
            "feature size) must have changed")
    return ResumeConfigError(f"--resume: the model of this config does not fit {ckpt_path} ({what}); resume with "
                             f"the run's config ({run_dir / 'config.yaml'}), or start a new run directory "
                             f"[{detail[:300]}]")


def _record_keys(meta: Any) -> str:
    """The record keys of a batch, for an error message: its example ids and images."""
    if not isinstance(meta, Mapping):
        return "(no record keys: the batch has no meta)"
    parts = []
    for key in ("ids", "img_ids"):
        vals = meta.get(key)
        if vals:
            vals = list(vals)
            parts.append(f"{key}={vals[:16]}" + (f" ... ({len(vals)} in all)" if len(vals) > 16 else ""))
    return ", ".join(parts) or "(the batch names no records)"


def _check_finite_step(nonfinite: Tensor, grad_norm: Optional[Tensor], metas: list[Any], task: str, step: int,
                       last_saved: Optional[Path], info: DistInfo) -> None:
    """Raise FloatingPointError on every rank when any rank's loss (or the clipped
    gradient norm) of this step is not finite, naming the task, the step and the
    offending micro-batches' record keys."""
    flags = nonfinite if grad_norm is None else torch.cat([nonfinite, (~torch.isfinite(grad_norm.float()))
                                                           .float().reshape(1)])
    here = bool(flags.any().item())
    if not any_rank(here, info):
        return
    bad = [i for i, f in enumerate(nonfinite.tolist()) if f]
    if bad:
        where = "; ".join(f"micro-batch {i}: {_record_keys(metas[i] if i < len(metas) else None)}" for i in bad)
        what = f"the {task!r} loss is not finite ({where})"
    elif here:
        what = f"the gradient norm of the {task!r} step is not finite (the loss was finite)"
    else:
        what = f"another rank's {task!r} loss or gradient is not finite"
    rank = f" on rank {info.rank}" if info.world_size > 1 else ""
    raise FloatingPointError(f"step {step}{rank}: {what}; stopped before this step's update and checkpoint; the "
                             f"last checkpoint is {last_saved}")


def _train(job: Job, cfg: TrainConfig, run_dir: Path, resume: bool, init_checkpoint: Optional[PathLike],
           info: DistInfo, stop: _StopFlag) -> TrainResult:
    device = info.device
    o = cfg.optim
    total = o.total_steps
    accum = o.grad_accum_steps

    # -- where to start -------------------------------------------------------------------
    existing = list_checkpoints(run_dir)
    if not resume and (existing or best_checkpoint_path(run_dir).exists()):
        raise FileExistsError(f"train: {run_dir} already holds checkpoints ({checkpoint_dir(run_dir)}); pass "
                              "resume=True (--resume) to continue that run, or choose another run directory")
    ckpt_path, skipped = newest_intact_checkpoint(run_dir) if (resume and existing) else (None, [])
    for why in skipped:  # a corrupt newest checkpoint: say so, and resume from the newest intact one
        warnings.warn(f"resume: {why}; " + (f"resuming from {ckpt_path} instead" if ckpt_path else
                                            "no intact checkpoint is left"), RuntimeWarning, stacklevel=2)
    if resume and existing and ckpt_path is None:
        raise RuntimeError(f"resume: every checkpoint in {checkpoint_dir(run_dir)} is corrupt ("
                           + "; ".join(skipped) + "); move them away to start the run afresh")
    # newest_intact_checkpoint has just hashed it: no second pass over the file
    state = load_checkpoint(ckpt_path, verify=False) if ckpt_path is not None else None
    start_step = int(state["step"]) if state else 0

    seed_everything(cfg.seed + info.rank)
    model = job.model
    model.to(device)
    model.train()
    if cfg.grad_checkpointing:
        enable = getattr(model, "gradient_checkpointing_enable", None)
        if not callable(enable):
            raise ValueError(f"grad_checkpointing=true: {type(model).__name__} has no "
                             "gradient_checkpointing_enable() method")
        enable()

    msgs: list[str] = []
    if state is not None:
        try:
            model.load_state_dict(state["model"])
        except RuntimeError as e:  # the model of this config is not the run's
            raise _resume_mismatch(cfg, state, ckpt_path, run_dir, e) from e
        msgs.append(f"resuming from {ckpt_path} (step {start_step}/{total})")
    elif resume:
        msgs.append(f"resume: no checkpoint in {checkpoint_dir(run_dir)}: starting a new run")
    if state is None and init_checkpoint is not None:
        report = load_model_weights(model, init_checkpoint, allow_partial=cfg.init.allow_partial)
        msgs.append(str(report))

    optimizer = build_optimizer(model, o.lr, o.betas, o.eps, o.weight_decay, o.lr_multipliers, o.no_decay_1d)
    scheduler = build_scheduler(optimizer, cfg.warmup_steps, total)
    scaler = torch.amp.GradScaler(device.type) if cfg.amp == "fp16" else None
    best: Optional[dict[str, Any]] = None
    streams: dict[str, _Stream] = {}
    if state is not None:
        fresh = [{k: g[k] for k in ("lr_mult", "weight_decay", "betas", "eps", "initial_lr", "names")}
                 for g in optimizer.param_groups]
        saved_names = [g.get("names") for g in state["optimizer"]["param_groups"]]
        if saved_names != [h["names"] for h in fresh]:
            raise ValueError(f"resume: the optimizer parameter groups of {ckpt_path} differ from this config's "
                             "(optim.lr_multipliers / optim.no_decay_1d or the model changed); a run cannot "
                             "be resumed with other groups -- start a new run with --init-checkpoint instead")
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        # The config's hyperparameters win over the saved ones, so a changed lr, schedule,
        # weight decay, betas or eps takes effect (for an unchanged config this is a no-op).
        factor = lr_factor(start_step + 1, cfg.warmup_steps, total)
        for g, h in zip(optimizer.param_groups, fresh):
            g.update(h)
            g["lr"] = h["initial_lr"] * factor
        scheduler.base_lrs = [h["initial_lr"] for h in fresh]
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
        best = state.get("best")
        saved_world = int(state.get("world_size", 1))
        r = info.rank if info.rank < len(state["data"]) else 0
        if saved_world != info.world_size:
            msgs.append(f"warning: the checkpoint was written by {saved_world} processes, this run has "
                        f"{info.world_size}: data positions and RNG states are taken from rank {r}, so the "
                        "continuation is not identical to an uninterrupted run")
        data = state["data"][r]
        job.load_data_state(data["job"])
        for task, pos in data["streams"].items():
            streams[task] = _Stream(job, task, int(pos["epoch"]), int(pos["index"]))
        if saved_world == info.world_size:
            set_rng_state(state["rng"][info.rank])
        else:
            seed_everything(cfg.seed + info.rank + start_step)

    ddp_model = wrap_model(model, info, cfg.distributed.find_unused_parameters)

    # -- outputs (rank 0) --------------------------------------------------------------
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temp_files(checkpoint_dir(run_dir))
        cfg_path = run_dir / "config.yaml"
        if cfg_path.exists() and state is not None:
            try:
                old = load_config(cfg_path)
                diff = config_diff(old, cfg)
            except Exception as e:  # an unreadable old config is kept aside, never lost
                old, diff = None, [f"(could not read the previous config: {e})"]
            if diff:
                keep = run_dir / f"config.step{start_step:08d}.yaml"
                os.replace(cfg_path, keep)
                msgs.append(f"config changed on resume ({'; '.join(diff)}); the previous one is kept as {keep}")
        save_config(cfg, cfg_path)
    logger = _Logger(cfg, run_dir, info, start_step)
    for m in msgs:
        logger.message(m)
    logger.message(f"vlfast.training: {run_dir} | {info.world_size} process(es) on {device.type} | amp {cfg.amp} | "
                   f"steps {start_step}->{total} | accumulation {accum} | tasks {dict(cfg.tasks)}")

    last_saved: Optional[Path] = ckpt_path
    last_saved_step = start_step if state is not None else -1
    last_train: dict[str, float] = {}
    last_eval: dict[str, float] = {}
    window = _Window(device)
    t_start = time.perf_counter()

    def save(step: int) -> Path:
        nonlocal last_saved, last_saved_step
        data_here = {"streams": {t: s.state() for t, s in streams.items()}, "job": job.data_state()}
        check_weights_only_safe(data_here["job"], "job.data_state()")
        per_rank = all_gather_objects({"rng": rng_state(), "data": data_here}, info)
        path = step_checkpoint_path(run_dir, step)
        if info.is_main:
            ck = {"format": FORMAT, "version": VERSION, "step": step, "model": model.state_dict(),
                  "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                  "scaler": scaler.state_dict() if scaler is not None else None,
                  "rng": [p["rng"] for p in per_rank], "data": [p["data"] for p in per_rank],
                  "best": best, "config": cfg.to_dict(), "world_size": info.world_size}
            atomic_torch_save(ck, path)
            prune_checkpoints(run_dir, cfg.checkpoint.keep_last)
        barrier(info)
        last_saved, last_saved_step = path, step
        return path

    def evaluate(step: int) -> dict[str, float]:
        nonlocal best, last_eval
        model.eval()
        with _preserved_rng(), torch.no_grad(), _autocast(device, cfg.amp), nvtx_range("evaluate"):
            raw = job.evaluate(model)
        model.train()
        if not isinstance(raw, Mapping):
            raise TypeError(f"job.evaluate: expected a dict of metrics, got {type(raw).__name__}")
        metrics = {str(k): _to_float(v, f"job.evaluate()[{k!r}]") for k, v in raw.items()}
        last_eval = metrics
        logger.record({"kind": "eval", "step": step, **{f"eval/{k}": v for k, v in metrics.items()}})
        name = cfg.checkpoint.best_metric
        if name is not None:
            if name not in metrics:
                raise KeyError(f"checkpoint.best_metric={name!r} is not among job.evaluate()'s metrics "
                               f"{sorted(metrics)}")
            v = metrics[name]
            mode = cfg.checkpoint.best_mode
            better = best is None or (v > best["value"] if mode == "max" else v < best["value"])
            if better and math.isfinite(v):
                best = {"metric": name, "mode": mode, "value": v, "step": step}
                if info.is_main:
                    atomic_torch_save({"format": BEST_FORMAT, "version": VERSION, "step": step,
                                       "model": model.state_dict(), "config": cfg.to_dict(), "metric": name,
                                       "mode": mode, "value": v, "eval": metrics}, best_checkpoint_path(run_dir))
                logger.message(f"step {step}: best {name} = {v:.4f}, saved {best_checkpoint_path(run_dir)}")
        return metrics

    params = [p for p in model.parameters() if p.requires_grad]
    job_schedule = getattr(job, "task_for_step", None)
    if job_schedule is not None and not callable(job_schedule):
        raise TypeError(f"job.task_for_step: expected a method (step -> task name), got {type(job_schedule).__name__}")
    step = start_step
    try:
        for step in range(start_step + 1, total + 1):
            task = job_schedule(step) if job_schedule is not None else task_for_step(cfg.tasks, cfg.seed, step)
            if not isinstance(task, str):
                raise TypeError(f"job.task_for_step({step}): expected a task name (str), got {task!r}")
            stream = streams.get(task)
            if stream is None:
                stream = streams[task] = _Stream(job, task)
            optimizer.zero_grad(set_to_none=True)
            nonfinite = torch.zeros(accum, device=device)   # per micro-batch: the loss was not finite
            metas: list[Any] = []
            for micro in range(accum):
                with nvtx_range("data"):
                    batch = move_to(stream.next(), device)
                with no_sync_if(ddp_model, micro < accum - 1):
                    with nvtx_range("forward"), _autocast(device, cfg.amp), global_loss_mean(info):
                        out = job.step(ddp_model, batch, task)
                    if not isinstance(out, tuple) or len(out) != 4:
                        raise TypeError("job.step: expected a StepOutput(loss, metrics, samples, tokens), got "
                                        f"{type(out).__name__}")
                    loss = out[0]
                    if not isinstance(loss, Tensor) or loss.numel() != 1:
                        raise ValueError(f"job.step: loss: expected a scalar tensor, got "
                                         f"{tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__}")
                    scaled = loss.reshape(()) / accum
                    nonfinite[micro] = (~torch.isfinite(loss.detach().reshape(()).float())).float()
                    metas.append(getattr(batch, "meta", None))
                    with nvtx_range("backward"):
                        (scaler.scale(scaled) if scaler is not None else scaled).backward()
                window.add("loss", loss)
                window.add(f"loss/{task}", loss)
                for k, v in out[1].items():
                    window.add(f"{task}/{k}", v)
                window.samples += int(out[2])
                window.tokens += int(out[3])

            with nvtx_range("optimizer"):
                if scaler is not None:
                    scaler.unscale_(optimizer)
                gn = None
                if o.clip_grad_norm > 0:
                    gn = torch.nn.utils.clip_grad_norm_(params, o.clip_grad_norm)
                    window.add("grad_norm", gn)
                if scaler is None:
                    # NaN/inf stops the run at the step where it appears, before this step's
                    # update or checkpoint; every rank stops at the same step.  (Under fp16 the
                    # GradScaler skips such steps itself.)
                    _check_finite_step(nonfinite, gn, metas, task, step, last_saved, info)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                scheduler.step()
            logger.tick()

            if step % cfg.logging.every == 0 or step == total:
                means, samples, tokens, secs = window.reduce(info)
                lr_now = o.lr * lr_factor(step, cfg.warmup_steps, total)
                rec = {"kind": "train", "step": step, "lr": lr_now, **means, "samples": samples, "tokens": tokens,
                       "samples_per_s": samples / secs, "tokens_per_s": tokens / secs,
                       **{f"epoch/{t}": s.epoch for t, s in streams.items()},
                       "time_s": time.perf_counter() - t_start}
                if cfg.amp != "fp16" and not math.isfinite(rec["loss"]):
                    raise FloatingPointError(f"step {step}: the training loss is {rec['loss']} (diverged); the last "
                                             f"checkpoint is {last_saved}")
                logger.record(rec)
                last_train = {k: v for k, v in rec.items() if k != "kind"}
                window = _Window(device)

            t_side = time.perf_counter()
            is_last = step == total
            if (cfg.eval.every and step % cfg.eval.every == 0) or (is_last and cfg.eval.at_end):
                evaluate(step)
            if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or is_last:
                save(step)
            window.excluded += time.perf_counter() - t_side

            if any_rank(stop.signum is not None, info):
                if last_saved_step != step:
                    save(step)
                logger.message(f"SIGTERM: stopped after step {step}/{total}; checkpoint {last_saved}; "
                               "continue with --resume")
                logger.close()
                raise SystemExit(0)
        if start_step >= total:
            logger.message(f"the run in {run_dir} is already complete ({start_step}/{total} steps)")
    finally:
        logger.close()
    return TrainResult(step=max(step, start_step), last_train=last_train, last_eval=last_eval, best=best,
                       checkpoint=last_saved)
