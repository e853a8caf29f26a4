"""Several tags per image (a dish both "fried" and "spicy"): one sigmoid output per tag.

Labels are read per image as tags separated by ``separator`` (``fried;spicy``, an empty label for
none), or from one 0/1 column per tag (``data.source.label_column=[fried,spicy]``, read as
``fried=1;spicy=0``). The loss is binary cross-entropy per tag (``pos_weight=balanced`` weighs each
tag's positives by its negatives-to-positives ratio on the training split).

Decisions use a threshold per tag, chosen after every validation as the one with the best F1 on
the validation split, and saved in the checkpoint with the model: tags with few positives get a
threshold that suits them instead of 0.5. Metrics: ``map`` (macro average precision over tags,
threshold-free, the monitored metric), ``map_micro``, and ``f1`` / ``f1_micro`` at the thresholds.
Splits and folds keep every tag's share by iterative stratification (`transfer.data.splits`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MultilabelAveragePrecision, MultilabelF1Score
from torchmetrics.wrappers import LambdaInputTransformer

from transfer.data.table import ImageTable, first_row_of, split_pairs
from transfer.errors import DataError
from transfer.tasks.base import Task

TRUE, FALSE = {"1", "1.0", "true", "yes"}, {"0", "0.0", "false", "no", ""}


def best_f1_threshold(probabilities: np.ndarray, positives: np.ndarray) -> float:
    """The threshold on one tag's probabilities with the highest F1 on these images (0.5 without
    positives); midway between neighbouring probabilities, so it does not sit on an image's score."""
    if not positives.any() or positives.all():
        return 0.5
    order = np.argsort(-probabilities, kind="stable")
    scores, hits = probabilities[order], positives[order].astype(np.float64)
    true_positives = np.cumsum(hits)
    predicted = np.arange(1, len(scores) + 1)
    f1 = 2 * true_positives / (predicted + hits.sum())
    # Only cut where the next image scores lower: equal scores cannot be told apart.
    cut = np.append(scores[1:] < scores[:-1], True)
    best = int(np.flatnonzero(cut)[np.argmax(f1[cut])])
    below = scores[best + 1] if best + 1 < len(scores) else 0.0
    return float((scores[best] + below) / 2)


