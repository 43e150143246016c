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

from .config import UserError

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


SHA_SUFFIX = ".sha256"


def sha256_path(path: PathLike) -> Path:
    """The SHA-256 sidecar of a checkpoint: ``step_N.pt`` -> ``step_N.pt.sha256``."""
    path = Path(path)
    return path.with_name(path.name + SHA_SUFFIX)


def _sha256_of(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def atomic_torch_save(obj: Any, path: PathLike) -> Path:
    """``torch.save(obj, path)`` via a temporary file, with a SHA-256 sidecar
    (``<path>.sha256``) written atomically *before* the file is renamed into place, so
    every complete checkpoint has its digest and a later corruption (a truncated, empty
    or bit-flipped file) is detected at load (:func:`verify_checkpoint`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}{TMP_MARK}{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        digest = _sha256_of(tmp)
        atomic_write(sha256_path(path), lambda f: f.write(f"{digest}  {path.name}\n"), mode="w")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def verify_checkpoint(path: PathLike) -> Optional[str]:
    """None when ``path`` is intact, else why not, in plain words: missing, empty, or
    its SHA-256 differs from its sidecar's (a checkpoint written before sidecars
    existed is checked by reading it instead)."""
    path = Path(path)
    if not path.is_file():
        return "the file does not exist"
    size = path.stat().st_size
    if size == 0:
        return "the file is empty (0 bytes)"
    side = sha256_path(path)
    if side.is_file():
        words = side.read_text().split()
        want = words[0] if words else ""
        got = _sha256_of(path)
        if got != want:
            return (f"its SHA-256 ({got[:12]}...) differs from the one recorded when it was written "
                    f"({want[:12]}...; {side.name}): the file was truncated or changed ({size} bytes now)")
        return None
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any failure to read is corruption here
        return f"it cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return None


def newest_intact_checkpoint(run_dir: PathLike) -> tuple[Optional[Path], list[str]]:
    """(the newest step checkpoint of ``run_dir`` that verifies, the reasons each newer
    one was passed over) -- what resume and ``vlfast.evaluate`` use."""
    skipped: list[str] = []
    for _, p in reversed(list_checkpoints(run_dir)):
        why = verify_checkpoint(p)
        if why is None:
            return p, skipped
        skipped.append(f"{p} is corrupt: {why}")
    return None, skipped


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
        sha256_path(p).unlink(missing_ok=True)
        removed.append(p)
    return removed


def load_checkpoint(path: PathLike, map_location: Union[str, torch.device] = "cpu", *,
                    verify: bool = True) -> dict[str, Any]:
    """Read a step checkpoint (``weights_only=True``) and check its format tag.
    ``verify``: check it against its SHA-256 sidecar first (``False`` when the caller
    just did, e.g. :func:`newest_intact_checkpoint`: a checkpoint is hashed once)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"load_checkpoint: {path} does not exist")
    check = verify and (sha256_path(path).is_file() or path.stat().st_size == 0)
    why = verify_checkpoint(path) if check else None
    if why is not None:
        raise RuntimeError(f"load_checkpoint: {path} is corrupt: {why}")
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

class InitCheckpointError(UserError, ValueError):
    """An ``--init-checkpoint`` that does not fit the model: it provides none, or only
    part, of the backbone (without ``init.allow_partial``), or a tensor of another
    shape.  A user error: the CLI prints it as one line and exits 2."""


