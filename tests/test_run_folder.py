"""A run folder is easy to find and reuse: ``checkpoints/best.ckpt`` and ``last.ckpt`` under fixed
names, ``outputs/runs/latest`` pointing at the newest run, and the commands after training taking
the folder (``run=``) as well as a checkpoint (``ckpt=``)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from tests.fixtures import FAST, command_config, write_image_folder
from transfer.api import fine_tune
from transfer.config.run_folder import best_checkpoint, link_latest, resolve_checkpoint
from transfer.config.user_paths import expand_home
from transfer.errors import TransferError
from transfer.inference.evaluate import evaluate
from transfer.training.resume import read_resume


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """Two tiny runs under ``<log_dir>/runs`` (the folder a command makes, not one chosen by hand)."""
    tmp_path = tmp_path_factory.mktemp("runs")
    images = write_image_folder(tmp_path / "images", per_class=12, size=40)
    for _ in range(2):
        fine_tune([*FAST, "data=folder", f"data.root={images}", f"paths.log_dir={tmp_path / 'outputs'}"])
    return tmp_path / "outputs" / "runs"


def test_every_run_has_best_and_last_checkpoints_and_latest_points_at_the_newest(runs: Path) -> None:
    folders = sorted(p for p in runs.iterdir() if not p.is_symlink())
    assert len(folders) == 2
    latest = runs / "latest"
    assert latest.is_symlink() and os.readlink(latest) == folders[-1].name  # relative: the tree can move
    for folder in folders:
        results = json.loads((folder / "results.json").read_text())
        best = folder / "checkpoints" / "best.ckpt"
        assert results["checkpoint"] == str(best)
        stage_file = Path(results["best_checkpoint"]["path"])
        assert stage_file.parent == best.parent and stage_file.name != "best.ckpt"
        assert best.read_bytes() == stage_file.read_bytes()  # the checkpoint the run was tested with
        assert (folder / "checkpoints" / "last.ckpt").is_file()


def test_evaluate_on_the_latest_run_folder_reproduces_its_test_metrics(runs: Path, tmp_path: Path) -> None:
    results = json.loads((runs / "latest" / "results.json").read_text())
    report = evaluate(command_config("evaluate", tmp_path / "eval", [f"run={runs / 'latest'}"]))
    assert report["checkpoint"].endswith("checkpoints/best.ckpt")
    assert report["images"] == sum(results["split_counts"]["test"].values())
    assert report["metrics"]["acc"] == pytest.approx(results["test"]["acc"], abs=1e-6)
    assert report["metrics"]["f1"] == pytest.approx(results["test"]["f1"], abs=1e-6)


def test_resume_takes_a_run_folder_as_its_last_checkpoint(runs: Path) -> None:
    state = read_resume(str(runs / "latest"))
    assert Path(state["path"]) == runs / "latest" / "checkpoints" / "last.ckpt"


def test_a_run_without_best_ckpt_is_found_through_its_results_or_refused(tmp_path: Path) -> None:
    run = tmp_path / "old_run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    with pytest.raises(TransferError, match="did not finish; pass ckpt=.*last.ckpt"):
        best_checkpoint(run)
    stage_file = run / "checkpoints" / "finetune-epoch03.ckpt"  # a run from before best.ckpt existed
    stage_file.write_bytes(b"x")
    (run / "results.json").write_text(json.dumps({"checkpoint": str(stage_file)}))
    assert best_checkpoint(run) == stage_file
    with pytest.raises(TransferError, match="does not exist"):
        best_checkpoint(tmp_path / "nowhere")


def test_ckpt_or_run_exactly_one_and_home_expanded(tmp_path: Path) -> None:
    with pytest.raises(TransferError, match="not both"):
        resolve_checkpoint(OmegaConf.create({"ckpt": "a.ckpt", "run": "r"}))
    with pytest.raises(TransferError, match="Which model"):
        resolve_checkpoint(OmegaConf.create({"ckpt": None, "run": None}))
    cfg = OmegaConf.create({"ckpt": "~/models/a.ckpt", "run": None})
    resolve_checkpoint(cfg)
    assert cfg.ckpt == str(Path.home() / "models" / "a.ckpt") == str(Path("~/models/a.ckpt").expanduser())


def test_latest_is_replaced_not_broken_and_never_replaces_a_real_folder(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    for name in ("a", "b"):
        (runs / name).mkdir(parents=True)
        link_latest(runs / name)
        assert (runs / "latest").resolve() == (runs / name).resolve()
    assert sorted(p.name for p in runs.iterdir()) == ["a", "b", "latest"]  # no temporary link left
    (runs / "latest").unlink()
    (runs / "latest").mkdir()  # the user's own folder of that name
    link_latest(runs / "b")
    assert (runs / "latest").is_dir() and not (runs / "latest").is_symlink()


def test_a_home_folder_in_an_override_is_read_as_a_shell_reads_it() -> None:
    home = str(Path.home())
    assert expand_home(["data.root=~/photos", "ckpt=~", "~callbacks", "data.root=/a/~b", "x=~~"]) == [
        f"data.root={home}/photos",
        f"ckpt={home}",
        "~callbacks",  # Hydra's deletion, untouched
        "data.root=/a/~b",
        "x=~~",  # no such user: left as it is (Hydra then names the problem)
    ]


def test_load_model_predicts_files_pil_images_and_arrays_alike(runs: Path) -> None:
    from PIL import Image

    from transfer import load_model

    model = load_model(runs / "latest", device="cpu")
    images = [row.split(",")[0] for row in (runs / "latest" / "split.csv").read_text().splitlines()[1:4]]
    from_files = model.predict(images)
    assert isinstance(from_files, list) and len(from_files) == 3
    from_pil = model.predict([Image.open(p) for p in images])
    from_arrays = model.predict([np.asarray(Image.open(p).convert("RGB")) for p in images])
    for a, b, c in zip(from_files, from_pil, from_arrays, strict=True):
        assert a["label"] == b["label"] == c["label"] and a["label"] in model.class_names
        assert a["confidence"] == pytest.approx(b["confidence"]) == pytest.approx(c["confidence"])
    single = model.predict(Path(images[0]))
    assert isinstance(single, dict) and single["probabilities"] == pytest.approx(from_files[0]["probabilities"])
    with pytest.raises(TransferError, match="uint8"):
        model.predict(np.zeros((4, 4, 3), dtype=np.float32))


def test_device_auto_prefers_cuda_then_mps_then_cpu(monkeypatch) -> None:
    import torch

    from transfer.model.classifier import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert pick_device("auto") == torch.device("mps")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto") == torch.device("cuda")
    assert pick_device("cuda:1") == torch.device("cuda:1")


def test_resume_from_latest_continues_the_run_latest_named_before_this_one_started(runs: Path) -> None:
    """The new run repoints ``latest`` at itself as it starts: ``resume=.../latest`` must still mean
    the run before it. (Runs last in this module: it adds a run folder.)"""
    before = (runs / "latest").resolve()
    images = (runs.parent.parent / "images").resolve()  # the fixture's runs' data and settings
    result = fine_tune(
        [*FAST, "data=folder", f"data.root={images}", f"paths.log_dir={runs.parent}", f"resume={runs / 'latest'}"]
    )
    assert result.results["resumed_from"] == str(before / "checkpoints" / "last.ckpt")
    assert (runs / "latest").resolve() == result.run_dir.resolve() != before
