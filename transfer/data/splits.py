"""Stratified, seeded, disjoint train/val/test splits, and the folds of a cross-validation.

Each share is of the images left when its split is carved, test first: ``data.split.test`` of the
images without a split of their own (all of them, unless the dataset has ``train/`` and ``test/``
folders or a split column), ``data.split.val`` of the training images the test split left. So
test 0.25 and val 0.1 give 2,624 ELPV cells a 1,771 / 197 / 656 split (the 75/25 protocol, a
tenth of the training part for validation), and 0.2 and 0.1 a plain folder 72 / 8 / 20.

Single-label data is stratified class by class, with our own seeded draw: scikit-learn's
``train_test_split(stratify=)`` draws other images, and users compare runs on "the same 656 test
images". Multi-label data (a 0/1 matrix, one column per tag) is split by iterative stratification
(Sechidis et al. 2011; Szymanski & Kajdanowicz 2017) from the `iterative-stratification` package:
every tag keeps its share in each split, rare tags first, where one split per tag combination would
leave most combinations too small to split. Folds come from scikit-learn's ``StratifiedKFold`` and
`iterative-stratification`'s ``MultilabelStratifiedKFold``.
"""

from __future__ import annotations

import numpy as np

from transfer.errors import DataError


def _take_stratified(
    indices: np.ndarray, labels: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``indices`` into (rest, taken) with ``fraction`` of every class (or tag) in ``taken``."""
    if labels.ndim == 2:
        return _take_multilabel(indices, labels, fraction, rng)
    taken = []
    for label in np.unique(labels[indices]):
        members = indices[labels[indices] == label]
        members = members[rng.permutation(len(members))]
        count = round(fraction * len(members))
        if fraction > 0 and count == 0 and len(members) >= 3:
            count = 1  # a rare class still appears in every split when it can
        taken.append(members[:count])
    taken_indices = np.sort(np.concatenate(taken)) if taken else np.array([], dtype=np.int64)
    rest = np.setdiff1d(indices, taken_indices)
    return rest, taken_indices


def _take_multilabel(
    indices: np.ndarray, tags: np.ndarray, fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    from iterstrat.ml_stratifiers import MultilabelStratifiedShuffleSplit

    count = round(fraction * len(indices))
    if count == 0 or count >= len(indices):
        return (indices, indices[:0]) if count == 0 else (indices[:0], indices)
    splitter = MultilabelStratifiedShuffleSplit(n_splits=1, test_size=count, random_state=int(rng.integers(2**31 - 1)))
    rest, taken = next(splitter.split(np.zeros(len(indices)), tags[indices]))
    return np.sort(indices[rest]), np.sort(indices[taken])


def split_indices(
    labels: np.ndarray, test: float, val: float, seed: int, predefined: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Indices for "train", "val" and "test"; ``labels``: class indices, or a 0/1 tag matrix.

    Splits the dataset defines (``predefined``) are kept; the missing ones are carved, stratified,
    from its training images: ``test`` of them first, then ``val`` of those the test split left.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    everything = np.arange(len(labels))
    if predefined is None:
        predefined = np.full(len(labels), "train", dtype=object)
    train = everything[predefined == "train"]
    test_rows = everything[predefined == "test"]
    val_rows = everything[predefined == "val"]
    if len(test_rows) == 0 and test > 0:
        train, test_rows = _take_stratified(train, labels, test, rng)
    if len(val_rows) == 0 and val > 0:
        train, val_rows = _take_stratified(train, labels, val, rng)
    return {"train": train, "val": val_rows, "test": test_rows}


def fold_splits(labels: np.ndarray, pool: np.ndarray, folds: int, seed: int) -> list[np.ndarray]:
    """The validation indices of each fold: a stratified, seeded partition of ``pool``; ``labels``
    are classes (or strata), or a 0/1 tag matrix (iterative stratification)."""
    from sklearn.model_selection import StratifiedKFold

    if labels.ndim == 2:
        from iterstrat.ml_stratifiers import MultilabelStratifiedKFold

        splitter = MultilabelStratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
        return [pool[np.sort(held_out)] for _, held_out in splitter.split(np.zeros(len(pool)), labels[pool])]
    counts = np.bincount(labels[pool])
    if counts[counts > 0].min() < folds:
        raise DataError(
            f"cv.folds={folds} needs at least {folds} training images of every class; the smallest "
            f"class has {counts[counts > 0].min()}. Use fewer folds or more images."
        )
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [pool[held_out] for _, held_out in splitter.split(pool, labels[pool])]
