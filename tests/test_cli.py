import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, write_config

COMMANDS = ["tokenizer", "prepare", "train", "average", "translate", "attention", "explore", "eval", "plot", "export", "import", "serve", "run", "config"]


# The console script pip installed beside this interpreter (a venv's bin/, or the system's).
MTKIT = str(Path(sys.executable).parent / "mtkit")


def mtkit(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """The installed console script, as a user runs it."""
    return subprocess.run([MTKIT, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "COLUMNS": "200"})


@pytest.mark.slow
def test_help_lists_every_stage():
    for command in ([MTKIT, "--help"], [sys.executable, "-m", "mtkit", "--help"]):
        result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
        assert result.returncode == 0, result.stderr
        listed = re.findall(r"^│ (\w+)\s", result.stdout, flags=re.M)
        assert sorted(listed) == sorted(COMMANDS)


def test_help_names_the_extras_to_install(cli):
    """Rich reads [ct2] in a help text as markup and drops it: the help said pip install 'mtkit'."""
    for argv, extra in ((["export"], "ct2"), (["import", "marian"], "hf"), (["serve"], "serve"), ([], "ct2")):
        code, out, _ = cli(*argv, "--help")
        assert code == 0 and f"'mtkit[{extra}]'" in " ".join(re.sub(r"[│╭╮╰╯─]", " ", out).split()), out


@pytest.mark.slow
def test_user_error_is_one_message_without_traceback(tmp_path):
    config = write_config(tmp_path, data={"src": "de", "tgt": "en"}, model={"heads": 3})
    result = mtkit("prepare", config)
    assert result.returncode == 2
    assert result.stderr.startswith("error: invalid config")
    assert "Traceback" not in result.stderr and "hint:" in result.stderr


def test_usage_error_exits_2(cli):
    code, _, err = cli("prepare")
    assert code == 2 and "Missing argument" in err


def readme_commands() -> tuple[str, str]:
    block = re.search(r"## Set-up: two commands\n\n<!-- run by tests/test_cli.py -->\n```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    main_job, tests = [line.split("#")[0].strip() for line in block.group(1).strip().splitlines()]
    return main_job, tests


def test_ci_runs_exactly_the_readme_test_command():
    _, tests = readme_commands()
    assert tests in (REPO / ".ci" / "run").read_text().splitlines()


@pytest.mark.slow
def test_readme_main_job_runs_on_a_fresh_directory(tmp_path):
    main_job, _ = readme_commands()
    setup, command = main_job.split(" && ")
    assert setup == "bash scripts/setup.sh"
    args = command.split()
    assert args[:2] == ["mtkit", "run"]
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "demo.yaml").write_bytes((REPO / args[2]).read_bytes())
    # The command as the README writes it (the demo's 3 minutes of training): a fresh folder, so
    # the config's relative paths resolve under it.
    result = mtkit(*args[1:], cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "data" / "demo" / "train.vs").is_file()
    assert (tmp_path / "runs" / "demo" / "checkpoints" / "best.pt").is_file()
    assert "sample translations" in result.stderr and "hyp: " in result.stderr
    assert re.search(r"│ BLEU\s+│\s+[\d.]+ │\s+nrefs:1\|case:mixed", result.stderr), result.stderr
    chrf = re.search(r"│ chrF\s+│\s+([\d.]+) │", result.stderr)
    assert float(chrf.group(1)) > 8.0, result.stderr  # untrained: ~2; 80 steps already reach 14
    hyps = (tmp_path / "runs/demo/eval/test.hyp").read_text().splitlines()
    assert len(hyps) == 1000
    again = mtkit(*args[1:], cwd=tmp_path)
    for stage in ("tokenizer", "prepare", "train", "eval"):
        assert f"{stage}: up to date" in again.stderr


def test_readme_config_error_example_is_real(cli, tmp_path, monkeypatch):
    readme = (REPO / "README.md").read_text()
    example = re.search(r"\$ mtkit run my.yaml\n(.*?)```", readme, re.S).group(1)
    (tmp_path / "my.yaml").write_text(
        "experiment:\n  name: x\ndata:\n  src: de\n  tgt: en\ntrain:\n  lr: 1e-3\n  dropout: 0.3\n"
        "model:\n  heads: 4\n  d_model: 250\n")
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("run", "my.yaml")
    assert code == 2
    assert err.strip() == example.strip()
