"""Stratified, seeded, disjoint train/val/test splits.

Single-label data is stratified class by class. Multi-label data (a 0/1 matrix, one column per
tag) is split by iterative stratification (Sechidis et al. 2011; Szymanski & Kajdanowicz 2017),
from the `iterative-stratification` package: every tag keeps its share in each split, rare
tags first, where one split per tag combination would leave most combinations too small to split.
"""

from __future__ import annotations

import numpy as np


def _take_stratified(indices: np.ndarray, labels: np.ndarray, fraction: float,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Split ``indices`` into (rest, taken) with ``fraction`` of every class (or tag) in ``taken``."""
    if labels.ndim == 2:
        return _take_multilabel(indices, labels, fraction, rng)
    taken = []
    for label in np.unique(labels[indices]):
        members = indices[labels[indices] == label]
        members = members[rng.permutation(len(members))]
        count = int(round(fraction * len(members)))
        if fraction > 0 and count == 0 and len(members) >= 3:
            count = 1  # a rare class still appears in every split when it can
        taken.append(members[:count])
    taken_indices = np.sort(np.concatenate(taken)) if taken else np.array([], dtype=np.int64)
    rest = np.setdiff1d(indices, taken_indices)
    return rest, taken_indices


def _take_multilabel(indices: np.ndarray, tags: np.ndarray, fraction: float,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

    count = int(round(fraction * len(indices)))
    if count == 0 or count >= len(indices):
        return (indices, indices[:0]) if count == 0 else (indices[:0], indices)
    splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=count,
                                                random_state=int(rng.integers(2**31 - 1)))
    rest, taken = next(splitter.split(np.zeros(len(indices)), tags[indices]))
    return np.sort(indices[rest]), np.sort(indices[taken])


def split_indices(labels: np.ndarray, test_fraction: float, val_fraction: float, seed: int,
                  predefined: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Indices for "train", "val" and "test"; ``labels``: class indices, or a 0/1 tag matrix.

    ``test_fraction`` is a fraction of the whole dataset; ``val_fraction`` a fraction of what remains
    for training (so 0.25 / 0.1 gives the 75/25 train/test protocol with a tenth of train held out
    for model selection). Splits the dataset already defines (``predefined``) are kept; only the
    missing ones are carved, stratified by class, from its training part.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    everything = np.arange(len(labels))
    if predefined is None:
        predefined = np.full(len(labels), "train", dtype=object)
        predefined_test = False
    else:
        predefined_test = bool((predefined == "test").any())
    train = everything[predefined == "train"]
    test = everything[predefined == "test"]
    val = everything[predefined == "val"]
    if not predefined_test and test_fraction > 0:
        train, test = _take_stratified(train, labels, test_fraction, rng)
    if len(val) == 0 and val_fraction > 0:
        train, val = _take_stratified(train, labels, val_fraction, rng)
    return {"train": train, "val": val, "test": test}