@dataclass
class LoadReport:
    """What :func:`load_model_weights` did: ``loaded`` keys, ``missing`` (in the model,
    not in the file), ``unexpected`` (in the file, not used), ``mismatched`` (same name,
    other shape: ``(key, file shape, model shape)``; skipped), ``grown`` (word-embedding
    tables with more rows in the model than in the file -- a vocabulary grown by
    special tokens, e.g. UNITER's VCR tags -- whose first rows were loaded: ``(key, file
    rows, model rows)``).  For a vlfast model (one with a ``backbone``) also: ``kind``
    (what the file is and which layout its names were read in), ``backbone_total``,
    ``fresh`` (the model's own head tensors the file does not provide: new task heads,
    initialised fresh) and ``expected_missing`` (backbone tensors the model's releases
    are known to lack, e.g. VL-BERT's pooler)."""
    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[tuple[str, tuple, tuple]] = field(default_factory=list)
    grown: list[tuple[str, int, int]] = field(default_factory=list)
    kind: str = ""
    backbone_total: int = 0
    fresh: list[str] = field(default_factory=list)
    expected_missing: list[str] = field(default_factory=list)

    @property
    def backbone_loaded(self) -> list[str]:
        return [k for k in self.loaded if k.startswith("backbone.")]

    @property
    def backbone_missing(self) -> list[str]:
        return [k for k in self.missing if k.startswith("backbone.") and k not in self.expected_missing]

    def __str__(self) -> str:
        def cut(keys: list) -> str:
            shown = ", ".join(map(str, keys[:20]))
            return shown + (f", ... ({len(keys) - 20} more)" if len(keys) > 20 else "")
        head = f"init checkpoint {self.source}"
        if self.kind:
            head += f" ({self.kind})"
        lines = [f"{head}: loaded {len(self.loaded)} tensors"
                 + (f" ({len(self.backbone_loaded)} of the backbone's {self.backbone_total}, "
                    f"{len(self.loaded) - len(self.backbone_loaded)} of the heads)" if self.backbone_total else "")]
        if self.fresh:
            lines.append(f"  initialised fresh ({len(self.fresh)}, heads the checkpoint does not have): "
                         f"{cut(_prefixes(self.fresh))}")
        if self.expected_missing:
            lines.append(f"  not in this release, as expected ({len(self.expected_missing)}, left as initialised): "
                         f"{cut(self.expected_missing)}")
        other = [k for k in self.missing if k not in self.fresh and k not in self.expected_missing]
        if other:
            lines.append(f"  missing in the checkpoint ({len(other)}, left as initialised): {cut(other)}")
        if self.unexpected:
            lines.append(f"  unexpected in the checkpoint ({len(self.unexpected)}, ignored): {cut(self.unexpected)}")
        if self.grown:
            lines.append(f"  embedding tables grown ({len(self.grown)}, the checkpoint's rows loaded, new rows "
                         "left as initialised): " + cut([f"{k} {a} -> {b} rows" for k, a, b in self.grown]))
        if self.mismatched:
            lines.append(f"  shape mismatch ({len(self.mismatched)}, skipped): " + cut(
                [f"{k} {tuple(a)} vs model {tuple(b)}" for k, a, b in self.mismatched]))
        return "\n".join(lines)


def _prefixes(keys: list[str]) -> list[str]:
    """Parameter names grouped by module: ``vqa_output.0.weight`` -> ``vqa_output.*``."""
    out: list[str] = []
    for k in keys:
        p = k.split(".")[0] + ".*" if "." in k else k
        if p not in out:
            out.append(p)
    return out


DIR_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
# training/tasks.py HEAD_WEIGHTS_NAME (a task head) and vlfast.export's pretraining heads
DIR_HEAD_WEIGHTS = ("head.safetensors", "heads.safetensors")


def read_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """Model weights from ``path`` (see :func:`read_weights`)."""
    return read_weights(path)[0]


