"""`pip install .` gives a package that works away from the repo: configs inside, console commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.fixtures import FAST, ROOT, run_folders, write_image_folder

pytestmark = pytest.mark.slow  # see pyproject.toml: not in the developer's loop

COMMANDS = ["train", "evaluate", "predict", "explain", "export", "serve"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The wheel `pip install .` would install, unpacked into a folder of its own: (wheel, target)."""
    build = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(build), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    wheel = next(build.glob("transfer-*.whl"))
    target = build / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return wheel, target


def run_installed(target: Path, command: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    """The installed console script, with the installed package first on the path (not the repo's)."""
    env = {**os.environ, "PYTHONPATH": str(target)}
    return subprocess.run(
        [str(target / "bin" / f"transfer-{command}"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_wheel_holds_every_config_and_the_console_commands(installed: tuple[Path, Path]) -> None:
    wheel, _ = installed
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(archive.read(n).decode() for n in names if n.endswith("entry_points.txt"))
    configs = {f"transfer/conf/{p.relative_to(ROOT / 'conf').as_posix()}" for p in (ROOT / "conf").rglob("*.yaml")}
    assert configs and configs <= names, sorted(configs - names)
    for command in COMMANDS:
        assert f"transfer-{command} = transfer.cli.commands:{command}" in entry_points
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)


def test_installed_commands_train_evaluate_and_predict_outside_the_repo(
    installed: tuple[Path, Path], tmp_path: Path
) -> None:
    _, target = installed
    images = write_image_folder(tmp_path / "images", per_class=10)
    env = {**os.environ, "PYTHONPATH": str(target)}
    imported = subprocess.run(
        [sys.executable, "-c", "import transfer.conf; print(transfer.conf.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(imported.stdout.strip()).is_relative_to(target)  # the installed copy, not the repo

    trained = run_installed(target, "train", *FAST, "data=folder", f"data.root={images}", cwd=tmp_path)
    assert trained.returncode == 0, trained.stdout + trained.stderr
    (run_dir,) = run_folders(tmp_path / "outputs" / "runs")  # relative to where the command ran
    results = json.loads((run_dir / "results.json").read_text())
    ckpt = results["best_checkpoint"]["path"]

    evaluated = run_installed(target, "evaluate", f"ckpt={ckpt}", "num_workers=0", cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr
    (evaluation,) = (tmp_path / "outputs" / "evaluations").iterdir()
    report = json.loads((evaluation / "metrics.json").read_text())
    assert report["metrics"]["acc"] == pytest.approx(results["test"]["acc"], abs=1e-6)

    predicted = run_installed(
        target, "predict", f"ckpt={ckpt}", f"inputs={images / 'cat'}", "num_workers=0", cwd=tmp_path
    )
    assert predicted.returncode == 0, predicted.stdout + predicted.stderr
    (prediction,) = (tmp_path / "outputs" / "predictions").iterdir()
    assert len((prediction / "predictions.csv").read_text().splitlines()) == 1 + 10


def test_installed_train_uses_a_users_own_config_folder(installed: tuple[Path, Path], tmp_path: Path) -> None:
    _, target = installed
    images = write_image_folder(tmp_path / "images", per_class=4)
    (tmp_path / "my_conf" / "data").mkdir(parents=True)
    (tmp_path / "my_conf" / "data" / "parts.yaml").write_text(f"defaults:\n  - folder\nroot: {images}\nbatch_size: 4\n")
    composed = run_installed(
        target, "train", "--config-dir", "my_conf", "data=parts", "--cfg", "job", "--package", "data", cwd=tmp_path
    )
    assert composed.returncode == 0, composed.stdout + composed.stderr
    assert f"root: {images}" in composed.stdout and "batch_size: 4" in composed.stdout
    assert "transfer.data.sources.image_folder" in composed.stdout  # inherited from the packaged folder.yaml


def test_a_missing_extra_is_named_with_its_pip_command() -> None:
    from transfer.cli.extras import install_hint, missing_extras

    nothing_installed = lambda module: False
    asked = [
        "hparams_search=optuna",
        "logger=[csv,tensorboard]",
        "hydra/launcher=slurm",
        "logger=mlflow",
        "seed=1",
        "backbone=efficientnet_lite2",
    ]
    assert missing_extras(asked, nothing_installed) == ["optuna", "tensorboard", "slurm", "mlflow", "lite"]
    assert missing_extras(["logger=csv", "backbone=vgg16", "hydra/launcher=basic"], nothing_installed) == []
    assert missing_extras(asked) == []  # this environment has every extra (the dev extra)
    assert "pip install 'transfer[optuna,slurm]'" in install_hint(["optuna", "slurm"])
