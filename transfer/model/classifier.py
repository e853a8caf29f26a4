"""A trained classifier rebuilt from its checkpoint alone: model, class names, preprocessing.

A checkpoint written by `train.py` carries, in ``checkpoint["transfer"]``, the timm model name
and the arguments it was built with, the class names and the resolved input config (size,
mean/std, crop fraction, interpolation), so evaluation, prediction, saliency and export need
nothing else: no training config, no dataset, no network.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn as nn
from PIL import Image

from transfer.data.images import rgb_of
from transfer.data.transforms import eval_transform
from transfer.errors import TransferError
from transfer.model.backbone import check_model_name
from transfer.model.tta import average_views, tta_symmetries
from transfer.tasks import Classification, Task, task_from_state

ImageLike = str | os.PathLike[str] | Image.Image | np.ndarray  # a file, a PIL image, HxWx3 uint8 RGB


@dataclass
class Classifier:
    model: nn.Module  # in eval mode
    class_names: list[str]
    input_config: dict[str, Any]
    backbone: str
    checkpoint: str
    symmetries: list[str] = field(default_factory=list)  # flips and turns it was trained with
    task: Task = field(default_factory=Classification)  # decodes outputs into class probabilities

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @cached_property
    def transform(self) -> Callable[..., Any]:
        """The evaluation preprocessing the model was validated with (albumentations, HWC uint8 in)."""
        return eval_transform(self.input_config)

    @torch.inference_mode()
    def probabilities(self, images: torch.Tensor, tta: str = "none") -> torch.Tensor:
        """Class probabilities (the task's decoding) for a preprocessed NCHW batch, averaged over the
        TTA views (``auto``: the flips and turns the model was trained with, `transfer.model.tta`)."""
        return average_views(
            lambda views: self.task.probabilities(self.model(views)),
            images.to(self.device),
            tta_symmetries(tta, self.symmetries),
        )

    def predict(
        self, images: ImageLike | Sequence[ImageLike], tta: str = "none", batch_size: int = 32
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """The task's answer for one image or a list of them (file paths, PIL images, RGB arrays),
        preprocessed as in training: ``{"label", "confidence", "probabilities"}`` for classes (tags
        and their thresholds, or values in the data's units, for the other tasks), as the server
        answers. A list gives a list, in order; files are decoded as the data loader decodes them."""
        single = not isinstance(images, (list, tuple))
        items: list[ImageLike] = list(images) if isinstance(images, (list, tuple)) else [images]  # type: ignore[list-item]
        answers = []
        for start in range(0, len(items), batch_size):
            batch = [self.preprocess(rgb_of(image)) for image in items[start : start + batch_size]]
            probabilities = self.probabilities(torch.stack(batch), tta)
            answers += [self.task.describe(row, self.class_names) for row in probabilities]
        return answers[0] if single else answers

    def predicted(self, probabilities: torch.Tensor) -> torch.Tensor:
        """One class index per image (argmax; the median grade for task=ordinal)."""
        return self.task.predicted(probabilities)

    def preprocess(self, rgb: np.ndarray) -> torch.Tensor:
        return self.transform(image=rgb)["image"]


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint's contents (tensors and plain values only: nothing in it is executed)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise TransferError(
            f"Checkpoint '{path}' does not exist; pass run=<run folder> (its checkpoints/best.ckpt) "
            "or ckpt=PATH to a .ckpt file."
        )
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if "transfer" not in checkpoint or "state_dict" not in checkpoint:
        raise TransferError(
            f"'{path}' was not written by transfer's train.py (no class names or backbone recorded in it)."
        )
    return checkpoint


def model_state(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The timm model's own state dict (the LightningModule stores it under ``model.``)."""
    return {
        key.removeprefix("model."): value for key, value in checkpoint["state_dict"].items() if key.startswith("model.")
    }


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> Classifier:
    checkpoint = read_checkpoint(path)
    state = checkpoint["transfer"]
    check_model_name(state["backbone"])
    task = task_from_state(state.get("task"))
    model = timm.create_model(
        state["backbone"],
        pretrained=False,
        num_classes=task.outputs(len(state["class_names"])),
        **state.get("model_kwargs", {}),
    )
    model.load_state_dict(model_state(checkpoint))
    model.eval().to(device)
    return Classifier(
        model,
        list(state["class_names"]),
        dict(state["input_config"]),
        state["backbone"],
        str(path),
        list(state.get("symmetries", [])),
        task,
    )


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: the first CUDA GPU if there is one, else Apple's GPU (MPS) if there is one, else the
    CPU; any other name as torch reads it (``cpu``, ``cuda:1``, ``mps``)."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)
