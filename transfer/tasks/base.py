"""The interface every task implements (`transfer.tasks`)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix
from torchmetrics.wrappers import LambdaInputTransformer

from transfer.data.table import IGNORE, ImageTable
from transfer.errors import DataError, TransferError


class Task(ABC):
    """One way of learning from an image's label.

    The defaults here are those of class tasks (``kind = "classes"``): integer class labels
    ``0..K-1`` (``IGNORE`` marks padding), outputs decoded into class probabilities (N x K) and
    `predicted` giving one class per image. Tasks with other answers (``kind = "tags"``: a 0/1 per
    tag; ``"values"``: numbers) take float targets (a row of NaN marks padding) and decode into
    per-tag probabilities or values in the data's units; test-time augmentation averages those.
    """

    name: ClassVar[str]
    kind: ClassVar[str] = "classes"  # what `arrange` makes of the labels (`ImageTable.kind`)
    # The loss options of class tasks (``task.label_smoothing``, ``task.class_weights`` in their
    # configs); other tasks keep these defaults.
    label_smoothing: float = 0.0
    class_weights: str | None = None  # null | balanced: weight the loss by inverse class frequency

    @abstractmethod
    def outputs(self, num_classes: int) -> int:
        """The head's number of outputs for ``num_classes`` classes."""

    @abstractmethod
    def loss(
        self,
        outputs: torch.Tensor,
        labels: torch.Tensor,
        class_weights: torch.Tensor | None,
        label_smoothing: float,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """The training loss; ``reduction="sum"`` sums over the images whose label is not IGNORE, each
        weighted by its class weight (the module divides by the weights' sum)."""

    def soft_loss(
        self, outputs: torch.Tensor, soft_targets: torch.Tensor, class_weights: torch.Tensor | None
    ) -> torch.Tensor:
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
        """Validation and test metrics, updated with (decoded outputs, targets) of real images only
        (callers leave evaluation padding out with `real`)."""

    @abstractmethod
    def score(self, outputs: torch.Tensor, target: int) -> torch.Tensor:
        """The scalar of one image's outputs (shape 1 x outputs) that saliency maps explain for class ``target``."""

    def default_target(self, decoded: torch.Tensor) -> int:
        """The output a saliency map explains when none is named, from one image's decoded outputs:
        the predicted class."""
        return int(self.predicted(decoded[None])[0])

    def arrange(self, table: ImageTable) -> ImageTable:
        """The dataset's labels as this task reads them (classes in a declared order, tags, numbers);
        unchanged by default. A label the task cannot read is an error naming its file (and CSV row)."""
        columns = table.extra.get("label_columns") or []
        if len(columns) > 1:
            raise DataError(
                f"data.source.label_column names {len(columns)} columns {columns}; task={self.name} "
                "reads one label per image. Use task=multilabel (0/1 columns) or task=regression."
            )
        return table

    def fit(self, table: ImageTable, rows: np.ndarray) -> None:
        """Learn what the task needs from the training rows before training (e.g. target scaling)."""

    def real(self, targets: torch.Tensor) -> torch.Tensor:
        """Which rows of a batch are images rather than evaluation padding."""
        return targets != IGNORE if targets.dim() == 1 else ~torch.isnan(targets).any(dim=-1)

    def train_metric(self, num_classes: int) -> tuple[str, Metric]:
        """The metric logged on training batches (name, metric updated with probabilities and targets)."""
        return "acc", LambdaInputTransformer(
            MulticlassAccuracy(num_classes, average="micro", ignore_index=IGNORE), transform_pred=self.predicted
        )

    def confusion(self, num_classes: int) -> Metric | None:
        """A confusion matrix of the test split (updated with predicted classes), where one fits."""
        return MulticlassConfusionMatrix(num_classes, ignore_index=IGNORE)

    def learn_from_validation(self, probabilities: torch.Tensor, targets: torch.Tensor) -> None:
        """Called with the whole validation split's outputs after each validation (every process
        gets the same): e.g. per-tag decision thresholds. The checkpoint then saved records them."""

    def state(self) -> dict[str, Any]:
        """What a checkpoint records to rebuild the task (`transfer.tasks.task_from_state`)."""
        return {"name": self.name}

    def load_state(self, state: dict[str, Any]) -> None:
        """Take over what a checkpoint learnt (``state()`` of the task that wrote it), in place."""

    def describe_output(self) -> str:
        """How the exported model's output becomes class probabilities (preprocessing.json)."""
        return "logits (softmax over the last axis gives class probabilities)"

    # How predictions are written and served: columns of predictions.csv and the JSON per image.
    def prediction_header(self, names: Sequence[str]) -> list[str]:
        return ["predicted", "confidence", *[f"p_{name}" for name in names]]

    def prediction_cells(self, row: torch.Tensor, names: Sequence[str]) -> list[str]:
        best = int(self.predicted(row[None])[0])
        return [names[best], f"{float(row[best]):.6f}", *[f"{float(p):.6f}" for p in row]]

    def describe(self, row: torch.Tensor, names: Sequence[str]) -> dict[str, Any]:
        best = int(self.predicted(row[None])[0])
        return {
            "label": names[best],
            "confidence": float(row[best]),
            "probabilities": {name: float(p) for name, p in zip(names, row.tolist())},
        }

    def tally(self, decoded: torch.Tensor, names: Sequence[str]) -> dict[str, Any]:
        """predict's summary: images per predicted class."""
        counts = (
            torch.bincount(self.predicted(decoded), minlength=len(names)).tolist() if len(decoded) else [0] * len(names)
        )
        return dict(zip(names, counts))

    def true_text(self, answer: Any, names: Sequence[str]) -> str:
        """An image's label as a predictions.csv cell."""
        return names[int(answer)]
