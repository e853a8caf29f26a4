"""Resuming a run: where its checkpoint stopped, and that the resumed run is the same run.

A checkpoint records the run's *shape*: the settings that decide which images it trains on and
how (seed, data, input, schedule, backbone, optimizer, task). Resuming with a different shape would
continue one run with another's epochs, lrs or split, and report the mixture as one result; so a
resumed run compares shapes and refuses, showing each difference, unless
``resume_allow_changes=true``. Its images come from the first run's ``split.csv``
(`transfer.data.manifest`), checked file by file; its stages from the checkpoint's plan.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from transfer.config.compose import as_dict
from transfer.config.names import numbers_equal, upgrade
from transfer.config.run_folder import CHECKPOINT_DIR, LAST
from transfer.errors import TransferError

# Data keys that only change how fast images arrive, not which ones or what they look like.
DATA_SPEED_KEYS = ("num_workers", "eval_batch_size")
# 2: the current config names; shapes without a version were written with the names before it and are
# upgraded (`transfer.config.names`) before they are compared.
SHAPE_VERSION = 2


def run_shape(cfg: DictConfig, input_config: Mapping[str, Any]) -> dict[str, Any]:
    """The settings that make a run the run it is, as plain values (stored in every checkpoint)."""
    return {
        "version": SHAPE_VERSION,
        "seed": cfg.seed,
        "data": {k: v for k, v in as_dict(cfg.data).items() if k not in DATA_SPEED_KEYS},
        "input": dict(input_config),
        "schedule": as_dict(cfg.schedule),
        "backbone": as_dict(cfg.backbone),
        "optimizer": as_dict(cfg.optimizer),
        "task": as_dict(cfg.task),
    }


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    items: Iterable[tuple[Any, Any]]
    if isinstance(value, Mapping):
        items = value.items()
    elif isinstance(value, list):
        items = ((str(i), v) for i, v in enumerate(value))
    else:
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in items:
        flat.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def shape_differences(before: Mapping[str, Any], now: Mapping[str, Any], only_before: bool = False) -> list[str]:
    """``key: old -> new`` for every setting that differs (dotted keys, as overrides are written);
    ``only_before``: settings ``before`` does not record are not compared (it predates them)."""
    old, new = flatten(before), flatten(now)
    keys = set(old) if only_before else set(old) | set(new)
    return [
        f"{key}: {old.get(key, '(unset)')} -> {new.get(key, '(unset)')}"
        for key in sorted(keys)
        if not numbers_equal(old.get(key, "(unset)"), new.get(key, "(unset)"))
    ]


def upgrade_shape(shape: Mapping[str, Any]) -> dict[str, Any]:
    """A shape written before the current config names, in the current names."""
    cfg = OmegaConf.create({k: v for k, v in shape.items() if k != "version"})
    upgrade(cfg, announce=False)
    return as_dict(cfg)


def read_resume(resume: str | None) -> dict[str, Any]:
    """What the checkpoint ``resume`` records of its run (stage, classes, plan, settings) and its
    path; {} without one."""
    if not resume:
        return {}
    path = Path(resume).expanduser()
    if path.is_dir():  # a run folder: where it stopped
        path = path / CHECKPOINT_DIR / LAST
    if not path.is_file():
        raise TransferError(
            f"Checkpoint '{path}' does not exist; pass resume=<run folder> (its checkpoints/last.ckpt, "
            "where it stopped) or resume=PATH to a .ckpt file from a run's checkpoints/ folder."
        )
    state = torch.load(path, map_location="cpu", weights_only=True).get("transfer")
    if state is None:
        raise TransferError(f"'{path}' was not written by transfer (no schedule state in it).")
    return {**state, "path": str(path), "stage_index": int(state["stage_index"])}


def check_same_run(state: Mapping[str, Any], shape: Mapping[str, Any], allow_changes: bool) -> list[str]:
    """Refuse to resume a checkpoint into a run of another shape; returns the differences allowed."""
    if "run_shape" not in state:
        return []  # written before checkpoints recorded it: nothing to compare
    before = state["run_shape"]
    if before.get("version") == SHAPE_VERSION:
        differences = shape_differences(before, shape)
    else:
        differences = shape_differences(
            upgrade_shape(before), {k: v for k, v in shape.items() if k != "version"}, only_before=True
        )
    if differences and not allow_changes:
        listing = "\n".join(f"  {line}" for line in differences[:20])
        raise TransferError(
            f"The checkpoint was written by a run with other settings than this one:\n{listing}\n"
            "Resume with the first run's settings (its config.yaml), or pass resume_allow_changes=true "
            "to continue it with these."
        )
    return differences
