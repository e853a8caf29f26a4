"""Tasks (`transfer.tasks`): the classification default unchanged, ordinal grades end to end."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import cohen_kappa_score

from tests.fixtures import FAST, ROOT, command_config, train_run
from transfer.errors import TransferError
from transfer.inference.evaluate import evaluate
from transfer.inference.explain import explain_files
from transfer.inference.export import export
from transfer.inference.predict import predict
from transfer.model.classifier import load_classifier
from transfer.tasks import IGNORE, Classification, Ordinal, task_from_state


def test_classification_task_is_the_weighted_smoothed_cross_entropy() -> None:
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 3), torch.tensor([0, 1, 2, 2, IGNORE, 1])
    weights = torch.tensor([0.5, 1.0, 2.0])
    task = Classification()
    expected = F.cross_entropy(logits, labels, weight=weights, ignore_index=IGNORE, label_smoothing=0.1)
    torch.testing.assert_close(task.loss(logits, labels, weights, 0.1), expected)
    torch.testing.assert_close(task.probabilities(logits), logits.softmax(-1))
    assert task.outputs(3) == 3


def test_ordinal_probabilities_are_a_distribution_whose_median_is_the_prediction() -> None:
    task = Ordinal()
    assert task.outputs(4) == 3
    outputs = torch.tensor(
        [
            [3.0, 0.2, -4.0],  # P(>0) high, P(>1) ~0.55, P(>2) low: grade 2
            [-3.0, -3.0, -3.0],  # grade 0
            [-1.0, 2.0, 3.0],
        ]
    )  # not monotone: P(>1), P(>2) capped by P(>0) < 0.5
    probabilities = task.probabilities(outputs)
    torch.testing.assert_close(probabilities.sum(-1), torch.ones(3))
    assert (probabilities >= 0).all()
    assert task.predicted(probabilities).tolist() == [2, 0, 0]
    above = 1 - probabilities.cumsum(-1)[:, :-1]
    assert (above[:, 1:] <= above[:, :-1] + 1e-6).all()


def test_ordinal_loss_is_binary_cross_entropy_on_above_grade_targets() -> None:
    torch.manual_seed(0)
    outputs, labels = torch.randn(5, 3), torch.tensor([0, 3, 1, IGNORE, 2])
    targets = torch.tensor([[0, 0, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]], dtype=torch.float32)
    real = outputs[[0, 1, 2, 4]]
    per_image = F.binary_cross_entropy_with_logits(real, targets, reduction="none").sum(-1)
    task = Ordinal()
    torch.testing.assert_close(task.loss(outputs, labels, None, 0.0), per_image.mean())
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0])
    w = weights[torch.tensor([0, 3, 1, 2])]
    torch.testing.assert_close(task.loss(outputs, labels, weights, 0.0, reduction="sum"), (per_image * w).sum())


def test_ordinal_metrics_match_scikit_learn_on_the_real_rows() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 50)
    probabilities = torch.tensor(rng.dirichlet(np.ones(4), 50), dtype=torch.float32)
    task = Ordinal()
    predicted = task.predicted(probabilities).numpy()
    # Evaluation padding (labels IGNORE) is what `real` leaves out before any metric sees a row.
    padded_labels = torch.tensor(np.concatenate([labels, [IGNORE, IGNORE]]))
    real = task.real(padded_labels)
    assert real.tolist() == [True] * 50 + [False] * 2
    padded = torch.cat([probabilities, probabilities[:2]])
    values = {k: float(v) for k, v in task.metrics(4, "")(padded[real], padded_labels[real]).items()}
    assert values["acc"] == pytest.approx(float((predicted == labels).mean()))
    assert values["mae"] == pytest.approx(float(np.abs(predicted - labels).mean()))
    assert values["qwk"] == pytest.approx(cohen_kappa_score(labels, predicted, weights="quadratic"), abs=1e-5)


def test_a_checkpoint_without_a_task_is_classification_and_unknown_tasks_are_named() -> None:
    assert isinstance(task_from_state(None), Classification)
    assert isinstance(task_from_state({"name": "ordinal"}), Ordinal)
    with pytest.raises(TransferError, match="regressionish"):
        task_from_state({"name": "regressionish"})


def write_graded_folder(root: Path, per_class: int = 16, size: int = 40) -> Path:
    """Three grades of brightness (g0 darkest), in folders that sort in grade order."""
    rng = np.random.default_rng(0)
    for grade in range(3):
        folder = root / f"g{grade}"
        folder.mkdir(parents=True)
        for index in range(per_class):
            level = 50 + 75 * grade + rng.normal(0, 12, (size, size))
            Image.fromarray(np.clip(np.stack([level] * 3, -1), 0, 255).astype(np.uint8)).save(
                folder / f"{index:03d}.png"
            )
    return root


@pytest.fixture(scope="module")
def ordinal_run(tmp_path_factory) -> dict:
    tmp_path = tmp_path_factory.mktemp("ordinal")
    images = write_graded_folder(tmp_path / "images")
    results = train_run(
        [
            *FAST,
            "data=folder",
            f"data.root={images}",
            "task=ordinal",
            "task.levels=[g0,g1,g2]",
            "augment=none",
            "schedule.stages.0.epochs=3",
            "schedule.stages.0.lr=0.01",
            "schedule.stages.0.unfreeze=all",
        ],
        tmp_path / "run",
    )  # random init: train it all
    return {"images": images, "results": results, "ckpt": results["best_checkpoint"]["path"], "tmp": tmp_path}


def test_ordinal_run_trains_k_minus_one_outputs_and_reports_grade_metrics(ordinal_run: dict) -> None:
    results = ordinal_run["results"]
    assert results["task"] == "ordinal"
    assert set(results["test"]) == {"loss", "acc", "mae", "qwk"}
    assert results["test"]["acc"] > 0.5  # brightness grades are easy
    classifier = load_classifier(ordinal_run["ckpt"])
    assert isinstance(classifier.task, Ordinal)
    assert classifier.model.get_classifier().out_features == 2  # 3 grades
    assert classifier.class_names == ["g0", "g1", "g2"]


def test_ordinal_evaluate_reproduces_the_runs_test_metrics(ordinal_run: dict, tmp_path: Path) -> None:
    report = evaluate(command_config("evaluate", tmp_path / "eval", [f"ckpt={ordinal_run['ckpt']}"]))
    for name in ("acc", "mae", "qwk"):
        assert report["metrics"][name] == pytest.approx(ordinal_run["results"]["test"][name], abs=1e-6)
    assert report["task"] == "ordinal"
    assert np.array(report["confusion_matrix"]).sum() == sum(ordinal_run["results"]["split_counts"]["test"].values())


def test_ordinal_predict_writes_grade_probabilities_and_the_median_grade(ordinal_run: dict, tmp_path: Path) -> None:
    predict(
        command_config(
            "predict", tmp_path / "pred", [f"ckpt={ordinal_run['ckpt']}", f"inputs={ordinal_run['images'] / 'g2'}"]
        )
    )
    with open(tmp_path / "pred" / "predictions.csv") as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 16
    for row in rows:
        probabilities = np.array([float(row[f"p_g{k}"]) for k in range(3)])
        assert probabilities.sum() == pytest.approx(1.0, abs=1e-5)
        median = int((1 - np.cumsum(probabilities)[:-1] >= 0.5).sum())
        assert row["predicted"] == f"g{median}"
    assert sum(row["predicted"] == "g2" for row in rows) >= 12


def test_ordinal_export_passes_parity_and_explain_runs(ordinal_run: dict, tmp_path: Path) -> None:
    report = export(
        command_config("export", tmp_path / "export", [f"ckpt={ordinal_run['ckpt']}", "formats=[onnx,torchscript]"])
    )
    assert all(result["passed"] for result in report["formats"].values())
    spec = json.loads((tmp_path / "export" / "preprocessing.json").read_text())
    assert spec["task"] == "ordinal" and "P(class > k)" in spec["output"]
    summary = explain_files(
        command_config("explain", tmp_path / "explain", [f"ckpt={ordinal_run['ckpt']}", "split=test", "max_images=2"])
    )
    assert summary["panels"] == 2


def test_mixup_is_refused_for_ordinal_grades(tmp_path: Path) -> None:
    images = write_graded_folder(tmp_path / "images", per_class=4)
    with pytest.raises(TransferError, match="mixup"):
        train_run([*FAST, "data=folder", f"data.root={images}", "task=ordinal", "mixup=light"], tmp_path / "run")


def test_panel_grade_metrics_from_a_confusion_matrix_match_scikit_learn() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("panel", ROOT / "benchmarks" / "panel.py")
    panel = importlib.util.module_from_spec(spec)
    sys.modules["panel"] = panel  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(panel)
    finally:
        del sys.modules["panel"]
    confusion = [[10, 2, 0, 1], [3, 5, 1, 0], [0, 2, 4, 1], [1, 0, 2, 8]]
    truth = [i for i, row in enumerate(confusion) for count in row for _ in range(count)]
    guess = [j for row in confusion for j, count in enumerate(row) for _ in range(count)]
    values = panel.grade_metrics(confusion)
    assert values["acc"] == pytest.approx(np.mean(np.array(truth) == np.array(guess)))
    assert values["mae"] == pytest.approx(np.mean(np.abs(np.array(truth) - np.array(guess))))
    assert values["qwk"] == pytest.approx(cohen_kappa_score(truth, guess, weights="quadratic"))


def test_declared_levels_order_the_grades_and_unknown_labels_name_file_and_row(tmp_path: Path) -> None:
    from transfer.data.sources import csv_manifest, image_folder
    from transfer.errors import DataError

    images = write_graded_folder(tmp_path / "images", per_class=3)
    for old, new in (("g0", "low"), ("g1", "mid"), ("g2", "high")):
        (images / old).rename(images / new)
    table = image_folder(images)
    assert table.class_names == ["high", "low", "mid"]  # sorted names are not grade order
    arranged = Ordinal(levels=["low", "mid", "high"]).arrange(table)
    assert arranged.class_names == ["low", "mid", "high"]
    for path, label in zip(arranged.paths, arranged.labels):
        assert Path(path).parent.name == arranged.class_names[label]
    manifest = tmp_path / "labels.csv"
    rows = [(p, Path(p).parent.name) for p in table.paths] + [(table.paths[0], "extreme")]
    manifest.write_text("path,label\n" + "".join(f"{p},{label}\n" for p, label in rows))
    with pytest.raises(DataError, match=r"'extreme', e\.g\. .*\(row 11 of .*labels\.csv\)"):
        Ordinal(levels=["low", "mid", "high"]).arrange(csv_manifest(manifest))
    with pytest.raises(DataError, match="at least two distinct"):
        Ordinal(levels=["low", "low"])
