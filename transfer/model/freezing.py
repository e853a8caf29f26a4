"""Which parts of a timm model train: the head, the last N blocks, or everything.

Blocks come from timm's own ``group_matcher`` (the ordering timm uses for layer-wise LR decay),
so "last N blocks" works for any timm model without a table of layer names; a model of your own
can give its groups with a splitter (``backbone.splitter``, as fastai's ``splitter=``). Frozen parameters get
``requires_grad=False`` (autograd then builds no graph for the frozen prefix: no gradient and no
backward compute) and frozen modules stay in eval mode, so BatchNorm statistics and dropout in
them do not change.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch.nn as nn
from timm.models import group_parameters

from transfer.errors import ScheduleError
from transfer.model.weights import head_names, is_head_key

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)  # timm's subclass these
NORM_TYPES = (*BATCH_NORMS, nn.LayerNorm, nn.GroupNorm)


def is_norm_parameter(model: nn.Module, name: str) -> bool:
    """Whether ``name`` belongs to a normalisation layer (timm's BatchNormAct2d and LayerNorm2d
    subclass torch's)."""
    return isinstance(model.get_submodule(name.rpartition(".")[0]), NORM_TYPES)


# A splitter (fastai's ``splitter=``): model -> its parameter groups, input side first, the head last.
# Each group is an nn.Module, or an iterable of parameters or of parameter names.
Splitter = Callable[[nn.Module], Sequence[Any]]


def split_groups(model: nn.Module, splitter: Splitter) -> list[list[str]]:
    """The splitter's groups as parameter names (head last), checked to cover the model exactly once."""
    names = {id(param): name for name, param in model.named_parameters()}
    groups = []
    for group in splitter(model):
        if isinstance(group, nn.Module):
            members = [names[id(p)] for p in group.parameters()]
        else:
            members = [item if isinstance(item, str) else names[id(item)] for item in group]
        groups.append(members)
    seen = [name for group in groups for name in group]
    missing = sorted(set(names.values()) - set(seen))
    if len(groups) < 2 or missing or len(seen) != len(set(seen)):
        raise ScheduleError(
            f"backbone.splitter must return at least two groups (the last one the head) that hold every "
            f"parameter once; got {len(groups)} group(s), {len(missing)} parameter(s) in none "
            f"({missing[:3]}), {len(seen) - len(set(seen))} in several."
        )
    return groups


def backbone_blocks(model: nn.Module, coarse: bool = True, splitter: Splitter | None = None) -> list[list[str]]:
    """Parameter names of each backbone block, input side first; the classifier head excluded.

    Models without a ``group_matcher`` fall back to their top-level children, in order. A last
    group made only of normalisation layers (the pre-logits norm timm groups with the classifier:
    ConvNeXt's ``head.norm``, DenseNet's ``features.norm5``) is not a block of its own: it goes
    with the last stage, as timm itself groups ViT's final ``norm`` and EfficientNet's ``bn2``. So
    ``unfreeze: 1`` trains the last feature stage, not one LayerNorm; and a head-only stage keeps
    that norm frozen, which keeps the backbone's pooled features (and their cache) fixed.
    """
    if splitter is not None:
        return split_groups(model, splitter)[:-1]
    heads = head_names(model)
    if hasattr(model, "group_matcher"):
        matcher = getattr(model, "group_matcher")  # noqa: B009 (timm's, on an nn.Module)
        groups = list(group_parameters(model, matcher(coarse=coarse)).values())
    else:
        groups = [[f"{child}.{n}" for n, _ in module.named_parameters()] for child, module in model.named_children()]
    blocks = [block for block in ([n for n in names if not is_head_key(n, heads)] for names in groups) if block]
    if len(blocks) > 1 and all(is_norm_parameter(model, name) for name in blocks[-1]):
        blocks[-2:] = [blocks[-2] + blocks[-1]]
    return blocks


def block_name(model: nn.Module, names: list[str]) -> str:
    """The fewest modules that hold exactly ``names``, joined by " + " ("layer4", "stages.3 +
    head.norm", "blocks.6 + conv_head + bn2"): a module replaces its parameters when all of them
    are in the block, its parent replaces it likewise, up to the model."""
    wanted = set(names)
    under: dict[str, set[str]] = {}
    for name, _ in model.named_parameters():
        parts = name.split(".")
        for depth in range(1, len(parts)):
            under.setdefault(".".join(parts[:depth]), set()).add(name)
    covered, modules = set(), []
    for name in names:  # in model order, so the parts read input side first
        if name in covered:
            continue
        parts, best = name.split("."), name
        for depth in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:depth])
            if under[prefix] <= wanted:
                best = prefix
            else:
                break
        modules.append(best)
        covered |= under.get(best, {best})
    return " + ".join(modules)


