"""Single-label classification: a softmax over K classes, cross-entropy, argmax."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection

from transfer.metrics import IGNORE, classification_metrics
from transfer.tasks.base import Task


class Classification(Task):
    """One class per image: K logits, (weighted, optionally label-smoothed) cross-entropy."""

    name = "classification"

    def outputs(self, num_classes: int) -> int:
        return num_classes

    def loss(self, outputs: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor | None,
             label_smoothing: float, reduction: str = "mean") -> torch.Tensor:
        return F.cross_entropy(outputs, labels, weight=class_weights, ignore_index=IGNORE,
                               label_smoothing=label_smoothing, reduction=reduction)

    def soft_loss(self, outputs: torch.Tensor, soft_targets: torch.Tensor,
                  class_weights: torch.Tensor | None) -> torch.Tensor:
        return F.cross_entropy(outputs, soft_targets, weight=class_weights)

    def probabilities(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs.float().softmax(dim=-1)

    def predicted(self, probabilities: torch.Tensor) -> torch.Tensor:
        return probabilities.argmax(dim=-1)

    def metrics(self, num_classes: int, prefix: str) -> MetricCollection:
        return classification_metrics(num_classes, prefix)

    def score(self, outputs: torch.Tensor, target: int) -> torch.Tensor:
        return outputs[0, target]
