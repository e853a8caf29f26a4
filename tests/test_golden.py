"""The reorganised code gives what the code before it gave (tests/golden/, recorded at 9db41d8):

* the same split of every panel set (the README compares runs on "the same 656 test images");
* the same learning rate at every step of every stage of the default schedules, the same runs;
* the same sample indices from the samplers, on 1 and 2 processes;
* a run folder the old code left, interrupted in its second stage: its checkpoints evaluate, predict
  and serve as they did, and it resumes to the weights the old code's uninterrupted run reached.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from safetensors.torch import load_file

from tests.fixtures import FAST, ROOT, command_config, compose_config, train_run, write_image_folder
from transfer.data.datamodule import ImageDataModule
from transfer.data.splits import split_indices
from transfer.data.table import ImageTable, subsample
from transfer.data.transforms import eval_transform
from transfer.training.planner import build_task

GOLDEN = ROOT / "tests" / "golden"
RUN_ROOT = Path("/tmp/transfer_golden_9db41d8")  # where the old run lived; its checkpoints name files there

# The panel sets, in the current names (data.split.test and .val were data.test_fraction and .val_fraction).
PANEL = {
    "elpv_defective": ["data=elpv"],
    "elpv_severity": ["data=elpv_severity"],
    "elpv_cell_type": ["data=elpv_cell_type"],
    "elpv_probability": ["data=elpv_probability", "task=regression", "task.threshold=0.5"],
    "elpv_tags": ["data=elpv_tags", "task=multilabel"],
    "characters": ["data=folder"],
    "faces_few": ["data=folder"],
}


def golden_rows(path: Path) -> list[list[str]]:
    with gzip.open(path, "rt", newline="") as stream:
        return list(csv.reader(stream))[1:]


@pytest.fixture(scope="module")
def panel_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from panel_data import BUILDERS

    work = tmp_path_factory.mktemp("panel")
    for name, build in BUILDERS.items():
        build(work / name)
    return work


@pytest.mark.parametrize("golden", sorted((GOLDEN / "splits").glob("*.csv.gz")), ids=lambda p: p.name.split(".")[0])
def test_each_panel_set_is_split_as_before(golden: Path, panel_data: Path) -> None:
    name, seed = golden.name.split(".")[0].rsplit("-seed", 1)
    folder = [f"data.root={panel_data / name}"] if PANEL[name] == ["data=folder"] else []
    cfg = compose_config([*PANEL[name], *folder, f"seed={seed}"])
    table = subsample(build_task(cfg).arrange(instantiate(cfg.data.source)), cfg.data.get("max_images"), cfg.seed)
    splits = split_indices(table.stratify_on(), cfg.data.split.test, cfg.data.split.val, cfg.seed, table.splits)
    base = Path(table.paths[0]).parents[1] if name.startswith("elpv") else panel_data / name
    rows = sorted(
        [str(Path(table.paths[i]).relative_to(base)), table.label_text(i), split]
        for split, indices in splits.items()
        for i in indices
    )
    assert rows == golden_rows(golden)


class RecordLRs(L.Callback):
    """Every param group's lr at the start of every training batch, per stage, added to ``path``
    when the stage's fit ends (each stage instantiates its own callbacks)."""

    def __init__(self, path: str) -> None:
        self.path, self.curve = Path(path), []  # type: list[list[float]]

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.curve.append([group["lr"] for group in trainer.optimizers[0].param_groups])

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        curves = json.loads(self.path.read_text()) if self.path.exists() else {}
        self.path.write_text(json.dumps({**curves, pl_module.stage.name: self.curve}))


RECORDED = json.loads((GOLDEN / "lr_curves.json").read_text())
LR_RUNS = {
    "two_stage": ["schedule=two_stage"],
    "gradual": ["schedule=gradual"],
    "full": ["schedule=full"],
    "head_only": ["schedule=head_only"],
    "two_stage_layer_decay": ["schedule=two_stage", "schedule.stages.1.layer_decay=0.7"],
}
# The recording ran every epoch of each stage and went on from a stage's last epoch: that is
# patience null and schedule.restore_best=false now (stop-when-done is tested in test_stopping.py).
EVERY_EPOCH = {"two_stage": 2, "gradual": 4, "full": 1, "head_only": 1, "two_stage_layer_decay": 2}
# The recording's settings, in the current names.
LR_COMMON = [
    "schedule.restore_best=false",
    "backbone=timm",
    "backbone.name=test_resnet",
    "backbone.weights=none",
    "input.size=32",
    "augment=none",
    "data.num_workers=0",
    "data.batch_size=8",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "data=folder",
]


