"""The planning steps: each resolves a part of the config into the run's `RunPlan`, before any fit.

In order (each step's randomness is seeded, so a seed gives one plan):

1. **data**: the images and their labels as the task reads them, checked decodable (or, resuming,
   the first run's ``split.csv``), and their split (`transfer.data.splits`), written to ``split.csv``;
2. **model**: the timm backbone with its new head, and its input size and normalisation;
3. **stages**: the schedule's stages, their epochs raised to ``schedule.min_steps`` optimizer steps
   where the schedule gave them (an ``epochs`` set in the overrides runs as written);
4. **task**: what it learns from the training split before training (e.g. regression scaling), and
   the class weights of the loss;
5. **augmentation**: the data config's pipeline, or ``augment=auto``'s probe (`transfer.augment.probe`);
6. **budget** (``budget.minutes``): each stage's cost measured, its epochs and deadline set;
7. **learning rate** (``lr_find.enabled``): the first stage's lr from Lightning's finder.

A resumed run whose settings are those of its checkpoint continues the checkpoint's own plan
(stages, augmentation) instead of planning again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from transfer.augment.probe import ProbeData, choose_augmentation, settings_from
from transfer.augment.symmetries import symmetries_of
from transfer.config.compose import as_dict
from transfer.data.balance import check_split_classes, class_weights_for
from transfer.data.datamodule import ImageDataModule, steps_per_epoch
from transfer.data.manifest import MANIFEST, load_manifest, manifest_next_to, write_manifest
from transfer.data.resolution import size_for_images
from transfer.data.scan import check_images
from transfer.data.splits import split_indices
from transfer.data.table import ImageTable, subsample
from transfer.data.transforms import eval_transform, resolve_input, train_transform
from transfer.errors import TransferError
from transfer.model.freezing import plan_trainable
from transfer.model.module import ClassifierModule
from transfer.model.stage import Stage, parse_stages
from transfer.model.tta import tta_symmetries
from transfer.tasks import Classification, Task
from transfer.training.budget import check_single_process, plan_budget
from transfer.training.callbacks import state_digests
from transfer.training.feature_cache import FeatureDataModule
from transfer.training.lr_find import find_stage_lr
from transfer.training.plan import AugmentPlan, DataPlan, ModelPlan, RunPlan, TaskPlan, stage_from_dict
from transfer.training.resume import check_same_run, read_resume, run_shape
from transfer.training.stopping import PlateauRule, plateau_rule

log = logging.getLogger("transfer")


@dataclass
class Planned:
    """A plan and what it is executed with."""

    plan: RunPlan
    module: ClassifierModule
    datamodule: ImageDataModule
    table: ImageTable
    run_shape: dict[str, Any]
    # The pretrained backbone's features of the train and val images, when the lr search computed
    # them: the first stages on cached features train on these rather than computing them again.
    features: FeatureDataModule | None = None


def build_task(cfg: DictConfig) -> Task:
    """The task from ``task`` (its ``monitor`` picks checkpoints and is not the task's own setting)."""
    node = OmegaConf.create({k: v for k, v in as_dict(cfg.task).items() if k != "monitor"})
    task = instantiate(node)
    if not isinstance(task, Task):
        raise TransferError(f"task._target_={cfg.task._target_} is not a transfer.tasks.Task.")
    return task


def run_images(
    cfg: DictConfig, resumed: dict[str, Any], run_dir: Path, task: Task
) -> tuple[ImageTable, list[tuple[str, str]]]:
    """The images of this run, their labels as ``task`` reads them: the dataset's, after the image
    check; when resuming, exactly the first run's (its split.csv, every file checked unchanged),
    whatever the folder holds now."""
    manifest = manifest_next_to(resumed["path"]) if resumed else None
    if manifest is not None:
        log.info("Resuming on the images and split of %s", manifest)
        classes = resumed["class_names"] if task.kind == "classes" else None  # tags and values are parsed
        return task.arrange(load_manifest(manifest, class_names=classes)), []
    # Labels are read (and bad ones refused) before any image is opened.
    table = subsample(task.arrange(instantiate(cfg.data.source)), cfg.data.get("max_images"), cfg.seed)
    if not cfg.runtime.image_check:
        return table, []
    return check_images(table, cfg.runtime.bad_images, run_dir / "bad_images.csv")


def carve_splits(cfg: DictConfig, table: ImageTable) -> dict[str, Any]:
    """Row indices of train, val and test: a split.csv's own (every row has its split), or carved."""
    if "manifest" in table.extra:  # read back from a run's split.csv: nothing is carved
        return split_indices(table.stratify_on(), 0.0, 0.0, cfg.seed, table.splits)
    return split_indices(table.stratify_on(), cfg.data.split.test, cfg.data.split.val, cfg.seed, table.splits)


def build_model(
    cfg: DictConfig, table: ImageTable, task: Task
) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]:
    """The backbone with a new head for the task's outputs; its input config (precedence: the
    user's ``input.*``, then the dataset's hints ``data.input.*``, then timm's pretrained config);
    the ``timm.create_model`` arguments a checkpoint needs to rebuild it."""
    backbone = {k: v for k, v in cfg.backbone.items() if k not in ("splitter", "coarse_blocks")}
    model = instantiate(OmegaConf.create(backbone), num_classes=task.outputs(table.num_classes))
    dataset_hints, user = as_dict(cfg.data.get("input")), as_dict(cfg.get("input"))
    hints = {**dataset_hints, **{k: v for k, v in user.items() if v is not None}}
    auto_size = hints.get("size") == "auto"
    input_config = resolve_input(model, {k: v for k, v in hints.items() if not (k == "size" and auto_size)})
    if auto_size:
        input_config["size"] = size_for_images(model, table.paths, input_config["size"], input_config["crop_pct"])
    model_kwargs = {
        k: v
        for k, v in as_dict(cfg.backbone).items()
        if k not in ("_target_", "name", "weights", "splitter", "coarse_blocks")
    }
    return model, input_config, model_kwargs


