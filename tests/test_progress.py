"""Progress on the long steps outside Lightning's loops: drawn on a terminal, absent from logs and pipes."""

from __future__ import annotations

import io
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from tests.fixtures import FAST, ROOT, write_image_folder
from transfer import progress
from transfer.data.scan import find_bad_images

ESCAPES = ("\x1b[", "\r", "━")  # what a bar leaves in a text: escape codes, carriage returns, its glyph


@pytest.fixture
def restore_progress():
    yield
    progress.configure("auto")


def test_a_bar_is_drawn_on_a_terminal_and_nothing_elsewhere(tmp_path: Path, restore_progress) -> None:
    images = [str(p) for p in sorted(write_image_folder(tmp_path, per_class=5).rglob("*.png"))]
    screen = io.StringIO()
    progress.configure("auto", Console(file=screen, force_terminal=True, width=100))
    assert find_bad_images(images) == []
    assert "Checking images" in screen.getvalue() and "10/10" in screen.getvalue()
    pipe = io.StringIO()
    progress.configure("auto", Console(file=pipe, force_terminal=False))
    assert find_bad_images(images) == [] and pipe.getvalue() == ""
    screen = io.StringIO()
    progress.configure("false", Console(file=screen, force_terminal=True))
    assert find_bad_images(images) == [] and screen.getvalue() == ""
    with pytest.raises(ValueError, match="runtime.progress=sometimes"):
        progress.configure("sometimes")


def plan_command(images: Path, out: Path) -> list[str]:
    overrides = [o for o in FAST if not o.startswith("augment=")]
    return [sys.executable, str(ROOT / "train.py"), *overrides, "data=folder", f"data.root={images}", "augment=auto",
            "augment.probe.max_images=200", "augment.probe.cache=false", "plan_only=true",
            f"hydra.run.dir={out}"]  # fmt: skip


@pytest.mark.slow  # two subprocess plans on 1,000 images
def test_scan_and_probe_show_progress_on_a_terminal_and_none_in_logs(tmp_path: Path) -> None:
    images = write_image_folder(tmp_path / "images", per_class=500, size=32)
    # On a terminal (a pseudo-terminal as standard error): the bars are drawn.
    controller, terminal = pty.openpty()
    done = subprocess.Popen(
        plan_command(images, tmp_path / "tty"), stdout=subprocess.DEVNULL, stderr=terminal, cwd=tmp_path
    )
    os.close(terminal)
    drawn = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        drawn += chunk
    assert done.wait(timeout=600) == 0
    screen = drawn.decode(errors="replace")
    assert "Checking images" in screen and "1000/1000" in screen
    # one pass, each image decoded once; 10% of this short plan affords the flips and the turn only
    assert "augment=auto probe: 200 images, originals + 3 views" in screen
    # Through pipes (a log, a CI job): the same steps as log lines, and no bar.
    piped = subprocess.run(plan_command(images, tmp_path / "pipe"), capture_output=True, text=True, cwd=tmp_path)
    assert piped.returncode == 0, piped.stderr[-2000:]
    log = (tmp_path / "pipe" / "train.log").read_text()
    assert "Checking that all 1000 images" in log and "augment=auto: probing" in log
    for text in (log, piped.stdout, piped.stderr):
        assert not any(mark in text for mark in ESCAPES), [m for m in ESCAPES if m in text]
