"""The flips and turns a model was trained with, and the test-time views they allow.

Test-time augmentation averages the model's outputs over transformed copies of an image; only
transforms the label survives make sense there, and the training augmentation already says which
those are (chosen by hand, by a dataset config, or by ``augment=auto``'s probe). A run records
them in its checkpoint, so ``tta=auto`` in evaluate and predict uses exactly those: mirror images
for photos, all flips and turns for solar cells, none for characters.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch

# albumentations transforms -> the symmetries they apply (D4 is SquareSymmetry's older name).
SYMMETRIES_OF = {
    "HorizontalFlip": ("hflip",),
    "VerticalFlip": ("vflip",),
    "RandomRotate90": ("rot90",),
    "SquareSymmetry": ("hflip", "vflip", "rot90"),
    "D4": ("hflip", "vflip", "rot90"),
}
ORDER = ("hflip", "vflip", "rot90")

# Test-time augmentation by name (``tta=`` in evaluate, predict and serve, ``test_tta=`` in training);
# "auto" takes the symmetries the model was trained with.
TTA_SYMMETRIES: dict[str, tuple[str, ...]] = {"none": (), "hflip": ("hflip",), "flips": ("hflip", "vflip")}


def tta_symmetries(tta: str, trained_with: Iterable[str]) -> tuple[str, ...]:
    """The symmetries test-time augmentation ``tta`` averages over."""
    from transfer.errors import TransferError

    if tta == "auto":
        return tuple(trained_with)
    if tta not in TTA_SYMMETRIES:
        raise TransferError(f"Unknown test-time augmentation '{tta}'; choose one of {sorted([*TTA_SYMMETRIES, 'auto'])}.")
    return TTA_SYMMETRIES[tta]


def symmetries_of(nodes: Iterable[Mapping[str, Any]] | None) -> list[str]:
    """The symmetries in an augmentation list of ``_target_`` nodes, in a fixed order."""
    found = set()
    for node in nodes or []:
        found.update(SYMMETRIES_OF.get(str(node.get("_target_", "")).rsplit(".", 1)[-1], ()))
    return [name for name in ORDER if name in found]


def views_for(symmetries: Iterable[str]) -> list[Callable[[torch.Tensor], torch.Tensor]]:
    """NCHW views: the image, then each flip, the half turn they make together, and the quarter
    turns (square inputs only) when turns are among the symmetries."""
    present = set(symmetries)
    views: list[Callable[[torch.Tensor], torch.Tensor]] = [lambda x: x]
    if "hflip" in present:
        views.append(lambda x: x.flip(-1))
    if "vflip" in present:
        views.append(lambda x: x.flip(-2))
    if {"hflip", "vflip"} <= present or "rot90" in present:
        views.append(lambda x: x.flip(-1).flip(-2))
    if "rot90" in present:
        views += [lambda x: torch.rot90(x, 1, dims=(-2, -1)) if x.shape[-1] == x.shape[-2] else x,
                  lambda x: torch.rot90(x, 3, dims=(-2, -1)) if x.shape[-1] == x.shape[-2] else x]
    return views
