"""Albumentations pipelines whose input size and normalisation come from the backbone itself.

timm knows each pretrained model's input size, crop fraction, interpolation and mean/std
(``tf_efficientnet_lite0`` expects 0.5/0.5, not the ImageNet statistics); `resolve_input` reads
them, the user's ``input`` config may override any of them, and the augmentation YAML refers to
the result as ``${input.size}``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import albumentations as A
import cv2
import torch.nn as nn
from albumentations.pytorch import ToTensorV2
from timm.data import resolve_model_data_config

INTERPOLATION = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
}


def resolve_input(model: nn.Module, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The model's pretrained data config, with any non-null user overrides applied.

    Returns plain values: ``size`` [h, w], ``mean``, ``std`` (3 floats each), ``crop_pct`` and
    ``interpolation`` (a name from `INTERPOLATION`).
    """
    config = resolve_model_data_config(model)
    resolved = {
        "size": list(config["input_size"][1:]),
        "mean": [float(v) for v in config["mean"]],
        "std": [float(v) for v in config["std"]],
        "crop_pct": float(config.get("crop_pct") or 1.0),
        "interpolation": config.get("interpolation") or "bilinear",
    }
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key == "size" and isinstance(value, int):
            value = [value, value]
        if key not in resolved:
            raise KeyError(f"Unknown input setting '{key}'; known: {sorted(resolved)}")
        resolved[key] = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else value
    if resolved["interpolation"] not in INTERPOLATION:
        resolved["interpolation"] = "bilinear"
    return resolved


def finishing(input_config: Mapping[str, Any]) -> list[A.BasicTransform]:
    """Normalise with the backbone's statistics and convert HWC uint8 to a CHW float tensor."""
    return [A.Normalize(mean=input_config["mean"], std=input_config["std"], max_pixel_value=255.0), ToTensorV2()]


def resize_target(input_config: Mapping[str, Any]) -> int:
    """The short side's length before the center crop: size / crop_pct, rounded down."""
    return int(math.floor(min(input_config["size"]) / input_config["crop_pct"]))


def geometry(input_config: Mapping[str, Any]) -> list[A.BasicTransform]:
    """Resize the short side to size / crop_pct, then center-crop: timm's evaluation protocol."""
    height, width = input_config["size"]
    return [
        A.SmallestMaxSize(
            max_size=resize_target(input_config), interpolation=INTERPOLATION[input_config["interpolation"]]
        ),
        A.CenterCrop(height=height, width=width),
    ]


def eval_transform(input_config: Mapping[str, Any]) -> A.Compose:
    """`geometry`, then `finishing`: what every image is turned into for evaluation and prediction."""
    return A.Compose([*geometry(input_config), *finishing(input_config)])


def train_transform(augmentations: Sequence[A.BasicTransform] | None, input_config: Mapping[str, Any]) -> A.Compose:
    """The user's augmentation list (built from YAML) followed by normalisation.

    With no augmentation the training images get the evaluation transform. The list must end
    with images of ``input.size`` (e.g. a RandomResizedCrop); this is checked on the first image.
    """
    if not augmentations:
        return eval_transform(input_config)
    return A.Compose([*augmentations, *finishing(input_config)])
