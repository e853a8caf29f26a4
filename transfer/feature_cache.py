"""Head-only stages on cached backbone features: the frozen backbone runs once per image, not per epoch.

A head-only stage without random augmentation feeds the frozen backbone the same pixels every
epoch, so its pooled features (timm's ``forward_head(..., pre_logits=True)``) are the same every
epoch too. `FeatureDataModule` computes them once, in `setup`, on the device the stage trains on;
the module then trains only the classifier on them (``classify_features``), with the head's
dropout as timm applies it. Checkpoints still hold the whole model, and testing runs on images.
"""

from __future__ import annotations

import logging
import time

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from transfer.data.datamodule import ImageDataModule
from transfer.errors import TransferError

log = logging.getLogger("transfer")


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
def extract_features(model: nn.Module, loader: DataLoader, device: torch.device,
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


class FeatureDataModule(L.LightningDataModule):
    """The train and val splits of an `ImageDataModule` as cached features, with its samplers.

    Training order, batch sizes and the split of evaluation across processes are the image
    datamodule's own, so a cached stage sees the same batches as an uncached one would.
    """

    def __init__(self, images: ImageDataModule, model: nn.Module, channels_last: bool = False) -> None:
        super().__init__()
        self.images = images
        self.model = model
        self.channels_last = channels_last
        self.cached: dict[str, TensorDataset] = {}

    def setup(self, stage: str) -> None:
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        self.model.to(device)
        for split in ("train", "val"):
            if split in self.cached:
                continue
            started = time.perf_counter()
            # Every image once, in split order: the training transform is deterministic here.
            dataset = self.images.dataset(split, self.images.eval_transform)
            loader = DataLoader(dataset, batch_size=self.images.eval_batch_size,
                                num_workers=self.images.num_workers, pin_memory=self.images.pin_memory)
            features, labels = extract_features(self.model, loader, device, self.channels_last)
            self.cached[split] = TensorDataset(features, labels)
            log.info("Feature cache: %s split, %d images -> %s features in %.1fs", split, len(dataset),
                     tuple(features.shape[1:]), time.perf_counter() - started)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def _loader(self, split: str) -> DataLoader:
        return self.images.loader(self.cached[split], split == "train", self.trainer, num_workers=0)
