"""Training configuration: dataclasses, YAML files and ``key=value`` overrides.

A run is described by one :class:`TrainConfig`.  Its defaults are the dataclass
defaults below; a YAML file sets any subset of them, and ``key=value`` overrides
(dotted keys) are applied last::

    cfg = load_config("tiny_test", ["optim.lr=1e-4", "tasks.mlm=2", "amp=bf16"])

* A config name without a path (``"tiny_test"``) is a packaged file,
  ``vlfast/training/configs/<name>.yaml``; anything else is a path.
* A YAML file may start with ``extends: <name or path>`` (relative paths are
  resolved next to the file): the base is loaded first and this file's keys are
  merged into it (mappings recursively, except ``tasks``, which a file replaces
  as a whole; everything else replaced).
* Override values are parsed as YAML (``3`` int, ``1e-4``/``0.5`` float,
  ``true`` bool, ``null`` None, ``[0.9, 0.98]`` list, ``{mlm: 1}`` mapping) and then
  checked against the field's type.
* A key that names no field raises ``ConfigError`` (a :class:`UserError` and a
  ``ValueError``) naming the key and the valid keys at that level.  Mapping fields (``tasks``, ``optim.lr_multipliers``,
  ``model.config``, ``data.options``) take any sub-key; the whole rest of a dotted
  key is one sub-key there, so ``optim.lr_multipliers.uniter.embeddings=0.5`` sets
  the multiplier of the prefix ``uniter.embeddings``.

:func:`save_config` writes the resolved config as YAML (atomically);
:func:`load_config` reads it back to an equal config.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"

AMP_MODES = ("off", "bf16", "fp16")
DEVICES = ("auto", "cpu", "cuda")
BACKENDS = ("auto", "gloo", "nccl")
PROGRESS = ("auto", "on", "off")
BEST_MODES = ("max", "min")


class UserError(Exception):
    """A mistake in what the user asked for -- a flag, a config key or value, a model,
    task or config name, a missing file -- as opposed to a bug.  The command-line tools
    (``python -m vlfast.train`` / ``vlfast.evaluate`` / ``vlfast.convert``) print its
    message as one line on stderr and exit 2 (``--debug`` adds the traceback)."""


class ConfigError(UserError, ValueError):
    """A config file or override is invalid (the message names the key)."""


# ----------------------------------------------------------------------------------------
# Schema
# ----------------------------------------------------------------------------------------

@dataclass
class ModelSection:
    """Which model to build.  ``name``: uniter | vilbert | vlbert | visualbert;
    ``size``: base | small (the model config's ``base()``/``small()``); ``config``:
    field overrides of that model config (e.g. ``{num_hidden_layers: 2}``);
    ``padding_free``: run the packed (padding-free) path; ``objectives``: settings of
    the pretraining objectives (the keyword arguments of
    :func:`vlfast.training.pretrain.build_pretrain_model`: ``itm_ot_lambda`` (UNITER's
    WRA weight, 0.1), ``wra``, ``wra_beta``, ``wra_iters``, ``mrc_skip_background``,
    ``mrc_kl_reduction``, ``alignment_dropout``)."""
    name: str = "uniter"
    size: str = "small"
    config: dict[str, Any] = field(default_factory=dict)
    padding_free: bool = False
    objectives: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataSection:
    """Where batches come from.  ``source``: synthetic or a feature-store format
    (uniter | vilbert | tsv | npz); ``path``: the store (None for synthetic);
    ``batch_size``: samples per micro-batch per rank; ``batch_tokens``: when > 0, a
    token budget per micro-batch per rank (UNITER's token-bucket sampler) instead of
    a sample count; ``eval_batch_size``; ``num_workers``: DataLoader workers;
    ``on_bad_record``: a feature record that is missing, undecodable or malformed
    (NaN/inf, fewer rows than its num_bb) stops the run naming it (``error``), or its
    samples are dropped from their batch, each record logged and counted (``skip``);
    ``options``: reader/generator specific settings."""
    source: str = "synthetic"
    path: Optional[str] = None
    batch_size: int = 32
    batch_tokens: int = 0
    eval_batch_size: int = 64
    num_workers: int = 0
    on_bad_record: str = "error"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimSection:
    """AdamW and the LR schedule.

    The LR of optimizer step n (1-based) of ``total_steps`` = T, with W warmup steps,
    is ``lr * lr_mult * f(n)``: ``f(n) = n / W`` for n <= W, then
    ``f(n) = (T - n + 1) / (T - W)`` (linear decay; the last step has ``1/(T-W)``).
    ``warmup_steps`` wins over ``warmup_ratio`` (W = round(ratio * T)) when > 0.
    ``lr_multipliers``: ``{parameter-name prefix: multiplier}``; the longest prefix
    matching at a module boundary wins (``encoder.layer.1`` does not match
    ``encoder.layer.10``).  ``no_decay_1d``: no weight decay on 1-d parameters
    (biases, LayerNorm weights), as BERT.  ``grad_accum_steps``: micro-batches per
    optimizer step (one task per group).  ``clip_grad_norm``: max global L2 norm,
    0 = off."""
    lr: float = 5e-5
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    weight_decay: float = 0.01
    no_decay_1d: bool = True
    warmup_steps: int = 0
    warmup_ratio: float = 0.1
    total_steps: int = 1000
    lr_multipliers: dict[str, float] = field(default_factory=dict)
    grad_accum_steps: int = 1
    clip_grad_norm: float = 2.0


@dataclass
class LoggingSection:
    """``every``: log training metrics every N optimizer steps; ``jsonl``: metrics file
    (relative to the run dir; null = none); ``tensorboard``: TensorBoard event folder
    (relative to the run dir; null = none); ``progress``: tqdm bar -- auto (on when
    stderr is a terminal and CI is not set), on, off (then a plain line per log step)."""
    every: int = 10
    jsonl: Optional[str] = "metrics.jsonl"
    tensorboard: Optional[str] = "tensorboard"
    progress: str = "auto"


@dataclass
class CheckpointSection:
    """``every``: save every N optimizer steps (0 = only at the end and on SIGTERM);
    ``keep_last``: how many step checkpoints to keep; ``best_metric``: evaluation
    metric (a key of the job's ``evaluate`` result) whose best value keeps
    ``checkpoints/best.pt``; ``best_mode``: max or min."""
    every: int = 500
    keep_last: int = 2
    best_metric: Optional[str] = None
    best_mode: str = "max"


@dataclass
class InitSection:
    """``--init-checkpoint`` loading: ``allow_partial``: accept a checkpoint that
    provides only part of the backbone (the rest stays as initialised, and the run
    header lists it); by default that is an error listing what is missing."""
    allow_partial: bool = False


@dataclass
class EvalSection:
    """``every``: evaluate every N optimizer steps (0 = never during training);
    ``at_end``: evaluate after the last step."""
    every: int = 0
    at_end: bool = True


@dataclass
class DistributedSection:
    """``backend``: auto (nccl on CUDA, gloo on CPU) | gloo | nccl;
    ``find_unused_parameters``: DDP's flag (needed when tasks use different heads);
    ``timeout_s``: collective timeout."""
    backend: str = "auto"
    find_unused_parameters: bool = True
    timeout_s: int = 1800


@dataclass
class TrainConfig:
    """A training run.  ``tasks``: ``{task name: sampling ratio}`` -- one task per
    gradient-accumulation group, drawn by ratio from (seed, step), the same on every
    rank.  ``amp``: off | bf16 | fp16 (fp16 uses a GradScaler).  ``device``: auto |
    cpu | cuda.  ``deterministic``: torch.use_deterministic_algorithms + cuDNN
    deterministic.  ``grad_checkpointing``: calls the model's
    ``gradient_checkpointing_enable()``."""
    seed: int = 42
    device: str = "auto"
    amp: str = "off"
    grad_checkpointing: bool = False
    deterministic: bool = False
    tasks: dict[str, float] = field(default_factory=lambda: {"mlm": 1.0})
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    optim: OptimSection = field(default_factory=OptimSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    init: InitSection = field(default_factory=InitSection)
    eval: EvalSection = field(default_factory=EvalSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)

    # -- derived values ---------------------------------------------------------------
    @property
    def warmup_steps(self) -> int:
        """Warmup steps actually used: ``optim.warmup_steps`` if > 0, else
        ``round(optim.warmup_ratio * optim.total_steps)``."""
        o = self.optim
        if o.warmup_steps > 0:
            return min(o.warmup_steps, o.total_steps)
        return min(int(round(o.warmup_ratio * o.total_steps)), o.total_steps)

    # -- conversions ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples become lists), as saved to YAML."""
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "TrainConfig":
        """Build from a nested dict; unknown keys and wrong types raise ConfigError
        (the message says ``source``)."""
        cfg = cls()
        _merge_into(cfg, d, prefix="", source=source)
        cfg.validate()
        return cfg

    def with_overrides(self, overrides: Iterable[str]) -> "TrainConfig":
        """A copy with ``key=value`` overrides applied and validated."""
        cfg = copy.deepcopy(self)
        for ov in overrides:
            apply_override(cfg, ov)
        cfg.validate()
        return cfg

    # -- checks -----------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ConfigError naming the first invalid key."""
        def need(ok: bool, key: str, expected: str, got: Any) -> None:
            if not ok:
                raise ConfigError(f"config key {key!r}: expected {expected}, got {got!r}")

        need(self.device in DEVICES, "device", f"one of {DEVICES}", self.device)
        need(self.amp in AMP_MODES, "amp", f"one of {AMP_MODES}", self.amp)
        need(len(self.tasks) > 0, "tasks", "at least one task with a ratio > 0", self.tasks)
        for name, r in self.tasks.items():
            need(r >= 0, f"tasks.{name}", "a ratio >= 0", r)
        need(sum(self.tasks.values()) > 0, "tasks", "ratios summing to > 0", self.tasks)
        m = self.model
        need(m.size in ("base", "small"), "model.size", "'base' or 'small'", m.size)
        d = self.data
        need(d.batch_size >= 1, "data.batch_size", "an int >= 1", d.batch_size)
        need(d.batch_tokens >= 0, "data.batch_tokens", "an int >= 0", d.batch_tokens)
        need(d.eval_batch_size >= 1, "data.eval_batch_size", "an int >= 1", d.eval_batch_size)
        need(d.num_workers >= 0, "data.num_workers", "an int >= 0", d.num_workers)
        need(d.on_bad_record in ("error", "skip"), "data.on_bad_record", "'error' or 'skip'", d.on_bad_record)
        o = self.optim
        need(o.lr > 0, "optim.lr", "a float > 0", o.lr)
        need(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), "optim.betas",
             "two floats in [0, 1)", list(o.betas))
        need(o.eps > 0, "optim.eps", "a float > 0", o.eps)
        need(o.weight_decay >= 0, "optim.weight_decay", "a float >= 0", o.weight_decay)
        need(o.warmup_steps >= 0, "optim.warmup_steps", "an int >= 0", o.warmup_steps)
        need(0 <= o.warmup_ratio <= 1, "optim.warmup_ratio", "a float in [0, 1]", o.warmup_ratio)
        need(o.total_steps >= 1, "optim.total_steps", "an int >= 1", o.total_steps)
        need(o.grad_accum_steps >= 1, "optim.grad_accum_steps", "an int >= 1", o.grad_accum_steps)
        need(o.clip_grad_norm >= 0, "optim.clip_grad_norm", "a float >= 0 (0 = off)", o.clip_grad_norm)
        for prefix, mult in o.lr_multipliers.items():
            need(mult >= 0, f"optim.lr_multipliers.{prefix}", "a float >= 0", mult)
        lg = self.logging
        need(lg.every >= 1, "logging.every", "an int >= 1", lg.every)
        need(lg.progress in PROGRESS, "logging.progress", f"one of {PROGRESS}", lg.progress)
        c = self.checkpoint
        need(c.every >= 0, "checkpoint.every", "an int >= 0 (0 = only at the end)", c.every)
        need(c.keep_last >= 1, "checkpoint.keep_last", "an int >= 1", c.keep_last)
        need(c.best_mode in BEST_MODES, "checkpoint.best_mode", f"one of {BEST_MODES}", c.best_mode)
        need(self.eval.every >= 0, "eval.every", "an int >= 0 (0 = never during training)", self.eval.every)
        ds = self.distributed
        need(ds.backend in BACKENDS, "distributed.backend", f"one of {BACKENDS}", ds.backend)
        need(ds.timeout_s >= 1, "distributed.timeout_s", "an int >= 1", ds.timeout_s)


# ----------------------------------------------------------------------------------------
# Typed assignment
# ----------------------------------------------------------------------------------------

def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` (parsed YAML) against the annotation ``tp``; return the typed value."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError:
                pass
        raise ConfigError(f"config key {key!r}: expected {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key!r}: expected a bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key {key!r}: expected an int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key {key!r}: expected a float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key {key!r}: expected a string, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or (args[-1] is not Ellipsis and len(value) != len(args)):
            raise ConfigError(f"config key {key!r}: expected a list of {len(args)} ({_type_name(tp)}), "
                              f"got {value!r}")
        if args[-1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    raise ConfigError(f"config key {key!r}: unsupported field type {_type_name(tp)}")


def _coerce_field(obj: Any, name: str, value: Any, key: str) -> Any:
    tp = _hints(type(obj))[name]
    if name == "amp" and value is False:  # YAML 1.1 reads `amp: off` as false
        value = "off"
    if name == "progress" and isinstance(value, bool):  # `progress: on/off`
        value = "on" if value else "off"
    return _coerce(value, tp, key)


def _unknown(key: str, obj: Any, prefix: str, source: str) -> ConfigError:
    valid = [f.name for f in dataclasses.fields(obj)]
    leaf = key.split(".")[-1]
    close = difflib.get_close_matches(leaf, valid, n=1)
    hint = f" (did you mean {prefix + close[0]!r}?)" if close else ""
    where = prefix[:-1] if prefix else "the top level"
    return ConfigError(f"{source}: unknown config key {key!r}{hint}; valid keys of {where}: {', '.join(valid)}")


def _merge_into(obj: Any, d: Any, prefix: str, source: str) -> None:
    """Merge the nested dict ``d`` into the dataclass ``obj`` (recursively)."""
    if not isinstance(d, dict):
        where = prefix[:-1] or "the config"
        raise ConfigError(f"{source}: {where!r}: expected a mapping, got {d!r}")
    names = {f.name for f in dataclasses.fields(obj)}
    for k, v in d.items():
        key = prefix + str(k)
        if k not in names:
            raise _unknown(key, obj, prefix, source)
        cur = getattr(obj, k)
        if dataclasses.is_dataclass(cur):
            _merge_into(cur, v, key + ".", source)
        else:
            try:
                setattr(obj, k, _coerce_field(obj, k, v, key))
            except ConfigError as e:
                raise ConfigError(f"{source}: {e}") from None


def apply_override(cfg: TrainConfig, override: str) -> None:
    """Apply one ``dotted.key=value`` override to ``cfg`` in place (value parsed as YAML)."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: expected key=value (e.g. optim.lr=1e-4)")
    key, raw = override.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {override!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {override!r}: cannot parse the value as YAML ({e})") from None
    parts = key.split(".")
    obj: Any = cfg
    prefix = ""
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            raise _unknown(prefix + part, obj, prefix, "override")
        cur = getattr(obj, part)
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(cur):
                _merge_into(cur, value, prefix + part + ".", "override")
            else:
                setattr(obj, part, _coerce_field(obj, part, value, key))
            return
        if dataclasses.is_dataclass(cur):
            obj, prefix = cur, prefix + part + "."
            continue
        tp = _hints(type(obj))[part]
        if typing.get_origin(tp) is dict:
            sub = ".".join(parts[i + 1:])  # the rest is one mapping key (may hold dots)
            new = dict(cur)
            new[sub] = _coerce(value, typing.get_args(tp)[1], key)
            setattr(obj, part, new)
            return
        raise ConfigError(f"override {override!r}: {prefix + part!r} is a {_type_name(tp)}, "
                          f"it has no sub-key {parts[i + 1]!r}")


# ----------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------

def resolve_config_path(name_or_path: Union[str, os.PathLike]) -> Path:
    """A packaged config name (``"tiny_test"``) or a path -> an existing file."""
    s = str(name_or_path)
    p = Path(s)
    if p.suffix in (".yaml", ".yml") or os.sep in s or "/" in s:
        if not p.is_file():
            raise ConfigError(f"config file {s!r} does not exist")
        return p
    packaged = CONFIG_DIR / f"{s}.yaml"
    if packaged.is_file():
        return packaged
    names = sorted(f.stem for f in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config {s!r}: no such packaged config (have: {', '.join(names)}) and no file of that name")


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in ("tasks",):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def _read_yaml_tree(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise ConfigError(f"config {path}: `extends` cycle: {chain}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path}: invalid YAML ({e})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path}: expected a mapping at the top level, got {type(data).__name__}")
    base = data.pop("extends", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"config {path}: extends: expected a config name or path, got {base!r}")
    base_path = Path(base)
    if not base_path.is_absolute() and (path.parent / base_path).is_file():
        base_path = path.parent / base_path
    else:
        base_path = resolve_config_path(base)
    return _deep_merge(_read_yaml_tree(base_path, (*seen, path)), data)


def load_config(name_or_path: Union[str, os.PathLike, None] = None,
                overrides: Iterable[str] = ()) -> TrainConfig:
    """Defaults <- the YAML file (if any, with its ``extends`` chain) <- ``overrides``."""
    if name_or_path is None:
        cfg = TrainConfig()
    else:
        path = resolve_config_path(name_or_path)
        cfg = TrainConfig.from_dict(_read_yaml_tree(path), source=str(path))
    return cfg.with_overrides(overrides)


def save_config(cfg: TrainConfig, path: Union[str, os.PathLike]) -> Path:
    """Write the resolved config as YAML, atomically (temp file + os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            f.write(cfg.to_yaml())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def config_diff(a: TrainConfig, b: TrainConfig) -> list[str]:
    """Dotted keys whose values differ between two configs (``key: a -> b``)."""
    out: list[str] = []

    def walk(x: Any, y: Any, prefix: str) -> None:
        if isinstance(x, dict) and isinstance(y, dict) and not prefix.rstrip(".").endswith(
                ("tasks", "lr_multipliers", "config", "options")):
            for k in sorted(set(x) | set(y), key=str):
                walk(x.get(k), y.get(k), f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix[:-1]}: {x!r} -> {y!r}")

    walk(a.to_dict(), b.to_dict(), "")
    return out
