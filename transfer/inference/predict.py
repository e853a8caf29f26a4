"""``predict.py``: the model's answers for image files (the task's columns), written to ``predictions.csv``.

The rows are written as batches finish (a ``BasePredictionWriter``), so a folder of any size needs
no more memory than a batch; unreadable files are listed in ``unreadable.csv`` with the reason.
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from transfer.config.run_folder import resolve_checkpoint
from transfer.data.csv_files import write_csv
from transfer.data.files import FileDataset, find_images
from transfer.inference.predictor import Predictor, inference_trainer
from transfer.model.classifier import Classifier, load_classifier

log = logging.getLogger("transfer")


class PredictionsCsv(BasePredictionWriter):
    """predictions.csv, one row per readable file as each batch finishes: its path and the task's
    columns (the predicted class, its probability and every class's; the predicted tags and each
    tag's probability; the values in the data's units)."""

    def __init__(self, path: Path, paths: Sequence[Path], classifier: Classifier) -> None:
        super().__init__(write_interval="batch")
        self.path, self.paths, self.classifier = path, paths, classifier
        self.stream: TextIO | None = None

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.stream = open(self.path, "w", newline="")  # noqa: SIM115  (closed in on_predict_end)
        csv.writer(self.stream).writerow(["path", *self.classifier.task.prediction_header(self.classifier.class_names)])

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        assert self.stream is not None
        task, names = self.classifier.task, self.classifier.class_names
        csv.writer(self.stream).writerows(
            [self.paths[index], *task.prediction_cells(row, names)]
            for index, row in zip(prediction["indices"], prediction["decoded"], strict=True)
        )

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None


def predict_files(
    classifier: Classifier,
    paths: list[Path],
    tta: str = "none",
    batch_size: int = 32,
    num_workers: int = 0,
    device: str = "auto",
    out_csv: Path | None = None,
) -> tuple[torch.Tensor, list[int], list[tuple[int, str]]]:
    """(decoded outputs of the readable files, their indices into ``paths``, [(index, error)] of the
    others); with ``out_csv``, predictions.csv written there as it goes."""
    dataset = FileDataset(paths, classifier.transform, tuple(classifier.input_config["size"]))
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    writers = [PredictionsCsv(out_csv, paths, classifier)] if out_csv is not None else []
    batches = inference_trainer(device, writers).predict(Predictor(classifier, tta), dataloaders=loader) or []
    decoded = [batch["decoded"] for batch in batches]  # type: ignore[call-overload]
    indices = [index for batch in batches for index in batch["indices"]]  # type: ignore[call-overload]
    unreadable = [failure for batch in batches for failure in batch["failed"]]  # type: ignore[call-overload]
    empty = torch.empty(0, len(classifier.class_names))
    return torch.cat(decoded) if decoded else empty, indices, unreadable


def predict(cfg: DictConfig) -> dict[str, Any]:
    resolve_checkpoint(cfg)  # ckpt= or run=
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    classifier = load_classifier(cfg.ckpt)
    paths = find_images(str(cfg.inputs))
    log.info(
        "Predicting %d file(s) from %s with %s (%s), tta=%s",
        len(paths),
        cfg.inputs,
        classifier.backbone,
        Path(cfg.ckpt).name,
        cfg.tta,
    )
    probabilities, indices, unreadable = predict_files(
        classifier, paths, cfg.tta, cfg.batch_size, cfg.num_workers, cfg.device, out_dir / "predictions.csv"
    )
    if unreadable:
        write_csv(out_dir / "unreadable.csv", ["path", "error"], [(str(paths[i]), error) for i, error in unreadable])
        log.warning(
            "%d file(s) could not be read; listed in %s:\n%s",
            len(unreadable),
            out_dir / "unreadable.csv",
            "\n".join(f"  {paths[i]}" for i, _ in unreadable[:10]),
        )
    summary = {
        "checkpoint": str(cfg.ckpt),
        "inputs": str(cfg.inputs),
        "tta": cfg.tta,
        "task": classifier.task.name,
        "files": len(paths),
        "predicted": len(indices),
        "unreadable": len(unreadable),
        # images per predicted class (per tag; for regression the mean value)
        "per_class": classifier.task.tally(probabilities, classifier.class_names),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("Predicted %d file(s): %s -> %s", len(indices), summary["per_class"], out_dir / "predictions.csv")
    return summary
