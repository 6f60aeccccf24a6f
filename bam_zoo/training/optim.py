"""Parameter groups and per-step learning-rate schedules (``LambdaLR`` or ``OneCycleLR``) for the LightningModule.
One factor for every param group, each from its own peak LR; PyTorch saves the step in checkpoints for resuming."""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from typing import Literal

import torch
from timm.optim import param_groups_weight_decay
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, LRScheduler, OneCycleLR

__all__ = ["SchedulerName", "param_groups", "create_lr_scheduler"]

SchedulerName = Literal["cosine", "step", "multistep", "onecycle", "constant"]


def param_groups(model: nn.Module, weight_decay: float, head: nn.Module | None = None, head_lr: float | None = None,
                 backbone_lr: float | None = None) -> list[dict]:
    """Parameter groups without weight decay on 1-d parameters (norms, biases), as timm's.
    With ``head``, its parameters get ``head_lr`` and the others ``backbone_lr`` (``None``: the optimizer's)."""
    no_decay = set(getattr(model, "no_weight_decay", lambda: set())())
    groups = param_groups_weight_decay(model, weight_decay, no_weight_decay_list=no_decay)
    if head is None:
        return [g for g in groups if g["params"]]
    head_ids = {id(p) for p in head.parameters()}
    split = []
    for group in groups:
        for is_head, lr in ((True, head_lr), (False, backbone_lr)):
            params = [p for p in group["params"] if (id(p) in head_ids) == is_head]
            if params:
                split.append({**group, "params": params, **({"lr": lr} if lr is not None else {})})
    return split


def create_lr_scheduler(
    optimizer: torch.optim.Optimizer, name: SchedulerName, total_steps: int, steps_per_epoch: int,
    warmup_epochs: float = 0.0, warmup_start_factor: float = 0.01, min_lr_ratio: float = 0.0,
    decay_epochs: float = 30.0, decay_rate: float = 0.1, decay_milestones: Sequence[float] = (),
) -> LRScheduler:
    """A per-step LR schedule with an optional linear warm-up, as ``ImageClassifier``'s same-named arguments say.
    ``step`` counts from the end of the warm-up, ``multistep`` from the start, ``onecycle`` rises from ``lr / 25``;
    ``total_steps`` and ``steps_per_epoch`` count optimizer steps."""
    total_steps = max(int(total_steps), 1)
    warmup = min(int(round(warmup_epochs * steps_per_epoch)), total_steps - 1)
    if name == "onecycle":
        max_lr = [g["lr"] for g in optimizer.param_groups]
        pct_start = warmup / total_steps if warmup > 0 else 0.3
        return OneCycleLR(optimizer, max_lr=max_lr, total_steps=total_steps, pct_start=pct_start)
    span, every = max(total_steps - warmup, 1), max(int(round(decay_epochs * steps_per_epoch)), 1)
    milestones = sorted(max(int(round(m * steps_per_epoch)) - warmup, 1) for m in decay_milestones)
    after_warmup = {  # factor of the peak LR, t steps after the warm-up
        "cosine": lambda t: min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, span) / span)),
        "step": lambda t: decay_rate ** (t // every),
        "multistep": lambda t: decay_rate ** bisect.bisect_right(milestones, t),
        "constant": lambda t: 1.0,
    }
    if name not in after_warmup:
        raise ValueError(f"unknown scheduler {name!r}; choose cosine, step, multistep, onecycle or constant")
    schedule = after_warmup[name]

    def factor(step: int) -> float:
        if step < warmup:
            return warmup_start_factor + (1 - warmup_start_factor) * step / warmup
        return schedule(step - warmup)

    return LambdaLR(optimizer, factor)
