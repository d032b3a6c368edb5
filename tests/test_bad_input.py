"""The bad-input table: what a user hands mtkit (configs, corpora, text to translate, checkpoints,
workdirs), each through the real command line. A row is either refused with exactly one clear
message and exit code 2 (`Refused`), or it is legitimate input that is handled correctly
(`Handled`, with the check of what "correctly" means). Never a traceback, never a lost line.

How many rows there are: python -m pytest --collect-only -q tests/test_bad_input.py
"""

import shutil
from pathlib import Path

import pytest

from mtkit import checkpoint
from tests.conftest import tiny_config, write_config
from tests.bad_input_rows import (CHECKPOINTS, CONFIGS, CORPUS_HANDLED, CORPUS_REFUSED, DATA, GOOD, TRANSLATE, WORKDIRS,
                                   altered, cut_in_half, decode_splits, lines_out, sets, spoiled, translate,
                                   translate_in_process, write_split)
from tests.helpers import Refused, assert_refused, unwritable_dir


@pytest.mark.parametrize("row", sorted(CONFIGS))
def test_config(cli, tmp_path, monkeypatch, row):
    text, overrides, outcome = CONFIGS[row]
    path = tmp_path / "config.yaml"
    if text == "folder":
        path.mkdir()
    elif isinstance(text, bytes):
        path.write_bytes(text)
    elif text is not None:
        path.write_text(text + f"experiment:\n  workdir: {tmp_path / 'run'}\n" if text.startswith(DATA) else text)
    monkeypatch.chdir(tmp_path)  # relative paths (data.dir, runs/) resolve under tmp_path
    code, _, err = cli("run", path, *sets(overrides))
    if isinstance(outcome, Refused):
        assert_refused(code, err, outcome.message)
        made = [p for p in tmp_path.rglob("*") if p != path and p.parent != path]
        assert made in ([], [tmp_path / "run"]) and not any((tmp_path / "run").glob("*"))  # stopped before any work
    else:
        outcome.check(cli, path)


@pytest.fixture
def corpus_dir(tmp_path) -> Path:
    folder = tmp_path / "corpus"
    folder.mkdir()
    for split in ("train", "valid", "test"):
        write_split(folder, split, *GOOD)
    return folder


@pytest.mark.parametrize("row", sorted(CORPUS_REFUSED))
def test_corpus_refused(cli, tmp_path, corpus_dir, row):
    spoil, overrides, message = CORPUS_REFUSED[row]
    code, _, err = cli("run", spoiled(tmp_path, corpus_dir, spoil), *sets(overrides))
    assert_refused(code, err, message)
    run_dir = tmp_path / "run"  # nothing half-done is left behind (at most the finished tokenizer)
    assert not run_dir.exists() or sorted(p.name for p in run_dir.iterdir()) == ["tokenizer"]


@pytest.mark.parametrize("row", sorted(CORPUS_HANDLED))
def test_corpus_handled(cli, tmp_path, corpus_dir, row):
    spoil, overrides, check = CORPUS_HANDLED[row]
    config = spoiled(tmp_path, corpus_dir, spoil)
    for stage in (["tokenizer", "train"], ["prepare"]):
        code, _, err = cli(*stage, config, *sets(overrides))
        assert code == 0, err
    check(*decode_splits(tmp_path / "run"))


@pytest.mark.parametrize("row", sorted(TRANSLATE))
def test_translate(cli, monkeypatch, trained, tmp_path, row):
    args, stdin, shell_tail, outcome = TRANSLATE[row]
    places = {"tmp": tmp_path}
    if any("{unwritable}" in a for a in args):
        places["unwritable"] = unwritable_dir(tmp_path)
    args = [trained, *(a.format(**places) for a in args)]
    if shell_tail or stdin is None or "/dev/stdin" in args:  # what only a process and its shell show
        code, out, err = translate(args, stdin, shell_tail)
    else:
        code, out, err = translate_in_process(cli, monkeypatch, tmp_path, args, stdin)
    if isinstance(outcome, Refused):
        assert_refused(code, err, outcome.message)
    else:
        assert code == 0 and "Traceback" not in err, err
        outcome.check(out, err)


@pytest.mark.slow
def test_translate_input_and_output_may_be_the_same_file(trained, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("The dog sees a cat.\n\nA boy runs.\n")
    code, _, err = translate([trained, "-i", text, "-o", text])
    assert code == 0, err
    lines_out(3, blank=(2,))(text.read_bytes(), err)


@pytest.mark.parametrize("row", sorted(CHECKPOINTS))
def test_checkpoint(cli, trained, tmp_path, row):
    make, message = CHECKPOINTS[row]
    code, _, err = cli("translate", make(trained, tmp_path))
    assert_refused(code, err, message)


def test_checkpoint_misuse(cli, trained, tmp_path):
    """The other commands that take checkpoints."""
    other = altered(lambda s: s["model_config"].update(ff_dim=48))(trained, tmp_path)
    code, _, err = cli("average", trained / "checkpoints/best.pt", other, "-o", tmp_path / "avg.pt")
    assert_refused(code, err, "has another model config than")
    code, _, err = cli("eval", trained.parent / "config.yaml", "--checkpoint", tmp_path / "nope.pt")
    assert_refused(code, err, "nope.pt")
    code, _, err = cli("average", cut_in_half(trained, tmp_path), "-o", tmp_path / "avg.pt")
    assert_refused(code, err, "is not a readable checkpoint")
    assert not (tmp_path / "avg.pt").exists()


@pytest.mark.slow
def test_average_of_runs_with_other_tokenizers(cli, trained, demo_dir, tmp_path):
    """Another run with a unigram tokenizer of the same size: the same model config, but its ids
    mean other pieces, so an average would be noise (it was made, silently, before)."""
    (tmp_path / "other").mkdir()
    config = tiny_config(tmp_path / "other", demo_dir, max_steps=2, eval_every=2, save_every=2)
    assert cli("train", config, "--set", "tokenizer.type=unigram")[0] == 0
    other = tmp_path / "other/run/checkpoints/best.pt"
    assert checkpoint.load(other).model_config == checkpoint.load(trained / "checkpoints/best.pt").model_config
    code, _, err = cli("average", trained / "checkpoints/best.pt", other, "-o", tmp_path / "avg.pt")
    assert_refused(code, err, f"{other} was trained with another tokenizer than")
    assert "checkpoints/step_*.pt" in err and not (tmp_path / "avg.pt").exists()


def test_resume_with_another_tokenizer(cli, trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    config = tmp_path / "config.yaml"
    config.write_text((trained.parent / "config.yaml").read_text().replace(str(trained), str(run)))
    code, _, err = cli("train", config, "--resume", "--set", "tokenizer.vocab_size=280")
    assert_refused(code, err, f"{run} holds a training run ({run}/checkpoints/last.pt) made with the tokenizer in "
                              f"{run}/tokenizer, which this config would replace")  # said before it is replaced


@pytest.mark.parametrize("command", ["tokenizer train", "prepare", "train", "run", "eval"])
@pytest.mark.parametrize("row", sorted(WORKDIRS))
def test_workdir(cli, tmp_path, corpus_dir, row, command):
    where, message = WORKDIRS[row]
    config = write_config(tmp_path, data={"dir": str(corpus_dir), "src": "de", "tgt": "en"})
    workdir = where(tmp_path)
    code, _, err = cli(*command.split(), config, "--set", f"experiment.workdir={workdir}")
    assert_refused(code, err, f"the workdir {workdir} {message.format(tmp=tmp_path)}")
