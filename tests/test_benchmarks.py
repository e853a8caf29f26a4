"""The benchmark scripts run end to end (at toy scale here; the README's figures are full scale)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def test_speed_benchmark_prints_every_row_and_the_target_ratios() -> None:
    done = subprocess.run(
        [sys.executable, "benchmarks/speed.py", "--model", "test_resnet", "--size", "32", "--batch", "4",
         "--steps", "2", "--warmup", "1", "--unfreeze", "1", "--workers", "0"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    names = [row.split("|")[1].strip() for row in rows]
    assert names[:5] == ["data pipeline, 0 worker(s)", "data pipeline, main process", "head only (unfreeze 0)",
                         "partial (unfreeze 1)", "full (unfreeze all)"]
    for row in rows[2:5]:  # toolkit and plain loop measured side by side, with peak memory
        toolkit, plain, ratio, toolkit_mb, plain_mb = (float(v) for v in row.split("|")[2:7])
        assert toolkit > 0 and plain > 0 and ratio == pytest.approx(toolkit / plain, rel=0.02, abs=0.01)
        assert toolkit_mb > 100 and plain_mb > 100
    for label in ("head only / full", "feature cache / no cache", "fastest stage's consumption"):
        assert re.search(re.escape(label) + r".*: \d+\.\d+x", done.stdout), label
