"""k-fold cross-validation (`transfer.training.cv`): folds, the untouched test split, out-of-fold and ensemble."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.fixtures import FAST, train_run, write_image_folder
from transfer.errors import DataError
from transfer.training.cv import fold_probabilities, fold_splits

CV = [*FAST, "augment=none", "data=folder", "data.split.test=0.25", "cv.folds=3"]


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as stream:
        return list(csv.DictReader(stream))


def test_folds_partition_the_pool_stratified_and_refuse_too_small_classes() -> None:
    labels = np.array([0] * 12 + [1] * 6)
    pool = np.arange(18)
    folds = fold_splits(labels, pool, 3, seed=0)
    assert sorted(np.concatenate(folds).tolist()) == pool.tolist()
    assert [np.bincount(labels[f]).tolist() for f in folds] == [[4, 2]] * 3
    assert [f.tolist() for f in fold_splits(labels, pool, 3, seed=0)] == [f.tolist() for f in folds]
    with pytest.raises(DataError, match="at least 7 training images of every class"):
        fold_splits(labels, pool, 7, seed=0)


@pytest.fixture(scope="module")
def cv_run(tmp_path_factory) -> dict:
    tmp_path = tmp_path_factory.mktemp("cv")
    images = write_image_folder(tmp_path / "images", per_class=12)
    summary = train_run([*CV, f"data.root={images}"], tmp_path / "cv")
    return {"images": images, "summary": summary, "dir": tmp_path / "cv", "tmp": tmp_path}


def test_each_fold_validates_on_its_own_part_and_none_sees_the_test_split(cv_run: dict) -> None:
    summary, run_dir = cv_run["summary"], cv_run["dir"]
    assert summary["folds"] == 3 and summary["train_images"] == 18 and summary["test_images"] == 6
    splits = []
    for index in range(3):
        rows = read_csv(run_dir / f"fold_{index}" / "split.csv")
        splits.append({name: {r["path"] for r in rows if r["split"] == name} for name in ("train", "val", "test")})
        assert (run_dir / f"fold_{index}" / "results.json").is_file()
    tests = [s["test"] for s in splits]
    assert tests[0] == tests[1] == tests[2] and len(tests[0]) == 6
    vals = [s["val"] for s in splits]
    assert all(not (a & b) for i, a in enumerate(vals) for b in vals[i + 1 :])  # disjoint folds
    pool = vals[0] | vals[1] | vals[2]
    assert len(pool) == 18 and not (pool & tests[0])
    for s in splits:
        assert s["train"] == pool - s["val"]  # trains on the other folds, never on test images


def test_out_of_fold_and_ensemble_predictions_come_from_the_right_models(cv_run: dict) -> None:
    summary, run_dir = cv_run["summary"], cv_run["dir"]
    oof = read_csv(run_dir / "oof_predictions.csv")
    assert len(oof) == 18
    by_path = {row["path"]: row for row in oof}
    fold_tests = []
    for fold_run in summary["fold_runs"]:
        results = json.loads((Path(fold_run) / "results.json").read_text())
        ckpt = results["best_checkpoint"]["path"]
        val = [r["path"] for r in read_csv(Path(fold_run) / "split.csv") if r["split"] == "val"]
        expected = fold_probabilities(ckpt, val, 8, 0)
        got = torch.tensor([[float(by_path[p][k]) for k in ("p_cat", "p_dog")] for p in val])
        torch.testing.assert_close(got, expected, atol=2e-6, rtol=0)  # each image by the model that never saw it
        test_paths = [r["path"] for r in read_csv(run_dir / "test_predictions.csv")]
        fold_tests.append(fold_probabilities(ckpt, test_paths, 8, 0))
    ensemble = read_csv(run_dir / "test_predictions.csv")
    got = torch.tensor([[float(row["p_cat"]), float(row["p_dog"])] for row in ensemble])
    torch.testing.assert_close(got, torch.stack(fold_tests).mean(0), atol=2e-6, rtol=0)
    for name in ("acc", "f1", "auroc"):
        values = [t[name] for t in summary["fold_test"]]
        assert summary["test_single_model"][name]["mean"] == pytest.approx(np.mean(values), abs=1e-6)
        assert summary["test_single_model"][name]["sd"] == pytest.approx(np.std(values, ddof=1), abs=1e-6)
    from transfer.cli.commands import sweep_objective

    folds_val = [
        json.loads((Path(run) / "results.json").read_text())["best_checkpoint"]["score"] for run in summary["fold_runs"]
    ]
    assert sweep_objective(summary) == pytest.approx(np.mean(folds_val))  # what `python train.py` returns
    saved = json.loads((run_dir / "cv_summary.json").read_text())
    assert saved["test_ensemble"] == summary["test_ensemble"]


def test_a_cross_validation_resumes_fold_by_fold(cv_run: dict) -> None:
    earlier = cv_run["tmp"] / "interrupted"
    shutil.copytree(cv_run["dir"], earlier)
    (earlier / "fold_1" / "results.json").unlink()  # fold 1 never finished
    summary = train_run([*CV, f"data.root={cv_run['images']}", f"resume={earlier}"], cv_run["tmp"] / "resumed")
    runs = summary["fold_runs"]
    assert runs[0] == cv_run["summary"]["fold_runs"][0] and runs[2] == cv_run["summary"]["fold_runs"][2]
    assert runs[1] == str(cv_run["tmp"] / "resumed" / "fold_1")  # only the missing fold trained again
    assert not (cv_run["tmp"] / "resumed" / "fold_0").exists()


@pytest.mark.parametrize("task", ["multilabel", "regression"])
def test_cross_validation_follows_the_task(task: str, tmp_path: Path) -> None:
    """Tags are folded by iterative stratification; the ensemble averages tag probabilities or values."""
    from tests.fixtures import write_tagged_images

    labels = write_tagged_images(tmp_path / "images", count=32)
    column = "tags" if task == "multilabel" else "value"
    summary = train_run(
        [
            *FAST,
            "augment=none",
            "data=csv",
            f"data.csv={labels}",
            "data.split.test=0.25",
            f"data.source.label_column={column}",
            f"task={task}",
            "cv.folds=2",
        ],
        tmp_path / "cv",
    )
    metric = "map" if task == "multilabel" else "mae"
    assert summary["task"] == task and metric in summary["test_ensemble"] and metric in summary["out_of_fold"]
    oof = read_csv(tmp_path / "cv" / "oof_predictions.csv")
    assert len(oof) == summary["train_images"] == 24
    folds = []
    for fold_run in summary["fold_runs"]:
        rows = read_csv(Path(fold_run) / "split.csv")
        folds.append([r for r in rows if r["split"] == "val"])
        if task == "multilabel":  # every tag in every fold's validation images
            assert all(any(tag in r["label"].split(";") for r in folds[-1]) for tag in ("bright", "vertical"))
    assert sorted(r["path"] for fold in folds for r in fold) == sorted(r["path"] for r in oof)
    ensemble = read_csv(tmp_path / "cv" / "test_predictions.csv")
    column = "p_bright" if task == "multilabel" else "predicted_value"
    members = [
        fold_probabilities(
            json.loads((Path(run) / "results.json").read_text())["best_checkpoint"]["path"],
            [row["path"] for row in ensemble],
            8,
            0,
        )[:, 0]
        for run in summary["fold_runs"]
    ]
    got = torch.tensor([float(row[column]) for row in ensemble])
    torch.testing.assert_close(got, torch.stack(members).mean(0), atol=2e-6, rtol=0)
