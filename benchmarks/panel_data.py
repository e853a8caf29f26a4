"""Image-folder datasets for the panel benchmark, built offline from data that registry packages ship.

Each builder writes an ImageFolder tree with fixed ``train/`` and ``test/`` folders (the toolkit
carves its validation images from ``train/``; the scikit-learn baseline trains on all of
``train/``), so every method on a panel row sees the same split.

* ``characters``: scikit-learn's handwritten digits (1,797 images, 8x8, ten classes), upscaled to
  64x64 grayscale PNGs; 1,347 training and 450 test images. Mirroring or turning a digit can
  change its class (a turned 6 is a 9), unlike ELPV cells.
* ``faces_few``: scikit-image's LFW subset (100 faces and 100 non-face crops, 25x25 grayscale),
  with only 10 training images per class; the other 180 images are the test set.

    python benchmarks/panel_data.py characters /tmp/characters
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image


def write_tree(root: Path, images: np.ndarray, labels: np.ndarray, class_names: list[str], splits: np.ndarray) -> Path:
    """``root/<split>/<class>/<index>.png`` for uint8 grayscale ``images`` (N, H, W)."""
    for index, (image, label, split) in enumerate(zip(images, labels, splits)):
        folder = root / split / class_names[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / f"{index:05d}.png")
    return root


def characters(root: Path, size: int = 64, seed: int = 0) -> Path:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = (digits.images / 16.0 * 255.0).round().astype(np.uint8)
    images = np.stack([np.asarray(Image.fromarray(p).resize((size, size), Image.BILINEAR)) for p in pixels])
    train, _ = train_test_split(np.arange(len(images)), test_size=0.25, random_state=seed, stratify=digits.target)
    splits = np.where(np.isin(np.arange(len(images)), train), "train", "test")
    return write_tree(root, images, digits.target, [str(d) for d in range(10)], splits)


def faces_few(root: Path, per_class: int = 10, seed: int = 0) -> Path:
    from skimage.data import lfw_subset

    images = (lfw_subset() * 255.0).round().astype(np.uint8)
    labels = np.repeat([0, 1], 100)  # skimage: the first 100 are faces, the next 100 are not
    rng = np.random.default_rng(seed)
    splits = np.full(len(images), "test", dtype=object)
    for label in (0, 1):
        members = np.flatnonzero(labels == label)
        splits[rng.choice(members, size=per_class, replace=False)] = "train"
    return write_tree(root, images, labels, ["face", "not_face"], splits)


BUILDERS: dict[str, Callable[[Path], Path]] = {"characters": characters, "faces_few": faces_few}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", choices=sorted(BUILDERS))
    parser.add_argument("root", type=Path)
    args = parser.parse_args()
    print(BUILDERS[args.name](args.root))


if __name__ == "__main__":
    main()
