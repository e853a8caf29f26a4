"""The augmentation probe's features: every image decoded once, all its views made from that array.

A probe compares each image with several transformed views of it (`transfer.augment.probe`). Decoding
the file once per view would make the decoder, not the backbone, the probe's bottleneck (a phone
photo takes longer to decode than the backbone takes to look at it). Here a loader worker decodes an
image once and applies the evaluation transform and every candidate view to the decoded array, and
the backbone sees the views of several images as one batch (``[images x views]``).

The probe runs on the CPU, where making the views takes about a tenth of the forward pass's time;
in the main process that costs less than in a loader worker, which competes with the forward pass
for the same cores (`benchmarks/speed.py`'s probe rows, in benchmarks/README.md), so the planner
asks for no workers. The batch is assembled once, in channels-last memory, the layout the forward
pass runs in.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import albumentations as A
import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from transfer.data.images import load_rgb
from transfer.model.features import pooled_features, timm_model
from transfer.progress import track

# The flips and the quarter turn of an image are those of its evaluation crop (the resize and the
# center crop are symmetric; where the crop's margin is an odd number of pixels, the two are one
# pixel apart), so they are made from the originals' tensor rather than from the decoded image
# again: a copy instead of a resize and a normalisation each.
DERIVED: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "hflip": lambda image: image.flip(-1),
    "vflip": lambda image: image.flip(-2),
    "rot90": lambda image: image.rot90(1, dims=(-2, -1)),  # counter-clockwise, as np.rot90
}


class ImageViews(Dataset[list[torch.Tensor]]):
    """Image ``index`` as one tensor per view: one decode, then each view's pipeline on the decoded
    array, or (``derived``) a flip or turn of the first view's tensor."""

    def __init__(
        self,
        paths: list[str],
        pipelines: Mapping[str, A.Compose],
        seed: int,
        derived: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
    ) -> None:
        self.paths, self.pipelines, self.seed = paths, dict(pipelines), seed
        self.derived = dict(derived or {})

    @property
    def names(self) -> list[str]:
        return [*self.pipelines, *self.derived]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> list[torch.Tensor]:
        image = load_rgb(self.paths[index])
        views = []
        for view, pipeline in enumerate(self.pipelines.values()):
            pipeline.set_random_seed(int(np.random.SeedSequence([self.seed, view, index]).generate_state(1)[0]))
            views.append(pipeline(image=image)["image"])
        return views + [derive(views[0]) for derive in self.derived.values()]


def channels_last_batch(items: list[list[torch.Tensor]]) -> torch.Tensor:
    """The views of several images as one ``[images x views, C, H, W]`` batch, image-major, in
    channels-last memory: one copy (albumentations' tensors are channels-last views already)."""
    first = items[0][0]
    batch = torch.empty(
        (len(items) * len(items[0]), *first.shape), dtype=first.dtype, memory_format=torch.channels_last
    )
    for index, view in enumerate(view for views in items for view in views):
        batch[index].copy_(view)
    return batch


@torch.inference_mode()
def view_features(
    model: nn.Module,
    paths: list[str],
    pipelines: Mapping[str, A.Compose],
    seed: int,
    batch_size: int,
    num_workers: int,
    channels_last: bool,
    square: bool = False,
) -> dict[str, np.ndarray]:
    """Pooled backbone features of every image under every view: ``{view: [images, features]}``.

    ``pipelines`` starts with the evaluation transform (``originals``); the flips among the others
    are made from its tensor (`DERIVED`), and the quarter turn too where the input is ``square``.
    ``batch_size`` is the forward pass's batch of views (the evaluation batch size); the loader
    batches ``batch_size // views`` images, at least one."""
    _, *others = pipelines
    derived = {n: DERIVED[n] for n in others if n in DERIVED and (square or n != "rot90")}
    made = {n: pipelines[n] for n in pipelines if n not in derived}
    dataset = ImageViews(paths, made, seed, derived)
    names = dataset.names
    loader = DataLoader(
        dataset,
        batch_size=max(1, batch_size // len(names)),
        num_workers=num_workers,
        collate_fn=channels_last_batch,
    )
    halves = timm_model(model, "augment=auto")
    was_training = model.training
    model.eval()
    chunks: list[torch.Tensor] = []
    try:
        description = f"augment=auto probe: {len(paths)} images, originals + {len(names) - 1} views"
        for batch in track(loader, description):
            if not channels_last:
                batch = batch.contiguous()
            chunks.append(pooled_features(halves, batch).float().reshape(len(batch) // len(names), len(names), -1))
    finally:
        model.train(was_training)
    features = torch.cat(chunks).numpy().astype(np.float64)
    return {name: features[:, names.index(name)] for name in pipelines}
