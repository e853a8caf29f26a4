"""The interface every task implements (`transfer.tasks`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torchmetrics import MetricCollection

from transfer.errors import TransferError

if TYPE_CHECKING:
    from transfer.data.sources import ImageTable


class Task(ABC):
    """One way of learning from integer class labels ``0..K-1`` (``labels == IGNORE`` is padding).

    Every task decodes the model's outputs into class probabilities (N x K), so test-time
    augmentation (an average of probabilities), the confusion matrix and the reports work the same
    for all of them; `predicted` turns probabilities into one class per image.
    """

    name: ClassVar[str]

    @abstractmethod
    def outputs(self, num_classes: int) -> int:
        """The head's number of outputs for ``num_classes`` classes."""

    @abstractmethod
    def loss(self, outputs: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor | None,
             label_smoothing: float, reduction: str = "mean") -> torch.Tensor:
        """The training loss; ``reduction="sum"`` sums over the images whose label is not IGNORE, each
        weighted by its class weight (the module divides by the weights' sum)."""

    def soft_loss(self, outputs: torch.Tensor, soft_targets: torch.Tensor,
                  class_weights: torch.Tensor | None) -> torch.Tensor:
        """The loss against mixed (soft) targets, for mixup; tasks that cannot mix refuse."""
        raise TransferError(f"mixup is not available for task={self.name}; drop mixup=... .")

    @abstractmethod
    def probabilities(self, outputs: torch.Tensor) -> torch.Tensor:
        """Class probabilities (N x K) from the model's outputs."""

    @abstractmethod
    def predicted(self, probabilities: torch.Tensor) -> torch.Tensor:
        """One class index per image."""

    @abstractmethod
    def metrics(self, num_classes: int, prefix: str) -> MetricCollection:
        """Validation and test metrics, updated with (probabilities, labels); IGNORE labels left out."""

    @abstractmethod
    def score(self, outputs: torch.Tensor, target: int) -> torch.Tensor:
        """The scalar of one image's outputs (shape 1 x outputs) that saliency maps explain for class ``target``."""

    def arrange(self, table: "ImageTable") -> "ImageTable":
        """The dataset's classes as this task needs them (e.g. in a declared order); unchanged by default."""
        return table

    def state(self) -> dict[str, Any]:
        """What a checkpoint records to rebuild the task (`transfer.tasks.task_from_state`)."""
        return {"name": self.name}

    def describe_output(self) -> str:
        """How the exported model's output becomes class probabilities (preprocessing.json)."""
        return "logits (softmax over the last axis gives class probabilities)"
