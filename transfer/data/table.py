"""`ImageTable`: what a run knows about a dataset before any image is decoded.

A data source (`transfer.data.sources`, or a function of the user's own) returns one; the task
(`transfer.tasks`) then reads its labels, the splits (`transfer.data.splits`) carve it, and the
datamodule decodes its files on demand.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from transfer.errors import DataError

SPLIT_NAMES = ("train", "val", "test")
SPLIT_ALIASES = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
    "testing": "test",
}
KINDS = ("classes", "tags", "values")
PAIR_SEPARATOR = ";"  # between the column=value pairs one label holds for several label columns
# The label of rows that are only padding (an evaluation split evened out across processes,
# `transfer.data.samplers.PaddedForProcesses`): losses and metrics leave them out. Float targets
# mark padding with a row of NaN instead.
IGNORE = -100


def join_pairs(pairs: Iterable[tuple[str, object]]) -> str:
    """Several named values as one label text, ``a=1;b=0`` (what `split_pairs` reads back)."""
    return PAIR_SEPARATOR.join(f"{name}={value}" for name, value in pairs)


def split_pairs(text: str) -> dict[str, str] | None:
    """The ``name=value`` pairs of a label made from several label columns (`join_pairs`), or None
    for a label of one column."""
    if "=" not in text:
        return None
    pairs = {}
    for part in (p for p in text.split(PAIR_SEPARATOR) if p.strip()):
        name, _, value = part.partition("=")
        pairs[name.strip()] = value.strip()
    return pairs


@dataclass
class ImageTable:
    """Image files, their labels and class names, and the split a dataset may fix itself.

    A source reads each image's label as a string: ``labels`` index the distinct strings in
    ``class_names``. That is the whole story for single-label tasks (``kind="classes"``). A task whose
    answer is not one class (`transfer.tasks`) parses those strings in its ``arrange``: a multi-label
    table (``kind="tags"``) then has ``targets`` of 0/1 per tag named in ``class_names``, a regression
    table (``kind="values"``) ``targets`` of numbers per target named in ``class_names``, and
    ``labels`` become the strata that splits, folds and samplers balance (the tag combination, or
    the value's quantile bin).
    """

    paths: list[str]
    labels: np.ndarray
    class_names: list[str]
    # Split fixed by the dataset itself ("train"/"val"/"test" per row), or None to split by seed.
    splits: np.ndarray | None = None
    name: str = "images"
    extra: dict[str, Any] = field(default_factory=dict)
    kind: str = "classes"
    targets: np.ndarray | None = None  # float32 (images x class_names) for kinds "tags" and "values"

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if len(self.paths) != len(self.labels):
            raise ValueError("paths and labels differ in length")
        if self.kind not in KINDS:
            raise ValueError(f"kind={self.kind} is not one of {KINDS}")
        if (self.targets is None) != (self.kind == "classes"):
            raise ValueError("targets are given exactly for kinds 'tags' and 'values'")
        if self.targets is not None:
            self.targets = np.asarray(self.targets, dtype=np.float32).reshape(len(self.paths), -1)
        if self.splits is not None:
            self.splits = np.asarray(self.splits, dtype=object)
        if not self.paths:
            raise DataError(f"Dataset '{self.name}' has no images.")
        if self.kind == "classes" and len(self.class_names) < 2:
            raise DataError(
                f"Dataset '{self.name}' has {len(self.class_names)} class ({self.class_names}); "
                "a classifier needs at least two. Add a folder (or CSV label) per class."
            )

    @property
    def num_classes(self) -> int:
        """Classes, tags or regression targets: the head's outputs before the task's own mapping."""
        return len(self.class_names)

    def take(self, rows: np.ndarray) -> ImageTable:
        """The same dataset restricted to ``rows`` (indices, in the order given)."""
        return ImageTable(
            [self.paths[i] for i in rows],
            self.labels[rows],
            self.class_names,
            None if self.splits is None else self.splits[rows],
            self.name,
            self.extra,
            self.kind,
            None if self.targets is None else self.targets[rows],
        )

    def answers(self, rows: np.ndarray | None = None) -> np.ndarray:
        """What the model learns for ``rows`` (all by default): class indices, or the targets."""
        rows = np.arange(len(self.paths)) if rows is None else rows
        return self.labels[rows] if self.targets is None else self.targets[rows]

    def stratify_on(self) -> np.ndarray:
        """What splits and folds keep in proportion: classes or strata, or every tag (iteratively)."""
        if self.kind == "tags":
            assert self.targets is not None
            return self.targets.astype(np.int64)
        return self.labels

    def label_text(self, row: int) -> str:
        """Row ``row``'s label as a string its task reads back (split.csv stores it)."""
        if self.targets is None:
            return self.class_names[self.labels[row]]
        values = self.targets[row]
        if self.kind == "tags":  # in the separator the task read them with (task.separator)
            return str(self.extra.get("separator", ";")).join(
                n for n, value in zip(self.class_names, values, strict=True) if value >= 0.5
            )
        # str of a float32 is its shortest exact form (0.637, not 0.6370000243186951).
        if len(self.class_names) == 1:
            return str(values[0])
        return join_pairs(zip(self.class_names, values, strict=True))

    def counts(self, rows: np.ndarray | None = None) -> dict[str, int | float]:
        """Per class: images; per tag: positive images; per regression target: the mean value."""
        answers = self.answers(rows)
        if self.kind == "classes":
            return dict(zip(self.class_names, np.bincount(answers, minlength=self.num_classes).tolist(), strict=True))
        if self.kind == "tags":
            return dict(zip(self.class_names, answers.sum(axis=0).astype(int).tolist(), strict=True))
        means = answers.mean(axis=0) if len(answers) else np.full(self.num_classes, np.nan)
        return {
            "images": int(len(answers)),
            **{f"mean {n}": round(float(m), 4) for n, m in zip(self.class_names, means, strict=True)},
        }


def first_row_of(table: ImageTable, label: int) -> str:
    """Where label index ``label`` first occurs: the file, and its CSV row when the table came from one."""
    row = int(np.flatnonzero(table.labels == label)[0])
    where = f" (row {row + 2} of {table.extra['csv']})" if "csv" in table.extra else ""
    return f"{table.paths[row]}{where}"


def stratified_subset(rows: np.ndarray, strata: np.ndarray, size: int, seed: int, at_least: int = 1) -> np.ndarray:
    """About ``size`` of ``rows``, each stratum keeping its share (and at least ``at_least`` rows where
    it has them), drawn without replacement with ``seed``; sorted.

    scikit-learn's ``train_test_split(stratify=)`` would draw other rows, and these subsets are what
    earlier runs used (``data.max_images``, the augmentation probe), so the draw stays this one.
    """
    rng = np.random.default_rng(seed)
    keep = []
    for stratum in np.unique(strata):
        members = rows[strata == stratum]
        count = max(at_least, int(round(size * len(members) / len(rows))))
        keep.append(rng.choice(members, size=min(count, len(members)), replace=False))
    return np.sort(np.concatenate(keep))


def subsample(table: ImageTable, max_images: int | None, seed: int) -> ImageTable:
    """At most about ``max_images`` rows, stratified by class (and by predefined split), for quick runs."""
    if not max_images or max_images >= len(table.paths):
        return table
    strata = (
        table.labels.astype(str)
        if table.splits is None
        else np.char.add(table.labels.astype(str), table.splits.astype(str))
    )
    return table.take(stratified_subset(np.arange(len(table.paths)), strata, max_images, seed))
