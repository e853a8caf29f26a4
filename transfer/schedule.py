"""The freezing schedule: a list of stages, each trained by its own ``Trainer.fit``.

Why one fit per stage: DDP registers, when it wraps the model, only the parameters that
require gradients at that moment. Parameters unfrozen later in the same fit are never
all-reduced, and the replicas drift apart silently (Lightning's BaseFinetuning has this
problem). A fresh fit per stage re-wraps the model after every change of what trains, builds the
optimizer and LR scheduler from exactly the parameters that train in that stage (a scheduler
built before a param group is added would ignore it), and lets a resumed run re-apply the
stage recorded in its checkpoint before training continues.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields, replace
from typing import Any, Iterable, Mapping

from transfer.errors import ScheduleError

log = logging.getLogger("transfer")


@dataclass(frozen=True)
class Stage:
    name: str
    epochs: int
    unfreeze: int | str = 0      # 0: head only; N: head + last N blocks; "all"
    lr: float = 1e-3             # peak LR of this stage (later stages typically 10-100x lower)
    warmup_epochs: float = 0.0   # linear warm-up at the start of the stage
    min_lr_ratio: float = 0.01   # cosine decay down to lr * min_lr_ratio
    layer_decay: float | None = None  # timm layer-wise LR decay inside the stage (e.g. 0.7)
    freeze_bn: bool = False      # keep BatchNorm statistics frozen in unfrozen blocks too
    patience: int | None = None  # stop the stage after this many epochs without a better val metric
    # At least this many optimizer steps (null: the schedule's min_steps): on a small dataset an epoch
    # is a step or two, and a schedule written in epochs would hardly train (`with_min_steps`).
    min_steps: int | None = None


def parse_stages(stages: Iterable[Mapping[str, Any]]) -> list[Stage]:
    known = {f.name for f in fields(Stage)}
    parsed = []
    for index, raw in enumerate(stages):
        raw = dict(raw)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ScheduleError(f"Stage {index + 1} has unknown key(s) {unknown}; known: {sorted(known)}.")
        raw.setdefault("name", f"stage{index + 1}")
        stage = Stage(**raw)
        if stage.epochs < 1 or stage.lr <= 0:
            raise ScheduleError(f"Stage '{stage.name}' needs epochs >= 1 and lr > 0.")
        if stage.patience is not None and stage.patience < 1:
            raise ScheduleError(f"Stage '{stage.name}': patience must be >= 1 epoch, or null (no early stop).")
        parsed.append(stage)
    if not parsed:
        raise ScheduleError("The schedule has no stages.")
    if len({s.name for s in parsed}) != len(parsed):
        raise ScheduleError("Stage names must be unique; they name checkpoints and log rows.")
    return parsed


def with_min_steps(stages: Iterable[Stage], steps_per_epoch: int, default: int = 0) -> list[Stage]:
    """The stages with enough epochs for their ``min_steps`` (``default`` where a stage sets none) at
    ``steps_per_epoch`` optimizer steps per epoch."""
    lengthened = []
    for stage in stages:
        min_steps = stage.min_steps if stage.min_steps is not None else default
        needed = math.ceil(min_steps / max(1, steps_per_epoch))
        if needed > stage.epochs:
            log.info("Stage '%s': %d epoch(s) of %d step(s) are fewer than min_steps=%d: %d epochs.",
                     stage.name, stage.epochs, steps_per_epoch, min_steps, needed)
            stage = replace(stage, epochs=needed)
        lengthened.append(stage)
    return lengthened