def processes_of(trainer: DictConfig) -> int:
    """Training processes the trainer config asks for (devices x nodes; 1 where devices is "auto")."""
    devices = trainer.get("devices", 1)
    count = devices if isinstance(devices, int) else len(devices) if isinstance(devices, (list, ListConfig)) else 1
    return max(1, count) * int(trainer.get("num_nodes") or 1)


def explicit_epochs(overrides: Sequence[str], stages: int) -> set[int]:
    """The stages whose ``epochs`` the overrides set (``schedule.stages.N.epochs=...``, or the whole
    ``schedule.stages``): those run as written, whatever ``schedule.min_steps`` says."""
    explicit: set[int] = set()
    for override in overrides:
        key = override.split("=", 1)[0].lstrip("+~")
        parts = key.split(".")
        if key == "schedule.stages":
            explicit.update(range(stages))
        elif len(parts) == 4 and parts[:2] == ["schedule", "stages"] and parts[3] == "epochs" and parts[2].isdigit():
            explicit.add(int(parts[2]))
    return explicit


def schedule_stages(
    cfg: DictConfig, overrides: Sequence[str], steps: int, val_images: int
) -> tuple[list[Stage], list[str]]:
    """The schedule's stages with at least ``schedule.min_steps`` optimizer steps where the schedule
    set their epochs (on a small dataset an epoch is a step or two, and a schedule written in epochs
    would hardly train), their ``patience: auto`` and ``min_delta`` from the validation split's size
    (`transfer.training.stopping`), each head-only stage on cached features with ``feature_cache``;
    and the notes saying which epochs were raised and which patience chosen."""
    stages = parse_stages(cfg.schedule.stages)
    explicit = explicit_epochs(overrides, len(stages))
    min_steps, notes, planned = int(cfg.schedule.min_steps or 0), [], []
    rule = plateau_rule(val_images, steps, str(cfg.monitor.mode), cfg.schedule.get("min_delta", "auto"))
    for index, stage in enumerate(stages):
        needed = math.ceil(min_steps / max(1, steps))
        if index not in explicit and needed > stage.epochs:
            notes.append(
                f"stage {index} '{stage.name}': {stage.epochs} epoch(s) of {steps} step(s) are fewer than "
                f"schedule.min_steps={min_steps}: at most {needed} epochs (set schedule.stages.{index}.epochs "
                "to keep yours)"
            )
            stage = dataclasses.replace(stage, epochs=needed)
        stage = with_patience(stage, rule, val_images)
        planned.append(dataclasses.replace(stage, feature_cache=bool(cfg.get("feature_cache")) and stage.unfreeze == 0))
    if any(stage.patience == rule.patience for stage in planned) and any(s.patience == "auto" for s in stages):
        notes.append(rule.why)
    for note in notes:
        log.info("%s", note[0].upper() + note[1:])
    check_feature_cache(cfg, planned)
    return planned, notes


