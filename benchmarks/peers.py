"""Time to a good model: the toolkit's default against fastai's and AutoTimm's documented recipes.

Each tool trains the same backbone (EfficientNet-Lite0, the same packaged ImageNet weights) on the
same training, validation and test images (the toolkit's own split of the dataset, read from its
plan's ``split.csv``), on this machine, one tool after the other, each in its own process:

* ``transfer``: ``python train.py`` with nothing given but the dataset (the defaults);
* ``fastai``: its documented recipe, ``vision_learner(dls, arch, metrics=accuracy)`` and
  ``learn.fine_tune(epochs)`` (one frozen epoch, then ``epochs`` unfrozen), images resized to 224
  with ``aug_transforms()``, batch 32;
* ``autotimm``: its documented quick start, ``ImageClassifier`` (its defaults: AdamW, cosine,
  ``torch.compile``) and ``AutoTrainer`` (its learning-rate finder, the checkpoint on
  ``val/accuracy``), images at 224, batch 32.

Every epoch's validation accuracy is recorded with the wall-clock seconds since the tool's process
started (imports included), and each tool's final model is tested on the test images. Prints a table
and writes ``peers.json`` and ``peers.png`` (validation accuracy against minutes, the test accuracy
at the end of each curve) to ``--out``.

    pip install -e '.[peers]' -c constraints.txt       # fastai and AutoTimm: not needed otherwise
    python benchmarks/peers.py [--dataset elpv|characters] [--tools transfer fastai autotimm]
                               [--epochs 6] [--out outputs/peers]
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the toolkit and benchmarks.panel_data when run as a script

MODEL = "tf_efficientnet_lite0"
TOOLS = ("transfer", "fastai", "autotimm")


def data_overrides(dataset: str, out: Path) -> list[str]:
    """The toolkit's overrides for ``dataset``, as the panel names it (characters: its folder, built once)."""
    from benchmarks.panel import PANEL, dataset_overrides

    (spec,) = [spec for spec in PANEL if spec.name == {"elpv": "elpv_defective"}.get(dataset, dataset)]
    return dataset_overrides(spec, out)


def lightning_timeline(path: str, metric: str, started: float, package: str = "lightning") -> Any:
    """A Lightning callback appending each validation's ``metric`` and the seconds since ``started``
    to ``path`` (JSON lines); a subclass of ``package``'s Callback (the toolkit runs on
    ``lightning``, AutoTimm on ``pytorch_lightning``)."""
    base = importlib.import_module(package).Callback

    class Timeline(base):  # type: ignore[misc, valid-type]
        # After the epoch's validation (Lightning runs it inside the training epoch), when its
        # metrics are final: in on_validation_epoch_end a callback runs before they are.
        def on_train_epoch_end(self, trainer: Any, module: Any) -> None:
            if metric not in trainer.callback_metrics:
                return
            with open(path, "a") as stream:
                row = {"seconds": time.time() - float(started), "val_acc": float(trainer.callback_metrics[metric])}
                stream.write(json.dumps(row) + "\n")

    return Timeline()


def split_rows(split_csv: Path) -> dict[str, list[dict[str, str]]]:
    rows: dict[str, list[dict[str, str]]] = {"train": [], "val": [], "test": []}
    with open(split_csv) as stream:
        for row in csv.DictReader(stream):
            rows[row["split"]].append(row)
    return rows


def run_transfer(args: argparse.Namespace, out: Path, timeline: Path, started: float) -> dict[str, Any]:
    from transfer import fine_tune

    callback = [
        "+callbacks.timeline._target_=benchmarks.peers.lightning_timeline",
        f"+callbacks.timeline.path={timeline}",
        "+callbacks.timeline.metric=val/acc",
        f"+callbacks.timeline.started={started}",
    ]
    run_dir = out / "transfer" / time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(started))  # a new folder per run
    result = fine_tune([*data_overrides(args.dataset, out), *callback], run_dir=run_dir)
    return {"test_acc": result.test["acc"], "epochs": [s["epochs_run"] for s in result.results["stages"]]}


