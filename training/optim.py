"""AdamW with per-module learning-rate multipliers, and warmup + linear decay.

* :func:`param_groups` splits a model's trainable parameters into AdamW groups by
  (LR multiplier, weight decay): the multiplier of a parameter is that of the
  longest prefix in ``lr_multipliers`` that matches its name at a module boundary
  (``"encoder.layer.1"`` matches ``encoder.layer.1.attn.q.weight``, not
  ``encoder.layer.10...``), else 1.  With ``no_decay_1d`` (BERT's rule) 1-d
  parameters -- biases and LayerNorm weights -- get no weight decay.  Each group
  carries its ``lr_mult`` and ``lr = base_lr * lr_mult``.
* :func:`build_optimizer`: ``torch.optim.AdamW``, ``fused=True`` when the
  parameters are on CUDA, ``foreach=True`` otherwise.
* :func:`lr_factor` / :func:`build_scheduler`: the factor of optimizer step n
  (1-based) of T with W warmup steps is ``n / W`` for n <= W and
  ``(T - n + 1) / (T - W)`` after (a ``LambdaLR``; every group's LR is its own
  ``base_lr * lr_mult`` times the factor).
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR


def _matches(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def lr_multiplier_for(name: str, lr_multipliers: Mapping[str, float]) -> float:
    """The multiplier of parameter ``name``: the longest matching prefix's, else 1.0."""
    best, best_len = 1.0, -1
    for prefix, mult in lr_multipliers.items():
        if _matches(name, prefix) and len(prefix) > best_len:
            best, best_len = float(mult), len(prefix)
    return best


def param_groups(model: nn.Module, base_lr: float, weight_decay: float,
                 lr_multipliers: Optional[Mapping[str, float]] = None,
                 no_decay_1d: bool = True) -> list[dict[str, Any]]:
    """AdamW parameter groups of ``model``'s trainable parameters (see the module doc).

    Each group: ``params``, ``lr`` (base_lr * lr_mult), ``lr_mult``, ``weight_decay``,
    ``names`` (the parameter names, for reports).  A prefix in ``lr_multipliers`` that
    matches no parameter raises ValueError naming it (a typo would silently do nothing).
    Groups are ordered: multiplier 1.0 first, then by first appearance.
    """
    mults = dict(lr_multipliers or {})
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    unused = [p for p in mults if not any(_matches(n, p) for n in names)]
    if unused:
        tops = sorted({n.split(".")[0] for n in names})
        raise ValueError(f"lr_multipliers: prefix(es) {unused} match no trainable parameter of "
                         f"{type(model).__name__} (top-level modules: {tops})")
    groups: dict[tuple[float, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        mult = lr_multiplier_for(name, mults)
        decay = not (no_decay_1d and p.ndim <= 1)
        key = (mult, decay)
        if key not in groups:
            groups[key] = {"params": [], "names": [], "lr": base_lr * mult, "lr_mult": mult,
                           "weight_decay": weight_decay if decay else 0.0}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    if not groups:
        raise ValueError(f"param_groups: {type(model).__name__} has no trainable parameter")
    ordered = sorted(groups.items(), key=lambda kv: kv[0][0] != 1.0)  # stable: keeps first-seen order
    return [g for _, g in ordered]


def build_optimizer(model: nn.Module, lr: float, betas: Iterable[float] = (0.9, 0.98), eps: float = 1e-6,
                    weight_decay: float = 0.01, lr_multipliers: Optional[Mapping[str, float]] = None,
                    no_decay_1d: bool = True) -> torch.optim.AdamW:
    """torch.optim.AdamW over :func:`param_groups`; fused on CUDA, foreach otherwise."""
    groups = param_groups(model, lr, weight_decay, lr_multipliers, no_decay_1d)
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    kind = {"fused": True} if on_cuda else {"foreach": True}
    b1, b2 = tuple(betas)
    return torch.optim.AdamW(groups, lr=lr, betas=(b1, b2), eps=eps, weight_decay=weight_decay, **kind)


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """Schedule factor of optimizer step ``step`` (1-based): ``step / W`` during warmup,
    then ``(T - step + 1) / (T - W)``; 0 after step T."""
    if total_steps < 1:
        raise ValueError(f"lr_factor: total_steps: expected >= 1, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"lr_factor: warmup_steps: expected in [0, total_steps={total_steps}], got {warmup_steps}")
    if step > total_steps:  # the scheduler's value after the last step
        return 0.0
    if step <= warmup_steps:
        return max(0.0, step / warmup_steps)
    return min(1.0, max(0.0, (total_steps - step + 1) / (total_steps - warmup_steps)))


def build_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> LambdaLR:
    """LambdaLR such that optimizer step n (1-based) runs at ``lr_factor(n, W, T)``
    (the scheduler's counter is the number of steps taken, so its lambda is shifted by 1)."""
    lr_factor(1, warmup_steps, total_steps)  # validates the arguments
    return LambdaLR(optimizer, lambda i: lr_factor(i + 1, warmup_steps, total_steps))
