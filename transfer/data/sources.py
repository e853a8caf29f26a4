"""Dataset sources: each turns a user's data into an `ImageTable` (files, labels, class names).

A source is chosen by the `data` config group and built with Hydra's ``_target_``; adding a
dataset means adding one function here (or anywhere importable) that returns an `ImageTable`
(`transfer.data.table`, also importable from here).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from transfer.data.download import fetch_archive
from transfer.data.table import SPLIT_ALIASES, ImageTable, join_pairs
from transfer.errors import DataError

__all__ = ["ImageTable", "csv_manifest", "elpv", "hotdog", "image_folder", "tag_folders"]


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
        raise DataError(
            f"Image folder '{root}' does not exist. Set data.root to a folder with one "
            "sub-folder per class (optionally inside train/, val/ and test/)."
        )
    extensions = tuple(e.lower() for e in extensions)
    split_dirs = {
        SPLIT_ALIASES[p.name.lower()]: p for p in root.iterdir() if p.is_dir() and p.name.lower() in SPLIT_ALIASES
    }
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
            raise DataError(
                f"'{directory}' has classes {extra} that '{split_dirs['train']}' lacks; "
                "every split must use the training classes."
            )
        split_paths, split_labels = _folder_samples(directory, class_names, extensions)
        paths += split_paths
        labels += split_labels
        splits += [split] * len(split_paths)
    return ImageTable(paths, np.array(labels), class_names, np.array(splits, dtype=object), name=root.name)


def tag_folders(
    root: str | os.PathLike, untagged: str | None = None, extensions: Sequence[str] = IMG_EXTENSIONS
) -> ImageTable:
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
            raise DataError(
                f"'{name}' is in the untagged folder '{untagged}' and in tag folder(s) "
                f"{[t for t in tags if t != untagged]} of '{root}'; keep it in one or the other."
            )
        texts.append(";".join(t for t in tags if t != untagged))
    class_names = sorted(set(texts))
    labels = np.array([class_names.index(text) for text in texts])
    return ImageTable([first[name] for name in found], labels, class_names, name=root.name)


def csv_manifest(
    path: str | os.PathLike,
    path_column: str = "path",
    label_column: str | Sequence[str] = "label",
    split_column: str | None = None,
    root: str | os.PathLike | None = None,
) -> ImageTable:
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
        raise DataError(
            f"CSV manifest '{path}' lacks column(s) {missing_columns}; it has "
            f"{list(rows[0]) if rows else 'no rows'}. Set data.path_column / data.label_column."
        )
    paths = [str(base / row[path_column]) for row in rows]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DataError(
            f"{len(missing)} file(s) listed in '{path}' do not exist, e.g. "
            f"{missing[:3]}. Fix the paths or remove those rows."
        )
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
            raise DataError(
                f"Unknown split {error} in column '{split_column}' of '{path}'; use one of {sorted(SPLIT_ALIASES)}."
            ) from None
    extra = {"csv": str(path), "label_columns": label_columns}
    return ImageTable(paths, labels, class_names, splits, name=path.stem, extra=extra)


ELPV_TASKS = {
    # task: (class names, function from (defect probability, cell type) to class index)
    "defective": (["functional", "defective"], lambda p, t: int(p >= 0.5)),
    "severity": (["p0", "p1_3", "p2_3", "p1"], lambda p, t: int(round(p * 3))),
    "cell_type": (["mono", "poly"], lambda p, t: ["mono", "poly"].index(t)),
}
ELPV_VIEWS = {
    # view: function from (defect probability as written, cell type) to the label text a task parses
    "probability": lambda p, t: p,  # task=regression
    "tags": lambda p, t: ";".join(
        tag for tag, on in (("defective", float(p) >= 0.5), ("poly", t == "poly")) if on
    ),  # task=multilabel
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
    extracted = fetch_archive(url, checksum, cache_dir, "hotdog")
    root = extracted / "hotdog" if (extracted / "hotdog").is_dir() else extracted
    table = image_folder(root)
    table.name = "hotdog"
    return table
