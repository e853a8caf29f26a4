"""Which parts of a timm model train: the head, the last N blocks, or everything.

Blocks come from timm's own ``group_matcher`` (the ordering timm uses for layer-wise LR decay),
so "last N blocks" works for any timm model without a table of layer names. Frozen parameters get
``requires_grad=False`` (autograd then builds no graph for the frozen prefix: no gradient and no
backward compute) and frozen modules stay in eval mode, so BatchNorm statistics and dropout in
them do not change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn
from timm.models import group_parameters

from transfer.errors import ScheduleError
from transfer.weights import head_names, is_head_key


def backbone_blocks(model: nn.Module, coarse: bool = True) -> list[list[str]]:
    """Parameter names of each backbone block, input side first; the classifier head excluded.

    Models without a ``group_matcher`` fall back to their top-level children, in order.
    """
    heads = head_names(model)
    if hasattr(model, "group_matcher"):
        groups = list(group_parameters(model, model.group_matcher(coarse=coarse)).values())
    else:
        groups = [[f"{child}.{n}" for n, _ in module.named_parameters()]
                  for child, module in model.named_children()]
    blocks = [[n for n in names if not is_head_key(n, heads)] for names in groups]
    return [block for block in blocks if block]


def head_parameter_names(model: nn.Module) -> list[str]:
    heads = head_names(model)
    names = [n for n, _ in model.named_parameters() if is_head_key(n, heads)]
    if not names:
        raise ScheduleError(f"Cannot find the classifier head {heads} of {type(model).__name__}.")
    return names


@dataclass(frozen=True)
class Trainable:
    """What one stage trains, for logs and summaries."""

    blocks: int          # backbone blocks unfrozen
    total_blocks: int
    trainable_params: int
    frozen_params: int

    def describe(self) -> str:
        if self.blocks == 0:
            part = "head only"
        elif self.blocks == self.total_blocks:
            part = "all layers"
        else:
            part = f"head + last {self.blocks} of {self.total_blocks} blocks"
        total = self.trainable_params + self.frozen_params
        return (f"{part}; params total {total:,}, trainable {self.trainable_params:,}, "
                f"frozen {self.frozen_params:,}")


def resolve_unfreeze(unfreeze: int | str, total_blocks: int) -> int:
    if unfreeze == "all":
        return total_blocks
    if not isinstance(unfreeze, int) or isinstance(unfreeze, bool) or unfreeze < 0:
        raise ScheduleError(f"A stage's unfreeze must be 0 (head only), a number of blocks or 'all', "
                            f"not {unfreeze!r}.")
    if unfreeze > total_blocks:
        raise ScheduleError(f"The schedule unfreezes {unfreeze} blocks but this model has "
                            f"{total_blocks}; use at most {total_blocks} or 'all'.")
    return unfreeze


def set_trainable(model: nn.Module, unfreeze: int | str, coarse: bool = True) -> Trainable:
    """Train the head plus the last ``unfreeze`` blocks (``"all"``: everything); freeze the rest."""
    blocks = backbone_blocks(model, coarse)
    count = resolve_unfreeze(unfreeze, len(blocks))
    trainable = set(head_parameter_names(model))
    for block in blocks[len(blocks) - count:]:
        trainable.update(block)
    if count == len(blocks):  # parameters outside every group (rare) train with "all"
        trainable.update(n for n, _ in model.named_parameters())
    sizes = {True: 0, False: 0}
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
        sizes[name in trainable] += param.numel()
    return Trainable(count, len(blocks), sizes[True], sizes[False])


def freeze_frozen_modules(model: nn.Module, norm_layers_too: bool = False) -> None:
    """Put every module whose parameters are all frozen into eval mode.

    Call after each ``model.train()``. With ``norm_layers_too`` the normalisation layers of
    trainable blocks also keep their running statistics (their affine parameters still train),
    as Keras recommends when fine-tuning BatchNorm networks on small datasets.
    """
    for module in model.modules():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params):
            module.eval()
        elif norm_layers_too and isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
