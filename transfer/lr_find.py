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

log = logging.getLogger("transfer")


def find_stage_lr(cfg: DictConfig, module: ClassifierModule, data: L.LightningDataModule, index: int,
                  run_dir: Path) -> dict[str, Any]:
    """Sweep the lr up exponentially on the stage's trainable parameters (the weights are restored
    afterwards), save the loss curve to ``lr_find.png`` and set the stage's lr to the suggestion."""
    settings = cfg.lr_find
    # max_epochs only bounds the search (num_training steps end it); the finder replaces the schedule.
    trainer: L.Trainer = instantiate(cfg.trainer, logger=False, callbacks=[], enable_checkpointing=False,
                                     max_epochs=1000, default_root_dir=run_dir)
    if trainer.world_size > 1:
        raise TransferError("lr_find.enabled=true runs on one device: find the lr with trainer=cpu or "
                            "trainer=gpu, then pass it, e.g. schedule.stages.0.lr=...")
    finder = Tuner(trainer).lr_find(module, datamodule=data, min_lr=settings.min_lr, max_lr=settings.max_lr,
                                    num_training=settings.num_training, update_attr=False)
    if finder is None:  # fast_dev_run skips the search
        return {"suggestion": None}
    suggestion = finder.suggestion()
    figure = finder.plot(suggest=True)
    figure.savefig(run_dir / "lr_find.png", dpi=120)
    import matplotlib.pyplot as plt
    plt.close(figure)
    stage = module.stages[index]
    if suggestion is None:
        log.warning("lr_find found no clear minimum of the loss slope; stage '%s' keeps lr %g (curve in %s).",
                    stage.name, stage.lr, run_dir / "lr_find.png")
        return {"suggestion": None, "kept_lr": stage.lr}
    module.stages[index] = dataclasses.replace(stage, lr=float(suggestion))
    log.info("lr_find: stage '%s' lr %g -> %g (curve in %s)", stage.name, stage.lr, suggestion,
             run_dir / "lr_find.png")
    return {"suggestion": float(suggestion), "replaced_lr": stage.lr}
