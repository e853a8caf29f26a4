"""DDP on CPU (gloo, 2 processes), launched the way users launch it: python train.py trainer=ddp."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.fixtures import ROOT, make_image, run_folders, write_image_folder

pytestmark = pytest.mark.slow  # see pyproject.toml: not in the developer's loop


# No randomness but the data order: no augmentation, no dropout, BatchNorm frozen in every stage
# (per-process batch statistics would differ from single-process ones by design).
COMMON = [
    "backbone=timm",
    "backbone.name=test_resnet",
    "backbone.weights=none",
    "input.size=32",
    "augment=none",
    "data=folder",
    "data.num_workers=0",
    "data.split.test=0.2",
    "data.split.val=0.1",
    "schedule.stages.0.epochs=1",
    "schedule.stages.1.epochs=2",
    "schedule.stages.1.unfreeze=2",
    "schedule.min_steps=0",
    "schedule.stages.1.freeze_bn=true",
    "trainer.enable_progress_bar=false",
    "trainer.accelerator=cpu",
]


def run(tmp_path: Path, name: str, *overrides: str) -> tuple[dict, Path]:
    log_dir = tmp_path / name
    done = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *COMMON, *overrides, f"paths.log_dir={log_dir}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    (run_dir,) = run_folders(log_dir / "runs")
    return json.loads((run_dir / "results.json").read_text()), run_dir


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    tmp_path = tmp_path_factory.mktemp("ddp")
    # 18 + 24 images: 30 train, 3 val, 9 test. Odd evaluation splits, so 2 processes get unequal
    # shares (one is padded): the metrics must still be exactly one process's.
    images = write_image_folder(tmp_path / "images", per_class=18)
    rng = np.random.default_rng(1)
    for index in range(6):
        make_image(1, 40, rng).save(images / "dog" / f"extra_{index}.png")
    # The DDP run also trains its head stage on cached features: it must still match plain images.
    # The fine-tuning stage may run 6 epochs and stops on a plateau (patience 1): every process
    # must stop at the same step, the one where a single process stops.
    stop = ["schedule.stages.1.epochs=6", "schedule.stages.1.patience=1"]
    ddp = run(
        tmp_path,
        "ddp",
        *stop,
        f"data.root={images}",
        "trainer=ddp",
        "trainer.devices=2",
        "data.batch_size=4",
        "feature_cache=true",
    )
    single = run(tmp_path, "single", *stop, f"data.root={images}", "data.batch_size=8")
    return {"ddp": ddp, "single": single, "images": images, "tmp": tmp_path}


# BatchNorm that trains (freeze_bn=false) in timm's fused BatchNormAct2d layers (EfficientNet).
TRAINING_BN = ["backbone.name=test_efficientnet", "schedule.stages.1.freeze_bn=false"]


def test_sync_batchnorm_is_refused_on_cpu_with_the_reason(runs) -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            *COMMON,
            f"data.root={runs['images']}",
            "trainer=ddp",
            "trainer.accelerator=cpu",
            "trainer.sync_batchnorm=true",
            f"paths.log_dir={runs['tmp'] / 'refused'}",
        ],
        cwd=runs["tmp"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode != 0 and "CUDA only" in done.stderr + done.stdout


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="SyncBatchNorm across processes needs 2 GPUs")
def test_sync_batchnorm_matches_one_process_at_the_same_global_batch(runs) -> None:
    # With synchronised statistics, 2 processes x 4 images normalise exactly as 1 process x 8 does,
    # and timm's conversion keeps each layer's activation (torch's would drop it: other outputs).
    images, tmp_path = runs["images"], runs["tmp"]
    gpu = ["trainer.accelerator=gpu"]
    synced, synced_dir = run(
        tmp_path,
        "ddp_sync",
        f"data.root={images}",
        *TRAINING_BN,
        *gpu,
        "trainer=ddp",
        "trainer.devices=2",
        "data.batch_size=4",
        "trainer.sync_batchnorm=true",
    )
    single, single_dir = run(
        tmp_path, "single_bn", f"data.root={images}", *TRAINING_BN, *gpu, "trainer.devices=1", "data.batch_size=8"
    )
    synced_weights, single_weights = weights(synced_dir), weights(single_dir)
    assert synced_weights.keys() == single_weights.keys()
    moved = [
        k
        for k in single_weights
        if k.endswith("running_mean") and not torch.equal(single_weights[k], weights_at_init(single_dir)[k])
    ]
    assert moved  # the unfrozen blocks' statistics did train
    for key in single_weights:
        torch.testing.assert_close(synced_weights[key], single_weights[key], rtol=1e-4, atol=1e-5, msg=key)
    assert synced["test"]["acc"] == pytest.approx(single["test"]["acc"], abs=1e-6)


def test_replicas_are_bit_identical_after_every_stage(runs) -> None:
    results, _ = runs["ddp"]
    assert results["world_size"] == 2
    assert [sum(results["split_counts"][s].values()) for s in ("train", "val", "test")] == [30, 3, 9]
    assert [stage["feature_cache"] for stage in results["stages"]] == [True, False]
    for stage in results["stages"]:
        report = stage["distributed"]
        assert report["world_size"] == 2 and report["train_sampler"] == "DistributedSampler"
        assert report["identical"] and report["mismatched_tensors"] == 0 and report["tensors"] > 50


def test_two_processes_match_one_process_at_the_same_global_batch(runs) -> None:
    (ddp_results, ddp_dir), (single_results, single_dir) = runs["ddp"], runs["single"]
    finetune = [results["stages"][1] for results in (ddp_results, single_results)]
    assert finetune[0]["stopped_early"] and finetune[0]["epochs_run"] == finetune[1]["epochs_run"] < 6, finetune
    ddp_weights, single_weights = weights(ddp_dir), weights(single_dir)
    assert ddp_weights.keys() == single_weights.keys()
    trained = [k for k in single_weights if not torch.equal(single_weights[k], weights_at_init(single_dir)[k])]
    assert len(trained) > 4  # stage 2 really changed the unfrozen blocks
    for key in ddp_weights:
        torch.testing.assert_close(ddp_weights[key], single_weights[key], rtol=1e-5, atol=1e-6, msg=key)
    # metrics are gathered over both processes' shares of the test set: the same as one process
    for metric in ("acc", "f1", "auroc"):
        assert ddp_results["test"][metric] == pytest.approx(single_results["test"][metric], abs=1e-6)
    assert ddp_results["confusion_matrix"] == single_results["confusion_matrix"]


def weights_at_init(run_dir: Path) -> dict[str, torch.Tensor]:
    """The head-stage checkpoint: everything but the head still at initialisation."""
    (head,) = (run_dir / "checkpoints").glob("head-*.ckpt")
    return torch.load(head, map_location="cpu", weights_only=False)["state_dict"]


def test_only_rank_zero_writes_run_files(runs) -> None:
    _, ddp_dir = runs["ddp"]
    _, single_dir = runs["single"]

    def files(d: Path) -> set[str]:
        return {str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()}

    extra = files(ddp_dir) - files(single_dir)
    assert extra == {"train_ddp_process_1.log"}  # rank 1's own log (Hydra), nothing else
    assert "Test:" not in (ddp_dir / "train_ddp_process_1.log").read_text()


def torchrun(tmp_path: Path, images: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(ROOT / "train.py"),
        *COMMON,
        f"data.root={images}",
        "trainer=ddp",
        "trainer.devices=2",
        "data.batch_size=4",
        "schedule.stages.1.epochs=1",
        f"paths.log_dir={tmp_path / 'out'}",
        *overrides,
    ]
    return subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)


def test_torchrun_recipe_needs_and_uses_one_shared_run_directory(tmp_path: Path) -> None:
    images = write_image_folder(tmp_path / "images", per_class=10)
    apart = torchrun(tmp_path, images)  # each process would pick its own timestamped directory
    output = apart.stdout[-3000:] + apart.stderr[-5000:]
    assert apart.returncode != 0, output
    assert "hydra.run.dir=" in apart.stdout + apart.stderr, output
    shared = torchrun(tmp_path, images, f"hydra.run.dir={tmp_path / 'out' / 'runs' / 'job-1'}")
    assert shared.returncode == 0, shared.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "runs" / "job-1" / "results.json").read_text())
    assert all(stage["distributed"]["identical"] for stage in results["stages"])


def test_small_uneven_data_on_two_processes_trains_every_epoch_and_evaluates_each_image_once(tmp_path: Path) -> None:
    # 37 training, 1 validation and 5 test images on 2 processes, batch 32: each process's share of
    # training (19) is below the batch size, one process has no validation image of its own, and
    # BatchNorm trains in a stage whose last epoch has no validation (check_val_every_n_epoch=2).
    folder = write_image_folder(tmp_path / "images", per_class=22)
    paths = sorted(folder.rglob("*.png"))
    splits = ["train"] * 37 + ["val"] + ["test"] * 5
    order = np.random.default_rng(0).permutation(len(paths))[: len(splits)]
    manifest = tmp_path / "labels.csv"
    manifest.write_text(
        "path,label,split\n"
        + "".join(f"{paths[i]},{paths[i].parent.name},{split}\n" for i, split in zip(order, splits))
    )
    results, run_dir = run(
        tmp_path,
        "odd",
        "data=csv",
        f"data.csv={manifest}",
        "data.source.split_column=split",
        "trainer=ddp",
        "trainer.devices=2",
        "data.batch_size=32",
        "augment=none",
        "schedule.stages.1.freeze_bn=false",
        "schedule.stages.1.epochs=3",
        "+trainer.check_val_every_n_epoch=2",
        "trainer.log_every_n_steps=1",
    )
    assert [sum(results["split_counts"][s].values()) for s in ("train", "val", "test")] == [37, 1, 5]
    assert all(stage["distributed"]["identical"] for stage in results["stages"])
    with open(run_dir / "metrics.csv") as stream:
        rows = list(csv.DictReader(stream))
    train_steps = [r for r in rows if r.get("train/loss_step")]
    assert len(train_steps) == 1 + 3  # one step in each of the 4 epochs: none was empty
    assert sum(sum(row) for row in results["confusion_matrix"]) == 5  # every test image once, no padding
    single = subprocess.run(
        [
            sys.executable,
            str(ROOT / "evaluate.py"),
            f"ckpt={results['best_checkpoint']['path']}",
            f"hydra.run.dir={tmp_path / 'eval'}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert evaluated["confusion_matrix"] == results["confusion_matrix"]
    assert evaluated["metrics"]["acc"] == pytest.approx(results["test"]["acc"], abs=1e-6)


def test_balanced_sampler_on_two_processes_matches_one_process_at_the_same_global_batch(tmp_path: Path) -> None:
    # 8 cats and 24 dogs: the balanced draws repeat cats; both processes must share one global draw.
    images = write_image_folder(tmp_path / "images", per_class=8)
    rng = np.random.default_rng(2)
    for index in range(16):
        make_image(1, 40, rng).save(images / "dog" / f"extra_{index}.png")
    common = [f"data.root={images}", "data.sampler=balanced", "data.split.test=0.25"]
    ddp_results, ddp_dir = run(tmp_path, "ddp", *common, "trainer=ddp", "trainer.devices=2", "data.batch_size=4")
    single_results, single_dir = run(tmp_path, "single", *common, "data.batch_size=8")
    ddp_weights, single_weights = weights(ddp_dir), weights(single_dir)
    for key in ddp_weights:
        torch.testing.assert_close(ddp_weights[key], single_weights[key], rtol=1e-5, atol=1e-6, msg=key)
    assert all(stage["distributed"]["identical"] for stage in ddp_results["stages"])


def test_cross_validation_runs_its_folds_on_two_processes(tmp_path: Path) -> None:
    images = write_image_folder(tmp_path / "images", per_class=10)
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            *COMMON,
            f"data.root={images}",
            "trainer=ddp",
            "trainer.devices=2",
            "data.batch_size=4",
            "cv.folds=2",
            f"paths.log_dir={tmp_path / 'cv'}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    (cv_dir,) = run_folders(tmp_path / "cv" / "runs")
    summary = json.loads((cv_dir / "cv_summary.json").read_text())
    assert summary["folds"] == 2 and summary["test_images"] == 4
    for fold in range(2):
        fold_results = json.loads((cv_dir / f"fold_{fold}" / "results.json").read_text())
        assert fold_results["world_size"] == 2
        assert all(stage["distributed"]["identical"] for stage in fold_results["stages"])


# Counts whose training split gives both runs the same global batches (26 images: 3 steps of 8) and
# whose validation split (3 images) is padded on 2 processes.
@pytest.mark.parametrize("task, column, count", [("multilabel", "tags", 36), ("regression", "value", 37)])
def test_tags_and_values_on_two_processes_match_one_process(task: str, column: str, count: int, tmp_path: Path) -> None:
    """Float targets: evaluation padding (NaN rows) counts nowhere, and what the task learns from the
    whole validation split (per-tag thresholds) is the same on both processes and as on one."""
    from tests.fixtures import write_tagged_images

    labels = write_tagged_images(tmp_path / "images", count=count)
    common = [
        *(o for o in COMMON if o != "data=folder"),
        "data=csv",
        f"data.csv={labels}",
        f"data.source.label_column={column}",
        f"task={task}",
        "task.threshold=0.5" if task == "regression" else "task.pos_weight=balanced",
    ]

    def launch(name: str, *overrides: str) -> tuple[dict, Path]:
        done = subprocess.run(
            [sys.executable, str(ROOT / "train.py"), *common, *overrides, f"paths.log_dir={tmp_path / name}"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
        (run_dir,) = run_folders(tmp_path / name / "runs")
        return json.loads((run_dir / "results.json").read_text()), run_dir

    ddp_results, ddp_dir = launch("ddp", "trainer=ddp", "trainer.devices=2", "data.batch_size=4")
    single_results, single_dir = launch("single", "data.batch_size=8")
    ddp_weights, single_weights = weights(ddp_dir), weights(single_dir)
    for key in ddp_weights:
        torch.testing.assert_close(ddp_weights[key], single_weights[key], rtol=1e-5, atol=1e-6, msg=key)
    assert ddp_results["test"].keys() == single_results["test"].keys()
    for metric, value in single_results["test"].items():
        assert ddp_results["test"][metric] == pytest.approx(value, abs=1e-5), metric
    learnt = "mean" if task == "regression" else "thresholds"  # scaling from training rows, thresholds from val
    assert ddp_results["task_state"][learnt] == pytest.approx(single_results["task_state"][learnt], abs=1e-5)
