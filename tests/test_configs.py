"""Every option of every config group composes, resolves and instantiates."""

from __future__ import annotations

from pathlib import Path

import albumentations as A
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tests.conftest import CONF_DIR, compose_config
from transfer.schedule import parse_stages

GROUPS = ["backbone", "data", "augment", "schedule", "optimizer", "trainer", "logger"]
NEEDS = {("data", "folder"): ["data.root=/tmp/x"], ("data", "tag_folders"): ["data.root=/tmp/x"], ("data", "csv"): ["data.csv=/tmp/x.csv"],
         ("backbone", "timm"): ["backbone.name=resnet18"]}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml")
                  if not (group == "trainer" and p.stem == "default"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes_and_resolves(group: str, option: str, tmp_path: Path) -> None:
    cfg = compose_config([f"{group}={option}", "input.size=[48, 64]", *NEEDS.get((group, option), [])],
                         output_dir=tmp_path)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved[group] is not None or group == "logger"


def test_default_config_is_the_embedded_offline_job() -> None:
    cfg = compose_config([])
    assert cfg.backbone.name == "tf_efficientnet_lite0" and cfg.backbone.weights == "auto"
    assert cfg.data.source._target_ == "transfer.data.sources.elpv"
    assert cfg.data.source.task == "defective"
    assert cfg.data.test_fraction == 0.25
    assert [s.unfreeze for s in parse_stages(cfg.schedule.stages)][0] == 0


@pytest.mark.parametrize("option", options("augment"))
def test_augment_pipelines_build_with_albumentations(option: str) -> None:
    cfg = compose_config([f"augment={option}", "input.size=[48, 64]"])
    if cfg.augment.train is None:
        return
    transforms = instantiate(cfg.augment.train)
    assert transforms and all(isinstance(t, A.BasicTransform) for t in transforms)


@pytest.mark.parametrize("option", options("schedule"))
def test_schedules_parse(option: str) -> None:
    stages = parse_stages(compose_config([f"schedule={option}"]).schedule.stages)
    assert stages[0].epochs >= 1
    if len(stages) > 1:  # later stages train more of the model at a lower learning rate
        assert all(later.lr < earlier.lr for earlier, later in zip(stages, stages[1:]))


def test_unknown_group_option_is_rejected() -> None:
    with pytest.raises(Exception, match="backbone"):
        compose_config(["backbone=not_a_backbone"])


def test_callbacks_are_chosen_by_name_and_combine() -> None:
    from lightning.pytorch.callbacks import EarlyStopping, EMAWeightAveraging

    from tests.conftest import compose_config
    from transfer.run import instantiate_named

    assert instantiate_named(compose_config([]), "callbacks") == []
    chosen = instantiate_named(compose_config(["callbacks=[ema,early_stopping]", "monitor.metric=val/loss",
                                               "monitor.mode=min"]), "callbacks")
    assert [type(c) for c in chosen] == [EMAWeightAveraging, EarlyStopping]
    assert chosen[1].monitor == "val/loss" and chosen[1].mode == "min"  # follows the run's monitor
