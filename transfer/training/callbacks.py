"""Small Lightning callbacks every stage's fit uses."""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

import lightning as L
import torch
import torch.distributed as dist

from transfer.compat import start_logging_at
from transfer.errors import TransferError

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
        metrics = {
            k.removesuffix("_epoch"): v
            for k, v in trainer.callback_metrics.items()
            if k.startswith(("train/", "val/")) and not k.endswith("_step")
        }
        shown = " ".join(f"{k}={float(v):.4f}" for k, v in sorted(metrics.items()))
        log.info(
            "[%s] epoch %d/%d %s (%.0fs)",
            self.stage_name,
            trainer.current_epoch + 1,
            trainer.max_epochs,
            shown,
            time.perf_counter() - self.started,
        )


def state_digests(module: torch.nn.Module) -> list[str]:
    """A SHA-256 of every parameter and buffer, in order: equal lists mean bit-identical models."""
    return [
        hashlib.sha256(t.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
        if t.numel()
        else "empty"
        for t in module.state_dict().values()
    ]


class ReplicaCheck(L.Callback):
    """Under DDP: all processes share one run directory, and after each fit hold bit-identical weights.

    Replicas that drift apart silently are the classic failure of freezing schedules under DDP
    (parameters unfrozen after the model was wrapped are never all-reduced); this turns such a
    drift into a loud error instead of a quietly worse model.
    """

    def __init__(self) -> None:
        self.report: dict[str, Any] = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if trainer.world_size < 2:
            return
        run_dirs = set(_all_gather_object(str(trainer.default_root_dir)))
        if len(run_dirs) > 1:
            raise TransferError(
                f"The {trainer.world_size} processes write to different run directories {sorted(run_dirs)}. "
                "With torchrun or SLURM, give all of them the same one, e.g. "
                "hydra.run.dir=outputs/runs/$SLURM_JOB_ID (see the README's launch recipes)."
            )

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sampler = getattr(trainer.train_dataloader, "sampler", None)
        self.report = {"world_size": trainer.world_size, "train_sampler": type(sampler).__name__}

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.world_size < 2:
            return
        broadcast_buffers(pl_module)
        digests = _all_gather_object(state_digests(pl_module))
        mismatched = sum(len(set(per_tensor)) > 1 for per_tensor in zip(*digests))
        self.report.update({"tensors": len(digests[0]), "mismatched_tensors": mismatched, "identical": mismatched == 0})
        if mismatched:
            raise RuntimeError(
                f"{mismatched} of {len(digests[0])} tensors differ between the "
                f"{trainer.world_size} processes after this stage: the replicas diverged."
            )
        log.info("Replica check: all %d tensors bit-identical on %d processes", len(digests[0]), trainer.world_size)


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Rank 0's buffers (BatchNorm statistics) to every process, as DDP does before each forward.

    Between training steps each process updates the statistics of trainable BatchNorm layers from
    its own batch; DDP makes them equal at the start of the next forward. A stage that ends without
    one (no validation after its last epoch: ``check_val_every_n_epoch``, ``limit_val_batches=0``)
    leaves them differing: the checkpoint, the test and the next stage must all use rank 0's.
    """
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=0)


def _all_gather_object(obj: Any) -> list[Any]:
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


class ContinueLogSteps(L.Callback):
    """Each stage is a new Trainer whose step count starts at 0; this starts its logging step where
    the previous stage stopped, so TensorBoard and MLflow curves run on instead of overlapping (a
    resumed fit already stands where it stopped)."""

    def __init__(self, first_step: int) -> None:
        self.first_step = first_step

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        start_logging_at(trainer, self.first_step)


class RunRecord(L.Callback):
    """Puts the run's plan and the settings a resumed run must share (`transfer.training.resume`)
    into every checkpoint, beside what the model itself records."""

    def __init__(self, plan: dict[str, Any], run_shape: dict[str, Any]) -> None:
        self.plan, self.run_shape = plan, run_shape

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        # Lightning does not checkpoint a stop decision: a stage that its patience or deadline ended
        # is recorded as ended (at its epoch count), so that resuming from it trains no more epochs.
        # Checkpoint callbacks run after EarlyStopping, so the decision is made when this is saved.
        ended_at = trainer.current_epoch + 1 if trainer.should_stop else None
        checkpoint.setdefault("transfer", {}).update(
            {"plan": self.plan, "run_shape": self.run_shape, "stage_ended_at": ended_at}
        )
