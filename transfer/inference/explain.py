"""``explain.py``: saliency overlays (gradient, Grad-CAM) for image files, one panel per image."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig

from transfer.config.run_folder import resolve_checkpoint
from transfer.data.csv_files import write_csv
from transfer.data.files import find_images
from transfer.data.images import load_rgb
from transfer.data.manifest import MANIFEST, load_manifest, manifest_next_to
from transfer.errors import ImageReadError, TransferError
from transfer.inference.saliency import explain, overlay
from transfer.model.classifier import Classifier, load_classifier, pick_device

log = logging.getLogger("transfer")


def model_view(image: torch.Tensor, input_config: dict[str, Any]) -> np.ndarray:
    """The preprocessed image as the model sees it (resized, cropped), back in 8-bit RGB."""
    mean = torch.tensor(input_config["mean"]).view(3, 1, 1)
    std = torch.tensor(input_config["std"]).view(3, 1, 1)
    return ((image.cpu() * std + mean).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


def save_panel(path: Path, view: np.ndarray, maps: dict[str, np.ndarray], title: str) -> None:
    from transfer.inference.figures import plt

    figure, axes = plt.subplots(1, 1 + len(maps), figsize=(3.2 * (1 + len(maps)), 3.6), squeeze=False)
    panels = [("input", view / 255.0)] + [(name, overlay(view, saliency)) for name, saliency in maps.items()]
    for axis, (name, picture) in zip(axes[0], panels):
        axis.imshow(picture)
        axis.set_title(name, fontsize=9)
        axis.axis("off")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def target_index(classifier: Classifier, target: str | None) -> int | None:
    if target is None:
        return None
    if target not in classifier.class_names:
        raise TransferError(f"target={target} is not one of the model's classes {classifier.class_names}.")
    return classifier.class_names.index(target)


def images_to_explain(cfg: DictConfig) -> list[Path]:
    """``inputs`` (files, a folder or a glob), or ``split``: that split of the training run's split.csv."""
    if (cfg.get("inputs") is None) == (cfg.get("split") is None):
        raise TransferError("Pass one of inputs=FOLDER|FILE|'GLOB' or split=train|val|test (the run's own images).")
    if cfg.get("inputs") is not None:
        return find_images(str(cfg.inputs))
    manifest = manifest_next_to(cfg.ckpt)
    if manifest is None:
        raise TransferError(
            f"split={cfg.split} needs the run's {MANIFEST} next to '{cfg.ckpt}' "
            "(runs write it); pass inputs=... instead."
        )
    return [Path(p) for p in load_manifest(manifest, splits=[cfg.split]).paths]  # labels unread: paths only


def explain_files(cfg: DictConfig) -> dict[str, Any]:
    resolve_checkpoint(cfg)  # ckpt= or run=
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    classifier = load_classifier(cfg.ckpt, pick_device(cfg.device))
    methods = list(cfg.methods)
    target = target_index(classifier, cfg.get("target"))
    rows: list[list[str]] = []
    unreadable: list[tuple[str, str]] = []
    for index, path in enumerate(images_to_explain(cfg)[: cfg.max_images]):
        try:
            image = classifier.preprocess(load_rgb(path)).to(classifier.device)
        except ImageReadError as error:
            unreadable.append((str(path), str(error)))
            continue
        probs = classifier.probabilities(image.unsqueeze(0))[0]
        maps, explained = {}, 0
        for method in methods:
            maps[method], explained = explain(classifier.model, image, method, target, classifier.task)
        name = classifier.class_names[explained]
        panel = out_dir / f"{index:04d}_{path.stem}.png"
        cells = classifier.task.prediction_cells(probs.cpu(), classifier.class_names)
        save_panel(
            panel,
            model_view(image, classifier.input_config),
            maps,
            f"{path.name}: predicted {cells[0] or '-'}; maps for '{name}'",
        )
        rows.append([str(path), panel.name, *cells, name])
    header = ["path", "panel", *classifier.task.prediction_header(classifier.class_names), "explained_class"]
    write_csv(out_dir / "explanations.csv", header, rows)
    for file, reason in unreadable:
        log.warning("Skipped unreadable %s: %s", file, reason)
    log.info("%d panel(s) (%s) in %s", len(rows), ", ".join(methods), out_dir)
    return {"panels": len(rows), "unreadable": len(unreadable), "out_dir": str(out_dir)}
