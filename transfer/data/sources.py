"""Dataset sources: each turns a user's data into an `ImageTable` (files, labels, class names).

A source is chosen by the `data` config group and built with Hydra's ``_target_``; adding a
dataset means adding one function here (or anywhere importable) that returns an `ImageTable`.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from transfer.data.download import download, extract
from transfer.errors import DataError

SPLIT_NAMES = ("train", "val", "test")
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val",
                 "validation": "val", "test": "test", "testing": "test"}


KINDS = ("classes", "tags", "values")
PAIR_SEPARATOR = ";"  # between the column=value pairs one label holds for several label columns


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
    """Everything a run needs to know about a dataset before any image is decoded.

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
    extra: dict = field(default_factory=dict)
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

    def take(self, rows: np.ndarray) -> "ImageTable":
        """The same dataset restricted to ``rows`` (indices, in the order given)."""
        return ImageTable([self.paths[i] for i in rows], self.labels[rows], self.class_names,
                          None if self.splits is None else self.splits[rows], self.name, self.extra, self.kind,
                          None if self.targets is None else self.targets[rows])

    def answers(self, rows: np.ndarray | None = None) -> np.ndarray:
        """What the model learns for ``rows`` (all by default): class indices, or the targets."""
        rows = np.arange(len(self.paths)) if rows is None else rows
        return self.labels[rows] if self.targets is None else self.targets[rows]

    def stratify_on(self) -> np.ndarray:
        """What splits and folds keep in proportion: classes or strata, or every tag (iteratively)."""
        return self.targets.astype(np.int64) if self.kind == "tags" else self.labels

    def label_text(self, row: int) -> str:
        """Row ``row``'s label as a string its task reads back (split.csv stores it)."""
        if self.kind == "classes":
            return self.class_names[self.labels[row]]
        values = self.targets[row]
        if self.kind == "tags":  # in the separator the task read them with (task.separator)
            return self.extra.get("separator", ";").join(n for n, value in zip(self.class_names, values) if value >= 0.5)
        # str of a float32 is its shortest exact form (0.637, not 0.6370000243186951).
        if len(self.class_names) == 1:
            return str(values[0])
        return join_pairs(zip(self.class_names, values))

    def counts(self, rows: np.ndarray | None = None) -> dict[str, int | float]:
        """Per class: images; per tag: positive images; per regression target: the mean value."""
        answers = self.answers(rows)
        if self.kind == "classes":
            return dict(zip(self.class_names, np.bincount(answers, minlength=self.num_classes).tolist()))
        if self.kind == "tags":
            return dict(zip(self.class_names, answers.sum(axis=0).astype(int).tolist()))
        means = answers.mean(axis=0) if len(answers) else np.full(self.num_classes, np.nan)
        return {"images": int(len(answers)), **{f"mean {n}": round(float(m), 4) for n, m in zip(self.class_names, means)}}


def subsample(table: ImageTable, max_images: int | None, seed: int) -> ImageTable:
    """At most ``max_images`` rows, stratified by class (and by predefined split), for quick runs."""
    if not max_images or max_images >= len(table.paths):
        return table
    rng = np.random.default_rng(seed)
    strata = table.labels.astype(str) if table.splits is None else np.char.add(
        table.labels.astype(str), table.splits.astype(str))
    keep = []
    for stratum in np.unique(strata):
        members = np.flatnonzero(strata == stratum)
        count = max(1, int(round(max_images * len(members) / len(strata))))
        keep.append(rng.choice(members, size=min(count, len(members)), replace=False))
    return table.take(np.sort(np.concatenate(keep)))


def _folder_samples(root: Path, class_names: Sequence[str], extensions: tuple[str, ...]):
    class_to_idx = {name: index for index, name in enumerate(class_names)}
    present = [name for name in class_names if (root / name).is_dir()]
    try:
        samples = make_dataset(str(root), {n: class_to_idx[n] for n in present}, extensions=extensions)
    except FileNotFoundError as error:  # torchvision: "Found no valid file for the classes ..."
        raise DataError(
            f"In '{root}': {error}. Every class folder needs at least one image with one of the "
            f"extensions {', '.join(extensions)}; remove empty class folders or add images."
        ) from error
    return [path for path, _ in samples], [label for _, label in samples]