def head_parameter_names(model: nn.Module, splitter: Splitter | None = None) -> list[str]:
    if splitter is not None:
        return split_groups(model, splitter)[-1]
    heads = head_names(model)
    names = [n for n, _ in model.named_parameters() if is_head_key(n, heads)]
    if not names:
        raise ScheduleError(f"Cannot find the classifier head {heads} of {type(model).__name__}.")
    return names


@dataclass(frozen=True)
class Trainable:
    """What one stage trains, for logs and summaries."""

    blocks: int  # backbone blocks unfrozen
    total_blocks: int
    trainable_params: int
    frozen_params: int
    groups: tuple[str, ...] = ()  # what trains, by module: "head: classifier", then each unfrozen block

    def describe(self) -> str:
        if self.blocks == 0:
            part = "head only"
        elif self.blocks == self.total_blocks:
            part = "all layers"
        else:
            part = f"head + last {self.blocks} of {self.total_blocks} blocks ({', '.join(self.groups[1:])})"
        total = self.trainable_params + self.frozen_params
        return f"{part}; params total {total:,}, trainable {self.trainable_params:,}, frozen {self.frozen_params:,}"


def resolve_unfreeze(unfreeze: int | str, total_blocks: int) -> int:
    if unfreeze == "all":
        return total_blocks
    if not isinstance(unfreeze, int) or isinstance(unfreeze, bool) or unfreeze < 0:
        raise ScheduleError(f"A stage's unfreeze must be 0 (head only), a number of blocks or 'all', not {unfreeze!r}.")
    if unfreeze > total_blocks:
        raise ScheduleError(
            f"The schedule unfreezes {unfreeze} blocks but this model has "
            f"{total_blocks}; use at most {total_blocks} or 'all'."
        )
    return unfreeze


def plan_trainable(
    model: nn.Module, unfreeze: int | str, coarse: bool = True, splitter: Splitter | None = None
) -> tuple[set[str], Trainable]:
    """The parameter names that train with the head plus the last ``unfreeze`` blocks (``"all"``:
    everything), and their summary; the model is not changed. ``splitter`` replaces timm's groups."""
    blocks = backbone_blocks(model, coarse, splitter)
    count = resolve_unfreeze(unfreeze, len(blocks))
    head = head_parameter_names(model, splitter)
    trainable = set(head)
    unfrozen = blocks[len(blocks) - count :]
    for block in unfrozen:
        trainable.update(block)
    if count == len(blocks):  # parameters outside every group (rare) train with "all"
        trainable.update(n for n, _ in model.named_parameters())
    sizes = {True: 0, False: 0}
    for name, param in model.named_parameters():
        sizes[name in trainable] += param.numel()
    groups = (f"head: {block_name(model, head)}", *(block_name(model, block) for block in unfrozen))
    return trainable, Trainable(count, len(blocks), sizes[True], sizes[False], groups)


def set_trainable(
    model: nn.Module, unfreeze: int | str, coarse: bool = True, splitter: Splitter | None = None
) -> Trainable:
    """Train the head plus the last ``unfreeze`` blocks (``"all"``: everything); freeze the rest."""
    trainable, summary = plan_trainable(model, unfreeze, coarse, splitter)
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
    return summary


def freeze_frozen_modules(model: nn.Module, norm_layers_too: bool = False) -> None:
    """Put every module whose parameters are all frozen into eval mode.

    Call after each ``model.train()``. With ``norm_layers_too`` the normalisation layers of
    trainable blocks also keep their running statistics (their affine parameters still train),
    as Keras recommends when fine-tuning BatchNorm networks on small datasets.
    """
    for module in model.modules():
        params = list(module.parameters())
        if params and not any(p.requires_grad for p in params) or norm_layers_too and isinstance(module, BATCH_NORMS):
            module.eval()
