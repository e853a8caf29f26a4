"""The order in which each process sees the images: seeded, and the same whatever the number of processes.

* Training: torch's ``DistributedSampler`` (a seeded shuffle per epoch, every N-th index per process),
  or, with ``data.sampler=balanced``, torch's ``WeightedRandomSampler`` drawn from (seed, epoch) and
  shared out by Lightning's ``DistributedSamplerWrapper``: N processes see, step by step, the global
  batches one process with N times the batch would see, and a resumed run sees the same order as an
  uninterrupted one.
* Evaluation: every image exactly once across the processes (Lightning's
  ``UnrepeatedDistributedSampler``), the split padded to a multiple of the processes first
  (`PaddedForProcesses`), so that metrics gathered across processes equal one process's.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import Dataset, DistributedSampler, Sampler, WeightedRandomSampler

from transfer.data.table import IGNORE

SAMPLERS = ("shuffle", "balanced")


class PaddedForProcesses(Dataset[Any]):
    """An evaluation split padded to a multiple of the number of processes with labels `IGNORE`
    (float targets: NaN).

    Ours because every process must run the same evaluation loop: an idle one leaves the others
    waiting in the epoch-end all-reduce, which Lightning's unrepeated sampler allows (it gives
    processes one batch more or less); 1 validation image on 2 processes leaves one idle. Padded
    copies of the first images give each an equal share; the loss and metrics skip them, so every
    real image counts exactly once.
    """

    def __init__(self, dataset: Dataset[Any], replicas: int) -> None:
        self.dataset = dataset
        self.real = len(dataset)  # type: ignore[arg-type]
        self.length = -(-self.real // replicas) * replicas
        self.transform = getattr(dataset, "transform", None)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        if index < self.real:
            item: tuple[Any, Any] = self.dataset[index]
            return item
        image, label = self.dataset[index % self.real]
        # Cached features come with tensor labels: keep the type so batches collate.
        if isinstance(label, torch.Tensor):
            return image, torch.full_like(label, float("nan") if label.is_floating_point() else IGNORE)
        return image, IGNORE


def evaluation_sampler(dataset: Dataset[Any], replicas: int = 1, rank: int = 0) -> Sampler[int]:
    """Indices ``rank, rank + N, ...``: each image once across N processes (pad the dataset first)."""
    return UnrepeatedDistributedSampler(dataset, num_replicas=replicas, rank=rank, shuffle=False)


def training_sampler(dataset: Dataset[Any], replicas: int, rank: int, seed: int) -> DistributedSampler[Any]:
    """A seeded shuffle per epoch (Lightning calls ``set_epoch``), every N-th index of it per process."""
    return DistributedSampler(dataset, num_replicas=replicas, rank=rank, shuffle=True, seed=seed)


class EpochWeightedSampler(WeightedRandomSampler):
    """torch's ``WeightedRandomSampler`` whose draw depends only on (seed, epoch): the same in every
    process and after a resume, a new one each epoch (Lightning calls ``set_epoch``)."""

    def __init__(self, weights: np.ndarray, seed: int) -> None:
        super().__init__(weights.astype(np.float64).tolist(), len(weights), replacement=True)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        self.generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return super().__iter__()


def balanced_sampler(labels: np.ndarray, replicas: int, rank: int, seed: int) -> DistributedSampler[Any]:
    """As many draws per epoch as there are training images, with replacement, every class equally
    likely (each image weighted by 1 / its class's count): rare classes are seen as often as common
    ones, at the price of repeating their images. Process r of N takes every N-th draw of the one
    global draw (padded to a multiple of N by wrapping around)."""
    labels = np.asarray(labels)
    weights = 1.0 / np.bincount(labels)[labels]
    return DistributedSamplerWrapper(
        EpochWeightedSampler(weights, seed), num_replicas=replicas, rank=rank, shuffle=False
    )
