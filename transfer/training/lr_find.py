"""Lightning's learning-rate finder for the first stage: its suggestion becomes the stage's lr in the plan."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.tuner import Tuner
from matplotlib.figure import Figure
from omegaconf import DictConfig

from transfer.compat import unbiased_lr_finder_losses
from transfer.errors import TransferError
from transfer.inference.figures import plt  # the Agg backend: files only
from transfer.model.module import ClassifierModule
from transfer.model.stage import Stage

log = logging.getLogger("transfer")


def valley(lrs: list[float], losses: list[float]) -> int:
    """fastai's default suggestion, its ``valley`` rule (fastai.callback.schedule, Apache-2.0): the
    longest run of decreasing loss (longest decreasing subsequence), and the point two thirds of the
    way down it. Lightning's steepest-gradient suggestion follows single noisy steps of a flat start
    instead (ELPV's curve in docs/schedules.md)."""
    n = len(losses)
    run = [1] * n
    start, end = 0, 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and run[i] < run[j] + 1:
                run[i] = run[j] + 1
        if run[end] < run[i]:
            end, start = i, i - run[i]
    third = (end - start) / 3
    return start + int(third) + int(third / 2)


def suggest(finder: Any, method: str) -> float | None:
    if method == "steepest":
        return finder.suggestion()
    if method != "valley":
        raise TransferError(f"lr_find.method must be valley or steepest, not '{method}'.")
    lrs, losses = finder.results["lr"], finder.results["loss"]
    return float(lrs[valley(lrs, losses)]) if len(losses) > 3 else None


def find_stage_lr(
    trainer_cfg: DictConfig,
    settings: Mapping[str, Any],
    module: ClassifierModule,
    data: L.LightningDataModule,
    stages: Sequence[Stage],
    index: int,
    run_dir: Path,
    features: L.LightningDataModule | None = None,
) -> tuple[list[Stage], dict[str, Any]]:
    """Sweep the lr up exponentially on stage ``index``'s trainable parameters (the weights are
    restored afterwards), save the loss curve to ``lr_find.png``; the stages with that stage's lr set
    to the suggestion, and the plan's record of the search.

    ``features``: a `transfer.training.feature_cache.FeatureDataModule` for a head-only stage. The
    search then runs on the frozen backbone's cached features, each step costing only the classifier,
    whatever the stage itself trains on (augmented images included). With
    ``lr_find.scale_later_stages`` the later stages' lrs are multiplied by the same factor, keeping the
    schedule's ratios.
    """
    method = settings.get("method", "valley")
    # max_epochs only bounds the search (num_training steps end it); the finder replaces the schedule.
    trainer: L.Trainer = instantiate(
        trainer_cfg,
        logger=False,
        callbacks=[],
        enable_checkpointing=False,
        max_epochs=1000,
        default_root_dir=run_dir,
        sync_batchnorm=False,
    )
    if trainer.world_size > 1:
        raise TransferError(
            "lr_find.enabled=true runs on one device: find the lr with trainer=cpu or "
            "trainer=gpu, then pass it, e.g. schedule.stages.0.lr=..."
        )
    stages = list(stages)
    stage = stages[index]
    on_features = features is not None and stage.unfreeze == 0
    module.set_stage(stage, index, features_cached=on_features)
    try:
        finder = Tuner(trainer).lr_find(
            module,
            datamodule=features if on_features else data,
            min_lr=settings["min_lr"],
            max_lr=settings["max_lr"],
            num_training=settings["num_training"],
            update_attr=False,
        )
    finally:
        module.set_stage(stage, index)
    if finder is None:  # fast_dev_run skips the search
        return stages, {"suggestion": None}
    finder.results["loss"] = unbiased_lr_finder_losses(finder.results["loss"])
    suggestion = suggest(finder, method)
    figure = finder.plot(suggest=False)  # its own marker would be Lightning's steepest point
    assert isinstance(figure, Figure)
    if suggestion is not None:
        at = finder.results["lr"].index(suggestion)
        figure.axes[0].plot(suggestion, finder.results["loss"][at], marker="o", markersize=10, color="red")
        figure.axes[0].set_title(f"{method} suggestion: lr {suggestion:.3g}")
    figure.savefig(run_dir / "lr_find.png", dpi=120)
    plt.close(figure)
    if suggestion is None:
        log.warning(
            "lr_find found no clear minimum of the loss slope; stage '%s' keeps lr %g (curve in %s).",
            stage.name,
            stage.lr,
            run_dir / "lr_find.png",
        )
        return stages, {"suggestion": None, "kept_lr": stage.lr, "on_features": on_features}
    factor = float(suggestion) / stage.lr
    stages[index] = dataclasses.replace(stage, lr=float(suggestion))
    log.info(
        "lr_find%s: stage %d '%s' lr %g -> %g (curve in %s)",
        " on cached features" if on_features else "",
        index,
        stage.name,
        stage.lr,
        suggestion,
        run_dir / "lr_find.png",
    )
    scaled = {}
    if settings.get("scale_later_stages"):
        for later in range(index + 1, len(stages)):
            old = stages[later]
            stages[later] = dataclasses.replace(old, lr=old.lr * factor)
            scaled[old.name] = stages[later].lr
            log.info("lr_find: stage %d '%s' lr %g -> %g (same factor)", later, old.name, old.lr, old.lr * factor)
    return stages, {
        "stage": stage.name,
        "suggestion": float(suggestion),
        "replaced_lr": stage.lr,
        "method": method,
        "on_features": on_features,
        "later_stages": scaled,
    }
