"""Config names that changed, and what they are now: old names keep working for one release.

Two steps, so that an old name works wherever it is written (the command line, `fine_tune`'s list,
a config file of the user's, a run's config.yaml, a checkpoint's settings):

* `accept_old_overrides`, before composing: an override of a name the packaged configs no longer
  have is made a forced one (``++key=value``), which Hydra accepts where the key is missing;
* `upgrade`, after composing: every old name found in the config moves to its new place (converted
  where its meaning changed) with a deprecation message naming the new one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from transfer.config.run_folder import run_folder_of
from transfer.errors import TransferError

log = logging.getLogger("transfer")

# old key -> new key, same meaning
RENAMED = {
    "test_tta": "tta",
    "ckpt_path": "resume",
    "cv.resume": "resume",
    "label_smoothing": "task.label_smoothing",
    "class_weights": "task.class_weights",
    "data.test_fraction": "data.split.test",
    "data.val_fraction": "data.split.val",
}
# keys whose meaning changed as they moved; converted in `upgrade`
CONVERTED = ("backbone.pretrained",)
# _target_ paths that moved when the package was split by concern
MOVED_TARGETS = {
    "transfer.backbone.create_backbone": "transfer.model.backbone.create_backbone",
    "transfer.sweep.SaveBestTrial": "transfer.cli.sweep.SaveBestTrial",
}
STAGE_MIN_STEPS = "min_steps"
EARLY_STOPPING = "lightning.pytorch.callbacks.EarlyStopping"


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def accept_old_overrides(overrides: Sequence[str]) -> list[str]:
    """The overrides, with those of old names (and of stage keys once added with ``+``) forced, so
    that Hydra composes them and `upgrade` can move them."""
    accepted = []
    for override in overrides:
        key = _key(override)
        old = key in RENAMED or key in CONVERTED
        stage_key = key.startswith("schedule.stages.") and override.startswith("+")
        if "=" in override and (old or stage_key) and not override.startswith("~"):
            override = "++" + override.lstrip("+")
        accepted.append(override)
    return accepted


def _select(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, default=None, throw_on_missing=False)


def _has(cfg: DictConfig, key: str) -> bool:
    parent, _, leaf = key.rpartition(".")
    node = _select(cfg, parent) if parent else cfg
    return isinstance(node, DictConfig) and leaf in node


def _pop(cfg: DictConfig, key: str) -> Any:
    parent, _, leaf = key.rpartition(".")
    node = _select(cfg, parent) if parent else cfg
    value = node[leaf]
    del node[leaf]
    return value


def _retarget(node: Any, messages: list[str]) -> None:
    if isinstance(node, DictConfig):
        target = node.get("_target_") if "_target_" in node else None
        if isinstance(target, str) and target in MOVED_TARGETS:
            node["_target_"] = MOVED_TARGETS[target]
            messages.append(f"_target_: {target} is now {MOVED_TARGETS[target]}")
        for key in [str(k) for k in node]:
            if not OmegaConf.is_missing(node, key) and not OmegaConf.is_interpolation(node, key):
                _retarget(node[key], messages)
    elif isinstance(node, ListConfig):
        for item in node:
            _retarget(item, messages)


def upgrade(cfg: DictConfig, announce: bool = True) -> list[str]:
    """Move every old name in ``cfg`` (in place) to its new one; the deprecation messages, also
    logged as warnings when ``announce``."""
    messages: list[str] = []
    with open_dict(cfg):
        for old, new in RENAMED.items():
            if not _has(cfg, old):
                continue
            value = _pop(cfg, old)
            if value is None:
                continue
            if new.startswith("task.") and not _has(cfg, new):
                default = {"label_smoothing": 0.0, "class_weights": None}[old]
                if value != default:
                    raise TransferError(
                        f"{old}={value} (now {new}) applies to task=classification and "
                        f"task=ordinal, not to {_select(cfg, 'task._target_')} (task=multilabel "
                        "weighs its tags with task.pos_weight=balanced)."
                    )
                continue
            OmegaConf.update(cfg, new, value, force_add=True)
            messages.append(f"{old} is now {new} ({old} keeps working until the next release)")
        if _has(cfg, "backbone.pretrained"):
            pretrained = _pop(cfg, "backbone.pretrained")
            if pretrained is False:
                cfg.backbone.weights = "none"
            messages.append(
                "backbone.pretrained is now part of backbone.weights: backbone.pretrained=false is "
                "backbone.weights=none"
            )
        stages = _select(cfg, "schedule.stages")
        if isinstance(stages, ListConfig):
            raised = [
                stage.pop(STAGE_MIN_STEPS)
                for stage in stages
                if isinstance(stage, DictConfig) and STAGE_MIN_STEPS in stage
            ]
            if any(value is not None for value in raised):
                cfg.schedule.min_steps = max(int(v) for v in raised if v is not None)
                messages.append(
                    "schedule.stages.N.min_steps is now one schedule.min_steps for every stage "
                    f"(set to {cfg.schedule.min_steps})"
                )
        callbacks = _select(cfg, "callbacks")
        if isinstance(callbacks, DictConfig):
            for name in [str(k) for k in callbacks]:
                node = callbacks[name]
                if isinstance(node, DictConfig) and node.get("_target_") == EARLY_STOPPING:
                    patience = int(node.get("patience", 3))
                    del callbacks[name]
                    for stage in stages or []:
                        if stage.get("patience") in (None, "auto"):
                            stage.patience = patience
                    messages.append(
                        f"callbacks={name} is now each stage's patience (schedule.stages.N.patience="
                        f"{patience}); the stage's monitored metric is monitor.metric"
                    )
        _retarget(cfg, messages)
    if announce:
        for message in messages:
            log.warning("Deprecated: %s.", message)
    return messages


def training_config(ckpt: str | Path) -> DictConfig | None:
    """The resolved config of the run that wrote ``ckpt`` (run_dir/checkpoints/x.ckpt), in the current
    names, if the run folder has one."""
    path = run_folder_of(ckpt) / "config.yaml"
    if not path.is_file():
        return None
    cfg = OmegaConf.load(path)
    assert isinstance(cfg, DictConfig)
    upgrade(cfg, announce=False)
    return cfg


def numbers_equal(a: Any, b: Any) -> bool:
    """Equal settings, floats within rounding (a value written by another version may be rounded)."""
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-12)
        except (TypeError, ValueError):
            return False
    return bool(a == b)
