"""``evaluate.py``: a trained checkpoint on a split of a dataset, with a report people can read.

By default the images are the training run's own (its ``split.csv`` next to ``checkpoints/``), so
``split=test`` is exactly the images the run was tested on.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from torchmetrics.classification import (MulticlassConfusionMatrix, MulticlassF1Score, MulticlassPrecision,
                                         MulticlassRecall)

from transfer.reports import write_csv
from transfer.data.datamodule import ImageDataset
from transfer.data.manifest import MANIFEST, load_manifest, manifest_next_to
from transfer.data.sources import ImageTable, subsample
from transfer.data.splits import split_indices
from transfer.errors import TransferError
from transfer.inference import Classifier, label_indices, load_classifier, pick_device
from transfer.reports import confusion_figure, gallery_figure

log = logging.getLogger("transfer")
SPLITS = ("train", "val", "test", "all")


def training_config(ckpt: str) -> DictConfig | None:
    """The resolved config of the run that wrote ``ckpt`` (run_dir/checkpoints/x.ckpt), if present."""
    path = Path(ckpt).expanduser().resolve().parent.parent / "config.yaml"
    return OmegaConf.load(path) if path.is_file() else None


def evaluation_images(cfg: DictConfig, split: str) -> tuple[ImageTable, np.ndarray, str]:
    """The table, the indices of ``split`` and where they came from.

    Without ``data=...``: the run's own ``split.csv`` (exactly the images it used, each checked
    unchanged), or for runs without one the run's data config split again with its seed.
    With ``data=...``: that dataset, split with ``seed`` (or the run's).
    """
    if split not in SPLITS:
        raise TransferError(f"split={split} is not one of {list(SPLITS)}.")
    manifest = manifest_next_to(cfg.ckpt)
    if cfg.get("data") is None and manifest is not None:
        if cfg.get("seed") is not None:
            raise TransferError(f"seed={cfg.seed} splits a dataset given with data=...; without it the run's "
                                f"own split is used ({manifest}).")
        table = load_manifest(manifest, splits=None if split == "all" else [split])
        return table, np.arange(len(table.paths)), f"the training run's {manifest.name}"
    run_cfg = training_config(cfg.ckpt)
    if cfg.get("data") is not None:
        data, origin = cfg.data, "the data= given"
    elif run_cfg is not None:
        data, origin = run_cfg.data, "the training run's config.yaml (no split.csv: split again with its seed)"
        log.warning("No %s next to %s: splitting its data again with the run's seed. Images added, removed "
                    "or skipped since the run change what this split holds.", MANIFEST, cfg.ckpt)
    else:
        raise TransferError(f"No config.yaml next to '{cfg.ckpt}' to take the data from; pass data=... "
                            "(e.g. data=folder data.root=PATH split=all).")
    seed = cfg.seed if cfg.get("seed") is not None else (run_cfg.seed if run_cfg is not None else 42)
    table = subsample(instantiate(data.source), data.get("max_images"), seed)
    if split == "all":
        return table, np.arange(len(table.paths)), origin
    splits = split_indices(table.labels, data.test_fraction, data.val_fraction, seed, table.splits)
    if len(splits[split]) == 0:
        raise TransferError(f"The {split} split of '{table.name}' is empty; use split=all.")
    return table, splits[split], origin


@torch.inference_mode()
def probabilities_for(classifier: Classifier, dataset: ImageDataset, batch_size: int, num_workers: int,
                      tta: str) -> torch.Tensor:
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    return torch.cat([classifier.probabilities(images, tta).cpu() for images, _ in loader])


def per_class_report(predicted: torch.Tensor, labels: torch.Tensor, class_names: list[str]) -> list[dict[str, Any]]:
    n = len(class_names)
    columns = {"precision": MulticlassPrecision(n, average=None), "recall": MulticlassRecall(n, average=None),
               "f1": MulticlassF1Score(n, average=None)}
    values = {name: metric(predicted, labels).tolist() for name, metric in columns.items()}
    support = torch.bincount(labels, minlength=n).tolist()
    return [{"class": name, **{k: round(v[i], 6) for k, v in values.items()}, "support": support[i]}
            for i, name in enumerate(class_names)]


def confident_mistakes(probs: torch.Tensor, predicted: torch.Tensor, labels: torch.Tensor, count: int) -> list[int]:
    """Indices of wrong predictions, most confident first (confidence: the predicted class's probability)."""
    confidence = probs.gather(1, predicted[:, None])[:, 0]
    wrong = (predicted != labels).nonzero().flatten()
    order = confidence[wrong].argsort(descending=True)
    return wrong[order][:count].tolist()


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    classifier = load_classifier(cfg.ckpt, pick_device(cfg.device))
    table, indices, origin = evaluation_images(cfg, cfg.split)
    names = classifier.class_names
    to_model = label_indices(table.class_names, names)
    paths = [table.paths[i] for i in indices]
    labels = torch.as_tensor(to_model[table.labels[indices]])
    log.info("Evaluating %s on %d images (%s split of '%s', from %s), tta=%s", Path(cfg.ckpt).name, len(paths),
             cfg.split, table.name, origin, cfg.tta)
    dataset = ImageDataset(paths, labels.numpy(), classifier.transform)
    probs = probabilities_for(classifier, dataset, cfg.batch_size, cfg.num_workers, cfg.tta)

    metrics = {k: round(float(v), 6) for k, v in classifier.task.metrics(len(names), "")(probs, labels).items()}
    predicted = classifier.predicted(probs)
    matrix = MulticlassConfusionMatrix(len(names))(predicted, labels).numpy()
    per_class = per_class_report(predicted, labels, names)
    mistakes = confident_mistakes(probs, predicted, labels, cfg.gallery_size)

    write_csv(out_dir / "per_class.csv", list(per_class[0]), [list(row.values()) for row in per_class])
    write_csv(out_dir / "predictions.csv", ["path", "true", "predicted", "confidence", *[f"p_{n}" for n in names]],
              [[path, names[label], names[guess], f"{row[guess]:.6f}", *[f"{p:.6f}" for p in row]]
               for path, label, guess, row in zip(paths, labels.tolist(), predicted.tolist(), probs.tolist())])
    confusion_figure(matrix, names, out_dir / "confusion_matrix.png",
                     f"{table.name} {cfg.split}: accuracy {metrics['acc']:.2%} (n={len(paths)})")
    if mistakes:
        gallery_figure([paths[i] for i in mistakes],
                       [f"true {names[labels[i]]}, predicted\n{names[predicted[i]]} ({probs[i, predicted[i]]:.2f})"
                        for i in mistakes], out_dir / "confident_mistakes.png")
    report = {"checkpoint": str(cfg.ckpt), "data": table.name, "split": cfg.split, "images": len(paths),
              "task": classifier.task.name, "tta": cfg.tta, "metrics": metrics, "per_class": per_class, "confusion_matrix": matrix.tolist(),
              "class_names": names, "confident_mistakes": [paths[i] for i in mistakes]}
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=2))
    log.info("Metrics: %s", "  ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    log.info("Per class:\n%s", "\n".join(
        f"  {r['class']:>14s}  precision {r['precision']:.3f}  recall {r['recall']:.3f}  f1 {r['f1']:.3f}  "
        f"n={r['support']}" for r in per_class))
    log.info("Report: %s (confusion_matrix.png, confident_mistakes.png, per_class.csv, predictions.csv)", out_dir)
    return report
