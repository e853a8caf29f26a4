"""Ordered classes (grades, severities): K-1 binary "above grade k" outputs, decoded monotonically.

The head has K-1 outputs; output k is trained with binary cross-entropy on "the label is above
class k" (the ordinal binary decomposition of Frank & Hall 2001 and Niu et al. 2016; CORAL, Cao et
al. 2020, shares one weight vector among the K-1 outputs, here each has its own, so the head is an
ordinary timm classifier and exports as one). The cumulative probabilities P(y > k) are made
non-increasing in k, and P(y = k) = P(y > k-1) - P(y > k). The prediction is the median grade, the
number of k with P(y > k) >= 0.5, which minimises the expected error in classes.

Metrics: accuracy, mean absolute error in classes (``mae``), quadratic weighted kappa (``qwk``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassCohenKappa
from torchmetrics.regression import MeanAbsoluteError
from torchmetrics.wrappers import LambdaInputTransformer

from transfer.data.table import IGNORE, ImageTable, first_row_of
from transfer.errors import DataError
from transfer.tasks.base import Task
from transfer.tasks.classification import check_class_weights


def above(probabilities: torch.Tensor) -> torch.Tensor:
    """P(y > k) for k = 0..K-2 from class probabilities (N x K)."""
    return 1.0 - probabilities.cumsum(dim=-1)[..., :-1]


def median_class(probabilities: torch.Tensor) -> torch.Tensor:
    return (above(probabilities) >= 0.5).sum(dim=-1)


class Ordinal(Task):
    """Ordered classes: K-1 cumulative binary outputs, binary cross-entropy, the median grade.

    ``levels``: the grades, lowest first, as the data names them (folder or label names). Without
    them the dataset's own class order is taken (sorted names for folders and CSVs), which is only
    right when names sort in grade order. ``label_smoothing`` and ``class_weights`` as for
    classification.
    """

    name = "ordinal"

    def __init__(
        self, levels: Sequence[str] | None = None, label_smoothing: float = 0.0, class_weights: str | None = None
    ) -> None:
        self.label_smoothing = float(label_smoothing)
        self.class_weights = check_class_weights(class_weights)
        self.levels = list(levels) if levels is not None else None
        if self.levels is not None and (len(self.levels) < 2 or len(set(self.levels)) != len(self.levels)):
            raise DataError(f"task.levels={self.levels}: give at least two distinct grades, lowest first.")

    def arrange(self, table: ImageTable) -> ImageTable:
        """Classes in the declared grade order; a label outside the levels is an error naming its file."""
        table = super().arrange(table)
        if self.levels is None:
            return table
        unknown = [name for name in table.class_names if name not in self.levels]
        if unknown:
            examples = [f"'{name}', e.g. {first_row_of(table, table.class_names.index(name))}" for name in unknown[:5]]
            raise DataError(
                f"Labels outside task.levels={self.levels}: "
                + "; ".join(examples)
                + ". Fix the labels, or add the grade to task.levels in its place."
            )
        to_level = np.array([self.levels.index(name) for name in table.class_names], dtype=np.int64)
        return ImageTable(table.paths, to_level[table.labels], list(self.levels), table.splits, table.name, table.extra)

    def state(self) -> dict[str, Any]:
        return {"name": self.name, "levels": self.levels}

    def outputs(self, num_classes: int) -> int:
        return num_classes - 1

    def loss(
        self,
        outputs: torch.Tensor,
        labels: torch.Tensor,
        class_weights: torch.Tensor | None,
        label_smoothing: float,
        reduction: str = "mean",
    ) -> torch.Tensor:
        real = labels != IGNORE
        outputs, labels = outputs[real].float(), labels[real]
        thresholds = torch.arange(outputs.shape[-1], device=labels.device)
        targets = (labels[:, None] > thresholds[None, :]).float()
        if label_smoothing:
            targets = targets * (1.0 - label_smoothing) + label_smoothing / 2
        per_image = F.binary_cross_entropy_with_logits(outputs, targets, reduction="none").sum(dim=-1)
        weights = class_weights[labels] if class_weights is not None else torch.ones_like(per_image)
        total = (per_image * weights).sum()
        return total if reduction == "sum" else total / weights.sum().clamp(min=1e-12)

    def probabilities(self, outputs: torch.Tensor) -> torch.Tensor:
        greater = torch.sigmoid(outputs.float())
        # P(y > k) cannot grow with k: the running minimum over k (torch.cummin's values, written
        # out because ONNX has no cummin and the exported graph decodes the grades too).
        running = [greater[..., 0]]
        for k in range(1, greater.shape[-1]):
            running.append(torch.minimum(running[-1], greater[..., k]))
        greater = torch.stack(running, dim=-1)
        ones, zeros = torch.ones_like(greater[..., :1]), torch.zeros_like(greater[..., :1])
        bounds = torch.cat([ones, greater, zeros], dim=-1)
        return bounds[..., :-1] - bounds[..., 1:]

    def predicted(self, probabilities: torch.Tensor) -> torch.Tensor:
        return median_class(probabilities)

    def metrics(self, num_classes: int, prefix: str) -> MetricCollection:
        return MetricCollection(
            {
                "acc": LambdaInputTransformer(
                    MulticlassAccuracy(num_classes, average="micro", ignore_index=IGNORE), transform_pred=median_class
                ),
                # The error in grades: torchmetrics' mean absolute error of the predicted grade.
                "mae": LambdaInputTransformer(
                    MeanAbsoluteError(),
                    transform_pred=lambda p: median_class(p).float(),
                    transform_target=lambda t: t.float(),
                ),
                "qwk": LambdaInputTransformer(
                    MulticlassCohenKappa(num_classes, weights="quadratic", ignore_index=IGNORE),
                    transform_pred=median_class,
                ),
            },
            prefix=prefix,
            compute_groups=False,
        )

    def score(self, outputs: torch.Tensor, target: int) -> torch.Tensor:
        # The grade as the model scores it: the sum of the "above grade k" logits (the target is not
        # used: one map shows what raises the grade).
        return outputs[0].sum()

    def describe_output(self) -> str:
        return (
            "K-1 logits of P(class > k); sigmoid, running minimum over k, then P(class = k) = "
            "P(class > k-1) - P(class > k) gives class probabilities"
        )
