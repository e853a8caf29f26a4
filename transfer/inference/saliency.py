"""Why the model decided: vanilla gradient maps and Grad-CAM, as overlays on the input image.

* Gradient (Simonyan et al. 2014): back-propagate the class score (the logit) to the pixels and
  take the largest absolute gradient over the colour channels.
* Grad-CAM (Selvaraju et al. 2017) on the last convolutional block, which for timm CNNs is
  ``forward_features``' output: weight each feature map by the spatial mean of the class score's
  gradient, sum, keep the positive part, upsample to the input size.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from transfer.errors import TransferError
from transfer.model.features import timm_model
from transfer.tasks import Classification, Task

METHODS = ("gradient", "gradcam")


def _target(logits: torch.Tensor, target: int | None, task: Task) -> int:
    """The output to explain: the one given, else the task's choice (the predicted class, the most
    probable tag, the first regression target)."""
    return task.default_target(task.probabilities(logits.detach())[0]) if target is None else target


def gradient_map(
    model: nn.Module, image: torch.Tensor, target: int | None = None, task: Task | None = None
) -> tuple[np.ndarray, int]:
    """(H x W map in [0, 1], the class explained) for one preprocessed CHW image. The score explained
    is the task's (`Task.score`: the class logit for classification)."""
    task = task or Classification()
    inputs = image.unsqueeze(0).detach().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = model(inputs)
        target = _target(logits, target, task)
        (gradient,) = torch.autograd.grad(task.score(logits, target), inputs)
    saliency = gradient[0].abs().amax(dim=0)
    return _normalise(saliency), target


def grad_cam(
    model: nn.Module, image: torch.Tensor, target: int | None = None, task: Task | None = None
) -> tuple[np.ndarray, int]:
    """(H x W map in [0, 1], the class explained) for one preprocessed CHW image."""
    task = task or Classification()
    halves = timm_model(model, "Grad-CAM")
    inputs = image.unsqueeze(0).detach()
    with torch.enable_grad():
        features = halves.forward_features(inputs)
        if features.dim() != 4:
            raise TransferError(
                f"Grad-CAM needs a convolutional feature map; {type(model).__name__} gives "
                f"{tuple(features.shape)} (a transformer?). Use method=gradient."
            )
        features = features.detach().requires_grad_(True)
        logits = halves.forward_head(features)
        target = _target(logits, target, task)
        (gradient,) = torch.autograd.grad(task.score(logits, target), features)
    weights = gradient.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * features).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=image.shape[-2:], mode="bilinear", align_corners=False)
    return _normalise(cam[0, 0]), target


def explain(
    model: nn.Module, image: torch.Tensor, method: str, target: int | None = None, task: Task | None = None
) -> tuple[np.ndarray, int]:
    if method == "gradient":
        return gradient_map(model, image, target, task)
    if method == "gradcam":
        return grad_cam(model, image, target, task)
    raise TransferError(f"Unknown saliency method '{method}'; choose from {list(METHODS)}.")


def _normalise(saliency: torch.Tensor) -> np.ndarray:
    saliency = saliency.detach().float().cpu()
    low, high = saliency.min(), saliency.max()
    return ((saliency - low) / (high - low)).numpy() if high > low else torch.zeros_like(saliency).numpy()


def overlay(rgb: np.ndarray, saliency: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """The map in a 'jet' colour scale blended over the image (both H x W, the model's view)."""
    import matplotlib

    heat = matplotlib.colormaps["jet"](saliency)[..., :3]
    return ((1 - alpha) * rgb.astype(np.float32) / 255.0 + alpha * heat).clip(0, 1)
