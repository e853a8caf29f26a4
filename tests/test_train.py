"""Real short trainings through the Python API (`transfer.fine_tune`), the job train.py runs."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from tests.fixtures import FAST, ROOT, compose_config, run_folders, train_config, train_run, write_image_folder
from transfer import fine_tune
from transfer.errors import TransferError
from transfer.training.plan import load_plan

HEAD_ONLY = [o for o in FAST if not o.startswith("schedule.")] + [
    "schedule=head_only",
    "schedule.stages.0.epochs=1",
    "schedule.min_steps=0",
]


def test_two_stage_run_writes_a_complete_run_directory(image_folder: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cfg = compose_config([*FAST, "data=folder", f"data.root={image_folder}"], output_dir=run_dir)
    results = train_config(cfg)

    saved = json.loads((run_dir / "results.json").read_text())
    assert saved["test"] == results["test"]
    assert set(saved["test"]) >= {"acc", "f1", "auroc", "loss"}
    assert [s["name"] for s in saved["stages"]] == ["head", "finetune"]
    assert saved["stages"][0]["trainable_params"] < saved["stages"][1]["trainable_params"]
    assert sum(map(sum, saved["confusion_matrix"])) == sum(saved["split_counts"]["test"].values())
    assert (run_dir / "config.yaml").read_text().count("size:") >= 1
    assert Path(saved["best_checkpoint"]["path"]).is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    with open(run_dir / "metrics.csv") as stream:
        rows = list(csv.DictReader(stream))
    assert {row["stage"] for row in rows if row.get("val/acc")} == {"0.0", "1.0"}  # as schedule.stages.N counts

    checkpoint = torch.load(saved["best_checkpoint"]["path"], map_location="cpu", weights_only=False)
    assert checkpoint["transfer"]["class_names"] == ["cat", "dog"]
    assert checkpoint["transfer"]["backbone"] == "test_resnet"


def test_a_run_never_reuses_a_directory(image_folder: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = [*HEAD_ONLY, "data=folder", f"data.root={image_folder}"]
    train_run(overrides, run_dir)
    before = (run_dir / "results.json").read_bytes()
    with pytest.raises(TransferError, match="already holds a run"):
        train_run(overrides, run_dir)
    assert (run_dir / "results.json").read_bytes() == before


def elpv_run(tmp_path: Path, name: str, pretrained: bool) -> dict:
    overrides = [
        "data.max_images=480",
        "input.size=128",
        "data.num_workers=0",
        f"backbone.weights={'auto' if pretrained else 'none'}",
        "schedule.stages.0.epochs=1",
        "schedule.stages.1.epochs=2",
        "trainer.enable_progress_bar=false",
        "schedule.min_steps=0",
    ]
    return train_run(overrides, tmp_path / name)


@pytest.mark.slow
def test_pretrained_weights_beat_random_init_on_elpv(tmp_path: Path) -> None:
    """The packaged ImageNet weights are really used: same run, same data, same seed."""
    pretrained = elpv_run(tmp_path, "pretrained", True)["test"]
    scratch = elpv_run(tmp_path, "scratch", False)["test"]
    assert pretrained["auroc"] > scratch["auroc"] + 0.1, (pretrained, scratch)
    assert pretrained["acc"] > scratch["acc"], (pretrained, scratch)


def run_cli(*overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *overrides, f"paths.log_dir={cwd}"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_cli_runs_and_each_run_gets_its_own_directory(image_folder: Path, tmp_path: Path) -> None:
    args = [*HEAD_ONLY, "data=folder", f"data.root={image_folder}"]
    first = run_cli(*args, cwd=tmp_path)
    second = run_cli(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    assert second.returncode == 0, second.stderr[-3000:]
    results = [run / "results.json" for run in run_folders(tmp_path / "runs")]
    assert len(results) == 2
    assert "Test:" in (results[0].parent / "train.log").read_text()


@pytest.mark.slow
def test_cli_user_errors_are_one_paragraph_without_traceback(tmp_path: Path) -> None:
    done = run_cli("backbone=timm", "backbone.name=resnet_50", cwd=tmp_path)
    assert done.returncode == 1
    output = done.stdout + done.stderr
    assert "Unknown backbone 'resnet_50'" in output and "resnet50" in output
    assert "Traceback" not in output


class CrashInStage(__import__("lightning").Callback):
    """Simulates a crash at the start of an epoch of a given stage (after earlier epochs were saved)."""

    def __init__(self, stage_index: int, epoch: int) -> None:
        self.stage_index, self.epoch = stage_index, epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if pl_module.stage_index == self.stage_index and trainer.current_epoch == self.epoch:
            raise RuntimeError("simulated crash")


def test_resume_after_the_unfreeze_restores_the_stage_and_ends_identical(image_folder: Path, tmp_path: Path) -> None:
    # no random augmentation: then the only randomness is the data order, a function of (seed, epoch)
    overrides = [*FAST, "data=folder", f"data.root={image_folder}", "schedule.stages.1.epochs=2", "augment=none"]
    crash = [
        "+callbacks.crash._target_=tests.test_train.CrashInStage",
        "+callbacks.crash.stage_index=1",
        "+callbacks.crash.epoch=1",
    ]
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_run([*overrides, *crash], tmp_path / "crashed")
    last = tmp_path / "crashed" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=False)
    assert saved["transfer"]["stage_index"] == 1 and saved["epoch"] == 0

    resumed = train_run([*overrides, f"resume={last}"], tmp_path / "resumed")
    full = train_run(overrides, tmp_path / "full")
    assert [s["name"] for s in resumed["stages"]] == ["finetune"]  # stage 1 is not repeated
    # the same layers train after the resume as in the uninterrupted run's stage 2
    assert resumed["stages"][0]["trainable_params"] == full["stages"][1]["trainable_params"]
    # the resumed run's optimizer was restored into stage 2's param groups (same LR schedule)
    resumed_ckpt = torch.load(
        tmp_path / "resumed" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False
    )
    full_ckpt = torch.load(tmp_path / "full" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert resumed_ckpt["epoch"] == full_ckpt["epoch"] == 1
    lrs = [[g["lr"] for g in c["optimizer_states"][0]["param_groups"]] for c in (resumed_ckpt, full_ckpt)]
    assert lrs[0] == pytest.approx(lrs[1])
    # and it ends with the same weights as the run that was never interrupted
    for key, value in full_ckpt["state_dict"].items():
        torch.testing.assert_close(resumed_ckpt["state_dict"][key], value, rtol=1e-6, atol=1e-7, msg=key)
    # the best checkpoint of stage 1 (before the crash) still competes for the final test
    kept = next(state for key, state in resumed_ckpt["callbacks"].items() if key.startswith("StageBests"))
    assert [b["stage"] for b in kept["records"]] == ["head"]


@pytest.mark.parametrize("workers", [0, 1])
def test_same_seed_gives_the_same_run_despite_random_augmentation(
    image_folder: Path, tmp_path: Path, workers: int
) -> None:
    def final_weights(name: str, seed: int) -> dict[str, torch.Tensor]:
        train_run(
            [
                *HEAD_ONLY,
                "data=folder",
                f"data.root={image_folder}",
                "augment=heavy",
                f"data.num_workers={workers}",
                f"seed={seed}",
            ],
            tmp_path / name,
        )
        return torch.load(tmp_path / name / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]

    first, again, other_seed = final_weights("a", 1), final_weights("b", 1), final_weights("c", 2)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other_seed[k]) for k in first)


def test_lr_finder_sets_the_first_stages_lr_and_saves_its_plot(image_folder: Path, tmp_path: Path) -> None:
    overrides = [*FAST, "data=folder", f"data.root={image_folder}", "lr_find.enabled=true", "lr_find.num_training=24"]
    cfg = compose_config(overrides)
    result = fine_tune(overrides, run_dir=tmp_path)
    head, finetune = result.results["stages"]
    search = result.results["lr_find"]
    assert search["replaced_lr"] == cfg.schedule.stages[0].lr
    assert head["lr"] == search["suggestion"] != cfg.schedule.stages[0].lr
    assert finetune["lr"] == cfg.schedule.stages[1].lr and search["later_stages"] == {}
    # the plan holds the found lr before the first fit, and says where it came from
    assert result.plan.stages[0].lr == search["suggestion"] and any("lr_find" in n for n in result.plan.notes)
    # The head-only stage searched on cached features, then trained on augmented images.
    assert search["on_features"] and not head["feature_cache"]
    assert Image.open(tmp_path / "lr_find.png").size[0] > 300
    assert not list(tmp_path.glob(".lr_find*.ckpt"))  # Lightning's temporary checkpoint is gone


@pytest.mark.slow  # end to end, twice over: in CI, not in the developer's loop
def test_lr_finder_can_scale_the_later_stages_by_the_same_factor(image_folder: Path, tmp_path: Path) -> None:
    overrides = [
        *FAST,
        "data=folder",
        f"data.root={image_folder}",
        "lr_find.enabled=true",
        "lr_find.num_training=24",
        "lr_find.scale_later_stages=true",
        "lr_find.on_features=false",
    ]
    cfg = compose_config(overrides)
    results = train_run(overrides, tmp_path)
    head, finetune = results["stages"]
    factor = head["lr"] / cfg.schedule.stages[0].lr
    assert not results["lr_find"]["on_features"]  # searched on images, as asked
    assert finetune["lr"] == pytest.approx(cfg.schedule.stages[1].lr * factor)
    assert results["lr_find"]["later_stages"] == {"finetune": pytest.approx(finetune["lr"])}


class ConstantLoss(L.LightningModule):
    """A loss of exactly 0.7 whatever the learning rate: an unbiased running average stays 0.7."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def training_step(self, batch, batch_idx):
        return self.weight.sum() * 0 + 0.7

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.zeros(64, 1), batch_size=1)


