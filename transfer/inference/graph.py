"""The inference graph every runtime serves: one forward pass, every output the commands need.

The exported ONNX model (`transfer.inference.export`), its INT8 copy and the server's runtimes
(`transfer.inference.runtimes`) all run this module, so a new consumer reads another named output
instead of a new export:

* ``logits``: the head's raw outputs (what the parity check compares, and what code written for
  a plain classifier expects first);
* ``probabilities``: the task's decoding of the logits (softmax over classes, a sigmoid per tag,
  grade probabilities for ordinal tasks, values in the data's units for regression), the answer
  the server and `predict` give; a calibration fitted after training belongs in this decoding, so
  every runtime applies it;
* ``features``: the pooled features the head reads (timm's ``forward_head(..., pre_logits=True)``),
  what feature-space scores for images of none of the classes are computed on.

A task with per-pixel answers adds its map as a further named output; the names are listed in
``OUTPUTS`` and recorded in ``preprocessing.json``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from transfer.tasks import Task

OUTPUTS = ("logits", "probabilities", "features")


class InferenceGraph(nn.Module):
    """A timm classifier and its task's decoding as one module: image batch -> ``OUTPUTS``."""

    def __init__(self, model: nn.Module, task: Task) -> None:
        super().__init__()
        self.model, self.task = model, task

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        model: Any = self.model  # a timm model: forward_features and forward_head are its API
        feature_map = model.forward_features(image)
        features = model.forward_head(feature_map, pre_logits=True)
        logits = model.forward_head(feature_map)
        return logits, self.task.probabilities(logits), features.float()
