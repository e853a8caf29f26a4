"""The README's "add a backbone, a dataset, an augmentation" recipe, run as written: a user's own
config folder (``--config-dir``) and a dataset function in the user's own module."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from tests.fixtures import ROOT, run_folders, train_run, write_image_folder

USER_FILES = {
    "my_sources.py": '''
from pathlib import Path

from transfer.data.sources import ImageTable


def parts(root: str) -> ImageTable:
    """One flat folder of <label>_<id>.png files."""
    files = sorted(Path(root).expanduser().rglob("*.png"))
    labels = [f.name.split("_")[0] for f in files]
    names = sorted(set(labels))
    return ImageTable([str(f) for f in files], [names.index(label) for label in labels], names, name="parts")
''',
    "my_conf/backbone/tiny.yaml": """
defaults:
  - timm            # the packaged backbone/timm.yaml: create_backbone, weights=auto
name: test_efficientnet
weights: none
""",
    "my_conf/data/parts.yaml": """
defaults:
  - folder          # splits, batch sizes and workers from the packaged data/folder.yaml (and base.yaml)
source:
  _target_: my_sources.parts
  root: ${data.root}
""",
    "my_conf/local/default.yaml": """
# @package _global_
seed: 7                 # picked up without being named: train.yaml's `optional local: default`
""",
    "my_conf/augment/rotate.yaml": """
train:
  - _target_: albumentations.Resize
    height: ${input.size.0}
    width: ${input.size.1}
  - _target_: albumentations.Rotate
    limit: 20
    p: 1.0
""",
}


@pytest.mark.slow  # a subprocess training
def test_a_users_backbone_dataset_and_augmentation_from_their_own_config_folder(tmp_path: Path) -> None:
    images = write_image_folder(tmp_path / "images", per_class=10)
    for name, text in USER_FILES.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text.lstrip())
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "--config-dir",
            "my_conf",
            "backbone=tiny",
            "data=parts",
            f"data.root={images}",
            "augment=rotate",
            "input.size=32",
            "data.num_workers=0",
            "data.batch_size=8",
            "schedule=head_only",
            "schedule.stages.0.epochs=1",
            "schedule.min_steps=0",
            "trainer.enable_progress_bar=false",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (run_dir,) = run_folders(tmp_path / "outputs" / "runs")
    results = json.loads((run_dir / "results.json").read_text())
    assert results["backbone"] == "test_efficientnet" and results["dataset"] == "parts"
    assert results["class_names"] == ["cat", "dog"] and sum(results["split_counts"]["train"].values()) > 0
    config = OmegaConf.load(run_dir / "config.yaml")
    assert [t["_target_"] for t in config.augment.train] == ["albumentations.Resize", "albumentations.Rotate"]
    assert config.data.split.test == 0.2  # inherited from data/base.yaml through data/folder.yaml
    assert config.seed == 7


MY_MODEL = '''
import torch.nn as nn


class TinyCNN(nn.Module):
    """Not a timm model: no group_matcher, no forward_features; its own head."""

    def __init__(self, num_classes):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.stage1 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.stage2(self.stage1(self.stem(x)))).flatten(1))


def build(num_classes, **ignored):
    return TinyCNN(num_classes)


def split(model):
    """fastai's splitter: groups input side first, the head last."""
    return [model.stem, model.stage1, model.stage2, model.classifier]
'''


def test_a_splitter_gives_a_custom_module_the_freezing_schedule(tmp_path: Path, monkeypatch) -> None:
    from tests.fixtures import FAST, write_image_folder

    (tmp_path / "my_model.py").write_text(MY_MODEL)
    monkeypatch.syspath_prepend(str(tmp_path))
    images = write_image_folder(tmp_path / "images", per_class=12)
    results = train_run(
        [
            *FAST,
            "backbone._target_=my_model.build",
            "backbone.name=tiny_cnn",
            "backbone.splitter={_target_: my_model.split, _partial_: true}",
            "augment=none",
            "data=folder",
            f"data.root={images}",
        ],
        tmp_path / "run",
    )
    head, finetune = results["stages"]
    assert head["trainable_groups"] == ["head: classifier"] and head["trainable_params"] == 32 * 2 + 2
    assert finetune["trainable_groups"] == ["head: classifier", "stage2"]
    assert finetune["trainable_params"] == 32 * 2 + 2 + (16 * 9 * 32 + 32) + 2 * 32


MY_TASK = '''
import torch
import torch.nn.functional as F

from transfer.tasks import IGNORE
from transfer.tasks import Classification


class Focal(Classification):
    """Classification with the focal loss (Lin et al. 2017): a task defined outside the package."""

    name = "focal"

    def __init__(self, gamma=2.0):
        self.gamma = gamma

    def loss(self, outputs, labels, class_weights, label_smoothing, reduction="mean"):
        real = labels != IGNORE
        log_p = F.log_softmax(outputs[real].float(), dim=-1).gather(1, labels[real][:, None])[:, 0]
        per_image = -(1 - log_p.exp()) ** self.gamma * log_p
        return per_image.sum() if reduction == "sum" else per_image.mean()

    def state(self):
        return {"name": self.name, "gamma": self.gamma}
'''


@pytest.mark.slow  # a subprocess training
def test_a_users_task_is_one_module_and_one_config_and_its_checkpoints_load(tmp_path: Path, monkeypatch) -> None:
    from tests.fixtures import command_config
    from transfer.inference.evaluate import evaluate

    images = write_image_folder(tmp_path / "images", per_class=10)
    (tmp_path / "my_tasks.py").write_text(MY_TASK.lstrip())
    (tmp_path / "my_conf" / "task").mkdir(parents=True)
    (tmp_path / "my_conf" / "task" / "focal.yaml").write_text("_target_: my_tasks.Focal\ngamma: 1.5\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "--config-dir",
            "my_conf",
            "task=focal",
            "backbone=timm",
            "backbone.name=test_resnet",
            "backbone.weights=none",
            "data=folder",
            f"data.root={images}",
            "augment=none",
            "input.size=32",
            "data.num_workers=0",
            "data.batch_size=8",
            "schedule=head_only",
            "schedule.stages.0.epochs=1",
            "schedule.min_steps=0",
            "trainer.enable_progress_bar=false",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (run_dir,) = run_folders(tmp_path / "outputs" / "runs")
    results = json.loads((run_dir / "results.json").read_text())
    assert results["task"] == "focal" and results["task_state"] == {"name": "focal", "gamma": 1.5}
    monkeypatch.syspath_prepend(str(tmp_path))
    report = evaluate(command_config("evaluate", tmp_path / "eval", [f"ckpt={results['best_checkpoint']['path']}"]))
    assert report["task"] == "focal" and report["metrics"]["acc"] == results["test"]["acc"]
