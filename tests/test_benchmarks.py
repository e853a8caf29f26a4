"""The benchmark scripts run end to end (at toy scale here; the README's figures are full scale)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.fixtures import ROOT, run_folders, train_run

pytestmark = pytest.mark.slow  # see pyproject.toml: not in the developer's loop


def test_speed_benchmark_prints_every_row_and_the_target_ratios() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/speed.py",
            "--model",
            "test_resnet",
            "--size",
            "32",
            "--batch",
            "4",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--unfreeze",
            "1",
            "--workers",
            "0",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    names = [row.split("|")[1].strip() for row in rows]
    assert names[:5] == [
        "data pipeline, 0 worker(s)",
        "data pipeline, main process",
        "head only (unfreeze 0)",
        "partial (unfreeze 1)",
        "full (unfreeze all)",
    ]
    for row in rows[2:5]:  # toolkit and plain loop measured side by side, with peak memory
        toolkit, plain, ratio, toolkit_mb, plain_mb = (float(v) for v in row.split("|")[2:7])
        # The table prints img/s with one decimal: allow for that rounding (large on a slow, loaded CPU).
        rounding = 0.05 / toolkit + 0.05 / plain
        assert toolkit > 0 and plain > 0 and ratio == pytest.approx(toolkit / plain, rel=0.02 + rounding, abs=0.015)
        assert toolkit_mb > 100 and plain_mb > 100
    assert names[-2:] == [
        "frozen forward pass, images in memory (the limit)",
        "augment=auto probe, 7 views an image, 0 worker(s)",
    ]
    for label in (
        "head only / full",
        "feature cache / no cache",
        "fastest stage's consumption",
        "probe (0 worker(s)) / forward limit",
    ):
        assert re.search(re.escape(label) + r".*: \d+\.\d+x", done.stdout), label


def test_panel_runs_default_hand_chosen_and_pixel_baseline_end_to_end(tmp_path) -> None:
    tiny = [
        "backbone=timm",
        "backbone.name=test_resnet",
        "backbone.weights=none",
        "input.size=32",
        "data.num_workers=0",
        "schedule.stages.0.epochs=1",
        "schedule.stages.1.epochs=1",
        "schedule.min_steps=0",
        "schedule.stages.1.unfreeze=1",
        "data.max_images=80",
    ]
    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/panel.py",
            "--datasets",
            "elpv_defective",
            "faces_few",
            "--workdir",
            str(tmp_path / "panel"),
            "--max-seeds",
            "2",
            "--",
            *tiny,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split("|")[1].strip() for row in rows] == ["elpv_defective", "faces_few"]
    for row in rows:
        cells = [cell.strip() for cell in row.split("|")[1:-1]]
        default, f1, minutes, chosen, hand, setting, pixels, method = cells[1:]
        assert method in ("logistic regression", "RBF SVM")
        for accuracy in (default, hand, pixels):
            assert 0.0 <= float(accuracy.split("%")[0]) <= 100.0
        assert float(hand.split("%")[0]) >= float(default.split("%")[0])  # the best of default and alternatives
        assert float(minutes) > 0 and 0.0 <= float(f1) <= 1.0
    elpv, faces = rows
    assert "SquareSymmetry" in elpv and "auto:" not in elpv  # ELPV names its own (cells)
    assert "auto:" in faces  # a folder of images gets augment=auto
    assert "±" in faces and "±" not in elpv  # the few-image dataset averages its seeds
    runs = [p.name for p in run_folders(tmp_path / "panel" / "runs")]
    assert runs == [
        "elpv_defective-default",
        *(f"elpv_defective-hand{i}" for i in range(5)),
        *(
            f"faces_few-{setting}-seed{seed}"
            for setting in ("default", "hand0", "hand1", "hand2", "hand3")
            for seed in (42, 43)
        ),
    ]
    for run in runs:
        assert (tmp_path / "panel" / "runs" / run / "results.json").is_file()


def test_int8_benchmark_prints_each_runtime_with_speed_and_accuracy(tmp_path) -> None:
    from tests.fixtures import FAST, write_image_folder

    images = write_image_folder(tmp_path / "images", per_class=12)
    results = train_run([*FAST, "data=folder", f"data.root={images}", "augment=none"], tmp_path / "run")
    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/int8.py",
            "--ckpt",
            results["best_checkpoint"]["path"],
            "--out",
            str(tmp_path / "int8"),
            "--repeats",
            "1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {
        line.split("|")[1].strip(): line
        for line in done.stdout.splitlines()
        if line.startswith("| ") and "---" not in line and "runtime" not in line
    }
    assert set(rows) == {"PyTorch eager (fp32)", "ONNX Runtime fp32", "ONNX Runtime INT8 (static)"}
    for row in rows.values():
        cells = [c.strip() for c in row.split("|")[2:-1]]
        assert float(cells[0]) > 0 and float(cells[1]) > 0 and cells[3].endswith("%")
    assert "INT8 - fp32 test accuracy" in done.stdout


def test_serve_load_accounts_for_every_request(tmp_path) -> None:
    pytest.importorskip("litserve")
    from tests.fixtures import FAST, write_image_folder

    images = write_image_folder(tmp_path / "images", per_class=12)
    results = train_run([*FAST, "data=folder", f"data.root={images}", "augment=none"], tmp_path / "run")
    done = subprocess.run(
        [
            sys.executable,
            "benchmarks/serve_load.py",
            "--ckpt",
            results["best_checkpoint"]["path"],
            "--requests",
            "12",
            "--clients",
            "1",
            "4",
            "--workdir",
            str(tmp_path / "load"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    limits, served = done.stdout.split("Served")
    limit_rows = [line.split("|")[1:-1] for line in limits.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r[0].strip() for r in limit_rows[1:]] == ["PyTorch", "ONNX Runtime fp32"]
    assert all(float(cell) > 0 for r in limit_rows[1:] for cell in r[1:])
    rows = [line.split("|")[1:-1] for line in served.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [(r[0].strip(), r[1].strip(), int(r[2])) for r in rows] == [
        (runtime, batching, clients)
        for runtime in ("PyTorch", "ONNX Runtime fp32")
        for batching in ("on (8)", "off")
        for clients in (1, 4)
    ]
    for row in rows:
        sent, answered, failed = (int(cell) for cell in row[3:6])
        assert sent == 12 and answered == 12 and failed == 0
        assert float(row[6]) > 0 and row[7].strip().endswith("%")
        assert 0 < float(row[8]) <= float(row[9]) <= float(row[10])
