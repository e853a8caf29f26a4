"""The augmentation probe's features: every image decoded once, all its views made from that array.

A probe compares each image with several transformed views of it (`transfer.augment.probe`). Decoding
the file once per view would make the decoder, not the backbone, the probe's bottleneck (a phone
photo takes longer to decode than the backbone takes to look at it). Here a loader worker decodes an
image once and applies the evaluation transform and every candidate view to the decoded array, and
the backbone sees the views of several images as one batch (``[images x views]``).

The probe runs on the CPU, and there the decoding and the views take a tenth of the forward pass's
time: in the main process they cost less than in a loader worker, which competes with the forward
pass for the same cores (benchmarks/speed.py's probe rows: 0.84 of the in-memory forward limit in the
main process, 0.51 with one worker, on 2 cores), so the planner asks for no workers.

The random views (crops, colour) are drawn per image from ``(seed, view, image)``, so the probe's
features are the same whatever the number of loader workers or the batch size.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import albumentations as A
import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from transfer.data.images import load_rgb
from transfer.model.features import pooled_features, timm_model
from transfer.progress import track


class ImageViews(Dataset[tuple[torch.Tensor, int]]):
    """Image ``index`` as a ``[views, C, H, W]`` tensor: one decode, one pipeline per view."""

    def __init__(self, paths: list[str], pipelines: Mapping[str, A.Compose], seed: int) -> None:
        self.paths, self.pipelines, self.seed = paths, dict(pipelines), seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = load_rgb(self.paths[index])
        views = []
        for view, pipeline in enumerate(self.pipelines.values()):
            pipeline.set_random_seed(int(np.random.SeedSequence([self.seed, view, index]).generate_state(1)[0]))
            views.append(pipeline(image=image)["image"])
        return torch.stack(views), index


@torch.inference_mode()
def view_features(
    model: nn.Module,
    paths: list[str],
    pipelines: Mapping[str, A.Compose],
    seed: int,
    batch_size: int,
    num_workers: int,
    channels_last: bool,
) -> dict[str, np.ndarray]:
    """Pooled backbone features of every image under every pipeline: ``{view: [images, features]}``.

    ``batch_size`` is the forward pass's batch of views (the evaluation batch size); the loader
    batches ``batch_size // views`` images, at least one."""
    names = list(pipelines)
    images_per_batch = max(1, batch_size // len(names))
    loader = DataLoader(
        ImageViews(paths, pipelines, seed),
        batch_size=images_per_batch,
        num_workers=num_workers,
        persistent_workers=False,
    )
    halves = timm_model(model, "augment=auto")
    was_training = model.training
    model.eval()
    chunks: list[torch.Tensor] = []
    try:
        description = f"augment=auto probe: {len(paths)} images x {len(names)} views"
        for views, _ in track(loader, description):
            batch = views.flatten(0, 1)  # [images * views, C, H, W], image-major
            if channels_last:
                batch = batch.contiguous(memory_format=torch.channels_last)
            chunks.append(pooled_features(halves, batch).float().reshape(len(views), len(names), -1))
    finally:
        model.train(was_training)
    features = torch.cat(chunks).numpy().astype(np.float64)
    return {name: features[:, index] for index, name in enumerate(names)}


def describe_views(pipelines: Mapping[str, Any]) -> str:
    return ", ".join(name for name in pipelines if name != "originals")
