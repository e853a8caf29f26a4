"""``predict.py``: the model's answers for image files (the task's columns), written to ``predictions.csv``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from transfer.reports import write_csv
from transfer.data.files import FileDataset, find_images, readable_batch
from transfer.inference import Classifier, load_classifier, pick_device

log = logging.getLogger("transfer")


def predict_files(classifier: Classifier, paths: list[Path], tta: str = "none", batch_size: int = 32,
                  num_workers: int = 0) -> tuple[torch.Tensor, list[int], list[tuple[int, str]]]:
    """(probabilities of the readable files, their indices into ``paths``, [(index, error)])."""
    dataset = FileDataset(paths, classifier.transform, tuple(classifier.input_config["size"]))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    probabilities, indices, unreadable = [], [], []
    for images, batch_indices, errors in loader:
        images, kept, failed = readable_batch(images, batch_indices, list(errors))
        unreadable += failed
        if kept:
            probabilities.append(classifier.probabilities(images, tta).cpu())
            indices += kept
    empty = torch.empty(0, len(classifier.class_names))
    return (torch.cat(probabilities) if probabilities else empty), indices, unreadable


def write_predictions(path: Path, paths: list[Path], decoded: torch.Tensor, indices: list[int],
                      classifier: Classifier) -> None:
    """One row per readable file, the task's columns: the predicted class and its probability and
    every class's; the predicted tags and each tag's probability; the values in the data's units."""
    task, names = classifier.task, classifier.class_names
    rows = [[paths[index], *task.prediction_cells(row, names)] for index, row in zip(indices, decoded)]
    write_csv(path, ["path", *task.prediction_header(names)], rows)


def predict(cfg: DictConfig) -> dict[str, Any]:
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    classifier = load_classifier(cfg.ckpt, pick_device(cfg.device))
    paths = find_images(str(cfg.inputs))
    log.info("Predicting %d file(s) from %s with %s (%s), tta=%s", len(paths), cfg.inputs, classifier.backbone,
             Path(cfg.ckpt).name, cfg.tta)
    probabilities, indices, unreadable = predict_files(classifier, paths, cfg.tta, cfg.batch_size, cfg.num_workers)
    write_predictions(out_dir / "predictions.csv", paths, probabilities, indices, classifier)
    if unreadable:
        write_csv(out_dir / "unreadable.csv", ["path", "error"], [(str(paths[i]), error) for i, error in unreadable])
        log.warning("%d file(s) could not be read; listed in %s:\n%s", len(unreadable), out_dir / "unreadable.csv",
                    "\n".join(f"  {paths[i]}" for i, _ in unreadable[:10]))
    summary = {"checkpoint": str(cfg.ckpt), "inputs": str(cfg.inputs), "tta": cfg.tta, "task": classifier.task.name,
               "files": len(paths), "predicted": len(indices), "unreadable": len(unreadable),
               # images per predicted class (per tag; for regression the mean value)
               "per_class": classifier.task.tally(probabilities, classifier.class_names)}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("Predicted %d file(s): %s -> %s", len(indices), summary["per_class"], out_dir / "predictions.csv")
    return summary
