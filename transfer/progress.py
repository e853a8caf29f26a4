"""Progress bars for the long steps outside Lightning's loops: the image check, the augmentation
probe's and the feature cache's backbone passes, INT8 calibration.

Drawn with rich, as Lightning's ``RichProgressBar`` draws epochs, on standard error, and only on a
terminal: a log file or a pipe gets no bars, no escape codes and no carriage returns (the steps'
start and end are logged lines anyway). ``runtime.progress`` (``auto``: on a terminal; ``false``:
never; ``true``: also when standard error is not a terminal, e.g. for a notebook) chooses; under
DDP only the first process draws.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from lightning.pytorch.utilities import rank_zero_only
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

Item = TypeVar("Item")
MODES = ("auto", "true", "false")
_mode = "auto"
_console: Console | None = None  # tests hand in a recording console


def configure(mode: bool | str | None, console: Console | None = None) -> None:
    """``auto`` (or None), ``true`` or ``false``; ``console``: where to draw (standard error)."""
    global _mode, _console
    text = "auto" if mode is None else str(mode).lower()
    if text not in MODES:
        raise ValueError(f"runtime.progress={mode} is not one of {list(MODES)}.")
    _mode, _console = text, console


def shown() -> bool:
    """Whether bars are drawn now (this process, this setting, this terminal)."""
    if _mode == "false" or getattr(rank_zero_only, "rank", 0) != 0:
        return False
    return _mode == "true" or (_console.is_terminal if _console is not None else sys.stderr.isatty())


def track(items: Iterable[Item], description: str, total: int | None = None) -> Iterator[Item]:
    """``items``, with a bar of ``description`` while they are consumed (nothing when not `shown`)."""
    if not shown():
        yield from items
        return
    console = _console or Console(stderr=True)
    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(description, total=total if total is not None else _length(items))
        for item in items:
            yield item
            progress.advance(task)


def _length(items: Iterable[object]) -> int | None:
    try:
        return len(items)  # type: ignore[arg-type]
    except TypeError:
        return None
