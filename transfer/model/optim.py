"""Optimizer and learning-rate schedule for one stage, built from the parameters that train in it.

The parameter groups are timm's (no weight decay on norms and biases; optional layer-wise decay,
each group carrying its ``lr_scale``), the schedule timm's ``CosineLRScheduler`` stepped once per
optimizer step: a linear warm-up from ``lr / (warmup + 1)``, then a cosine from ``lr`` down to
``lr * min_lr_ratio``, every group's curve scaled by its ``lr_scale``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from timm.scheduler import CosineLRScheduler

from transfer.model.stage import Stage


def param_groups(model: nn.Module, stage: Stage, weight_decay: float) -> list[dict[str, Any]]:
    """timm's groups with frozen parameters left out, each at the stage's ``lr`` (timm's scheduler
    multiplies a group's ``lr_scale`` in whenever it sets the learning rate)."""
    if stage.layer_decay is not None:
        groups = param_groups_layer_decay(model, weight_decay=weight_decay, layer_decay=stage.layer_decay)
    else:
        groups = param_groups_weight_decay(model, weight_decay=weight_decay)
    groups = [g for g in groups if g["params"]]
    for group in groups:
        group["lr"] = stage.lr
    return groups


def cosine_schedule(
    optimizer: torch.optim.Optimizer, stage: Stage, total_steps: int, warmup_steps: int
) -> CosineLRScheduler:
    """The stage's schedule over ``total_steps`` optimizer steps, its learning rates already set for
    step 0 (step it with ``step_update(optimizer steps done)``)."""
    scheduler = CosineLRScheduler(
        optimizer,
        t_initial=max(1, total_steps - warmup_steps),
        lr_min=stage.lr * stage.min_lr_ratio,
        warmup_t=warmup_steps,
        warmup_lr_init=stage.lr / (warmup_steps + 1),
        warmup_prefix=True,
        t_in_epochs=False,
        cycle_limit=1,
    )
    scheduler.step_update(0)
    return scheduler


def build_optimizer(
    model: nn.Module,
    stage: Stage,
    optimizer_factory: Callable[..., torch.optim.Optimizer],
    total_steps: int,
    steps_per_epoch: float,
) -> dict[str, Any]:
    """Lightning's ``configure_optimizers`` answer: optimizer plus a per-step scheduler."""
    weight_decay = getattr(optimizer_factory, "keywords", {}).get("weight_decay", 0.0)
    optimizer = optimizer_factory(param_groups(model, stage, weight_decay), lr=stage.lr)
    warmup = int(round(stage.warmup_epochs * steps_per_epoch))
    scheduler = cosine_schedule(optimizer, stage, total_steps, warmup)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
