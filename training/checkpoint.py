"""Training checkpoints: atomic writes, RNG states, the run's checkpoint folder, and
``--init-checkpoint`` weight loading.

Layout of a run directory::

    run_dir/config.yaml                     the resolved config
    run_dir/checkpoints/step_00000100.pt    full training state (the last K are kept)
    run_dir/checkpoints/best.pt             model weights at the best validation metric

A step checkpoint is one ``torch.save`` dict (loadable with ``weights_only=True``)::

    format: "vlfast-train", version: 1, step: int
    model: state_dict (of the unwrapped model)       optimizer, scheduler: state_dicts
    scaler: GradScaler state_dict or None            config: the resolved config (dict)
    rng: [per-rank {python, numpy, torch, cuda}]     data: [per-rank data position]
    best: {metric, mode, value, step} or None        world_size: int

Every file is written to a temporary name in the same folder, flushed and fsync'ed,
then ``os.replace``'d over the final name (and the folder fsync'ed), so a crash at any
point leaves either the previous file or the complete new one -- never a torn file.
"""
from __future__ import annotations

import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import numpy as np
import torch
from torch import nn

PathLike = Union[str, os.PathLike]
FORMAT = "vlfast-train"
BEST_FORMAT = "vlfast-best"
VERSION = 1
CKPT_DIR = "checkpoints"
STEP_RE = re.compile(r"^step_(\d+)\.pt$")
TMP_MARK = ".tmp-"


# ----------------------------------------------------------------------------------------
# Atomic files
# ----------------------------------------------------------------------------------------

