"""How the golden fixtures in this folder were recorded: by the code of commit 9db41d8, before the
package was reorganised (issue 23). It imports that commit's module paths and runs only there:

    git checkout 9db41d8 && python tests/golden/record_at_9db41d8.py   # (writes tests/golden/)

Kept for the record of what each file holds; `tests/test_golden.py` checks the current code against
the files. Not collected by pytest, not type-checked (the modules it imports no longer exist).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from panel_data import BUILDERS  # noqa: E402

from tests.conftest import FAST, compose_config, write_image_folder  # noqa: E402

# Where the golden run folder lived when it was recorded: its checkpoints name files there.
RUN_ROOT = Path("/tmp/transfer_golden_9db41d8")

PANEL_SPLITS = {
    "elpv_defective": (["data=elpv"], (42,)),
    "elpv_severity": (["data=elpv_severity"], (42,)),
    "elpv_cell_type": (["data=elpv_cell_type"], (42,)),
    "elpv_probability": (["data=elpv_probability", "task=regression", "task.threshold=0.5"], (42,)),
    "elpv_tags": (["data=elpv_tags", "task=multilabel"], (42,)),
    "characters": (["data=folder"], (42,)),
    "faces_few": (["data=folder"], (42, 43, 44, 45, 46)),
}


def record_splits(work: Path) -> None:
    """The seed-42 (faces: 42-46) split of each panel set: relative path, label text, split."""
    from transfer.data.sources import subsample
    from transfer.data.splits import split_indices

    out = GOLDEN / "splits"
    out.mkdir(parents=True, exist_ok=True)
    for name, (overrides, seeds) in PANEL_SPLITS.items():
        extra = []
        if name in BUILDERS:
            root = work / name
            if not root.exists():
                BUILDERS[name](root)
            extra = [f"data.root={root}"]
        for seed in seeds:
            cfg = compose_config([*overrides, *extra, f"seed={seed}"])
            task = instantiate(cfg.task)
            table = subsample(task.arrange(instantiate(cfg.data.source)), cfg.data.get("max_images"), seed)
            splits = split_indices(table.stratify_on(), cfg.data.test_fraction, cfg.data.val_fraction, seed,
                                   table.splits)
            base = Path(table.paths[0]).parents[1] if name.startswith("elpv") else root
            rows = sorted((str(Path(table.paths[i]).relative_to(base)), table.label_text(i), split)
                          for split, indices in splits.items() for i in indices)
            target = out / f"{name}-seed{seed}.csv.gz"
            with gzip.open(target, "wt", newline="") as stream:
                writer = csv.writer(stream)
                writer.writerow(["path", "label", "split"])
                writer.writerows(rows)
            print(target, {s: len(v) for s, v in splits.items()})


class RecordLRs(L.Callback):
    """Every param group's lr at the start of every training batch, per stage, into ``path``."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        stage = pl_module.stage.name
        record = json.loads(self.path.read_text()) if self.path.exists() else {}
        record.setdefault(stage, []).append([group["lr"] for group in trainer.optimizers[0].param_groups])
        self.path.write_text(json.dumps(record))


LR_RUNS = {
    "two_stage": ["schedule=two_stage"],
    "gradual": ["schedule=gradual"],
    "full": ["schedule=full"],
    "head_only": ["schedule=head_only"],
    # layer-wise decay: one lr per block group, each on its own warm-up and cosine curve
    "two_stage_layer_decay": ["schedule=two_stage", "+schedule.stages.1.layer_decay=0.7"],
}
LR_COMMON = ["backbone=timm", "backbone.name=test_resnet", "backbone.pretrained=false", "input.size=32",
             "augment=none", "data.num_workers=0", "data.batch_size=8", "trainer.enable_progress_bar=false",
             "trainer.log_every_n_steps=1"]


def record_lr_curves(work: Path) -> None:
    """Each default schedule on 32 small images (3 steps an epoch: min_steps raises its epochs)."""
    from transfer.run import train

    images = write_image_folder(work / "lr_images", per_class=16)
    curves, results = {}, {}
    for name, overrides in LR_RUNS.items():
        path = work / f"lrs-{name}.json"
        path.unlink(missing_ok=True)
        cfg = compose_config([*LR_COMMON, *overrides, "data=folder", f"data.root={images}",
                              "+callbacks.lrs._target_=tests.golden.record_at_9db41d8.RecordLRs",
                              f"+callbacks.lrs.path={path}"], work / f"lr-run-{name}")
        run = train(cfg)
        curves[name] = json.loads(path.read_text())
        results[name] = {"test": run["test"], "epochs": [s["epochs"] for s in run["stages"]],
                         "best": run["best_checkpoint"]["score"]}
        print(name, {k: len(v) for k, v in curves[name].items()}, run["test"])
    (GOLDEN / "lr_curves.json").write_text(json.dumps({"curves": curves, "runs": results}, indent=1))


