"""The flips and turns an augmentation pipeline applies: what a run records for ``tta=auto``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from transfer.model.tta import ORDER

# albumentations transforms -> the symmetries they apply (D4 is SquareSymmetry's older name).
SYMMETRIES_OF = {
    "HorizontalFlip": ("hflip",),
    "VerticalFlip": ("vflip",),
    "RandomRotate90": ("rot90",),
    "SquareSymmetry": ("hflip", "vflip", "rot90"),
    "D4": ("hflip", "vflip", "rot90"),
}


def symmetries_of(nodes: Iterable[Mapping[str, Any]] | None) -> list[str]:
    """The symmetries in an augmentation list of ``_target_`` nodes, in a fixed order."""
    found: set[str] = set()
    for node in nodes or []:
        found.update(SYMMETRIES_OF.get(str(node.get("_target_", "")).rsplit(".", 1)[-1], ()))
    return [name for name in ORDER if name in found]
