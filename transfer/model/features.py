"""A timm model split in two: the pooled features its classifier sees, and the classifier on them.

What a head-only stage trains on when its features are cached (`transfer.training.feature_cache`),
and what the augmentation probe (`transfer.augment.probe`) fits its linear probe to.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from transfer.errors import TransferError


def pooled_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """What the classifier sees: the backbone's pooled, pre-logits features."""
    return model.forward_head(model.forward_features(images), pre_logits=True)


def classify_features(model: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """The rest of the forward pass after `pooled_features`: head dropout (train mode), classifier."""
    rate = float(getattr(model, "drop_rate", 0.0) or 0.0)
    return model.get_classifier()(F.dropout(features, rate, model.training))


@torch.inference_mode()
def check_split_matches(model: nn.Module, images: torch.Tensor, atol: float = 1e-4) -> None:
    """Refuse models whose forward is not ``classifier(pooled_features)``: the cache would be wrong."""
    direct = model(images)
    split = classify_features(model, pooled_features(model, images))
    if direct.shape != split.shape or not torch.allclose(direct, split, atol=atol, rtol=1e-4):
        raise TransferError(
            f"feature_cache does not support {type(model).__name__}: its output is not the "
            "classifier applied to its pooled features. Run without feature_cache=true.")


@torch.inference_mode()
def extract_features(model: nn.Module, loader: DataLoader[Any], device: torch.device,
                     channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features and labels of every image the loader yields, in order, on the CPU."""
    was_training = model.training
    model.eval()
    features, labels = [], []
    try:
        for index, (images, targets) in enumerate(loader):
            images = images.to(device, non_blocking=True)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            if index == 0:
                check_split_matches(model, images)
            features.append(pooled_features(model, images).float().cpu())
            labels.append(targets)
    finally:
        model.train(was_training)
    return torch.cat(features), torch.cat(labels)
