"""A stage of the freezing schedule: what trains, at what learning rate, for how long at most.

A schedule is a list of stages, each trained by its own ``Trainer.fit``. Why one fit per stage:
DDP registers, when it wraps the model, only the parameters that require gradients at that
moment. Parameters unfrozen later in the same fit are never all-reduced, and the replicas drift
apart silently (Lightning's BaseFinetuning has this problem). A fresh fit per stage re-wraps the
model after every change of what trains, builds the optimizer and LR scheduler from exactly the
parameters that train in that stage (a scheduler built before a param group is added would ignore
it), and lets a resumed run re-apply the stage recorded in its checkpoint before training continues.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields
from typing import Any

from transfer.errors import ScheduleError


@dataclass(frozen=True)
class Stage:
    """One stage's rules, as ``schedule.stages.N`` names them (and the run's plan fixes them)."""

    name: str
    epochs: int  # at most this many epochs (a plateau or a deadline may end it sooner)
    unfreeze: int | str = 0  # 0: head only; N: head + last N blocks; "all"
    lr: float = 1e-3  # peak LR of this stage (later stages typically 10-100x lower)
    warmup_epochs: float = 0.0  # linear warm-up at the start of the stage
    min_lr_ratio: float = 0.01  # cosine decay down to lr * min_lr_ratio
    layer_decay: float | None = None  # timm layer-wise LR decay inside the stage (e.g. 0.7)
    freeze_bn: bool = False  # keep BatchNorm statistics frozen in unfrozen blocks too
    # Stop after this many epochs without a better monitored metric; "auto": chosen from the
    # validation set's size (`transfer.training.stopping`, the plan holds the number); null: never.
    patience: int | str | None = None
    # Set by the plan, not in schedule configs:
    min_delta: float = 0.0  # the smallest change of the monitored metric that counts (schedule.min_delta)
    feature_cache: bool = False  # a head-only stage that trains on cached backbone features
    ends_by: float | None = None  # seconds after the run's start by which the stage stops (budget)


# What a schedule config may set per stage; every packaged schedule sets each of them.
STAGE_KEYS = tuple(f.name for f in fields(Stage) if f.name not in ("min_delta", "feature_cache", "ends_by"))


def parse_stages(stages: Iterable[Mapping[str, Any]]) -> list[Stage]:
    parsed = []
    for index, raw in enumerate(stages):
        raw = dict(raw)
        unknown = sorted(set(raw) - set(STAGE_KEYS))
        if unknown:
            raise ScheduleError(f"schedule.stages.{index} has unknown key(s) {unknown}; known: {list(STAGE_KEYS)}.")
        raw.setdefault("name", f"stage{index}")
        stage = Stage(**raw)
        if stage.epochs < 1 or stage.lr <= 0:
            raise ScheduleError(f"Stage {index} '{stage.name}' needs epochs >= 1 and lr > 0.")
        if (
            stage.patience is not None
            and stage.patience != "auto"
            and (not isinstance(stage.patience, int) or stage.patience < 1)
        ):
            raise ScheduleError(
                f"Stage {index} '{stage.name}': patience must be >= 1 epoch, auto (from the validation set's "
                "size), or null (every epoch runs)."
            )
        parsed.append(stage)
    if not parsed:
        raise ScheduleError("The schedule has no stages.")
    if len({s.name for s in parsed}) != len(parsed):
        raise ScheduleError("Stage names must be unique; they name checkpoints and log rows.")
    return parsed
