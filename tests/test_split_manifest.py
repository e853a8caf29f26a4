"""The split is part of the run: split.csv, used by evaluate, export, explain and resume."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.fixtures import FAST, command_config, make_image, train_run, write_image_folder
from transfer.errors import DataError, TransferError
from transfer.inference.evaluate import evaluate
from transfer.inference.explain import explain_files
from transfer.training.resume import shape_differences


def rows_of(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


@pytest.fixture(scope="module")
def skipped_run(tmp_path_factory) -> dict:
    """A run on a folder with unreadable files, trained with bad_images=skip."""
    tmp = tmp_path_factory.mktemp("skipped")
    folder = write_image_folder(tmp / "images", per_class=20)
    for index in range(3):
        (folder / "dog" / f"broken_{index}.png").write_bytes(b"not a png")
    results = train_run(
        [*FAST, "data=folder", f"data.root={folder}", "runtime.bad_images=skip", "augment=none"], tmp / "run"
    )
    return {"folder": folder, "results": results, "run": tmp / "run", "ckpt": results["best_checkpoint"]["path"]}


def test_the_run_writes_its_split_with_each_files_state(skipped_run) -> None:
    rows = rows_of(skipped_run["run"] / "split.csv")
    counts = skipped_run["results"]["split_counts"]
    assert len(rows) == sum(sum(c.values()) for c in counts.values()) == 40  # the 3 broken files left out
    for split in ("train", "val", "test"):
        assert sum(r["split"] == split for r in rows) == sum(counts[split].values())
    assert not any("broken" in r["path"] for r in rows)
    # Each stage's trainable groups are recorded by name (FAST: head, then head + layer4).
    assert [s["trainable_groups"] for s in skipped_run["results"]["stages"]] == [["head: fc"], ["head: fc", "layer4"]]
    first = rows[0]
    assert int(first["bytes"]) == os.path.getsize(first["path"]) and first["label"] in ("cat", "dog")


def test_evaluate_after_a_skip_run_reproduces_its_test_metrics_exactly(skipped_run, tmp_path: Path) -> None:
    # Re-splitting the folder would meet the broken files (and a different test set).
    report = evaluate(command_config("evaluate", tmp_path / "eval", [f"ckpt={skipped_run['ckpt']}"]))
    tested = skipped_run["results"]
    assert report["images"] == sum(tested["split_counts"]["test"].values())
    assert report["metrics"]["acc"] == pytest.approx(tested["test"]["acc"], abs=1e-6)
    assert report["metrics"]["loss" if "loss" in report["metrics"] else "auroc"] is not None
    assert report["confusion_matrix"] == tested["confusion_matrix"]


def test_images_added_after_training_do_not_change_what_evaluate_tests(tmp_path: Path) -> None:
    folder = write_image_folder(tmp_path / "images", per_class=16)
    results = train_run([*FAST, "data=folder", f"data.root={folder}", "augment=none"], tmp_path / "run")
    ckpt = results["best_checkpoint"]["path"]
    rng = np.random.default_rng(5)
    for index in range(8):
        make_image(1, 40, rng).save(folder / "cat" / f"added_{index}.png")  # dog-like images labelled cat
    report = evaluate(command_config("evaluate", tmp_path / "eval", [f"ckpt={ckpt}"]))
    assert report["images"] == sum(results["split_counts"]["test"].values())
    assert report["confusion_matrix"] == results["confusion_matrix"]
    # A file of the run's test split that changed since is an error naming it, not a silent metric.
    tested = [r["path"] for r in rows_of(tmp_path / "run" / "split.csv") if r["split"] == "test"]
    make_image(0, 44, rng).save(tested[0])
    with pytest.raises(DataError, match=Path(tested[0]).name):
        evaluate(command_config("evaluate", tmp_path / "eval2", [f"ckpt={ckpt}"]))
    os.remove(tested[1])
    with pytest.raises(DataError, match="missing"):
        evaluate(command_config("evaluate", tmp_path / "eval3", [f"ckpt={ckpt}"]))


def test_explain_can_take_the_runs_own_test_images(skipped_run, tmp_path: Path) -> None:
    out = explain_files(
        command_config(
            "explain", tmp_path / "explain", [f"ckpt={skipped_run['ckpt']}", "split=test", "methods=[gradient]"]
        )
    )
    assert out["panels"] == sum(skipped_run["results"]["split_counts"]["test"].values())
    with pytest.raises(TransferError, match="one of inputs"):
        explain_files(command_config("explain", tmp_path / "none", [f"ckpt={skipped_run['ckpt']}"]))


def test_resume_uses_the_first_runs_images_and_refuses_other_settings(tmp_path: Path) -> None:
    folder = write_image_folder(tmp_path / "images", per_class=16)
    overrides = [*FAST, "data=folder", f"data.root={folder}", "augment=none"]
    first = train_run(overrides, tmp_path / "first")
    last = tmp_path / "first" / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["transfer"]["run_shape"]["seed"] == 42
    with pytest.raises(TransferError, match=r"schedule.stages.1.lr: 0.0003 -> 0.001\n  seed: 42 -> 7"):
        train_run([*overrides, f"resume={last}", "seed=7", "schedule.stages.1.lr=1e-3"], tmp_path / "refused")
    # Images added since do not enter the resumed run: it continues on the first run's split.
    for index in range(6):
        make_image(0, 40, np.random.default_rng(index)).save(folder / "cat" / f"added_{index}.png")
    resumed = train_run([*overrides, f"resume={last}"], tmp_path / "resumed")
    assert resumed["split_counts"] == first["split_counts"]
    assert rows_of(tmp_path / "resumed" / "split.csv") == rows_of(tmp_path / "first" / "split.csv")
    # An explicit override lets a changed setting through.
    allowed = train_run(
        [*overrides, f"resume={last}", "schedule.stages.1.lr=1e-3", "resume_allow_changes=true"], tmp_path / "allowed"
    )
    assert allowed["stages"][-1]["lr"] == pytest.approx(1e-3)


def test_shape_differences_name_each_changed_setting() -> None:
    before = {"seed": 1, "schedule": {"stages": [{"lr": 0.1, "epochs": 2}]}, "data": {"root": "a"}}
    now = {"seed": 1, "schedule": {"stages": [{"lr": 0.2, "epochs": 2}, {"lr": 0.01}]}, "data": {"root": "a"}}
    assert shape_differences(before, now) == [
        "schedule.stages.0.lr: 0.1 -> 0.2",
        "schedule.stages.1.lr: (unset) -> 0.01",
    ]
    assert shape_differences(before, before) == []
