"""Every command the README, docs/ and the comments in conf/ show runs as written, in bash and zsh.

The commands (``python train.py ...``, ``transfer-evaluate ...``; in code blocks, inline, over
several lines) are extracted from the text, handed to bash and to an interactive zsh with its
default options (where a trailing ``# comment`` is not a comment and an unquoted ``[a,b]`` is a
failed glob), and must reach the program as the same words. Placeholders are real: ``$HOME`` is
a folder with the images, CSV files and weights the docs name, ``outputs/runs/latest`` a tiny
finished run, ``$ELPV`` a few ELPV cells, and the files a doc page shows in a code block under a
``# path`` line (``my_conf/...``, ``my_sources.py``) are written where it says.

Then each command runs far enough to reject a bad name or value: the config composes (every key
and option exists), a training command builds its plan (``plan_only=true``, on at most 48 images
at 64 px and without downloading weights, unless the command sets those itself), and the commands
after training run on the tiny run (the server is built, not started). What needs the internet
(the hot dog archive) is composed only. A command that names a run to resume is checked to
resolve to a checkpoint written by this toolkit; its plan is built without it, since the tiny
run is not the run it would continue.

The test fails if it finds fewer commands than `AT_LEAST`: a doc that loses its commands, or a
change to the extraction, shows up here.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from tests.fixtures import FAST, ROOT, write_image_folder
from transfer.api import fine_tune
from transfer.config.compose import compose
from transfer.config.run_folder import resolve_checkpoint
from transfer.training.resume import read_resume

pytestmark = pytest.mark.slow  # builds about a hundred plans

AT_LEAST = 91  # distinct commands found when this was written; raise it as docs grow
PROGRAMS = ("train", "evaluate", "predict", "explain", "export", "serve")
START = re.compile(
    rf"(python (?P<script>{'|'.join(PROGRAMS)})\.py|transfer-(?P<command>{'|'.join(PROGRAMS)}))(?![\w.-])"
)
LEADS = re.compile(r"^(\w+=\S*\s+)*")  # VAR=value words before a program
FILE_HEADER = re.compile(r"^# (?P<path>(my_conf/[\w/]+\.yaml|my_\w+\.py))\b")
NEEDS_INTERNET = ("data=hotdog", "experiment=hotdog")
# Applied when the command does not set the key itself: a plan in seconds, nothing downloaded.
QUICK = {
    "data.max_images": "48",
    "input.size": "64",
    "backbone.weights": "none",
    "data.num_workers": "0",
    "lr_find.num_training": "5",
}


@dataclass(frozen=True)
class DocCommand:
    where: str  # file:line
    text: str  # as written, from the program's name on (with any VAR= before it)

    @property
    def program(self) -> str:
        match = START.search(self.text)
        assert match is not None
        return match["script"] or match["command"]


def shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def markdown_commands(path: Path) -> Iterator[DocCommand]:
    lines = path.read_text().splitlines()
    fenced = False
    index = 0
    while index < len(lines):
        line, where = lines[index], f"{shown(path)}:{index + 1}"
        index += 1
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            text = line.strip().removeprefix("$ ")
            while text.endswith("\\") and index < len(lines):
                text = text[:-1].rstrip() + " " + lines[index].strip()
                index += 1
            if START.match(text, LEADS.match(text).end()):  # type: ignore[union-attr]
                yield DocCommand(where, text)
        else:
            for span in re.findall(r"`([^`]+)`", line):
                if START.match(span):
                    yield DocCommand(where, span)


def yaml_commands(path: Path) -> Iterator[DocCommand]:
    """Commands in comments: from the program's name to two spaces or the end of the line, with
    ``\\`` continuing on the next comment line."""
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines):
        comment = line.partition("#")[2] if line.lstrip().startswith("#") else ""
        match = START.search(comment)
        if not match:
            continue
        text = re.split(r"\s{2,}", comment[match.start() :].strip())[0]
        following = number + 1
        while text.endswith("\\") and following < len(lines):
            text = text[:-1].rstrip() + " " + re.split(r"\s{2,}", lines[following].lstrip().lstrip("#").strip())[0]
            following += 1
        yield DocCommand(f"{shown(path)}:{number + 1}", text)


def doc_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def all_commands() -> list[DocCommand]:
    found = [c for page in doc_pages() for c in markdown_commands(page)]
    found += [c for path in sorted((ROOT / "conf").rglob("*.yaml")) for c in yaml_commands(path)]
    return found


def doc_files() -> dict[str, str]:
    """The files the docs show under a ``# path`` line (a user's config folder, modules)."""
    files = {}
    for page in doc_pages():
        for block in re.findall(r"```\w*\n(.*?)```", page.read_text(), flags=re.S):
            header = FILE_HEADER.match(block)
            if header:
                files[header["path"]] = block
    return files


