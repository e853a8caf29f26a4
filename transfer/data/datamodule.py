"""The LightningDataModule: an `ImageTable`, its splits, the two transforms and the loaders."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from transfer.data.images import load_rgb
from transfer.data.samplers import SAMPLERS, PaddedForProcesses, balanced_sampler, evaluation_sampler, training_sampler
from transfer.data.table import ImageTable
from transfer.errors import DataError


class ImageDataset(Dataset[tuple[torch.Tensor, Any]]):
    """Decodes files on demand; a decode failure raises `ImageReadError` naming the file.

    ``labels``: a class index per image, or a row of float targets per image (tags, values)."""

    def __init__(self, paths: list[str], labels: np.ndarray, transform: Callable) -> None:
        self.paths = paths
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int | torch.Tensor]:
        image = load_rgb(self.paths[index])
        label = self.labels[index]
        target = torch.as_tensor(label, dtype=torch.float32) if np.ndim(label) else int(label)
        return self.transform(image=image)["image"], target


def seed_transform(dataset: Dataset[Any], seed: int) -> None:
    """Seed an albumentations pipeline's own generator.

    albumentations keeps a random state of its own that global seeds never reach, and without a
    seed draws it from the OS: the same config and seed would train on different augmentations
    in every run.
    """
    set_random_seed = getattr(getattr(dataset, "transform", None), "set_random_seed", None)
    if set_random_seed is not None:
        set_random_seed(seed % 2**32)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: Lightning's per-worker seeding (process rank, worker id and
    the loader's base seed), then the augmentation pipeline from the resulting torch seed, so
    workers draw different augmentations and every run draws the same ones."""
    from lightning.fabric.utilities.seed import pl_worker_init_function

    pl_worker_init_function(worker_id)
    info = torch.utils.data.get_worker_info()
    if info is not None:
        seed_transform(info.dataset, torch.initial_seed())


def steps_per_epoch(images: int, batch_size: int, processes: int = 1, accumulate: int = 1) -> int:
    """Optimizer steps per training epoch, as `ImageDataModule.loader` batches each process's share."""
    share = -(-images // processes)
    batches = share // batch_size if share > batch_size else 1
    return max(1, batches // accumulate)


class ImageDataModule(L.LightningDataModule):
    """The splits of ``table`` (row indices, `transfer.data.splits`) as Lightning loaders, with the
    process-aware samplers of `transfer.data.samplers` and each split's transform."""

    def __init__(
        self,
        table: ImageTable,
        splits: Mapping[str, np.ndarray],
        train_transform: Callable[..., Any],
        eval_transform: Callable[..., Any],
        input_size: tuple[int, int] | list[int],
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        seed: int = 42,
        pin_memory: bool = False,
        sampler: str = "shuffle",
    ) -> None:
        super().__init__()
        if sampler not in SAMPLERS:
            raise DataError(f"data.sampler={sampler} is not one of {list(SAMPLERS)}.")
        self.sampler = sampler  # the training order: a seeded shuffle, or class-balanced draws
        self.table = table
        self.splits = dict(splits)
        self.train_transform = train_transform
        self.eval_transform = eval_transform
        self.input_size = tuple(input_size)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.seed = seed
        for name in ("train", "val"):
            if len(self.splits[name]) == 0:
                raise DataError(
                    f"The {name} split of '{table.name}' is empty; it has "
                    f"{len(table.labels)} images. Add images or a larger data.split.{name}."
                )

    def train_steps_per_epoch(self, processes: int = 1, accumulate: int = 1) -> int:
        return steps_per_epoch(len(self.splits["train"]), self.batch_size, processes, accumulate)

    def split_counts(self) -> dict[str, dict[str, int | float]]:
        """Images per class (positives per tag, mean per target) in each split, for the log and results."""
        return {name: self.table.counts(idx) for name, idx in self.splits.items()}

    def dataset(self, split: str, transform: Callable[..., Any] | None = None) -> ImageDataset:
        indices = self.splits[split]
        if transform is None:
            transform = self.train_transform if split == "train" else self.eval_transform
        return ImageDataset([self.table.paths[i] for i in indices], self.table.answers(indices), transform)

    def check_transforms(self) -> None:
        """Fail before training if an augmentation pipeline does not produce ``input_size`` images."""
        for split, transform in (("train", self.train_transform), ("val", self.eval_transform)):
            image, _ = self.dataset(split, transform)[0]
            if tuple(image.shape[-2:]) != self.input_size:
                raise DataError(
                    f"The {split} transform produces {tuple(image.shape[-2:])} images but the model "
                    f"expects {self.input_size}. End the augmentation list with a crop or resize to "
                    "${input.size} (see conf/augment/standard.yaml)."
                )

    def loader(
        self, dataset: Dataset[Any], train: bool, trainer: L.Trainer | None, num_workers: int | None = None
    ) -> DataLoader[Any]:
        """A loader with this datamodule's batch sizes and process-aware samplers, for one of its
        splits as images or in another form (`transfer.training.feature_cache` passes cached features)."""
        workers = self.num_workers if num_workers is None else num_workers
        replicas, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        seed_transform(dataset, self.seed + 7919 * rank)  # used with num_workers=0
        if not train and replicas > 1 and len(dataset) % replicas:  # type: ignore[arg-type]
            dataset = PaddedForProcesses(dataset, replicas)
        # Each process gets ceil(n / replicas) training images (DistributedSampler pads): drop the
        # last partial batch only when that share still holds a full one, or an epoch could be empty.
        share = -(-len(dataset) // replicas)  # type: ignore[arg-type]
        sampler: Any
        if not train:
            sampler = evaluation_sampler(dataset, replicas, rank)
        elif self.sampler == "balanced":
            sampler = balanced_sampler(self.table.labels[self.splits["train"]], replicas, rank, self.seed)
        else:
            sampler = training_sampler(dataset, replicas, rank, self.seed)
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=sampler,
            drop_last=train and share > self.batch_size,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=self.pin_memory,
            worker_init_fn=seed_worker,
        )

    def _loader(self, split: str) -> DataLoader[Any]:
        return self.loader(self.dataset(split), split == "train", self.trainer)

    def train_dataloader(self) -> DataLoader[Any]:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader[Any]:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader[Any]:
        if len(self.splits["test"]) == 0:
            raise DataError(f"'{self.table.name}' has no test split; set data.split.test > 0.")
        return self._loader("test")
