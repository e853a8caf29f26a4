"""One training run: data, backbone, the schedule's stages, test with the best checkpoint, results.

`train.py` only composes the config and calls `train`; tests call `train` with composed configs.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from transfer.augment_probe import choose_augmentation, settings_from
from transfer.budget import Budget, check_single_process
from transfer.callbacks import ContinueLogSteps, EpochSummary, ReplicaCheck, logged_steps
from transfer.checkpoint_io import AtomicCheckpointIO
from transfer.data.balance import check_split_classes, class_weights_for
from transfer.data.datamodule import ImageDataModule
from transfer.data.manifest import MANIFEST, load_manifest, manifest_next_to, write_manifest
from transfer.data.resolution import size_for_images
from transfer.data.scan import check_images
from transfer.data.sources import ImageTable, subsample
from transfer.data.transforms import eval_transform, resolve_input, train_transform
from transfer.errors import TransferError
from transfer.feature_cache import FeatureDataModule
from transfer.freezing import plan_trainable
from transfer.lr_find import find_stage_lr
from transfer.module import ClassifierModule
from transfer.runtime import configure_process
from transfer.resume import check_same_run, resume_point, run_shape
from transfer.schedule import Stage, parse_stages, with_min_steps
from transfer.stage_bests import LatestBestCheckpoint, StageBests
from transfer.symmetries import symmetries_of, tta_symmetries
from transfer.sync_batchnorm import TimmSyncBatchNorm, check_sync_batchnorm
from transfer.tasks import Classification, Task

log = logging.getLogger("transfer")

CHECKPOINT_DIR = "checkpoints"


def check_fresh_run_dir(run_dir: Path) -> None:
    """Never write a run into a directory that already holds one."""
    used = [p for p in (run_dir / CHECKPOINT_DIR, run_dir / "results.json") if p.exists()]
    if used and rank_zero_only.rank == 0:
        raise TransferError(f"'{run_dir}' already holds a run ({used[0].name} exists); a new run "
                            "needs a new directory. Remove the hydra.run.dir override or pick another.")


def summarize_stages(module: ClassifierModule) -> list[str]:
    """What each stage trains, for the log; the model is left as it is."""
    lines = []
    for index, stage in enumerate(module.stages):
        _, trainable = plan_trainable(module.model, stage.unfreeze, module.coarse_blocks, module.splitter)
        lines.append(f"  stage {index + 1} '{stage.name}': {stage.epochs} epoch(s) at lr {stage.lr:g}, "
                     f"{trainable.describe()}")
    return lines


@rank_zero_only
def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2))


@rank_zero_only
def write_config(path: Path, cfg: DictConfig) -> None:
    OmegaConf.save(cfg, path, resolve=True)


def build_module(cfg: DictConfig, num_classes: int, class_names: list[str], stages: list[Stage],
                 image_paths: Sequence[str] = (), task: Task | None = None) -> tuple[ClassifierModule, dict[str, Any]]:
    # backbone.splitter (optional, `_partial_: true`): the model's parameter groups for the schedule.
    splitter = instantiate(cfg.backbone.splitter) if cfg.backbone.get("splitter") else None
    backbone = {k: v for k, v in cfg.backbone.items() if k not in ("splitter", "coarse_blocks")}
    task = task if task is not None else instantiate(cfg.task)  # the head's size, loss, decoding and metrics
    if cfg.get("mixup") and not isinstance(task, Classification):
        raise TransferError(f"mixup blends one-hot class targets, which task={task.name} does not train on; "
                            "drop mixup=... .")
    model = instantiate(OmegaConf.create(backbone), num_classes=task.outputs(num_classes))
    # Precedence: the user's input.* > the dataset's hints (data.input.*) > the backbone's config.
    dataset_hints = OmegaConf.to_container(cfg.data.get("input") or OmegaConf.create({}))
    user = OmegaConf.to_container(cfg.get("input") or OmegaConf.create({}))
    hints = {**dataset_hints, **{k: v for k, v in user.items() if v is not None}}
    auto_size = hints.get("size") == "auto"
    input_config = resolve_input(model, {k: v for k, v in hints.items() if not (k == "size" and auto_size)})
    if auto_size:
        if not image_paths:
            raise TransferError("input.size=auto needs the images to measure; pass an explicit size.")
        input_config["size"] = size_for_images(model, image_paths, input_config["size"], input_config["crop_pct"])
    # What timm.create_model needs besides name and classes, recorded so a checkpoint rebuilds alone.
    model_kwargs = {k: v for k, v in OmegaConf.to_container(cfg.backbone, resolve=True).items()
                    if k not in ("_target_", "name", "pretrained", "weights", "splitter", "coarse_blocks")}
    module = ClassifierModule(
        model=model, class_names=class_names, stages=stages, optimizer=instantiate(cfg.optimizer),
        backbone_name=cfg.backbone.name, input_config=input_config, model_kwargs=model_kwargs,
        label_smoothing=cfg.label_smoothing, channels_last=cfg.runtime.channels_last,
        coarse_blocks=cfg.backbone.coarse_blocks, compile_model=cfg.runtime.compile,
        mixup=instantiate(cfg.mixup, num_classes=num_classes) if cfg.get("mixup") else None, splitter=splitter,
        task=task)
    return module, input_config


def instantiate_named(cfg: DictConfig, key: str) -> list[Any]:
    """Every ``_target_`` node under ``key`` (name -> node), as ``callbacks`` and ``logger`` hold them
    (``logger=[csv,tensorboard]`` merges two such mappings); a null node is switched off."""
    return [instantiate(node) for node in (cfg.get(key) or {}).values() if node is not None]


def run_images(cfg: DictConfig, resumed: dict[str, Any], run_dir: Path, task: Task) -> tuple[ImageTable, list]:
    """The images of this run, their labels as ``task`` reads them: the dataset's, after the image
    check; when resuming, exactly the first run's (its split.csv, every file checked unchanged),
    whatever the folder holds now."""
    manifest = manifest_next_to(cfg.ckpt_path) if resumed else None
    if manifest is not None:
        log.info("Resuming on the images and split of %s", manifest)
        classes = resumed["class_names"] if task.kind == "classes" else None  # tags and values are parsed
        return task.arrange(load_manifest(manifest, class_names=classes)), []
    # Labels are read (and bad ones refused) before any image is opened.
    table = subsample(task.arrange(instantiate(cfg.data.source)), cfg.data.get("max_images"), cfg.seed)
    if not cfg.runtime.image_check:
        return table, []
    return check_images(table, cfg.runtime.bad_images, run_dir / "bad_images.csv")


@rank_zero_only
def write_split(path: Path, table: ImageTable, splits: dict[str, Any]) -> None:
    write_manifest(path, table, splits)


def processes_of(trainer: DictConfig) -> int:
    """Training processes the trainer config asks for (devices x nodes; 1 where devices is "auto")."""
    devices = trainer.get("devices", 1)
    count = devices if isinstance(devices, int) else len(devices) if isinstance(devices, (list, ListConfig)) else 1
    return max(1, count) * int(trainer.get("num_nodes") or 1)


def is_dry_run(cfg: DictConfig) -> bool:
    """``trainer.fast_dev_run``: Lightning runs a batch or two and saves no checkpoint."""
    return bool(cfg.trainer.get("fast_dev_run"))


def build_datamodule(cfg: DictConfig, table: ImageTable, input_config: dict[str, Any]) -> ImageDataModule:
    augmentations = instantiate(cfg.augment.train) if cfg.augment.get("train") else None
    # A table read back from a run's split.csv has every row's split already: nothing is carved.
    from_manifest = "manifest" in table.extra
    datamodule = ImageDataModule(
        table, train_transform(augmentations, input_config), eval_transform(input_config),
        input_size=input_config["size"], batch_size=cfg.data.batch_size,
        eval_batch_size=cfg.data.get("eval_batch_size"), num_workers=cfg.data.num_workers,
        test_fraction=0.0 if from_manifest else cfg.data.test_fraction,
        val_fraction=0.0 if from_manifest else cfg.data.val_fraction, seed=cfg.seed,
        pin_memory=torch.cuda.is_available() and cfg.trainer.get("accelerator") != "cpu",
        sampler=cfg.data.sampler)
    datamodule.check_transforms()
    return datamodule


def choose_augment(cfg: DictConfig, module: ClassifierModule, datamodule: ImageDataModule,
                   run_dir: Path) -> dict[str, Any] | None:
    """``augment=auto``: probe the data (`transfer.augment_probe`), then train with its choice.

    The choice replaces ``augment.train`` in the config (so the run's config.yaml holds it) and is
    written as ``augment/chosen.yaml`` in the run directory, a config group option of its own:
    ``--config-dir RUN_DIR augment=chosen`` repeats the run without probing.
    """
    if not cfg.augment.get("auto"):
        return None
    settings = settings_from(OmegaConf.to_container(cfg.augment.get("probe") or OmegaConf.create({})))
    # The probe's data loaders draw from torch's global generator; forking it leaves the training
    # run exactly as it would be with the chosen augmentation given explicitly.
    with torch.random.fork_rng(devices=[]):
        report = choose_augmentation(module.model, datamodule, module.hparams.input_config, settings,
                                     cfg.seed, module.channels_last)
    with open_dict(cfg):
        cfg.augment.train = report["train"]
    augmentations = instantiate(cfg.augment.train) if cfg.augment.train else None
    datamodule.train_transform = train_transform(augmentations, module.hparams.input_config)
    datamodule.check_transforms()
    write_chosen_augment(run_dir / "augment" / "chosen.yaml", report["train"])
    return report


@rank_zero_only
def write_chosen_augment(path: Path, nodes: list[dict[str, Any]] | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = ("# Chosen by augment=auto for this run (results.json holds the evidence). Repeat it with\n"
              f"#   python train.py --config-dir {path.parent.parent} augment=chosen ...\n")
    path.write_text(header + OmegaConf.to_yaml(OmegaConf.create({"train": nodes})))


def augment_record(cfg: DictConfig, choice: dict[str, Any] | None, symmetries: list[str]) -> dict[str, Any]:
    """results.json's ``augment``: the training pipeline (with the probe's evidence under
    ``augment=auto``) and the symmetries it applies."""
    record = choice or {"train": OmegaConf.to_container(cfg.augment.train) if cfg.augment.get("train") else []}
    return {**record, "symmetries": symmetries}


def plan_budget(cfg: DictConfig, module: ClassifierModule, datamodule: ImageDataModule,
                started: float) -> Budget | None:
    """``budget.minutes``: shorten the schedule to fit the time left (`transfer.budget`)."""
    minutes = (cfg.get("budget") or {}).get("minutes")
    if not minutes:
        return None
    check_single_process(cfg.trainer)
    if cfg.get("ckpt_path"):
        raise TransferError("budget.minutes plans new runs, not resumed ones: resume without it, "
                            "with the epochs the run planned (its log and results.json list them).")
    budget = Budget(float(minutes), started)
    budget.plan(module, datamodule, [uses_feature_cache(cfg, stage) for stage in module.stages])
    return budget


def log_setup(cfg: DictConfig, datamodule: ImageDataModule, module: ClassifierModule) -> None:
    table, config = datamodule.table, module.hparams.input_config
    kind = {"classes": "classes" if isinstance(module.task, Classification) else "classes, in order",
            "tags": "tags", "values": "targets"}[table.kind]
    log.info("Data '%s': %d images, %s %s", table.name, len(table.paths), kind, table.class_names)
    for split, per_class in datamodule.split_counts().items():  # per tag: positives; per target: mean
        log.info("  %-5s %5d  %s", split, len(datamodule.splits[split]), per_class)
    log.info("Backbone %s, input %s, mean %s, std %s", cfg.backbone.name, config["size"], config["mean"],
             config["std"])
    log.info("Schedule (%d stage(s)):\n%s", len(module.stages), "\n".join(summarize_stages(module)))


def uses_feature_cache(cfg: DictConfig, stage: Stage) -> bool:
    return bool(cfg.get("feature_cache")) and stage.unfreeze == 0


def check_feature_cache(cfg: DictConfig, stages: list[Stage]) -> None:
    """A cache of random augmentations would silently train on one frozen draw of them."""
    if not cfg.get("feature_cache"):
        return
    if not any(uses_feature_cache(cfg, stage) for stage in stages):
        log.warning("feature_cache=true has no effect: no stage of this schedule is head-only.")
    elif cfg.augment.get("train") or cfg.augment.get("auto"):
        raise TransferError(
            "feature_cache=true computes each image's backbone features once, so it needs training "
            "images without random augmentation: add augment=none, or drop feature_cache=true (data=folder "
            "and data=csv choose augment=auto, which augments).")


def fit_stage(cfg: DictConfig, module: ClassifierModule, datamodule: ImageDataModule, index: int,
              logger: Any, bests: StageBests, resume: str | None, log_step: int = 0,
              max_seconds: float | None = None) -> dict[str, Any]:
    """One schedule stage as one ``Trainer.fit``; returns the stage's report for results.json.

    ``bests`` collects the best checkpoint of each stage (kept in every checkpoint for resuming);
    ``resume`` is the checkpoint path when this stage continues an interrupted run;
    ``log_step`` is where the loggers' step axis starts (where the previous stage ended);
    ``max_seconds`` stops the stage at that wall time (Lightning's ``max_time``), for budgets.
    """
    run_dir, stage = Path(cfg.paths.output_dir), module.stages[index]
    monitor, mode = cfg.monitor.metric, cfg.monitor.mode
    cached = uses_feature_cache(cfg, stage)
    searching = index == 0 and resume is None and cfg.lr_find.enabled
    # Head-only stages search their lr on cached features; a cached stage then trains on the same ones.
    features = (FeatureDataModule(datamodule, module.model, module.channels_last)
                if cached or (searching and cfg.lr_find.get("on_features", True)) else None)
    lr_search = None
    if searching:
        lr_search = find_stage_lr(cfg, module, datamodule, index, run_dir, features)
        stage = module.stages[index]
    trainable = module.set_stage(index, features_cached=cached)
    log.info("Stage %d/%d '%s': %s%s", index + 1, len(module.stages), stage.name, trainable.describe(),
             ", on cached backbone features" if cached else "")
    data = features if cached else datamodule
    best = LatestBestCheckpoint(dirpath=run_dir / CHECKPOINT_DIR, filename=f"{stage.name}-epoch{{epoch:02d}}",
                                monitor=monitor, mode=mode, save_top_k=1, auto_insert_metric_name=False)
    # A separate unmonitored callback writes last.ckpt every epoch: Lightning 2.6's save_last only
    # saves when the monitored metric improved, which would leave a stale resume point.
    latest = ModelCheckpoint(dirpath=run_dir / CHECKPOINT_DIR, filename="last", save_top_k=1,
                             monitor=None, enable_version_counter=False)
    replicas = ReplicaCheck()
    # The stage ends on a plateau of the monitored metric (Lightning's EarlyStopping, its state is
    # checkpointed with the rest), within its epochs; under a budget also at its time limit.
    plateau = ([EarlyStopping(monitor=monitor, mode=mode, patience=stage.patience)]
               if stage.patience else [])
    # sync_batchnorm through timm's conversion (`transfer.sync_batchnorm`), not Lightning's torch one.
    sync = [TimmSyncBatchNorm()] if cfg.trainer.get("sync_batchnorm") else []
    trainer: L.Trainer = instantiate(
        cfg.trainer, max_epochs=stage.epochs, logger=logger, default_root_dir=run_dir, sync_batchnorm=False,
        plugins=[AtomicCheckpointIO(), *sync], max_time=max_seconds and timedelta(seconds=max_seconds),
        callbacks=[best, latest, EpochSummary(stage.name), replicas, ContinueLogSteps(log_step),
                   bests, *plateau, *instantiate_named(cfg, "callbacks")])  # fresh per stage, but bests
    bests.watch(stage.name, best)
    started = time.perf_counter()
    try:
        trainer.fit(module, datamodule=data, ckpt_path=resume)
    except (SystemExit, KeyboardInterrupt):  # Lightning turns Ctrl-C into SystemExit(1)
        log.error("Interrupted in stage %d '%s'. The last finished epoch is in %s; resume with "
                  "python train.py ckpt_path=%s (and this run's other overrides).", index + 1,
                  stage.name, run_dir / CHECKPOINT_DIR, run_dir / CHECKPOINT_DIR / "last.ckpt")
        raise
    record = bests.finish_stage()
    module.set_stage(index)  # back to images, e.g. for testing
    return {**vars(stage), "feature_cache": cached, "trainable": trainable.describe(), "trainable_groups": list(trainable.groups),
            "trainable_params": trainable.trainable_params,
            "frozen_params": trainable.frozen_params, "best_checkpoint": record["path"],
            f"best_{monitor}": record["score"], "distributed": replicas.report,
            "lr_find": lr_search, "logged_steps": logged_steps(trainer),
            "epochs_run": trainer.current_epoch, "stopped_early": bool(plateau and plateau[0].stopped_epoch),
            "seconds": round(time.perf_counter() - started, 1)}


def evaluate_best(cfg: DictConfig, module: ClassifierModule, datamodule: ImageDataModule,
                  logger: Any, bests: StageBests) -> tuple[dict[str, Any], dict[str, float], list[list[int]], int]:
    """Test the best checkpoint over all stages: (best record, metrics, confusion matrix, world size).

    A dry run (fast_dev_run) has no checkpoint: it tests the weights in memory on a batch.
    """
    if is_dry_run(cfg):
        best = {"stage": module.stages[-1].name, "path": None, "score": None}
        log.info("fast_dev_run: no checkpoints; testing the weights in memory on one batch.")
    else:
        best = bests.best()
        log.info("Best checkpoint: %s (%s=%.4f, stage '%s')", best["path"], cfg.monitor.metric,
                 best["score"], best["stage"])
    # The test runs in eval mode: no statistics to synchronise, and the model is converted already.
    tester: L.Trainer = instantiate(cfg.trainer, logger=logger, callbacks=[], default_root_dir=cfg.paths.output_dir,
                                    sync_batchnorm=False)
    tested = tester.test(module, datamodule=datamodule, ckpt_path=best["path"], verbose=False)[0]
    confusion = module.test_confusion  # None for tasks without classes
    metrics = {k.removeprefix("test/"): round(float(v), 6) for k, v in tested.items()}
    names = module.class_names
    log.info("Test: %s", "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    if confusion is not None:
        log.info("Confusion matrix (rows: true %s; columns: predicted):\n%s", names,
                 "\n".join(f"  {name:>12s} {row}" for name, row in zip(names, confusion)))
    return best, metrics, confusion, tester.world_size


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit every stage of the schedule, test the best checkpoint and write ``results.json``
    (with ``cv.folds=K``: one such run per fold, `transfer.cv`)."""
    if cfg.cv.folds:
        from transfer.cv import cross_validate

        return cross_validate(cfg)
    started = time.perf_counter()
    configure_process(cfg.runtime.malloc_tuning)
    run_dir = Path(cfg.paths.output_dir)
    check_fresh_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision(cfg.runtime.matmul_precision)

    stages = parse_stages(cfg.schedule.stages)
    tta_symmetries(cfg.test_tta, ())  # an unknown name fails now, not after training
    check_feature_cache(cfg, stages)
    check_sync_batchnorm(cfg.trainer)
    start, resumed = resume_point(cfg.get("ckpt_path"))
    task: Task = instantiate(cfg.task)
    table, skipped = run_images(cfg, resumed, run_dir, task)  # e.g. grades in order, tags, numbers
    module, input_config = build_module(cfg, table.num_classes, table.class_names, stages, table.paths, task)
    with open_dict(cfg):
        cfg.input = input_config  # the augmentation YAML refers to ${input.size}
    module.run_shape = run_shape(cfg)
    if resumed:
        allowed = check_same_run(resumed, module.run_shape, bool(cfg.get("resume_allow_changes")))
        for line in allowed:
            log.warning("Resuming with a changed setting (resume_allow_changes=true): %s", line)
    datamodule = build_datamodule(cfg, table, input_config)
    module.stages = with_min_steps(module.stages, datamodule.train_steps_per_epoch(
        processes_of(cfg.trainer), int(cfg.trainer.get("accumulate_grad_batches") or 1)), cfg.schedule.min_steps)
    task.fit(table, datamodule.splits["train"])  # e.g. regression targets' scaling, from training images only
    write_split(run_dir / MANIFEST, table, datamodule.splits)
    augment_choice = choose_augment(cfg, module, datamodule, run_dir)
    module.symmetries = symmetries_of(cfg.augment.get("train"))
    module.test_tta = cfg.test_tta
    budget = plan_budget(cfg, module, datamodule, started)
    write_config(run_dir / "config.yaml", cfg)
    log_setup(cfg, datamodule, module)
    split_counts = datamodule.split_counts()
    weights = None
    if table.kind == "classes":
        check_split_classes(split_counts)
        weights = class_weights_for(split_counts["train"], cfg.get("class_weights"), cfg.data.sampler)
    elif cfg.get("class_weights"):
        raise TransferError(f"class_weights weighs classes; task={task.name} has none (task=multilabel weighs "
                            "its tags with task.pos_weight=balanced).")
    if weights is not None:
        module.class_weights = torch.tensor(weights, dtype=torch.float32)

    if cfg.get("ckpt_path"):
        log.info("Resuming from %s in stage %d '%s'", cfg.ckpt_path, start + 1, module.stages[start].name)
    logger = instantiate_named(cfg, "logger") or False
    stage_reports: list[dict[str, Any]] = []
    bests = StageBests(cfg.monitor.mode)  # restored from the checkpoint when resuming
    for index in range(start, len(module.stages)):
        resume = cfg.ckpt_path if index == start and cfg.get("ckpt_path") else None
        log_step = stage_reports[-1]["logged_steps"] if stage_reports else 0
        limit = budget.stage_limit(index) if budget else None
        stage_reports.append(fit_stage(cfg, module, datamodule, index, logger, bests, resume, log_step, limit))
    best, test_metrics, confusion, world_size = evaluate_best(cfg, module, datamodule, logger, bests)

    results = {
        "run_dir": str(run_dir),
        "backbone": cfg.backbone.name,
        "task": module.task.name,
        "task_state": module.task.state(),  # as the best checkpoint has it (e.g. per-tag thresholds, scaling)
        "dataset": table.name,
        "class_names": table.class_names,
        "split_counts": split_counts,
        "split_manifest": str(run_dir / MANIFEST),
        "skipped_images": [path for path, _ in skipped],
        "class_weights": weights,
        "input": input_config,
        "budget": budget.report if budget else None,
        "augment": augment_record(cfg, augment_choice, module.symmetries),
        "monitor": {"metric": cfg.monitor.metric, "mode": cfg.monitor.mode},
        "test_tta": cfg.test_tta,
        "stages": stage_reports,
        "best_checkpoint": best,
        "test": test_metrics,
        "confusion_matrix": confusion,
        "resumed_from": cfg.get("ckpt_path"),
        "world_size": world_size,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json(run_dir / "results.json", results)
    log.info("Results: %s (%.1f min)", run_dir / "results.json", results["seconds"] / 60)
    return results
