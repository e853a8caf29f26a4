"""task=multilabel: tags read from separated labels or 0/1 columns, iterative splits, per-tag
thresholds chosen on validation and saved with the model, and every command end to end."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.metrics import average_precision_score, f1_score

from tests.fixtures import FAST, command_config, compose_config, train_on_tagged_images, train_run, write_tagged_images
from transfer.data.sources import csv_manifest, elpv
from transfer.data.splits import split_indices
from transfer.errors import DataError, TransferError
from transfer.inference.evaluate import evaluate
from transfer.inference.explain import explain_files
from transfer.inference.export import export
from transfer.inference.predict import predict
from transfer.model.classifier import load_classifier, read_checkpoint
from transfer.tasks import Multilabel
from transfer.tasks.multilabel import best_f1_threshold


def test_tags_come_from_separated_labels_or_from_0_1_columns(tmp_path: Path) -> None:
    labels = write_tagged_images(tmp_path / "images", count=8)
    separated = Multilabel().arrange(csv_manifest(labels, label_column="tags"))
    columns = Multilabel().arrange(csv_manifest(labels, label_column=["bright", "vertical"]))
    assert separated.kind == columns.kind == "tags"
    assert separated.class_names == columns.class_names == ["bright", "vertical"]
    np.testing.assert_array_equal(separated.targets, columns.targets)
    np.testing.assert_array_equal(separated.targets[:4], [[0, 0], [1, 0], [0, 1], [1, 1]])
    # split.csv stores each image's tags in the separated form, which reads back the same.
    assert [separated.label_text(i) for i in range(4)] == ["", "bright", "vertical", "bright;vertical"]


def test_a_tag_outside_the_declared_labels_names_file_and_row(tmp_path: Path) -> None:
    labels = write_tagged_images(tmp_path / "images", count=8)
    text = labels.read_text().splitlines()
    text[6] = text[6].replace(",bright,", ",bright;glossy,")  # 005.png, row 7 counting the header
    labels.write_text("\n".join(text) + "\n")
    with pytest.raises(DataError, match=r"\['glossy'\].*005\.png \(row 7 of .*labels\.csv\)"):
        Multilabel(labels=["bright", "vertical"]).arrange(csv_manifest(labels, label_column="tags"))
    assert Multilabel().arrange(csv_manifest(labels, label_column="tags")).class_names == [
        "bright",
        "glossy",
        "vertical",
    ]
    text[3] = text[3].replace(",vertical,0,1,", ",vertical,yes please,1,")  # 002.png, row 4
    labels.write_text("\n".join(text) + "\n")
    with pytest.raises(DataError, match=r"002\.png \(row 4 of .*\): 'yes please' for tag 'bright' is not 0/1"):
        Multilabel().arrange(csv_manifest(labels, label_column=["bright", "vertical"]))


def test_one_label_column_per_image_is_refused_for_several_columns_by_class_tasks(tmp_path: Path) -> None:
    from transfer.tasks import Classification

    labels = write_tagged_images(tmp_path / "images", count=4)
    with pytest.raises(DataError, match="task=multilabel"):
        Classification().arrange(csv_manifest(labels, label_column=["bright", "vertical"]))


def test_iterative_stratification_keeps_every_tags_share_in_each_split() -> None:
    table = Multilabel().arrange(elpv("tags"))
    assert table.class_names == ["defective", "poly"]
    splits = split_indices(table.stratify_on(), 0.25, 0.1, 42)
    assert sorted(np.concatenate(list(splits.values())).tolist()) == list(range(len(table.paths)))
    overall = table.targets.mean(axis=0)
    for name, rows in splits.items():
        np.testing.assert_allclose(table.targets[rows].mean(axis=0), overall, atol=0.01, err_msg=name)
    assert len(splits["test"]) == round(0.25 * len(table.paths))


def test_best_f1_threshold_matches_a_brute_force_search() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        positives = rng.random(30) < 0.3
        scores = np.clip(positives * 0.3 + rng.random(30) * 0.7, 0, 1).round(2)  # ties included
        threshold = best_f1_threshold(scores, positives)
        best = max(f1_score(positives, scores >= t, zero_division=0) for t in np.unique(scores))
        assert f1_score(positives, scores >= threshold) == pytest.approx(best)
        assert not np.isclose(scores, threshold).any()  # never on an image's score
    assert best_f1_threshold(np.array([0.2, 0.9]), np.array([False, False])) == 0.5


def test_loss_and_metrics_match_torch_and_scikit_learn() -> None:
    torch.manual_seed(0)
    outputs = torch.randn(40, 3)
    targets = (torch.rand(40, 3) < 0.4).float()
    task = Multilabel(labels=["a", "b", "c"], thresholds=[0.3, 0.5, 0.7])
    torch.testing.assert_close(
        task.loss(outputs, targets, None, 0.0), F.binary_cross_entropy_with_logits(outputs, targets)
    )
    padded = torch.cat([targets, torch.full((2, 3), float("nan"))])  # DDP padding rows are NaN
    torch.testing.assert_close(
        task.loss(torch.cat([outputs, outputs[:2]]), padded, None, 0.0, reduction="sum"),
        F.binary_cross_entropy_with_logits(outputs, targets, reduction="none").mean(-1).sum(),
    )
    probabilities = task.probabilities(outputs)
    values = {k: float(v) for k, v in task.metrics(3, "")(probabilities, targets).items()}
    truth, scores = targets.numpy(), probabilities.numpy()
    assert values["map"] == pytest.approx(average_precision_score(truth, scores, average="macro"), abs=1e-5)
    assert values["map_micro"] == pytest.approx(average_precision_score(truth, scores, average="micro"), abs=1e-5)
    decided = scores >= np.array([0.3, 0.5, 0.7])
    assert values["f1"] == pytest.approx(f1_score(truth, decided, average="macro", zero_division=0), abs=1e-5)
    assert values["f1_micro"] == pytest.approx(f1_score(truth, decided, average="micro"), abs=1e-5)
    weighted = Multilabel(pos_weight=[2.0, 1.0, 0.5])
    torch.testing.assert_close(
        weighted.loss(outputs, targets, None, 0.0),
        F.binary_cross_entropy_with_logits(outputs, targets, pos_weight=torch.tensor([2.0, 1.0, 0.5])),
    )


@pytest.fixture(scope="module")
def tagged_run(tmp_path_factory) -> dict:
    return train_on_tagged_images(
        tmp_path_factory.mktemp("multilabel"), "tags", "task=multilabel", "task.pos_weight=balanced"
    )


def test_multilabel_run_reports_map_and_saves_per_tag_thresholds(tagged_run: dict) -> None:
    results = tagged_run["results"]
    assert results["task"] == "multilabel" and results["monitor"]["metric"] == "val/map"
    assert set(results["test"]) == {"loss", "map", "map_micro", "f1", "f1_micro"}
    assert results["test"]["map"] > 0.6  # brightness and stripe direction are learnable in 4 epochs
    assert results["confusion_matrix"] is None
    state = read_checkpoint(tagged_run["ckpt"])["transfer"]["task"]
    assert state["labels"] == ["bright", "vertical"] and len(state["thresholds"]) == 2
    assert state["thresholds"] == results["task_state"]["thresholds"]
    assert all(0 < t < 1 for t in state["thresholds"])
    assert state["pos_weight"] == pytest.approx([1.0, 1.0], abs=0.35)  # about half the images carry each tag
    assert results["split_counts"]["train"]["bright"] > 0 and set(results["split_counts"]["test"]) == {
        "bright",
        "vertical",
    }
    classifier = load_classifier(tagged_run["ckpt"])
    assert classifier.model.get_classifier().out_features == 2
    assert classifier.task.thresholds == state["thresholds"]


def test_multilabel_evaluate_reproduces_the_test_metrics_and_reports_per_tag(tagged_run: dict, tmp_path: Path) -> None:
    report = evaluate(command_config("evaluate", tmp_path / "eval", [f"ckpt={tagged_run['ckpt']}"]))
    for name in ("map", "map_micro", "f1", "f1_micro"):
        assert report["metrics"][name] == pytest.approx(tagged_run["results"]["test"][name], abs=1e-6)
    per_label = {row["label"]: row for row in report["per_label"]}
    assert set(per_label) == {"bright", "vertical"}
    assert [per_label[n]["threshold"] for n in ("bright", "vertical")] == pytest.approx(
        tagged_run["results"]["task_state"]["thresholds"], abs=1e-6
    )
    assert sum(r["support"] for r in report["per_label"]) == sum(tagged_run["results"]["split_counts"]["test"].values())
    with open(tmp_path / "eval" / "predictions.csv") as stream:
        rows = list(csv.DictReader(stream))
    assert list(rows[0]) == ["path", "true", "predicted", "p_bright", "p_vertical"]
    thresholds = dict(zip(["bright", "vertical"], tagged_run["results"]["task_state"]["thresholds"]))
    for row in rows:
        expected = [tag for tag in ("bright", "vertical") if float(row[f"p_{tag}"]) >= thresholds[tag] - 1e-6]
        assert row["predicted"] == ";".join(expected)


def test_multilabel_predict_export_and_explain_follow_the_task(tagged_run: dict, tmp_path: Path) -> None:
    images = tagged_run["labels"].parent
    summary = predict(command_config("predict", tmp_path / "pred", [f"ckpt={tagged_run['ckpt']}", f"inputs={images}"]))
    assert summary["task"] == "multilabel" and set(summary["per_class"]) == {"bright", "vertical"}
    with open(tmp_path / "pred" / "predictions.csv") as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) == 48 and list(rows[0]) == ["path", "predicted", "p_bright", "p_vertical"]
    report = export(
        command_config(
            "export", tmp_path / "export", [f"ckpt={tagged_run['ckpt']}", "formats=[onnx,torchscript]", "quantize=int8"]
        )
    )
    assert all(result["passed"] for result in report["formats"].values())
    with open(tagged_run["results"]["split_manifest"]) as stream:
        tested = sum(row["split"] == "test" for row in csv.DictReader(stream))
    assert report["quantization"]["images"] == tested and 0.5 <= report["quantization"]["agreement"] <= 1
    spec = json.loads((tmp_path / "export" / "preprocessing.json").read_text())
    assert (
        spec["task"] == "multilabel"
        and spec["task_state"]["thresholds"] == tagged_run["results"]["task_state"]["thresholds"]
    )
    explained = explain_files(
        command_config(
            "explain",
            tmp_path / "explain",
            [f"ckpt={tagged_run['ckpt']}", "split=test", "max_images=2", "target=vertical"],
        )
    )
    assert explained["panels"] == 2
    with open(tmp_path / "explain" / "explanations.csv") as stream:
        assert {row["explained_class"] for row in csv.DictReader(stream)} == {"vertical"}


def test_class_weights_are_refused_for_tags(tmp_path: Path) -> None:
    from hydra.errors import ConfigCompositionException

    labels = write_tagged_images(tmp_path / "images", count=16)
    tags = [*FAST, "data=csv", f"data.csv={labels}", "data.source.label_column=tags", "task=multilabel", "augment=none"]
    with pytest.raises(ConfigCompositionException, match="task.class_weights"):  # the task has no such option
        train_run([*tags, "task.class_weights=balanced"], tmp_path / "run")
    with pytest.raises(TransferError, match="pos_weight"):  # the old name says where to look
        train_run([*tags, "class_weights=balanced"], tmp_path / "old")


def test_the_server_answers_with_tags_at_the_saved_thresholds(tagged_run: dict) -> None:
    import base64

    pytest.importorskip("litserve")
    from transfer.data.images import load_rgb
    from transfer.inference.serve import CheckedRequests, ExplainAPI, PredictAPI

    paths = sorted(tagged_run["labels"].parent.glob("*.png"))[:4]
    api = PredictAPI(tagged_run["ckpt"], "none")
    api.setup("cpu")
    checked = CheckedRequests(None, {"/predict": False}, 10**6, api.classifier.input_config)
    images = api.decode_request(
        {"images": [checked.prepared(base64.b64encode(p.read_bytes()).decode(), "image") for p in paths]}
    )
    answers = api.encode_response(api.predict(images))["predictions"]
    classifier = load_classifier(tagged_run["ckpt"])
    expected = classifier.probabilities(torch.stack([classifier.preprocess(load_rgb(p)) for p in paths]))
    thresholds = tagged_run["results"]["task_state"]["thresholds"]
    for answer, row in zip(answers, expected):
        assert answer["probabilities"] == pytest.approx(dict(zip(["bright", "vertical"], row.tolist())), abs=1e-5)
        assert answer["tags"] == [t for t, p, c in zip(["bright", "vertical"], row.tolist(), thresholds) if p >= c]
        assert list(answer["thresholds"].values()) == pytest.approx(thresholds)
    explainer = ExplainAPI(tagged_run["ckpt"], "none")
    explainer.setup("cpu")
    image = explainer.decode_request({"image": checked.prepared(base64.b64encode(paths[0].read_bytes()).decode(), "x")})
    assert set(explainer.predict(image)["prediction"]) == {"tags", "probabilities", "thresholds"}


def test_tag_folders_join_an_images_copies_into_one_image_with_every_tag(tmp_path: Path) -> None:
    from transfer.data.sources import tag_folders

    image = Image.new("RGB", (8, 8))
    for tag, names in (("fried", ["a", "b"]), ("spicy", ["b", "c"]), ("none", ["d"])):
        (tmp_path / tag).mkdir()
        for name in names:
            image.save(tmp_path / tag / f"{name}.png")
    table = Multilabel().arrange(tag_folders(tmp_path, untagged="none"))
    tags = {Path(p).name: table.label_text(i) for i, p in enumerate(table.paths)}
    assert tags == {"a.png": "fried", "b.png": "fried;spicy", "c.png": "spicy", "d.png": ""}
    assert table.class_names == ["fried", "spicy"]
    image.save(tmp_path / "none" / "a.png")
    with pytest.raises(DataError, match="'a.png' is in the untagged folder 'none' and in tag folder"):
        tag_folders(tmp_path, untagged="none")
    cfg = compose_config(["data=tag_folders", f"data.root={tmp_path}", "task=multilabel"])
    assert cfg.data.source._target_.endswith("tag_folders") and cfg.data.source.root == str(tmp_path)


def test_a_custom_separator_reads_tags_and_split_csv_writes_them_back_the_same(tmp_path: Path) -> None:
    """``task.separator`` splits one label column; 0/1 columns are read the same whatever it is."""
    labels = write_tagged_images(tmp_path / "images", count=8)
    labels.write_text(labels.read_text().replace("bright;vertical", "bright|vertical"))
    task = Multilabel(separator="|")
    table = task.arrange(csv_manifest(labels, label_column="tags"))
    columns = Multilabel(separator="|").arrange(csv_manifest(labels, label_column=["bright", "vertical"]))
    np.testing.assert_array_equal(table.targets, columns.targets)
    assert table.label_text(3) == "bright|vertical"
    reread = Multilabel(separator="|").parse(table.label_text(3))
    assert reread == {"bright": True, "vertical": True}
