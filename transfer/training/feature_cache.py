"""Head-only stages on cached backbone features: the frozen backbone runs once per image, not per epoch.

A head-only stage without random augmentation feeds the frozen backbone the same pixels every
epoch, so its pooled features (timm's ``forward_head(..., pre_logits=True)``) are the same every
epoch too. `FeatureDataModule` computes them once, in `setup`, on the device the stage trains on;
the module then trains only the classifier on them (`transfer.model.features.classify_features`),
with the head's dropout as timm applies it. Checkpoints still hold the whole model, and testing
runs on images.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from transfer.data.datamodule import ImageDataModule
from transfer.model.features import extract_features

log = logging.getLogger("transfer")


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
            loader = DataLoader(
                dataset,
                batch_size=self.images.eval_batch_size,
                num_workers=self.images.num_workers,
                pin_memory=self.images.pin_memory,
            )
            features, labels = extract_features(
                self.model, loader, device, self.channels_last, f"Feature cache: {split} split"
            )
            self.cached[split] = TensorDataset(features, labels)
            log.info(
                "Feature cache: %s split, %d images -> %s features in %.1fs",
                split,
                len(dataset),
                tuple(features.shape[1:]),
                time.perf_counter() - started,
            )

    def train_dataloader(self) -> DataLoader[Any]:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader[Any]:
        return self._loader("val")

    def _loader(self, split: str) -> DataLoader[Any]:
        return self.images.loader(self.cached[split], split == "train", self.trainer, num_workers=0)
