"""The LightningModule: a timm classifier trained one schedule stage at a time."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.scheduler.scheduler import Scheduler as TimmScheduler
from torchmetrics import MeanMetric
from torchmetrics.aggregation import CatMetric

from transfer.model.features import TimmModel, classify_features, timm_model
from transfer.model.freezing import Splitter, Trainable, freeze_frozen_modules, set_trainable
from transfer.model.optim import build_optimizer
from transfer.model.stage import Stage
from transfer.model.tta import average_views, tta_symmetries
from transfer.tasks import Classification, Task, task_record

log = logging.getLogger(__name__)

# checkpoint["transfer"]["format"]: 2 since the LR schedule is timm's (its state and the optimizer's
# per-group ``lr_scale``); format 1 checkpoints are migrated on load (`migrate_format_1`).
CHECKPOINT_FORMAT = 2


def compile_in_place(model: nn.Module) -> None:
    """``torch.compile`` the two halves timm models are made of; parameter names do not change.

    Compiling the methods (not wrapping the module) keeps checkpoints, DDP and the head-only path,
    which calls ``forward_features`` directly, as they are.
    """
    halves = timm_model(model, "runtime.compile")
    setattr(model, "forward_features", torch.compile(halves.forward_features))  # noqa: B010 (an nn.Module's)
    setattr(model, "forward_head", torch.compile(halves.forward_head))  # noqa: B010


def gathered_outputs() -> CatMetric:
    """Every row of an evaluation, gathered from all processes on ``compute`` (torchmetrics' cat
    reduction), padding rows (NaN targets) kept for `ClassifierModule.gathered` to drop."""
    return CatMetric(nan_strategy="disable")


class ClassifierModule(L.LightningModule):
    """Holds the model; `set_stage` decides what trains before each stage's fit.

    The checkpoint records the stage it was written in (``checkpoint["transfer"]``) together with
    the class names, backbone name and arguments, and input config, so it can be resumed or used
    on its own (`transfer.model.classifier.load_classifier`).
    """

    class_weights: torch.Tensor | None  # a buffer: the loss's weight per class, on the model's device

    def __init__(
        self,
        model: nn.Module,
        class_names: Sequence[str],
        optimizer: Callable[..., torch.optim.Optimizer],
        backbone_name: str,
        input_config: dict[str, Any],
        model_kwargs: dict[str, Any] | None = None,
        task: Task | None = None,
        class_weights: Sequence[float] | None = None,
        channels_last: bool = False,
        coarse_blocks: bool = True,
        compile_model: bool = False,
        mixup: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
        splitter: Splitter | None = None,
        symmetries: Sequence[str] = (),
        tta: str = "none",
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model", "optimizer", "mixup", "splitter", "task"])
        self.model = model
        self.class_names = list(class_names)
        self.optimizer_factory = optimizer
        # timm's Mixup (or any callable (images, labels) -> (images, soft targets)), training batches only.
        self.mixup = mixup
        self.channels_last = channels_last
        self.coarse_blocks = coarse_blocks
        self.splitter = splitter  # the model's groups for the schedule, instead of timm's (`transfer.model.freezing`)
        # Head size, loss, decoding and metrics (`transfer.tasks`); single-label classification by default.
        self.task = task if task is not None else Classification()
        self.stage: Stage | None = None
        self.stage_index = 0
        self.trainable: Trainable | None = None
        self.features_cached = False  # this stage's batches hold pooled features, not images
        # Flips and turns the training augmentation applies (`transfer.augment.symmetries`), for tta=auto.
        self.symmetries = list(symmetries)
        # The run's own test averages the decoded outputs over these views (tta=...).
        self.tta = tta
        num_classes = len(self.class_names)
        # The task's metric on training batches (accuracy for class tasks).
        self.train_metric_name, self.train_metric = self.task.train_metric(num_classes)
        # Validation and test outputs of the whole split, gathered from every process (each pads its
        # share to the same length): the task's metrics, what it learns from validation (e.g. per-tag
        # thresholds) and the test confusion matrix come from all real images at the epoch's end, on
        # every process alike, however unevenly the padding fell (one process may have none real).
        self.val_outputs, self.val_targets = gathered_outputs(), gathered_outputs()
        self.test_outputs, self.test_targets = gathered_outputs(), gathered_outputs()
        self.test_confusion: list[list[int]] | None = None
        # Evaluation losses as torchmetrics means weighted by real images: a process whose share is
        # only padding (labels IGNORE) adds nothing, instead of a NaN or an unweighted average.
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()
        weights = torch.tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
        self.register_buffer("class_weights", weights, persistent=False)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        if compile_model:
            compile_in_place(self.model)

    def set_stage(self, stage: Stage, index: int, features_cached: bool = False) -> Trainable:
        """Freeze and unfreeze for ``stage`` (number ``index`` of the schedule); the next fit builds its
        optimizer from it. ``features_cached``: train the head on `transfer.training.feature_cache`
        features instead of images."""
        self.stage, self.stage_index = stage, index
        self.features_cached = features_cached
        self.trainable = set_trainable(self.model, stage.unfreeze, self.coarse_blocks, self.splitter)
        self.train(self.training)
        return self.trainable

    def train(self, mode: bool = True) -> ClassifierModule:
        # Lightning switches modes around every validation run; frozen parts must stay in eval.
        super().train(mode)
        if mode and self.stage is not None:
            freeze_frozen_modules(self.model, norm_layers_too=self.stage.freeze_bn)
        return self

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.features_cached:
            return classify_features(timm_model(self.model, "feature_cache"), inputs)
        if (
            self.training
            and self.trainable is not None
            and self.trainable.blocks == 0
            and isinstance(self.model, TimmModel)
            and self.splitter is None
        ):
            # Head only: the frozen backbone runs without autograd bookkeeping at all.
            with torch.inference_mode():
                features = self.model.forward_features(inputs)
            return self.model.forward_head(features.clone())
        return self.model(inputs)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        inputs, labels = batch
        if self.channels_last and inputs.dim() == 4:
            batch = inputs.contiguous(memory_format=torch.channels_last), labels
        return batch

    def _loss(self, logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return self.task.loss(logits, labels, self.class_weights, self.task.label_smoothing, reduction=reduction)

    def _step(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images, labels = batch
        logits = self(images)
        return self._loss(logits, labels), self.task.probabilities(logits), labels

    def _mixed_step(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The training loss on mixed images against mixed soft targets (timm's Mixup smooths them).

        timm mixes a batch with itself reversed and needs an even size: an odd last image is trained
        on unmixed, with the same smoothing.
        """
        assert self.mixup is not None
        images, labels = batch
        even = len(images) - len(images) % 2
        if even == 0:
            return self._step(batch)
        mixed, targets = self.mixup(images[:even], labels[:even])
        if even < len(images):
            smoothing = float(getattr(self.mixup, "label_smoothing", 0.0))
            tail = F.one_hot(labels[even:], targets.shape[1]).to(targets.dtype)
            tail = tail * (1.0 - smoothing) + smoothing / targets.shape[1]
            mixed, targets = torch.cat([mixed, images[even:]]), torch.cat([targets, tail])
        logits = self(mixed)
        loss = self.task.soft_loss(logits, targets, self.class_weights)
        return loss, self.task.probabilities(logits), labels

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        # Mixup blends images, so it applies to image batches, not to cached pooled features.
        mixing = self.mixup is not None and not self.features_cached
        loss, probs, labels = self._mixed_step(batch) if mixing else self._step(batch)
        self.train_metric(probs.detach(), labels)  # against the first image's label when mixing
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log(f"train/{self.train_metric_name}", self.train_metric, on_step=False, on_epoch=True)
        return loss

    def _evaluation_step(
        self, batch: Any, loss_metric: MeanMetric, tta: str = "none"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoded outputs and targets of a batch (padding included: `gathered` leaves it out), its
        mean loss over the real images into the loss metric.

        ``tta``: the outputs are averaged over the test-time views (`transfer.model.tta`); the loss
        stays that of the images as they are."""
        images, labels = batch
        logits = self(images)
        real = self.task.real(labels)
        total = self._loss(logits, labels, reduction="sum")
        # A weighted mean divides by the summed class weights of the targets (as cross_entropy's does).
        weights = self.class_weights[labels[real]] if self.class_weights is not None else real.float()
        count = weights.sum()
        loss_metric.update(total / count.clamp(min=1e-12), weight=count)
        decoded = average_views(
            lambda views: self.task.probabilities(self(views)),
            images,
            tta_symmetries(tta, self.symmetries),
            as_they_are=self.task.probabilities(logits),
        )
        return decoded, labels

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        decoded, labels = self._evaluation_step(batch, self.val_loss)
        self.val_outputs.update(decoded.detach().float())
        self.val_targets.update(labels.detach())
        self.log("val/loss", self.val_loss, on_epoch=True, prog_bar=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        decoded, labels = self._evaluation_step(batch, self.test_loss, self.tta)
        self.test_outputs.update(decoded.detach().float())
        self.test_targets.update(labels.detach())
        self.log("test/loss", self.test_loss, on_epoch=True)

    def gathered(self, outputs: CatMetric, targets: CatMetric) -> tuple[torch.Tensor, torch.Tensor]:
        """The split's decoded outputs and targets from every process, padding left out."""
        decoded, answers = outputs.compute(), targets.compute()
        outputs.reset()
        targets.reset()
        if self.task.kind == "classes":
            answers = answers.long()  # gathered as floats
        real = self.task.real(answers)
        return decoded[real], answers[real]

    def on_validation_epoch_end(self) -> None:
        # Before the checkpoint is saved, so it keeps what the task learns here (e.g. per-tag
        # thresholds), and the metrics of this epoch use it.
        if self.val_outputs.update_count:
            decoded, targets = self.gathered(self.val_outputs, self.val_targets)
            self.task.learn_from_validation(decoded, targets)
            # The same values on every process; sync_dist only keeps Lightning's DDP check quiet.
            self.log_dict(
                self.task.metrics(len(self.class_names), "val/").to(decoded.device)(decoded, targets),
                prog_bar=True,
                sync_dist=True,
            )
        self.log("stage", float(self.stage_index))

    def on_test_epoch_end(self) -> None:
        decoded, targets = self.gathered(self.test_outputs, self.test_targets)
        self.log_dict(
            self.task.metrics(len(self.class_names), "test/").to(decoded.device)(decoded, targets), sync_dist=True
        )
        confusion = self.task.confusion(len(self.class_names))
        self.test_confusion = (
            None if confusion is None else confusion.to(decoded.device)(self.task.predicted(decoded), targets).tolist()
        )

    def configure_optimizers(self) -> Any:
        assert self.stage is not None, "set_stage before fitting"
        total_steps = int(self.trainer.estimated_stepping_batches)
        return build_optimizer(
            self.model,
            self.stage,
            self.optimizer_factory,
            total_steps,
            steps_per_epoch=total_steps / max(1, self.trainer.max_epochs or 1),
        )

    def lr_scheduler_step(self, scheduler: Any, metric: Any | None) -> None:
        """timm's schedulers are stepped with the count of optimizer steps done; others (Lightning's
        LR finder swaps its own in) as Lightning steps them."""
        if isinstance(scheduler, TimmScheduler):
            scheduler.step_update(num_updates=self.trainer.global_step)
        else:
            super().lr_scheduler_step(scheduler, metric)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        assert self.stage is not None
        checkpoint.setdefault("transfer", {}).update(
            {
                "format": CHECKPOINT_FORMAT,
                "stage_index": self.stage_index,
                "stage_name": self.stage.name,
                "class_names": self.class_names,
                "backbone": self.hparams["backbone_name"],
                "model_kwargs": dict(self.hparams["model_kwargs"] or {}),  # timm.create_model arguments
                "input_config": self.hparams["input_config"],
                "symmetries": self.symmetries,
                "task": task_record(self.task),
            }
        )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        record = checkpoint.get("transfer", {})
        # What the task learnt by then (thresholds, target scaling) comes with the weights.
        self.task.load_state(record.get("task") or {})
        if record.get("format", 1) < CHECKPOINT_FORMAT and self.stage is not None:
            migrate_format_1(checkpoint, self.stage)


def migrate_format_1(checkpoint: dict[str, Any], stage: Stage) -> None:
    """A format 1 checkpoint (torch's ``LambdaLR`` schedule, each group's lr pre-scaled by its layer
    decay) resumed into timm's schedule: each optimizer group gets back its ``lr_scale`` and the
    stage's base lr, and the old scheduler state is dropped (timm's recomputes the same curve from
    the optimizer step count)."""
    for state in checkpoint.get("optimizer_states", []):
        for group in state.get("param_groups", []):
            initial = group.get("initial_lr", stage.lr)
            if "lr_scale" not in group and abs(initial - stage.lr) > 1e-12 * stage.lr:
                group["lr_scale"] = initial / stage.lr
            group["initial_lr"] = stage.lr
    if checkpoint.get("lr_schedulers"):
        checkpoint["lr_schedulers"] = [{} for _ in checkpoint["lr_schedulers"]]