@pytest.mark.slow  # five short runs
@pytest.mark.parametrize("name", sorted(LR_RUNS))
def test_the_default_schedules_run_the_same_learning_rates_and_results(name: str, tmp_path: Path) -> None:
    images = write_image_folder(tmp_path / "images", per_class=16)
    record = tmp_path / "lrs.json"
    results = train_run(
        [
            *LR_COMMON,
            *LR_RUNS[name],
            *(f"schedule.stages.{index}.patience=null" for index in range(EVERY_EPOCH[name])),
            f"data.root={images}",
            "+callbacks.lrs._target_=tests.test_golden.RecordLRs",
            f"+callbacks.lrs.path={record}",
        ],
        tmp_path / "run",
    )
    curves, expected = json.loads(record.read_text()), RECORDED["curves"][name]
    assert list(curves) == list(expected)  # the same stages
    for stage, curve in expected.items():  # steps x param groups, to rounding
        assert [len(step) for step in curves[stage]] == [len(step) for step in curve], stage
        assert np.concatenate(curves[stage]) == pytest.approx(np.concatenate(curve), rel=1e-12, abs=0), stage
    assert [s["epochs"] for s in results["stages"]] == RECORDED["runs"][name]["epochs"]  # min_steps raised them alike
    assert results["test"] == pytest.approx(RECORDED["runs"][name]["test"], abs=1e-6)
    assert results["best_checkpoint"]["score"] == pytest.approx(RECORDED["runs"][name]["best"], abs=1e-6)


class Processes:
    def __init__(self, world_size: int, global_rank: int) -> None:
        self.world_size, self.global_rank = world_size, global_rank


