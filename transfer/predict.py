"""``predict.py``: class probabilities for image files, written to ``predictions.csv``."""

from __future__ import annotations

import json
import logging
from collections import Counter
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


def write_predictions(path: Path, paths: list[Path], probabilities: torch.Tensor, indices: list[int],
                      class_names: list[str], predicted: torch.Tensor) -> None:
    """One row per readable file: the predicted class (argmax, or the task's rule), its probability, all."""
    rows = []
    for index, probs, best in zip(indices, probabilities.tolist(), predicted.tolist()):
        rows.append([paths[index], class_names[best], f"{probs[best]:.6f}", *[f"{p:.6f}" for p in probs]])
    write_csv(path, ["path", "predicted", "confidence", *[f"p_{name}" for name in class_names]], rows)


def predict(cfg: DictConfig) -> dict[str, Any]:
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    classifier = load_classifier(cfg.ckpt, pick_device(cfg.device))
    paths = find_images(str(cfg.inputs))
    log.info("Predicting %d file(s) from %s with %s (%s), tta=%s", len(paths), cfg.inputs, classifier.backbone,
             Path(cfg.ckpt).name, cfg.tta)
    probabilities, indices, unreadable = predict_files(classifier, paths, cfg.tta, cfg.batch_size, cfg.num_workers)
    predicted = classifier.predicted(probabilities)
    write_predictions(out_dir / "predictions.csv", paths, probabilities, indices, classifier.class_names, predicted)
    if unreadable:
        write_csv(out_dir / "unreadable.csv", ["path", "error"], [(str(paths[i]), error) for i, error in unreadable])
        log.warning("%d file(s) could not be read; listed in %s:\n%s", len(unreadable), out_dir / "unreadable.csv",
                    "\n".join(f"  {paths[i]}" for i, _ in unreadable[:10]))
    counts = Counter(classifier.class_names[i] for i in predicted.tolist())
    summary = {"checkpoint": str(cfg.ckpt), "inputs": str(cfg.inputs), "tta": cfg.tta, "files": len(paths),
               "predicted": len(indices), "unreadable": len(unreadable),
               "per_class": {name: counts.get(name, 0) for name in classifier.class_names}}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("Predicted %d file(s): %s -> %s", len(indices), summary["per_class"], out_dir / "predictions.csv")
    return summary
