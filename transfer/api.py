"""The Python API: ``fine_tune``, for notebooks and other programs.

    from transfer import fine_tune, load_model
    result = fine_tune(["data=folder", "data.root=photos", "backbone=resnet50"])
    result.checkpoint, result.test["acc"], result.run_dir, result.plan
    model = load_model(result.run_dir)           # or a checkpoint file, or "outputs/runs/latest"
    model.predict("photo.jpg")                   # {"label": ..., "confidence": ..., "probabilities": ...}

It takes the override strings ``train.py`` takes (the same configs, the same names), runs the same
job (``train.py`` and ``transfer-train`` are thin wrappers over `fine_tune_config`) and writes the
same run folder, ``train.log`` included.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, open_dict

from transfer.config.compose import compose
from transfer.config.run_folder import best_checkpoint, link_latest
from transfer.model.classifier import Classifier, load_classifier, pick_device
from transfer.progress import configure as configure_progress
from transfer.training.cv import cross_validate
from transfer.training.plan import RunPlan
from transfer.training.run import fit_and_test, plan_only


@dataclass(frozen=True)
class FineTuneResult:
    """What a run left: its folder, its best checkpoint, its test metrics (as in results.json) and
    its plan. For a cross-validation (``cv.folds=K``): the fold ensemble's test metrics, no single
    checkpoint or plan (each fold's are in ``fold_<k>/``). With ``plan_only=true``: the plan alone
    (of the run on the whole split, also when ``cv.folds`` is set)."""

    run_dir: Path
    checkpoint: Path | None
    test: dict[str, float]
    plan: RunPlan | None
    results: dict[str, Any] = field(default_factory=dict, repr=False)  # results.json (cv_summary.json)


def fine_tune_config(cfg: DictConfig, overrides: Sequence[str] = ()) -> FineTuneResult:
    """Run the job ``cfg`` (a composed ``train`` config) describes: a fine-tuning run, a
    cross-validation, or only its plan. ``overrides``: the strings it was composed with."""
    run_dir = Path(cfg.paths.output_dir)
    if cfg.get("resume"):  # resume=outputs/runs/latest means the run latest names now, not this one
        with open_dict(cfg):
            cfg.resume = str(Path(cfg.resume).expanduser().resolve())
    point_latest_at(run_dir)
    configure_progress(cfg.runtime.get("progress", "auto"))  # bars of the long steps: terminal only
    if cfg.get("plan_only"):
        return FineTuneResult(run_dir, None, {}, plan_only(cfg, overrides).plan)
    if cfg.cv.folds:
        summary = cross_validate(cfg, tuple(overrides))
        return FineTuneResult(run_dir, None, summary["test_ensemble"], None, summary)
    results, plan = fit_and_test(cfg, overrides)
    checkpoint = results["checkpoint"]  # checkpoints/best.ckpt
    return FineTuneResult(run_dir, Path(checkpoint) if checkpoint else None, results["test"], plan, results)


def load_model(path: str | Path, device: str = "auto") -> Classifier:
    """The trained model of a run folder (its ``checkpoints/best.ckpt``) or of a checkpoint file, with
    its preprocessing and class names, on ``device`` (``auto``: CUDA, then Apple's MPS, then the CPU).
    ``load_model(path).predict(["a.jpg", pil_image])`` answers as the server does."""
    where = Path(path).expanduser()
    checkpoint = best_checkpoint(where) if where.is_dir() else where
    return load_classifier(checkpoint, pick_device(device))


@rank_zero_only
def point_latest_at(run_dir: Path) -> None:
    """``outputs/runs/latest`` -> this run, as it starts (a run in a folder of the user's choosing,
    or one trial of a sweep, leaves the link alone)."""
    if run_dir.parent.name == "runs":
        run_dir.mkdir(parents=True, exist_ok=True)
        link_latest(run_dir)


def fine_tune(
    overrides: Sequence[str] = (), *, config_dir: str | Path | None = None, run_dir: str | Path | None = None
) -> FineTuneResult:
    """Compose ``conf/train.yaml`` with ``overrides`` (``config_dir``: a folder of your own configs,
    as ``--config-dir``) and run it in a new folder under ``paths.log_dir`` (or ``run_dir``); its log
    goes to the folder's ``train.log`` and, where nothing else handles logging, to the console."""
    cfg = compose("train", overrides, config_dir=config_dir, output_dir=run_dir)
    with run_logging(Path(cfg.paths.output_dir) / "train.log"):
        return fine_tune_config(cfg, overrides)


@contextlib.contextmanager
def run_logging(path: Path) -> Iterator[None]:
    """The run's log in ``path`` (as Hydra's job logging writes train.log for train.py), INFO and up."""
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    handlers: list[logging.Handler] = [logging.FileHandler(path)]
    if not root.handlers:
        handlers.append(logging.StreamHandler())
    level = root.level
    for handler in handlers:
        handler.setFormatter(logging.Formatter("[%(asctime)s] %(message)s", datefmt="%H:%M:%S"))
        root.addHandler(handler)
    root.setLevel(min(level, logging.INFO) if level else logging.INFO)
    try:
        yield
    finally:
        for handler in handlers:
            root.removeHandler(handler)
            handler.close()
        root.setLevel(level)
