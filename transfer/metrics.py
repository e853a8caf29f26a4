"""Classification metrics (torchmetrics), the same for every split so logs line up."""

from __future__ import annotations

import torch
from torchmetrics import Metric, MetricCollection
from torchmetrics.utilities import dim_zero_cat
from torchmetrics.classification import MulticlassAccuracy, MulticlassAUROC, MulticlassF1Score


IGNORE = -100  # labels of padding (`transfer.data.datamodule.PaddedForProcesses`): not counted


def classification_metrics(num_classes: int, prefix: str) -> MetricCollection:
    """Accuracy, macro F1 and macro one-vs-rest AUROC (for two classes: the binary AUROC).

    All take class probabilities, so AUROC sees the scores rather than the argmax; labels
    `IGNORE` (evaluation padding under DDP) are left out.
    """
    return MetricCollection(
        {
            "acc": MulticlassAccuracy(num_classes, average="micro", ignore_index=IGNORE),
            "f1": MulticlassF1Score(num_classes, average="macro", ignore_index=IGNORE),
            "auroc": MulticlassAUROC(num_classes, average="macro", ignore_index=IGNORE),
        },
        prefix=prefix,
    )


class Collected(Metric):
    """Every (output, target) row of an evaluation, gathered from all processes on ``compute``: the
    whole split's metrics and what a task learns from it (e.g. per-tag thresholds). Each process
    adds as many rows as the others (evaluation splits are padded), so the gather is even."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("outputs", [], dist_reduce_fx="cat")
        self.add_state("targets", [], dist_reduce_fx="cat")

    def update(self, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        self.outputs.append(outputs.detach().float())
        self.targets.append(targets.detach())  # class indices stay integers

    def compute(self) -> tuple[torch.Tensor, torch.Tensor]:
        return dim_zero_cat(self.outputs), dim_zero_cat(self.targets)
