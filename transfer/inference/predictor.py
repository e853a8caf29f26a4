"""One inference loop for every command after training: Lightning's ``Trainer.predict``.

`Predictor` wraps a trained classifier (`transfer.model.classifier`) as a LightningModule whose
``predict_step`` gives the task's decoded outputs (class probabilities, tag probabilities, values),
averaged over test-time views. Evaluation, prediction and cross-validation all run it through
`decoded_outputs` or a `Trainer` from `inference_trainer`: Lightning places the model and batches on
the device (``device=auto`` picks a GPU, Apple's MPS or the CPU), and a ``BasePredictionWriter``
can stream results to disk as batches finish (`transfer.inference.predict`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from transfer.data.files import readable_batch
from transfer.model.classifier import Classifier


def lightning_device(device: str) -> tuple[str, int | list[int]]:
    """``device`` as the commands' configs write it (auto, cpu, cuda, cuda:1, mps) as Lightning's
    (accelerator, devices)."""
    if device in ("auto", "cpu", "mps"):
        return device, 1
    if device.startswith("cuda"):
        _, _, index = device.partition(":")
        return "gpu", [int(index)] if index else 1
    return device, 1


def inference_trainer(device: str = "auto", callbacks: Sequence[L.Callback] = (), progress: bool = False) -> L.Trainer:
    """A Trainer for inference only: one device, no logger, no checkpoints."""
    accelerator, devices = lightning_device(device)
    return L.Trainer(
        accelerator=accelerator,
        devices=devices,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        callbacks=list(callbacks),
    )


class Predictor(L.LightningModule):
    """``predict_step`` of a trained classifier: the decoded outputs of a batch of preprocessed images.

    Batches of ``(images, targets)`` give the decoded outputs; batches of ``(images, indices, errors)``
    (`transfer.data.files.FileDataset`, where unreadable files have an error) give
    ``{"decoded", "indices", "failed"}`` for the readable ones and the others.
    """

    def __init__(self, classifier: Classifier, tta: str = "none") -> None:
        super().__init__()
        self.model = classifier.model
        self.classifier = classifier
        self.tta = tta

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> Any:
        if len(batch) == 3:  # files, some perhaps unreadable
            images, kept, failed = readable_batch(batch[0], batch[1], list(batch[2]))
            decoded = (
                self.classifier.probabilities(images, self.tta).cpu()
                if kept
                else torch.empty(0, len(self.classifier.class_names))
            )
            return {"decoded": decoded, "indices": kept, "failed": failed}
        return self.classifier.probabilities(batch[0], self.tta).cpu()


def decoded_outputs(
    classifier: Classifier,
    dataset: Dataset[Any],
    batch_size: int,
    num_workers: int,
    tta: str = "none",
    device: str = "auto",
) -> torch.Tensor:
    """The decoded outputs of every image of ``dataset`` (``(image, target)`` items), in order."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    batches = inference_trainer(device).predict(Predictor(classifier, tta), dataloaders=loader)
    assert batches is not None
    return torch.cat(batches)  # type: ignore[arg-type]
