"""Training speed of the toolkit against a plain PyTorch loop, stage by stage, in one table.

Both sides run the same model, batch size, resolution, data (the toolkit's ELPV dataset: decode,
augment, collate in the configured DataLoader workers), threads and process settings
(channels_last, glibc malloc tuning); the plain loop is written below with no Lightning and no
Hydra. Each cell runs in its own process, so its peak memory is its own.

    python benchmarks/speed.py [--model tf_efficientnet_lite0] [--batch 32] [--size 224]
                               [--unfreeze 3] [--steps 8] [--compile] [--trainer cpu|gpu] [--probe-only]

Rows: the data pipeline alone; head-only, partial and full fine-tuning (toolkit vs plain loop);
a head-only stage without random augmentation, with and without the feature cache; the frozen
forward pass on images in memory (the limit of any feature pass) and the augment=auto probe's feature
pass (each image decoded once, seven views) in the main process and in the loader workers.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
STAGES = [("head only", 0), ("partial", None), ("full", "all")]  # None: --unfreeze blocks
# The cells' run folders: removed when the process that made them exits.
SCRATCH = tempfile.TemporaryDirectory(prefix="speed-")


def compose(args: argparse.Namespace, unfreeze: int | str, extra: list[str] = ()) -> Any:
    from transfer.config.compose import compose as compose_config

    overrides = [
        f"trainer={args.trainer}",
        "schedule=head_only",
        f"schedule.stages.0.unfreeze={unfreeze}",
        f"data.batch_size={args.batch}",
        f"input.size={args.size}",
        "logger=csv",
        "runtime.image_check=false",
        "schedule.min_steps=0",
        *([f"data.num_workers={args.workers}"] if args.workers is not None else []),
        *extra,
    ]
    if args.model != "tf_efficientnet_lite0":
        overrides += ["backbone=timm", f"backbone.name={args.model}", "backbone.weights=none"]  # speed only
    return compose_config("train", overrides, output_dir=tempfile.mkdtemp(dir=SCRATCH.name))


def setup(cfg: Any) -> tuple[Any, Any]:
    """The toolkit's own module and datamodule for this config, as ``train.py`` plans them."""
    import torch

    from transfer.training.planner import plan_run
    from transfer.training.runtime import configure_process

    configure_process(cfg.runtime.malloc_tuning)
    torch.manual_seed(0)
    planned = plan_run(cfg, [], time.perf_counter())
    planned.module.set_stage(planned.plan.stages[0], 0)
    return planned.module, planned.datamodule


