"""Hydra multiruns: an Optuna search, a launch through submitit, the SLURM launcher's config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tests.fixtures import CONF_DIR, FAST, ROOT, write_image_folder

pytestmark = pytest.mark.slow  # see pyproject.toml: not in the developer's loop


def multirun(tmp_path: Path, *overrides: str) -> tuple[subprocess.CompletedProcess, Path]:
    images = write_image_folder(tmp_path / "images", per_class=10)
    sweep_dir = tmp_path / "sweep"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "-m",
            *FAST,
            "data=folder",
            f"data.root={images}",
            f"hydra.sweep.dir={sweep_dir}",
            *overrides,
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done, sweep_dir


def test_optuna_search_runs_trials_and_saves_the_best_trials_config(tmp_path: Path) -> None:
    done, sweep_dir = multirun(tmp_path, "hparams_search=optuna", "hydra.sweeper.n_trials=3")
    trials = {
        d.name: json.loads((d / "results.json").read_text())
        for d in sweep_dir.iterdir()
        if (d / "results.json").is_file()
    }
    assert sorted(trials) == ["0", "1", "2"]
    lrs = {r["stages"][0]["lr"] for r in trials.values()}
    assert len(lrs) == 3  # the sampler proposed a different head lr for every trial

    best = json.loads((sweep_dir / "best_trial.json").read_text())
    scores = {name: r["best_checkpoint"]["score"] for name, r in trials.items()}
    assert best["score"] == max(scores.values())
    assert scores[Path(best["trial_dir"]).name] == best["score"]
    assert not any(o.startswith("hparams_search") for o in best["overrides"])

    optuna_best = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    assert optuna_best.best_value == best["score"]  # Optuna got the validation score, not a test metric
    best_config = OmegaConf.load(sweep_dir / "best_config.yaml")
    assert best_config.schedule.stages[0].lr == trials[Path(best["trial_dir"]).name]["stages"][0]["lr"]


def test_submitit_launcher_runs_each_job_in_its_own_process(tmp_path: Path) -> None:
    """submitit's local executor: the path a SLURM launch takes (pickled job, new process), on this machine."""
    _, sweep_dir = multirun(tmp_path, "hydra/launcher=submitit_local", "seed=1,2")
    seeds = sorted(OmegaConf.load(sweep_dir / job / "config.yaml").seed for job in ("0", "1"))
    assert seeds == [1, 2]
    assert all((sweep_dir / job / "results.json").is_file() for job in ("0", "1"))
    assert len(list((sweep_dir / ".submitit").rglob("*_log.out"))) == 2
    best = json.loads((sweep_dir / "best_trial.json").read_text())  # a grid keeps its best trial too
    assert best["trials"] == 2 and best["score"] == max(
        json.loads((sweep_dir / job / "results.json").read_text())["best_checkpoint"]["score"] for job in ("0", "1")
    )


def test_slurm_launcher_takes_nodes_and_tasks_from_the_trainer() -> None:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            return_hydra_config=True,
            overrides=[
                "hydra/launcher=slurm",
                "trainer=ddp_multinode",
                "trainer.num_nodes=3",
                "trainer.devices=4",
                "hydra.launcher.partition=gpu",
            ],
        )
        single = compose("train", return_hydra_config=True, overrides=["hydra/launcher=slurm"])
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (3, 4, 4)
    assert launcher.partition == "gpu" and launcher.max_num_timeout == 0
    assert (single.hydra.launcher.nodes, single.hydra.launcher.tasks_per_node) == (1, 1)  # trainer=cpu
    from hydra.utils import get_class

    assert get_class(launcher._target_).__name__ == "SlurmLauncher"  # the plugin is installed


def test_search_direction_follows_the_monitor_mode() -> None:
    import transfer.config.compose  # noqa: F401  (registers the optuna_direction resolver, as every command does)

    directions = {}
    for mode in ("max", "min"):
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            cfg = compose(
                "train", return_hydra_config=True, overrides=["hparams_search=optuna", f"monitor.mode={mode}"]
            )
        directions[mode] = cfg.hydra.sweeper.direction
    assert directions == {"max": "maximize", "min": "minimize"}
