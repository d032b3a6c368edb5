"""The README and docs/ show only commands that work: every ```bash block is run here (in a scratch
folder, on a small demo model), or is run by another test that says so, or is marked as needing
what the tests do not have; every `mtkit` command written in the text names real options."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main

from mtkit.cli import app
from tests.conftest import REPO, tiny_config
from tests.helpers import blocks, commands

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# The order the runnable blocks go in, in one scratch folder: training makes runs/demo first.
ORDER = ["docs/training.md", "README.md", "docs/translating.md", "docs/seeing-inside.md", "docs/ctranslate2.md"]


def test_every_block_is_run_or_marked():
    unmarked_elsewhere = []
    for page in PAGES:
        name = str(page.relative_to(REPO))
        for mark, lang, body in blocks(page):
            if mark and mark.startswith("run by "):
                test_file = REPO / mark.removeprefix("run by ").strip()
                assert test_file.is_file(), f"{name}: {mark}"
                assert name.split("/")[-1] in test_file.read_text(encoding="utf-8"), f"{test_file} does not read {name}"
            elif mark:
                assert mark.startswith("not run by the tests: ") and len(mark) > 30, f"{name}: say why: {mark}"
            elif lang in ("bash", "python") and name not in ORDER:
                unmarked_elsewhere.append(name)
            assert lang != "python" or mark, f"{name}: a Python block is run by a test that says so"
    assert unmarked_elsewhere == [], "pages with runnable blocks belong in ORDER"


@pytest.fixture(scope="module")
def scratch(tmp_path_factory, demo_dir) -> Path:
    """A folder as a reader's: configs/demo.yaml (a tiny model, a short run, a 100-line test
    split), input.txt and reference.txt (20 demo test lines)."""
    root = tmp_path_factory.mktemp("docs")
    data = root / "data" / "demo"
    data.mkdir(parents=True)
    for split in ("train", "valid"):
        for lang in ("en", "vs"):
            (data / f"{split}.{lang}").symlink_to(demo_dir / f"{split}.{lang}")
    test = {lang: (demo_dir / f"test.{lang}").read_text(encoding="utf-8").splitlines() for lang in ("en", "vs")}
    for lang, lines in test.items():
        (data / f"test.{lang}").write_text("\n".join(lines[:100]) + "\n", encoding="utf-8")
    (root / "input.txt").write_text("\n".join(test["en"][:20]) + "\n", encoding="utf-8")
    (root / "reference.txt").write_text("\n".join(test["vs"][:20]) + "\n", encoding="utf-8")
    (root / "configs").mkdir()
    config = tiny_config(root / "configs", data, max_steps=40, eval_every=20, save_every=20, lr=5e-3, warmup=10)
    text = config.read_text(encoding="utf-8").replace("format: demo", "format: text")
    text = text.replace(str(root / "configs" / "run"), "runs/demo")
    (root / "configs" / "demo.yaml").write_text(text, encoding="utf-8")
    config.unlink()
    return root


def runnable() -> list[tuple[str, str]]:
    """(page, command) of each unmarked bash block, in ORDER; a command shown twice runs once."""
    found: dict[str, str] = {}
    for name in ORDER:
        for mark, lang, body in blocks(REPO / name):
            if lang == "bash" and not mark:
                for command in commands(body):
                    found.setdefault(command, name)
    return [(name, command) for command, name in found.items()]


def test_the_runnable_commands_are_found():
    names = {name for name, _ in runnable()}
    assert names == set(ORDER)  # each page of ORDER still has commands to run


@pytest.mark.slow
def test_every_runnable_command_works(scratch):
    for name, command in runnable():
        result = subprocess.run(["bash", "-c", command], cwd=scratch, capture_output=True, text=True,
                                env={**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent),
                                                                            os.environ.get("PATH", "")])})
        assert result.returncode == 0, f"{name}: {command}\n{result.stderr[-2000:]}"
        assert "Traceback" not in result.stderr and "error:" not in result.stderr, f"{name}: {command}"
        for flag in ("-o", "--output"):
            words = shlex.split(command)
            if flag in words:
                assert (scratch / words[words.index(flag) + 1]).exists(), f"{name}: {command} wrote nothing"


def written_commands() -> list[tuple[str, str]]:
    """Every `mtkit ...` in the text: inline code and the lines of any block."""
    found = []
    for page in PAGES:
        text = page.read_text(encoding="utf-8")
        name = str(page.relative_to(REPO))
        found += [(name, m) for m in re.findall(r"`(mtkit [^`]+)`", text)]
        for _, _, body in blocks(page):
            found += [(name, line.split(" #")[0].strip()) for line in body.splitlines()
                      if line.strip().startswith(("mtkit ", "$ mtkit "))]
    return found


def test_every_written_command_names_real_options():
    root = typer.main.get_command(app)
    checked = 0
    for name, command in written_commands():
        words = command.removeprefix("$ ").replace("[", " ").replace("]", " ").replace("|", " ").split()[1:]
        cmd = root
        while words and hasattr(cmd, "commands") and words[0] in cmd.commands:
            cmd = cmd.commands[words.pop(0)]
        if cmd is root:
            continue  # `mtkit CMD --help`, `mtkit run`'s summary words: no command named
        options = {opt for param in cmd.params for opt in [*param.opts, *param.secondary_opts]} | {"--help"}
        unknown = [w.split("=")[0] for w in words if w.startswith("-") and w.split("=")[0] not in options]
        assert unknown == [], f"{name}: `{command}`: {unknown} are not options of mtkit {cmd.name}"
        checked += 1
    assert checked > 40


@pytest.mark.slow
def test_the_sizes_the_pages_state_are_current():
    """README and docs count the bad-input table and the lines of mtkit/ and model.py: counts that drift
    as rows and code arrive (the table was said to be 251 tests when it was 253)."""
    collected = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-n", "0",
                                "tests/test_bad_input.py", "tests/test_bad_input_commands.py"],
                               cwd=REPO, capture_output=True, text=True, timeout=300)
    tests = sum("::" in line for line in collected.stdout.splitlines())
    readme, page = (REPO / "README.md").read_text(encoding="utf-8"), (REPO / "docs/tests.md").read_text(encoding="utf-8")
    said = re.findall(r"the ([\d,]+)-row bad-input table", readme) + re.findall(r"bad-input table: ([\d,]+) things", page)
    assert tests > 200 and [int(n.replace(",", "")) for n in said] == [tests, tests], (said, tests)
    lines = sum(len(p.read_text(encoding="utf-8").splitlines()) for p in (REPO / "mtkit").glob("*.py"))
    about = int(re.search(r"`mtkit/` is about ([\d,]+) lines", readme)[1].replace(",", ""))
    assert abs(about - lines) <= 150, f"README says mtkit/ is about {about:,} lines; it is {lines:,}"
    model = len((REPO / "mtkit/model.py").read_text(encoding="utf-8").splitlines())
    about = int(re.search(r"about ([\d,]+) lines", (REPO / "docs/model.md").read_text(encoding="utf-8"))[1])
    assert abs(about - model) <= 30, f"docs/model.md says model.py is about {about} lines; it is {model}"