def with_patience(stage: Stage, rule: PlateauRule, val_images: int) -> Stage:
    """The stage's patience as a number (``auto``: the rule's) and the rule's ``min_delta``; no
    patience without a validation split, whose metric it watches."""
    if stage.patience is None or val_images == 0:
        return dataclasses.replace(stage, patience=None, min_delta=0.0)
    patience = rule.patience if stage.patience == "auto" else int(stage.patience)
    return dataclasses.replace(stage, patience=patience, min_delta=rule.min_delta)


def check_feature_cache(cfg: DictConfig, stages: Sequence[Stage]) -> None:
    """A cache of random augmentations would silently train on one frozen draw of them."""
    if not cfg.get("feature_cache"):
        return
    if not any(stage.feature_cache for stage in stages):
        log.warning("feature_cache=true has no effect: no stage of this schedule is head-only.")
    elif cfg.augment.get("train") or cfg.augment.get("auto"):
        raise TransferError(
            "feature_cache=true computes each image's backbone features once, so it needs training "
            "images without random augmentation: add augment=none, or drop feature_cache=true (data=folder "
            "and data=csv choose augment=auto, which augments)."
        )


def augment_chosen_by(cfg: DictConfig, overrides: Sequence[str]) -> str:
    given = any(o.split("=", 1)[0].lstrip("+~") == "augment" for o in overrides)
    data = str(cfg.data.source.get("_target_", "")).rsplit(".", 1)[-1]
    return "augment= given" if given else f"the default of the data config ({data})"


# A training image's cost in backbone forward passes: a frozen backbone only runs forward, an
# unfrozen part also runs backward (about twice a forward over the layers it covers).
PASSES_PER_TRAINING_IMAGE = {"head": 1.0, "partial": 2.0, "all": 3.0}


def planned_image_passes(stages: Sequence[Stage], train_images: int, val_images: int) -> float:
    """The planned run's cost in backbone forward passes of one image, every stage at its maximum
    epochs (training at `PASSES_PER_TRAINING_IMAGE`, validation one pass an image): what the
    augmentation probe's share is measured against."""
    total = 0.0
    for stage in stages:
        kind = "head" if stage.unfreeze == 0 else "all" if stage.unfreeze == "all" else "partial"
        total += stage.epochs * (train_images * PASSES_PER_TRAINING_IMAGE[kind] + val_images)
    return total


def weights_digest(model: torch.nn.Module) -> str:
    """One SHA-256 of the model's parameters and buffers (`state_digests`, as the replica check
    compares them): the probe's cache names the weights by their content, not by where they came from."""
    return hashlib.sha256("".join(state_digests(model)).encode()).hexdigest()