def record_samplers() -> None:
    """Training (shuffle, balanced) and evaluation indices on 1 and 2 processes, epochs 0-2."""
    from transfer.data.datamodule import ImageDataModule
    from transfer.data.sources import ImageTable
    from transfer.data.transforms import eval_transform

    class Processes:
        def __init__(self, world_size: int, global_rank: int) -> None:
            self.world_size, self.global_rank = world_size, global_rank

    # 37 training images (28 of class 0, 9 of class 1), 5 validation images: uneven on 2 processes.
    labels = np.array([0] * 28 + [1] * 9 + [0, 1, 0, 1, 0])
    splits = np.array(["train"] * 37 + ["val"] * 5, dtype=object)
    table = ImageTable([f"{i:03d}.png" for i in range(42)], labels, ["a", "b"], splits, name="samplers")
    transform = eval_transform({"size": [8, 8], "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 1.0,
                                "interpolation": "bilinear"})
    record = {}
    for sampler in ("shuffle", "balanced"):
        datamodule = ImageDataModule(table, transform, transform, (8, 8), batch_size=4, num_workers=0,
                                     test_fraction=0.0, val_fraction=0.0, seed=42, sampler=sampler)
        for world in (1, 2):
            for rank in range(world):
                for split in ("train", "val"):
                    loader = datamodule.loader(datamodule.dataset(split), split == "train", Processes(world, rank))
                    for epoch in range(3):
                        if hasattr(loader.sampler, "set_epoch"):
                            loader.sampler.set_epoch(epoch)
                        key = f"{sampler}/{split}/world{world}/rank{rank}/epoch{epoch}"
                        record[key] = {"indices": list(map(int, loader.sampler)), "dataset": len(loader.dataset),
                                       "drop_last": loader.drop_last}
    (GOLDEN / "samplers.json").write_text(json.dumps(record, indent=0))


class CrashInStage(L.Callback):
    def __init__(self, stage_index: int, epoch: int) -> None:
        self.stage_index, self.epoch = stage_index, epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if pl_module.stage_index == self.stage_index and trainer.current_epoch == self.epoch:
            raise RuntimeError("simulated crash")


# The golden run: FAST (two 1-epoch stages) with test_efficientnet, 2 epochs in stage 2, no augmentation.
RUN = [*FAST, "backbone.name=test_efficientnet", "schedule.stages.1.epochs=2", "augment=none", "data=folder"]


def digest(state: dict[str, torch.Tensor]) -> dict[str, str]:
    return {k: hashlib.sha256(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
            for k, v in state.items()}


def record_run() -> None:
    """A run interrupted in stage 2 (its folder as it was left), the same run uninterrupted, and what
    evaluate and predict answered for its head checkpoint."""
    from safetensors.torch import save_file

    from transfer.evaluate import evaluate
    from transfer.predict import predict
    from transfer.run import train
    from tests.conftest import command_config

    shutil.rmtree(RUN_ROOT, ignore_errors=True)
    images = write_image_folder(RUN_ROOT / "images", per_class=16)
    crash = ["+callbacks.crash._target_=tests.golden.record_at_9db41d8.CrashInStage",
             "+callbacks.crash.stage_index=1", "+callbacks.crash.epoch=1"]
    try:
        train(compose_config([*RUN, f"data.root={images}", *crash], RUN_ROOT / "run"))
    except RuntimeError as error:
        assert "simulated crash" in str(error)
    full = train(compose_config([*RUN, f"data.root={images}"], RUN_ROOT / "full"))
    state = torch.load(RUN_ROOT / "full" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    expected = GOLDEN / "run_expected"
    expected.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state["state_dict"].items()}, expected / "full_last_weights.safetensors")
    (expected / "full_results.json").write_text(json.dumps(
        {"test": full["test"], "best_checkpoint": full["best_checkpoint"], "stages":
         [{k: s[k] for k in ("name", "epochs", "lr", "trainable_params", "epochs_run")} for s in full["stages"]],
         "confusion_matrix": full["confusion_matrix"], "digest": digest(state["state_dict"])}, indent=1))
    (head,) = (RUN_ROOT / "run" / "checkpoints").glob("head-*.ckpt")
    report = evaluate(command_config("evaluate", RUN_ROOT / "eval", [f"ckpt={head}"]))
    (expected / "evaluate_head.json").write_text(json.dumps(report, indent=1))
    predict(command_config("predict", RUN_ROOT / "predict", [f"ckpt={head}", f"inputs={images}"]))
    shutil.copy(RUN_ROOT / "predict" / "predictions.csv", expected / "predict_head.csv")
    # The interrupted run's folder, as it was left, and the images it read.
    target = GOLDEN / "run"
    shutil.rmtree(target, ignore_errors=True)
    shutil.copytree(RUN_ROOT / "run", target, ignore=shutil.ignore_patterns("metrics.csv"))
    shutil.copytree(images, GOLDEN / "images", dirs_exist_ok=True)
    (GOLDEN / "overrides.json").write_text(json.dumps({"run": RUN, "crash": crash, "recorded_at": str(RUN_ROOT)}))


if __name__ == "__main__":
    print(subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout)
    work = Path("/tmp/golden_work")
    work.mkdir(exist_ok=True)
    record_samplers()
    record_splits(work)
    record_lr_curves(work)
    record_run()
