"""Resuming a run: where its checkpoint stopped, and that the resumed run is the same run.

A checkpoint records the run's *shape*: the settings that decide which images it trains on and
how (seed, data, input, schedule, backbone). Resuming with a different shape would continue one
run with another's epochs, lrs or split, and report the mixture as one result; so a resumed run
compares shapes and refuses, showing each difference, unless ``resume_allow_changes=true``.
Its images come from the first run's ``split.csv`` (`transfer.data.manifest`), checked file by file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch
from omegaconf import DictConfig, OmegaConf

from transfer.errors import TransferError

# Data keys that only change how fast images arrive, not which ones or what they look like.
DATA_SPEED_KEYS = ("num_workers", "eval_batch_size")


def run_shape(cfg: DictConfig) -> dict[str, Any]:
    """The settings that make a run the run it is, as plain values (stored in every checkpoint)."""
    data = {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=True).items() if k not in DATA_SPEED_KEYS}
    return {
        "seed": cfg.seed,
        "data": data,
        "input": OmegaConf.to_container(cfg.input, resolve=True) if cfg.get("input") is not None else None,
        "schedule": OmegaConf.to_container(cfg.schedule, resolve=True),
        "backbone": OmegaConf.to_container(cfg.backbone, resolve=True),
        "optimizer": OmegaConf.to_container(cfg.optimizer, resolve=True),
        "task": OmegaConf.to_container(cfg.task, resolve=True),
    }


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
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


def shape_differences(before: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """``key: old -> new`` for every setting that differs (dotted keys, as overrides are written)."""
    old, new = flatten(before), flatten(now)
    return [f"{key}: {old.get(key, '(unset)')} -> {new.get(key, '(unset)')}"
            for key in sorted(set(old) | set(new)) if old.get(key, "(unset)") != new.get(key, "(unset)")]


def resume_point(ckpt_path: str | None) -> tuple[int, dict[str, Any]]:
    """The stage a checkpoint was written in and its schedule state; (0, {}) without one."""
    if not ckpt_path:
        return 0, {}
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise TransferError(f"Checkpoint '{path}' does not exist; pass ckpt_path=PATH to a .ckpt "
                            "file from a run's checkpoints/ folder (last.ckpt resumes where it stopped).")
    state = torch.load(path, map_location="cpu", weights_only=True).get("transfer")
    if state is None:
        raise TransferError(f"'{path}' was not written by transfer (no schedule state in it).")
    return int(state["stage_index"]), state


def check_same_run(state: Mapping[str, Any], shape: Mapping[str, Any], allow_changes: bool) -> list[str]:
    """Refuse to resume a checkpoint into a run of another shape; returns the differences allowed."""
    if "run_shape" not in state:
        return []  # written before checkpoints recorded it: nothing to compare
    differences = shape_differences(state["run_shape"], shape)
    if differences and not allow_changes:
        listing = "\n".join(f"  {line}" for line in differences[:20])
        raise TransferError(
            f"The checkpoint was written by a run with other settings than this one:\n{listing}\n"
            "Resume with the first run's settings (its config.yaml), or pass resume_allow_changes=true "
            "to continue it with these.")
    return differences
