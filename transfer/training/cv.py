"""k-fold cross-validation: ``python train.py cv.folds=5``.

The test split is carved once, exactly as a plain run carves it, and never trained or validated
on. The rest (the training part, validation included) is cut into K stratified folds; fold k is a
complete run in ``<run>/fold_<k>/`` that validates (picks its checkpoints) on fold k and trains on
the others, with the run's whole recipe. Then, from the folds' best checkpoints:

* ``cv_summary.json``: every fold's test and validation metrics, their mean and standard deviation;
  the out-of-fold metrics (each training image predicted by the one model that never trained on
  it); the test metrics of the fold ensemble (the mean of the K models' class probabilities) beside
  the mean single model's;
* ``oof_predictions.csv`` and ``test_predictions.csv`` (the ensemble's), one row per image.

With few images per class one validation split picks checkpoints on a handful of images and the
test figure moves by points from seed to seed; the folds' spread shows how much, and the ensemble
is usually better than any one fold's model. ``resume=<earlier cv run dir>`` reuses the folds
that finished there and trains only the missing ones, in the new run directory.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf, open_dict

from transfer.config.compose import as_dict
from transfer.data.datamodule import ImageDataset
from transfer.data.manifest import MANIFEST, write_manifest
from transfer.data.splits import fold_splits, split_indices
from transfer.data.table import ImageTable
from transfer.errors import DataError, TransferError
from transfer.inference.predictor import decoded_outputs
from transfer.inference.reports import write_predictions
from transfer.model.classifier import Classifier, load_classifier
from transfer.tasks import Task
from transfer.training.planner import build_task, run_images
from transfer.training.run import check_fresh_run_dir, train

log = logging.getLogger("transfer")


def fold_config(
    cfg: DictConfig, fold_dir: Path, manifest: Path, class_names: list[str] | None, name: str
) -> DictConfig:
    """The run's config for one fold: its images and split from the fold's manifest, its own directory."""
    fold = OmegaConf.create(as_dict(cfg))
    with open_dict(fold):
        fold.paths.output_dir = str(fold_dir)
        fold.cv.folds = None
        fold.resume = None
        fold.data.max_images = None  # the manifest holds the images already chosen
        fold.data.source = {
            "_target_": "transfer.data.manifest.load_manifest",
            "path": str(manifest),
            "class_names": class_names,
            "name": name,
        }
    return fold


def fold_probabilities(
    ckpt: str, paths: list[str], batch_size: int, num_workers: int, classifier: Classifier | None = None
) -> torch.Tensor:
    """Decoded outputs (class probabilities, tag probabilities, values) of one fold's best checkpoint
    on ``paths`` (the checkpoint's own preprocessing)."""
    classifier = classifier or load_classifier(ckpt)
    dataset = ImageDataset(paths, np.zeros(len(paths), dtype=np.int64), classifier.transform)
    return decoded_outputs(classifier, dataset, batch_size, num_workers, "none", device="cpu")


def scores(task: Task, probabilities: torch.Tensor, labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """The task's metrics of decoded outputs against ``labels`` (class indices or targets)."""
    metrics = task.metrics(num_classes, "")(probabilities, torch.as_tensor(labels))
    return {name: round(float(value), 6) for name, value in metrics.items()}


def mean_and_sd(values: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    names = [name for name in values[0] if name != "loss"]
    return {
        name: {
            "mean": round(float(np.mean([v[name] for v in values])), 6),
            "sd": round(float(np.std([v[name] for v in values], ddof=1)), 6) if len(values) > 1 else 0.0,
        }
        for name in names
    }


def earlier_fold(resume: str | None, index: int) -> dict[str, Any] | None:
    """A finished fold of an earlier cross-validation (its results.json), to reuse."""
    if not resume:
        return None
    results = Path(resume).expanduser() / f"fold_{index}" / "results.json"
    return json.loads(results.read_text()) if results.is_file() else None


def cross_validate(cfg: DictConfig, overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    run_dir = Path(cfg.paths.output_dir)
    check_fresh_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    folds = int(cfg.cv.folds)
    if folds < 2:
        raise TransferError(f"cv.folds={folds}: cross-validation needs at least 2 folds.")
    resume = cfg.get("resume")
    if resume and not Path(resume).expanduser().is_dir():
        raise TransferError(
            f"resume={resume}: a cross-validation resumes from an earlier cross-validation's run "
            "directory (its fold_<k>/ folders), not from a checkpoint."
        )
    L.seed_everything(cfg.seed, workers=True)
    # Labels as the task reads them (classes in its order, tags, values), as every fold's model has them.
    table, _ = run_images(cfg, {}, run_dir, build_task(cfg))
    carved = split_indices(table.stratify_on(), cfg.data.split.test, 0.0, cfg.seed, table.splits)
    test, pool = carved["test"], np.sort(np.concatenate([carved["train"], carved["val"]]))
    if len(test) == 0:
        raise DataError("cv.folds needs a test split the folds never see; set data.test_fraction > 0.")
    held_out = fold_splits(table.stratify_on(), pool, folds, cfg.seed)
    log.info(
        "Cross-validation: %d folds of %d training images (%s per fold), %d test images untouched",
        folds,
        len(pool),
        [len(v) for v in held_out],
        len(test),
    )

    reports = []
    for index, val in enumerate(held_out):
        fold_dir = run_dir / f"fold_{index}"
        reused = earlier_fold(resume, index)
        if reused is not None:
            log.info("Fold %d/%d: reusing %s", index + 1, folds, reused["run_dir"])
            reports.append(reused)
            continue
        fold_dir.mkdir(parents=True, exist_ok=True)
        manifest = fold_dir / f"fold_{MANIFEST}"
        write_fold_manifest(manifest, table, {"train": np.setdiff1d(pool, val), "val": val, "test": test})
        log.info(
            "Fold %d/%d: validating on %d images, training on %d", index + 1, folds, len(val), len(pool) - len(val)
        )
        classes = table.class_names if table.kind == "classes" else None  # tags and values are parsed again
        reports.append(train(fold_config(cfg, fold_dir, manifest, classes, table.name), overrides))
    summary = summarize(cfg, table, reports, held_out, test, run_dir)
    return summary


def write_fold_manifest(path: Path, table: ImageTable, splits: dict[str, np.ndarray]) -> None:
    """Every process writes the same file (under DDP each reads it as its fold's data source), each
    to a temporary name first and then renamed over it, so no process ever reads a half-written one."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    write_manifest(temporary, table, splits)
    os.replace(temporary, path)


def summarize(
    cfg: DictConfig,
    table: ImageTable,
    reports: list[dict[str, Any]],
    held_out: list[np.ndarray],
    test: np.ndarray,
    run_dir: Path,
) -> dict[str, Any]:
    """Out-of-fold and fold-ensemble figures from the folds' best checkpoints; cv_summary.json."""
    batch, workers = cfg.data.get("eval_batch_size") or cfg.data.batch_size, 0
    names = table.class_names
    task = load_classifier(reports[0]["best_checkpoint"]["path"]).task
    test_paths = [table.paths[i] for i in test]
    oof = torch.zeros(len(table.paths), len(names))
    test_probabilities = []
    for report, val in zip(reports, held_out):
        ckpt = report["best_checkpoint"]["path"]
        classifier = load_classifier(ckpt)  # once per fold, for its held-out images and the test split
        oof[val] = fold_probabilities(ckpt, [table.paths[i] for i in val], batch, workers, classifier)
        test_probabilities.append(fold_probabilities(ckpt, test_paths, batch, workers, classifier))
    pool = np.sort(np.concatenate(held_out))
    ensemble = torch.stack(test_probabilities).mean(dim=0)
    fold_tests = [report["test"] for report in reports]
    summary: dict[str, Any] = {
        "folds": len(reports),
        "fold_runs": [report["run_dir"] for report in reports],
        "fold_test": fold_tests,
        "fold_val": [{cfg.monitor.metric: report["best_checkpoint"]["score"]} for report in reports],
        # the monitored validation score, averaged over the folds (what a hyperparameter search optimises)
        "val_mean": float(np.mean([report["best_checkpoint"]["score"] for report in reports])),
        "test_single_model": mean_and_sd(fold_tests),
        "test_ensemble": scores(task, ensemble, table.answers(test), len(names)),
        "out_of_fold": scores(task, oof[pool], table.answers(pool), len(names)),
        "train_images": int(len(pool)),
        "test_images": int(len(test)),
        "task": task.name,
        "class_names": names,
    }
    write_outputs(run_dir, summary, table, pool, oof, test, ensemble, task)
    single, together = summary["test_single_model"], summary["test_ensemble"]
    log.info(
        "Cross-validation over %d folds: test %s",
        len(reports),
        "  ".join(f"{k} {v['mean']:.4f} +- {v['sd']:.4f}" for k, v in single.items()),
    )
    log.info(
        "Fold ensemble (mean of %d models' probabilities) on the test split: %s",
        len(reports),
        "  ".join(f"{k}={v:.4f}" for k, v in together.items()),
    )
    log.info(
        "Out of fold (%d training images): %s",
        len(pool),
        "  ".join(f"{k}={v:.4f}" for k, v in summary["out_of_fold"].items()),
    )
    log.info("Results: %s", run_dir / "cv_summary.json")
    return summary


@rank_zero_only
def write_outputs(
    run_dir: Path,
    summary: dict[str, Any],
    table: ImageTable,
    pool: np.ndarray,
    oof: torch.Tensor,
    test: np.ndarray,
    ensemble: torch.Tensor,
    task: Task,
) -> None:
    for name, rows, decoded in (("oof_predictions.csv", pool, oof[pool]), ("test_predictions.csv", test, ensemble)):
        write_predictions(
            run_dir / name,
            task,
            [table.paths[i] for i in rows],
            decoded,
            torch.as_tensor(table.answers(rows)),
            table.class_names,
        )
    (run_dir / "cv_summary.json").write_text(json.dumps(summary, indent=2))
