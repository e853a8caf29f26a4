"""task=regression: numbers read from labels (bad ones named), standardised on the training split,
outputs in the data's units everywhere, threshold metrics, and every command end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import mean_absolute_error, r2_score, roc_auc_score

from tests.fixtures import command_config, train_on_tagged_images, write_tagged_images
from transfer.data.images import load_rgb
from transfer.data.sources import csv_manifest, elpv
from transfer.data.splits import split_indices
from transfer.errors import DataError, TransferError
from transfer.inference.evaluate import evaluate
from transfer.inference.explain import explain_files
from transfer.inference.export import export
from transfer.inference.predict import predict
from transfer.model.classifier import load_classifier, read_checkpoint
from transfer.tasks import Regression


def test_numbers_from_one_column_or_several_and_bad_numbers_name_file_and_row(tmp_path: Path) -> None:
    labels = write_tagged_images(tmp_path / "images", count=8)
    one = Regression().arrange(csv_manifest(labels, label_column="value"))
    assert one.kind == "values" and one.class_names == ["value"]
    expected = [float(line.split(",")[-1]) for line in labels.read_text().splitlines()[1:]]
    np.testing.assert_allclose(one.targets[:, 0], expected, rtol=1e-6)
    assert float(one.label_text(3)) == pytest.approx(expected[3], rel=1e-6)  # split.csv's form reads back
    two = Regression().arrange(csv_manifest(labels, label_column=["value", "bright"]))
    assert two.class_names == ["bright", "value"] and two.targets.shape == (8, 2)
    np.testing.assert_allclose(two.targets[:, 1], expected, rtol=1e-6)
    text = labels.read_text().splitlines()
    text[4] = text[4].rsplit(",", 1)[0] + ",n/a"  # 003.png, row 5 counting the header
    labels.write_text("\n".join(text) + "\n")
    with pytest.raises(DataError, match=r"'n/a' of .*003\.png \(row 5 of .*labels\.csv\) is not a number"):
        Regression().arrange(csv_manifest(labels, label_column="value"))


def test_a_threshold_splits_like_the_classifier_of_the_same_decision() -> None:
    """data=elpv_probability with task.threshold=0.5 tests on exactly data=elpv's test images."""
    values = Regression(threshold=0.5).arrange(elpv("probability"))
    classes = elpv("defective")
    assert values.paths == classes.paths
    for name, rows in split_indices(values.stratify_on(), 0.25, 0.1, 42).items():
        np.testing.assert_array_equal(rows, split_indices(classes.labels, 0.25, 0.1, 42)[name])
    # Without a threshold: quantile strata (ELPV's four annotated values, one stratum each).
    assert len(np.unique(Regression().arrange(elpv("probability")).labels)) == 4


def test_targets_are_standardised_on_training_rows_and_decoded_back() -> None:
    task = Regression(threshold=0.5)
    table = task.arrange(elpv("probability"))
    rows = np.arange(0, 2624, 2)
    task.fit(table, rows)
    assert task.mean == pytest.approx([table.targets[rows, 0].mean()], abs=1e-6)
    assert task.std == pytest.approx([table.targets[rows, 0].std()], abs=1e-6)
    outputs = torch.randn(5, 1)
    values = task.probabilities(outputs)
    torch.testing.assert_close(values, outputs * task.std[0] + task.mean[0])
    targets = torch.tensor([[0.0], [1.0], [0.333], [float("nan")], [0.667]])
    standard = (targets[[0, 1, 2, 4]] - task.mean[0]) / task.std[0]
    torch.testing.assert_close(task.loss(outputs, targets, None, 0.0), F.mse_loss(outputs[[0, 1, 2, 4]], standard))
    huber = Regression(loss="huber", mean=task.mean, std=task.std)
    torch.testing.assert_close(huber.loss(outputs, targets, None, 0.0), F.huber_loss(outputs[[0, 1, 2, 4]], standard))


def test_regression_metrics_match_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    truth = rng.random(60)
    guess = np.clip(truth + rng.normal(0, 0.2, 60), -0.2, 1.2)
    task = Regression(threshold=0.5)
    values = {
        k: float(v)
        for k, v in task.metrics(1, "")(
            torch.tensor(guess[:, None], dtype=torch.float32), torch.tensor(truth[:, None], dtype=torch.float32)
        ).items()
    }
    assert values["mae"] == pytest.approx(mean_absolute_error(truth, guess), abs=1e-5)
    assert values["rmse"] == pytest.approx(np.sqrt(np.mean((truth - guess) ** 2)), abs=1e-5)
    assert values["r2"] == pytest.approx(r2_score(truth, guess), abs=1e-4)
    assert values["acc"] == pytest.approx(np.mean((guess >= 0.5) == (truth >= 0.5)), abs=1e-6)
    assert values["auroc"] == pytest.approx(roc_auc_score(truth >= 0.5, guess), abs=1e-5)


