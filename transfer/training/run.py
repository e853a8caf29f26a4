"""One training run: plan it (`transfer.training.planner`), print and save the plan, fit it stage by
stage (`transfer.training.fit`), test the best checkpoint, write ``results.json``.

A cross-validation (`transfer.training.cv`) calls this once per fold; this calls nothing above it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from transfer.config.run_folder import CHECKPOINT_DIR, RESULTS, keep_best
from transfer.data.manifest import MANIFEST
from transfer.errors import TransferError
from transfer.training.callbacks import RunRecord
from transfer.training.fit import fit_plan, instantiate_named, test_best
from transfer.training.plan import RunPlan
from transfer.training.planner import Planned, plan_run, resolved_with_input
from transfer.training.runtime import configure_process
from transfer.training.sync_batchnorm import check_sync_batchnorm

log = logging.getLogger("transfer")
PLAN = "plan.json"


def check_fresh_run_dir(run_dir: Path) -> None:
    """Never write a run into a directory that already holds one."""
    used = [p for p in (run_dir / CHECKPOINT_DIR, run_dir / RESULTS) if p.exists()]
    if used and getattr(rank_zero_only, "rank", 0) == 0:
        raise TransferError(
            f"'{run_dir}' already holds a run ({used[0].name} exists); a new run "
            "needs a new directory. Remove the hydra.run.dir override or pick another."
        )


@rank_zero_only
def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2))


@rank_zero_only
def keep_best_checkpoint(path: str | None, run_dir: Path) -> str | None:
    """``checkpoints/best.ckpt`` beside the stage files: the name users reach for after a run."""
    return str(keep_best(path, run_dir)) if path else None


@rank_zero_only
def write_config(path: Path, cfg: DictConfig) -> None:
    OmegaConf.save(cfg, path, resolve=True)


def start(cfg: DictConfig) -> tuple[Path, float]:
    """The process set up for a run in a fresh directory: settings, seed, precision."""
    began = time.perf_counter()
    configure_process(cfg.runtime.malloc_tuning)
    run_dir = Path(cfg.paths.output_dir)
    check_fresh_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision(cfg.runtime.matmul_precision)
    check_sync_batchnorm(cfg.trainer)
    return run_dir, began


def plan_only(cfg: DictConfig, overrides: Sequence[str] = ()) -> Planned:
    """The plan of the run ``cfg`` describes, printed and written to ``plan.json``, without training
    (``plan_only=true``); the steps that need the data, like the augmentation probe, run."""
    run_dir, began = start(cfg)
    planned = plan_run(cfg, overrides, began)
    publish(cfg, planned, run_dir)
    return planned


def publish(cfg: DictConfig, planned: Planned, run_dir: Path) -> None:
    """The plan in the log, in ``plan.json`` and, with the values it resolved, in ``config.yaml``."""
    plan = planned.plan
    log.info("%s", plan.describe())
    write_json(run_dir / PLAN, plan.to_dict())
    saved = resolved_with_input(cfg, plan.model.input)
    with open_dict(saved):
        saved.augment.train = list(plan.augment.train) if plan.augment.train else None
    write_config(run_dir / "config.yaml", saved)


def train(cfg: DictConfig, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Plan, fit every stage, test the best checkpoint and write ``results.json`` (what it returns);
    ``overrides``: the strings the config was composed with (an ``epochs`` set there is not raised by
    ``min_steps``)."""
    return fit_and_test(cfg, overrides)[0]


def fit_and_test(cfg: DictConfig, overrides: Sequence[str] = ()) -> tuple[dict[str, Any], RunPlan]:
    """`train`, with the plan it executed."""
    run_dir, began = start(cfg)
    planned = plan_run(cfg, overrides, began)
    publish(cfg, planned, run_dir)
    plan, module, datamodule = planned.plan, planned.module, planned.datamodule
    logger = instantiate_named(cfg, "logger") or False
    record = RunRecord(plan.to_dict(), planned.run_shape)
    stage_reports, bests = fit_plan(cfg, plan, module, datamodule, record, logger, began, planned.features)
    best, test_metrics, confusion, world_size = test_best(cfg, plan, module, datamodule, logger, bests)
    results: dict[str, Any] = {
        "run_dir": str(run_dir),
        "backbone": plan.model.backbone,
        "task": module.task.name,
        "task_state": module.task.state(),  # as the best checkpoint has it (e.g. per-tag thresholds, scaling)
        "dataset": plan.data.name,
        "class_names": list(plan.data.class_names),
        "split_counts": plan.data.split_counts,
        "split_manifest": str(run_dir / MANIFEST),
        "skipped_images": list(plan.data.skipped_images),
        "class_weights": list(plan.task.class_weights) if plan.task.class_weights is not None else None,
        "input": plan.model.input,
        "budget": plan.budget,
        "lr_find": plan.lr_find,
        "augment": {
            "name": plan.augment.name,
            "chosen_by": plan.augment.chosen_by,
            "train": list(plan.augment.train) if plan.augment.train else None,
            **(plan.augment.probe or {}),
            "symmetries": list(plan.augment.symmetries),
        },
        "monitor": plan.monitor,
        "tta": plan.tta,
        "plan": str(run_dir / PLAN),
        "stages": stage_reports,
        "best_checkpoint": best,  # the stage's own file, as the stage's checkpoint callback wrote it
        "checkpoint": keep_best_checkpoint(best["path"], run_dir) or best["path"],  # checkpoints/best.ckpt
        "test": test_metrics,
        "confusion_matrix": confusion,
        "resumed_from": plan.resume["checkpoint"] if plan.resume else None,
        "world_size": world_size,
        "seconds": round(time.perf_counter() - began, 1),
    }
    write_json(run_dir / RESULTS, results)
    log.info("Results: %s (%.1f min)", run_dir / RESULTS, results["seconds"] / 60)
    return results, plan