def peak_memory() -> dict[str, float]:
    import torch

    memory = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available():
        memory["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return memory


def data_cell(args: argparse.Namespace, workers: int) -> dict[str, float]:
    """Decode + augment + collate only: how fast the DataLoader can feed the model."""
    cfg = compose(args, 0, [f"data.num_workers={workers}"])  # after --workers: this cell's own count
    _, datamodule = setup(cfg)
    batches = iter(datamodule.train_dataloader())
    for _ in range(args.warmup):
        next(batches)
    started = time.perf_counter()
    for _ in range(args.steps):
        next(batches)
    return {"images_per_s": args.steps * args.batch / (time.perf_counter() - started), **peak_memory()}


def toolkit_cell(args: argparse.Namespace, unfreeze: int | str, extra: list[str] = ()) -> dict[str, float]:
    """One stage through the toolkit: Lightning Trainer, ClassifierModule, ImageDataModule, logger."""
    import lightning as L
    from hydra.utils import instantiate
    from omegaconf import open_dict

    from transfer.training.fit import instantiate_named

    class StepTimer(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            if batch_idx == args.warmup:
                self.started = time.perf_counter()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            self.finished, self.batches = time.perf_counter(), batch_idx + 1 - args.warmup

    cfg = compose(args, unfreeze, extra)
    with tempfile.TemporaryDirectory() as run_dir:
        with open_dict(cfg):
            cfg.paths.output_dir = run_dir
        module, datamodule = setup(cfg)
        timer = StepTimer()
        trainer = instantiate(
            cfg.trainer,
            max_epochs=1,
            limit_train_batches=args.warmup + args.steps,
            limit_val_batches=0,
            enable_checkpointing=False,
            logger=instantiate_named(cfg, "logger"),
            callbacks=[timer],
            default_root_dir=run_dir,
        )
        trainer.fit(module, datamodule=datamodule)
    return {"images_per_s": timer.batches * args.batch / (timer.finished - timer.started), **peak_memory()}


def forward_cell(args: argparse.Namespace) -> dict[str, float]:
    """The frozen backbone's pooled features on preprocessed images already in memory, at the
    evaluation batch size: the limit any feature pass (the augmentation probe's) can reach."""
    import torch

    from transfer.model.features import pooled_features

    cfg = compose(args, 0, ["augment=none"])
    module, datamodule = setup(cfg)
    model = module.model.eval()
    batches = [images for images, _ in datamodule.loader(datamodule.dataset("train"), False, None)][
        : args.warmup + args.steps
    ]
    with torch.inference_mode():
        for images in batches[: args.warmup]:
            pooled_features(model, images.contiguous(memory_format=torch.channels_last))
        started = time.perf_counter()
        for images in batches[args.warmup :]:
            pooled_features(model, images.contiguous(memory_format=torch.channels_last))
        seconds = time.perf_counter() - started
    return {"images_per_s": sum(len(b) for b in batches[args.warmup :]) / seconds, **peak_memory()}


def probe_cell(args: argparse.Namespace, workers: int) -> dict[str, float]:
    """augment=auto's feature pass (`transfer.augment.probe_views`) over ELPV images: each decoded
    once, the originals and the six candidate views, in the data config's loader workers."""
    from transfer.augment.probe import ProbeSettings, probe_pipelines
    from transfer.augment.probe_views import view_features

    cfg = compose(args, 0, ["augment=none"])
    module, datamodule = setup(cfg)
    input_config = module.hparams["input_config"]
    pipelines = probe_pipelines(input_config, ProbeSettings(), 0)
    images = args.batch * (args.steps + args.warmup) // len(pipelines)
    paths = [datamodule.table.paths[i] for i in datamodule.splits["train"][: images + 8]]
    square = input_config["size"][0] == input_config["size"][1]
    view_features(module.model, paths[-8:], pipelines, 0, args.batch, workers, True, square)  # warm-up
    started = time.perf_counter()
    view_features(module.model, paths[:images], pipelines, 0, args.batch, workers, True, square)
    seconds = time.perf_counter() - started
    return {"images_per_s": images * len(pipelines) / seconds, **peak_memory()}


def cached_cell(args: argparse.Namespace) -> dict[str, float]:
    """A head-only stage on cached features: the one-off extraction, then whole epochs."""
    import lightning as L
    from hydra.utils import instantiate

    from transfer.training.feature_cache import FeatureDataModule

    class EpochTimer(L.Callback):
        seconds: list[float] = []

        def on_train_epoch_start(self, trainer, module) -> None:
            self.started = time.perf_counter()

        def on_train_epoch_end(self, trainer, module) -> None:
            self.seconds.append(time.perf_counter() - self.started)

    cfg = compose(args, 0, ["augment=none", "feature_cache=true"])
    module, images = setup(cfg)
    module.set_stage(module.stage, 0, features_cached=True)
    features = FeatureDataModule(images, module.model, module.channels_last)
    started = time.perf_counter()
    features.setup("fit")
    extraction = time.perf_counter() - started
    timer = EpochTimer()
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = instantiate(
            cfg.trainer,
            max_epochs=4,
            limit_val_batches=0,
            enable_checkpointing=False,
            logger=False,
            callbacks=[timer],
            default_root_dir=run_dir,
        )
        trainer.fit(module, datamodule=features)
    later = sorted(timer.seconds[1:])[len(timer.seconds[1:]) // 2]  # median epoch after the first
    images_per_epoch = len(features.cached["train"]) // args.batch * args.batch
    return {"images_per_s": images_per_epoch / later, "extraction_s": extraction, **peak_memory()}


def plain_cell(args: argparse.Namespace, unfreeze: int | str) -> dict[str, float]:
    """The same stage as a hand-written loop: a DataLoader over the same dataset, AdamW, backward."""
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader

    from transfer.model.freezing import freeze_frozen_modules, set_trainable

    cfg = compose(args, unfreeze)
    module, datamodule = setup(cfg)  # the same model object and dataset; nothing of Lightning runs
    model = module.model
    device = torch.device("cuda" if args.trainer == "gpu" else "cpu")
    model.to(device)
    head_only = set_trainable(model, unfreeze).blocks == 0
    model.train()
    freeze_frozen_modules(model, norm_layers_too=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loader = DataLoader(
        datamodule.dataset("train"),
        batch_size=args.batch,
        shuffle=True,
        drop_last=True,
        num_workers=cfg.data.num_workers,
        persistent_workers=cfg.data.num_workers > 0,
        pin_memory=device.type == "cuda",
    )
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    batches = iter(loader)
    for step in range(args.warmup + args.steps):
        images, labels = next(batches)
        if step == args.warmup:
            started = time.perf_counter()
        images = images.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)
        labels = labels.to(device, non_blocking=True)
        with autocast:
            if head_only:
                with torch.no_grad():
                    features = model.forward_features(images)
                logits = model.forward_head(features)
            else:
                logits = model(images)
            loss = F.cross_entropy(logits, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return {"images_per_s": args.steps * args.batch / (time.perf_counter() - started), **peak_memory()}


def run_cell(args: argparse.Namespace, cell: list) -> dict[str, float]:
    command = [sys.executable, __file__, "--cell", json.dumps(cell)]
    for key in ("model", "batch", "size", "unfreeze", "steps", "warmup", "trainer", "workers"):
        if getattr(args, key) is not None:
            command += [f"--{key}", str(getattr(args, key))]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"cell {cell} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def in_child(args: argparse.Namespace) -> dict[str, float]:
    kind, value = json.loads(args.cell)
    if kind == "data":
        return data_cell(args, value)
    if kind == "cached":
        return cached_cell(args)
    if kind == "forward":
        return forward_cell(args)
    if kind == "probe":
        return probe_cell(args, value)
    if kind == "toolkit-noaug":
        return toolkit_cell(args, value, ["augment=none"])
    if kind == "toolkit-compiled":
        return toolkit_cell(args, value, ["runtime.compile=true"])
    return (toolkit_cell if kind == "toolkit" else plain_cell)(args, value)


def print_table(rows: list, memory_key: str, with_compile: bool) -> None:
    def rate(cell: dict | None) -> str:
        return f"{cell['images_per_s']:.1f}" if cell else ""

    def versus(cell: dict | None, base: dict | None) -> str:
        return f"{cell['images_per_s'] / base['images_per_s']:.2f}" if cell and base else ""

    header = ["stage / pipeline", "toolkit img/s", "plain loop img/s", "toolkit / plain"]
    header += ["toolkit + compile img/s", "compile / toolkit"] if with_compile else []
    header += ["toolkit peak MB", "plain peak MB"]
    print("| " + " | ".join(header) + " |")
    print("| --- |" + " ---: |" * (len(header) - 1))
    for name, toolkit, plain, compiled in rows:
        cols = [name, rate(toolkit), rate(plain), versus(toolkit, plain)]
        cols += [rate(compiled), versus(compiled, toolkit)] if with_compile else []
        cols += [f"{toolkit[memory_key]:.0f}", f"{plain[memory_key]:.0f}" if plain else ""]
        print("| " + " | ".join(cols) + " |")


def probe_rows(args: argparse.Namespace, workers: int, rows: list) -> tuple[dict, dict[int, dict]]:
    """The in-memory forward limit and the probe's feature pass (main process, and ``workers``
    loader workers), appended to ``rows``."""
    forward = run_cell(args, ["forward", 0])
    probes = {n: run_cell(args, ["probe", n]) for n in sorted({0, workers})}
    rows.append(("frozen forward pass, images in memory (the limit)", forward, None, None))
    for n, probe in probes.items():
        rows.append((f"augment=auto probe, 7 views an image, {n} worker(s)", probe, None, None))
    return forward, probes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--unfreeze", type=int, default=3, help="blocks unfrozen in the partial stage")
    parser.add_argument("--steps", type=int, default=8, help="timed batches per cell")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--trainer", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--workers", type=int, help="DataLoader workers (default: the data config's)")
    parser.add_argument("--compile", action="store_true", help="add a column: the toolkit with runtime.compile=true")
    parser.add_argument("--probe-only", action="store_true", help="only the forward limit and the probe's rows")
    parser.add_argument("--cell", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cell:
        print(json.dumps(in_child(args)))
        return

    import os

    from omegaconf import OmegaConf

    workers = args.workers if args.workers is not None else OmegaConf.load(ROOT / "conf/data/base.yaml").num_workers
    print(
        f"{args.model}, batch {args.batch}, {args.size}x{args.size}, {args.steps} timed batches per cell "
        f"after {args.warmup} warm-up, trainer={args.trainer}, {os.cpu_count()} CPUs, "
        f"{workers} DataLoader worker(s){', torch.compile' if args.compile else ''}\n",
        flush=True,
    )
    rows: list[tuple[str, dict, dict | None, dict | None]] = []  # name, toolkit, plain, compiled
    memory = "peak_cuda_mb" if args.trainer == "gpu" else "peak_rss_mb"
    if args.probe_only:
        forward, probes = probe_rows(args, workers, rows)
        print_table(rows, memory, False)
        print()
        for n, probe in probes.items():
            print(f"probe ({n} worker(s)) / forward limit: {probe['images_per_s'] / forward['images_per_s']:.2f}x")
        return
    for name, cell_workers in ((f"data pipeline, {workers} worker(s)", workers), ("data pipeline, main process", 0)):
        rows.append((name, run_cell(args, ["data", cell_workers]), None, None))
    stage_speed = {}
    for name, unfreeze in STAGES:
        unfreeze = args.unfreeze if unfreeze is None else unfreeze
        toolkit, plain = run_cell(args, ["toolkit", unfreeze]), run_cell(args, ["plain", unfreeze])
        compiled = run_cell(args, ["toolkit-compiled", unfreeze]) if args.compile else None
        stage_speed[name] = toolkit["images_per_s"]
        rows.append((f"{name} (unfreeze {unfreeze})", toolkit, plain, compiled))
    uncached = run_cell(args, ["toolkit-noaug", 0])
    cached = run_cell(args, ["cached", 0])
    rows.append(("head only, augment=none", uncached, None, None))
    rows.append(
        (
            f"head only, augment=none, feature cache (one-off extraction {cached['extraction_s']:.0f}s)",
            cached,
            None,
            None,
        )
    )
    forward, probes = probe_rows(args, workers, rows)
    print_table(rows, memory, args.compile)
    print()
    print(f"head only / full (toolkit): {stage_speed['head only'] / stage_speed['full']:.2f}x")
    print(
        f"feature cache / no cache (head only, augment=none): {cached['images_per_s'] / uncached['images_per_s']:.1f}x"
    )
    for n, probe in probes.items():
        print(f"probe ({n} worker(s)) / forward limit: {probe['images_per_s'] / forward['images_per_s']:.2f}x")
    fastest = max(stage_speed.values())
    print(
        f"data pipeline ({workers} worker(s)) / fastest stage's consumption: "
        f"{rows[0][1]['images_per_s'] / fastest:.2f}x"
    )


if __name__ == "__main__":
    main()