@pytest.fixture(scope="module")
def valued_run(tmp_path_factory) -> dict:
    return train_on_tagged_images(
        tmp_path_factory.mktemp("regression"), "value", "task=regression", "task.threshold=0.5"
    )


def test_regression_run_learns_the_value_and_saves_its_scaling(valued_run: dict) -> None:
    results = valued_run["results"]
    assert results["task"] == "regression" and results["monitor"] == {"metric": "val/mae", "mode": "min"}
    assert set(results["test"]) == {"loss", "mae", "rmse", "r2", "acc", "f1", "auroc"}
    with open(results["split_manifest"]) as stream:
        rows = list(csv.DictReader(stream))
    train_values = np.array([float(r["label"]) for r in rows if r["split"] == "train"])
    test_values = np.array([float(r["label"]) for r in rows if r["split"] == "test"])
    state = read_checkpoint(valued_run["ckpt"])["transfer"]["task"]
    assert state["mean"] == pytest.approx([train_values.mean()], abs=1e-5)
    assert state["std"] == pytest.approx([train_values.std()], abs=1e-5)
    # Better than always answering the training mean (brightness sets the value).
    assert results["test"]["mae"] < np.abs(test_values - train_values.mean()).mean()
    assert results["confusion_matrix"] is None


def test_regression_evaluate_predict_export_and_explain_use_the_datas_units(valued_run: dict, tmp_path: Path) -> None:
    ckpt, results = valued_run["ckpt"], valued_run["results"]
    report = evaluate(command_config("evaluate", tmp_path / "eval", [f"ckpt={ckpt}"]))
    for name in ("mae", "rmse", "r2", "acc", "f1", "auroc"):
        assert report["metrics"][name] == pytest.approx(results["test"][name], abs=1e-5)
    assert (tmp_path / "eval" / "residuals.png").stat().st_size > 0
    assert sum(row["images"] for row in report["calibration"]["value"]) == report["images"]

    images = valued_run["labels"].parent
    predict(command_config("predict", tmp_path / "pred", [f"ckpt={ckpt}", f"inputs={images}"]))
    with open(tmp_path / "pred" / "predictions.csv") as stream:
        rows = list(csv.DictReader(stream))
    assert list(rows[0]) == ["path", "predicted_value", "above_threshold"]
    classifier = load_classifier(ckpt)
    image = classifier.preprocess(load_rgb(rows[0]["path"]))
    with torch.inference_mode():
        raw = float(classifier.model(image[None])[0, 0])
    mean, std = classifier.task.mean[0], classifier.task.std[0]
    assert float(rows[0]["predicted_value"]) == pytest.approx(raw * std + mean, abs=1e-5)
    assert rows[0]["above_threshold"] == str(int(raw * std + mean >= 0.5))

    exported = export(command_config("export", tmp_path / "export", [f"ckpt={ckpt}", "formats=[onnx,torchscript]"]))
    assert all(result["passed"] for result in exported["formats"].values())
    spec = json.loads((tmp_path / "export" / "preprocessing.json").read_text())
    assert spec["task_state"]["mean"] == [mean] and "std" in spec["output"]
    with pytest.raises(TransferError, match="regression"):
        export(command_config("export", tmp_path / "export_int8", [f"ckpt={ckpt}", "formats=[onnx]", "quantize=int8"]))
    assert (
        explain_files(command_config("explain", tmp_path / "explain", [f"ckpt={ckpt}", "split=test", "max_images=1"]))[
            "panels"
        ]
        == 1
    )


def test_the_server_answers_with_values_in_the_datas_units(valued_run: dict) -> None:
    import base64

    pytest.importorskip("litserve")
    from transfer.inference.serve import CheckedRequests, PredictAPI

    paths = sorted(valued_run["labels"].parent.glob("*.png"))[:3]
    api = PredictAPI(valued_run["ckpt"], "none")
    api.setup("cpu")
    checked = CheckedRequests(None, {"/predict": False}, 10**6, api.classifier.input_config)
    images = api.decode_request(
        {"images": [checked.prepared(base64.b64encode(p.read_bytes()).decode(), "image") for p in paths]}
    )
    answers = api.encode_response(api.predict(images))["predictions"]
    classifier = load_classifier(valued_run["ckpt"])
    with torch.inference_mode():
        raw = classifier.model(torch.stack([classifier.preprocess(load_rgb(p)) for p in paths]))[:, 0]
    values = raw * classifier.task.std[0] + classifier.task.mean[0]
    for answer, value in zip(answers, values.tolist()):
        assert answer["values"]["value"] == pytest.approx(value, abs=1e-5)
        assert answer["above_threshold"] == (value >= 0.5)
