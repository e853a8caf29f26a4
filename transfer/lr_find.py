"""Lightning's learning-rate finder for one stage: its suggestion becomes the stage's lr."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.tuner import Tuner
from omegaconf import DictConfig

from transfer.errors import TransferError
from transfer.module import ClassifierModule
from transfer.reports import plt  # the Agg backend: files only

log = logging.getLogger("transfer")

SMOOTHING = 0.98  # the beta of Lightning's running loss average in the finder (_LRCallback)


def unbiased(smoothed: list[float], beta: float = SMOOTHING) -> list[float]:
    """Lightning 2.6 divides the finder's running average after n steps by 1 - beta**(n + 1)
    instead of 1 - beta**n, so the curve starts at about half the real loss and climbs for tens of
    steps: the steepest descent, and so the suggestion, lands on that artefact. This undoes it
    (tests/test_train.py checks it against Lightning on a constant loss)."""
    return [loss * (1 - beta ** (n + 1)) / (1 - beta ** n) for n, loss in enumerate(smoothed, start=1)]


def valley(lrs: list[float], losses: list[float]) -> int:
    """fastai's default suggestion: the longest run of decreasing loss (longest decreasing
    subsequence), and the point two thirds of the way down it. Lightning's steepest-gradient
    suggestion follows single noisy steps of a flat start instead (ELPV's curve in the README)."""
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


def find_stage_lr(cfg: DictConfig, module: ClassifierModule, data: L.LightningDataModule, index: int,
                  run_dir: Path, features: L.LightningDataModule | None = None) -> dict[str, Any]:
    """Sweep the lr up exponentially on the stage's trainable parameters (the weights are restored
    afterwards), save the loss curve to ``lr_find.png`` and set the stage's lr to the suggestion.

    ``features``: a `transfer.feature_cache.FeatureDataModule` for a head-only stage. The search then
    runs on the frozen backbone's cached features, each step costing only the classifier, whatever
    the stage itself trains on (augmented images included). With ``lr_find.scale_later_stages``
    the later stages' lrs are multiplied by the same factor, keeping the schedule's ratios.
    """
    settings, method = cfg.lr_find, cfg.lr_find.get("method", "valley")
    # max_epochs only bounds the search (num_training steps end it); the finder replaces the schedule.
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False,
                                     max_epochs=1000, default_root_dir=run_dir, sync_batchnorm=False)
    if trainer.world_size > 1:
        raise TransferError("lr_find.enabled=true runs on one device: find the lr with trainer=cpu or "
                            "trainer=gpu, then pass it, e.g. schedule.stages.0.lr=...")
    on_features = features is not None and module.stages[index].unfreeze == 0
    module.set_stage(index, features_cached=on_features)
    try:
        finder = Tuner(trainer).lr_find(module, datamodule=features if on_features else data,
                                        min_lr=settings.min_lr, max_lr=settings.max_lr,
                                        num_training=settings.num_training, update_attr=False)
    finally:
        module.set_stage(index)
    if finder is None:  # fast_dev_run skips the search
        return {"suggestion": None}
    finder.results["loss"] = unbiased(finder.results["loss"])
    suggestion = suggest(finder, method)
    figure = finder.plot(suggest=False)  # its own marker would be Lightning's steepest point
    if suggestion is not None:
        at = finder.results["lr"].index(suggestion)
        figure.axes[0].plot(suggestion, finder.results["loss"][at], marker="o", markersize=10, color="red")
        figure.axes[0].set_title(f"{method} suggestion: lr {suggestion:.3g}")
    figure.savefig(run_dir / "lr_find.png", dpi=120)
    plt.close(figure)
    stage = module.stages[index]
    if suggestion is None:
        log.warning("lr_find found no clear minimum of the loss slope; stage '%s' keeps lr %g (curve in %s).",
                    stage.name, stage.lr, run_dir / "lr_find.png")
        return {"suggestion": None, "kept_lr": stage.lr, "on_features": on_features}
    factor = float(suggestion) / stage.lr
    module.stages[index] = dataclasses.replace(stage, lr=float(suggestion))
    log.info("lr_find%s: stage '%s' lr %g -> %g (curve in %s)", " on cached features" if on_features else "",
             stage.name, stage.lr, suggestion, run_dir / "lr_find.png")
    scaled = {}
    if settings.get("scale_later_stages"):
        for later in range(index + 1, len(module.stages)):
            old = module.stages[later]
            module.stages[later] = dataclasses.replace(old, lr=old.lr * factor)
            scaled[old.name] = module.stages[later].lr
            log.info("lr_find: stage '%s' lr %g -> %g (same factor)", old.name, old.lr, old.lr * factor)
    return {"suggestion": float(suggestion), "replaced_lr": stage.lr, "method": method,
            "on_features": on_features, "later_stages": scaled}
