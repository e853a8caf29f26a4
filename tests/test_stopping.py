"""Stop when done: a stage ends on a plateau of its validation metric (``patience: auto``), the next
stage starts from its best epoch, and resuming keeps both (transfer/training/stopping.py)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch

from tests.fixtures import FAST, train_run, write_image_folder

# The packaged two_stage schedule's own patience (auto) and restore_best; a small model and images.
STOPPING = [o for o in FAST if not o.startswith("schedule.")] + [
    "augment=none",  # then the only randomness is the data order, a function of (seed, epoch)
    "data=folder",
    "schedule.min_steps=0",
    "schedule.stages.0.epochs=2",
    "schedule.stages.1.unfreeze=1",
    "schedule.stages.1.epochs=30",
]


def epoch_metric(log: str, stage: str, metric: str = "val/acc") -> list[float]:
    """Each epoch's ``metric`` of ``stage`` as the run's log prints it."""
    return [float(v) for v in re.findall(rf"\[{stage}\] epoch \d+/\d+ .*?{re.escape(metric)}=([0-9.]+)", log)]


def test_a_stage_at_its_ceiling_stops_within_patience_epochs(tmp_path: Path) -> None:
    """The striped classes are told apart after an epoch or two: val/acc sits at 1.0, so the
    fine-tuning stage ends ``patience`` epochs after it first got there, far from its 30."""
    images = write_image_folder(tmp_path / "images", per_class=16)
    results = train_run([*STOPPING, f"data.root={images}"], tmp_path / "run")
    finetune = results["stages"][1]
    accuracies = epoch_metric((tmp_path / "run" / "train.log").read_text(), "finetune")
    first_at_ceiling = accuracies.index(1.0) + 1  # epochs, counted from 1
    patience = finetune["patience"]
    assert patience == 6  # 2 validation images: 3 + ceil(log10(1000 / 2)); 6 epochs of 3 steps >= 10 steps
    assert finetune["stopped_early"] and finetune["epochs_planned"] == 30
    assert finetune["epochs_run"] == len(accuracies) <= first_at_ceiling + patience
    # the plan says what it planned and why; results.json what ran
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert [(s["epochs"], s["patience"], s["min_delta"]) for s in plan["stages"]] == [(2, 6, 0.25), (30, 6, 0.25)]
    assert any(n.startswith("patience auto: 6 epoch(s) for 2 validation image(s)") for n in plan["notes"])


class StageWeights(L.Callback):
    """The model's weights when stage 0 ends and when stage 1 starts (each stage instantiates its
    own callbacks: they write to one record, ``seen``)."""

    def __init__(self, seen: dict[str, dict[str, torch.Tensor]]) -> None:
        self.seen = seen

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if pl_module.stage_index == 0:
            self.seen["end of stage 0"] = {k: v.clone() for k, v in pl_module.state_dict().items()}

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if pl_module.stage_index == 1:
            self.seen["start of stage 1"] = {k: v.clone() for k, v in pl_module.state_dict().items()}


SEEN: dict[str, dict[str, dict[str, torch.Tensor]]] = {}


def stage_weights(name: str) -> StageWeights:
    return StageWeights(SEEN.setdefault(name, {}))


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("restore_best", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_the_next_stage_starts_from_the_best_epoch_of_the_stage_before(tmp_path: Path, restore_best: bool) -> None:
    # The largest val/loss is "best": on these separable images the loss falls every epoch, so the
    # head stage's best epoch is its first, not its last.
    images = write_image_folder(tmp_path / "images", per_class=16)
    name = f"restore_{restore_best}"
    train_run(
        [
            *STOPPING,
            f"data.root={images}",
            "schedule.stages.0.epochs=6",
            "schedule.stages.0.patience=null",
            "monitor.metric=val/loss",
            "monitor.mode=max",
            "schedule.stages.1.epochs=1",
            f"schedule.restore_best={restore_best}",
            "+callbacks.weights._target_=tests.test_stopping.stage_weights",
            f"+callbacks.weights.name={name}",
        ],
        tmp_path / "run",
    )
    seen = SEEN[name]
    (best,) = (tmp_path / "run" / "checkpoints").glob("head-epoch*.ckpt")
    best_weights = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    log = (tmp_path / "run" / "train.log").read_text()
    if restore_best:
        assert same(seen["start of stage 1"], best_weights)
        assert "the next stage starts from its best epoch" in log
    else:
        assert same(seen["start of stage 1"], seen["end of stage 0"])
    assert best.name == "head-epoch00.ckpt" and not same(best_weights, seen["end of stage 0"])


class CrashInStage(L.Callback):
    def __init__(self, stage_index: int, epoch: int) -> None:
        self.stage_index, self.epoch = stage_index, epoch

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if pl_module.stage_index == self.stage_index and trainer.current_epoch == self.epoch:
            raise RuntimeError("simulated crash")


@pytest.mark.slow  # three runs
@pytest.mark.parametrize("crash_at", [(0, 3), (1, 0)], ids=["on_a_plateau", "after_the_stage_stopped"])
def test_resuming_keeps_the_plateau_count_and_a_stopped_stage_stays_stopped(
    tmp_path: Path, crash_at: tuple[int, int]
) -> None:
    """The head stage stops on a plateau at epoch 6 of 40 (patience 2 on 4 validation images). A run
    interrupted on that plateau, or after the stage stopped, ends as the uninterrupted run did."""
    images = write_image_folder(tmp_path / "images", per_class=16)
    overrides = [
        *STOPPING,
        f"data.root={images}",
        "schedule.stages.0.epochs=40",
        "schedule.stages.0.patience=2",
        "schedule.stages.1.epochs=2",
    ]
    full = train_run(overrides, tmp_path / "full")
    head = full["stages"][0]
    assert head["stopped_early"] and crash_at[1] < head["epochs_run"] < 40, head
    stage, epoch = crash_at
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_run(
            [
                *overrides,
                "+callbacks.crash._target_=tests.test_stopping.CrashInStage",
                f"+callbacks.crash.stage_index={stage}",
                f"+callbacks.crash.epoch={epoch}",
            ],
            tmp_path / "crashed",
        )
    resumed = train_run([*overrides, f"resume={tmp_path / 'crashed'}"], tmp_path / "resumed")
    assert resumed["stages"][0]["epochs_run"] == head["epochs_run"]  # the stopped stage ran no more epochs
    assert [s["best_checkpoint"].rsplit("/", 1)[-1] for s in resumed["stages"]] == [
        s["best_checkpoint"].rsplit("/", 1)[-1] for s in full["stages"]
    ]
    after = [
        torch.load(tmp_path / r / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
        for r in ("full", "resumed")
    ]
    for key, value in after[0].items():
        torch.testing.assert_close(after[1][key], value, rtol=1e-6, atol=1e-7, msg=key)
    assert resumed["test"] == pytest.approx(full["test"], abs=1e-6)
