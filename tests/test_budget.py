"""Length from the data and the clock: plateau stopping per stage, and budget.minutes planning."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures import FAST, compose_config, train_run
from transfer import fine_tune
from transfer.errors import ScheduleError, TransferError
from transfer.model.stage import Stage, parse_stages
from transfer.training.budget import (
    RESERVE_SECONDS,
    SplitSizes,
    StageCost,
    check_single_process,
    plan_epochs,
    stage_seconds,
)

TWO_STAGES = [Stage("head", 4, 0), Stage("finetune", 12, 3, lr=3e-4)]
SIZES = SplitSizes(train=1000, val=100, test=300)
COSTS = [
    StageCost(train=0.01, evaluate=0.005, cached=False, epoch=0.0),
    StageCost(train=0.03, evaluate=0.005, cached=False, epoch=0.0),
]


def test_a_schedule_that_fits_is_kept_as_it_is() -> None:
    assert plan_epochs(TWO_STAGES, COSTS, SIZES, seconds=10_000) == [4, 12]


def test_a_schedule_too_long_for_the_budget_is_scaled_down_keeping_its_shape() -> None:
    full = sum(stage_seconds(c, SIZES, s.epochs) for c, s in zip(COSTS, TWO_STAGES))
    epochs = plan_epochs(TWO_STAGES, COSTS, SIZES, seconds=full / 2)
    assert sum(stage_seconds(c, SIZES, e) for c, e in zip(COSTS, epochs)) <= full / 2
    assert epochs == [2, 6]
    # Never below one epoch a stage, however short the budget.
    assert plan_epochs(TWO_STAGES, COSTS, SIZES, seconds=1) == [1, 1]


def test_cached_head_stages_cost_one_extraction_not_epochs() -> None:
    cached = StageCost(train=0.0, evaluate=0.005, cached=True, epoch=0.0)
    assert stage_seconds(cached, SIZES, 100) == stage_seconds(cached, SIZES, 1) == pytest.approx(5.5)
    # Each epoch's fixed cost (checkpoints, loop set-up) counts too: what dominates on tiny data.
    assert stage_seconds(StageCost(0.0, 0.005, True, epoch=0.5), SIZES, 100) == pytest.approx(5.5 + 50)


def test_budget_refuses_several_processes() -> None:
    check_single_process(compose_config([]).trainer)
    with pytest.raises(TransferError, match="one process"):
        check_single_process(compose_config(["trainer=ddp"]).trainer)


def test_patience_must_be_positive() -> None:
    with pytest.raises(ScheduleError, match="patience"):
        parse_stages([{"name": "head", "epochs": 3, "patience": 0}])


def test_a_stage_stops_on_a_plateau_of_the_validation_metric(image_folder: Path, tmp_path: Path) -> None:
    # The striped classes are separated after an epoch: val/loss keeps falling for a while, val/acc
    # sits at 1.0, so with patience 1 on val/acc the stage ends long before its 30 epochs.
    results = train_run(
        [
            *FAST,
            "data=folder",
            f"data.root={image_folder}",
            "augment=none",
            "schedule.stages.0.epochs=30",
            "schedule.stages.0.patience=1",
        ],
        tmp_path / "run",
    )
    head = results["stages"][0]
    assert head["stopped_early"] and head["epochs_run"] < 30, head
    assert results["stages"][1]["epochs_run"] == 1 and not results["stages"][1]["stopped_early"]


def test_budget_shortens_the_schedule_and_gives_each_stage_its_deadline(image_folder: Path, tmp_path: Path) -> None:
    """The plan's side of a budget (how close a run comes to it is benchmarks/panel.py's 5-minute row)."""
    overrides = [
        *FAST,
        "data=folder",
        f"data.root={image_folder}",
        "augment=none",
        "schedule.stages.0.epochs=200",
        "schedule.stages.1.epochs=400",
        "budget.minutes=0.5",
    ]
    result = fine_tune(overrides, run_dir=tmp_path / "run")
    budget, stages = result.results["budget"], result.plan.stages
    planned = budget["epochs"]
    assert planned[0] < 200 and planned[1] < 400 and planned[1] > planned[0], budget
    assert [s.epochs for s in stages] == planned == [s["epochs_planned"] for s in result.results["stages"]]
    assert sum(budget["planned_stage_seconds"]) <= 0.9 * (
        budget["seconds_left_at_plan"] - budget["planned_test_seconds"]
    )
    # the last stage must end in time for the test; the first in time for the last and the test
    last = 30 - RESERVE_SECONDS - budget["planned_test_seconds"]
    assert stages[1].ends_by == pytest.approx(last, abs=0.1)
    assert stages[0].ends_by == pytest.approx(last - budget["planned_stage_seconds"][1], abs=0.1)
    assert result.test["acc"] > 0.5


EMA = ["+callbacks.ema._target_=lightning.pytorch.callbacks.EMAWeightAveraging", "+callbacks.ema.decay=0.9"]


def test_ema_weights_are_validated_checkpointed_and_tested(image_folder: Path, tmp_path: Path) -> None:
    """Lightning's EMAWeightAveraging through the callbacks config: each stage validates the
    averaged weights, its checkpoints hold them as the model (the raw ones kept for resuming), and
    the test and evaluate.py use them."""
    import torch

    from tests.fixtures import command_config
    from transfer.inference.evaluate import evaluate

    results = train_run(
        [*FAST, "data=folder", f"data.root={image_folder}", "schedule.stages.0.epochs=2", *EMA], tmp_path / "run"
    )
    checkpoint = torch.load(results["best_checkpoint"]["path"], map_location="cpu", weights_only=True)
    averaged, raw = checkpoint["state_dict"], checkpoint["current_model_state"]
    assert averaged.keys() == raw.keys()
    assert any(not torch.equal(averaged[k], raw[k]) for k in averaged if k.endswith("weight"))
    report = evaluate(command_config("evaluate", tmp_path / "eval", [f"ckpt={results['best_checkpoint']['path']}"]))
    assert report["metrics"]["acc"] == pytest.approx(results["test"]["acc"], abs=1e-6)
