"""Single-label classification: a softmax over K classes, cross-entropy, argmax."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassAUROC, MulticlassF1Score

from transfer.data.table import IGNORE
from transfer.errors import DataError
from transfer.tasks.base import Task

CLASS_WEIGHTS = (None, "balanced")


def classification_metrics(num_classes: int, prefix: str) -> MetricCollection:
    """Accuracy, macro F1 and macro one-vs-rest AUROC (for two classes: the binary AUROC), all from
    class probabilities, so AUROC sees the scores rather than the argmax."""
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes, average="micro", ignore_index=IGNORE),
            "f1": MulticlassF1Score(num_classes, average="macro", ignore_index=IGNORE),
            "auroc": MulticlassAUROC(num_classes, average="macro", ignore_index=IGNORE),
        },
        prefix=prefix,
    )


def check_class_weights(setting: str | None) -> str | None:
    if setting not in CLASS_WEIGHTS:
        raise DataError(f"task.class_weights={setting} is not supported; use null or balanced.")
    return setting


class Classification(Task):
    """One class per image: K logits, (weighted, optionally label-smoothed) cross-entropy.

    ``label_smoothing``: the share of each target spread over all classes; ``class_weights``:
    ``balanced`` weighs the loss by inverse class frequency on the training split.
    """

    name = "classification"

    def __init__(self, label_smoothing: float = 0.0, class_weights: str | None = None) -> None:
        self.label_smoothing = float(label_smoothing)
        self.class_weights = check_class_weights(class_weights)

    def outputs(self, num_classes: int) -> int:
        return num_classes

    def loss(
        self,
        outputs: torch.Tensor,
        labels: torch.Tensor,
        class_weights: torch.Tensor | None,
        label_smoothing: float,
        reduction: str = "mean",
    ) -> torch.Tensor:
        return F.cross_entropy(
            outputs,
            labels,
            weight=class_weights,
            ignore_index=IGNORE,
            label_smoothing=label_smoothing,
            reduction=reduction,
        )

    def soft_loss(
        self, outputs: torch.Tensor, soft_targets: torch.Tensor, class_weights: torch.Tensor | None
    ) -> torch.Tensor:
        return F.cross_entropy(outputs, soft_targets, weight=class_weights)

    def probabilities(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs.float().softmax(dim=-1)

    def predicted(self, probabilities: torch.Tensor) -> torch.Tensor:
        return probabilities.argmax(dim=-1)

    def metrics(self, num_classes: int, prefix: str) -> MetricCollection:
        return classification_metrics(num_classes, prefix)

    def score(self, outputs: torch.Tensor, target: int) -> torch.Tensor:
        return outputs[0, target]