def timm_weights(out: Path) -> Path:
    """The packaged Lite0 weights as a timm safetensors file (what fastai and AutoTimm load)."""
    import timm
    from safetensors.torch import save_file

    from transfer.model.weights import load_packaged

    path = out / f"{MODEL}.safetensors"
    if not path.exists():
        model = timm.create_model(MODEL, pretrained=False)
        load_packaged(model, MODEL)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def run_fastai(args: argparse.Namespace, out: Path, timeline: Path, started: float) -> dict[str, Any]:
    import pandas as pd
    from fastai.callback.core import Callback
    from fastai.vision.all import ImageDataLoaders, Resize, accuracy, aug_transforms, vision_learner

    rows = split_rows(out / "split" / "split.csv")
    frame = pd.DataFrame(
        [
            {"path": r["path"], "label": r["label"], "is_valid": split == "val"}
            for split in ("train", "val")
            for r in rows[split]
        ]
    )
    dls = ImageDataLoaders.from_df(
        frame, path="/", fn_col="path", label_col="label", valid_col="is_valid", item_tfms=Resize(224),
        batch_tfms=aug_transforms(), bs=32,
    )  # fmt: skip

    class Record(Callback):
        order = 60  # after fastai's Recorder has appended the epoch's values

        def after_epoch(self) -> None:
            values = self.learn.recorder.values[-1]  # train loss, valid loss, accuracy
            with open(timeline, "a") as stream:
                stream.write(json.dumps({"seconds": time.time() - started, "val_acc": float(values[-1])}) + "\n")

    learn = vision_learner(
        dls, MODEL, metrics=accuracy, pretrained=True, pretrained_cfg_overlay={"file": str(timm_weights(out))}
    )
    record = Record()
    learn.add_cb(record)
    learn.fine_tune(args.epochs)
    learn.remove_cb(record)  # get_preds runs an epoch of its own
    test = pd.DataFrame([{"path": r["path"], "label": r["label"]} for r in rows["test"]])
    predictions, targets = learn.get_preds(dl=learn.dls.test_dl(test, with_labels=True))
    return {"test_acc": float((predictions.argmax(1) == targets).float().mean()), "epochs": [1, args.epochs]}


def run_autotimm(args: argparse.Namespace, out: Path, timeline: Path, started: float) -> dict[str, Any]:
    from autotimm import AutoTrainer, BackboneConfig, ImageClassifier, ImageDataModule, MetricConfig

    rows = split_rows(out / "split" / "split.csv")
    files = {}
    for split in ("train", "val", "test"):
        files[split] = out / "autotimm" / f"{split}.csv"
        files[split].parent.mkdir(parents=True, exist_ok=True)
        with open(files[split], "w", newline="") as stream:
            writer = csv.DictWriter(stream, ["path", "label"])
            writer.writeheader()
            writer.writerows({"path": r["path"], "label": r["label"]} for r in rows[split])
    classes = sorted({r["label"] for r in rows["train"]})
    weights = timm_weights(out)
    data = ImageDataModule(
        train_csv=str(files["train"]), val_csv=str(files["val"]), test_csv=str(files["test"]), image_dir="/",
        image_column="path", label_column="label", image_size=224, batch_size=32,
    )  # fmt: skip
    metrics = [
        MetricConfig(
            name="accuracy",
            backend="torchmetrics",
            metric_class="Accuracy",
            params={"task": "multiclass", "num_classes": len(classes)},
            stages=["train", "val", "test"],
        )
    ]
    model = ImageClassifier(
        backbone=BackboneConfig(model_name=MODEL, extra_kwargs={"pretrained_cfg_overlay": {"file": str(weights)}}),
        num_classes=len(classes),
        metrics=metrics,
    )
    trainer = AutoTrainer(
        max_epochs=args.epochs,
        checkpoint_monitor="val/accuracy",
        checkpoint_mode="max",
        default_root_dir=str(out / "autotimm"),
        callbacks=[lightning_timeline(str(timeline), "val/accuracy", started, "pytorch_lightning")],
    )
    trainer.fit(model, datamodule=data)
    tested = trainer.test(model, datamodule=data)[0]
    return {"test_acc": float(tested["test/accuracy"]), "epochs": [args.epochs]}


