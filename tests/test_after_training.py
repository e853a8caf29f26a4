"""Evaluate, predict, explain and export a model trained in the test, from its checkpoint alone."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.fixtures import FAST, ROOT, command_config, train_run, write_image_folder
from transfer.errors import DataError, TransferError
from transfer.inference.evaluate import evaluate
from transfer.inference.explain import explain_files
from transfer.inference.export import export
from transfer.inference.predict import predict
from transfer.inference.saliency import grad_cam, gradient_map
from transfer.model.classifier import load_classifier


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """A short real training on generated images (test_resnet, 32 px, head then last block)."""
    tmp_path = tmp_path_factory.mktemp("trained")
    images = write_image_folder(tmp_path / "images", per_class=24, size=48)
    run_dir = tmp_path / "run"
    results = train_run(
        [*FAST, "data=folder", f"data.root={images}", "schedule.stages.0.epochs=2", "schedule.stages.1.epochs=2"],
        run_dir,
    )
    return {"images": images, "results": results, "ckpt": results["best_checkpoint"]["path"], "tmp": tmp_path}


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path) as stream:
        return list(csv.DictReader(stream))


def test_checkpoint_alone_rebuilds_the_classifier(trained, tmp_path: Path) -> None:
    classifier = load_classifier(trained["ckpt"])
    assert classifier.class_names == ["cat", "dog"] and classifier.backbone == "test_resnet"
    assert classifier.input_config["size"] == [32, 32]
    assert not classifier.model.training
    with pytest.raises(TransferError, match="does not exist"):
        load_classifier(tmp_path / "missing.ckpt")


def test_evaluate_reproduces_the_runs_test_metrics_and_writes_the_report(trained, tmp_path: Path) -> None:
    report = evaluate(command_config("evaluate", tmp_path / "eval", [f"ckpt={trained['ckpt']}"]))
    tested = trained["results"]["test"]
    assert report["images"] == sum(trained["results"]["split_counts"]["test"].values())
    assert report["metrics"]["acc"] == pytest.approx(tested["acc"], abs=1e-6)
    assert report["metrics"]["auroc"] == pytest.approx(tested["auroc"], abs=1e-4)
    assert report["confusion_matrix"] == trained["results"]["confusion_matrix"]
    assert sum(row["support"] for row in report["per_class"]) == report["images"]
    for name in ("metrics.json", "per_class.csv", "predictions.csv", "confusion_matrix.png"):
        assert (tmp_path / "eval" / name).stat().st_size > 0, name
    assert Image.open(tmp_path / "eval" / "confusion_matrix.png").size[0] > 200
    wrong = [r for r in read_csv(tmp_path / "eval" / "predictions.csv") if r["true"] != r["predicted"]]
    assert len(report["confident_mistakes"]) == min(len(wrong), 16)
    assert (tmp_path / "eval" / "confident_mistakes.png").exists() == bool(wrong)


def test_evaluate_other_data_needs_the_models_classes(trained, tmp_path: Path) -> None:
    other = write_image_folder(tmp_path / "other", per_class=3, classes=("cat", "dog", "bird"))
    cfg = command_config(
        "evaluate", tmp_path / "eval", [f"ckpt={trained['ckpt']}", "data=folder", f"data.root={other}", "split=all"]
    )
    with pytest.raises(TransferError, match=r"\['bird'\]"):
        evaluate(cfg)
    shutil.rmtree(other / "bird")
    report = evaluate(cfg)
    assert report["images"] == 6 and report["split"] == "all"


def test_predict_writes_probabilities_and_lists_unreadable_files(trained, tmp_path: Path) -> None:
    inputs = tmp_path / "inputs"
    shutil.copytree(trained["images"] / "dog", inputs / "dogs")
    (inputs / "empty.jpg").write_bytes(b"")
    (inputs / "notes.jpg").write_text("not an image")
    (inputs / "readme.txt").write_text("ignored: not an image extension")
    summary = predict(
        command_config("predict", tmp_path / "pred", [f"ckpt={trained['ckpt']}", f"inputs={inputs}", "tta=flips"])
    )
    rows = read_csv(tmp_path / "pred" / "predictions.csv")
    assert summary["files"] == 26 and summary["predicted"] == len(rows) == 24 and summary["unreadable"] == 2
    for row in rows:
        probs = [float(row["p_cat"]), float(row["p_dog"])]
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)
        assert row["predicted"] == ["cat", "dog"][int(np.argmax(probs))]
        assert float(row["confidence"]) == pytest.approx(max(probs), abs=1e-6)
    unreadable = read_csv(tmp_path / "pred" / "unreadable.csv")
    assert sorted(Path(r["path"]).name for r in unreadable) == ["empty.jpg", "notes.jpg"]
    assert all("Cannot read image" in r["error"] for r in unreadable)


def test_predict_glob_and_missing_inputs(trained, tmp_path: Path) -> None:
    pattern = str(trained["images"] / "cat" / "cat_00*.png")
    summary = predict(command_config("predict", tmp_path / "pred", [f"ckpt={trained['ckpt']}", f"inputs='{pattern}'"]))
    assert summary["files"] == 10
    with pytest.raises(DataError, match="neither a file"):
        predict(command_config("predict", tmp_path / "pred2", [f"ckpt={trained['ckpt']}", "inputs=/no/such/dir"]))


def test_flip_tta_averages_the_views_and_is_flip_invariant(trained) -> None:
    classifier = load_classifier(trained["ckpt"])
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        manual = (classifier.model(images).softmax(-1) + classifier.model(images.flip(-1)).softmax(-1)) / 2
    torch.testing.assert_close(classifier.probabilities(images, "hflip"), manual)
    torch.testing.assert_close(
        classifier.probabilities(images, "flips"), classifier.probabilities(images.flip(-1).flip(-2), "flips")
    )


def test_auto_tta_uses_the_symmetries_the_model_was_trained_with(trained) -> None:
    from transfer.augment.symmetries import symmetries_of
    from transfer.model.tta import views_for

    # The fixture trains with augment=light (a crop and a mirror image): the checkpoint says so.
    assert trained["results"]["augment"]["symmetries"] == ["hflip"]
    classifier = load_classifier(trained["ckpt"])
    assert classifier.symmetries == ["hflip"]
    images = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(classifier.probabilities(images, "auto"), classifier.probabilities(images, "hflip"))
    classifier.symmetries = []  # a model of characters: no view but the image itself
    torch.testing.assert_close(classifier.probabilities(images, "auto"), classifier.probabilities(images, "none"))

    assert symmetries_of([{"_target_": "albumentations.SquareSymmetry"}, {"_target_": "albumentations.Affine"}]) == [
        "hflip",
        "vflip",
        "rot90",
    ]
    assert symmetries_of([{"_target_": "albumentations.VerticalFlip"}]) == ["vflip"]
    assert symmetries_of(None) == []
    # Solar cells: the image, both flips, the half turn and both quarter turns.
    square = torch.arange(16.0).reshape(1, 1, 4, 4)
    views = [view(square) for view in views_for(["hflip", "vflip", "rot90"])]
    assert len(views) == 6 and len({tuple(v.flatten().tolist()) for v in views}) == 6


def test_gradient_saliency_is_the_score_gradient() -> None:
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=2).double().eval()
    image = torch.randn(3, 32, 32, dtype=torch.float64)
    saliency, target = gradient_map(model, image)
    assert saliency.shape == (32, 32) and saliency.min() == 0 and saliency.max() == 1
    # finite differences at the most and least salient pixels agree with the map's ordering
    score = lambda x: model(x.unsqueeze(0))[0, target].item()

    def sensitivity(y: int, x: int) -> float:
        bumped = image.clone()
        steps = []
        for channel in range(3):
            bumped = image.clone()
            bumped[channel, y, x] += 1e-6
            steps.append(abs(score(bumped) - score(image)) / 1e-6)
        return max(steps)

    top = np.unravel_index(saliency.argmax(), saliency.shape)
    low = np.unravel_index(saliency.argmin(), saliency.shape)
    assert sensitivity(*top) > 10 * sensitivity(*low)


def test_grad_cam_of_a_pooled_linear_head_is_the_class_activation_map() -> None:
    """With global average pooling and a linear head, Grad-CAM equals CAM (Zhou et al. 2016)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3).eval()
    image = torch.randn(3, 128, 128)  # a 4x4 last feature map
    heat, target = grad_cam(model, image, target=1)
    with torch.no_grad():
        features = model.forward_features(image.unsqueeze(0))
        cam = F.relu(torch.einsum("c,bchw->bhw", model.get_classifier().weight[1], features)).unsqueeze(1)
        cam = F.interpolate(cam, size=(128, 128), mode="bilinear", align_corners=False)[0, 0]
    cam = (cam - cam.min()) / (cam.max() - cam.min())
    assert target == 1 and heat.std() > 0.1
    np.testing.assert_allclose(heat, cam.numpy(), atol=1e-5)


