"""After a multirun (an Optuna search or a plain grid): keep the best trial's whole config."""

from __future__ import annotations

import json
import logging
import shlex
import shutil
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("transfer")


def finished_trials(sweep_dir: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every trial of the sweep that wrote results.json, read from disk: works for any launcher
    (trials in other processes or on other machines too)."""
    trials = []
    for results in sorted(sweep_dir.glob("*/results.json")):
        trials.append((results.parent, json.loads(results.read_text())))
    return trials


def best_trial(trials: list[tuple[Path, dict[str, Any]]]) -> tuple[Path, dict[str, Any]] | None:
    scored = [(d, r) for d, r in trials if r["best_checkpoint"].get("score") is not None]
    if not scored:
        return None
    mode = scored[0][1]["monitor"]["mode"]
    pick = max if mode == "max" else min
    return pick(scored, key=lambda trial: trial[1]["best_checkpoint"]["score"])


def retrain_overrides(trial_dir: Path) -> list[str]:
    """The trial's command-line overrides, minus the search itself: they re-run just that trial."""
    overrides = list(OmegaConf.load(trial_dir / ".hydra" / "overrides.yaml"))
    return [o for o in overrides if not o.startswith(("hparams_search=", "+hparams_search="))]


class SaveBestTrial(Callback):
    """Writes best_config.yaml (the trial's resolved config) and best_trial.json to the sweep dir."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        trials = finished_trials(sweep_dir)
        best = best_trial(trials)
        if best is None:
            if trials:  # e.g. fast_dev_run trials: nothing to compare
                log.warning("No trial in %s has a validation score; no best trial saved.", sweep_dir)
            return
        trial_dir, results = best
        shutil.copyfile(trial_dir / "config.yaml", sweep_dir / "best_config.yaml")
        overrides = retrain_overrides(trial_dir)
        summary = {
            "trial_dir": str(trial_dir),
            "metric": results["monitor"]["metric"],
            "score": results["best_checkpoint"]["score"],
            "test": results["test"],
            "overrides": overrides,
            "command": " ".join(["python train.py", *map(shlex.quote, overrides)]),
            "trials": len(trials),
        }
        (sweep_dir / "best_trial.json").write_text(json.dumps(summary, indent=2))
        log.info(
            "Best of %d trials: %s (%s=%.4f); its config: %s",
            len(trials),
            trial_dir.name,
            summary["metric"],
            summary["score"],
            sweep_dir / "best_config.yaml",
        )
