"""CSV, TensorBoard and MLflow (local store) loggers by config, read back with their own readers."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from tests.fixtures import FAST, compose_config, train_config


def test_csv_tensorboard_and_mlflow_record_both_stages_on_one_step_axis(image_folder: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = compose_config(
        [
            *FAST,
            "data=folder",
            f"data.root={image_folder}",
            "logger=[csv,tensorboard,mlflow]",
            "schedule.stages.1.epochs=2",
            f"paths.log_dir={tmp_path}",
        ],
        output_dir=run_dir,
    )
    results = train_config(cfg)
    steps_per_stage = [stage["logged_steps"] for stage in results["stages"]]

    with open(run_dir / "metrics.csv") as stream:
        csv_steps = [int(row["step"]) for row in csv.DictReader(stream) if row.get("train/loss_step")]
    assert csv_steps == sorted(set(csv_steps)) and csv_steps[-1] == steps_per_stage[-1] - 1

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tb_steps = [event.step for event in events.Scalars("train/loss_step")]
    assert tb_steps == csv_steps  # stage 2 continues where stage 1 stopped, no overlap
    assert len(events.Scalars("val/acc")) == 3  # 1 + 2 epochs

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("transfer").experiment_id])
    assert run.data.tags["run_dir"] == str(run_dir)
    history = client.get_metric_history(run.info.run_id, "val/acc")
    assert [m.value for m in history] == [e.value for e in events.Scalars("val/acc")]
    assert run.data.metrics["test/acc"] == pytest.approx(results["test"]["acc"], abs=1e-6)
    assert run.data.params["backbone_name"] == "test_resnet"  # the module's hyperparameters
