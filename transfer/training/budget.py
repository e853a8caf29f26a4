"""``budget.minutes=N``: fit the whole schedule, test included, into N minutes of wall time here.

Before the first stage, each stage's cost is measured on this machine with the real model and
real batches: a few forward + backward passes with exactly that stage's layers trainable, a
forward pass at evaluation batch size, and the decoding and augmentation of a training batch.
From those and the split sizes comes the time of one epoch of each stage (training and
validation; a head-only stage on cached features costs one feature extraction instead). If the
schedule does not fit in what is left of the budget, every stage's epochs are scaled down by the
same factor (at least one each), so the schedule keeps its shape. Each stage also gets a deadline
(``ends_by`` in the plan, seconds after the run's start): the budget less what the later stages and
the test need; while training it becomes Lightning's ``max_time``, so a slow epoch cannot push the
run past the budget.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from transfer.data.datamodule import ImageDataModule
from transfer.errors import TransferError
from transfer.model.module import ClassifierModule
from transfer.model.stage import Stage

log = logging.getLogger("transfer")

SAFETY = 0.9  # plan to this fraction of the time left (per-epoch overheads, noise)
RESERVE_SECONDS = 10  # process start-up and teardown the run cannot time itself
EPOCH_OVERHEAD = 0.5  # Lightning's loops, loader start-up and logging per epoch, measured on tiny data


@dataclass(frozen=True)
class StageCost:
    """Seconds per image on this machine for one stage."""

    train: float  # a training step (forward + backward), data loading included
    evaluate: float  # an evaluation forward pass
    cached: bool  # head-only on cached features: one extraction, epochs nearly free
    epoch: float = EPOCH_OVERHEAD  # seconds each epoch costs besides images: checkpoints, loop set-up


@dataclass(frozen=True)
class SplitSizes:
    train: int
    val: int
    test: int


def epoch_seconds(cost: StageCost, sizes: SplitSizes) -> float:
    if cost.cached:
        return cost.epoch
    return sizes.train * cost.train + sizes.val * cost.evaluate + cost.epoch


def stage_seconds(cost: StageCost, sizes: SplitSizes, epochs: int) -> float:
    fixed = (sizes.train + sizes.val) * cost.evaluate if cost.cached else 0.0
    return fixed + epochs * epoch_seconds(cost, sizes)


def test_seconds(costs: Sequence[StageCost], sizes: SplitSizes) -> float:
    return sizes.test * max(cost.evaluate for cost in costs)


def plan_epochs(stages: Sequence[Stage], costs: Sequence[StageCost], sizes: SplitSizes, seconds: float) -> list[int]:
    """Epochs per stage so that all stages fit in ``seconds``: the schedule's own when it fits,
    otherwise every stage scaled by the largest common factor that fits (at least 1 epoch each)."""

    def total(epochs: Sequence[int]) -> float:
        return sum(stage_seconds(c, sizes, e) for c, e in zip(costs, epochs))

    planned = [stage.epochs for stage in stages]
    if total(planned) <= seconds:
        return planned
    low, high = 0.0, 1.0
    for _ in range(40):  # bisect the common factor
        middle = (low + high) / 2
        if total([max(1, math.floor(middle * e)) for e in planned]) <= seconds:
            low = middle
        else:
            high = middle
    return [max(1, math.floor(low * e)) for e in planned]


def _train_batch(datamodule: ImageDataModule) -> tuple[torch.Tensor, torch.Tensor, float]:
    """A training batch through the training transform, and the seconds its decoding took."""
    dataset = datamodule.dataset("train")
    count = min(datamodule.batch_size, len(dataset))
    started = time.perf_counter()
    items = [dataset[i] for i in range(count)]
    seconds = (time.perf_counter() - started) / count
    return torch.stack([image for image, _ in items]), torch.tensor([label for _, label in items]), seconds


def measure_costs(
    module: ClassifierModule, datamodule: ImageDataModule, stages: Sequence[Stage], steps: int = 3
) -> list[StageCost]:
    """Time each stage's training step and the evaluation pass on real batches; the model's
    weights and BatchNorm statistics are restored afterwards, so the run is unchanged."""
    images, labels, load = _train_batch(datamodule)
    if module.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    saved = {name: tensor.clone() for name, tensor in module.state_dict().items()}
    # Every epoch writes last.ckpt (and the best one when it improves): weights plus AdamW's two
    # moments of the trainable ones, about three times the weights.
    started = time.perf_counter()
    torch.save(saved, io.BytesIO())
    epoch = EPOCH_OVERHEAD + 2 * 3 * (time.perf_counter() - started)
    workers = datamodule.num_workers
    costs = []
    try:
        module.eval()
        with torch.inference_mode():
            module(images)  # warm-up
            started = time.perf_counter()
            module(images)
            evaluate = (time.perf_counter() - started) / len(images)
        for index, stage in enumerate(stages):
            if stage.feature_cache:  # its epochs run on features: only the extraction counts
                costs.append(StageCost(train=0.0, evaluate=evaluate, cached=True, epoch=epoch))
                continue
            module.set_stage(stage, index)
            module.train()
            seconds = []
            for _ in range(steps + 1):  # the first step warms up (allocations)
                started = time.perf_counter()
                loss = module.task.loss(module(images), labels, None, 0.0)
                if loss.requires_grad:
                    loss.backward()
                seconds.append(time.perf_counter() - started)
                module.zero_grad(set_to_none=True)
            step = min(seconds[1:]) / len(images)
            # Loader workers decode in parallel with the step; without them, decoding adds to it.
            train = max(step, load / workers) if workers > 0 else step + load
            costs.append(StageCost(train=train, evaluate=evaluate, cached=False, epoch=epoch))
    finally:
        module.load_state_dict(saved)
        module.set_stage(stages[0], 0)
        module.train()
    return costs


def check_single_process(trainer: Any) -> None:
    """The plan is measured and made in each process: several processes could plan differently."""
    devices = trainer.get("devices", 1)
    several_devices = len(devices) > 1 if isinstance(devices, (list, tuple)) else str(devices) not in ("1", "auto")
    if several_devices or int(trainer.get("num_nodes") or 1) > 1 or "ddp" in str(trainer.get("strategy", "")):
        raise TransferError(
            "budget.minutes plans on one process; with several devices or nodes set "
            "each stage's epochs (schedule.stages.N.epochs) instead."
        )


def plan_budget(
    minutes: float, started: float, module: ClassifierModule, datamodule: ImageDataModule, stages: Sequence[Stage]
) -> tuple[list[Stage], dict[str, Any]]:
    """The stages shortened to fit in what is left of ``minutes`` since ``started`` (``time.perf_counter``),
    each with its deadline (``ends_by``); and the plan's record of the costs and epochs."""
    if minutes <= 0:
        raise TransferError(f"budget.minutes must be positive, not {minutes}.")
    total = 60.0 * minutes - RESERVE_SECONDS  # seconds after ``started`` by which the test must be done
    sizes = SplitSizes(*(len(datamodule.splits[s]) for s in ("train", "val", "test")))
    costs = measure_costs(module, datamodule, stages)
    test = test_seconds(costs, sizes)
    left = started + total - time.perf_counter()
    available = SAFETY * (left - test)
    epochs = plan_epochs(stages, costs, sizes, available)
    planned = [stage_seconds(c, sizes, e) for c, e in zip(costs, epochs, strict=True)]
    shortened = [
        dataclasses.replace(stage, epochs=e, ends_by=round(total - sum(planned[i + 1 :]) - test, 3))
        for i, (stage, e) in enumerate(zip(stages, epochs, strict=True))
    ]
    report = {
        "minutes": minutes,
        "seconds_left_at_plan": round(left, 1),
        "epochs": epochs,
        "planned_stage_seconds": [round(s, 1) for s in planned],
        "planned_test_seconds": round(test, 1),
        "seconds_per_image": [
            {"train": round(c.train, 5), "evaluate": round(c.evaluate, 5), "cached": c.cached} for c in costs
        ],
        "seconds_per_epoch_overhead": round(costs[0].epoch, 2),
    }
    log.info(
        "budget.minutes=%g: %.0fs left; stages planned at %s epoch(s), %s s, test %.0f s",
        minutes,
        left,
        epochs,
        [round(s) for s in planned],
        test,
    )
    if sum(planned) > available:
        log.warning(
            "budget.minutes=%g is shorter than one epoch of every stage (%.0f s planned, %.0f s "
            "available): each stage stops at its time limit.",
            minutes,
            sum(planned),
            available,
        )
    return shortened, report


def seconds_until(ends_by: float | None, started: float) -> float | None:
    """A stage's deadline as Lightning's ``max_time`` when it starts: what is left of it, at least 1 s."""
    return None if ends_by is None else max(1.0, started + ends_by - time.perf_counter())