def image_folder(root: str | os.PathLike, extensions: Sequence[str] = IMG_EXTENSIONS) -> ImageTable:
    """An ImageFolder tree: ``root/<class>/*.jpg``, or ``root/{train,val,test}/<class>/*.jpg``."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"Image folder '{root}' does not exist. Set data.root to a folder with one "
                        "sub-folder per class (optionally inside train/, val/ and test/).")
    extensions = tuple(e.lower() for e in extensions)
    split_dirs = {SPLIT_ALIASES[p.name.lower()]: p for p in root.iterdir()
                  if p.is_dir() and p.name.lower() in SPLIT_ALIASES}
    if not split_dirs:
        class_names, _ = find_classes(str(root))
        paths, labels = _folder_samples(root, class_names, extensions)
        return ImageTable(paths, np.array(labels), class_names, name=root.name)
    if "train" not in split_dirs:
        raise DataError(f"'{root}' has {sorted(split_dirs)} folders but no train/ folder.")
    class_names, _ = find_classes(str(split_dirs["train"]))
    paths, labels, splits = [], [], []
    for split, directory in split_dirs.items():
        extra = sorted({p.name for p in directory.iterdir() if p.is_dir()} - set(class_names))
        if extra:
            raise DataError(f"'{directory}' has classes {extra} that '{split_dirs['train']}' lacks; "
                            "every split must use the training classes.")
        split_paths, split_labels = _folder_samples(directory, class_names, extensions)
        paths += split_paths
        labels += split_labels
        splits += [split] * len(split_paths)
    return ImageTable(paths, np.array(labels), class_names, np.array(splits, dtype=object), name=root.name)


def tag_folders(root: str | os.PathLike, untagged: str | None = None,
                extensions: Sequence[str] = IMG_EXTENSIONS) -> ImageTable:
    """Multi-label images as folders of tags: ``root/<tag>/<file>``, an image in several tag
    folders (the same file name in each) carrying all of them, for task=multilabel.

    ``untagged``: a folder whose images have no tag (e.g. ``none``). A file name found in
    ``untagged`` and in a tag folder is an error naming both.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"Tag folder '{root}' does not exist. Set data.root to a folder with one sub-folder per tag.")
    extensions = tuple(e.lower() for e in extensions)
    found: dict[str, list[str]] = {}
    first: dict[str, str] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        for file in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in extensions):
            name = str(file.relative_to(folder))
            first.setdefault(name, str(file))
            found.setdefault(name, []).append(folder.name)
    if not found:
        raise DataError(f"'{root}' has no images in tag folders (extensions {', '.join(extensions)}).")
    texts = []
    for name, tags in found.items():
        if untagged is not None and untagged in tags and len(tags) > 1:
            raise DataError(f"'{name}' is in the untagged folder '{untagged}' and in tag folder(s) "
                            f"{[t for t in tags if t != untagged]} of '{root}'; keep it in one or the other.")
        texts.append(";".join(t for t in tags if t != untagged))
    class_names = sorted(set(texts))
    labels = np.array([class_names.index(text) for text in texts])
    return ImageTable([first[name] for name in found], labels, class_names, name=root.name)


