"""``evaluate.py``: a trained checkpoint on a split of a dataset, with a report people can read.

By default the images are the training run's own (its ``split.csv`` next to ``checkpoints/``), so
``split=test`` is exactly the images the run was tested on.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from transfer.config.names import training_config
from transfer.config.run_folder import resolve_checkpoint
from transfer.data.datamodule import ImageDataset
from transfer.data.manifest import MANIFEST, load_manifest, manifest_next_to
from transfer.data.splits import split_indices
from transfer.data.table import ImageTable, subsample
from transfer.errors import TransferError
from transfer.inference.predictor import decoded_outputs
from transfer.inference.reports import write_report
from transfer.model.classifier import Classifier, load_classifier
from transfer.tasks import Task

log = logging.getLogger("transfer")
SPLITS = ("train", "val", "test", "all")


def label_indices(class_names: Sequence[str], model_classes: Sequence[str]) -> np.ndarray:
    """Map a dataset's label indices to the model's, by class name; refuse classes it never learnt."""
    unknown = sorted(set(class_names) - set(model_classes))
    if unknown:
        raise TransferError(
            f"The data has classes {unknown} that the model was not trained on; it knows "
            f"{list(model_classes)}. Evaluate on data with the model's classes."
        )
    return np.array([list(model_classes).index(name) for name in class_names], dtype=np.int64)


def answers_for(classifier: Classifier, table: ImageTable, rows: np.ndarray) -> np.ndarray:
    """What the model should answer for ``rows`` of ``table`` (as read by `Task.arrange` with the
    model's task): class indices in the model's order, or tag / value targets in its column order."""
    if table.kind == "classes":
        return label_indices(table.class_names, classifier.class_names)[table.labels[rows]]
    if table.class_names != classifier.class_names:
        raise TransferError(
            f"The data has {table.kind} {table.class_names}; the model was trained on {classifier.class_names}."
        )
    return table.answers(rows)


def evaluation_images(cfg: DictConfig, split: str, task: Task) -> tuple[ImageTable, np.ndarray, str]:
    """The table (labels as ``task`` reads them), the indices of ``split`` and where they came from.

    Without ``data=...``: the run's own ``split.csv`` (exactly the images it used, each checked
    unchanged), or for runs without one the run's data config split again with its seed.
    With ``data=...``: that dataset, split with ``seed`` (or the run's).
    """
    if split not in SPLITS:
        raise TransferError(f"split={split} is not one of {list(SPLITS)}.")
    manifest = manifest_next_to(cfg.ckpt)
    if cfg.get("data") is None and manifest is not None:
        if cfg.get("seed") is not None:
            raise TransferError(
                f"seed={cfg.seed} splits a dataset given with data=...; without it the run's "
                f"own split is used ({manifest})."
            )
        table = task.arrange(load_manifest(manifest, splits=None if split == "all" else [split]))
        return table, np.arange(len(table.paths)), f"the training run's {manifest.name}"
    run_cfg = training_config(cfg.ckpt)
    if cfg.get("data") is not None:
        data, origin = cfg.data, "the data= given"
    elif run_cfg is not None:
        data, origin = run_cfg.data, "the training run's config.yaml (no split.csv: split again with its seed)"
        log.warning(
            "No %s next to %s: splitting its data again with the run's seed. Images added, removed "
            "or skipped since the run change what this split holds.",
            MANIFEST,
            cfg.ckpt,
        )
    else:
        raise TransferError(
            f"No config.yaml next to '{cfg.ckpt}' to take the data from; pass data=... "
            "(e.g. data=folder data.root=PATH split=all)."
        )
    seed = cfg.seed if cfg.get("seed") is not None else (run_cfg.seed if run_cfg is not None else 42)
    table = subsample(task.arrange(instantiate(data.source)), data.get("max_images"), seed)
    if split == "all":
        return table, np.arange(len(table.paths)), origin
    splits = split_indices(table.stratify_on(), data.split.test, data.split.val, seed, table.splits)
    if len(splits[split]) == 0:
        raise TransferError(f"The {split} split of '{table.name}' is empty; use split=all.")
    return table, splits[split], origin


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    resolve_checkpoint(cfg)  # ckpt= or run=
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    classifier = load_classifier(cfg.ckpt)
    task, names = classifier.task, classifier.class_names
    table, indices, origin = evaluation_images(cfg, cfg.split, task)
    paths = [table.paths[i] for i in indices]
    answers = answers_for(classifier, table, indices)
    log.info(
        "Evaluating %s on %d images (%s split of '%s', from %s), tta=%s",
        Path(cfg.ckpt).name,
        len(paths),
        cfg.split,
        table.name,
        origin,
        cfg.tta,
    )
    dataset = ImageDataset(paths, answers, classifier.transform)
    decoded = decoded_outputs(classifier, dataset, cfg.batch_size, cfg.num_workers, cfg.tta, cfg.device)
    truth = torch.as_tensor(answers)

    metrics = {k: round(float(v), 6) for k, v in task.metrics(len(names), "")(decoded, truth).items()}
    title = f"{table.name} {cfg.split} (n={len(paths)})"
    details = write_report(task, out_dir, paths, decoded, truth, names, title, cfg.gallery_size)
    report = {
        "checkpoint": str(cfg.ckpt),
        "data": table.name,
        "split": cfg.split,
        "images": len(paths),
        "task": task.name,
        "task_state": task.state(),
        "tta": cfg.tta,
        "metrics": metrics,
        **{k: v for k, v in details.items() if k != "files"},
    }
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=2))
    log.info("Metrics: %s", "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    for key, name in (("per_class", "class"), ("per_label", "label")):
        if key in details:
            log.info(
                "Per %s:\n%s",
                name,
                "\n".join(
                    f"  {r[name]:>14s}  precision {r['precision']:.3f}  recall {r['recall']:.3f}  f1 {r['f1']:.3f}  "
                    f"n={r['support']}"
                    for r in details[key]
                ),
            )
    log.info("Report: %s (%s)", out_dir, ", ".join(["metrics.json", *details["files"]]))
    return report
