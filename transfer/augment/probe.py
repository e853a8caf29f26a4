"""``augment=auto``: choose, from the user's own images, the augmentations that keep their labels.

A mirrored "b" is a "d", a turned "6" is a "9", but a mirrored solar cell is still defective and a
mirrored cat still a cat. Which transforms are safe is a property of the data, so it is measured
on the data before training, with the frozen pretrained backbone:

1. Pooled features (`transfer.model.features.pooled_features`) of training and validation images
   (never test), once as they are and once per candidate view: each image mirrored, flipped,
   turned by 90 degrees, randomly cropped at two strengths, colour-jittered (seeded draws).
2. A linear probe (a ridge classifier on standardised features) in stratified K-fold
   cross-validation, on the held-out originals of each fold:
   * trained on the originals: the baseline;
   * trained on the originals plus one view: does adding that view cost accuracy on real images?
     A view that changes labels teaches the probe contradictions;
   * the baseline tested on the held-out *view*: is a transformed image still recognised by a
     model that never saw one? Where orientation carries meaning (characters, upright faces) or
     the change removes what decides the class it is not, even when a probe could learn both.
3. `judge` keeps the views that are recognised and cost no accuracy; the chosen views become an
   albumentations pipeline, the plan's augmentation (in ``plan.json``, ``config.yaml``'s
   ``augment.train``, ``augment/chosen.yaml`` and, with the evidence, ``results.json``).

Its cost is one pass of the frozen backbone per view over the probed images (each decoded once,
`transfer.augment.probe_views`) and seconds of closed-form fits. The images probed are as many as
fit in ``run_share`` (10%) of the planned run's backbone passes, at least ``min_images_probed``
(200) and at most ``max_images``; where even those do not fit, the optional candidates go first
(colour, then the strongest crops). Everything is seeded, so a seed gives one decision, and the
decision is cached by a fingerprint of the images, the model and the settings
(`transfer.augment.probe_cache`): a second run on the same data skips the probe.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import albumentations as A
import numpy as np
import torch.nn as nn

from transfer.augment import probe_cache
from transfer.augment.probe_views import view_features
from transfer.data.table import ImageTable, stratified_subset
from transfer.data.transforms import INTERPOLATION, eval_transform, finishing, geometry, resize_target

log = logging.getLogger("transfer")

GEOMETRIC = ("hflip", "vflip", "rot90")


@dataclass(frozen=True)
class ProbeSettings:
    """``augment.probe`` in conf/augment/auto.yaml."""

    max_images: int = 1000  # training + validation images the probe looks at (stratified subset)
    folds: int = 5  # cross-validation folds (fewer when a class has fewer images)
    tolerance: float = 0.005  # accuracy training with a view may cost and still be kept (noise allowance)
    recognition_tolerance: float = 0.02  # how much worse transformed images may be recognised
    crop_scales: tuple[float, ...] = (0.7, 0.35)  # RandomResizedCrop lower scales, mildest first
    colour: bool = True  # also probe brightness/contrast/saturation/hue changes
    run_share: float = 0.1  # the probe's backbone passes: at most this share of the planned run's
    min_images_probed: int = 200  # ... but never fewer images than this (or all there are)
    cache: bool = True  # reuse the decision of an identical probe (paths.cache_dir/augment_probe)

    @property
    def min_images(self) -> int:
        """Below this many probed images one image weighs more than the recognition tolerance
        (50 at 2 points), so the probe cannot show that any view is safe."""
        return math.ceil(1.0 / self.recognition_tolerance - 1e-9)


def _turn(image: np.ndarray, **_: Any) -> np.ndarray:
    """A quarter turn counter-clockwise (albumentations' RandomRotate90 draws its turn at random)."""
    return np.ascontiguousarray(np.rot90(image))


def view_pipelines(input_config: Mapping[str, Any], settings: ProbeSettings, seed: int) -> dict[str, A.Compose]:
    """Each candidate view as a full preprocessing pipeline (the evaluation one plus that change)."""
    height, width = input_config["size"]
    views: dict[str, list[A.BasicTransform]] = {
        "hflip": [A.HorizontalFlip(p=1.0), *geometry(input_config)],
        "vflip": [A.VerticalFlip(p=1.0), *geometry(input_config)],
        "rot90": [A.Lambda(image=_turn, p=1.0), *geometry(input_config)],
    }
    for scale in settings.crop_scales:
        views[f"crop{scale:g}"] = [A.RandomResizedCrop(size=(height, width), scale=(scale, 1.0))]
    if settings.colour:
        views["colour"] = [
            *geometry(input_config),
            A.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05, p=1.0),
        ]
    pipelines = {}
    for index, (name, transforms) in enumerate(views.items()):
        pipeline = A.Compose([*transforms, *finishing(input_config)])
        pipeline.set_random_seed(seed + index)  # the crop and colour draws are part of the seed
        pipelines[name] = pipeline
    return pipelines


