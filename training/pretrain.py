"""The pretraining model (backbone + objectives), UNITER-style task mixing, and the
builder the training loop uses.

* :class:`PretrainModel` -- ``forward(batch, task) -> ObjectiveResult``: runs the
  backbone once on the batch (optionally padding-free) and the task's objectives on
  its output; a task maps to one or more objectives (UNITER's ``"itm"`` = ITM + WRA).
  Parameters are ``backbone.*`` and ``objectives.<name>.*``;
  :meth:`PretrainModel.official_head_keys` maps the head parameters to the official
  checkpoints' names (``cls.predictions.*``, ``itm_output.*``, ``feat_regress.*``, ...)
  and :meth:`PretrainModel.load_official_heads` loads them from an official state_dict.
* :class:`TaskMixer` -- one task per gradient-accumulation group, drawn with the given
  ratios from a counter-based generator keyed by (seed, group index): every rank with
  the same seed and ratios draws the same task for the same group without any
  communication, and a resumed run continues the same sequence.
* :func:`build_pretrain_model` -- backbone + the objectives of a list of task names,
  per model (:data:`MODEL_TASKS`).

Tasks per model (objectives in brackets; ``"a+b"`` runs the objectives of a and b on
one batch, e.g. VisualBERT's and ViLBERT's joint losses):

* uniter: mlm [mlm], itm [itm, wra], mrfr [mrfr], mrc [mrc], mrc-kl [mrc-kl]
* visualbert: mlm [mlm], sip [sip]  (HF's pretraining loss is ``mlm+sip``)
* vilbert: mlm [mlm], masked_multimodal [masked_multimodal], alignment [alignment]
  (the official loss is ``mlm+masked_multimodal+alignment``)
* vlbert: mlm [mlm], masked_roi [masked_roi], itm [itm]  (the official base recipe is
  ``mlm+masked_roi``)

DDP note: with task mixing a step leaves the other tasks' heads unused, so wrap with
``find_unused_parameters=True`` (or all-reduce gradients by hand as UNITER does).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from vlfast.data.batch import VLBatch
from vlfast.models.base import ModelConfig
from vlfast.training import objectives as O
from vlfast.training.distributed import global_mean_scales
from vlfast.training.objectives import ObjectiveResult

_MASK64 = (1 << 64) - 1
DEFAULT_REGION_CLASSES = 1601   # Visual Genome's 1600 detector classes + background (all official heads)


# ----------------------------------------------------------------------------------
# Pretraining model
# ----------------------------------------------------------------------------------

@dataclass
class HeadLoadReport:
    """What :meth:`PretrainModel.load_official_heads` did: official keys loaded,
    official keys our heads expected but the source lacks, and source keys under our
    heads' official prefixes that nothing of ours took (tensors tied to the backbone,
    like the MLM decoder, are not counted)."""
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


class PretrainModel(nn.Module):
    """A backbone with pretraining objectives.

    Args:
        backbone: one of the four models.
        objectives: name -> :class:`~vlfast.training.objectives.Objective` (names are
            ``nn.ModuleDict`` keys: no dots).
        tasks: task name -> objective names run on that task's batches (default: each
            objective is a task of its own name).
        padding_free: run the backbone on the packed real tokens.
    """

    def __init__(self, backbone: nn.Module, objectives: Mapping[str, O.Objective],
                 tasks: Optional[Mapping[str, Sequence[str]]] = None, *, padding_free: bool = False):
        super().__init__()
        O.model_type(backbone)
        if not objectives:
            raise ValueError("PretrainModel: objectives: expected at least one objective, got none")
        for name, obj in objectives.items():
            if not isinstance(obj, O.Objective):
                raise TypeError(f"PretrainModel: objectives[{name!r}]: expected an Objective, "
                                f"got {type(obj).__name__}")
        self.backbone = backbone
        self.objectives = nn.ModuleDict(dict(objectives))
        if tasks is None:
            tasks = {name: (name,) for name in objectives}
        self.tasks: dict[str, tuple[str, ...]] = {}
        for task, names in tasks.items():
            names = (names,) if isinstance(names, str) else tuple(names)
            unknown = [n for n in names if n not in self.objectives]
            if not names or unknown:
                raise ValueError(f"PretrainModel: tasks[{task!r}]: expected objective names among "
                                 f"{sorted(self.objectives)}, got {list(names)}")
            self.tasks[task] = names
        self.padding_free = bool(padding_free)

    @property
    def task_names(self) -> list[str]:
        return list(self.tasks)

    def gradient_checkpointing_enable(self) -> None:
        """Checkpoint the backbone's encoder layers in training."""
        self.backbone.gradient_checkpointing_enable()

    def gradient_checkpointing_disable(self) -> None:
        self.backbone.gradient_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.backbone.is_gradient_checkpointing

    def encode(self, batch: VLBatch) -> Any:
        """The backbone's output for ``batch`` (run once per batch)."""
        return self.backbone(**batch.model_inputs(self.backbone, padding_free=self.padding_free))

    def forward(self, batch: VLBatch, task: str) -> ObjectiveResult:
        """Run the backbone once and the objectives of ``task``.

        Returns an ObjectiveResult: loss = the sum of the objectives' losses; metrics
        ``"<objective>/<metric>"`` (e.g. ``mlm/loss``, ``mlm/acc``, ``wra/ot_pos``);
        count = the first objective's count (its loss units: masked words, regions or
        pairs).  Under the training loop's DDP (:func:`distributed.global_loss_mean`)
        each objective's mean is rescaled to its share of the mean over every rank's
        units (one all-reduce of the counts per batch), so the ranks' averaged gradient
        is that of one process on their joint batch."""
        names = self.tasks.get(task)
        if names is None:
            raise ValueError(f"PretrainModel.forward: task: expected one of {self.task_names}, got {task!r}")
        if not isinstance(batch, VLBatch):
            raise TypeError(f"PretrainModel.forward: batch: expected a VLBatch, got {type(batch).__name__}")
        out = self.encode(batch)
        results = [self.objectives[name](self.backbone, batch, out) for name in names]
        metrics: dict[str, float] = {}
        for name, r in zip(names, results):
            metrics.update({f"{name}/{k}": v for k, v in r.metrics.items()})
        losses = [r.loss for r in results]
        scales = global_mean_scales([int(r.count) for r in results], losses[0].device)
        if scales is not None:
            losses = [l * scales[i].to(l.dtype) for i, l in enumerate(losses)]
        loss = losses[0]
        for l in losses[1:]:
            loss = loss + l
        return ObjectiveResult(loss, metrics, results[0].count)

    # -- official head names -------------------------------------------------------

    def official_head_keys(self) -> dict[str, str]:
        """Our state_dict key (``objectives.<name>.<local>``) -> the official key.
        Heads tied to the backbone (the MLM decoder, UNITER's feat_regress weight) are
        the backbone's and not listed."""
        keys: dict[str, str] = {}
        for name, obj in self.objectives.items():
            for local, official in obj.official_keys().items():
                keys[f"objectives.{name}.{local}"] = official
        return keys

    def official_head_state_dict(self) -> dict[str, Tensor]:
        """The heads' tensors under their official names."""
        sd = self.state_dict()
        return {official: sd[ours] for ours, official in self.official_head_keys().items()}

    def load_official_heads(self, state_dict: Mapping[str, Tensor], strict: bool = False) -> HeadLoadReport:
        """Copy the head tensors of an official checkpoint (``module.`` prefixes are
        stripped) into our objectives.  ``strict``: a missing head key or a shape
        mismatch raises; shape mismatches always raise, naming the key and shapes."""
        src = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state_dict.items()}
        keys = self.official_head_keys()
        own = self.state_dict()
        report = HeadLoadReport()
        with torch.no_grad():
            for ours, official in keys.items():
                if official not in src:
                    if official not in report.missing:
                        report.missing.append(official)
                    continue
                t = src[official]
                if tuple(t.shape) != tuple(own[ours].shape):
                    raise ValueError(f"PretrainModel.load_official_heads: {official}: expected shape "
                                     f"{tuple(own[ours].shape)} (ours: {ours}), got {tuple(t.shape)}")
                own[ours].copy_(t.to(own[ours].dtype))
                if official not in report.loaded:
                    report.loaded.append(official)
        prefixes = tuple(sorted({official for obj in self.objectives.values() for _, official in obj.official}))
        taken = set(keys.values()) | {k for obj in self.objectives.values() for k in obj.official_tied}
        report.unexpected = sorted(k for k in src if k.startswith(prefixes) and k not in taken)
        if strict and report.missing:
            raise ValueError(f"PretrainModel.load_official_heads: state_dict: expected every head key, "
                             f"missing {report.missing}")
        return report


