"""What ``evaluate.py`` writes beside metrics.json for each kind of task (`write_report`).

* classes: ``per_class.csv`` (precision, recall, F1, support), ``predictions.csv``, a confusion
  matrix and a gallery of the most confidently wrong images;
* tags: ``per_label.csv`` (average precision, the saved threshold, precision, recall and F1 at it,
  positives), ``predictions.csv``;
* values: ``predictions.csv`` with residuals, ``residuals.png`` (predicted against true with the
  mean prediction per bin of true values, and the residuals' histogram) and that calibration table.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchmetrics.classification import (
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
    MultilabelAveragePrecision,
    MultilabelF1Score,
    MultilabelPrecision,
    MultilabelRecall,
)

from transfer.data.csv_files import write_csv
from transfer.inference.figures import confusion_figure, gallery_figure, plt
from transfer.tasks import Task


def per_class_report(predicted: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str]) -> list[dict[str, Any]]:
    n = len(class_names)
    columns = {
        "precision": MulticlassPrecision(n, average=None),
        "recall": MulticlassRecall(n, average=None),
        "f1": MulticlassF1Score(n, average=None),
    }
    values = {name: metric(predicted, labels).tolist() for name, metric in columns.items()}
    support = torch.bincount(labels, minlength=n).tolist()
    return [
        {"class": name, **{k: round(v[i], 6) for k, v in values.items()}, "support": support[i]}
        for i, name in enumerate(class_names)
    ]


def confident_mistakes(probs: torch.Tensor, predicted: torch.Tensor, labels: torch.Tensor, count: int) -> list[int]:
    """Indices of wrong predictions, most confident first (confidence: the predicted class's probability)."""
    confidence = probs.gather(1, predicted[:, None])[:, 0]
    wrong = (predicted != labels).nonzero().flatten()
    order = confidence[wrong].argsort(descending=True)
    return wrong[order][:count].tolist()


def write_predictions(
    path: Path, task: Task, paths: Sequence[str], decoded: torch.Tensor, answers: torch.Tensor, names: Sequence[str]
) -> None:
    """One row per image: its path, its label and the task's prediction columns (as predict.py writes
    them); evaluate's and cross-validation's predictions files."""
    write_csv(
        path,
        ["path", "true", *task.prediction_header(names)],
        [
            [image, task.true_text(answer.numpy(), names), *task.prediction_cells(row, names)]
            for image, answer, row in zip(paths, answers, decoded)
        ],
    )


def class_report(
    task: Task,
    out_dir: Path,
    paths: Sequence[str],
    probs: torch.Tensor,
    labels: torch.Tensor,
    names: Sequence[str],
    title: str,
    gallery_size: int,
) -> dict[str, Any]:
    predicted = task.predicted(probs)
    matrix = MulticlassConfusionMatrix(len(names))(predicted, labels).numpy()
    per_class = per_class_report(predicted, labels, names)
    mistakes = confident_mistakes(probs, predicted, labels, gallery_size)
    write_csv(out_dir / "per_class.csv", list(per_class[0]), [list(row.values()) for row in per_class])
    write_predictions(out_dir / "predictions.csv", task, paths, probs, labels, names)
    accuracy = float((predicted == labels).float().mean())
    confusion_figure(matrix, names, out_dir / "confusion_matrix.png", f"{title}: accuracy {accuracy:.2%}")
    if mistakes:
        gallery_figure(
            [paths[i] for i in mistakes],
            [
                f"true {names[int(labels[i])]}, predicted\n{names[int(predicted[i])]} ({probs[i, predicted[i]]:.2f})"
                for i in mistakes
            ],
            out_dir / "confident_mistakes.png",
        )
    return {
        "per_class": per_class,
        "confusion_matrix": matrix.tolist(),
        "class_names": list(names),
        "confident_mistakes": [paths[i] for i in mistakes],
        "files": ["per_class.csv", "predictions.csv", "confusion_matrix.png", "confident_mistakes.png"],
    }


def tag_report(
    task: Task, out_dir: Path, paths: Sequence[str], probs: torch.Tensor, targets: torch.Tensor, names: Sequence[str]
) -> dict[str, Any]:
    truth, decided = targets.long(), task.predicted(probs).float()
    n = len(names)
    average_precision = MultilabelAveragePrecision(n, average=None)(probs, truth).tolist()
    thresholds = task.threshold_tensor(probs).tolist()  # type: ignore[attr-defined]
    columns = {
        "precision": MultilabelPrecision(n, average=None),
        "recall": MultilabelRecall(n, average=None),
        "f1": MultilabelF1Score(n, average=None),
    }  # of the decisions at the thresholds
    values = {name: metric(decided, truth).tolist() for name, metric in columns.items()}
    support = truth.sum(dim=0).tolist()
    per_label = [
        {
            "label": name,
            "ap": round(average_precision[k], 6),
            "threshold": round(thresholds[k], 6),
            **{column: round(v[k], 6) for column, v in values.items()},
            "support": int(support[k]),
        }
        for k, name in enumerate(names)
    ]
    write_csv(out_dir / "per_label.csv", list(per_label[0]), [list(row.values()) for row in per_label])
    write_predictions(out_dir / "predictions.csv", task, paths, probs, targets, names)
    return {"per_label": per_label, "label_names": list(names), "files": ["per_label.csv", "predictions.csv"]}


def calibration_table(true: np.ndarray, predicted: np.ndarray, bins: int = 10) -> list[dict[str, float]]:
    """Mean prediction per bin of true values (quantile bins; each distinct value its own bin when few)."""
    values = np.unique(true)
    if len(values) <= bins:
        groups = [true == value for value in values]
    else:
        edges = np.unique(np.quantile(true, np.linspace(0, 1, bins + 1)))
        index = np.clip(np.searchsorted(edges, true, side="right") - 1, 0, len(edges) - 2)
        groups = [index == b for b in range(len(edges) - 1)]
    return [
        {
            "images": int(g.sum()),
            "mean_true": round(float(true[g].mean()), 6),
            "mean_predicted": round(float(predicted[g].mean()), 6),
        }
        for g in groups
        if g.any()
    ]


def value_report(
    task: Task,
    out_dir: Path,
    paths: Sequence[str],
    values: torch.Tensor,
    targets: torch.Tensor,
    names: Sequence[str],
    title: str,
) -> dict[str, Any]:
    predicted, true = values.numpy(), targets.numpy()
    header = [
        "path",
        *[f"true_{n}" for n in names],
        *[f"predicted_{n}" for n in names],
        *[f"residual_{n}" for n in names],
    ]
    write_csv(
        out_dir / "predictions.csv",
        header,
        [
            [path, *[f"{v:.6f}" for v in t], *[f"{v:.6f}" for v in p], *[f"{v:.6f}" for v in p - t]]
            for path, t, p in zip(paths, true, predicted)
        ],
    )
    calibration = {name: calibration_table(true[:, k], predicted[:, k]) for k, name in enumerate(names)}
    figure, axes = plt.subplots(len(names), 2, figsize=(9, 4 * len(names)), squeeze=False)
    for k, name in enumerate(names):
        scatter, histogram = axes[k]
        scatter.scatter(true[:, k], predicted[:, k], s=8, alpha=0.4, label="images")
        table = calibration[name]
        scatter.plot(
            [row["mean_true"] for row in table],
            [row["mean_predicted"] for row in table],
            "o-",
            color="C3",
            label="mean prediction per bin",
        )
        low, high = (
            float(min(true[:, k].min(), predicted[:, k].min())),
            float(max(true[:, k].max(), predicted[:, k].max())),
        )
        scatter.plot([low, high], [low, high], "--", color="grey", label="predicted = true")
        scatter.set_xlabel(f"true {name}")
        scatter.set_ylabel(f"predicted {name}")
        scatter.legend(fontsize=8)
        histogram.hist(predicted[:, k] - true[:, k], bins=30)
        histogram.set_xlabel(f"residual (predicted - true) {name}")
        histogram.set_ylabel("images")
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(out_dir / "residuals.png", dpi=110)
    plt.close(figure)
    return {"calibration": calibration, "target_names": list(names), "files": ["predictions.csv", "residuals.png"]}


def write_report(
    task: Task,
    out_dir: Path,
    paths: Sequence[str],
    decoded: torch.Tensor,
    answers: torch.Tensor,
    names: Sequence[str],
    title: str,
    gallery_size: int,
) -> dict[str, Any]:
    """evaluate.py's files beside metrics.json, by what the task answers (classes, tags or values), and
    what metrics.json adds."""
    if task.kind == "tags":
        return tag_report(task, out_dir, paths, decoded, answers, names)
    if task.kind == "values":
        return value_report(task, out_dir, paths, decoded, answers, names, title)
    return class_report(task, out_dir, paths, decoded, answers, names, title, gallery_size)
