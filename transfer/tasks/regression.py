"""A number (or several) per image: a defect probability, an age, a quality score.

Labels are read as numbers (``0.33``), or from one column per target
(``data.source.label_column=[age,score]``, read as ``age=31;score=0.8``); a label that is not a
number stops the run naming its file and CSV row. Targets are standardised with the training
split's mean and standard deviation (saved in the checkpoint), so one learning rate suits any
unit; outputs are turned back into the data's units everywhere the model is used (evaluate,
predict, the server, cv; the exported model's raw output is the standardised value, and
preprocessing.json gives the mean and standard deviation).

Loss: ``mse`` or ``huber`` (on standardised values, ``huber_delta`` in standard deviations).
Metrics: ``mae``, ``rmse``, ``r2`` in the data's units; with ``threshold`` also ``acc``, ``f1``
(macro over the two sides) and ``auroc`` of "value >= threshold", so a regression of a defect
probability compares with a defective/functional classifier (Deitsch et al. 2019 threshold theirs
at 0.5).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import BinaryAUROC, MulticlassAccuracy, MulticlassF1Score
from torchmetrics.regression import MeanAbsoluteError, MeanSquaredError, R2Score
from torchmetrics.wrappers import LambdaInputTransformer

from transfer.data.table import ImageTable, first_row_of, split_pairs
from transfer.errors import DataError
from transfer.tasks.base import Task

LOSSES = ("mse", "huber")
MAX_STRATA = 10  # quantile bins of the (first) target that splits, folds and samplers balance


def value_strata(values: np.ndarray) -> np.ndarray:
    """Quantile bins of ``values``: at most 10, and about 20 images each, so a 10% split still
    takes an image from every bin; discrete values (a few grades) get a bin each."""
    bins = int(np.clip(len(values) // 20, 1, MAX_STRATA))
    edges = np.unique(np.quantile(values, np.linspace(0, 1, bins + 1)[1:-1]))
    return np.searchsorted(edges, values, side="right")


class Regression(Task):
    """Numbers per image: standardised targets, MSE or Huber loss, outputs in the data's units."""

    name = "regression"
    kind = "values"

    def __init__(
        self,
        targets: Sequence[str] | None = None,
        loss: str = "mse",
        huber_delta: float = 1.0,
        threshold: float | None = None,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        if loss not in LOSSES:
            raise DataError(f"task.loss={loss} is not one of {list(LOSSES)}.")
        self.targets = list(targets) if targets is not None else None
        self.loss_name, self.huber_delta, self.threshold = loss, float(huber_delta), threshold
        self.mean = list(mean) if mean is not None else None
        self.std = list(std) if std is not None else None

    # --- labels -------------------------------------------------------------------------------
    def parse(self, text: str) -> dict[str | None, float]:
        """One label: ``0.33`` (one target) or, from one column per target, ``age=31;score=0.8``
        (`transfer.data.sources.split_pairs`)."""
        pairs = split_pairs(text)
        if pairs is None:
            return {None: float(text)}
        return {name: float(value) for name, value in pairs.items()}

    def arrange(self, table: ImageTable) -> ImageTable:
        if table.kind == "values":
            return table
        parsed = []
        for index, text in enumerate(table.class_names):
            try:
                values = self.parse(text)
            except ValueError:
                raise DataError(
                    f"Label '{text}' of {first_row_of(table, index)} is not a number; task=regression "
                    "needs a number in every label column (fix the row, or remove it)."
                ) from None
            bad = [v for v in values.values() if not np.isfinite(v)]
            if bad:
                raise DataError(f"Label '{text}' of {first_row_of(table, index)} is not a finite number.")
            parsed.append(values)
        found = sorted({name for values in parsed for name in values if name is not None})
        names = found or [self.targets[0] if self.targets else "value"]
        if self.targets is not None and found and found != sorted(self.targets):
            raise DataError(f"The labels give targets {found}; task.targets={self.targets}.")
        names = self.targets if self.targets is not None and found else names
        self.targets = list(names)
        per_label = np.array(
            [[values.get(name if found else None, np.nan) for name in names] for values in parsed], dtype=np.float32
        )
        for index, row in enumerate(per_label):
            if np.isnan(row).any():
                raise DataError(
                    f"Label '{table.class_names[index]}' of {first_row_of(table, index)} lacks a value "
                    f"for target(s) {[n for n, v in zip(names, row) if np.isnan(v)]}."
                )
        values = per_label[table.labels]
        # With a threshold, splits keep the share of images above it (as a classifier of the same
        # decision would be split: data=elpv_probability then tests on data=elpv's test images).
        strata = (
            (values[:, 0] >= self.threshold).astype(np.int64)
            if self.threshold is not None
            else value_strata(values[:, 0])
        )
        return ImageTable(
            table.paths, strata, list(names), table.splits, table.name, table.extra, kind="values", targets=values
        )

    def fit(self, table: ImageTable, rows: np.ndarray) -> None:
        """Standardise with the training split's mean and standard deviation (kept when resuming)."""
        if self.mean is not None and self.std is not None:
            return
        assert table.targets is not None, "arrange() made the targets"
        targets = table.targets[rows].astype(np.float64)
        std = targets.std(axis=0)
        self.mean = np.round(targets.mean(axis=0), 8).tolist()
        self.std = np.round(np.where(std > 0, std, 1.0), 8).tolist()

    def state(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "targets": self.targets,
            "loss": self.loss_name,
            "huber_delta": self.huber_delta,
            "threshold": self.threshold,
            "mean": self.mean,
            "std": self.std,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        if state.get("mean") is not None:
            self.mean, self.std = state["mean"], state["std"]

    def scale(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mean is None or self.std is None:
            raise DataError("task=regression has no target scaling yet: it is learnt from the training split.")
        return (
            torch.tensor(self.mean, dtype=torch.float32, device=like.device),
            torch.tensor(self.std, dtype=torch.float32, device=like.device),
        )

    # --- training -----------------------------------------------------------------------------
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
        real = self.real(labels)
        mean, std = self.scale(outputs)
        outputs, targets = outputs[real].float(), (labels[real].float() - mean) / std
        if self.loss_name == "huber":
            per_value = F.huber_loss(outputs, targets, delta=self.huber_delta, reduction="none")
        else:
            per_value = F.mse_loss(outputs, targets, reduction="none")
        per_image = per_value.mean(dim=-1)
        return per_image.sum() if reduction == "sum" else per_image.mean() if len(per_image) else per_image.sum()

    def probabilities(self, outputs: torch.Tensor) -> torch.Tensor:
        """Values in the data's units (the name is the interface's: what the outputs decode to)."""
        mean, std = self.scale(outputs)
        return outputs.float() * std + mean

    def predicted(self, probabilities: torch.Tensor) -> torch.Tensor:
        return probabilities

    def above(self, values: torch.Tensor) -> torch.Tensor:
        assert self.threshold is not None, "metrics of a decision need task.threshold"
        return (values >= self.threshold).long().flatten()

    def metrics(self, num_classes: int, prefix: str) -> MetricCollection:
        metrics: dict[str, Metric | MetricCollection] = {
            "mae": MeanAbsoluteError(),
            "rmse": MeanSquaredError(squared=False),
            "r2": R2Score(num_outputs=num_classes)
            if num_classes > 1
            else LambdaInputTransformer(
                R2Score(), transform_pred=lambda v: v.flatten(), transform_target=lambda t: t.flatten()
            ),
        }
        if self.threshold is not None:
            metrics["acc"] = LambdaInputTransformer(
                MulticlassAccuracy(2, average="micro"), transform_pred=self.above, transform_target=self.above
            )
            metrics["f1"] = LambdaInputTransformer(
                MulticlassF1Score(2, average="macro"), transform_pred=self.above, transform_target=self.above
            )
            # AUROC ranks the values themselves (torchmetrics squashes scores outside [0, 1] with a
            # sigmoid, which keeps their order).
            metrics["auroc"] = LambdaInputTransformer(
                BinaryAUROC(), transform_pred=lambda v: v.flatten(), transform_target=self.above
            )
        return MetricCollection(metrics, prefix=prefix, compute_groups=False)

    def train_metric(self, num_classes: int) -> tuple[str, Metric]:
        return "mae", MeanAbsoluteError()

    def confusion(self, num_classes: int) -> Metric | None:
        return None

    def default_target(self, decoded: torch.Tensor) -> int:
        return 0  # the first target: what raises its value

    def score(self, outputs: torch.Tensor, target: int) -> torch.Tensor:
        return outputs[0, target]

    def describe_output(self) -> str:
        return (
            f"one standardised value per target {self.targets}; multiply by std {self.std} and add mean "
            f"{self.mean} for the data's units"
        )

    # --- outputs ------------------------------------------------------------------------------
    def prediction_header(self, names: Sequence[str]) -> list[str]:
        return [f"predicted_{name}" for name in names] + (["above_threshold"] if self.threshold is not None else [])

    def prediction_cells(self, row: torch.Tensor, names: Sequence[str]) -> list[str]:
        cells = [f"{float(v):.6f}" for v in row]
        return cells + ([str(int(float(row[0]) >= self.threshold))] if self.threshold is not None else [])

    def describe(self, row: torch.Tensor, names: Sequence[str]) -> dict[str, Any]:
        described: dict[str, Any] = {"values": {name: float(v) for name, v in zip(names, row.tolist())}}
        if self.threshold is not None:
            described["above_threshold"] = bool(float(row[0]) >= self.threshold)
        return described

    def tally(self, decoded: torch.Tensor, names: Sequence[str]) -> dict[str, Any]:
        """predict's summary: the mean predicted value per target."""
        means = decoded.mean(dim=0).tolist() if len(decoded) else [float("nan")] * len(names)
        return {f"mean {name}": round(m, 6) for name, m in zip(names, means)}

    def true_text(self, answer: Any, names: Sequence[str]) -> str:
        return ";".join(f"{float(v):.6f}" for v in np.atleast_1d(answer))