def probe_pipelines(
    input_config: Mapping[str, Any], settings: ProbeSettings, seed: int, views: list[str] | None = None
) -> dict[str, A.Compose]:
    """The evaluation transform (``originals``) and the candidate ``views`` (all of them: None)."""
    candidates = view_pipelines(input_config, settings, seed)
    return {"originals": eval_transform(input_config), **{n: candidates[n] for n in (views or candidates)}}


def probe_rows(table: ImageTable, splits: Mapping[str, np.ndarray], max_images: int, seed: int) -> np.ndarray:
    """Table rows of the training and validation splits (never test), a stratified subset."""
    rows = np.concatenate([splits["train"], splits["val"]])
    if len(rows) <= max_images:
        return np.sort(rows)
    return stratified_subset(rows, table.labels[rows], max_images, seed, at_least=2)


@dataclass(frozen=True)
class ProbeData:
    """The images the probe looks at, how it loads them, and what it may cost."""

    table: ImageTable
    splits: Mapping[str, np.ndarray]
    batch_size: int
    num_workers: int
    # The planned run's cost in backbone passes of one image (`planned_image_passes`); None: no cap.
    run_image_passes: float | None = None
    cache_dir: str | None = None  # where decisions are cached (None: not cached)
    model_identity: Mapping[str, Any] = field(default_factory=dict)  # what the fingerprint names the model by


# Dropped first when the probe does not fit its share of the run: they refine the choice, the
# flips and turns decide what breaks a label.
OPTIONAL_FIRST = ("colour",)


def affordable_views(names: list[str], images: int, run_passes: float | None, settings: ProbeSettings) -> list[str]:
    """The candidate views to probe: all of them, unless fewer than ``min(images,
    min_images_probed)`` images would fit the run share; then colour, then the strongest crops
    are left out, one at a time, until they fit (the flips and the turn always stay)."""
    if run_passes is None:
        return names
    target = min(images, settings.max_images, settings.min_images_probed)
    crops = sorted((n for n in names if n.startswith("crop")), key=lambda n: float(n[4:]))  # strongest first
    droppable = [n for n in (*OPTIONAL_FIRST, *crops) if n in names]
    kept = list(names)
    while droppable and settings.run_share * run_passes / (len(kept) + 1) < target:
        kept.remove(droppable.pop(0))
    return kept


def probe_size(images: int, views: int, run_passes: float | None, settings: ProbeSettings) -> int:
    """Images to probe: what fits ``run_share`` of the run's passes with ``views`` views and the
    originals, within [``min_images_probed``, ``max_images``] and at most ``images``."""
    fit = settings.max_images if run_passes is None else int(settings.run_share * run_passes / (views + 1))
    return min(images, settings.max_images, max(settings.min_images_probed, fit))


