"""Every option of every config group composes, resolves and instantiates; presets say only what
differs; old names keep working, with a message naming the new one."""

from __future__ import annotations

import logging
from pathlib import Path

import albumentations as A
import pytest
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tests.fixtures import CONF_DIR, compose_config, options
from transfer.model.stage import STAGE_KEYS, parse_stages

GROUPS = ["backbone", "data", "augment", "schedule", "optimizer", "trainer", "logger", "task"]
NEEDS = {
    ("data", "folder"): ["data.root=/tmp/x"],
    ("data", "tag_folders"): ["data.root=/tmp/x"],
    ("data", "csv"): ["data.csv=/tmp/x.csv"],
    ("backbone", "timm"): ["backbone.name=resnet18"],
}


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes_and_resolves(group: str, option: str, tmp_path: Path) -> None:
    cfg = compose_config(
        [f"{group}={option}", "input.size=[48, 64]", *NEEDS.get((group, option), [])], output_dir=tmp_path
    )
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(resolved, dict)
    assert resolved[group] is not None or group == "logger"


def test_default_config_is_the_embedded_offline_job() -> None:
    cfg = compose_config([])
    assert cfg.backbone.name == "tf_efficientnet_lite0" and cfg.backbone.weights == "auto"
    assert cfg.data.source._target_ == "transfer.data.sources.elpv"
    assert cfg.data.source.task == "defective"
    assert (cfg.data.split.test, cfg.data.split.val) == (0.25, 0.1)
    assert [s.unfreeze for s in parse_stages(cfg.schedule.stages)][0] == 0
    assert (cfg.monitor.metric, cfg.monitor.mode) == ("val/acc", "max")  # the task's own


@pytest.mark.parametrize("option", options("augment"))
def test_augment_pipelines_build_with_albumentations(option: str) -> None:
    cfg = compose_config([f"augment={option}", "input.size=[48, 64]"])
    assert cfg.augment.name == option
    if cfg.augment.train is None:
        return
    transforms = instantiate(cfg.augment.train)
    assert transforms and all(isinstance(t, A.BasicTransform) for t in transforms)


@pytest.mark.parametrize("option", options("schedule"))
def test_schedules_parse_and_name_every_stage_key(option: str) -> None:
    cfg = compose_config([f"schedule={option}"])
    assert [list(stage) for stage in cfg.schedule.stages] == [list(STAGE_KEYS)] * len(cfg.schedule.stages)
    stages = parse_stages(cfg.schedule.stages)
    assert stages[0].epochs >= 1
    if len(stages) > 1:  # later stages train more of the model at a lower learning rate
        assert all(later.lr < earlier.lr for earlier, later in zip(stages, stages[1:], strict=False))
    # every key of a stage is there to override, without a "+"
    assert compose_config([f"schedule={option}", "schedule.stages.0.patience=2"]).schedule.stages[0].patience == 2


def test_presets_state_only_what_differs_from_the_defaults() -> None:
    base = yaml.safe_load((Path(CONF_DIR) / "data" / "base.yaml").read_text())
    for path in (Path(CONF_DIR) / "data").glob("*.yaml"):
        own = yaml.safe_load(path.read_text())
        restated = {k for k, v in own.items() if path.stem != "base" and k in base and base[k] == v}
        assert not restated, (path.name, restated)
    for path in (Path(CONF_DIR) / "schedule").glob("*.yaml"):
        assert "min_steps" not in yaml.safe_load(path.read_text()), path.name  # one place: train.yaml
    for path in (Path(CONF_DIR) / "task").glob("*.yaml"):
        assert "@package _global_" not in path.read_text(), path.name


def test_unknown_group_option_is_rejected() -> None:
    with pytest.raises(Exception, match="backbone"):
        compose_config(["backbone=not_a_backbone"])


def test_callbacks_are_chosen_by_name() -> None:
    from lightning.pytorch.callbacks import EMAWeightAveraging

    from transfer.training.fit import instantiate_named

    assert instantiate_named(compose_config([]), "callbacks") == []
    assert [type(c) for c in instantiate_named(compose_config(["callbacks=ema"]), "callbacks")] == [EMAWeightAveraging]


OLD_NAMES = [
    ("test_tta=flips", "tta", "flips"),
    ("ckpt_path=/runs/a/checkpoints/last.ckpt", "resume", "/runs/a/checkpoints/last.ckpt"),
    ("cv.resume=/runs/cv", "resume", "/runs/cv"),
    ("label_smoothing=0.1", "task.label_smoothing", 0.1),
    ("class_weights=balanced", "task.class_weights", "balanced"),
    ("backbone.pretrained=false", "backbone.weights", "none"),
    ("data.test_fraction=0.3", "data.split.test", 0.3),
    ("data.val_fraction=0.2", "data.split.val", 0.2),
    ("+schedule.stages.1.patience=4", "schedule.stages.1.patience", 4),
]


@pytest.mark.parametrize("override, new, value", OLD_NAMES)
def test_old_names_keep_working_with_a_deprecation_message(override: str, new: str, value: object, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="transfer"):
        cfg = compose_config([override])
    assert OmegaConf.select(cfg, new) == value
    old = override.lstrip("+").split("=")[0]
    if not old.startswith("schedule."):
        assert OmegaConf.select(cfg, old) is None
        assert any(new.split(".")[-1] in r.getMessage() and "Deprecated" in r.getMessage() for r in caplog.records)


def test_early_stopping_by_callback_becomes_each_stages_patience() -> None:
    cfg = compose_config(["callbacks=early_stopping", "schedule.stages.1.patience=5"])
    assert "early_stopping" not in cfg.callbacks
    assert [stage.patience for stage in cfg.schedule.stages] == [3, 5]  # a stage's own patience wins


def test_a_loss_option_for_a_task_without_it_is_refused() -> None:
    from transfer.errors import TransferError

    with pytest.raises(TransferError, match="task=classification and task=ordinal"):
        compose_config(["task=regression", "label_smoothing=0.1"])


@pytest.mark.parametrize("command", ["train", "evaluate", "predict", "explain", "export", "serve"])
def test_help_has_a_line_for_every_top_level_option_and_group(command: str) -> None:
    """``--help`` (the command's ``hydra.help.template``) names each option and group with words."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from transfer.config.compose import CONFIG_MODULE

    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = hydra_compose(command, return_hydra_config=True)
    template = cfg.hydra.help.template
    described = {line.split()[0] for line in template.splitlines() if line.startswith("  ") and len(line.split()) > 1}
    groups = {g.split("/")[0] for g in cfg.hydra.runtime.choices if not g.startswith("hydra")}
    keys = {k for k in cfg if k != "hydra"}
    assert keys | groups <= described | {"hydra"}, sorted((keys | groups) - described)
