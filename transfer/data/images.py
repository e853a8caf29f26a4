"""Decode any image file into the 8-bit RGB array every backbone expects."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from transfer.errors import ImageReadError

# Decompression-bomb guard stays on, but at a size real photos (e.g. 100 MP scans) pass.
Image.MAX_IMAGE_PIXELS = 250_000_000


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert grayscale, palette, RGBA, CMYK and 16-bit images to 8-bit RGB.

    Transparent areas become white (not black, as a bare ``convert`` would make them), and
    16-bit or 32-bit integer images are rescaled rather than clipped to 255.
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        low, high = float(array.min()), float(array.max())
        scaled = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
        image = Image.fromarray(scaled.round().astype(np.uint8))
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def load_rgb(path: str | Path) -> np.ndarray:
    """Read ``path`` as an HxWx3 uint8 array, upright according to its EXIF orientation.

    Raises:
        ImageReadError: naming the file, so a worker never dies on an anonymous decode error.
    """
    return _decode(path, str(path))


def rgb_of(image: str | os.PathLike[str] | Image.Image | np.ndarray) -> np.ndarray:
    """An image given as a file path, a PIL image or an array (HxW or HxWx3 uint8) as HxWx3 uint8,
    decoded as `load_rgb` decodes files (EXIF orientation, grayscale, palette and alpha handled)."""
    if isinstance(image, (str, os.PathLike)):
        return load_rgb(os.fspath(image))
    if isinstance(image, Image.Image):
        return np.asarray(to_rgb(ImageOps.exif_transpose(image)))
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3)):
        raise ImageReadError(
            f"An array image must be HxW or HxWx3 uint8 (RGB), not {array.dtype} of shape {array.shape}."
        )
    return np.ascontiguousarray(np.broadcast_to(array.reshape(*array.shape[:2], -1), (*array.shape[:2], 3)))


def rgb_from_bytes(data: bytes, name: str = "upload") -> np.ndarray:
    """`load_rgb` for an image held in memory (an upload), ``name`` naming it in errors."""
    return _decode(io.BytesIO(data), name)


def _decode(source: str | Path | io.BytesIO, name: str) -> np.ndarray:
    try:
        with Image.open(source) as image:
            image = ImageOps.exif_transpose(image)
            return np.asarray(to_rgb(image))
    except Exception as error:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
        raise ImageReadError(
            f"Cannot read image '{name}': {type(error).__name__}: {error}. Remove or replace the "
            "file, or re-encode it (e.g. with Pillow or ImageMagick)."
        ) from error