def cross_validated_accuracy(
    original: np.ndarray, labels: np.ndarray, views: Mapping[str, np.ndarray], folds: int, seed: int
) -> dict[str, Any]:
    """Per-image correctness on held-out originals of a probe trained on originals (``"none"``) and
    of one trained on originals plus each view (``correct``); and the baseline probe's correctness
    on each held-out *view* (``recognised``: does a model of upright images still recognise it).

    The probe is a ridge classifier on standardised features, its strength chosen once on the
    originals by efficient leave-one-out (``RidgeClassifierCV``): closed-form fits, so a probe takes
    seconds where an iterative logistic regression takes minutes and may not converge.
    """
    from sklearn.linear_model import RidgeClassifier, RidgeClassifierCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.preprocessing import StandardScaler

    alpha = float(
        RidgeClassifierCV(alphas=np.logspace(-1, 5, 13)).fit(StandardScaler().fit_transform(original), labels).alpha_
    )
    correct = {name: np.zeros(len(labels), dtype=bool) for name in ("none", *views)}
    recognised = {name: np.zeros(len(labels), dtype=bool) for name in views}
    splitter = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for train, held_out in splitter.split(original, labels):
        scaler = StandardScaler().fit(original[train])
        base = RidgeClassifier(alpha=alpha).fit(scaler.transform(original[train]), labels[train])
        test = scaler.transform(original[held_out])
        correct["none"][held_out] = base.predict(test) == labels[held_out]
        for name, features in views.items():
            recognised[name][held_out] = base.predict(scaler.transform(features[held_out])) == labels[held_out]
            # Twice the images: twice the penalty keeps the regularisation per image the same.
            probe = RidgeClassifier(alpha=2 * alpha).fit(
                scaler.transform(np.concatenate([original[train], features[train]])),
                np.concatenate([labels[train], labels[train]]),
            )
            correct[name][held_out] = probe.predict(test) == labels[held_out]
    return {"correct": correct, "recognised": recognised, "alpha": alpha}


def paired(after: np.ndarray, before: np.ndarray) -> tuple[float, float]:
    """Mean per-image difference and its standard error."""
    difference = after.astype(np.float64) - before.astype(np.float64)
    error = float(difference.std(ddof=1) / np.sqrt(len(difference))) if len(difference) > 1 else 0.0
    return float(difference.mean()), error


def judge(
    correct: Mapping[str, np.ndarray],
    recognised: Mapping[str, np.ndarray],
    tolerance: float,
    recognition_tolerance: float,
) -> dict[str, dict[str, Any]]:
    """Evidence and verdict per view. A view is kept when both hold:

    * it is *recognised*: the probe trained on untransformed images classifies transformed ones
      at most ``recognition_tolerance`` worse than untransformed ones. That holds where the label
      survives the change (a mirrored cell, a mirrored cat, a crop of a photo) and fails where
      orientation carries meaning (a mirrored "b", a turned "6", a face upside down) or the
      change removes what decides the class (a crop that cuts strokes off a character). The
      allowance is fixed, not scaled by the noise: on a few images the probe cannot show that a
      view is safe, and then the view is left out;
    * it costs no accuracy: training with it loses at most ``max(tolerance, 1 standard error)``
      on the real images (a view that changes labels teaches the probe contradictions).
    """
    evidence = {}
    for name in recognised:
        change, error = paired(correct[name], correct["none"])
        recognition, recognition_error = paired(recognised[name], correct["none"])
        harmless = change >= -max(tolerance, error)
        invariant = recognition >= -recognition_tolerance
        evidence[name] = {
            "accuracy": round(float(correct[name].mean()), 4),
            "change": round(change, 4),
            "standard_error": round(error, 4),
            "recognised": round(float(recognised[name].mean()), 4),
            "recognised_change": round(recognition, 4),
            "recognised_standard_error": round(recognition_error, 4),
            "keep": bool(harmless and invariant),
            "reason": (
                "recognised and costs no accuracy"
                if harmless and invariant
                else "not recognised: the label does not survive it"
                if not invariant
                else "costs accuracy"
            ),
        }
    return evidence


