"""augment=auto: the probe keeps the transforms that keep the labels and rejects the others.

Two synthetic folders, each built so that the right answer is known:
* stripes: horizontal vs vertical stripes. Mirroring and flipping keep the orientation (keep);
  a 90-degree turn swaps the classes (reject).
* arrows: triangles pointing left vs right. Mirroring swaps the classes (reject); a vertical
  flip keeps them (keep).
The probe runs the real packaged EfficientNet-Lite0 features, at 64 px to stay fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw

from tests.fixtures import compose_config, train_run
from transfer.augment.probe import ProbeSettings, consistent_geometry, judge, pipeline_nodes
from transfer.errors import TransferError

PROBE_RUN = [
    "data=folder",
    "input.size=64",
    "data.num_workers=0",
    "data.batch_size=16",
    "data.split.test=0.1",
    "schedule=head_only",
    "schedule.stages.0.epochs=1",
    "schedule.min_steps=0",
    "trainer.enable_progress_bar=false",
    "augment.probe.crop_scales=[0.5]",
    "augment.probe.folds=4",
]


def stripes(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    period = rng.integers(6, 12)
    phase = rng.integers(0, period)
    wave = ((np.arange(size) + phase) // (period // 2) % 2).astype(np.float32)
    pattern = wave[:, None] * np.ones((1, size)) if label == 0 else np.ones((size, 1)) * wave[None, :]
    return 70 + 110 * pattern + rng.normal(0, 12, (size, size))


def arrow(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    canvas = Image.new("L", (size, size), 40)
    half = rng.integers(size // 5, size // 3)
    cx, cy = (int(v) for v in rng.integers(size // 3, 2 * size // 3, 2))
    tip = (cx - half, cy) if label == 0 else (cx + half, cy)
    back = cx + half // 2 if label == 0 else cx - half // 2
    ImageDraw.Draw(canvas).polygon([tip, (back, cy - half), (back, cy + half)], fill=220)
    return np.asarray(canvas, dtype=np.float32) + rng.normal(0, 10, (size, size))


def write_folder(root: Path, draw, names: tuple[str, str], per_class: int = 30, size: int = 48) -> Path:
    rng = np.random.default_rng(0)
    for label, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            pixels = np.clip(draw(label, size, rng), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{index:03d}.png")
    return root


def probe_run(root: Path, run_dir: Path, *extra: str) -> dict:
    return train_run([*PROBE_RUN, f"data.root={root}", *extra], run_dir)


def test_probe_keeps_mirrors_and_rejects_turns_on_stripes(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "stripes", stripes, ("horizontal", "vertical"))
    results = probe_run(root, tmp_path / "run")
    evidence = results["augment"]["evidence"]
    assert evidence["hflip"]["keep"] and evidence["vflip"]["keep"], evidence
    assert not evidence["rot90"]["keep"], evidence
    # A classifier trained on upright stripes calls turned ones the other class.
    assert evidence["rot90"]["recognised"] < 0.5 < evidence["hflip"]["recognised"], evidence
    chosen = [node["_target_"].rsplit(".", 1)[-1] for node in results["augment"]["train"]]
    assert "HorizontalFlip" in chosen and "VerticalFlip" in chosen
    assert "RandomRotate90" not in chosen and "SquareSymmetry" not in chosen
    assert results["augment"]["symmetries"] == ["hflip", "vflip"]  # what tta=auto will average over


def test_probe_rejects_mirroring_when_it_changes_the_class(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "arrows", arrow, ("left", "right"))
    run_dir = tmp_path / "run"
    results = probe_run(root, run_dir)
    evidence = results["augment"]["evidence"]
    assert not evidence["hflip"]["keep"] and evidence["vflip"]["keep"], evidence
    chosen = [node["_target_"].rsplit(".", 1)[-1] for node in results["augment"]["train"]]
    assert "HorizontalFlip" not in chosen and "SquareSymmetry" not in chosen and "VerticalFlip" in chosen

    # The choice is recorded where a person and a re-run find it: config.yaml, results.json and a
    # config group option in the run directory that repeats the run without probing.
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["augment"]["train"] == results["augment"]["train"]
    assert json.loads((run_dir / "results.json").read_text())["augment"]["evidence"] == json.loads(json.dumps(evidence))
    chosen_file = yaml.safe_load((run_dir / "augment" / "chosen.yaml").read_text())
    assert chosen_file["train"] == results["augment"]["train"]
    # --config-dir RUN_DIR augment=chosen (here as Hydra's search path) repeats it without a probe.
    repeat = compose_config(
        [*PROBE_RUN[:-2], f"data.root={root}", f"hydra.searchpath=[file://{run_dir}]", "augment=chosen"]
    )
    assert not repeat.augment.get("auto") and list(repeat.augment.train) == results["augment"]["train"]


@pytest.mark.slow  # end to end, twice over: in CI, not in the developer's loop
def test_probe_is_deterministic_for_a_seed_and_a_rerun_reads_its_cached_decision(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "arrows", arrow, ("left", "right"))
    # the same features and decision with 0 and 2 loader workers: each view's draw is its image's
    first = probe_run(root, tmp_path / "a", "augment.probe.cache=false")["augment"]
    second = probe_run(root, tmp_path / "b", "augment.probe.cache=false", "data.num_workers=2")["augment"]
    assert first["evidence"] == second["evidence"] and first["train"] == second["train"]
    assert "cached" not in first
    # cached: a second run with the same images, model and settings skips the probe
    probed = probe_run(root, tmp_path / "c")["augment"]
    again = probe_run(root, tmp_path / "d")["augment"]
    assert not probed.get("cached") and again["cached"] and again["evidence"] == probed["evidence"] == first["evidence"]
    assert again["train"] == first["train"]
    # a changed image is another fingerprint: probed again
    next(iter(sorted((root / "left").iterdir()))).write_bytes((root / "right" / "000.png").read_bytes())
    assert not probe_run(root, tmp_path / "e")["augment"].get("cached")


def test_an_explicit_augment_wins_over_auto(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "arrows", arrow, ("left", "right"), per_class=8)
    assert not compose_config([*PROBE_RUN[:-2], f"data.root={root}", "augment=none"]).augment.get("auto")
    results = train_run([*PROBE_RUN[:-2], f"data.root={root}", "augment=none"], tmp_path / "run")
    assert results["augment"] == {"name": "none", "chosen_by": "augment= given", "train": None, "symmetries": []}
    assert compose_config(["data=folder", "data.root=x"]).augment.auto is True
    assert compose_config(["data=csv", "data.csv=x"]).augment.auto is True
    assert compose_config([]).augment.get("auto") is None  # ELPV names its own (cells)


def test_auto_augment_and_feature_cache_do_not_mix(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "arrows", arrow, ("left", "right"), per_class=4)
    with pytest.raises(TransferError, match="augment=none"):
        train_run([*PROBE_RUN, f"data.root={root}", "feature_cache=true"], tmp_path / "run")


def evidence_of(changes: dict[str, float]) -> dict:
    """Per-image correctness of 200 images giving each view the accuracy change asked for."""
    base = np.zeros(200, dtype=bool)
    base[:160] = True
    correct = {"none": base}
    for name, change in changes.items():
        shifted = base.copy()
        moved = int(round(abs(change) * 200))
        if change < 0:
            shifted[160 - moved : 160] = False
        else:
            shifted[160 : 160 + moved] = True
        correct[name] = shifted
    return judge(correct, dict.fromkeys(changes, base), tolerance=0.005, recognition_tolerance=0.02)


def test_decision_rules_and_the_pipeline_they_build() -> None:
    settings = ProbeSettings(crop_scales=(0.7, 0.35))
    names = ("hflip", "vflip", "rot90", "crop0.7", "crop0.35", "colour")
    kept_all = evidence_of(dict.fromkeys(names, 0.0))
    nodes = pipeline_nodes(kept_all, {"size": [32, 32], "crop_pct": 1.0, "interpolation": "bilinear"}, settings)
    targets = [node["_target_"].rsplit(".", 1)[-1] for node in nodes]
    assert targets == ["RandomResizedCrop", "SquareSymmetry", "ColorJitter"]
    assert nodes[0]["scale"] == [0.35, 1.0]

    hurt = evidence_of({"hflip": -0.1, "vflip": 0.0, "rot90": 0.0, "crop0.7": 0.0, "crop0.35": -0.1, "colour": -0.1})
    assert not hurt["hflip"]["keep"] and hurt["vflip"]["keep"]
    # A turn with only one flip would generate the rejected flip: it is dropped too.
    assert consistent_geometry(hurt) == ["vflip"]
    nodes = pipeline_nodes(hurt, {"size": [32, 32], "crop_pct": 1.0, "interpolation": "bilinear"}, settings)
    assert [node["_target_"].rsplit(".", 1)[-1] for node in nodes] == ["RandomResizedCrop", "VerticalFlip"]
    assert nodes[0]["scale"] == [0.7, 1.0]

    assert pipeline_nodes(evidence_of(dict.fromkeys(names, -0.1)), {"size": [32, 32]}, settings) is None

    # A view that costs nothing when trained with, but after which the images are no longer
    # recognised (a crop that cuts away what decides the class), is left out too.
    base = np.arange(200) < 160
    unrecognised = base.copy()
    unrecognised[150:160] = False  # 5 points worse
    verdict = judge({"none": base, "crop0.35": base}, {"crop0.35": unrecognised}, 0.005, 0.02)["crop0.35"]
    assert verdict["change"] == 0 and verdict["recognised_change"] == -0.05 and not verdict["keep"]

    no_crop = evidence_of({**dict.fromkeys(names, 0.0), "crop0.7": -0.1, "crop0.35": -0.1})
    nodes = pipeline_nodes(no_crop, {"size": [32, 32], "crop_pct": 0.875, "interpolation": "bicubic"}, settings)
    assert [node["_target_"].rsplit(".", 1)[-1] for node in nodes][:2] == ["SmallestMaxSize", "CenterCrop"]
    assert nodes[0]["max_size"] == 36  # the evaluation geometry: 32 / 0.875


@pytest.mark.slow  # end to end, twice over: in CI, not in the developer's loop
def test_a_probe_that_keeps_nothing_leaves_the_run_as_augment_none(tmp_path: Path) -> None:
    """The probe's loaders must not shift the random state the training draws from."""
    root = write_folder(tmp_path / "arrows", arrow, ("left", "right"), per_class=16)
    nothing = probe_run(root, tmp_path / "auto", "augment.probe.recognition_tolerance=-1")
    assert nothing["augment"]["train"] is None
    plain = train_run([*PROBE_RUN[:-2], f"data.root={root}", "augment=none"], tmp_path / "none")
    assert nothing["test"] == plain["test"]
    assert nothing["best_checkpoint"]["score"] == plain["best_checkpoint"]["score"]


