"""What a run will do, fixed before its first fit: the `RunPlan`.

The config is resolved once, by the planning steps of `transfer.training.planner` (the data and
its split, the model and its input, the task, the augmentation the probe chose, the stages' epochs
after ``min_steps`` and the budget, their learning rates after the LR finder), into this typed,
immutable record. The run then executes it (`transfer.training.fit`), prints it at the start,
writes it to ``plan.json`` in the run folder and into every checkpoint (a resumed run continues the
same plan). It holds rules, not outcomes: a stage's ``epochs`` is its maximum, its ``patience`` and
``ends_by`` the rules that may stop it sooner; the epochs a stage ran are in results.json.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transfer.model.stage import Stage


@dataclass(frozen=True)
class DataPlan:
    """The images and how they are split and batched."""

    name: str  # the dataset's name (its folder, CSV, or source)
    images: int
    kind: str  # classes | tags | values (what the task reads the labels as)
    class_names: tuple[str, ...]  # classes, tags or regression targets, in the model's output order
    split_sizes: dict[str, int]  # images per split
    split_counts: dict[str, dict[str, int | float]]  # per class: images (per tag: positives; per target: mean)
    split: dict[str, float]  # data.split: test share of the images without a split, then val share of the rest
    split_from: str | None  # a run's split.csv the splits were read from (resuming, cross-validation)
    batch_size: int
    eval_batch_size: int
    sampler: str  # shuffle | balanced
    num_workers: int
    skipped_images: tuple[str, ...] = ()  # unreadable files left out (runtime.bad_images=skip)


@dataclass(frozen=True)
class ModelPlan:
    backbone: str  # the timm architecture
    weights: str  # where its pretrained weights came from (backbone.weights)
    input: dict[str, Any]  # size, mean, std, crop_pct, interpolation (input.*, resolved)
    model_kwargs: dict[str, Any]  # the other timm.create_model arguments


@dataclass(frozen=True)
class TaskPlan:
    name: str
    state: dict[str, Any]  # what the task knows before training (e.g. regression scaling)
    label_smoothing: float
    class_weights: tuple[float, ...] | None  # the loss's weight per class (task.class_weights=balanced)
    mixup: bool


@dataclass(frozen=True)
class AugmentPlan:
    name: str  # the augment option (cells, auto, none, ...)
    chosen_by: str  # who picked it: the data config's default, or augment= given
    train: tuple[dict[str, Any], ...] | None  # the training pipeline as _target_ nodes (None: eval transform)
    symmetries: tuple[str, ...]  # the flips and turns it applies (tta=auto averages over them)
    probe: dict[str, Any] | None = None  # augment=auto's evidence


@dataclass(frozen=True)
class RunPlan:
    """A run, as fixed before its first fit (see the module docstring)."""

    run_dir: str
    seed: int
    data: DataPlan
    model: ModelPlan
    task: TaskPlan
    augment: AugmentPlan
    stages: tuple[Stage, ...]
    trainable: tuple[str, ...]  # what each stage trains, in words (groups and parameter counts)
    monitor: dict[str, str]  # the metric that picks each stage's best checkpoint, and its mode
    min_steps: int  # schedule.min_steps: the fewest optimizer steps a default stage runs
    steps_per_epoch: int  # optimizer steps in one training epoch (per process)
    tta: str  # the run's own test: averaged over these test-time views
    processes: int  # training processes (devices x nodes)
    # Each later stage starts from the best epoch of the one before (schedule.restore_best); plans
    # written before it existed continued from the last epoch.
    restore_best: bool = False
    notes: tuple[str, ...] = ()  # why a value is not the config's: min_steps, the budget, the LR finder
    budget: dict[str, Any] | None = None  # budget.minutes: the costs measured and the epochs planned
    lr_find: dict[str, Any] | None = None  # the LR finder's suggestion and what it replaced
    resume: dict[str, Any] | None = None  # the checkpoint a resumed run continues: path, stage index and name
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def first_stage(self) -> int:
        """The stage the run starts in: 0, or the one a resumed checkpoint was written in."""
        return int(self.resume["stage_index"]) if self.resume else 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """The plan in a few lines, for the run's log."""
        data, model = self.data, self.model
        lines = [
            f"Plan (plan.json in {self.run_dir}):",
            f"  data '{data.name}': {data.images} images, {data.kind} {list(data.class_names)}; split "
            + ", ".join(f"{split} {size}" for split, size in data.split_sizes.items())
            + (
                f" (read from {data.split_from})"
                if data.split_from
                else f" (data.split: test {data.split['test']:g}, val {data.split['val']:g} of the rest)"
            ),
            f"  model {model.backbone} (weights: {model.weights}), input {model.input['size']}, "
            f"mean {model.input['mean']}, std {model.input['std']}",
            f"  task {self.task.name}; monitor {self.monitor['metric']} ({self.monitor['mode']}); test tta={self.tta}",
            f"  augmentation {self.augment.name} ({self.augment.chosen_by}): "
            + (
                ", ".join(str(n["_target_"]).rsplit(".", 1)[-1] for n in self.augment.train)
                if self.augment.train
                else "none (the evaluation transform)"
            ),
            f"  {len(self.stages)} stage(s), {self.steps_per_epoch} optimizer step(s) an epoch on "
            f"{self.processes} process(es):",
        ]
        for index, (stage, trainable) in enumerate(zip(self.stages, self.trainable, strict=True)):
            stops = [f"patience {stage.patience}, min_delta {stage.min_delta:.4g}"] if stage.patience else []
            if stage.ends_by is not None:
                stops.append(f"ends by {stage.ends_by:.0f}s")
            lines.append(
                f"    stage {index} '{stage.name}': at most {stage.epochs} epoch(s) at lr {stage.lr:g}"
                + (f", warm-up {stage.warmup_epochs:g} epoch(s)" if stage.warmup_epochs else "")
                + (", BatchNorm frozen" if stage.freeze_bn else "")
                + (", on cached features" if stage.feature_cache else "")
                + (f" ({', '.join(stops)})" if stops else "")
                + f"; {trainable}"
            )
        if self.restore_best and len(self.stages) > 1:
            lines.append("  each later stage starts from the best epoch of the stage before it")
        lines += [f"  note: {note}" for note in self.notes]
        if self.resume:
            lines.append(
                f"  resuming {self.resume['checkpoint']} in stage {self.first_stage} '{self.resume['stage_name']}'"
            )
        return "\n".join(lines)