def words(shell: list[str], text: str, env: dict[str, str], cwd: Path) -> list[str]:
    """The words ``text`` hands its program in ``shell``: the program is replaced by a shell function
    that prints its arguments, and ``PATH`` is empty, so nothing else in the line can run."""
    line = 'words() { for word in "$@"; do printf \'%s\\0\' "$word"; done; }; ' + START.sub("words", text, count=1)
    empty = cwd.parent / "empty_path"
    empty.mkdir(exist_ok=True)
    done = subprocess.run(
        shell, input=line + "\n", env={**env, "PATH": str(empty)}, cwd=cwd, capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0 and "not found" not in done.stderr, f"{shell[0]}: {done.stderr.strip()[-300:]}"
    return done.stdout.split("\0")[:-1]


def first_of_each_sweep(overrides: list[str]) -> list[str]:
    """A multirun's first job: each sweep (``a,b,c``, ``range(...)``) at its first value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    single = []
    for parsed in OverridesParser.create().parse_overrides(overrides):
        if parsed.is_sweep_override():
            value = next(iter(parsed.sweep_string_iterator()))
            single.append(f"{parsed.get_key_element()}={value}")
        else:
            single.append(parsed.input_line)
    return single


@dataclass
class Invocation:
    overrides: list[str]
    config_dir: str | None = None
    multirun: bool = False
    flags: tuple[str, ...] = ()


def parse_arguments(arguments: list[str]) -> Invocation:
    call = Invocation([])
    flags: list[str] = []
    rest = iter(arguments)
    for argument in rest:
        if argument in ("--config-dir", "-cd"):
            call.config_dir = next(rest)
        elif argument.startswith("--config-dir="):
            call.config_dir = argument.split("=", 1)[1]
        elif argument in ("-m", "--multirun"):
            call.multirun = True
        elif argument == "--cfg":
            flags += [argument, next(rest)]
        elif argument.startswith("-"):
            flags.append(argument)
        else:
            call.overrides.append(argument)
    call.flags = tuple(flags)
    return call


def key_of(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Iterator[dict]:
    """Where the docs' commands run: a home folder with their data, a finished tiny run."""
    root = tmp_path_factory.mktemp("docs")
    home, work = root / "home", root / "work"
    for name, classes in (
        ("photos", ("cat", "dog")),
        ("pictures", ("cat", "dog")),
        ("few_photos", ("cat", "dog")),
        ("new_photos", ("cat", "dog")),
        ("grades", ("none", "mild", "severe")),
        ("dishes", ("fried", "spicy")),
    ):
        write_image_folder(home / name, per_class=12, size=40, classes=classes)
    parts = home / "parts"
    parts.mkdir()
    for image in sorted((home / "photos").rglob("*.png")):
        shutil.copy(image, parts / image.name)  # <label>_<id>.png
    photos = sorted((home / "photos").rglob("*.png"))
    rows = {
        "labels.csv": ["path,label", *(f"{p},{p.parent.name}" for p in photos)],
        "dishes.csv": ["path,label,fried,spicy"]
        + [
            f"{p},{['fried', 'spicy', 'fried;spicy'][i % 3]},{int(i % 3 != 1)},{int(i % 3 != 0)}"
            for i, p in enumerate(photos)
        ],
        "ages.csv": ["path,age,label"] + [f"{p},{20 + i},{20 + i}" for i, p in enumerate(photos)],
        "cells.csv": ["path,area,length"] + [f"{p},{i},{2 * i}" for i, p in enumerate(photos)],
    }
    for name, lines in rows.items():
        (home / name).write_text("\n".join(lines) + "\n")
    save_file(timm.create_model("tf_efficientnet_lite0").state_dict(), str(home / "weights.safetensors"))
    timm.models.save_for_hf(timm.create_model("resnet18"), str(home / "resnet18"))
    elpv = root / "elpv"
    elpv.mkdir()
    for index, image in enumerate(photos[:12]):
        shutil.copy(image, elpv / f"cell{index + 1:04d}.png")
    work.mkdir()
    for relative, text in doc_files().items():
        (work / relative).parent.mkdir(parents=True, exist_ok=True)
        (work / relative).write_text(text)
    previous = Path.cwd()
    os.chdir(work)
    sys.path.insert(0, str(work))
    env = {**os.environ, "HOME": str(home), "ELPV": str(elpv), "PYTHONPATH": str(work)}
    saved_home = os.environ["HOME"]
    os.environ.update(HOME=str(home), ELPV=str(elpv))
    try:
        # augment=auto, so that the run has augment/chosen.yaml (docs/data.md's --config-dir RUN_DIR)
        fine_tune([*FAST, "data=folder", f"data.root={home / 'photos'}", "augment=auto", "schedule.stages.0.epochs=2"])
        assert (work / "outputs" / "runs" / "latest" / "checkpoints" / "best.ckpt").is_file()
        yield {"home": home, "work": work, "env": env, "root": root}
    finally:
        os.chdir(previous)
        sys.path.remove(str(work))
        os.environ["HOME"] = saved_home
        os.environ.pop("ELPV", None)


def shells() -> list[list[str]]:
    found = [[str(shutil.which("bash")), "--norc", "--noprofile"]]
    if shutil.which("zsh"):
        found.append([str(shutil.which("zsh")), "-f", "-i"])  # interactive, default options: what a macOS terminal runs
    return found


def test_the_docs_show_at_least_the_commands_they_did() -> None:
    distinct = {c.text for c in all_commands()}
    assert len(distinct) >= AT_LEAST, f"{len(distinct)} distinct commands found, expected at least {AT_LEAST}"


def test_zsh_is_there_to_check_the_commands_in() -> None:
    if os.environ.get("CI_REQUIRES_ZSH"):
        assert shutil.which("zsh"), ".ci/run installs zsh: the docs' commands are checked in it"


def run_command(command: DocCommand, world: dict, counter: Iterator[int]) -> None:
    per_shell = [words(shell, command.text, world["env"], world["work"]) for shell in shells()]
    for other in per_shell[1:]:
        assert other == per_shell[0], f"bash and zsh differ: {per_shell[0]} != {other}"
    call = parse_arguments(per_shell[0])
    overrides = first_of_each_sweep(call.overrides) if call.multirun else call.overrides
    config_dir = call.config_dir
    out = world["root"] / "out" / str(next(counter))
    if any(flag in ("--help", "-h", "--cfg", "--info") for flag in call.flags):
        compose(command.program, overrides, config_dir=config_dir, output_dir=out)
        return
    if command.program == "train":
        cfg = compose("train", overrides, config_dir=config_dir, output_dir=out)
        if cfg.get("resume"):
            if cfg.cv.folds:  # a cross-validation resumes from its folder
                assert Path(cfg.resume).is_dir(), cfg.resume
            else:
                assert "stage_index" in read_resume(cfg.resume)
        overrides = [o for o in overrides if key_of(o) not in ("resume", "resume_allow_changes")]
        if any(o in NEEDS_INTERNET for o in overrides):
            return
        if cfg.trainer.get("sync_batchnorm") and not torch.cuda.is_available():
            return  # SyncBatchNorm is refused on CPU processes: composed only here
        cfg_keys = {key_of(o) for o in overrides}
        quick = [f"{k}={v}" for k, v in QUICK.items() if k not in cfg_keys]
        result = fine_tune([*overrides, *quick, "plan_only=true"], config_dir=config_dir, run_dir=out)
        assert result.plan is not None and result.plan.stages
        return
    cfg = compose(command.program, overrides, config_dir=config_dir, output_dir=out)
    if command.program == "serve":
        from transfer.inference.serve import build_server, serving_plan

        resolve_checkpoint(cfg)
        build_server(cfg, serving_plan(cfg))
        return
    from transfer.cli.commands import job_from

    job = {
        "evaluate": "transfer.inference.evaluate.evaluate",
        "predict": "transfer.inference.predict.predict",
        "explain": "transfer.inference.explain.explain_files",
        "export": "transfer.inference.export.export",
    }[command.program]
    job_from(job)(cfg)


def test_every_documented_command_runs_as_written(world: dict) -> None:
    seen: dict[str, DocCommand] = {}
    for command in all_commands():
        if command.program != "train" and START.fullmatch(command.text):
            continue  # a bare name (the commands' table): it needs a model to run
        seen.setdefault(command.text, command)
    counter = itertools.count()
    failures = []
    for text, command in seen.items():
        try:
            run_command(command, world, counter)
        except Exception as error:  # collected: one run names every broken command
            failures.append(f"{command.where}: {text}\n    {type(error).__name__}: {str(error).strip()[:400]}")
    assert not failures, f"{len(failures)} of {len(seen)} documented commands fail:\n" + "\n".join(failures)


def test_the_extraction_finds_multi_line_inline_and_comment_commands(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text(
        "Run `python train.py a=1` then:\n\n```bash\n$ python evaluate.py run=x \\\n    split=val\n"
        "echo python train.py\n```\n"
    )
    found = [c.text for c in markdown_commands(page)]
    assert found == ["python train.py a=1", "python evaluate.py run=x split=val"]
    config = tmp_path / "x.yaml"
    config.write_text("# Use:  python train.py data=folder \\\n#   data.root=$HOME/photos   what it does\nkey: 1\n")
    assert [c.text for c in yaml_commands(config)] == ["python train.py data=folder data.root=$HOME/photos"]


def test_a_bad_name_in_a_command_is_caught(world: dict) -> None:
    bad = DocCommand("x", "python train.py schedule.stages.0.epoch=3")
    with pytest.raises(Exception, match="epoch"):
        run_command(bad, world, itertools.count(10_000))
    unquoted = DocCommand("x", "python train.py 'logger=[csv,tensorboard]' callbacks=[ema]")
    if shutil.which("zsh"):
        with pytest.raises(AssertionError, match="no matches found"):
            run_command(unquoted, world, itertools.count(20_000))
    commented = DocCommand("x", "python train.py plan_only=true   # a comment")
    if shutil.which("zsh"):
        with pytest.raises(AssertionError, match="differ"):
            run_command(commented, world, itertools.count(30_000))


def test_words_in_bash_are_what_the_program_gets(world: dict) -> None:
    got = words(
        shells()[0], "python train.py \"inputs='$ELPV/*.png'\" data.root=$HOME/photos", world["env"], world["work"]
    )
    assert got == [f"inputs='{world['env']['ELPV']}/*.png'", f"data.root={world['home']}/photos"]
