"""The Python API: ``fine_tune``, for notebooks and other programs.

    from transfer import fine_tune
    result = fine_tune(["data=folder", "data.root=photos", "backbone=resnet50"])
    result.checkpoint, result.test["acc"], result.run_dir, result.plan

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

from omegaconf import DictConfig

from transfer.config.compose import compose
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
    if cfg.get("plan_only"):
        return FineTuneResult(run_dir, None, {}, plan_only(cfg, overrides).plan)
    if cfg.cv.folds:
        summary = cross_validate(cfg, tuple(overrides))
        return FineTuneResult(run_dir, None, summary["test_ensemble"], None, summary)
    results, plan = fit_and_test(cfg, overrides)
    checkpoint = results["best_checkpoint"]["path"]
    return FineTuneResult(run_dir, Path(checkpoint) if checkpoint else None, results["test"], plan, results)


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