def csv_manifest(path: str | os.PathLike, path_column: str = "path", label_column: str | Sequence[str] = "label",
                 split_column: str | None = None, root: str | os.PathLike | None = None) -> ImageTable:
    """A CSV with one row per image; relative paths are resolved against ``root`` or the CSV's folder.

    ``label_column``: one column (a class, separated tags, or a number, as the task reads it), or a
    list of columns (one 0/1 column per tag for task=multilabel, one number per target for
    task=regression), read as ``column=value`` pairs joined by ``;``.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"CSV manifest '{path}' does not exist. Set data.csv=PATH.")
    base = Path(root).expanduser() if root is not None else path.parent
    with open(path, newline="") as stream:
        rows = list(csv.DictReader(stream))
    label_columns = [label_column] if isinstance(label_column, str) else list(label_column)
    columns = [path_column, *label_columns] + ([split_column] if split_column else [])
    missing_columns = [c for c in columns if not rows or c not in rows[0]]
    if missing_columns:
        raise DataError(f"CSV manifest '{path}' lacks column(s) {missing_columns}; it has "
                        f"{list(rows[0]) if rows else 'no rows'}. Set data.path_column / data.label_column.")
    paths = [str(base / row[path_column]) for row in rows]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(f"{len(missing)} file(s) listed in '{path}' do not exist, e.g. "
                        f"{missing[:3]}. Fix the paths or remove those rows.")
    if len(label_columns) == 1:
        texts = [row[label_columns[0]].strip() for row in rows]
    else:
        texts = [join_pairs((column, row[column].strip()) for column in label_columns) for row in rows]
    class_names = sorted(set(texts))
    index = {name: i for i, name in enumerate(class_names)}
    labels = np.array([index[text] for text in texts])
    splits = None
    if split_column:
        try:
            splits = np.array([SPLIT_ALIASES[row[split_column].strip().lower()] for row in rows], dtype=object)
        except KeyError as error:
            raise DataError(f"Unknown split {error} in column '{split_column}' of '{path}'; "
                            f"use one of {sorted(SPLIT_ALIASES)}.") from None
    extra = {"csv": str(path), "label_columns": label_columns}
    return ImageTable(paths, labels, class_names, splits, name=path.stem, extra=extra)


def first_row_of(table: ImageTable, label: int) -> str:
    """Where label index ``label`` first occurs: the file, and its CSV row when the table came from one."""
    row = int(np.flatnonzero(table.labels == label)[0])
    where = f" (row {row + 2} of {table.extra['csv']})" if "csv" in table.extra else ""
    return f"{table.paths[row]}{where}"


ELPV_TASKS = {
    # task: (class names, function from (defect probability, cell type) to class index)
    "defective": (["functional", "defective"], lambda p, t: int(p >= 0.5)),
    "severity": (["p0", "p1_3", "p2_3", "p1"], lambda p, t: int(round(p * 3))),
    "cell_type": (["mono", "poly"], lambda p, t: ["mono", "poly"].index(t)),
}
ELPV_VIEWS = {
    # view: function from (defect probability as written, cell type) to the label text a task parses
    "probability": lambda p, t: p,                                         # task=regression
    "tags": lambda p, t: ";".join(tag for tag, on in (("defective", float(p) >= 0.5),
                                                      ("poly", t == "poly")) if on),  # task=multilabel
}


def elpv(task: str = "defective", labels_csv: str | None = None) -> ImageTable:
    """ELPV solar cells (Buerhop-Lutz et al. 2018; Deitsch et al. 2019), from the `elpv-dataset` package.

    Class tasks: ``defective`` (defect probability >= 0.5 vs functional), ``severity`` (the four
    annotated probabilities 0, 1/3, 2/3, 1) and ``cell_type`` (mono vs poly crystalline). Views for
    other tasks: ``probability`` (the defect probability as a number, for task=regression) and
    ``tags`` (``defective`` and ``poly`` as two tags, for task=multilabel).
    """
    if task not in ELPV_TASKS and task not in ELPV_VIEWS:
        raise DataError(f"Unknown ELPV task '{task}'; choose one of {sorted([*ELPV_TASKS, *ELPV_VIEWS])}.")
    if labels_csv is None:
        try:
            import elpv_dataset
        except ImportError as error:
            raise DataError("The ELPV dataset needs the package: pip install elpv-dataset") from error
        labels_csv = os.path.join(os.path.dirname(elpv_dataset.__file__), "data", "labels.csv")
    base = Path(labels_csv).parent
    paths, found = [], []
    with open(labels_csv) as stream:
        for line in stream:
            if line.strip():
                name, probability, cell_type = line.split()
                paths.append(str(base / name))
                found.append((probability, cell_type))
    if task in ELPV_TASKS:
        class_names, to_label = ELPV_TASKS[task]
        labels = [to_label(float(p), t) for p, t in found]
        return ImageTable(paths, np.array(labels), list(class_names), name=f"elpv-{task}")
    texts = [ELPV_VIEWS[task](p, t) for p, t in found]
    class_names = sorted(set(texts))
    return ImageTable(paths, np.array([class_names.index(t) for t in texts]), class_names, name=f"elpv-{task}")


def hotdog(url: str, checksum: str | None, cache_dir: str | os.PathLike) -> ImageTable:
    """The d2l.ai hot dog / not hot dog dataset (train and test folders), downloaded once and cached."""
    cache_dir = Path(cache_dir).expanduser()
    archive = download(url, cache_dir / "hotdog.zip", checksum)
    extracted = extract(archive, cache_dir / "hotdog")
    root = extracted / "hotdog" if (extracted / "hotdog").is_dir() else extracted
    table = image_folder(root)
    table.name = "hotdog"
    return table
