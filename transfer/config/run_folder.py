"""The layout of a run folder that the commands after training rely on, and how a user names one.

Every training run writes to a folder of its own (``outputs/runs/<date_time>``). Inside it the
checkpoints have two fixed names besides the per-stage ones: ``checkpoints/best.ckpt`` (the
checkpoint the run was tested with) and ``checkpoints/last.ckpt`` (where an interrupted run
resumes). ``outputs/runs/latest`` is a link to the newest run, made when the run starts, so a
run in progress can be followed (``tail -f outputs/runs/latest/train.log``) and a finished one
reused (``python evaluate.py run=outputs/runs/latest``).

A command after training takes ``ckpt=`` (a checkpoint file) or ``run=`` (a run folder: its
best checkpoint); a ``~`` at the start of either is the user's home, as a shell would read it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

from omegaconf import DictConfig, open_dict

from transfer.errors import TransferError

log = logging.getLogger("transfer")

CHECKPOINT_DIR = "checkpoints"
BEST = "best.ckpt"
LAST = "last.ckpt"
LATEST = "latest"
RESULTS = "results.json"


def run_folder_of(checkpoint: str | os.PathLike[str]) -> Path:
    """The run folder that wrote ``checkpoint`` (``<run>/checkpoints/<file>.ckpt``), links resolved."""
    return Path(checkpoint).expanduser().resolve().parent.parent


def best_checkpoint(run: str | os.PathLike[str]) -> Path:
    """The checkpoint a run folder was tested with: ``checkpoints/best.ckpt``, or for a run written
    before that name existed, the one its ``results.json`` names. A clear error otherwise."""
    folder = Path(run).expanduser()
    if not folder.is_dir():
        raise TransferError(f"Run folder '{folder}' does not exist; pass run=<a folder under outputs/runs/>.")
    best = folder / CHECKPOINT_DIR / BEST
    if best.is_file():
        return best
    results = folder / RESULTS
    if results.is_file():
        named = json.loads(results.read_text()).get("checkpoint")
        if named and Path(named).is_file():
            return Path(named)
    last = folder / CHECKPOINT_DIR / LAST
    hint = f" It has {last}: the run did not finish; pass ckpt={last} to use it anyway." if last.is_file() else ""
    raise TransferError(f"'{folder}' has no {CHECKPOINT_DIR}/{BEST} (a finished run writes it).{hint}")


def resolve_checkpoint(cfg: DictConfig) -> None:
    """Set ``cfg.ckpt`` from ``cfg.run`` when only the run folder was given; expand ``~`` in both.
    Giving both is refused: which one was meant cannot be known."""
    ckpt, run = cfg.get("ckpt"), cfg.get("run")
    if ckpt is not None and run is not None:
        raise TransferError(f"Pass ckpt= or run=, not both (ckpt={ckpt}, run={run}).")
    if ckpt is None and run is None:
        raise TransferError(
            "Which model? Pass run=<run folder> (e.g. run=outputs/runs/latest, its checkpoints/best.ckpt) "
            "or ckpt=<a .ckpt file>."
        )
    with open_dict(cfg):
        cfg.ckpt = str(best_checkpoint(run) if run is not None else Path(ckpt).expanduser())


def keep_best(checkpoint: str | os.PathLike[str], run_dir: Path) -> Path:
    """``checkpoints/best.ckpt``: a hard link to the run's best checkpoint (no second copy on disk),
    a copy where the file system has no hard links."""
    target = run_dir / CHECKPOINT_DIR / BEST
    target.parent.mkdir(parents=True, exist_ok=True)  # a resumed run's best may be the first run's file
    target.unlink(missing_ok=True)
    try:
        os.link(checkpoint, target)
    except OSError:
        shutil.copy2(checkpoint, target)
    return target


def link_latest(run_dir: Path) -> None:
    """Point ``<runs>/latest`` at ``run_dir`` (a relative symbolic link, replaced atomically, so a
    reader never sees it missing). Where links cannot be made (some Windows setups) it says so once
    in the log and the run goes on: the link is a convenience, not part of the run."""
    link = run_dir.parent / LATEST
    if link.exists() and not link.is_symlink():
        log.warning("'%s' exists and is not a link; not pointing it at this run.", link)
        return
    temporary = run_dir.parent / f".{LATEST}.{os.getpid()}"
    try:
        temporary.unlink(missing_ok=True)
        temporary.symlink_to(run_dir.name, target_is_directory=True)
        os.replace(temporary, link)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        log.warning("Could not point '%s' at this run (%s); use the run folder's own name.", link, error)
