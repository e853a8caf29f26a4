"""``trainer.sync_batchnorm=true`` for timm models: BatchNorm statistics over the global batch.

Lightning's own plugin (``TorchSyncBatchNorm``) uses torch's ``SyncBatchNorm.convert_sync_batchnorm``,
which turns timm's ``BatchNormAct2d`` (BatchNorm fused with its activation, in EfficientNet-Lite,
DenseNet, RegNet...) into a plain ``SyncBatchNorm`` and silently drops the activation: the trained
network is then not the one its checkpoint rebuilds. `TimmSyncBatchNorm` is the same Lightning
``LayerSync`` plugin built on timm's ``convert_sync_batchnorm``, which keeps the activation.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from lightning.pytorch.plugins import LayerSync
from timm.layers import BatchNormAct2d, SyncBatchNormAct, convert_sync_batchnorm

from transfer.errors import TransferError


def has_sync_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.SyncBatchNorm) for m in model.modules())


class TimmSyncBatchNorm(LayerSync):
    """Synchronised BatchNorm that keeps timm's norm + activation layers whole."""

    def apply(self, model: nn.Module) -> nn.Module:
        # Every stage is a new Trainer that applies its plugin again: converting twice would turn
        # SyncBatchNormAct (not a BatchNormAct2d) into a plain SyncBatchNorm.
        return model if has_sync_batchnorm(model) else convert_sync_batchnorm(model)

    def revert(self, model: nn.Module) -> nn.Module:
        """Back to ``BatchNormAct2d`` / ``BatchNorm{1,2,3}d``-compatible layers, same tensors."""
        converted: nn.Module = model
        if isinstance(model, nn.SyncBatchNorm):
            momentum = 0.1 if model.momentum is None else model.momentum  # None: a cumulative average
            if isinstance(model, SyncBatchNormAct):
                converted = BatchNormAct2d(
                    model.num_features,
                    model.eps,
                    momentum,
                    model.affine,
                    model.track_running_stats,
                    apply_act=False,
                )
                converted.act, converted.drop = getattr(model, "act"), getattr(model, "drop")  # noqa: B009
                converted.momentum = model.momentum
            else:
                converted = nn.BatchNorm2d(
                    model.num_features, model.eps, model.momentum, model.affine, model.track_running_stats
                )
            if model.affine:
                with torch.no_grad():
                    converted.weight, converted.bias = model.weight, model.bias
            converted.running_mean, converted.running_var = model.running_mean, model.running_var
            converted.num_batches_tracked = model.num_batches_tracked
            converted.training = model.training
        for name, child in model.named_children():
            if not (isinstance(model, SyncBatchNormAct) and name in ("act", "drop")):
                converted.add_module(name, self.revert(child))
        return converted


def check_sync_batchnorm(trainer_cfg: Any) -> None:
    """torch's SyncBatchNorm runs on CUDA only (DDP refuses it on CPU modules): say so up front."""
    if not trainer_cfg.get("sync_batchnorm"):
        return
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    if accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available()):
        raise TransferError(
            "trainer.sync_batchnorm=true synchronises BatchNorm across GPUs (torch's "
            "SyncBatchNorm works on CUDA only); on CPU processes leave it false."
        )
