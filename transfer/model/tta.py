"""Test-time augmentation: the model's outputs averaged over flipped and turned copies of an image.

Only transforms the label survives make sense there, and the training augmentation already says
which those are (chosen by hand, by a dataset config, or by ``augment=auto``'s probe); a run records
them in its checkpoint (`transfer.augment.symmetries`), so ``tta=auto`` uses exactly those: mirror
images for photos, all flips and turns for solar cells, none for characters. The run's own test
(the LightningModule) and every command after training (`transfer.model.classifier`) average
through `average_views`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from transfer.errors import TransferError

ORDER = ("hflip", "vflip", "rot90")
# Test-time augmentation by name (``tta=``); "auto" takes the symmetries the model was trained with.
TTA_SYMMETRIES: dict[str, tuple[str, ...]] = {"none": (), "hflip": ("hflip",), "flips": ("hflip", "vflip")}


def tta_symmetries(tta: str, trained_with: Iterable[str]) -> tuple[str, ...]:
    """The symmetries test-time augmentation ``tta`` averages over."""
    if tta == "auto":
        return tuple(trained_with)
    if tta not in TTA_SYMMETRIES:
        raise TransferError(
            f"Unknown test-time augmentation '{tta}'; choose one of {sorted([*TTA_SYMMETRIES, 'auto'])}."
        )
    return TTA_SYMMETRIES[tta]


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
        views += [
            lambda x: torch.rot90(x, 1, dims=(-2, -1)) if x.shape[-1] == x.shape[-2] else x,
            lambda x: torch.rot90(x, 3, dims=(-2, -1)) if x.shape[-1] == x.shape[-2] else x,
        ]
    return views


def average_views(
    decode: Callable[[torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    symmetries: Iterable[str],
    as_they_are: torch.Tensor | None = None,
) -> torch.Tensor:
    """The mean of ``decode`` (images to decoded outputs: class probabilities, values) over the
    views of ``images``; ``as_they_are``: the outputs of the images themselves, when already at hand."""
    first, *others = views_for(symmetries)
    outputs = [decode(first(images)) if as_they_are is None else as_they_are]
    if not others:
        return outputs[0]
    return torch.stack([*outputs, *(decode(view(images)) for view in others)]).mean(dim=0)
