"""Recipes (conf/experiment/) and debug modes (conf/debug/): they compose, and they run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.fixtures import CONF_DIR, FAST, compose_config, train_config

EXPERIMENTS = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))
TINY_MODEL = [o for o in FAST if o.startswith(("backbone", "input.", "data.", "trainer."))]


def test_the_elpv_experiment_is_the_default_run() -> None:
    """The README's measured default result holds for experiment=elpv: the same config."""
    default, pinned = compose_config([], Path("run")), compose_config(["experiment=elpv"], Path("run"))
    assert OmegaConf.to_container(pinned, resolve=False) == OmegaConf.to_container(default, resolve=False)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_resolves_and_differs_from_the_default(name: str, tmp_path: Path) -> None:
    overrides = [f"experiment={name}", "input.size=[48, 64]"]  # the size is resolved at train time
    cfg = compose_config(overrides + ["data.root=/data"] if name == "custom_folder" else overrides, output_dir=tmp_path)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["schedule"]["stages"] and resolved["backbone"]["name"]
    if name != "elpv":
        assert resolved["backbone"]["name"] != "tf_efficientnet_lite0"


def test_hotdog_experiment_is_the_d2l_recipe() -> None:
    cfg = compose_config(["experiment=hotdog"])
    assert cfg.backbone.name == "resnet18" and cfg.data.source._target_ == "transfer.data.sources.hotdog"
    assert [s.unfreeze for s in cfg.schedule.stages] == [0, "all"]


def test_custom_folder_experiment_trains_on_a_folder(image_folder: Path, tmp_path: Path) -> None:
    """Command-line groups still beat the experiment's: a tiny model here instead of ConvNeXt."""
    cfg = compose_config(
        [
            "experiment=custom_folder",
            *TINY_MODEL,
            f"data.root={image_folder}",
            "schedule.stages.0.epochs=1",
            "schedule.stages.1.epochs=1",
            "schedule.min_steps=0",
        ],
        output_dir=tmp_path,
    )
    results = train_config(cfg)
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert results["class_weights"] is None and plan["task"]["label_smoothing"] == 0.1  # the recipe's loss
    assert results["dataset"] == "images" and len(results["stages"]) == 2


def test_fast_dev_run_runs_every_stage_on_one_batch_and_keeps_no_checkpoint(image_folder: Path, tmp_path: Path) -> None:
    cfg = compose_config([*FAST, "debug=fast_dev_run", "data=folder", f"data.root={image_folder}"], output_dir=tmp_path)
    results = train_config(cfg)
    assert [s["name"] for s in results["stages"]] == ["head", "finetune"]
    assert [s["logged_steps"] for s in results["stages"]] == [1, 2]  # one batch each
    assert results["best_checkpoint"]["path"] is None and not (tmp_path / "checkpoints").exists()
    tested = min(8, sum(results["split_counts"]["test"].values()))  # one batch of data.batch_size=8
    assert sum(map(sum, results["confusion_matrix"])) == tested


@pytest.mark.slow  # 40 epochs: in CI, not in the developer's loop
def test_overfit_memorises_one_batch(image_folder: Path, tmp_path: Path) -> None:
    """The sanity check it exists for: a model that can learn reaches train/acc 1.0 on one batch."""
    cfg = compose_config(
        [*TINY_MODEL, "debug=overfit", "data=folder", f"data.root={image_folder}", "schedule.stages.0.epochs=25"],
        output_dir=tmp_path,
    )
    train_config(cfg)
    with open(tmp_path / "metrics.csv") as stream:
        epochs = [row for row in csv.DictReader(stream) if row.get("train/acc")]
    assert len(epochs) == 25
    assert float(epochs[-1]["train/acc"]) == 1.0
    assert float(epochs[-1]["train/loss_epoch"]) < 0.5 * float(epochs[0]["train/loss_epoch"])
    assert json.loads((tmp_path / "results.json").read_text())["stages"][0]["logged_steps"] == 25