def test_lr_finder_curve_is_corrected_for_lightnings_smoothing_bias(tmp_path: Path) -> None:
    """If Lightning fixes its bias correction, this fails and `unbiased` must go."""
    from lightning.pytorch.tuner import Tuner

    from transfer.compat import unbiased_lr_finder_losses as unbiased

    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_epochs=5,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    finder = Tuner(trainer).lr_find(ConstantLoss(), num_training=40, update_attr=False)
    raw = finder.results["loss"]
    assert raw[0] == pytest.approx(0.7 * 0.02 / (1 - 0.98**2))  # about half the loss: the bias
    assert unbiased(raw) == pytest.approx([0.7] * len(raw))


def test_valley_suggestion_ignores_noise_on_a_flat_start_where_steepest_does_not() -> None:
    """A finder curve like ELPV's: flat and noisy, a long descent from 1e-3 to 5e-2, then divergence."""
    from transfer.training.lr_find import valley

    lrs = list(np.logspace(-6, 0, 100))
    rng = np.random.default_rng(0)
    losses = [
        0.68 + 0.01 * rng.standard_normal()
        if lr < 1e-3
        else 0.68 - 0.12 * np.log10(lr / 1e-3) / np.log10(50)
        if lr < 5e-2
        else 0.56 + 2.0 * (lr - 5e-2)
        for lr in lrs
    ]
    steepest = int(np.argmin(np.gradient(np.array(losses))))
    assert lrs[steepest] < 1e-3  # a noise step wins the steepest-gradient rule
    assert 1e-3 < lrs[valley(lrs, losses)] < 5e-2


