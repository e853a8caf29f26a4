"""The command-line entry points: ``transfer-train`` etc. (console scripts) and the repo's ``train.py``.

Each one composes a Hydra config from the packaged ``transfer.conf`` (the repo's ``conf/``; add your own
config folder with ``--config-dir``) and hands it to its job.
"""

from __future__ import annotations

import importlib
import logging
import sys
from typing import Any, Callable

import hydra
from omegaconf import DictConfig, OmegaConf

from transfer.errors import user_error_in
from transfer.extras import importable, install_hint, missing_extras
from transfer.runtime import release_process_group

CONFIG_PATH = "pkg://transfer.conf"

# ${optuna_direction:${monitor.mode}} in conf/hparams_search: a sweep optimises the way the
# monitored metric is judged (max -> maximize), so a val/loss monitor cannot be maximised by mistake.
OmegaConf.register_new_resolver(
    "optuna_direction", lambda mode: {"max": "maximize", "min": "minimize"}[mode], replace=True)


def run_command(job: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
    """Run a command's job: a user's mistake gets its one paragraph (no traceback), a bug its traceback."""
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
    return getattr(importlib.import_module(module), name)


def command(config_name: str, job_path: str, answer: Callable[[Any], Any] = lambda _: None,
            needs: tuple[str, str] | None = None) -> Callable[[], Any]:
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
        return main()

    run.__doc__ = f"Compose conf/{config_name}.yaml with the command line's overrides, run {job_path}."
    return run


def sweep_objective(results: dict[str, Any]) -> float | None:
    """What Hydra sweepers (Optuna) optimise: the best validation score, never a test metric; for a
    cross-validation (`transfer.cv`) the mean of the folds' best validation scores."""
    if "folds" in results:
        return results["val_mean"]
    return results["best_checkpoint"]["score"]


train = command("train", "transfer.run.train", sweep_objective)
evaluate = command("evaluate", "transfer.evaluate.evaluate")
predict = command("predict", "transfer.predict.predict")
explain = command("explain", "transfer.explain.explain_files")
export = command("export", "transfer.export.export")
serve = command("serve", "transfer.serve.serve", needs=("litserve", "serve"))