def plan_augmentation(
    cfg: DictConfig,
    overrides: Sequence[str],
    model: torch.nn.Module,
    table: ImageTable,
    splits: dict[str, Any],
    input_config: dict[str, Any],
    run_dir: Path,
    stages: Sequence[Stage] = (),
) -> AugmentPlan:
    """The training pipeline: the augment config's, or the one ``augment=auto``'s probe chooses (also
    written as ``augment/chosen.yaml``: ``--config-dir RUN_DIR augment=chosen`` repeats it unprobed)."""
    name = str(cfg.augment.get("name") or ("auto" if cfg.augment.get("auto") else "custom"))
    chosen_by = augment_chosen_by(cfg, overrides)
    if not cfg.augment.get("auto"):
        nodes = resolved_with_input(cfg, input_config).augment.get("train")
        train = tuple(OmegaConf.to_container(nodes, resolve=True)) if nodes else None  # type: ignore[arg-type]
        return AugmentPlan(name, chosen_by, train, tuple(symmetries_of(train)))
    settings = settings_from(OmegaConf.to_container(cfg.augment.get("probe") or OmegaConf.create({})))  # type: ignore[arg-type]
    data = ProbeData(
        table,
        splits,
        cfg.data.get("eval_batch_size") or cfg.data.batch_size,
        0,  # the main process: loader workers compete with the forward pass for the CPU (probe_views)
        run_image_passes=planned_image_passes(stages, len(splits["train"]), len(splits["val"])),
        cache_dir=cfg.paths.get("cache_dir"),
        model_identity={"backbone": str(cfg.backbone.name), "weights": weights_digest(model)},
    )
    # The probe's loaders draw from torch's global generator; forking it leaves the training run
    # exactly as it would be with the chosen augmentation given explicitly.
    with torch.random.fork_rng(devices=[]):
        report = choose_augmentation(model, data, input_config, settings, cfg.seed, cfg.runtime.channels_last)
    write_chosen_augment(run_dir / "augment" / "chosen.yaml", report["train"])
    train = tuple(report["train"]) if report["train"] else None
    return AugmentPlan(
        name, chosen_by, train, tuple(symmetries_of(train)), probe={k: v for k, v in report.items() if k != "train"}
    )


def resolved_with_input(cfg: DictConfig, input_config: dict[str, Any]) -> DictConfig:
    """A copy of ``cfg`` whose ``input`` is the resolved one (the augmentation YAML refers to
    ``${input.size}``); ``cfg`` itself stays as composed."""
    resolved = cfg.copy()
    with open_dict(resolved):
        resolved.input = input_config
    return resolved


def augment_from_dict(raw: dict[str, Any], chosen_by: str) -> AugmentPlan:
    """An augmentation plan as `RunPlan.to_dict` wrote it (a checkpoint's plan)."""
    train = tuple(raw["train"]) if raw.get("train") else None
    return AugmentPlan(raw["name"], chosen_by, train, tuple(raw.get("symmetries") or ()), raw.get("probe"))


