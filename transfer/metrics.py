"""Classification metrics (torchmetrics), the same for every split so logs line up."""

from __future__ import annotations

from torchmetrics import MetricCollection
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
