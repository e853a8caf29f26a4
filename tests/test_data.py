"""Sources, splits, image decoding, transforms and the cached download."""

from __future__ import annotations

import csv
import hashlib
import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from tests.fixtures import write_image_folder
from transfer.data.datamodule import ImageDataModule
from transfer.data.download import fetch_archive
from transfer.data.images import load_rgb
from transfer.data.sources import csv_manifest, elpv, hotdog, image_folder
from transfer.data.sources import image_folder as image_folder_source
from transfer.data.splits import split_indices
from transfer.data.table import subsample
from transfer.data.transforms import eval_transform, resolve_input, train_transform
from transfer.errors import DataError, ImageReadError


def test_stratified_splits_are_disjoint_complete_and_seeded() -> None:
    labels = np.array([0] * 700 + [1] * 250 + [2] * 50)
    splits = split_indices(labels, test=0.25, val=0.1, seed=1)
    joined = np.concatenate(list(splits.values()))
    assert len(joined) == len(labels) == len(set(joined.tolist()))
    # test: a quarter of all the images; val: a tenth of the three quarters the test split left
    for name, fraction in (("test", 0.25), ("val", 0.075)):
        for label, count in ((0, 700), (1, 250), (2, 50)):
            got = (labels[splits[name]] == label).sum()
            assert abs(got - fraction * count) <= 1.5, (name, label, got)
    again = split_indices(labels, 0.25, 0.1, seed=1)
    other = split_indices(labels, 0.25, 0.1, seed=2)
    assert all(np.array_equal(splits[k], again[k]) for k in splits)
    assert not np.array_equal(splits["test"], other["test"])


def test_predefined_splits_are_kept_and_val_is_carved_from_train() -> None:
    labels = np.array([0, 1] * 50)
    predefined = np.array(["train"] * 80 + ["test"] * 20, dtype=object)
    splits = split_indices(labels, test=0.25, val=0.2, seed=0, predefined=predefined)
    assert set(splits["test"].tolist()) == set(range(80, 100))
    # the data's own test split is kept; val is a fifth of its 80 training images
    assert len(splits["val"]) == 16 and set(splits["val"]) <= set(range(80))


def test_image_folder_plain_and_with_split_folders(tmp_path: Path) -> None:
    plain = image_folder(write_image_folder(tmp_path / "plain", per_class=5, classes=("b", "a")))
    assert plain.class_names == ["a", "b"] and len(plain.paths) == 10 and plain.splits is None
    root = tmp_path / "split"
    write_image_folder(root / "train", per_class=6)
    write_image_folder(root / "test", per_class=2)
    table = image_folder(root)
    assert sorted(set(table.splits)) == ["test", "train"] and len(table.paths) == 16


def test_csv_manifest_resolves_relative_paths(tmp_path: Path) -> None:
    folder = write_image_folder(tmp_path / "imgs", per_class=3)
    manifest = tmp_path / "imgs" / "labels.csv"
    with open(manifest, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["path", "label"])
        for path in sorted(folder.rglob("*.png")):
            writer.writerow([path.relative_to(folder).as_posix(), path.parent.name])
    table = csv_manifest(manifest)
    assert table.class_names == ["cat", "dog"] and len(table.paths) == 6
    assert all(Path(p).is_file() for p in table.paths)


def test_elpv_tasks_match_the_published_label_counts() -> None:
    binary = elpv("defective")
    assert len(binary.paths) == 2624
    assert binary.counts() == {"functional": 1508 + 295, "defective": 106 + 715}
    assert elpv("severity").counts() == {"p0": 1508, "p1_3": 295, "p2_3": 106, "p1": 715}
    assert sum(elpv("cell_type").counts().values()) == 2624
    image = load_rgb(binary.paths[0])
    assert image.shape == (300, 300, 3) and image.dtype == np.uint8


def test_subsample_is_stratified() -> None:
    table = subsample(elpv("defective"), 400, seed=0)
    counts = table.counts()
    assert abs(sum(counts.values()) - 400) <= 2
    assert abs(counts["defective"] / 400 - 821 / 2624) < 0.02


@pytest.mark.parametrize("mode", ["L", "LA", "P", "RGBA", "CMYK", "I;16", "RGB"])
def test_every_image_mode_becomes_8bit_rgb(tmp_path: Path, mode: str) -> None:
    array = (np.arange(24 * 16).reshape(16, 24) % 256).astype(np.uint8)
    image = Image.fromarray(array).convert(mode) if mode != "I;16" else Image.fromarray(array.astype("<u2") * 256)
    path = tmp_path / f"img.{'tif' if mode in ('CMYK', 'I;16') else 'png'}"
    image.save(path)
    rgb = load_rgb(path)
    assert rgb.shape == (16, 24, 3) and rgb.dtype == np.uint8
    if mode == "I;16":
        assert rgb.max() == 255 and rgb.min() == 0  # rescaled, not clipped to white