def read_weights(path: PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """(state_dict, what it is) from ``path``: a vlfast training or best checkpoint
    (its ``model``), a model directory (``model.safetensors`` or HF's
    ``pytorch_model.bin``: a ``vlfast.convert`` / ``save_pretrained`` / HF directory), a
    ``.safetensors`` file, or a ``torch.save``'d state_dict in any official wrapping
    (UNITER ``.pt``, ViLBERT ``.bin``, VL-BERT ``.model`` with its ``state_dict``).  A
    ``module.`` prefix on every key (a saved DDP/DataParallel wrapper) is stripped."""
    path = Path(path)
    kind = "state_dict file"
    if path.is_dir():
        cand = next((path / n for n in DIR_WEIGHTS if (path / n).is_file()), None)
        if cand is None:
            raise FileNotFoundError(f"init checkpoint: directory {path} has none of {', '.join(DIR_WEIGHTS)}")
        backbone, what = read_weights(cand)
        heads = [path / n for n in DIR_HEAD_WEIGHTS if (path / n).is_file()]
        if not heads:
            return backbone, f"model directory {path}"
        # a task head's save_pretrained / a vlfast.export directory: the backbone's tensors
        # (model.safetensors, backbone names) and the heads' (head.safetensors of a task
        # head, heads.safetensors of a pretraining model: the model's own names, outside
        # backbone.)
        from safetensors.torch import load_file

        merged = {f"backbone.{k}": v for k, v in backbone.items()}
        for h in heads:
            merged.update(load_file(str(h)))
        kind = "task-head" if heads[0].name == DIR_HEAD_WEIGHTS[0] else "pretraining-model"
        return merged, f"{kind} directory {path}"
    if not path.is_file():
        raise FileNotFoundError(f"init checkpoint: {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        sd = load_file(str(path))
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 -- a torn, foreign or non-weights-only file
            raise ValueError(f"init checkpoint: cannot read {path} as a checkpoint ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''})") from e
        if isinstance(obj, dict) and obj.get("format") in (FORMAT, BEST_FORMAT):
            sd, kind = obj["model"], "vlfast training checkpoint"
        else:
            sd = obj
            for key in ("state_dict", "model", "model_state_dict"):
                if isinstance(sd, dict) and isinstance(sd.get(key), dict):
                    sd = sd[key]
                    break
        if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise ValueError(f"init checkpoint {path}: expected a state_dict (name -> tensor), a vlfast training "
                             "checkpoint, a model directory or a .safetensors file")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd, f"{kind} {path}"


def _copy_into(own: Mapping[str, torch.Tensor], tables: set[str], key: str, v: torch.Tensor,
               rep: LoadReport, usable: dict[str, torch.Tensor]) -> bool:
    """Take ``v`` for ``key`` when the shapes fit (or a grown word table); record a mismatch."""
    a, b = tuple(v.shape), tuple(own[key].shape)
    if a == b:
        usable[key] = v
        return True
    if key in tables and len(a) == 2 and a[1] == b[1] and a[0] < b[0]:
        # a grown vocabulary: the checkpoint's rows, the rest as initialised (UNITER's
        # init_word_embedding / HF's resize_token_embeddings)
        grown = own[key].clone()
        grown[: a[0]] = v.to(grown.dtype)
        usable[key] = grown
        rep.grown.append((key, a[0], b[0]))
        return True
    rep.mismatched.append((key, a, b))
    return False


def _backbone_of(model: nn.Module) -> Optional[nn.Module]:
    from vlfast.models.base import PretrainedModel

    bb = getattr(model, "backbone", None)
    return bb if isinstance(bb, PretrainedModel) else None


def load_model_weights(model: nn.Module, path: PathLike, *, allow_partial: bool = True) -> LoadReport:
    """Load the weights in ``path`` (see :func:`read_weights`) into ``model``.

    A vlfast model (a pretraining model or a task head: a ``backbone`` plus heads)
    takes every form of weights a user has, mapped by name onto the model:

    1. the model's own names (a vlfast training checkpoint: pretraining -> fine-tuning
       shares ``backbone.*``; an exported task head's ``head.safetensors``);
    2. a backbone state_dict (a ``vlfast.convert`` / ``save_pretrained`` / HF VisualBERT
       directory): ``X`` -> ``backbone.X``;
    3. the backbone's official layout (UNITER ``uniter.*``, ViLBERT ``bert.*``, VL-BERT
       ``vlbert.*``, VisualBERT uclanlp/HF ``visual_bert.*``), through the model
       module's ``convert_official``;
    4. official heads where the official code has the same head: the pretraining
       objectives' official names (``PretrainModel.load_official_heads``: UNITER's
       ``itm_output`` into ITM, ``cls.predictions`` into MLM, ...), UNITER's ITM head into
       the retrieval head (``init_from_itm_head``); fine-tuning heads already use the
       official names (step 1).

    Every backbone tensor the file provides must fit (a shape mismatch is an
    :class:`InitCheckpointError`), and the file must provide the whole backbone, less
    what the model's releases are known to lack (``<Backbone>.release_missing``);
    otherwise an :class:`InitCheckpointError` lists what is missing -- unless
    ``allow_partial`` (``init.allow_partial=true``), which loads what fits.  Heads the
    file lacks are initialised fresh and listed.  Other models (no backbone) load
    matching names and shapes non-strictly (``allow_partial`` is not consulted).
    """
    sd, what = read_weights(path)
    own = model.state_dict()
    rep = LoadReport(source=str(path))
    # vocabulary tables (BERT's word_embeddings in all four models); position and type
    # tables are not grown this way
    tables = {f"{name}.weight" for name, mod in model.named_modules()
              if isinstance(mod, nn.Embedding) and name.split(".")[-1] == "word_embeddings"}
    usable: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for k, v in sd.items():                                           # 1. our own names
        if k in own:
            used.add(k)
            _copy_into(own, tables, k, v, rep, usable)
    bb = _backbone_of(model)
    layouts = ["vlfast"] if used else []
    if bb is not None:
        import importlib

        rest = {k: v for k, v in sd.items() if k not in used}
        n = len(used)
        for k, v in rest.items():                                     # 2. a backbone state_dict
            if f"backbone.{k}" in own and f"backbone.{k}" not in usable:
                used.add(k)
                _copy_into(own, tables, f"backbone.{k}", v, rep, usable)
        if len(used) > n:
            layouts.append("backbone")
        rest = {k: v for k, v in sd.items() if k not in used}
        module = importlib.import_module(type(bb).__module__)
        conv = getattr(module, "convert_official", None)
        if rest and conv is not None:                                 # 3. the official layout
            by_id: dict[int, list[str]] = {}
            for k, v in rest.items():
                by_id.setdefault(id(v), []).append(k)

            def source_key(ck: str, v: torch.Tensor) -> str:
                """The source key a converted tensor came from; when several keys share
                the tensor (a release saved with tied weights: the MLM decoder and the
                word embeddings), the one whose own conversion gives ``ck``."""
                cands = by_id.get(id(v), [ck])
                if len(cands) > 1:
                    for cand in cands:
                        if ck in conv({cand: v}):
                            return cand
                return cands[0]

            n = len(used)
            for ck, v in conv(rest).items():
                ours = f"backbone.{ck}"
                if ours in own and ours not in usable:
                    used.add(source_key(ck, v))
                    _copy_into(own, tables, ours, v, rep, usable)
            if len(used) > n:
                layouts.append(f"official {bb.config.model_type}")
        rest = {k: v for k, v in sd.items() if k not in used}
        if rest and hasattr(model, "load_official_heads"):          # 4. official pretraining heads
            head_keys = model.official_head_keys()
            for ours, official in head_keys.items():
                if official in rest and ours not in usable:
                    used.add(official)
                    _copy_into(own, tables, ours, rest[official], rep, usable)
            # heads tied to the backbone (the MLM decoder, UNITER's feat_regress weight) are
            # the backbone's tensors: used, not unexpected
            used.update(k for obj in getattr(model, "objectives", {}).values()
                        for k in getattr(obj, "official_tied", ()) if k in rest)
        if "itm_output.weight" in sd and hasattr(model, "init_from_itm_head"):
            # UNITER's pretrained ITM head (2, E) -> the retrieval head's match row
            w, b_ = sd["itm_output.weight"], sd.get("itm_output.bias")
            target = [k for k in own if k.startswith("rank_output.")]
            if b_ is not None and target and not any(k in usable for k in target) and w.dim() == 2 and w.shape[0] == 2:
                usable["rank_output.weight"], usable["rank_output.bias"] = w[1:].clone(), b_[1:].clone()
                used.update({"itm_output.weight", "itm_output.bias"})
        rep.kind = what + (f", {' + '.join(layouts)} names" if layouts else "")
        bb_keys = [k for k in own if k.startswith("backbone.")]
        rep.backbone_total = len(bb_keys)
        release_missing = tuple(getattr(type(bb), "release_missing", ()))
        rep.expected_missing = [k for k in bb_keys if k not in usable
                                and k[len("backbone."):].startswith(release_missing)] if release_missing else []
        skipped = {m[0] for m in rep.mismatched}
        rep.fresh = [k for k in own if not k.startswith("backbone.") and k not in usable and k not in skipped]
    else:
        rep.kind = what
    rep.unexpected = [k for k in sd if k not in used]
    shape_mismatch = {m[0] for m in rep.mismatched}
    rep.missing = [k for k in own if k not in usable and k not in shape_mismatch]
    rep.loaded = sorted(usable)
    if bb is not None:
        bad = [m for m in rep.mismatched if m[0].startswith("backbone.")]
        if bad and not allow_partial:
            raise InitCheckpointError(
                f"init checkpoint {path}: {len(bad)} backbone tensor(s) of another shape than the model's: "
                + ", ".join(f"{k} {tuple(a)} vs model {tuple(b)}" for k, a, b in bad[:5])
                + (" ..." if len(bad) > 5 else "") + " (a checkpoint of another size? set model.config to its "
                "sizes, or init.allow_partial=true to skip them)")
        if rep.backbone_missing and not allow_partial:
            miss = rep.backbone_missing
            found = len(rep.backbone_loaded)
            raise InitCheckpointError(
                f"init checkpoint {path} ({what}): provides {found} of the {rep.backbone_total} "
                f"{type(bb).__name__} backbone tensors; missing {len(miss)}: {', '.join(miss[:8])}"
                + (f", ... ({len(miss) - 8} more)" if len(miss) > 8 else "")
                + (f"; unused keys in it: {', '.join(rep.unexpected[:5])}" + (" ..." if len(rep.unexpected) > 5
                                                                               else "") if rep.unexpected else "")
                + " (a checkpoint of another model? init.allow_partial=true loads what fits)")
    model.load_state_dict(usable, strict=False)
    return rep
