"""``input.size=auto``: train at the images' own resolution when they are larger than the backbone's.

Pretrained CNNs are trained at one size (224 px for most timm models) but use more pixels well when
fine-tuned at a larger one (timm lists a larger ``test_input_size`` for many of them, the "FixRes"
effect), and small details (a crack in a solar cell, a scratch) survive downscaling badly. So
``auto`` takes the median shorter side of the images, times the backbone's ``crop_pct`` (evaluation
resizes to size / crop_pct before its center crop), and keeps it between the backbone's default and
``max_scale`` times it: images smaller than the default keep the default, huge photos do not make
training ``max_scale**2`` times slower. Models built for one input size (ViTs' position embeddings:
timm's ``fixed_input_size``) keep their default.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import torch.nn as nn
from PIL import Image

log = logging.getLogger("transfer")


def median_short_side(paths: Sequence[str], sample: int = 200, seed: int = 0) -> int:
    """The median shorter side of up to ``sample`` images (headers only: nothing is decoded)."""
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(paths), size=min(sample, len(paths)), replace=False)
    sides = []
    for index in chosen:
        with Image.open(paths[index]) as image:
            sides.append(min(image.size))
    return int(np.median(sides))


def size_for_images(
    model: nn.Module,
    paths: Sequence[str],
    default: Sequence[int],
    crop_pct: float,
    max_scale: float = 1.5,
    multiple: int = 8,
) -> list[int]:
    """A square input size for ``paths``: see the module docstring. Rounded down to ``multiple``."""
    if (getattr(model, "pretrained_cfg", None) or {}).get("fixed_input_size"):
        log.info("input.size=auto: %s takes one input size only; keeping %s.", type(model).__name__, list(default))
        return list(default)
    base = min(default)
    side = median_short_side(paths)
    wanted = int(min(max(side * crop_pct, base), base * max_scale)) // multiple * multiple
    size = max(wanted, base)
    log.info(
        "input.size=auto: median image side %d px, crop_pct %.3g -> input %d px (backbone default %d, at most %.3g x)",
        side,
        crop_pct,
        size,
        base,
        max_scale,
    )
    return [size, size]
