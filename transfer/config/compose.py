"""Configs composed the way the commands compose them, for the Python API and the tests.

The packaged configs are the repo's ``conf/``, installed as the package ``transfer.conf``; a folder
of the user's own (``config_dir``, the commands' ``--config-dir``) is searched first. Overrides are
the strings ``train.py`` takes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_module
from omegaconf import DictConfig, OmegaConf, open_dict

from transfer.config.names import accept_old_overrides, upgrade
from transfer.config.user_paths import expand_home

CONFIG_MODULE = "transfer.conf"

# ${optuna_direction:${monitor.mode}} in conf/hparams_search: a sweep optimises the way the
# monitored metric is judged (max -> maximize), so a val/loss monitor cannot be maximised by mistake.
OmegaConf.register_new_resolver(
    "optuna_direction", lambda mode: {"max": "maximize", "min": "minimize"}[mode], replace=True
)


def compose(
    config_name: str = "train",
    overrides: Sequence[str] = (),
    config_dir: str | Path | None = None,
    output_dir: str | Path | None = None,
) -> DictConfig:
    """``conf/<config_name>.yaml`` with ``overrides``, old names upgraded (`transfer.config.names`).

    The run's directory (``paths.output_dir``) is ``output_dir`` when given, else what the command
    would make: a new time-stamped folder under ``paths.log_dir`` (``hydra.run.dir``), unless the
    overrides set ``paths.output_dir`` themselves."""
    search = [f"hydra.searchpath=[file://{Path(config_dir).expanduser().resolve()}]"] if config_dir else []
    with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
        cfg = hydra_compose(
            config_name, overrides=[*accept_old_overrides(expand_home(overrides)), *search], return_hydra_config=True
        )
    with open_dict(cfg):
        if output_dir is not None:
            cfg.paths.output_dir = str(output_dir)
        elif OmegaConf.is_interpolation(cfg.paths, "output_dir"):  # ${hydra:runtime.output_dir}
            cfg.paths.output_dir = str(OmegaConf.select(cfg, "hydra.run.dir"))
        del cfg["hydra"]
    upgrade(cfg)
    return cfg


def as_dict(node: object) -> dict[str, Any]:
    """A config node (or None) as a plain dict, interpolations resolved."""
    if node is None:
        return {}
    container = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
    if not isinstance(container, dict):
        raise TypeError(f"expected a mapping, got {type(container).__name__}")
    return {str(k): v for k, v in container.items()}