def consistent_geometry(evidence: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The kept flips and turns, as a set the pipeline can apply without producing a rejected one:
    a 90-degree turn combined with one flip generates the other flip, so it stays only when both
    flips are kept or both are rejected."""
    kept = [name for name in GEOMETRIC if evidence[name]["keep"]]
    flips = [name for name in ("hflip", "vflip") if name in kept]
    if "rot90" in kept and len(flips) == 1:
        kept.remove("rot90")
    return kept


def pipeline_nodes(
    evidence: Mapping[str, Mapping[str, Any]], input_config: Mapping[str, Any], settings: ProbeSettings
) -> list[dict[str, Any]] | None:
    """The chosen augmentation list as Hydra ``_target_`` nodes (what ``augment.train`` holds);
    None when no view is kept: training then sees exactly the evaluation preprocessing."""
    if not any(e["keep"] for e in evidence.values()):
        return None
    height, width = input_config["size"]
    # a candidate left out of the probe (to fit its share of the run) is not applied
    crops = [scale for scale in settings.crop_scales if evidence.get(f"crop{scale:g}", {}).get("keep")]
    nodes: list[dict[str, Any]]
    if crops:
        nodes = [{"_target_": "albumentations.RandomResizedCrop", "size": [height, width], "scale": [min(crops), 1.0]}]
    else:  # the evaluation geometry: resize the short side, center crop
        nodes = [
            {
                "_target_": "albumentations.SmallestMaxSize",
                "max_size": resize_target(input_config),
                "interpolation": INTERPOLATION[input_config["interpolation"]],
            },
            {"_target_": "albumentations.CenterCrop", "height": height, "width": width},
        ]
    geometry = consistent_geometry(evidence)
    if set(geometry) == set(GEOMETRIC):
        nodes.append({"_target_": "albumentations.SquareSymmetry", "p": 1.0})  # all 8 flips and turns
    else:
        if "hflip" in geometry:
            nodes.append({"_target_": "albumentations.HorizontalFlip", "p": 0.5})
        if "vflip" in geometry:
            nodes.append({"_target_": "albumentations.VerticalFlip", "p": 0.5})
        if "rot90" in geometry:
            nodes.append({"_target_": "albumentations.RandomRotate90", "p": 1.0})
    if settings.colour and evidence.get("colour", {}).get("keep"):
        nodes.append(
            {
                "_target_": "albumentations.ColorJitter",
                "brightness": 0.2,
                "contrast": 0.2,
                "saturation": 0.2,
                "hue": 0.02,
                "p": 0.8,
            }
        )
    return nodes


def choose_augmentation(
    model: nn.Module,
    data: ProbeData,
    input_config: Mapping[str, Any],
    settings: ProbeSettings,
    seed: int,
    channels_last: bool = False,
) -> dict[str, Any]:
    """Run the probe (or read its cached decision); returns ``{"train": nodes, "evidence": ...,
    ...}`` for the plan and results."""
    started = time.perf_counter()
    available = len(data.splits["train"]) + len(data.splits["val"])
    names = affordable_views(
        list(view_pipelines(input_config, settings, seed)), available, data.run_image_passes, settings
    )
    size = probe_size(available, len(names), data.run_image_passes, settings)
    rows = probe_rows(data.table, data.splits, size, seed)
    labels = data.table.labels[rows]
    folds = min(settings.folds, int(np.bincount(labels).min()))
    if len(rows) < settings.min_images:
        log.warning(
            "augment=auto: %d training/validation images are too few to probe (one image is %.1f points "
            "of the probe's accuracy, more than its %.0f-point tolerance; it needs %d): training "
            "without augmentation. Choose one with augment=... if you know your labels survive it.",
            len(rows),
            100 / len(rows),
            100 * settings.recognition_tolerance,
            settings.min_images,
        )
        return {
            "train": None,
            "evidence": {},
            "images": len(rows),
            "folds": 0,
            "reason": f"too few images to probe (fewer than {settings.min_images})",
        }
    if folds < 2:
        log.warning(
            "augment=auto: a class has fewer than 2 training/validation images, too few to "
            "probe; training without augmentation."
        )
        return {
            "train": None,
            "evidence": {},
            "images": len(rows),
            "folds": 0,
            "reason": "too few images per class to probe",
        }
    paths = [data.table.paths[i] for i in rows]
    key = probe_cache.fingerprint(
        paths, labels, {**data.model_identity, "input": dict(input_config)}, {**vars(settings), "views": names}, seed
    )
    cached = probe_cache.load(probe_cache.cache_file(data.cache_dir, key)) if settings.cache else None
    if cached is not None:
        log.info("augment=auto: the same probe ran before (images, model, settings): its decision is reused")
        report = {**cached, "cached": True, "seconds": round(time.perf_counter() - started, 1)}
        log_decision(report)
        return report
    pipelines = probe_pipelines(input_config, settings, seed, names)
    log.info(
        "augment=auto: probing %d of %d training/validation images, originals and %d views (%s), "
        "each image decoded once%s",
        len(rows),
        available,
        len(names),
        ", ".join(names),
        ""
        if data.run_image_passes is None
        else f"; {len(rows) * len(pipelines) / data.run_image_passes:.0%} of the planned run's backbone passes",
    )
    height, width = input_config["size"]
    features = view_features(
        model, paths, pipelines, seed, data.batch_size, data.num_workers, channels_last, square=height == width
    )
    original = features.pop("originals")
    views = features
    extracted = time.perf_counter()
    scores = cross_validated_accuracy(original, labels, views, folds, seed)
    evidence = judge(scores["correct"], scores["recognised"], settings.tolerance, settings.recognition_tolerance)
    nodes = pipeline_nodes(evidence, input_config, settings)
    report = {
        "train": nodes,
        "evidence": evidence,
        "images": int(len(rows)),
        "folds": folds,
        "baseline_accuracy": round(float(scores["correct"]["none"].mean()), 4),
        "ridge_alpha": scores["alpha"],
        "images_available": available,
        "views": names,
        "seconds": round(time.perf_counter() - started, 1),
        "feature_seconds": round(extracted - started, 1),
        "images_per_second": round(len(rows) * (len(names) + 1) / max(extracted - started, 1e-9), 1),
    }
    if data.run_image_passes is not None:
        report["share_of_run"] = round(len(rows) * (len(names) + 1) / data.run_image_passes, 4)
    if settings.cache:
        probe_cache.save(probe_cache.cache_file(data.cache_dir, key), report)
    log_decision(report)
    return report


def log_decision(report: Mapping[str, Any]) -> None:
    lines = [
        f"  {name:<9s} probe acc {e['accuracy']:.4f} ({e['change']:+.4f} +- {e['standard_error']:.4f}), "
        f"recognised {e['recognised']:.4f} ({e['recognised_change']:+.4f} +- "
        f"{e['recognised_standard_error']:.4f}): {'keep' if e['keep'] else 'reject'}, {e['reason']}"
        for name, e in report["evidence"].items()
    ]
    chosen = ", ".join(node["_target_"].rsplit(".", 1)[-1] for node in report["train"] or []) or "no augmentation"
    log.info(
        "augment=auto: linear probe on %d train/val images, %d-fold, baseline acc %.4f (%.0fs, "
        "%.0fs of it features)\n%s\n  chosen: %s",
        report["images"],
        report["folds"],
        report["baseline_accuracy"],
        report["seconds"],
        report["feature_seconds"],
        "\n".join(lines),
        chosen,
    )


def settings_from(config: Mapping[str, Any] | None) -> ProbeSettings:
    values = dict(config or {})
    if "crop_scales" in values:
        values["crop_scales"] = tuple(sorted((float(s) for s in values["crop_scales"]), reverse=True))
    return ProbeSettings(**values)