def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: PathLike, write: Callable[[Any], None], mode: str = "wb") -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync it and
    ``os.replace`` it over ``path``.  If ``write`` raises, the temporary file is removed
    and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}{TMP_MARK}{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def atomic_torch_save(obj: Any, path: PathLike) -> Path:
    """``torch.save(obj, path)`` via :func:`atomic_write`."""
    return atomic_write(path, lambda f: torch.save(obj, f))


def remove_stale_temp_files(folder: PathLike) -> list[Path]:
    """Delete temporary files left by interrupted :func:`atomic_write` calls in ``folder``."""
    folder = Path(folder)
    removed = []
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith(".") and TMP_MARK in p.name:
                p.unlink(missing_ok=True)
                removed.append(p)
    return removed


# ----------------------------------------------------------------------------------------
# RNG states (as tensors and plain Python values, so weights_only loading works)
# ----------------------------------------------------------------------------------------

def rng_state() -> dict[str, Any]:
    """The states of Python's ``random``, NumPy's global RNG, torch's CPU generator and
    every CUDA device's generator."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            raise RuntimeError(f"set_rng_state: the checkpoint holds {len(cuda)} CUDA RNG states, this machine "
                               f"has {torch.cuda.device_count()} devices")
        torch.cuda.set_rng_state_all(cuda)


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global RNG and torch (CPU and every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_weights_only_safe(obj: Any, where: str = "state") -> None:
    """Raise TypeError naming the path of the first value that ``torch.load(...,
    weights_only=True)`` could not read back (allowed: tensors, None, bool, int, float,
    str, and lists/tuples/dicts of them)."""
    if obj is None or isinstance(obj, (bool, int, float, str, torch.Tensor)):
        return
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_weights_only_safe(v, f"{where}[{i}]")
        return
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} of type {type(k).__name__}: expected str or int keys")
            check_weights_only_safe(v, f"{where}[{k!r}]")
        return
    raise TypeError(f"{where}: a {type(obj).__module__}.{type(obj).__qualname__} cannot be stored in a "
                    "checkpoint (allowed: tensors, numbers, strings, None, and lists/tuples/dicts of them; "
                    "convert NumPy arrays with torch.from_numpy)")


# ----------------------------------------------------------------------------------------
# A run's checkpoint folder
# ----------------------------------------------------------------------------------------

def checkpoint_dir(run_dir: PathLike) -> Path:
    return Path(run_dir) / CKPT_DIR


def step_checkpoint_path(run_dir: PathLike, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step_{step:08d}.pt"


def best_checkpoint_path(run_dir: PathLike) -> Path:
    return checkpoint_dir(run_dir) / "best.pt"


def list_checkpoints(run_dir: PathLike) -> list[tuple[int, Path]]:
    """``[(step, path), ...]`` of the complete step checkpoints, oldest first."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        m = STEP_RE.match(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def latest_checkpoint(run_dir: PathLike) -> Optional[Path]:
    """The newest step checkpoint in ``run_dir``, or None."""
    ck = list_checkpoints(run_dir)
    return ck[-1][1] if ck else None


def prune_checkpoints(run_dir: PathLike, keep_last: int) -> list[Path]:
    """Delete all but the ``keep_last`` newest step checkpoints (never ``best.pt``)."""
    if keep_last < 1:
        raise ValueError(f"prune_checkpoints: keep_last: expected >= 1, got {keep_last}")
    ck = list_checkpoints(run_dir)
    removed = []
    for _, p in ck[:-keep_last]:
        p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device] = "cpu") -> dict[str, Any]:
    """Read a step checkpoint (``weights_only=True``) and check its format tag."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_checkpoint: {path} does not exist")
    try:
        ck = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # a torn or foreign file
        raise RuntimeError(f"load_checkpoint: cannot read {path}: {type(e).__name__}: {e}") from e
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise ValueError(f"load_checkpoint: {path} is not a vlfast training checkpoint "
                         f"(format tag {ck.get('format') if isinstance(ck, dict) else None!r}, expected {FORMAT!r})")
    if ck.get("version") != VERSION:
        raise ValueError(f"load_checkpoint: {path}: version {ck.get('version')!r}, this vlfast reads {VERSION}")
    return ck


# ----------------------------------------------------------------------------------------
# Model weights only (--init-checkpoint)
# ----------------------------------------------------------------------------------------

@dataclass
class LoadReport:
    """What :func:`load_model_weights` did: ``loaded`` keys, ``missing`` (in the model,
    not in the file), ``unexpected`` (in the file, not in the model), ``mismatched``
    (same name, other shape: ``(key, file shape, model shape)``; skipped), ``grown``
    (word-embedding tables with more rows in the model than in the file -- a
    vocabulary grown by special tokens, e.g. UNITER's VCR tags -- whose first rows were loaded:
    ``(key, file rows, model rows)``)."""
    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    grown: list[tuple[str, int, int]] = field(default_factory=list)

    def __str__(self) -> str:
        def cut(keys: list) -> str:
            shown = ", ".join(map(str, keys[:20]))
            return shown + (f", ... ({len(keys) - 20} more)" if len(keys) > 20 else "")
        lines = [f"init checkpoint {self.source}: loaded {len(self.loaded)} tensors"]
        if self.missing:
            lines.append(f"  missing in the checkpoint ({len(self.missing)}, left as initialised): {cut(self.missing)}")
        if self.unexpected:
            lines.append(f"  unexpected in the checkpoint ({len(self.unexpected)}, ignored): {cut(self.unexpected)}")
        if self.grown:
            lines.append(f"  embedding tables grown ({len(self.grown)}, the checkpoint's rows loaded, new rows "
                         "left as initialised): " + cut([f"{k} {a} -> {b} rows" for k, a, b in self.grown]))
        if self.mismatched:
            lines.append(f"  shape mismatch ({len(self.mismatched)}, skipped): " + cut(
                [f"{k} {tuple(a)} vs model {tuple(b)}" for k, a, b in self.mismatched]))
        return "\n".join(lines)


def read_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """Model weights from ``path``: a training checkpoint (its ``model``), a best
    checkpoint, a plain ``torch.save``'d state_dict (``.pt``/``.bin``), a
    ``.safetensors`` file, or a vlfast model directory (``model.safetensors``).
    A ``module.`` prefix on every key (a saved DDP wrapper) is stripped."""
    path = Path(path)
    if path.is_dir():
        cand = path / "model.safetensors"
        if not cand.is_file():
            raise FileNotFoundError(f"init checkpoint: directory {path} has no model.safetensors")
        path = cand
    if not path.is_file():
        raise FileNotFoundError(f"init checkpoint: {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        sd = load_file(str(path))
    else:
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, dict) and obj.get("format") in (FORMAT, BEST_FORMAT):
            sd = obj["model"]
        elif isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            sd = obj["state_dict"]
        elif isinstance(obj, dict) and isinstance(obj.get("model"), dict):
            sd = obj["model"]
        else:
            sd = obj
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise ValueError(f"init checkpoint {path}: expected a state_dict (name -> tensor), a vlfast training "
                             "checkpoint or a .safetensors file")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_model_weights(model: nn.Module, path: PathLike) -> LoadReport:
    """Load the weights in ``path`` into ``model`` non-strictly: matching names and
    shapes are copied, the rest is reported (see :class:`LoadReport`)."""
    sd = read_state_dict(path)
    own = model.state_dict()
    rep = LoadReport(source=str(path))
    # vocabulary tables (BERT's word_embeddings in all four models); position and type
    # tables are not grown this way
    tables = {f"{name}.weight" for name, mod in model.named_modules()
              if isinstance(mod, nn.Embedding) and name.split(".")[-1] == "word_embeddings"}
    usable = {}
    for k, v in sd.items():
        if k not in own:
            rep.unexpected.append(k)
        elif tuple(own[k].shape) != tuple(v.shape):
            a, b = tuple(v.shape), tuple(own[k].shape)
            if k in tables and len(a) == 2 and a[1] == b[1] and a[0] < b[0]:
                # a grown vocabulary: the checkpoint's rows, the rest as initialised (UNITER's
                # init_word_embedding / HF's resize_token_embeddings)
                grown = own[k].clone()
                grown[: a[0]] = v.to(grown.dtype)
                usable[k] = grown
                rep.grown.append((k, a[0], b[0]))
            else:
                rep.mismatched.append((k, a, b))
        else:
            usable[k] = v
    rep.missing = [k for k in own if k not in sd]
    model.load_state_dict(usable, strict=False)
    rep.loaded = sorted(usable)
    return rep