def test_grad_cam_refuses_transformers() -> None:
    import timm

    model = timm.create_model("test_vit", num_classes=2).eval()
    with pytest.raises(TransferError, match="method=gradient"):
        grad_cam(model, torch.randn(3, *model.pretrained_cfg["input_size"][1:]))


def test_explain_writes_one_panel_per_image(trained, tmp_path: Path) -> None:
    summary = explain_files(
        command_config(
            "explain",
            tmp_path / "explain",
            [f"ckpt={trained['ckpt']}", f"inputs={trained['images'] / 'cat'}", "max_images=3", "target=dog"],
        )
    )
    rows = read_csv(tmp_path / "explain" / "explanations.csv")
    assert summary["panels"] == len(rows) == 3
    assert {r["explained_class"] for r in rows} == {"dog"}
    for row in rows:
        assert Image.open(tmp_path / "explain" / row["panel"]).size[0] > 300


def reference_preprocess(path: Path, spec: dict) -> np.ndarray:
    """preprocessing.json followed with numpy and OpenCV only: what code outside the toolkit does."""
    rgb = np.asarray(Image.open(path).convert("RGB"))
    height, width = rgb.shape[:2]
    scale = spec["resize_shorter_side_to"] / min(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    resized = cv2.resize(
        rgb, size, interpolation={"bilinear": cv2.INTER_LINEAR, "bicubic": cv2.INTER_CUBIC}[spec["interpolation"]]
    )
    crop_h, crop_w = spec["center_crop"]
    top, left = (resized.shape[0] - crop_h) // 2, (resized.shape[1] - crop_w) // 2
    crop = resized[top : top + crop_h, left : left + crop_w].astype(np.float32) / 255.0
    normalised = (crop - np.array(spec["mean"], np.float32)) / np.array(spec["std"], np.float32)
    return normalised.transpose(2, 0, 1)


def test_export_passes_parity_and_predicts_right_outside_the_toolkit(trained, tmp_path: Path) -> None:
    import onnxruntime

    out = tmp_path / "export"
    report = export(command_config("export", out, [f"ckpt={trained['ckpt']}"]))
    for name in ("onnx", "torchscript"):
        assert report["formats"][name]["passed"] and report["formats"][name]["max_abs_diff"] < 1e-4
    assert len(report["parity_images"]) == sum(trained["results"]["split_counts"]["test"].values())
    spec = json.loads((out / "preprocessing.json").read_text())
    assert spec["class_names"] == ["cat", "dog"]

    paths = sorted((trained["images"] / "dog").glob("*.png"))[:5]
    batch = np.stack([reference_preprocess(p, spec) for p in paths])
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == spec["onnx_outputs"] == ["logits", "probabilities", "features"]
    logits, probabilities, features = session.run(None, {spec["input_name"]: batch})
    outside = torch.from_numpy(logits).softmax(-1)
    classifier = load_classifier(trained["ckpt"])
    images = torch.stack([classifier.preprocess(np.asarray(Image.open(p).convert("RGB"))) for p in paths])
    inside = classifier.probabilities(images)
    torch.testing.assert_close(outside, inside, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(torch.from_numpy(probabilities), inside, atol=1e-5, rtol=1e-4)
    with torch.inference_mode():  # the pooled features the head reads: the head applied to them gives the logits
        pooled = classifier.model.forward_head(classifier.model.forward_features(images), pre_logits=True)
        torch.testing.assert_close(torch.from_numpy(features), pooled, atol=1e-4, rtol=1e-4)
        head = classifier.model.get_classifier()
        torch.testing.assert_close(head(torch.from_numpy(features)), torch.from_numpy(logits), atol=1e-4, rtol=1e-4)
    assert set(report["formats"]["onnx"]["outputs"]) == {"logits", "probabilities", "features"}
    scripted = torch.jit.load(str(out / "model.torchscript.pt"))
    torch.testing.assert_close(scripted(torch.from_numpy(batch)).softmax(-1), inside, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["int8", "int8-dynamic"])
def test_int8_export_is_quantized_and_compared_with_fp32_on_the_test_split(trained, tmp_path: Path, mode: str) -> None:
    import onnx
    import onnxruntime

    out = tmp_path / mode
    report = export(
        command_config(
            "export", out, [f"ckpt={trained['ckpt']}", "formats=[onnx]", f"quantize={mode}", "calibration_images=16"]
        )
    )["quantization"]
    assert report["mode"] == ("static" if mode == "int8" else "dynamic")
    assert report["calibration_images"] == (16 if mode == "int8" else 0)
    assert report["images"] == sum(trained["results"]["split_counts"]["test"].values())
    assert report["fp32_acc"] == pytest.approx(trained["results"]["test"]["acc"], abs=1e-6)
    assert report["acc_delta"] == pytest.approx(report["int8_acc"] - report["fp32_acc"])
    assert 0.0 <= report["agreement"] <= 1.0
    ops = {node.op_type for node in onnx.load(str(out / "model.int8.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} & ops or {"DynamicQuantizeLinear", "MatMulInteger"} & ops, ops
    if mode == "int8":  # weights stored as 8-bit: a much smaller file
        assert report["int8_bytes"] < report["fp32_bytes"] / 2.5
    session = onnxruntime.InferenceSession(str(out / "model.int8.onnx"), providers=["CPUExecutionProvider"])
    assert session.run(None, {"image": np.zeros((2, 3, 32, 32), np.float32)})[0].shape == (2, 2)
    assert json.loads((out / "quantization.json").read_text()) == report


def test_the_servers_onnx_is_exported_once_and_every_runtime_answers_alike(trained, tmp_path: Path) -> None:
    """``serve.py backend=onnxruntime``: the checkpoint's inference graph exported into the cache on
    first use and reused; ONNX Runtime and PyTorch give the checkpoint's probabilities, with TTA."""
    pytest.importorskip("onnxruntime")
    from transfer.inference.runtimes import OnnxRuntime, TorchRuntime, cached_onnx

    classifier = load_classifier(trained["ckpt"])
    path = cached_onnx(classifier, tmp_path / "cache")
    assert path.parent.parent == tmp_path / "cache" / "onnx" and (path.parent / "parity.json").is_file()
    written = path.stat().st_mtime_ns
    assert cached_onnx(load_classifier(trained["ckpt"]), tmp_path / "cache") == path
    assert path.stat().st_mtime_ns == written  # not exported again

    paths = (
        sorted((trained["images"] / "cat").glob("*.png"))[:3] + sorted((trained["images"] / "dog").glob("*.png"))[:3]
    )
    reference = load_classifier(trained["ckpt"])
    images = torch.stack([reference.preprocess(np.asarray(Image.open(p).convert("RGB"))) for p in paths])
    for tta in ("none", "flips"):
        expected = reference.probabilities(images, tta)
        for runtime in (
            OnnxRuntime(path, load_classifier(trained["ckpt"]), 1),
            TorchRuntime(load_classifier(trained["ckpt"])),
        ):
            torch.testing.assert_close(runtime.probabilities(images, tta), expected, atol=1e-5, rtol=1e-4)

    plain = tmp_path / "logits_only.onnx"  # an ONNX file from before the graph had named outputs
    torch.onnx.export(
        reference.model, (images[:1],), str(plain), input_names=["image"], output_names=["logits"], dynamo=True
    )
    with pytest.raises(TransferError, match="export it again"):
        OnnxRuntime(plain, reference)


def test_timm_loads_the_exported_classifier_and_training_continues_from_it(trained, tmp_path: Path) -> None:
    import timm

    out = tmp_path / "export"
    report = export(command_config("export", out, [f"ckpt={trained['ckpt']}", "formats=[timm]"]))
    assert report["formats"]["timm"]["passed"]
    config = json.loads((out / "timm" / "config.json").read_text())
    assert config["architecture"] == "test_resnet" and config["label_names"] == ["cat", "dog"]
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    # Outside the toolkit: timm alone builds the fine-tuned classifier, with the same logits.
    model = timm.create_model(f"local-dir:{out / 'timm'}", pretrained=True).eval()
    classifier = load_classifier(trained["ckpt"])
    images = torch.stack(
        [
            classifier.preprocess(np.asarray(Image.open(p).convert("RGB")))
            for p in sorted((trained["images"] / "cat").glob("*.png"))[:6]
        ]
    )
    with torch.inference_mode():
        difference = (model(images) - classifier.model(images)).abs().max().item()
    assert difference <= 1e-5
    # ... and fine-tuning continues from it: the same classes keep its head.
    results = train_run(
        [
            *FAST,
            "data=folder",
            f"data.root={trained['images']}",
            "augment=none",
            f"backbone.weights=local-dir:{out / 'timm'}",
        ],
        tmp_path / "continued",
    )
    assert results["stages"][0]["best_val/acc"] >= 0.9  # starts from a trained classifier, not from scratch
    with pytest.raises(Exception, match="holds a 'test_resnet'"):  # Hydra wraps the TransferError
        train_run(
            [
                *FAST,
                "data=folder",
                f"data.root={trained['images']}",
                "backbone.name=test_vit",
                f"backbone.weights=local-dir:{out / 'timm'}",
            ],
            tmp_path / "wrong",
        )


@pytest.mark.slow
def test_commands_run_from_the_command_line(trained, tmp_path: Path) -> None:
    for script, extra in (("evaluate.py", []), ("predict.py", [f"inputs={trained['images'] / 'cat'}"])):
        done = subprocess.run(
            [
                sys.executable,
                str(ROOT / script),
                f"ckpt={trained['ckpt']}",
                *extra,
                f"paths.log_dir={tmp_path / 'logs'}",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-3000:]
    assert len(list((tmp_path / "logs" / "evaluations").iterdir())) == 1
    assert len(list((tmp_path / "logs" / "predictions").iterdir())) == 1
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "predict.py"),
            f"ckpt={tmp_path / 'nope.ckpt'}",
            "inputs=.",
            f"paths.log_dir={tmp_path / 'logs'}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1 and "does not exist" in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr


def test_the_runs_own_test_can_average_test_time_views_as_evaluate_does(tmp_path: Path) -> None:
    images = write_image_folder(tmp_path / "images", per_class=12, size=48)
    results = train_run([*FAST, "data=folder", f"data.root={images}", "tta=flips"], tmp_path / "run")
    assert results["tta"] == "flips"
    report = evaluate(
        command_config("evaluate", tmp_path / "eval", [f"ckpt={results['best_checkpoint']['path']}", "tta=flips"])
    )
    for name in ("acc", "f1", "auroc"):
        assert report["metrics"][name] == pytest.approx(results["test"][name], abs=1e-6)
    assert report["confusion_matrix"] == results["confusion_matrix"]
    with pytest.raises(TransferError, match="Unknown test-time augmentation 'mirror'"):
        train_run([*FAST, "data=folder", f"data.root={images}", "tta=mirror"], tmp_path / "bad")