@rank_zero_only
def write_chosen_augment(path: Path, nodes: list[dict[str, Any]] | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (
        "# Chosen by augment=auto for this run (results.json holds the evidence). Repeat it with\n"
        f"#   python train.py --config-dir {path.parent.parent} augment=chosen ...\n"
    )
    path.write_text(header + OmegaConf.to_yaml(OmegaConf.create({"name": "chosen", "train": nodes})))


@rank_zero_only
def write_split(path: Path, table: ImageTable, splits: dict[str, Any]) -> None:
    write_manifest(path, table, splits)


def loss_class_weights(table: ImageTable, task: Task, counts: dict[str, Any], sampler: str) -> list[float] | None:
    """``task.class_weights=balanced``: scikit-learn's balanced weights of the training split."""
    if table.kind != "classes":
        return None
    check_split_classes(counts)
    return class_weights_for(counts["train"], task.class_weights, sampler)


def build_module(
    cfg: DictConfig,
    model: torch.nn.Module,
    table: ImageTable,
    task: Task,
    input_config: dict[str, Any],
    model_kwargs: dict[str, Any],
    weights: list[float] | None,
    augment: AugmentPlan,
) -> ClassifierModule:
    """The LightningModule the stages train: the model, its task, optimizer, and what the plan fixed."""
    if cfg.get("mixup") and not isinstance(task, Classification):
        raise TransferError(
            f"mixup blends one-hot class targets, which task={task.name} does not train on; drop mixup=... ."
        )
    return ClassifierModule(
        model=model,
        class_names=table.class_names,
        optimizer=instantiate(cfg.optimizer),
        backbone_name=cfg.backbone.name,
        input_config=input_config,
        model_kwargs=model_kwargs,
        task=task,
        class_weights=weights,
        channels_last=cfg.runtime.channels_last,
        coarse_blocks=cfg.backbone.coarse_blocks,
        compile_model=cfg.runtime.compile,
        mixup=instantiate(cfg.mixup, num_classes=table.num_classes) if cfg.get("mixup") else None,
        splitter=instantiate(cfg.backbone.splitter) if cfg.backbone.get("splitter") else None,
        symmetries=augment.symmetries,
        tta=cfg.tta,
    )


def build_datamodule(
    cfg: DictConfig, table: ImageTable, splits: dict[str, Any], input_config: dict[str, Any], augment: AugmentPlan
) -> ImageDataModule:
    """The loaders of the splits, the planned augmentation on the training one (checked to end at the
    model's input size)."""
    augmentations = instantiate(OmegaConf.create(list(augment.train))) if augment.train else None
    datamodule = ImageDataModule(
        table,
        splits,
        train_transform(augmentations, input_config),
        eval_transform(input_config),
        input_size=input_config["size"],
        batch_size=cfg.data.batch_size,
        eval_batch_size=cfg.data.get("eval_batch_size"),
        num_workers=cfg.data.num_workers,
        seed=cfg.seed,
        pin_memory=torch.cuda.is_available() and cfg.trainer.get("accelerator") != "cpu",
        sampler=cfg.data.sampler,
    )
    datamodule.check_transforms()
    return datamodule


def search_lr(
    cfg: DictConfig, module: ClassifierModule, datamodule: ImageDataModule, stages: list[Stage], run_dir: Path
) -> tuple[list[Stage], dict[str, Any], FeatureDataModule | None]:
    """``lr_find.enabled``: stage 0's lr from Lightning's finder (on cached features for a head-only
    stage); the new stages, the search's report and the features it cached (None if it used none)."""
    features = (
        FeatureDataModule(datamodule, module.model, module.channels_last)
        if cfg.lr_find.get("on_features", True)
        else None
    )
    stages, report = find_stage_lr(cfg.trainer, as_dict(cfg.lr_find), module, datamodule, stages, 0, run_dir, features)
    return stages, report, features if report.get("on_features") else None


def data_plan(
    cfg: DictConfig, table: ImageTable, splits: dict[str, Any], counts: dict[str, Any], skipped: list[tuple[str, str]]
) -> DataPlan:
    return DataPlan(
        name=table.name,
        images=len(table.paths),
        kind=table.kind,
        class_names=tuple(table.class_names),
        split_sizes={name: len(rows) for name, rows in splits.items()},
        split_counts=counts,
        split={"test": float(cfg.data.split.test), "val": float(cfg.data.split.val)},
        split_from=table.extra.get("manifest"),
        batch_size=int(cfg.data.batch_size),
        eval_batch_size=int(cfg.data.get("eval_batch_size") or cfg.data.batch_size),
        sampler=str(cfg.data.sampler),
        num_workers=int(cfg.data.num_workers),
        skipped_images=tuple(path for path, _ in skipped),
    )


def plan_run(cfg: DictConfig, overrides: Sequence[str], started: float) -> Planned:
    """Every planning step (see the module docstring); the plan and what executes it. ``started``: when
    the run started (``time.perf_counter``), which the budget counts from."""
    run_dir = Path(cfg.paths.output_dir)
    tta_symmetries(cfg.tta, ())  # an unknown name fails now, not after training
    resumed = read_resume(cfg.get("resume"))
    if resumed and (cfg.get("budget") or {}).get("minutes"):
        raise TransferError(
            "budget.minutes plans new runs, not resumed ones: resume without it (the run "
            "continues the epochs its plan set)."
        )
    # 1. data
    task = build_task(cfg)
    table, skipped = run_images(cfg, resumed, run_dir, task)  # e.g. grades in order, tags, numbers
    splits = carve_splits(cfg, table)
    # 2. model, and whether a resumed run is the same run
    model, input_config, model_kwargs = build_model(cfg, table, task)
    shape = run_shape(cfg, input_config)
    allowed = check_same_run(resumed, shape, bool(cfg.get("resume_allow_changes"))) if resumed else []
    for line in allowed:
        log.warning("Resuming with a changed setting (resume_allow_changes=true): %s", line)
    earlier = resumed.get("plan") if resumed and not allowed else None  # continue the checkpoint's own plan
    # 3. stages
    processes, accumulate = processes_of(cfg.trainer), int(cfg.trainer.get("accumulate_grad_batches") or 1)
    steps = steps_per_epoch(len(splits["train"]), cfg.data.batch_size, processes, accumulate)
    if earlier:
        stages = [dataclasses.replace(stage_from_dict(s), ends_by=None) for s in earlier["stages"]]
        notes = [f"resumed: the stages of {resumed['path']}'s plan"]
    else:
        stages, notes = schedule_stages(cfg, overrides, steps, len(splits["val"]))
    # 4. task
    task.fit(table, splits["train"])  # e.g. regression targets' scaling, from training images only
    write_split(run_dir / MANIFEST, table, splits)
    counts = {name: table.counts(rows) for name, rows in splits.items()}
    weights = loss_class_weights(table, task, counts, cfg.data.sampler)
    # 5. augmentation
    if earlier:
        augment = augment_from_dict(earlier["augment"], "resumed: the checkpoint's plan")
    else:
        augment = plan_augmentation(cfg, overrides, model, table, splits, input_config, run_dir, stages)
    module = build_module(cfg, model, table, task, input_config, model_kwargs, weights, augment)
    datamodule = build_datamodule(cfg, table, splits, input_config, augment)
    # 6. budget
    budget = None
    if not earlier and (cfg.get("budget") or {}).get("minutes"):
        check_single_process(cfg.trainer)
        stages, budget = plan_budget(float(cfg.budget.minutes), started, module, datamodule, stages)
        notes.append(f"budget.minutes={cfg.budget.minutes:g}: epochs {budget['epochs']}, each stage with a deadline")
    # 7. learning rate
    lr_search, features = None, None
    if not resumed and cfg.lr_find.enabled:
        stages, lr_search, features = search_lr(cfg, module, datamodule, stages, run_dir)
        if lr_search.get("suggestion") is not None:
            notes.append(f"lr_find: stage 0 lr {lr_search['replaced_lr']:g} -> {lr_search['suggestion']:g}")
    plan = RunPlan(
        run_dir=str(run_dir),
        seed=int(cfg.seed),
        data=data_plan(cfg, table, splits, counts, skipped),
        model=ModelPlan(
            backbone=str(cfg.backbone.name),
            weights=str(cfg.backbone.weights),
            input=input_config,
            model_kwargs=model_kwargs,
        ),
        task=TaskPlan(
            name=task.name,
            state=task.state(),
            label_smoothing=float(task.label_smoothing),
            class_weights=tuple(weights) if weights is not None else None,
            mixup=bool(cfg.get("mixup")),
        ),
        augment=augment,
        stages=tuple(stages),
        trainable=tuple(
            plan_trainable(module.model, stage.unfreeze, module.coarse_blocks, module.splitter)[1].describe()
            for stage in stages
        ),
        monitor={"metric": str(cfg.monitor.metric), "mode": str(cfg.monitor.mode)},
        min_steps=int(cfg.schedule.min_steps or 0),
        steps_per_epoch=steps,
        tta=str(cfg.tta),
        processes=processes,
        restore_best=bool(earlier.get("restore_best", False)) if earlier else bool(cfg.schedule.get("restore_best")),
        notes=tuple(notes),
        budget=budget,
        lr_find=lr_search,
        resume={
            "checkpoint": str(resumed["path"]),
            "stage_index": int(resumed["stage_index"]),
            "stage_name": resumed["stage_name"],
            # written after the stage's last epoch (its patience or deadline ended it): nothing to train
            "stage_ended_at": resumed.get("stage_ended_at"),
        }
        if resumed
        else None,
    )
    return Planned(plan, module, datamodule, table, shape, features)