def test_fine_tune_returns_the_run_folder_best_checkpoint_test_metrics_and_plan(
    image_folder: Path, tmp_path: Path
) -> None:
    result = fine_tune([*HEAD_ONLY, "data=folder", f"data.root={image_folder}"], run_dir=tmp_path / "run")
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert result.run_dir == tmp_path / "run" and result.test == saved["test"] and result.test["acc"] >= 0.5
    assert result.checkpoint == tmp_path / "run" / "checkpoints" / "best.ckpt" == Path(saved["checkpoint"])
    assert result.checkpoint.read_bytes() == Path(saved["best_checkpoint"]["path"]).read_bytes()
    assert result.plan == load_plan(tmp_path / "run")  # plan.json reads back as the plan that ran
    assert [stage.name for stage in result.plan.stages] == ["head"] and result.plan.data.split_sizes["test"] == 6
    assert "Plan (plan.json" in (tmp_path / "run" / "train.log").read_text()  # printed at the start
    checkpoint = torch.load(result.checkpoint, map_location="cpu", weights_only=True)
    assert checkpoint["transfer"]["plan"]["stages"][0]["name"] == "head"  # every checkpoint carries it


def test_plan_only_plans_and_trains_nothing(image_folder: Path, tmp_path: Path) -> None:
    result = fine_tune([*FAST, "data=folder", f"data.root={image_folder}", "plan_only=true"], run_dir=tmp_path)
    assert result.checkpoint is None and result.test == {} and result.plan is not None
    assert result.plan == load_plan(tmp_path)
    assert [stage.epochs for stage in result.plan.stages] == [1, 1]
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "results.json").exists()


def test_epochs_set_by_the_user_run_as_written_and_schedule_defaults_reach_min_steps(tmp_path: Path) -> None:
    """A 20-image folder: 16 training images, batch 32: one optimizer step an epoch."""
    images = write_image_folder(tmp_path / "images", per_class=10)
    small = [o for o in FAST if not o.startswith("schedule.")] + ["data=folder", f"data.root={images}", "augment=none"]
    mine = fine_tune(
        [*small, "data.batch_size=32", "schedule.stages.0.epochs=2", "schedule.stages.1.epochs=2"],
        run_dir=tmp_path / "mine",
    )
    assert [s["epochs_run"] for s in mine.results["stages"]] == [2, 2]
    assert not any("min_steps" in note for note in mine.plan.notes)
    assert "min_steps" not in (tmp_path / "mine" / "train.log").read_text()
    defaults = fine_tune(
        [*small, "data.batch_size=32", "schedule.min_steps=5", "schedule.stages.1.epochs=2"],
        run_dir=tmp_path / "defaults",
    )
    # the schedule's 2 head epochs are raised to 5 one-step epochs; the finetune epochs set here are not
    assert [s.epochs for s in defaults.plan.stages] == [5, 2]
    assert [s["epochs_run"] for s in defaults.results["stages"]] == [5, 2]
    note, patience = defaults.plan.notes
    assert patience.startswith("patience auto: 10 epoch(s) for 2 validation image(s)")  # 10 one-step epochs
    assert note.startswith("stage 0 'head': 2 epoch(s) of 1 step(s) are fewer than schedule.min_steps=5")
    assert "fewer than schedule.min_steps=5" in (tmp_path / "defaults" / "train.log").read_text()
