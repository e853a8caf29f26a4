"""Messy data, bad settings and interruptions: clear errors that name the file or key, nothing lost."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from tests.fixtures import (
    FAST,
    ROOT,
    compose_config,
    make_image,
    run_folders,
    train_config,
    train_run,
    write_image_folder,
)
from transfer.data.datamodule import ImageDataset
from transfer.data.scan import find_bad_images
from transfer.data.transforms import eval_transform
from transfer.errors import DataError, ImageReadError
from transfer.training.checkpoint_io import atomic_torch_save

INPUT = {"size": [32, 32], "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0, "interpolation": "bilinear"}


def png_bytes(seed: int = 0, size: int = 40) -> bytes:
    buffer = io.BytesIO()
    make_image(seed % 2, size, np.random.default_rng(seed)).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes(seed: int = 0, size: int = 40) -> bytes:
    buffer = io.BytesIO()
    make_image(seed % 2, size, np.random.default_rng(seed)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def add_bad_files(folder: Path) -> dict[str, Path]:
    bad = {
        "truncated": folder / "truncated.png",
        "empty": folder / "empty.jpg",
        "text": folder / "notes.jpg",
        "bomb": folder / "huge.png",
    }
    bad["truncated"].write_bytes(png_bytes()[:300])
    bad["empty"].write_bytes(b"")
    bad["text"].write_text("this is not a JPEG")
    Image.new("L", (3000, 3000)).save(bad["bomb"])  # a decompression bomb under the limit set below
    return bad


@pytest.fixture
def low_pixel_limit(monkeypatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)  # 9 MP > 2x limit: refused as a bomb


def test_scan_finds_every_kind_of_bad_file_and_passes_odd_good_ones(tmp_path: Path, low_pixel_limit) -> None:
    folder = write_image_folder(tmp_path / "images", per_class=3)
    bad = add_bad_files(folder / "cat")
    rgb = make_image(0, 40, np.random.default_rng(1))
    rgb.convert("CMYK").save(folder / "cat" / "cmyk.jpg")
    Image.fromarray((np.arange(1600).reshape(40, 40) * 40).astype(np.uint16)).save(folder / "cat" / "deep.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated 90 degrees
    rgb.save(folder / "cat" / "rotated.jpg", exif=exif)
    paths = sorted(str(p) for p in folder.rglob("*.*"))
    found = dict(find_bad_images(paths))
    assert sorted(found) == sorted(str(p) for p in bad.values())
    assert "DecompressionBomb" in found[str(bad["bomb"])]


def test_training_stops_on_bad_files_with_a_list_or_skips_them(tmp_path: Path, low_pixel_limit) -> None:
    folder = write_image_folder(tmp_path / "images", per_class=12)
    bad = add_bad_files(folder / "dog")
    overrides = [*FAST, "data=folder", f"data.root={folder}"]
    with pytest.raises(DataError, match="4 of 28 images") as raised:
        train_run(overrides, tmp_path / "stopped")
    assert all(str(path) in str(raised.value) for path in bad.values())
    assert "runtime.bad_images=skip" in str(raised.value)
    assert (tmp_path / "stopped" / "bad_images.csv").read_text().count("\n") == 5

    results = train_run([*overrides, "runtime.bad_images=skip"], tmp_path / "skipped")
    assert sorted(results["skipped_images"]) == sorted(str(p) for p in bad.values())
    assert sum(sum(split.values()) for split in results["split_counts"].values()) == 24


def test_a_worker_that_meets_a_corrupt_file_names_it(tmp_path: Path) -> None:
    good, broken = tmp_path / "good.png", tmp_path / "broken.png"
    good.write_bytes(png_bytes())
    broken.write_bytes(png_bytes()[:200])
    dataset = ImageDataset([str(good), str(broken)], np.array([0, 1]), eval_transform(INPUT))
    with pytest.raises(Exception, match="broken.png"):
        list(DataLoader(dataset, batch_size=1, num_workers=1))


@pytest.mark.parametrize("kind", ["png", "jpeg"])
def test_fuzz_corrupted_bytes_give_an_image_or_an_error_naming_the_file(tmp_path: Path, kind: str) -> None:
    """Random truncations, byte flips and inserted junk: never another exception, never a wrong shape."""
    rng = np.random.default_rng(7)
    original = png_bytes(3) if kind == "png" else jpeg_bytes(3)
    transform = eval_transform(INPUT)
    outcomes = {"decoded": 0, "refused": 0}
    for case in range(60):
        data = bytearray(original)
        mutation = case % 3
        if mutation == 0:
            data = data[: int(rng.integers(0, len(data)))]
        elif mutation == 1:
            for position in rng.integers(0, len(data), size=int(rng.integers(1, 20))):
                data[position] = int(rng.integers(0, 256))
        else:
            position = int(rng.integers(0, len(data)))
            data[position:position] = rng.integers(0, 256, size=int(rng.integers(1, 64))).astype(np.uint8).tobytes()
        path = tmp_path / f"case{case:03d}.{kind}"
        path.write_bytes(bytes(data))
        dataset = ImageDataset([str(path)], np.array([0]), transform)
        try:
            image, _ = dataset[0]
        except ImageReadError as error:
            assert path.name in str(error)
            outcomes["refused"] += 1
            continue
        assert image.shape == (3, 32, 32) and torch.isfinite(image).all()
        outcomes["decoded"] += 1
    assert outcomes["refused"] > 0  # the corruption really reached the decoder


def test_imbalance_warns_and_balanced_weights_enter_the_loss(tmp_path: Path, caplog) -> None:
    folder = tmp_path / "images"
    write_image_folder(folder, per_class=30, classes=("ok",))
    write_image_folder(folder, per_class=6, classes=("scratch",), seed=1)
    overrides = [*FAST, "data=folder", f"data.root={folder}"]
    with caplog.at_level(logging.WARNING, logger="transfer"):
        results = train_run(overrides, tmp_path / "plain")
    assert results["class_weights"] is None
    assert any(
        "imbalanced" in record.getMessage() and "task.class_weights=balanced" in record.getMessage()
        for record in caplog.records
    )
    weighted = train_run([*overrides, "task.class_weights=balanced"], tmp_path / "weighted")
    train_counts = weighted["split_counts"]["train"]
    total = sum(train_counts.values())
    assert weighted["class_weights"] == pytest.approx([total / (2 * train_counts[c]) for c in ("ok", "scratch")])


def test_a_class_missing_from_the_training_split_is_refused(tmp_path: Path) -> None:
    folder = write_image_folder(tmp_path / "images", per_class=6)
    rows = ["path,label,split"] + [
        f"{p.relative_to(folder)},{p.parent.name},{'test' if p.parent.name == 'dog' else 'train'}"
        for p in sorted(folder.rglob("*.png"))
    ]
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    cfg = compose_config(
        [*FAST, "data=csv", f"data.csv={folder / 'labels.csv'}", "+data.source.split_column=split"], tmp_path / "run"
    )
    with pytest.raises(DataError, match=r"no images of class\(es\) \['dog'\]"):
        train_config(cfg)


def test_checkpoint_writes_are_atomic(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"epoch": 1}, path)

    def dies_halfway(payload, stream) -> None:
        stream.write(b"partial")
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of a save

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"epoch": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


class SlowEpochs(__import__("lightning").Callback):
    """Makes epochs long enough to kill the process between two of them."""

    def on_train_batch_end(self, *args) -> None:
        time.sleep(0.2)


@pytest.mark.slow
def test_a_killed_run_resumes_from_its_last_checkpoint_in_a_new_directory(tmp_path: Path) -> None:
    images = write_image_folder(tmp_path / "images", per_class=16)
    args = [
        sys.executable,
        str(ROOT / "train.py"),
        *FAST,
        "data=folder",
        f"data.root={images}",
        "schedule.stages.1.epochs=4",
        f"paths.log_dir={tmp_path / 'logs'}",
    ]
    process = subprocess.Popen(
        [*args, "+callbacks.slow._target_=tests.test_bad_input.SlowEpochs"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    last = None
    while time.time() < deadline and process.poll() is None:
        runs = tmp_path / "logs" / "runs"
        found = [r / "checkpoints" / "last.ckpt" for r in (run_folders(runs) if runs.is_dir() else [])]
        found = [f for f in found if f.is_file()]
        if found and torch.load(found[0], weights_only=True)["transfer"]["stage_index"] == 1:
            last = found[0]
            break
        time.sleep(0.2)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert last is not None, "the run finished or never reached stage 2"
    killed_dir = last.parent.parent
    assert not (killed_dir / "results.json").exists()

    done = subprocess.run([*args, f"resume={last}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = run_folders(tmp_path / "logs" / "runs")
    assert len(runs) == 2 and killed_dir in runs  # the killed run's directory is kept as it was
    (resumed_dir,) = [r for r in runs if r != killed_dir]
    results = json.loads((resumed_dir / "results.json").read_text())
    assert [s["name"] for s in results["stages"]] == ["finetune"] and results["resumed_from"] == str(last)


def test_class_weights_weight_the_training_loss() -> None:
    import functools

    import timm

    from transfer.model.module import ClassifierModule
    from transfer.model.stage import Stage

    model = timm.create_model("test_resnet", num_classes=2)
    module = ClassifierModule(
        model,
        ["ok", "scratch"],
        functools.partial(torch.optim.AdamW),
        backbone_name="test_resnet",
        input_config={},
        class_weights=[0.6, 3.0],
    )
    module.set_stage(Stage("head", 1), 0)
    module.eval()
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 0, 0, 1])
    loss, _, _ = module._step((images, labels))
    logits = model(images)
    expected = torch.nn.functional.cross_entropy(logits, labels, weight=torch.tensor([0.6, 3.0]))
    torch.testing.assert_close(loss, expected)
    assert not torch.allclose(loss, torch.nn.functional.cross_entropy(logits, labels))


def test_empty_class_folder_single_class_and_missing_csv_files_are_named(tmp_path: Path) -> None:
    from transfer.data.sources import csv_manifest, image_folder

    folder = write_image_folder(tmp_path / "images", per_class=2)
    (folder / "bird").mkdir()
    with pytest.raises(DataError, match="bird"):
        image_folder(folder)
    single = write_image_folder(tmp_path / "single", per_class=2, classes=("cat",))
    with pytest.raises(DataError, match="at least two"):
        image_folder(single)
    (tmp_path / "labels.csv").write_text("path,label\nimages/cat/cat_000.png,cat\nimages/dog/gone.png,dog\n")
    with pytest.raises(DataError, match="gone.png"):
        csv_manifest(tmp_path / "labels.csv")


def test_unknown_config_key_is_one_paragraph_naming_it(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "learning_rate=0.1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 1 and "learning_rate" in output and "Traceback" not in output
