"""What every command script shares: a user's mistake gets its one paragraph, a bug its traceback."""

from __future__ import annotations

import logging
import sys
from typing import Any, Callable

import torch
from omegaconf import DictConfig

from transfer.errors import user_error_in
from transfer.runtime import release_process_group


def run_command(job: Callable[[DictConfig], Any], cfg: DictConfig) -> Any:
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


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: the first GPU if there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