RUNNERS = {"transfer": run_transfer, "fastai": run_fastai, "autotimm": run_autotimm}


def child(args: argparse.Namespace) -> None:
    out, started = Path(args.out), float(args.started)
    timeline = out / f"{args.tool}.timeline.jsonl"
    timeline.unlink(missing_ok=True)
    report = RUNNERS[args.tool](args, out, timeline, started)
    report["seconds"] = time.time() - started
    report["timeline"] = [json.loads(line) for line in timeline.read_text().splitlines()]
    (out / f"{args.tool}.json").write_text(json.dumps(report, indent=1))


def plan_split(args: argparse.Namespace, out: Path) -> None:
    """The toolkit's split of the dataset (its plan only, nothing trained): every tool's split."""
    from transfer import fine_tune

    if not (out / "split" / "split.csv").exists():
        fine_tune([*data_overrides(args.dataset, out), "plan_only=true"], run_dir=out / "split")


def plot(reports: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.5))
    for tool, report in reports.items():
        minutes = [0.0] + [p["seconds"] / 60 for p in report["timeline"]]
        accuracy = [None] + [p["val_acc"] for p in report["timeline"]]
        (line,) = axis.plot(minutes[1:], accuracy[1:], marker=".", label=f"{tool} (validation)")
        axis.scatter([report["seconds"] / 60], [report["test_acc"]], marker="*", s=140, color=line.get_color())
    axis.set_xlabel("wall-clock minutes since the process started")
    axis.set_ylabel("accuracy")
    axis.set_title(f"{title}: validation accuracy per epoch; star: test accuracy when done")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="elpv", choices=["elpv", "characters"])
    parser.add_argument("--tools", nargs="+", default=list(TOOLS), choices=TOOLS)
    parser.add_argument("--epochs", type=int, default=6, help="fastai's fine_tune epochs and AutoTimm's max_epochs")
    parser.add_argument("--out", default="outputs/peers")
    parser.add_argument("--tool", help=argparse.SUPPRESS)
    parser.add_argument("--started", help=argparse.SUPPRESS)
    args = parser.parse_args()
    out = Path(args.out).resolve() / args.dataset
    out.mkdir(parents=True, exist_ok=True)
    args.out = str(out)
    if args.tool:
        child(args)
        return
    plan_split(args, out)
    reports = {}
    for tool in args.tools:
        started = time.time()
        command = [sys.executable, __file__, "--tool", tool, "--started", str(started), "--dataset", args.dataset]
        done = subprocess.run([*command, "--epochs", str(args.epochs), "--out", str(out.parent)], cwd=ROOT)
        if done.returncode != 0:
            sys.exit(f"{tool} failed (exit {done.returncode})")
        reports[tool] = json.loads((out / f"{tool}.json").read_text())
    for tool in TOOLS:  # a tool not run this time keeps its last report (rerun one tool alone)
        if tool not in reports and (out / f"{tool}.json").exists():
            reports[tool] = json.loads((out / f"{tool}.json").read_text())
    reports = {tool: reports[tool] for tool in TOOLS if tool in reports}
    (out / "peers.json").write_text(json.dumps(reports, indent=1))
    plot(reports, out / "peers.png", args.dataset)
    print(f"\n{args.dataset}, {MODEL} (packaged ImageNet weights), the toolkit's split; {out / 'peers.png'}\n")
    print("| tool | recipe | epochs | best val acc | test acc | minutes |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    recipes = {
        "transfer": "python train.py (defaults)",
        "fastai": f"vision_learner + fine_tune({args.epochs})",
        "autotimm": f"ImageClassifier + AutoTrainer(max_epochs={args.epochs})",
    }
    for tool, report in reports.items():
        best = max((p["val_acc"] for p in report["timeline"]), default=float("nan"))
        epochs = " + ".join(str(e) for e in report["epochs"])
        print(
            f"| {tool} | {recipes[tool]} | {epochs} | {best:.2%} | {report['test_acc']:.2%} "
            f"| {report['seconds'] / 60:.1f} |"
        )


if __name__ == "__main__":
    main()