def test_the_samplers_draw_the_same_indices_on_one_and_two_processes() -> None:
    recorded = json.loads((GOLDEN / "samplers.json").read_text())
    labels = np.array([0] * 28 + [1] * 9 + [0, 1, 0, 1, 0])
    splits = np.array(["train"] * 37 + ["val"] * 5, dtype=object)
    table = ImageTable([f"{i:03d}.png" for i in range(42)], labels, ["a", "b"], splits, name="samplers")
    transform = eval_transform(
        {"size": [8, 8], "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0, "interpolation": "bilinear"}
    )
    for sampler in ("shuffle", "balanced"):
        datamodule = ImageDataModule(
            table,
            split_indices(labels, 0.0, 0.0, 42, splits),
            transform,
            transform,
            (8, 8),
            batch_size=4,
            num_workers=0,
            seed=42,
            sampler=sampler,
        )
        for world in (1, 2):
            for rank in range(world):
                for split in ("train", "val"):
                    loader = datamodule.loader(datamodule.dataset(split), split == "train", Processes(world, rank))
                    for epoch in range(3):
                        if hasattr(loader.sampler, "set_epoch"):
                            loader.sampler.set_epoch(epoch)
                        key = f"{sampler}/{split}/world{world}/rank{rank}/epoch{epoch}"
                        assert {
                            "indices": list(map(int, loader.sampler)),
                            "dataset": len(loader.dataset),
                            "drop_last": loader.drop_last,
                        } == recorded[key], key


# The old run's settings in the current names: backbone.weights=none (was backbone.pretrained=false).
OLD_RUN = [
    *FAST,
    "backbone.name=test_efficientnet",
    "schedule.stages.1.epochs=2",
    "augment=none",
    "data=folder",
    f"data.root={RUN_ROOT / 'images'}",
]


@pytest.fixture(scope="module")
def old_run() -> Path:
    """The old run's folder and images where the old code left them, with their files' times."""
    shutil.rmtree(RUN_ROOT, ignore_errors=True)
    shutil.copytree(GOLDEN / "run", RUN_ROOT / "run")
    shutil.copytree(GOLDEN / "images", RUN_ROOT / "images")
    with open(RUN_ROOT / "run" / "split.csv") as stream:
        for row in csv.DictReader(stream):
            os.utime(row["path"], ns=(int(row["mtime_ns"]), int(row["mtime_ns"])))
    yield RUN_ROOT
    shutil.rmtree(RUN_ROOT, ignore_errors=True)


def test_an_old_checkpoint_evaluates_predicts_and_serves_as_it_did(old_run: Path, tmp_path: Path) -> None:
    from transfer.inference.evaluate import evaluate
    from transfer.inference.predict import predict

    (head,) = (old_run / "run" / "checkpoints").glob("head-*.ckpt")
    expected = json.loads((GOLDEN / "run_expected" / "evaluate_head.json").read_text())
    report = evaluate(command_config("evaluate", tmp_path / "eval", [f"ckpt={head}"]))
    assert report["metrics"] == pytest.approx(expected["metrics"], abs=1e-6)
    assert report["confusion_matrix"] == expected["confusion_matrix"] and report["images"] == expected["images"]
    predict(command_config("predict", tmp_path / "predict", [f"ckpt={head}", f"inputs={old_run / 'images'}"]))
    with open(GOLDEN / "run_expected" / "predict_head.csv") as stream:
        before = {Path(r["path"]).name: r for r in csv.DictReader(stream)}
    with open(tmp_path / "predict" / "predictions.csv") as stream:
        now = {Path(r["path"]).name: r for r in csv.DictReader(stream)}
    assert now.keys() == before.keys() and len(now) == 32
    for name, row in now.items():
        assert row["predicted"] == before[name]["predicted"]
        assert float(row["p_cat"]) == pytest.approx(float(before[name]["p_cat"]), abs=2e-6)

    pytest.importorskip("litserve")
    import base64

    from transfer.inference.serve import CheckedRequests, PredictAPI

    api = PredictAPI(str(head), "none")
    api.setup("cpu")
    checked = CheckedRequests(None, {"/predict": False}, 10**6, api.classifier.input_config)
    files = sorted((old_run / "images" / "dog").glob("*.png"))[:3]
    images = api.decode_request(
        {"images": [checked.prepared(base64.b64encode(f.read_bytes()).decode(), "x") for f in files]}
    )
    served = api.encode_response(api.predict(images))["predictions"]
    for file, answer in zip(files, served, strict=True):
        assert answer["probabilities"]["cat"] == pytest.approx(float(before[file.name]["p_cat"]), abs=2e-6)


@pytest.mark.slow  # two short runs
def test_an_old_interrupted_run_resumes_to_the_old_uninterrupted_runs_weights(old_run: Path, tmp_path: Path) -> None:
    expected = json.loads((GOLDEN / "run_expected" / "full_results.json").read_text())
    weights = load_file(str(GOLDEN / "run_expected" / "full_last_weights.safetensors"))

    def last_weights(run_dir: Path) -> dict[str, torch.Tensor]:
        return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]

    resumed = train_run([*OLD_RUN, f"resume={old_run / 'run' / 'checkpoints' / 'last.ckpt'}"], tmp_path / "resumed")
    assert [s["name"] for s in resumed["stages"]] == ["finetune"]  # continued in the stage it stopped in
    fresh = train_run(OLD_RUN, tmp_path / "fresh")  # the same run from scratch, on the current code
    for results, run_dir in ((resumed, tmp_path / "resumed"), (fresh, tmp_path / "fresh")):
        assert results["test"] == pytest.approx(expected["test"], abs=1e-6)
        assert results["confusion_matrix"] == expected["confusion_matrix"]
        now = last_weights(run_dir)
        assert now.keys() == weights.keys()
        for key, value in weights.items():
            torch.testing.assert_close(now[key], value, rtol=1e-6, atol=1e-7, msg=key)
    assert [s["epochs"] for s in fresh["stages"]] == [s["epochs"] for s in expected["stages"]]