def test_too_few_images_to_probe_train_without_augmentation(tmp_path: Path) -> None:
    # 2 x 12 images, 19 of them training/validation: one image is 5 points of the probe's accuracy,
    # more than its 2-point tolerance, so it cannot show any transform is safe.
    root = write_folder(tmp_path / "arrows", arrow, ("left", "right"), per_class=12)
    results = probe_run(root, tmp_path / "run")
    assert results["augment"]["train"] is None and results["augment"]["evidence"] == {}
    assert "too few images" in results["augment"]["reason"]


def test_the_probe_fits_its_share_of_the_planned_run() -> None:
    from transfer.augment.probe import affordable_views, probe_size

    settings = ProbeSettings()  # 10% of the run, at least 200 images, at most 1,000
    names = ["hflip", "vflip", "rot90", "crop0.7", "crop0.35", "colour"]
    # a long run affords every view on 1,000 images; 20,000 passes over 7 views, 285 images
    assert affordable_views(names, 5000, 1e6, settings) == names and probe_size(5000, 6, 1e6, settings) == 1000
    assert probe_size(5000, 6, 20_000, settings) == 285
    # shorter runs: colour, then the strongest crop, then the mildest, until 200 images fit
    assert affordable_views(names, 5000, 10_000, settings) == ["hflip", "vflip", "rot90", "crop0.7"]
    assert affordable_views(names, 5000, 8_000, settings) == ["hflip", "vflip", "rot90"]
    assert affordable_views(names, 5000, 100, settings) == ["hflip", "vflip", "rot90"]  # flips and turns stay
    assert probe_size(5000, 3, 100, settings) == 200  # never fewer than 200 images
    # 150 images: they all fit once colour is left out
    assert affordable_views(names, 150, 10_000, settings) == names[:-1] and probe_size(150, 5, 10_000, settings) == 150
    assert affordable_views(names, 5000, None, settings) == names  # no plan to measure against: no cap


def test_flips_and_turns_made_from_the_evaluation_crop_equal_those_made_from_the_image() -> None:
    import torch

    from transfer.augment.probe import view_pipelines
    from transfer.augment.probe_views import DERIVED
    from transfer.data.transforms import eval_transform

    config = {"size": [32, 32], "mean": [0.5] * 3, "std": [0.25] * 3, "crop_pct": 0.875, "interpolation": "bicubic"}
    # 48x48 -> 36x36 -> the center 32x32: even margins (odd ones put the crop one pixel apart)
    image = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    original = eval_transform(config)(image=image)["image"]
    pipelines = view_pipelines(config, ProbeSettings(), seed=0)
    for name, derive in DERIVED.items():
        torch.testing.assert_close(derive(original), pipelines[name](image=image)["image"], atol=1e-5, rtol=0, msg=name)
