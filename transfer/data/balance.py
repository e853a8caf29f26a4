"""Class coverage of the splits and class imbalance: warn, or weight the loss, before training."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np

from transfer.errors import DataError

log = logging.getLogger("transfer")
IMBALANCE_WARNING_RATIO = 3.0


def check_split_classes(counts: Mapping[str, Mapping[str, int]]) -> None:
    """Training must see every class; evaluation splits without one get a warning."""
    missing = [name for name, n in counts["train"].items() if n == 0]
    if missing:
        raise DataError(
            f"The training split has no images of class(es) {missing}: the model cannot learn "
            "them. Add images of those classes, or remove their folders/rows."
        )
    for split in ("val", "test"):
        absent = [name for name, n in counts.get(split, {}).items() if n == 0]
        if absent and sum(counts.get(split, {}).values()):
            log.warning(
                "The %s split has no images of %s: their per-class metrics are undefined and "
                "macro averages skip them. More data or a larger data.split.%s helps.",
                split,
                absent,
                split,
            )


def imbalance_ratio(train_counts: Mapping[str, int]) -> float:
    sizes = [n for n in train_counts.values() if n > 0]
    return max(sizes) / min(sizes)


def balanced_class_weights(train_counts: Mapping[str, int]) -> list[float]:
    """scikit-learn's 'balanced' weights, ``N / (K * n_k)``: every class weighs the same in the loss."""
    from sklearn.utils.class_weight import compute_class_weight

    classes = np.arange(len(train_counts))
    labels = np.repeat(classes, list(train_counts.values()))
    return [float(w) for w in compute_class_weight("balanced", classes=classes, y=labels)]


def class_weights_for(
    train_counts: Mapping[str, int], setting: str | None, sampler: str = "shuffle"
) -> list[float] | None:
    """The loss weights for ``class_weights=null|balanced``, warning about imbalance left untreated
    (``sampler="balanced"`` treats it by drawing every class equally often)."""
    ratio = imbalance_ratio(train_counts)
    if setting is None:
        if ratio >= IMBALANCE_WARNING_RATIO and sampler != "balanced":
            log.warning(
                "Classes are imbalanced %.1f:1 in the training split (%s); accuracy will favour the "
                "large classes. task.class_weights=balanced weights the loss by inverse class frequency; "
                "data.sampler=balanced draws every class equally often.",
                ratio,
                dict(train_counts),
            )
        return None
    if setting != "balanced":
        raise DataError(f"task.class_weights={setting} is not supported; use null or balanced.")
    if sampler == "balanced":
        log.warning(
            "task.class_weights=balanced with data.sampler=balanced corrects the imbalance twice: "
            "rare classes now outweigh common ones. Use one of the two."
        )
    weights = balanced_class_weights(train_counts)
    log.info(
        "Class weights in the loss (balanced): %s",
        ", ".join(f"{name} {w:.3f}" for name, w in zip(train_counts, weights)),
    )
    return weights
