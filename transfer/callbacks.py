"""Small Lightning callbacks the runs use."""

from __future__ import annotations

import logging
import time

import lightning as L

log = logging.getLogger("transfer")


class EpochSummary(L.Callback):
    """One log line per epoch (stage, epoch, losses, validation metrics, seconds).

    The progress bar shows the live state; this line is what stays in the run's log file.
    """

    def __init__(self, stage_name: str) -> None:
        self.stage_name = stage_name
        self.started = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        metrics = {k.removesuffix("_epoch"): v for k, v in trainer.callback_metrics.items()
                   if k.startswith(("train/", "val/")) and not k.endswith("_step")}
        shown = " ".join(f"{k}={float(v):.4f}" for k, v in sorted(metrics.items()))
        log.info("[%s] epoch %d/%d %s (%.0fs)", self.stage_name, trainer.current_epoch + 1,
                 trainer.max_epochs, shown, time.perf_counter() - self.started)
