"""Figures for people: a confusion matrix and a gallery of images with captions (matplotlib, files only)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt
import numpy as np

from transfer.data.images import load_rgb


def confusion_figure(matrix: np.ndarray, class_names: Sequence[str], path: Path, title: str) -> None:
    """Counts in each cell, colour by the share of the true class (rows), so rare classes show."""
    matrix = np.asarray(matrix)
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.6 * len(class_names) + 2.5)
    figure, axes = plt.subplots(figsize=(size + 1, size))
    image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    axes.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    axes.set_yticks(range(len(class_names)), class_names)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(title)
    for row in range(matrix.shape[0]):
        for col in range(matrix.shape[1]):
            axes.text(
                col,
                row,
                str(matrix[row, col]),
                ha="center",
                va="center",
                color="white" if shares[row, col] > 0.5 else "black",
            )
    figure.colorbar(image, ax=axes, label="share of true class")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def gallery_figure(paths: Sequence[str], captions: Sequence[str], path: Path, columns: int = 4) -> None:
    rows = max(1, math.ceil(len(paths) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.3 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, image_path, caption in zip(axes.flat, paths, captions):
        axis.imshow(load_rgb(image_path))
        axis.set_title(caption, fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
