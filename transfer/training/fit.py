"""Executing a plan: one ``Trainer.fit`` per stage, then the test of the best checkpoint."""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from omegaconf import DictConfig

from transfer.compat import logged_step
from transfer.config.run_folder import CHECKPOINT_DIR, LAST
from transfer.data.datamodule import ImageDataModule
from transfer.model.module import ClassifierModule
from transfer.training.budget import seconds_until
from transfer.training.callbacks import ContinueLogSteps, EpochSummary, ReplicaCheck, RunRecord
from transfer.training.checkpoint_io import AtomicCheckpointIO
from transfer.training.feature_cache import FeatureDataModule
from transfer.training.plan import RunPlan
from transfer.training.stage_bests import LatestBestCheckpoint, StageBests
from transfer.training.sync_batchnorm import TimmSyncBatchNorm

log = logging.getLogger("transfer")


def instantiate_named(cfg: DictConfig, key: str) -> list[Any]:
    """Every ``_target_`` node under ``key`` (name -> node), as ``callbacks`` and ``logger`` hold them
    (``logger=[csv,tensorboard]`` merges two such mappings); a null node is switched off."""
    return [instantiate(node) for node in (cfg.get(key) or {}).values() if node is not None]


def fit_plan(
    cfg: DictConfig,
    plan: RunPlan,
    module: ClassifierModule,
    datamodule: ImageDataModule,
    record: RunRecord,
    logger: Any,
    started: float,
    features: FeatureDataModule | None = None,
) -> tuple[list[dict[str, Any]], StageBests]:
    """Every stage of ``plan`` from its first (a resumed run's), each one ``Trainer.fit``; the stages'
    reports for results.json and the best checkpoint of each. ``features``: the pretrained backbone's
    cached features (from the lr search), for the stages on cached features that no unfrozen stage
    precedes."""
    bests = StageBests(plan.monitor["mode"])  # restored from the checkpoint when resuming
    reports: list[dict[str, Any]] = []
    for index in range(plan.first_stage, len(plan.stages)):
        resume = plan.resume["checkpoint"] if plan.resume and index == plan.first_stage else None
        log_step = reports[-1]["logged_steps"] if reports else 0
        stage = plan.stages[index]
        if stage.unfreeze != 0:
            features = None  # the backbone changes from here on: its features with it
        elif stage.feature_cache and features is None:
            features = FeatureDataModule(datamodule, module.model, module.channels_last)
        reports.append(
            fit_stage(
                cfg,
                plan,
                index,
                module,
                datamodule,
                logger,
                [bests, record],
                resume,
                log_step,
                seconds_until(stage.ends_by, started),
                features if stage.feature_cache else None,
            )
        )
    return reports, bests


