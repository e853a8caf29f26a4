"""Recipe ingredients: mixup (timm's Mixup) on training batches, input size from the images."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import Mixup

from tests.fixtures import FAST, train_run, write_image_folder
from transfer.data.resolution import size_for_images
from transfer.model.module import ClassifierModule
from transfer.model.stage import Stage


def tiny_module(mixup: Mixup | None) -> ClassifierModule:
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=3)
    module = ClassifierModule(
        model, ["a", "b", "c"], torch.optim.AdamW, backbone_name="test_resnet", input_config={}, mixup=mixup
    )
    module.set_stage(Stage("finetune", 1, unfreeze=1), 1)
    return module.train()


@pytest.mark.parametrize("batch", [6, 5])
def test_mixup_that_never_mixes_gives_the_plain_loss_odd_batches_included(batch: int) -> None:
    # prob=0: timm's Mixup leaves the images and gives one-hot targets, so the soft-target loss must
    # equal plain cross-entropy, image by image, the odd last image included.
    torch.manual_seed(0)
    module = tiny_module(Mixup(mixup_alpha=0.2, prob=0.0, label_smoothing=0.0, num_classes=3))
    images, labels = torch.randn(batch, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2][:batch])
    mixed_loss, _, _ = module._mixed_step((images, labels))
    plain_loss, _, _ = module._step((images, labels))
    assert mixed_loss.item() == pytest.approx(plain_loss.item(), rel=1e-5)


def test_mixup_blends_images_and_labels() -> None:
    torch.manual_seed(0)
    module = tiny_module(Mixup(mixup_alpha=0.2, prob=1.0, label_smoothing=0.0, num_classes=3))
    seen = {}
    original_forward = module.forward

    def recording_forward(inputs):
        seen["inputs"] = inputs.clone()
        return original_forward(inputs)

    module.forward = recording_forward
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    loss, _, _ = module._mixed_step((images.clone(), labels))
    assert not torch.allclose(seen["inputs"], images)  # the model saw blended images
    assert torch.isfinite(loss)
    plain = F.cross_entropy(original_forward(seen["inputs"]), labels)
    assert loss.item() != pytest.approx(plain.item())  # ... against blended targets


def test_a_run_with_mixup_trains_and_tests(image_folder: Path, tmp_path: Path) -> None:
    results = train_run([*FAST, "data=folder", f"data.root={image_folder}", "mixup=light"], tmp_path / "run")
    assert len(results["stages"]) == 2 and results["test"]["acc"] > 0.5  # stripes are easy, mixed or not
    assert (tmp_path / "run" / "config.yaml").read_text().count("timm.data.Mixup") == 1


def write_images(root: Path, sides: list[int]) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, side in enumerate(sides):
        path = root / f"{index}.png"
        Image.new("RGB", (side + 20, side), (index, 0, 0)).save(path)  # landscape: the short side counts
        paths.append(str(path))
    return paths


@pytest.mark.parametrize(
    "sides, crop_pct, expected",
    [
        ([300] * 5, 1.0, 296),  # ELPV-like cells: their own size (rounded down to a multiple of 8)
        ([300] * 5, 0.875, 256),  # evaluation resizes to size / crop_pct first
        ([100, 120, 4000], 1.0, 224),  # smaller than the backbone's default: the default
        ([2000, 3000, 4000], 1.0, 336),  # large photos: at most 1.5x the default
    ],
)
def test_auto_input_size_follows_the_images_within_bounds(tmp_path: Path, sides, crop_pct, expected) -> None:
    model = timm.create_model("test_resnet", pretrained=False)
    paths = write_images(tmp_path, sides)
    assert size_for_images(model, paths, [224, 224], crop_pct) == [expected, expected]


def test_auto_input_size_keeps_the_size_of_models_built_for_one(tmp_path: Path) -> None:
    model = timm.create_model("test_vit", pretrained=False)
    assert model.pretrained_cfg.get("fixed_input_size")
    assert size_for_images(model, write_images(tmp_path, [300] * 3), [224, 224], 1.0) == [224, 224]


def test_a_run_with_auto_input_size_trains_at_the_images_size(image_folder: Path, tmp_path: Path) -> None:
    # test_resnet's default is 160 px at crop_pct 0.95. The folder's 40 px images keep 160 ...
    overrides = [*FAST, "data=folder", "input.size=auto", "augment=none"]
    results = train_run([*overrides, f"data.root={image_folder}"], tmp_path / "a")
    assert results["input"]["size"] == [160, 160]
    # ... 200 px images train at 200 * 0.95 = 190, rounded down to 184.
    large = write_image_folder(tmp_path / "large", per_class=6, size=200)
    results = train_run([*overrides, f"data.root={large}"], tmp_path / "b")
    assert results["input"]["size"] == [184, 184]
