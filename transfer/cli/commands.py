"""The command-line entry points: ``transfer-train`` etc. (console scripts) and the repo's ``train.py``.

Each one composes a Hydra config from the packaged ``transfer.conf`` (the repo's ``conf/``; add your own
config folder with ``--config-dir``) and hands it to its job; ``train``'s job is the Python API's
(`transfer.api.fine_tune_config`).
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Callable
from typing import Any

import hydra
from omegaconf import DictConfig

from transfer.cli.extras import importable, install_hint, missing_extras
from transfer.config.compose import CONFIG_MODULE
from transfer.config.names import accept_old_overrides, upgrade
from transfer.config.user_paths import expand_home
from transfer.errors import user_error_in

CONFIG_PATH = f"pkg://{CONFIG_MODULE}"


def run_command(job: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Run a command's job: a user's mistake gets its one paragraph (no traceback), a bug its traceback."""
    from transfer.training.runtime import release_process_group

    try:
        answer = job(cfg)
    except Exception as error:
        user_error = user_error_in(error)
        if user_error is None:
            raise
        logging.getLogger("transfer").error("%s", user_error)
        sys.exit(1)
    release_process_group()
    return answer


def job_from(path: str) -> Callable[[DictConfig], Any]:
    """Imported when the command runs, so ``--help`` and ``--cfg job`` skip importing Lightning and timm."""
    module, name = path.rsplit(".", 1)
    job: Callable[[DictConfig], Any] = getattr(importlib.import_module(module), name)
    return job


def command(
    config_name: str, job_path: str, answer: Callable[[Any], Any] = lambda _: None, needs: tuple[str, str] | None = None
) -> Callable[[], Any]:
    """A console command; ``needs`` = (module, extra) the command cannot run without."""

    @hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name=config_name)
    def main(cfg: DictConfig) -> Any:
        return answer(run_command(job_from(job_path), cfg))

    def run() -> Any:
        missing = missing_extras(sys.argv[1:])
        if needs is not None and not importable(needs[0]) and needs[1] not in missing:
            missing.append(needs[1])
        if missing:
            sys.exit(install_hint(missing))  # before Hydra, whose own message leaves the fix unsaid
        # data.root=~/photos as a shell reads ~/photos; old names: moved by the job's `upgrade`
        sys.argv[1:] = accept_old_overrides(expand_home(sys.argv[1:]))
        return main()

    run.__doc__ = f"Compose conf/{config_name}.yaml with the command line's overrides, run {job_path}."
    return run


def train_job(cfg: DictConfig) -> dict[str, Any]:
    """``train.py``'s job: the Python API's, with the command line's overrides (what a sweep varies too)."""
    from hydra.core.hydra_config import HydraConfig

    from transfer.api import fine_tune_config

    upgrade(cfg)
    return fine_tune_config(cfg, list(HydraConfig.get().overrides.task)).results


def sweep_objective(results: dict[str, Any]) -> float | None:
    """What Hydra sweepers (Optuna) optimise: the best validation score, never a test metric; for a
    cross-validation (`transfer.training.cv`) the mean of the folds' best validation scores."""
    if not results:  # plan_only
        return None
    if "folds" in results:
        return float(results["val_mean"])
    score = results["best_checkpoint"]["score"]
    return None if score is None else float(score)


train = command("train", "transfer.cli.commands.train_job", sweep_objective)
evaluate = command("evaluate", "transfer.inference.evaluate.evaluate")
predict = command("predict", "transfer.inference.predict.predict")
explain = command("explain", "transfer.inference.explain.explain_files")
export = command("export", "transfer.inference.export.export")
serve = command("serve", "transfer.inference.serve.serve", needs=("litserve", "serve"))