def test_exif_rotation_is_applied(tmp_path: Path) -> None:
    image = Image.new("RGB", (40, 20))
    exif = image.getexif()
    exif[0x0112] = 6  # rotated 90 degrees
    image.save(tmp_path / "photo.jpg", exif=exif)
    assert load_rgb(tmp_path / "photo.jpg").shape == (40, 20, 3)


def test_corrupt_image_error_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff not really a jpeg")
    with pytest.raises(ImageReadError, match="broken.jpg"):
        load_rgb(bad)


def test_transforms_use_the_backbone_pretrained_config() -> None:
    model = timm.create_model("tf_efficientnet_lite0")
    config = resolve_input(model)
    assert config["mean"] == [0.5, 0.5, 0.5] and config["std"] == [0.5, 0.5, 0.5]
    assert config["size"] == [224, 224] and config["interpolation"] == "bicubic"
    resnet = resolve_input(timm.create_model("resnet18"), {"size": 96})
    assert resnet["size"] == [96, 96] and resnet["mean"][0] == pytest.approx(0.485)
    image = np.full((300, 200, 3), 255, dtype=np.uint8)
    tensor = eval_transform(config)(image=image)["image"]
    assert tensor.shape == (3, 224, 224) and torch.allclose(tensor, torch.ones_like(tensor))
    assert train_transform(None, config)(image=image)["image"].shape == (3, 224, 224)


def test_datamodule_rejects_augmentations_of_the_wrong_size(image_folder: Path) -> None:
    import albumentations as A

    config = {"size": [32, 32], "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0, "interpolation": "bilinear"}
    table = image_folder_source(image_folder)
    splits = split_indices(table.labels, 0.2, 0.1, seed=0)
    module = ImageDataModule(
        table,
        splits,
        train_transform([A.HorizontalFlip()], config),
        eval_transform(config),
        input_size=(32, 32),
        num_workers=0,
    )
    with pytest.raises(DataError, match="End the augmentation list"):
        module.check_transforms()


def make_zip(root: Path) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        for path in sorted(root.rglob("*.png")):
            bundle.write(path, Path("hotdog") / path.relative_to(root))
    return buffer.getvalue()


def test_hotdog_download_verifies_caches_and_extracts(loopback_server, tmp_path: Path) -> None:
    url, served = loopback_server
    source = tmp_path / "src"
    write_image_folder(source / "train", per_class=3, classes=("hotdog", "not-hotdog"))
    write_image_folder(source / "test", per_class=2, classes=("hotdog", "not-hotdog"))
    payload = make_zip(source)
    (served / "hotdog.zip").write_bytes(payload)
    checksum = "sha1:" + hashlib.sha1(payload).hexdigest()
    table = hotdog(f"{url}/hotdog.zip", checksum, tmp_path / "cache")
    assert table.class_names == ["hotdog", "not-hotdog"] and len(table.paths) == 10
    (served / "hotdog.zip").unlink()  # the cached, verified copy is used from now on
    assert len(hotdog(f"{url}/hotdog.zip", checksum, tmp_path / "cache").paths) == 10


def test_download_rejects_a_bad_checksum_and_keeps_nothing(loopback_server, tmp_path: Path) -> None:
    url, served = loopback_server
    (served / "data.zip").write_bytes(b"some bytes")
    with pytest.raises(DataError, match="checksum"):
        fetch_archive(f"{url}/data.zip", "sha1:" + "0" * 40, tmp_path / "cache", "data")
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


def test_download_offline_explains_the_way_out(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="data=folder"):
        fetch_archive("http://127.0.0.1:9/hotdog.zip", None, tmp_path, "hotdog", timeout=5)


def test_balanced_sampler_draws_every_class_equally_and_splits_one_draw_across_processes() -> None:
    from transfer.data.samplers import balanced_sampler

    labels = np.array([0] * 90 + [1] * 10)
    single = balanced_sampler(labels, replicas=1, rank=0, seed=3)
    draws = []
    for epoch in range(20):
        single.set_epoch(epoch)
        draws.append(np.array(list(single)))
    drawn = labels[np.concatenate(draws)]
    assert len(draws[0]) == 100 and abs(drawn.mean() - 0.5) < 0.05  # the rare class half the time
    assert not np.array_equal(draws[0], draws[1])  # a new draw every epoch
    single.set_epoch(0)
    assert np.array_equal(np.array(list(single)), draws[0])  # the same draw for the same (seed, epoch)
    parts = [balanced_sampler(labels, replicas=3, rank=rank, seed=3) for rank in range(3)]
    shares = [list(part) for part in parts]
    assert [len(share) for share in shares] == [34, 34, 34]  # 100 padded to 102
    interleaved = [shares[i % 3][i // 3] for i in range(100)]
    assert interleaved == draws[0].tolist()  # together exactly the single process's draw