class Multilabel(Task):
    """Tags per image: one sigmoid output per tag, binary cross-entropy, per-tag thresholds."""

    name = "multilabel"
    kind = "tags"

    def __init__(
        self,
        labels: Sequence[str] | None = None,
        separator: str = ";",
        pos_weight: str | Sequence[float] | None = None,
        thresholds: Sequence[float] | None = None,
    ) -> None:
        self.labels = list(labels) if labels is not None else None
        if self.labels is not None and (not self.labels or len(set(self.labels)) != len(self.labels)):
            raise DataError(f"task.labels={self.labels}: give at least one tag, each once.")
        self.separator = separator
        if isinstance(pos_weight, str) and pos_weight != "balanced":
            raise DataError(f"task.pos_weight={pos_weight}: use null, balanced or one number per tag.")
        self.pos_weight = pos_weight if isinstance(pos_weight, str) or pos_weight is None else list(pos_weight)
        self.thresholds = list(thresholds) if thresholds is not None else None

    # --- labels -------------------------------------------------------------------------------
    def parse(self, text: str) -> dict[str, bool]:
        """One label: ``a;b`` (the tags present, split at ``separator``) or, from one 0/1 column per
        tag, ``a=1;b=0`` (`transfer.data.sources.split_pairs`)."""
        pairs = split_pairs(text)
        if pairs is None:
            return {part.strip(): True for part in text.split(self.separator) if part.strip()}
        tags = {}
        for tag, value in pairs.items():
            if value.lower() not in TRUE | FALSE:
                raise ValueError(f"'{value}' for tag '{tag}' is not 0/1")
            tags[tag] = value.lower() in TRUE
        return tags

    def arrange(self, table: ImageTable) -> ImageTable:
        if table.kind == "tags":
            return table
        parsed = []
        for index, text in enumerate(table.class_names):
            try:
                parsed.append(self.parse(text))
            except ValueError as error:
                raise DataError(
                    f"Label '{text}' of {first_row_of(table, index)}: {error}. task=multilabel reads "
                    f"tags separated by '{self.separator}', or one 0/1 column per tag."
                ) from None
        seen = sorted({tag for tags in parsed for tag in tags})
        tags = self.labels if self.labels is not None else seen
        unknown = [tag for tag in seen if tag not in tags]
        if unknown:
            index = next(i for i, found in enumerate(parsed) if set(found) - set(tags))
            raise DataError(
                f"Tag(s) {unknown} are not in task.labels={tags}, e.g. in '{table.class_names[index]}' "
                f"of {first_row_of(table, index)}. Fix the labels, or add the tags to task.labels."
            )
        self.labels = list(tags)
        per_label = np.array([[float(found.get(tag, False)) for tag in tags] for found in parsed], dtype=np.float32)
        # labels stay the index of each image's tag combination: what subsets and samplers balance.
        return ImageTable(
            table.paths,
            table.labels,
            list(tags),
            table.splits,
            table.name,
            {**table.extra, "separator": self.separator},
            kind="tags",
            targets=per_label[table.labels],
        )

    def fit(self, table: ImageTable, rows: np.ndarray) -> None:
        assert table.targets is not None, "arrange() made the targets"
        targets = table.targets[rows]
        missing = [tag for tag, count in zip(table.class_names, targets.sum(axis=0)) if count == 0]
        if missing:
            raise DataError(
                f"No training image has tag(s) {missing}: the model cannot learn them. Add images, "
                "or leave the tags out of task.labels."
            )
        if self.pos_weight == "balanced":
            positives = targets.sum(axis=0)
            self.pos_weight = np.round((len(targets) - positives) / positives, 6).tolist()

    def state(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "labels": self.labels,
            "separator": self.separator,
            "pos_weight": self.pos_weight,
            "thresholds": self.thresholds,
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.thresholds = state.get("thresholds")

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
        outputs, targets = outputs[real].float(), labels[real].float()
        if label_smoothing:
            targets = targets * (1.0 - label_smoothing) + label_smoothing / 2
        weight = torch.tensor(self.pos_weight, device=outputs.device) if isinstance(self.pos_weight, list) else None
        per_image = F.binary_cross_entropy_with_logits(outputs, targets, pos_weight=weight, reduction="none").mean(
            dim=-1
        )
        return per_image.sum() if reduction == "sum" else per_image.mean() if len(per_image) else per_image.sum()

    def probabilities(self, outputs: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(outputs.float())

    def threshold_tensor(self, like: torch.Tensor) -> torch.Tensor:
        values = self.thresholds if self.thresholds is not None else [0.5] * like.shape[-1]
        return torch.tensor(values, dtype=like.dtype, device=like.device)

    def predicted(self, probabilities: torch.Tensor) -> torch.Tensor:
        """0/1 per tag: the tag's probability at or above its threshold."""
        return (probabilities >= self.threshold_tensor(probabilities)).long()

    def learn_from_validation(self, probabilities: torch.Tensor, targets: torch.Tensor) -> None:
        scores, positives = probabilities.float().cpu().numpy(), targets.cpu().numpy() >= 0.5
        self.thresholds = [round(best_f1_threshold(scores[:, k], positives[:, k]), 6) for k in range(scores.shape[1])]

    def at_thresholds(self, metric: Metric) -> Metric:
        """``metric`` of the decisions `predicted` makes (its own 0.5 then reads them unchanged)."""
        return LambdaInputTransformer(
            metric, transform_pred=lambda p: self.predicted(p).float(), transform_target=lambda t: t.long()
        )

    def metrics(self, num_classes: int, prefix: str) -> MetricCollection:
        def scores(average: Literal["micro", "macro"]) -> Metric:
            return LambdaInputTransformer(
                MultilabelAveragePrecision(num_classes, average=average), transform_target=lambda t: t.long()
            )

        return MetricCollection(
            {
                "map": scores("macro"),
                "map_micro": scores("micro"),
                "f1": self.at_thresholds(MultilabelF1Score(num_classes, average="macro")),
                "f1_micro": self.at_thresholds(MultilabelF1Score(num_classes, average="micro")),
            },
            prefix=prefix,
            compute_groups=False,
        )

    def train_metric(self, num_classes: int) -> tuple[str, Metric]:
        return "f1", self.at_thresholds(MultilabelF1Score(num_classes, average="macro"))

    def confusion(self, num_classes: int) -> Metric | None:
        return None

    def default_target(self, decoded: torch.Tensor) -> int:
        return int(decoded.argmax())  # the most probable tag

    def score(self, outputs: torch.Tensor, target: int) -> torch.Tensor:
        return outputs[0, target]

    def describe_output(self) -> str:
        return (
            f"one logit per tag; sigmoid gives each tag's probability, and a tag is predicted at or above "
            f"its threshold {self.thresholds or 0.5} (chosen on validation)"
        )

    # --- outputs ------------------------------------------------------------------------------
    def tags_of(self, row: torch.Tensor, names: Sequence[str]) -> list[str]:
        return [name for name, on in zip(names, self.predicted(row[None])[0].tolist()) if on]

    def prediction_header(self, names: Sequence[str]) -> list[str]:
        return ["predicted", *[f"p_{name}" for name in names]]

    def prediction_cells(self, row: torch.Tensor, names: Sequence[str]) -> list[str]:
        return [self.separator.join(self.tags_of(row, names)), *[f"{float(p):.6f}" for p in row]]

    def describe(self, row: torch.Tensor, names: Sequence[str]) -> dict[str, Any]:
        return {
            "tags": self.tags_of(row, names),
            "probabilities": {name: float(p) for name, p in zip(names, row.tolist())},
            "thresholds": dict(zip(names, self.threshold_tensor(row).tolist())),
        }

    def tally(self, decoded: torch.Tensor, names: Sequence[str]) -> dict[str, Any]:
        """predict's summary: images predicted to have each tag."""
        counts = self.predicted(decoded).sum(dim=0).tolist() if len(decoded) else [0] * len(names)
        return dict(zip(names, counts))

    def true_text(self, answer: Any, names: Sequence[str]) -> str:
        return self.separator.join(name for name, on in zip(names, np.asarray(answer).tolist()) if on >= 0.5)
