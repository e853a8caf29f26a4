"""The augmentation probe's decisions, kept by a fingerprint of what decides them.

The probe's answer depends only on the images it looks at (their files and labels), the backbone and
its weights, the input preprocessing, the probe's settings and the seed. A run with the same ones (a
second run on the same folder, a sweep over learning rates) reads the decision back instead of
probing again. Any change of a file (size or modification time), a label, the backbone or a setting
gives another fingerprint, so a stale decision is never reused. The files live in
``<paths.cache_dir>/augment_probe/<fingerprint>.json``; deleting the folder only costs a new probe.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger("transfer")

VERSION = 2  # the probe's method; a new one invalidates every cached decision


def fingerprint(
    paths: Sequence[str], labels: np.ndarray, model: Mapping[str, Any], settings: Mapping[str, Any], seed: int
) -> str:
    """SHA-256 of the probed files (path, size, mtime), their labels, the model's identity
    (architecture, weights, input config) and the probe's settings and seed."""
    digest = hashlib.sha256()
    digest.update(
        json.dumps(
            {"version": VERSION, "model": model, "settings": settings, "seed": seed}, sort_keys=True, default=str
        ).encode()
    )
    for path, label in zip(paths, labels.tolist(), strict=True):
        stat = os.stat(path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\0{label}\n".encode())
    return digest.hexdigest()


def cache_file(cache_dir: str | os.PathLike[str] | None, key: str) -> Path | None:
    return Path(cache_dir).expanduser() / "augment_probe" / f"{key}.json" if cache_dir else None


def load(path: Path | None) -> dict[str, Any] | None:
    if path is None or not path.is_file():
        return None
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError) as error:  # a damaged entry is probed again, not trusted
        log.warning("augment=auto: ignoring the unreadable cached probe %s (%s)", path, error)
        return None


def save(path: Path | None, report: Mapping[str, Any]) -> None:
    """Write atomically (a concurrent run reads the old file or the new one, never half of one)."""
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps(report, indent=1))
        partial.replace(path)
    except OSError as error:  # a read-only cache costs the next run a probe, nothing more
        log.warning("augment=auto: could not cache the probe's decision in %s (%s)", path, error)