def fit_stage(
    cfg: DictConfig,
    plan: RunPlan,
    index: int,
    module: ClassifierModule,
    datamodule: ImageDataModule,
    logger: Any,
    shared: list[L.Callback],
    resume: str | None,
    log_step: int,
    max_seconds: float | None,
    features: FeatureDataModule | None = None,
) -> dict[str, Any]:
    """Stage ``index`` of the plan as one ``Trainer.fit`` (resumed from ``resume`` when it continues an
    interrupted run; its loggers' steps from ``log_step``; stopped after ``max_seconds``); its report.
    A stage on cached features trains on ``features`` (made by `fit_plan`), computed on first use."""
    stage, run_dir, bests = plan.stages[index], Path(plan.run_dir), shared[0]
    assert isinstance(bests, StageBests)
    trainable = module.set_stage(stage, index, features_cached=stage.feature_cache)
    log.info(
        "Stage %d '%s' (%d of %d): %s%s",
        index,
        stage.name,
        index + 1,
        len(plan.stages),
        trainable.describe(),
        ", on cached backbone features" if stage.feature_cache else "",
    )
    assert features is not None or not stage.feature_cache, "fit_plan makes a stage's cached features"
    data = features if stage.feature_cache else datamodule
    monitor, mode = plan.monitor["metric"], plan.monitor["mode"]
    best = LatestBestCheckpoint(
        dirpath=run_dir / CHECKPOINT_DIR,
        filename=f"{stage.name}-epoch{{epoch:02d}}",
        monitor=monitor,
        mode=mode,
        save_top_k=1,
        auto_insert_metric_name=False,
    )
    # A separate unmonitored callback writes last.ckpt every epoch: Lightning 2.6's save_last only
    # saves when the monitored metric improved, which would leave a stale resume point.
    latest = ModelCheckpoint(
        dirpath=run_dir / CHECKPOINT_DIR,
        filename=Path(LAST).stem,
        save_top_k=1,
        monitor=None,
        enable_version_counter=False,
    )
    # The stage ends on a plateau of the monitored metric (Lightning's EarlyStopping, its state is
    # checkpointed with the rest) within its epochs; under a budget also at its deadline.
    plateau = (
        [EarlyStopping(monitor=monitor, mode=mode, patience=int(stage.patience), min_delta=stage.min_delta)]
        if stage.patience
        else []
    )
    # A checkpoint written as the stage ended (patience, deadline): resuming it trains no more epochs.
    ended_at = plan.resume.get("stage_ended_at") if plan.resume and resume else None
    replicas = ReplicaCheck()
    # sync_batchnorm through timm's conversion (`transfer.training.sync_batchnorm`), not Lightning's torch one.
    sync = [TimmSyncBatchNorm()] if cfg.trainer.get("sync_batchnorm") else []
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        max_epochs=ended_at or stage.epochs,
        logger=logger,
        default_root_dir=run_dir,
        sync_batchnorm=False,
        plugins=[AtomicCheckpointIO(), *sync],
        max_time=max_seconds and timedelta(seconds=max_seconds),
        callbacks=[
            best,
            latest,
            EpochSummary(stage.name),
            replicas,
            ContinueLogSteps(log_step),
            *shared,
            *plateau,
            *instantiate_named(cfg, "callbacks"),
        ],
    )  # fresh per stage, but the shared ones
    bests.watch(stage.name, best)
    began = time.perf_counter()
    try:
        trainer.fit(module, datamodule=data, ckpt_path=resume)
    except (SystemExit, KeyboardInterrupt):  # Lightning turns Ctrl-C into SystemExit(1)
        log.error(
            "Interrupted in stage %d '%s'. The last finished epoch is in %s; resume with "
            "python train.py resume=%s (the run folder: its last.ckpt; and this run's other overrides).",
            index,
            stage.name,
            run_dir / CHECKPOINT_DIR,
            run_dir,
        )
        raise
    kept = bests.finish_stage()
    if plan.restore_best and index + 1 < len(plan.stages) and kept["path"] and kept["stage"] == stage.name:
        restore_weights(module, kept["path"])
        log.info("Stage %d '%s' ends; the next stage starts from its best epoch, %s", index, stage.name, kept["path"])
    module.set_stage(stage, index)  # back to images, e.g. for testing
    return {
        **vars(stage),
        "trainable": trainable.describe(),
        "trainable_groups": list(trainable.groups),
        "trainable_params": trainable.trainable_params,
        "frozen_params": trainable.frozen_params,
        "best_checkpoint": kept["path"],
        f"best_{monitor}": kept["score"],
        "distributed": replicas.report,
        "logged_steps": logged_step(trainer),
        "epochs_planned": stage.epochs,
        "epochs_run": trainer.current_epoch,
        "stopped_early": bool(plateau and plateau[0].stopped_epoch) or bool(ended_at and ended_at < stage.epochs),
        "seconds": round(time.perf_counter() - began, 1),
    }


def restore_weights(module: ClassifierModule, path: str) -> None:
    """The model weights of checkpoint ``path`` (every process reads the same file; the next stage's
    fit wraps the model again, so DDP starts from them)."""
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    module.load_state_dict(state)


def test_best(
    cfg: DictConfig,
    plan: RunPlan,
    module: ClassifierModule,
    datamodule: ImageDataModule,
    logger: Any,
    bests: StageBests,
) -> tuple[dict[str, Any], dict[str, float], list[list[int]] | None, int]:
    """Test the best checkpoint over all stages: (best record, metrics, confusion matrix, world size).

    A dry run (fast_dev_run) has no checkpoint: it tests the weights in memory on a batch.
    """
    if cfg.trainer.get("fast_dev_run"):
        best = {"stage": plan.stages[-1].name, "path": None, "score": None}
        log.info("fast_dev_run: no checkpoints; testing the weights in memory on one batch.")
    else:
        best = bests.best()
        log.info(
            "Best checkpoint: %s (%s=%.4f, stage '%s')",
            best["path"],
            plan.monitor["metric"],
            best["score"],
            best["stage"],
        )
    # The test runs in eval mode: no statistics to synchronise, and the model is converted already.
    tester: L.Trainer = instantiate(
        cfg.trainer, logger=logger, callbacks=[], default_root_dir=plan.run_dir, sync_batchnorm=False
    )
    tested = tester.test(module, datamodule=datamodule, ckpt_path=best["path"], verbose=False)[0]
    metrics = {k.removeprefix("test/"): round(float(v), 6) for k, v in tested.items()}
    log.info("Test: %s", "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    if module.test_confusion is not None:
        log.info(
            "Confusion matrix (rows: true %s; columns: predicted):\n%s",
            module.class_names,
            "\n".join(
                f"  {name:>12s} {row}" for name, row in zip(module.class_names, module.test_confusion, strict=True)
            ),
        )
    return best, metrics, module.test_confusion, tester.world_size
