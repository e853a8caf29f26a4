"""Unlabelled image files for prediction and explanation: a folder, a glob pattern or one file.

Unreadable files do not stop a prediction job: `FileDataset` returns their error instead of
raising, and `readable_batch` separates them, so they are listed with the reason next to the
predictions.
"""

from __future__ import annotations

import glob
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from transfer.data.images import load_rgb
from transfer.errors import DataError, ImageReadError


def find_images(spec: str, extensions: tuple[str, ...] = IMG_EXTENSIONS) -> list[Path]:
    """A folder (searched recursively for image extensions), a glob pattern (``**`` allowed) or a file.

    A file named explicitly is kept whatever its extension; if it cannot be decoded it is reported.
    """
    path = Path(spec).expanduser()
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in extensions)
    elif path.is_file():
        found = [path]
    elif glob.has_magic(spec):
        found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    else:
        raise DataError(
            f"'{spec}' is neither a file, a folder nor a glob pattern that exists; pass "
            "inputs=PATH (a folder, a file, or a quoted pattern like 'photos/**/*.jpg')."
        )
    if not found:
        raise DataError(f"No image files in '{spec}' (extensions {', '.join(extensions)}).")
    return found


class FileDataset(Dataset):
    """(image tensor, index, error message); an unreadable file gives a placeholder and its error."""

    def __init__(self, paths: list[Path], transform: Callable, size: tuple[int, int]) -> None:
        self.paths = paths
        self.transform = transform
        self.size = size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str]:
        try:
            image = self.transform(image=load_rgb(self.paths[index]))["image"]
        except ImageReadError as error:
            return torch.zeros(3, *self.size), index, str(error)
        return image, index, ""


def readable_batch(
    images: torch.Tensor, indices: torch.Tensor, errors: list[str]
) -> tuple[torch.Tensor, list[int], list[tuple[int, str]]]:
    """Split a collated batch into (readable images, their indices, [(index, error)] of the others)."""
    keep = [i for i, error in enumerate(errors) if not error]
    failed = [(int(indices[i]), error) for i, error in enumerate(errors) if error]
    return images[keep], [int(indices[i]) for i in keep], failed
