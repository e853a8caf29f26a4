"""The split a run trained, validated and tested on, saved with the run as ``split.csv``.

A folder can change after training (images added, removed, re-encoded), and a re-split of a
table that lost unreadable images (``bad_images=skip``) is not the run's split. So every run writes
the exact rows it used, with each file's size and modification time, and everything that looks at
the run's data afterwards (``evaluate``, ``export``'s parity images, ``explain split=...`` and a
resumed run) reads that file instead of splitting again. A file that is missing or changed since is
an error that names it: metrics on other images than the run's are never reported silently.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from transfer.config.run_folder import run_folder_of
from transfer.data.csv_files import write_csv
from transfer.data.table import ImageTable
from transfer.errors import DataError

MANIFEST = "split.csv"
COLUMNS = ["path", "label", "split", "bytes", "mtime_ns"]


def file_state(path: str) -> tuple[int, int]:
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime_ns


def write_manifest(path: Path, table: ImageTable, splits: Mapping[str, np.ndarray]) -> None:
    """One row per image of every split, in split order (train, val, test), with its file state."""
    rows = []
    for split, indices in splits.items():
        for index in indices:
            image = table.paths[index]
            rows.append([os.path.abspath(image), table.label_text(index), split, *file_state(image)])
    write_csv(path, COLUMNS, rows)


def manifest_next_to(ckpt: str | os.PathLike) -> Path | None:
    """The ``split.csv`` of the run that wrote ``ckpt`` (run_dir/checkpoints/x.ckpt), if it has one."""
    path = run_folder_of(ckpt) / MANIFEST
    return path if path.is_file() else None


def changed_files(rows: Sequence[Mapping[str, str]]) -> list[tuple[str, str]]:
    """(path, what changed) for every listed file that is gone or differs in size or mtime."""
    changed = []
    for row in rows:
        try:
            size, mtime = file_state(row["path"])
        except FileNotFoundError:
            changed.append((row["path"], "missing"))
            continue
        if size != int(row["bytes"]):
            changed.append((row["path"], f"size {row['bytes']} -> {size} bytes"))
        elif mtime != int(row["mtime_ns"]):
            changed.append((row["path"], "modified since the run"))
    return changed


def load_manifest(
    path: Path,
    class_names: Sequence[str] | None = None,
    splits: Sequence[str] | None = None,
    check: bool = True,
    name: str | None = None,
) -> ImageTable:
    """The run's images as a table whose every row has its split fixed (so nothing is re-split).

    ``class_names``: the model's class order (from its checkpoint); by default the names in the file,
    sorted. Labels are read as the run wrote them; a task that parses them (tags, numbers) does so
    in its ``arrange`` (`transfer.tasks`). ``splits``: only rows of these splits. ``check``: refuse
    files that are gone or changed.
    """
    with open(path, newline="") as stream:
        rows = list(csv.DictReader(stream))
    if rows and list(rows[0]) != COLUMNS:
        raise DataError(f"'{path}' is not a split manifest (columns {list(rows[0])}, expected {COLUMNS}).")
    if splits is not None:
        rows = [row for row in rows if row["split"] in splits]
    if not rows:
        raise DataError(f"'{path}' lists no images{f' in split(s) {list(splits)}' if splits else ''}.")
    if check:
        changed = changed_files(rows)
        if changed:
            listing = "\n".join(f"  {file}: {what}" for file, what in changed[:10])
            more = f"\n  ... and {len(changed) - 10} more" if len(changed) > 10 else ""
            raise DataError(
                f"{len(changed)} of the {len(rows)} images the run used (listed in {path}) are "
                f"missing or changed since:\n{listing}{more}\nRestore them, or evaluate on "
                "other data explicitly with data=... (a new split, not the run's)."
            )
    names = list(class_names) if class_names is not None else sorted({row["label"] for row in rows})
    unknown = sorted({row["label"] for row in rows} - set(names))
    if unknown:
        raise DataError(f"'{path}' has labels {unknown} that are not among the classes {names}.")
    index = {name: i for i, name in enumerate(names)}
    return ImageTable(
        [row["path"] for row in rows],
        np.array([index[row["label"]] for row in rows]),
        names,
        np.array([row["split"] for row in rows], dtype=object),
        name=name or path.parent.name,
        extra={"manifest": str(path)},
    )
