"""torchrun / DDP helpers: process-group setup from the environment, the model wrap,
rank-0-only side effects, and small collectives the loop needs.

``torchrun --nproc_per_node N -m vlfast.train ...`` sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_distributed` reads them
(no variables, or ``WORLD_SIZE=1``: a single process, no process group) and starts the
process group with ``nccl`` when the run is on CUDA and ``gloo`` on CPU.  Each process
drives ``cuda:LOCAL_RANK``.  Only rank 0 writes checkpoints and logs
(:attr:`DistInfo.is_main`).
"""
from __future__ import annotations

import datetime
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``, ``local_rank`` on its node,
    its ``device``, and the process-group ``backend`` (None for a single process)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str) -> int:
    raw = os.environ[name]
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"init_distributed: environment variable {name}: expected an int, got {raw!r}") from None


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """``auto``: ``cuda:LOCAL_RANK`` when CUDA is available, else CPU; ``cuda`` without a
    GPU raises."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"resolve_device: device: expected 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for, but torch.cuda.is_available() is False "
                           f"(torch {torch.__version__}, built with CUDA {torch.version.cuda})")
    n = torch.cuda.device_count()
    if local_rank >= n:
        raise RuntimeError(f"LOCAL_RANK={local_rank} but only {n} CUDA device(s) are visible")
    return torch.device("cuda", local_rank)


def init_distributed(device: str = "auto", backend: str = "auto", timeout_s: int = 1800) -> DistInfo:
    """Set up this process from torchrun's environment variables.

    Without ``WORLD_SIZE`` (or with ``WORLD_SIZE=1``) this is a single process and no
    process group is created.  Otherwise every one of :data:`ENV_VARS` must be set
    (a missing one raises naming it) and the process group is initialised with
    ``init_method="env://"``: ``backend="auto"`` picks nccl on CUDA, gloo on CPU.
    An already-initialised process group is reused.
    """
    if backend not in ("auto", "gloo", "nccl"):
        raise ValueError(f"init_distributed: backend: expected 'auto', 'gloo' or 'nccl', got {backend!r}")
    world = _env_int("WORLD_SIZE") if "WORLD_SIZE" in os.environ else 1
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else rank
        dev = resolve_device(device, local)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistInfo(rank, world, local, dev, dist.get_backend())
    if world <= 1:
        local = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else 0
        dev = resolve_device(device, local)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        return DistInfo(0, 1, local, dev, None)
    missing = [v for v in ENV_VARS if v not in os.environ]
    if missing:
        raise RuntimeError(f"init_distributed: WORLD_SIZE={world} but {', '.join(missing)} not set; "
                           "launch with torchrun (which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT)")
    if not dist.is_available():
        raise RuntimeError("init_distributed: this torch build has no torch.distributed")
    rank, local = _env_int("RANK"), _env_int("LOCAL_RANK")
    dev = resolve_device(device, local)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and dev.type != "cuda":
        raise ValueError("init_distributed: backend 'nccl' needs CUDA devices; the run is on CPU (use gloo)")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        kwargs["device_id"] = dev
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    return DistInfo(rank, world, local, dev, backend)


def cleanup() -> None:
    """Destroy the process group, if one was created."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap_model(model: nn.Module, info: DistInfo, find_unused_parameters: bool = True) -> nn.Module:
    """``DistributedDataParallel(model)`` on a multi-process run; ``model`` itself otherwise.
    DDP broadcasts rank 0's parameters and buffers, so every rank starts equal."""
    if not info.distributed:
        return model
    ids = [info.device.index] if info.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, output_device=ids[0] if ids else None,
                                               find_unused_parameters=find_unused_parameters)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (or ``model`` itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def barrier(info: DistInfo) -> None:
    if info.distributed:
        if info.backend == "nccl":
            dist.barrier(device_ids=[info.device.index])
        else:
            dist.barrier()


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank when ``flag`` is True on any rank (one tiny all-reduce)."""
    if not info.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum of ``t`` over ranks (a new tensor; ``t`` itself on a single process)."""
    if not info.distributed:
        return t
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_objects(obj: Any, info: DistInfo) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (picklable objects)."""
    if not info.distributed:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, info: DistInfo, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not info.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@contextmanager
def no_sync_if(model: nn.Module, skip_sync: bool) -> Iterator[None]:
    """DDP's ``no_sync()`` (no gradient all-reduce in this backward) when ``skip_sync``
    and ``model`` is DDP-wrapped: used for every micro-batch of a gradient-accumulation
    group but the last."""
    if skip_sync and isinstance(model, nn.parallel.DistributedDataParallel):
        with model.no_sync():
            yield
    else:
        yield


# ----------------------------------------------------------------------------------
# Loss means over the ranks' global count
# ----------------------------------------------------------------------------------

_GLOBAL_MEAN: Optional[DistInfo] = None


@contextmanager
def global_loss_mean(info: DistInfo) -> Iterator[None]:
    """Within this block (the training loop's forward passes), :func:`global_mean_scales`
    rescales per-rank means to means over every rank's loss units (HF Trainer's
    ``average_tokens_across_devices``).  A no-op on a single process."""
    global _GLOBAL_MEAN
    prev = _GLOBAL_MEAN
    _GLOBAL_MEAN = info if info.distributed and info.world_size > 1 else None
    try:
        yield
    finally:
        _GLOBAL_MEAN = prev


def global_mean_scales(counts: list[int], device: torch.device) -> Optional[torch.Tensor]:
    """Factors (len(counts),) that turn each of this rank's mean losses over
    ``counts[i]`` units (masked words, masked regions, pairs) into its share of the mean
    over all ranks' units: ``counts[i] * world_size / sum over ranks of counts[i]``
    (0 where no rank has a unit).  DDP averages gradients over ranks, so the averaged
    gradient is that of the global mean: 2 ranks x B = 1 process x 2B, even when the
    ranks hold different numbers of masked words.  None outside
    :func:`global_loss_mean` or on a single process (no collective)."""
    info = _GLOBAL_MEAN
    if info is None or not counts:
        return None
    local = torch.tensor(counts, dtype=torch.float64, device=info.device)
    total = local.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    scale = torch.where(total > 0, local * info.world_size / total.clamp(min=1), torch.zeros_like(local))
    return scale.to(device=device, dtype=torch.float32)
