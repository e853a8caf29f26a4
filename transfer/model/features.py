"""A timm model split in two: the pooled features its classifier sees, and the classifier on them.

What a head-only stage trains on when its features are cached (`transfer.training.feature_cache`),
and what the augmentation probe (`transfer.augment.probe`) fits its linear probe to.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from transfer.errors import TransferError
from transfer.progress import track


@runtime_checkable
class TimmModel(Protocol):
    """What timm's classifiers have beyond ``nn.Module``: the two halves of their forward pass and
    their pretrained config (what the head-only path, the feature cache, the probe and Grad-CAM use)."""

    pretrained_cfg: dict[str, Any]
    training: bool

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...

    def forward_features(self, images: torch.Tensor) -> torch.Tensor: ...

    def forward_head(self, features: torch.Tensor, pre_logits: bool = False) -> torch.Tensor: ...

    def get_classifier(self) -> nn.Module: ...


def timm_model(model: nn.Module, purpose: str = "this") -> TimmModel:
    """``model`` as a `TimmModel`, or a `TransferError` saying that ``purpose`` needs one."""
    if not isinstance(model, TimmModel):
        raise TransferError(
            f"{purpose} needs a timm model (forward_features, forward_head, get_classifier); "
            f"{type(model).__name__} is not one."
        )
    return model


def pooled_features(model: TimmModel, images: torch.Tensor) -> torch.Tensor:
    """What the classifier sees: the backbone's pooled, pre-logits features."""
    return model.forward_head(model.forward_features(images), pre_logits=True)


def classify_features(model: TimmModel, features: torch.Tensor) -> torch.Tensor:
    """The rest of the forward pass after `pooled_features`: head dropout (train mode), classifier."""
    rate = float(getattr(model, "drop_rate", 0.0) or 0.0)
    return model.get_classifier()(F.dropout(features, rate, model.training))


@torch.inference_mode()
def check_split_matches(model: nn.Module, images: torch.Tensor, atol: float = 1e-4) -> None:
    """Refuse models whose forward is not ``classifier(pooled_features)``: the cache would be wrong."""
    direct = model(images)
    halves = timm_model(model, "feature_cache")
    split = classify_features(halves, pooled_features(halves, images))
    if direct.shape != split.shape or not torch.allclose(direct, split, atol=atol, rtol=1e-4):
        raise TransferError(
            f"feature_cache does not support {type(model).__name__}: its output is not the "
            "classifier applied to its pooled features. Run without feature_cache=true."
        )


@torch.inference_mode()
def extract_features(
    model: nn.Module,
    loader: DataLoader[Any],
    device: torch.device,
    channels_last: bool = False,
    description: str = "Backbone features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features and labels of every image the loader yields, in order, on the CPU (a progress
    bar of ``description`` on a terminal)."""
    was_training = model.training
    model.eval()
    features: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    try:
        for index, (images, targets) in enumerate(track(loader, description)):
            images = images.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            if index == 0:
                check_split_matches(model, images)
            features.append(pooled_features(timm_model(model), images).float().cpu())
            labels.append(targets)
    finally:
        model.train(was_training)
    return torch.cat(features), torch.cat(labels)
