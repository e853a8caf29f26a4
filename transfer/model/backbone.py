"""Build a timm model with a new head for the user's classes, from the chosen weight source."""

from __future__ import annotations

import contextlib
import difflib
import json
import logging
from pathlib import Path
from typing import Any

import timm
import torch.nn as nn

from transfer.compat import hub_cache_only
from transfer.errors import TransferError, WeightsUnavailableError
from transfer.model import weights as weights_lib

log = logging.getLogger(__name__)


def check_model_name(name: str) -> None:
    """Fail with the closest timm names when ``name`` is not a timm architecture."""
    if timm.is_model(name):
        return
    candidates = timm.list_models()
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    if not close:
        close = [c for c in candidates if name.lower() in c][:5]
    hint = f" Did you mean: {', '.join(close)}?" if close else ""
    raise TransferError(
        f"Unknown backbone '{name}'.{hint} List all with python -c \"import timm; "
        f"print(timm.list_models('*{name.split('_')[0]}*'))\"."
    )


def create_backbone(
    name: str,
    num_classes: int,
    weights: str | None = "auto",
    splitter: object = None,
    coarse_blocks: bool = True,
    **model_kwargs: Any,
) -> nn.Module:
    """A timm classifier for ``num_classes`` classes.

    ``weights`` is where its pretrained weights come from: ``auto`` (packaged if a package ships
    weights for ``name``, else the hub), ``hub`` (timm's Hugging Face / URL weights, cached after the
    first download), ``hf-hub:ORG/REPO`` (a model repository on the Hugging Face hub, in timm's
    format), ``packaged`` (weights shipped in a pip package, see `weights.PACKAGED`),
    ``local-dir:PATH`` (a folder in timm's format), a local file path or an http(s) URL; ``none``
    (or null) for a random initialisation. Extra keyword arguments (drop_rate, drop_path_rate, ...)
    go to ``timm.create_model``. ``splitter`` and ``coarse_blocks`` live in the backbone config but
    configure the freezing schedule (`transfer.model.freezing`), not the model.
    """
    check_model_name(name)
    if weights is None or str(weights).lower() == "none":
        log.info("Backbone %s: random initialisation (backbone.weights=none)", name)
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **model_kwargs)
    if weights == "auto":
        weights = "packaged" if name in weights_lib.PACKAGED else "hub"
    if weights == "hub":
        return _from_hub(name, name, num_classes, **model_kwargs)
    if str(weights).startswith("hf-hub:"):
        return _from_hub(name, str(weights), num_classes, **model_kwargs)
    if str(weights).startswith("local-dir:"):
        return _from_timm_folder(name, num_classes, str(weights), **model_kwargs)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, **model_kwargs)
    if weights == "packaged":
        fresh = weights_lib.load_packaged(model, name)
    elif str(weights).startswith(("http://", "https://")):
        fresh = weights_lib.load_url(model, weights)
    else:
        fresh = weights_lib.load_file(model, weights)
    log.info("Backbone %s: weights from %s; new head: %s", name, weights, ", ".join(fresh) or "none")
    return model


def _from_timm_folder(name: str, num_classes: int, source: str, **model_kwargs: Any) -> nn.Module:
    """A folder in timm's format (``export.py``'s ``timm/``, or a Hub repo downloaded): its own
    architecture and weights, a new head when the class count differs. Continues fine-tuning a
    model this toolkit (or anyone) fine-tuned before."""
    folder = Path(source.removeprefix("local-dir:")).expanduser()
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise WeightsUnavailableError(
            f"backbone.weights={source}: no config.json in '{folder}' (timm's "
            "format: config.json + model.safetensors, as export.py writes)."
        )
    architecture = json.loads(config_path.read_text()).get("architecture")
    if architecture != name:
        raise TransferError(
            f"backbone.weights={source} holds a '{architecture}', not backbone.name={name}: "
            f"pass backbone=timm backbone.name={architecture}."
        )
    model = timm.create_model(f"local-dir:{folder}", pretrained=True, **model_kwargs)
    if getattr(model, "num_classes", None) != num_classes:
        getattr(model, "reset_classifier")(num_classes)  # noqa: B009 (timm's, on an nn.Module)
        weights_lib.reset_head(model)
    log.info(
        "Backbone %s: weights from %s (%d classes there; head %s)",
        name,
        folder,
        weights_lib.pretrained_cfg(model).get("num_classes") or 0,
        "kept" if weights_lib.pretrained_cfg(model).get("num_classes") == num_classes else "new",
    )
    return model


def _from_hub(name: str, source: str, num_classes: int, **model_kwargs: Any) -> nn.Module:
    """timm's own pretrained weights for ``name`` (``source`` = ``name``) or a hub repository
    (``source`` = ``hf-hub:ORG/REPO`` holding a ``name``); a new head when the class count differs."""
    online = weights_lib.hub_reachable()
    context = contextlib.nullcontext() if online else hub_cache_only()
    try:
        with context:
            model = timm.create_model(source, pretrained=True, num_classes=num_classes, **model_kwargs)
    except Exception as error:  # hub, HTTP and cache errors come in many types
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        where = "the hub is unreachable and they are not in the local cache" if not online else reason
        raise WeightsUnavailableError(
            f"Pretrained weights for '{source}' could not be loaded from the timm hub: {where}. {weights_lib.WAYS_OUT}"
        ) from error
    architecture = weights_lib.pretrained_cfg(model).get("architecture")
    if source != name and architecture != name:
        raise TransferError(
            f"backbone.weights={source} holds a '{architecture}', not backbone.name={name}: "
            f"pass backbone=timm backbone.name={architecture}."
        )
    if num_classes != weights_lib.pretrained_cfg(model).get("num_classes"):
        weights_lib.reset_head(model)
    log.info(
        "Backbone %s: pretrained weights from the timm hub (%s)",
        name,
        weights_lib.pretrained_cfg(model).get("hf_hub_id") or weights_lib.pretrained_cfg(model).get("url") or source,
    )
    return model