def stage_from_dict(raw: dict[str, Any]) -> Stage:
    """A stage as `RunPlan.to_dict` wrote it (plan.json, a checkpoint's plan)."""
    known = {f.name for f in dataclasses.fields(Stage)}
    return Stage(**{k: v for k, v in raw.items() if k in known})


def plan_from_dict(raw: dict[str, Any]) -> RunPlan:
    """A plan as `RunPlan.to_dict` wrote it (plan.json, a checkpoint's ``transfer.plan``)."""
    augment = dict(raw["augment"])
    augment["train"] = tuple(augment["train"]) if augment.get("train") else None
    augment["symmetries"] = tuple(augment.get("symmetries") or ())
    data = {
        **raw["data"],
        "class_names": tuple(raw["data"]["class_names"]),
        "skipped_images": tuple(raw["data"].get("skipped_images") or ()),
    }
    task = {
        **raw["task"],
        "class_weights": tuple(raw["task"]["class_weights"]) if raw["task"].get("class_weights") is not None else None,
    }
    return RunPlan(
        **{
            **raw,
            "data": DataPlan(**data),
            "model": ModelPlan(**raw["model"]),
            "task": TaskPlan(**task),
            "augment": AugmentPlan(**augment),
            "stages": tuple(stage_from_dict(s) for s in raw["stages"]),
            "trainable": tuple(raw["trainable"]),
            "notes": tuple(raw.get("notes") or ()),
        }
    )


def load_plan(run_dir: str | Path) -> RunPlan:
    """The plan a run wrote to its folder (``plan.json``)."""
    return plan_from_dict(json.loads((Path(run_dir) / "plan.json").read_text()))