# ----------------------------------------------------------------------------------
# Task mixing
# ----------------------------------------------------------------------------------

def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class TaskMixer:
    """UNITER-style task mixing: one task per gradient-accumulation group, task t drawn
    with probability ratios[t] / sum(ratios).

    The draw for group g is a pure function of (seed, g) (a SplitMix64 hash of both,
    names in sorted order), so every rank given the same ``ratios`` and ``seed`` gets
    the same task for the same group with no communication, and resuming at group g
    continues the same sequence.  Iterate it (``next(mixer)`` = the next group's task)
    or ask :meth:`task_at`; :meth:`state_dict` holds the position.
    """

    def __init__(self, ratios: Mapping[str, float], seed: int = 0):
        if not isinstance(ratios, Mapping) or not ratios:
            raise ValueError(f"TaskMixer: ratios: expected a non-empty mapping task -> ratio, got {ratios!r}")
        for name, r in ratios.items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"TaskMixer: ratios: expected task names as non-empty strings, got {name!r}")
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r < 0:
                raise ValueError(f"TaskMixer: ratios[{name!r}]: expected a finite number >= 0, got {r!r}")
        total = float(sum(ratios.values()))
        if total <= 0:
            raise ValueError(f"TaskMixer: ratios: expected at least one positive ratio, got {dict(ratios)}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"TaskMixer: seed: expected an int, got {seed!r}")
        self.ratios = {k: float(ratios[k]) for k in sorted(ratios)}
        self.seed = seed
        self.names = [k for k, r in self.ratios.items() if r > 0]
        acc, self._cum = 0.0, []
        for k in self.names:
            acc += self.ratios[k] / total
            self._cum.append(acc)
        self._cum[-1] = 1.0
        self.group = 0

    @property
    def probabilities(self) -> dict[str, float]:
        total = sum(self.ratios.values())
        return {k: r / total for k, r in self.ratios.items()}

    def task_at(self, group: int) -> str:
        """The task of gradient-accumulation group ``group`` (>= 0)."""
        if isinstance(group, bool) or not isinstance(group, int) or group < 0:
            raise ValueError(f"TaskMixer.task_at: group: expected an int >= 0, got {group!r}")
        h = _splitmix64(_splitmix64(self.seed & _MASK64) ^ group)
        u = (h >> 11) * (1.0 / (1 << 53))
        for name, c in zip(self.names, self._cum):
            if u < c:
                return name
        return self.names[-1]

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        task = self.task_at(self.group)
        self.group += 1
        return task

    def state_dict(self) -> dict[str, Any]:
        return {"group": self.group, "seed": self.seed, "ratios": dict(self.ratios)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue at ``state["group"]``; the seed and ratios must be the saved ones."""
        for key in ("group", "seed", "ratios"):
            if key not in state:
                raise ValueError(f"TaskMixer.load_state_dict: state: expected key {key!r}, got {sorted(state)}")
        if state["seed"] != self.seed or dict(state["ratios"]) != self.ratios:
            raise ValueError(f"TaskMixer.load_state_dict: state: expected seed {self.seed} and ratios "
                             f"{self.ratios}, got seed {state['seed']} and ratios {dict(state['ratios'])}")
        group = state["group"]
        if isinstance(group, bool) or not isinstance(group, int) or group < 0:
            raise ValueError(f"TaskMixer.load_state_dict: state['group']: expected an int >= 0, got {group!r}")
        self.group = group


# ----------------------------------------------------------------------------------
# Building
# ----------------------------------------------------------------------------------

MODEL_TASKS: dict[str, dict[str, tuple[str, ...]]] = {
    "uniter": {"mlm": ("mlm",), "itm": ("itm", "wra"), "mrfr": ("mrfr",), "mrc": ("mrc",),
               "mrc-kl": ("mrc-kl",)},
    "visualbert": {"mlm": ("mlm",), "sip": ("sip",)},
    "vilbert": {"mlm": ("mlm",), "masked_multimodal": ("masked_multimodal",), "alignment": ("alignment",)},
    "vlbert": {"mlm": ("mlm",), "masked_roi": ("masked_roi",), "itm": ("itm",)},
}


def _model_module(model_name: str):
    from vlfast.models import uniter, vilbert, visualbert, vlbert
    mods = {"uniter": uniter, "visualbert": visualbert, "vilbert": vilbert, "vlbert": vlbert}
    if model_name not in mods:
        raise ValueError(f"build_pretrain_model: model_name: expected one of {sorted(mods)}, got {model_name!r}")
    return mods[model_name]


def make_config(model_name: str, config: Union[ModelConfig, Mapping[str, Any], str, None]) -> ModelConfig:
    """A model config from a config object, a size name (``"small"``, ``"base"``,
    ``"large"``), a mapping of fields (an optional ``"size"`` key picks the preset the
    other fields override; a ``"model_type"`` key must name this model), or None
    (base)."""
    cls = _model_module(model_name).CONFIG_CLASS
    if isinstance(config, ModelConfig):
        if not isinstance(config, cls):
            raise ValueError(f"build_pretrain_model: config: expected a {cls.__name__} for {model_name!r}, "
                             f"got {type(config).__name__}")
        return config
    if config is None or isinstance(config, str):
        size = config or "base"
        if size not in ("small", "base", "large") or not hasattr(cls, size):
            raise ValueError(f"build_pretrain_model: config: expected a size among 'small', 'base', 'large', "
                             f"a mapping of {cls.__name__} fields or a config, got {config!r}")
        return getattr(cls, size)()
    if isinstance(config, Mapping):
        d = dict(config)
        mt = d.pop("model_type", model_name)
        if mt != model_name:
            raise ValueError(f"build_pretrain_model: config['model_type']: expected {model_name!r}, got {mt!r}")
        size = d.pop("size", "base")
        base = make_config(model_name, size)
        try:
            return base.replace(**d)
        except TypeError as e:
            raise ValueError(f"build_pretrain_model: config: unknown {cls.__name__} fields in {sorted(d)} "
                             f"({e})") from None
    raise ValueError(f"build_pretrain_model: config: expected a {cls.__name__}, a size name, a mapping or None, "
                     f"got {type(config).__name__}")


def task_objectives(model_name: str, task: str, wra: bool = True) -> tuple[str, ...]:
    """The objective names of ``task`` for ``model_name`` (``"a+b"`` joins tasks)."""
    table = MODEL_TASKS[model_name]
    names: list[str] = []
    for part in task.split("+"):
        if part not in table:
            raise ValueError(f"build_pretrain_model: tasks: expected task names among {sorted(table)} for "
                             f"{model_name!r} (joined with '+' to run several on one batch), got {task!r}")
        for n in table[part]:
            if n == "wra" and not wra:
                continue
            if n not in names:
                names.append(n)
    return tuple(names)


def build_objective(model_name: str, name: str, config: ModelConfig, *, num_region_classes: int,
                    itm_ot_lambda: float, wra_beta: float, wra_iters: int, mrc_skip_background: bool,
                    mrc_kl_reduction: str, alignment_dropout: float,
                    shared_region_head: Optional[O.RegionClassificationHead]) -> O.Objective:
    """One objective with the head sizes and official names of ``model_name``."""
    c = config
    eps, std = float(c.layer_norm_eps), float(c.initializer_range)
    if name == "mlm":
        prefix = "vlbert.mlm_head.predictions." if model_name == "vlbert" else "cls.predictions."
        return O.MaskedLanguageModeling(O.text_width(c), c.vocab_size, eps, std, official_prefix=prefix)
    if name == "itm":
        official = "vlbert.relationsip_head.caption_image_relationship" if model_name == "vlbert" else "itm_output"
        return O.ImageTextMatching(O.pooled_width(c), std, official_name=official)
    if name == "sip":
        return O.SentenceImagePrediction(O.pooled_width(c), std)
    if name == "alignment":
        return O.AlignmentPrediction(O.pooled_width(c), alignment_dropout, std)
    if name == "wra":
        return O.WordRegionAlignment(itm_ot_lambda, beta=wra_beta, n_iters=wra_iters)
    if name == "mrfr":
        return O.MaskedRegionFeatureRegression(O.visual_width(c), O.feature_dim(c), eps, std,
                                               tied=model_name != "vlbert")
    if name == "mrc":
        return O.MaskedRegionClassification(O.visual_width(c), num_region_classes, eps, std,
                                            skip_background=mrc_skip_background, head=shared_region_head)
    if name == "mrc-kl":
        return O.MaskedRegionClassificationKL(O.visual_width(c), num_region_classes, eps, std,
                                              reduction=mrc_kl_reduction, head=shared_region_head)
    if name == "masked_multimodal":
        return O.MaskedMultimodalModeling(O.visual_width(c), num_region_classes, eps, std)
    if name == "masked_roi":
        return O.MaskedRoIClassification(O.visual_width(c), num_region_classes, std)
    raise ValueError(f"build_objective: name: expected an objective of {model_name!r}, got {name!r}")


def build_pretrain_model(model_name: str, config: Union[ModelConfig, Mapping[str, Any], str, None] = None,
                         tasks: Sequence[str] = ("mlm",), *, backbone: Optional[nn.Module] = None,
                         num_region_classes: int = DEFAULT_REGION_CLASSES, padding_free: bool = False,
                         itm_ot_lambda: float = 0.1, wra: bool = True, wra_beta: float = 0.5, wra_iters: int = 50,
                         mrc_skip_background: bool = True, mrc_kl_reduction: str = "elements",
                         alignment_dropout: float = 0.1) -> PretrainModel:
    """A :class:`PretrainModel` for ``model_name`` ("uniter", "visualbert", "vilbert",
    "vlbert") with the objectives of ``tasks`` (see :data:`MODEL_TASKS`; ``"a+b"`` runs
    both on one batch).

    Args:
        config: the backbone config (see :func:`make_config`); ignored sizes come from
            ``backbone.config`` when a backbone is given.
        backbone: an existing backbone (e.g. ``Uniter.from_bert(...)``); default: a new
            one from ``config``.
        num_region_classes: C of the region classification heads (the detector's
            classes, background included; 1601 for the bottom-up-attention features).
        itm_ot_lambda / wra / wra_beta / wra_iters: UNITER's WRA term of the ITM task.
        mrc_skip_background: MRC's targets ignore class 0 (UNITER).
        mrc_kl_reduction: "elements" (UNITER) or "regions".
        alignment_dropout: ViLBERT's dropout before the alignment head.
    UNITER's MRC and MRC-kl share one ``region_classifier`` head, as officially.
    """
    module = _model_module(model_name)
    if backbone is None:
        cfg = make_config(model_name, config)
        backbone = module.MODEL_CLASS(cfg)
    else:
        if O.model_type(backbone) != model_name:
            raise ValueError(f"build_pretrain_model: backbone: expected a {model_name} backbone, got "
                             f"{type(backbone).__name__} ({backbone.config.model_type})")
        cfg = backbone.config
    if isinstance(tasks, str):
        tasks = [tasks]
    if not tasks:
        raise ValueError(f"build_pretrain_model: tasks: expected at least one task among "
                         f"{sorted(MODEL_TASKS[model_name])}, got {list(tasks)}")
    if isinstance(num_region_classes, bool) or not isinstance(num_region_classes, int) or num_region_classes < 2:
        raise ValueError(f"build_pretrain_model: num_region_classes: expected an int >= 2, "
                         f"got {num_region_classes!r}")
    task_map = {t: task_objectives(model_name, t, wra) for t in tasks}
    names = list(dict.fromkeys(n for ns in task_map.values() for n in ns))
    shared = None
    if "mrc" in names or "mrc-kl" in names:
        shared = O.RegionClassificationHead(O.visual_width(cfg), num_region_classes, float(cfg.layer_norm_eps))
        from vlfast.models.layers import init_bert_weights
        init_bert_weights(shared, float(cfg.initializer_range))
    objs = {n: build_objective(model_name, n, cfg, num_region_classes=num_region_classes,
                               itm_ot_lambda=itm_ot_lambda, wra_beta=wra_beta, wra_iters=wra_iters,
                               mrc_skip_background=mrc_skip_background, mrc_kl_reduction=mrc_kl_reduction,
                               alignment_dropout=alignment_dropout, shared_region_head=shared)
            for n in names}
    return PretrainModel(backbone, objs, task_map, padding_free=padding_free)


__all__ = ["PretrainModel", "HeadLoadReport", "TaskMixer", "MODEL_TASKS", "DEFAULT_REGION_CLASSES",
           "build_pretrain_model", "build_objective", "make_config", "task_objectives"]
