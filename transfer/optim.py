"""Optimizer and LR schedule for one stage, built from the parameters that train in it."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn
from timm.optim import param_groups_layer_decay, param_groups_weight_decay

from transfer.schedule import Stage


def param_groups(model: nn.Module, stage: Stage, weight_decay: float) -> list[dict]:
    """timm's groups (no weight decay on norms and biases; optional layer-wise decay), frozen
    parameters excluded, each group's ``lr`` set so that any LR scheduler scales it correctly."""
    if stage.layer_decay is not None:
        groups = param_groups_layer_decay(model, weight_decay=weight_decay, layer_decay=stage.layer_decay)
    else:
        groups = param_groups_weight_decay(model, weight_decay=weight_decay)
    groups = [g for g in groups if g["params"]]
    for group in groups:
        group["lr"] = stage.lr * group.pop("lr_scale", 1.0)
    return groups


def warmup_cosine(total_steps: int, warmup_steps: int, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warm-up, then cosine from 1 down to ``min_ratio``."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def build_optimizer(model: nn.Module, stage: Stage, optimizer_factory: Callable[..., torch.optim.Optimizer],
                    total_steps: int, steps_per_epoch: float) -> dict:
    """Lightning's ``configure_optimizers`` answer: optimizer plus a per-step scheduler."""
    weight_decay = getattr(optimizer_factory, "keywords", {}).get("weight_decay", 0.0)
    optimizer = optimizer_factory(param_groups(model, stage, weight_decay), lr=stage.lr)
    warmup = int(round(stage.warmup_epochs * steps_per_epoch))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total_steps, warmup, stage.min_lr_ratio))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
