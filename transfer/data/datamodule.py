"""The LightningDataModule: an `ImageTable`, its splits and the two transforms."""

from __future__ import annotations

from typing import Callable

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from transfer.data.images import load_rgb
from transfer.data.sources import ImageTable
from transfer.data.splits import split_indices
from transfer.errors import DataError
from transfer.metrics import IGNORE


class ImageDataset(Dataset):
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


def seed_transform(dataset: Dataset, seed: int) -> None:
    """Seed an albumentations pipeline's own generator.

    albumentations keeps a random state of its own that global seeds never reach, and without a
    seed draws it from the OS: the same config and seed would train on different augmentations
    in every run.
    """
    transform = getattr(dataset, "transform", None)
    if hasattr(transform, "set_random_seed"):
        transform.set_random_seed(seed % 2**32)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: Lightning's per-worker seeding (process rank, worker id and
    the loader's base seed), then the augmentation pipeline from the resulting torch seed, so
    workers draw different augmentations and every run draws the same ones."""
    from lightning.fabric.utilities.seed import pl_worker_init_function

    pl_worker_init_function(worker_id)
    seed_transform(torch.utils.data.get_worker_info().dataset, torch.initial_seed())


class PaddedForProcesses(Dataset):
    """An evaluation split padded to a multiple of the number of processes with labels `IGNORE`
    (float targets: NaN).

    Every process must run the same evaluation loop (an idle one would leave the others waiting
    in the epoch-end all-reduce, and 1 validation image on 2 processes leaves one idle): padded
    copies of the first images give each an equal share, and the loss and metrics skip them, so
    every real image counts exactly once.
    """

    def __init__(self, dataset: Dataset, replicas: int) -> None:
        self.dataset = dataset
        self.real = len(dataset)  # type: ignore[arg-type]
        self.length = -(-self.real // replicas) * replicas
        self.transform = getattr(dataset, "transform", None)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        if index < self.real:
            return self.dataset[index]
        image, label = self.dataset[index % self.real]
        # Cached features come with tensor labels: keep the type so batches collate.
        if isinstance(label, torch.Tensor):
            return image, torch.full_like(label, float("nan") if label.is_floating_point() else IGNORE)
        return image, IGNORE


class EvenlySplit(Sampler[int]):
    """Evaluation indices ``rank, rank + N, ...``: every image exactly once across N processes.

    Unlike DistributedSampler it never repeats a real image (padding, where needed, is
    `PaddedForProcesses`' ignored copies), so metrics gathered across processes (torchmetrics
    syncs them) equal those of a single process.
    """

    def __init__(self, length: int, replicas: int = 1, rank: int = 0) -> None:
        self.indices = list(range(rank, length, replicas))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def _processes(trainer: "L.Trainer | None") -> tuple[int, int]:
    return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)


def train_sampler(dataset: Dataset, trainer: "L.Trainer | None", seed: int) -> DistributedSampler:
    """The training order depends only on (seed, epoch), never on the number of processes.

    Each of N processes takes every N-th index of the same seeded permutation, so N processes
    with batch B see, step by step, the same global batches as one process with batch N*B, and
    a resumed run sees the same order as an uninterrupted one. Lightning keeps a
    DistributedSampler it is given and calls ``set_epoch`` on it every epoch.
    """
    replicas, rank = _processes(trainer)
    return DistributedSampler(dataset, num_replicas=replicas, rank=rank, shuffle=True, seed=seed)


class BalancedSampler(Sampler[int]):
    """Each epoch draws as many training images as the split holds, with replacement, every class
    equally likely (each image weighted by 1 / its class's count): rare classes are seen as often as
    common ones, at the price of repeating their images.

    The draw depends only on (seed, epoch), never on the number of processes: process r of N takes
    every N-th index of the same global draw (padded to a multiple of N by wrapping around), so the
    processes see different images and together exactly the draw one process would see. Lightning
    calls ``set_epoch`` on it every epoch.
    """

    def __init__(self, labels: np.ndarray, num_replicas: int = 1, rank: int = 0, seed: int = 0) -> None:
        labels = np.asarray(labels)
        counts = np.bincount(labels)
        self.weights = torch.as_tensor(1.0 / counts[labels], dtype=torch.float64)
        self.num_replicas, self.rank, self.seed, self.epoch = num_replicas, rank, seed, 0
        self.num_samples = -(-len(labels) // num_replicas)
        self.total = len(labels)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def global_draw(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        draw = torch.multinomial(self.weights, self.total, replacement=True, generator=generator)
        padding = self.num_samples * self.num_replicas - self.total
        return torch.cat([draw, draw[:padding]])

    def __iter__(self):
        return iter(self.global_draw()[self.rank::self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples


SAMPLERS = ("shuffle", "balanced")


def eval_sampler(dataset: Dataset, trainer: "L.Trainer | None") -> EvenlySplit:
    return EvenlySplit(len(dataset), *_processes(trainer))


class ImageDataModule(L.LightningDataModule):
    def __init__(self, table: ImageTable, train_transform: Callable, eval_transform: Callable,
                 input_size: tuple[int, int], batch_size: int = 32, eval_batch_size: int | None = None,
                 num_workers: int = 2, test_fraction: float = 0.25, val_fraction: float = 0.1,
                 seed: int = 42, pin_memory: bool = False, sampler: str = "shuffle") -> None:
        super().__init__()
        if sampler not in SAMPLERS:
            raise DataError(f"data.sampler={sampler} is not one of {list(SAMPLERS)}.")
        self.sampler = sampler  # the training order: a seeded shuffle, or class-balanced draws
        self.table = table
        self.train_transform = train_transform
        self.eval_transform = eval_transform
        self.input_size = tuple(input_size)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.seed = seed
        self.splits = split_indices(table.stratify_on(), test_fraction, val_fraction, seed, table.splits)
        for name in ("train", "val"):
            if len(self.splits[name]) == 0:
                raise DataError(f"The {name} split of '{table.name}' is empty; it has "
                                f"{len(table.labels)} images. Add images or change data.val_fraction.")

    def train_steps_per_epoch(self, processes: int = 1, accumulate: int = 1) -> int:
        """Optimizer steps per training epoch, as `loader` batches each process's share."""
        share = -(-len(self.splits["train"]) // processes)
        batches = share // self.batch_size if share > self.batch_size else 1
        return max(1, batches // accumulate)

    def split_counts(self) -> dict[str, dict[str, int | float]]:
        """Images per class (positives per tag, mean per target) in each split, for the log and results."""
        return {name: self.table.counts(idx) for name, idx in self.splits.items()}

    def dataset(self, split: str, transform: Callable | None = None) -> ImageDataset:
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
                    "${input.size} (see conf/augment/standard.yaml).")

    def loader(self, dataset: Dataset, train: bool, trainer: "L.Trainer | None",
               num_workers: int | None = None) -> DataLoader:
        """A loader with this datamodule's batch sizes and process-aware samplers, for one of its
        splits as images or in another form (`transfer.feature_cache` passes cached features)."""
        workers = self.num_workers if num_workers is None else num_workers
        replicas, rank = _processes(trainer)
        seed_transform(dataset, self.seed + 7919 * rank)  # used with num_workers=0
        if not train and replicas > 1 and len(dataset) % replicas:
            dataset = PaddedForProcesses(dataset, replicas)
        # Each process gets ceil(n / replicas) training images (DistributedSampler pads): drop the
        # last partial batch only when that share still holds a full one, or an epoch could be empty.
        share = -(-len(dataset) // replicas)
        if not train:
            sampler = eval_sampler(dataset, trainer)
        elif self.sampler == "balanced":
            sampler = BalancedSampler(self.table.labels[self.splits["train"]], replicas, rank, self.seed)
        else:
            sampler = train_sampler(dataset, trainer, self.seed)
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

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        return self.loader(self.dataset(split), shuffle, self.trainer)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        if len(self.splits["test"]) == 0:
            raise DataError(f"'{self.table.name}' has no test split; set data.test_fraction > 0.")
        return self._loader("test", shuffle=False)
