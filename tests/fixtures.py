"""Test helpers: configs composed the way train.py composes them, short runs, small image trees.

Imported by the test modules (``from tests.fixtures import ...``); the pytest fixtures built on them
are in conftest.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig
from PIL import Image

from transfer.api import fine_tune
from transfer.config.compose import compose

ROOT = Path(__file__).resolve().parents[1]  # the repo: train.py, conf/
CONF_DIR = str(ROOT / "conf")

# Short, small runs: a tiny timm model at 32 px, two 1-epoch stages, no worker processes.
FAST = [
    "backbone=timm",
    "backbone.name=test_resnet",
    "backbone.weights=none",
    "input.size=32",
    "augment=light",
    "data.num_workers=0",
    "data.batch_size=8",
    "schedule.stages.0.epochs=1",
    "schedule.stages.1.epochs=1",
    "schedule.stages.1.unfreeze=1",
    "schedule.min_steps=0",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
]


def compose_config(overrides: list[str], output_dir: Path | None = None) -> DictConfig:
    """conf/train.yaml with ``overrides``, as train.py composes it (old names upgraded)."""
    return compose("train", overrides, output_dir=output_dir)


def command_config(name: str, out_dir: Path, overrides: list[str]) -> DictConfig:
    """conf/<name>.yaml (evaluate, predict, explain, export) composed with ``overrides``, writing to ``out_dir``."""
    return compose(name, overrides, output_dir=out_dir)


def train_run(overrides: list[str], run_dir: Path) -> dict[str, Any]:
    """A run through the Python API (what train.py runs): its results.json."""
    return fine_tune(overrides, run_dir=run_dir).results


def run_folders(runs: Path) -> list[Path]:
    """The run folders under ``<log_dir>/runs``, oldest first (not the ``latest`` link)."""
    return sorted(p for p in runs.iterdir() if p.is_dir() and not p.is_symlink())


def make_image(label: int, size: int, rng: np.random.Generator) -> Image.Image:
    """Class 0: dark with horizontal stripes; class 1: bright with vertical stripes; plus noise."""
    base = np.zeros((size, size), dtype=np.float32)
    stripes = (np.arange(size) // 4 % 2).astype(np.float32)
    base += stripes[:, None] if label == 0 else stripes[None, :]
    level = 60 if label == 0 else 170
    pixels = level + 60 * base + rng.normal(0, 15, (size, size))
    rgb = np.stack([pixels, pixels * 0.9, pixels * 0.8], axis=-1)
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def write_image_folder(
    root: Path, per_class: int = 12, size: int = 40, classes: tuple[str, ...] = ("cat", "dog"), seed: int = 0
) -> Path:
    rng = np.random.default_rng(seed)
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            make_image(label % 2, size, rng).save(root / name / f"{name}_{index:03d}.png")
    return root


def write_tagged_images(root: Path, count: int = 48, seed: int = 0) -> Path:
    """Two independent tags: ``bright`` (the brightness) and ``vertical`` (the stripes' direction).
    labels.csv has them as separated tags (``tags``), as 0/1 columns, and a brightness ``value``."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    size = 40
    stripes = (np.arange(size) // 4 % 2).astype(np.float32)
    rows = []
    for index in range(count):
        bright, vertical = index % 2, (index // 2) % 2
        value = float(rng.uniform(0.55, 1.0) if bright else rng.uniform(0.0, 0.45))
        pixels = 40 + 160 * value + 50 * (stripes[None, :] if vertical else stripes[:, None])
        pixels = pixels + rng.normal(0, 10, (size, size))
        name = f"{index:03d}.png"
        Image.fromarray(np.clip(np.stack([pixels] * 3, -1), 0, 255).astype(np.uint8)).save(root / name)
        tags = ";".join(tag for tag, on in (("bright", bright), ("vertical", vertical)) if on)
        rows.append(f"{name},{tags},{bright},{vertical},{value:.4f}\n")
    (root / "labels.csv").write_text("path,tags,bright,vertical,value\n" + "".join(rows))
    return root / "labels.csv"


def train_on_tagged_images(tmp_path: Path, label_column: str, *task: str) -> dict[str, Any]:
    """A short run of ``task`` on `write_tagged_images` (its ``label_column``), trained from scratch."""
    labels = write_tagged_images(tmp_path / "images")
    results = train_run(
        [
            *FAST,
            "data=csv",
            f"data.csv={labels}",
            f"data.source.label_column={label_column}",
            *task,
            "augment=none",
            "schedule.stages.0.epochs=3",
            "schedule.stages.0.lr=0.01",
            "schedule.stages.0.unfreeze=all",
        ],
        tmp_path / "run",
    )
    return {"labels": labels, "results": results, "ckpt": results["best_checkpoint"]["path"], "tmp": tmp_path}


def options(group: str) -> list[str]:
    """The options of a config group (its YAML files), as ``group=<option>`` names them."""
    return sorted(
        p.stem
        for p in (Path(CONF_DIR) / group).glob("*.yaml")
        if not (group == "trainer" and p.stem == "default") and not (group == "data" and p.stem == "base")
    )


def train_config(cfg: DictConfig) -> dict[str, Any]:
    """A run of a config composed and adjusted by the test (`compose_config`): its results.json."""
    from transfer.api import fine_tune_config

    return fine_tune_config(cfg).results
