"""The speed paths compute what the plain paths compute: head-only under inference mode, the
feature cache, torch.compile. (How fast they are is benchmarks/speed.py's job, not a test's.)"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import timm
import torch
from timm.data import resolve_model_data_config

from tests.fixtures import FAST, compose_config, train_config
from transfer.errors import TransferError
from transfer.model.features import check_split_matches, classify_features, pooled_features
from transfer.model.module import ClassifierModule, compile_in_place
from transfer.model.stage import Stage

ONE_STAGE = [o for o in FAST if "stages.1" not in o]


def tiny_model(name: str, **kwargs) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=3, **kwargs)
    size = resolve_model_data_config(model)["input_size"][1:]
    return model, torch.randn(4, 3, *size)


@pytest.mark.parametrize("name", ["test_resnet", "test_efficientnet", "test_vit"])
def test_classifier_on_pooled_features_is_the_model(name: str) -> None:
    model, images = tiny_model(name, drop_rate=0.3)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(classify_features(model, pooled_features(model, images)), model(images))
    check_split_matches(model, images)


def test_models_whose_forward_is_not_the_split_are_refused() -> None:
    model, images = tiny_model("test_resnet")
    model.eval()
    plain_forward = model.forward
    model.forward = lambda x: plain_forward(x) * 2.0  # e.g. a model that rescales its logits
    with pytest.raises(TransferError, match="feature_cache does not support"):
        check_split_matches(model, images)


def make_module(name: str = "test_efficientnet") -> ClassifierModule:
    model, _ = tiny_model(name)
    return ClassifierModule(
        model, ["a", "b", "c"], functools.partial(torch.optim.AdamW), backbone_name=name, input_config={}
    )


def test_head_only_training_forward_matches_the_plain_forward_and_gradients() -> None:
    module = make_module()
    module.set_stage(Stage("head", 1, unfreeze=0), 0)
    module.train()
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    fast = torch.nn.functional.cross_entropy(module(images), labels)
    fast.backward()
    fast_grads = {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}
    module.zero_grad()
    plain = torch.nn.functional.cross_entropy(module.model(images), labels)  # autograd decides alone
    plain.backward()
    plain_grads = {n: p.grad for n, p in module.model.named_parameters() if p.grad is not None}
    torch.testing.assert_close(fast, plain)
    assert set(fast_grads) == set(plain_grads) == {"classifier.weight", "classifier.bias"}
    for name in fast_grads:
        torch.testing.assert_close(fast_grads[name], plain_grads[name])


def run(tmp_path: Path, image_folder: Path, name: str, *overrides: str) -> tuple[dict, dict]:
    cfg = compose_config(
        [
            *ONE_STAGE,
            "data=folder",
            f"data.root={image_folder}",
            "schedule=head_only",
            "schedule.stages.0.epochs=2",
            *overrides,
        ],
        tmp_path / name,
    )
    results = train_config(cfg)
    weights = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    return results, weights


def test_feature_cache_trains_the_same_head_as_images(image_folder: Path, tmp_path: Path) -> None:
    images, image_weights = run(tmp_path, image_folder, "on_images", "augment=none")
    cached, cached_weights = run(tmp_path, image_folder, "on_features", "augment=none", "feature_cache=true")
    assert cached["stages"][0]["feature_cache"] and not images["stages"][0]["feature_cache"]
    assert image_weights.keys() == cached_weights.keys()  # the checkpoint still holds the whole model
    for key in image_weights:  # same batches, same features (up to batch-size-dependent rounding)
        torch.testing.assert_close(cached_weights[key], image_weights[key], atol=1e-5, rtol=1e-4)
    assert cached["test"]["loss"] == pytest.approx(images["test"]["loss"], abs=1e-4)


def test_backbone_features_are_computed_once_per_run(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The lr search on cached features and the head stage after it share one feature cache: a second
    pass would cost a backbone epoch, and its loader workers' seeds would shift the training's RNG."""
    import transfer.training.feature_cache as feature_cache

    splits: list[int] = []

    def counted(model, loader, *args, **kwargs):
        splits.append(len(loader.dataset))
        return extract(model, loader, *args, **kwargs)

    extract = feature_cache.extract_features
    monkeypatch.setattr(feature_cache, "extract_features", counted)
    results, _ = run(
        tmp_path,
        image_folder,
        "search",
        "augment=none",
        "feature_cache=true",
        "lr_find.enabled=true",
        "lr_find.num_training=12",
    )
    assert results["lr_find"]["on_features"] and results["stages"][0]["feature_cache"]
    assert len(splits) == 2  # train and val, once


def test_feature_cache_refuses_random_augmentation(image_folder: Path, tmp_path: Path) -> None:
    cfg = compose_config(
        [
            *ONE_STAGE,
            "data=folder",
            f"data.root={image_folder}",
            "schedule=head_only",
            "augment=light",
            "feature_cache=true",
        ],
        tmp_path / "run",
    )
    with pytest.raises(TransferError, match="augment=none"):
        train_config(cfg)


@pytest.mark.slow  # torch.compile's first compilation: in CI, not in the developer's loop
def test_compiled_model_keeps_its_parameter_names_and_outputs() -> None:
    model, images = tiny_model("test_resnet")
    model.eval()
    keys = list(model.state_dict())
    with torch.no_grad():
        expected = model(images)
        compile_in_place(model)
        compiled = model(images)
    assert list(model.state_dict()) == keys  # checkpoints load into an uncompiled model
    torch.testing.assert_close(compiled, expected, atol=1e-4, rtol=1e-4)
