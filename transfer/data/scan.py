"""Find unreadable images before training, not as a worker crash in the middle of an epoch.

Every file is fully decoded once, in the training process before anything else starts, so
truncated files, empty files, non-images with image extensions and decompression bombs are
all found, each with its reason.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from transfer.data.csv_files import write_csv
from transfer.data.images import load_rgb
from transfer.data.table import ImageTable
from transfer.errors import DataError, ImageReadError
from transfer.progress import track

log = logging.getLogger("transfer")
ACTIONS = ("error", "skip")


def _problem(path: str) -> str | None:
    try:
        load_rgb(path)
    except ImageReadError as error:
        cause = error.__cause__ or error
        return f"{type(cause).__name__}: {cause}"
    return None


def find_bad_images(paths: list[str]) -> list[tuple[str, str]]:
    """[(path, reason)] for every file that cannot be decoded, in table order."""
    return [(path, reason) for path in track(paths, "Checking images") if (reason := _problem(path)) is not None]


def check_images(table: ImageTable, action: str, report: Path) -> tuple[ImageTable, list[tuple[str, str]]]:
    """Scan ``table``; with ``action='error'`` stop on bad files, with ``'skip'`` drop them.

    Either way the bad files are written to ``report`` (CSV: path, reason).
    """
    if action not in ACTIONS:
        raise DataError(f"runtime.bad_images={action} is not one of {list(ACTIONS)}.")
    log.info(
        "Checking that all %d images of '%s' decode (runtime.image_check=false skips this)",
        len(table.paths),
        table.name,
    )
    bad = find_bad_images(table.paths)
    if not bad:
        return table, bad
    report.parent.mkdir(parents=True, exist_ok=True)
    write_csv(report, ["path", "reason"], bad)
    listing = "\n".join(f"  {path}: {reason}" for path, reason in bad[:10])
    more = f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else ""
    if action == "error":
        raise DataError(
            f"{len(bad)} of {len(table.paths)} images in '{table.name}' cannot be read "
            f"(all listed in {report}):\n{listing}{more}\nRemove or re-encode them, or "
            "train without them with runtime.bad_images=skip."
        )
    log.warning(
        "Skipping %d unreadable image(s) of %d (listed in %s):\n%s%s", len(bad), len(table.paths), report, listing, more
    )
    bad_paths = {path for path, _ in bad}
    return table.take(np.array([i for i, p in enumerate(table.paths) if p not in bad_paths], dtype=np.int64)), bad
