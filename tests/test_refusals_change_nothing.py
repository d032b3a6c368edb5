"""Check before you change: a command that refuses leaves the experiment byte-identical (every
file, folder and link under it), for every command. Each case is a refusal found late, after the
command has read what it needs: the kind that used to come after a change (`train --init B` into a
workdir of a run from A rewrote its tokenizer, then refused)."""

import shlex
import shutil
from pathlib import Path

import pytest
import yaml

from tests.helpers import assert_refused


def snapshot(folder: Path) -> dict[str, object]:
    """Every path under `folder` with what it holds: bytes, a link's target, or a folder's mark."""
    found = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        found[key] = (("link", str(path.readlink())) if path.is_symlink() else ("dir",) if path.is_dir()
                      else path.read_bytes())
    return found


@pytest.fixture
def experiment(trained, tmp_path) -> Path:
    """A copy of a trained experiment (config.yaml and its workdir run/) to refuse things in."""
    shutil.copytree(trained.parent, tmp_path / "x", symlinks=True)
    config = tmp_path / "x" / "config.yaml"
    settings = yaml.safe_load(config.read_text())
    settings["experiment"]["workdir"] = str(tmp_path / "x" / "run")
    config.write_text(yaml.safe_dump(settings))
    (tmp_path / "x" / "input.txt").write_text("A dog runs.\n")
    return tmp_path / "x"


# (command, its refusal's words): X is the experiment's folder, W its workdir, C its config.
REFUSALS = [
    ("tokenizer train C --set tokenizer.vocab_size=400", "holds a training run"),
    ("prepare C --set data.max_len=40", "holds a training run"),
    ("train C --set tokenizer.vocab_size=400", "already holds a training run"),
    ("train C --resume --set tokenizer.vocab_size=400", "holds a training run"),
    ("train C --resume --set data.max_len=40", "holds a training run"),
    ("run C --set tokenizer.vocab_size=400", "holds a training run"),
    ("run C --init W/checkpoints/last.pt", "holds a training run"),
    ("translate W -i X/missing.txt -o X/out.txt --attention X/maps", "missing.txt"),
    ("translate W -i X/input.txt -o X/out.txt --attention X/maps --tgt-lang xx", "xx"),
    ("translate W -i X/input.txt -o X/out.txt --set decode.beam_size=0", "decode.beam_size"),
    ("eval C --split test --checkpoint X/missing.pt", "missing.pt"),
    ("eval C --split test --set decode.max_len_a=inf", "decode.max_len_a"),
    ("average W/checkpoints/last.pt X/missing.pt -o X/avg.pt", "missing.pt"),
    ("export W --format ctranslate2 --quantization int3 -o X/ct2", "int3"),
    ("attention W 'A dog.' -o X/a.png --layer 9", "layer"),
    ("explore W 'A dog.' -o X/e.html --tgt-lang xx", "xx"),
    ("plot W -o X/none/p.png", "none"),
    ("serve W --set decode.alpha=-1", "decode.alpha"),
    ("import marian X/missing -o X/imported", "missing"),
    ("config show C --set model.d_model=-3", "model.d_model"),
    ("train C --resume --set experiment.workdir=X/new", "nothing to resume"),  # made the workdir, empty
]


@pytest.mark.parametrize("command, words", REFUSALS, ids=[c for c, _ in REFUSALS])
def test_a_refused_command_leaves_the_experiment_byte_identical(cli, experiment, command, words):
    names = {"X": experiment, "W": experiment / "run", "C": experiment / "config.yaml"}
    args = [str(names[a[0]]) + a[1:] if a[:1] in names and a[1:2] in ("", "/") else a for a in shlex.split(command)]
    before = snapshot(experiment)
    code, _, err = cli(*args)
    assert_refused(code, err, words)
    assert snapshot(experiment) == before, err


def test_a_run_from_another_model_is_refused_before_its_workdir_changes(cli, trained, tmp_path, experiment):
    """The issue's case: a workdir holds a run started from A (train.init); `train --init B` (no
    resume) used to take over B's tokenizer into it, then refuse; --resume then named the wrong
    parent. Both --init B and --resume --init B are refused naming A, and nothing changes."""
    a = tmp_path / "a.pt"
    shutil.copy(trained / "checkpoints" / "last.pt", a)
    b = tmp_path / "b.pt"
    shutil.copy(trained / "checkpoints" / "last.pt", b)
    config = experiment / "config.yaml"
    shutil.rmtree(experiment / "run")
    code, _, err = cli("train", config, "--init", a, "--set", "train.max_steps=2")
    assert code == 0, err
    before = snapshot(experiment)
    code, _, err = cli("train", config, "--resume", "--init", b)
    assert_refused(code, err, f"started from {a} (train.init), not from {b}")
    assert f"--resume --init {a}" in err
    code, _, err = cli("train", config, "--init", b)
    assert_refused(code, err, "already holds a training run")
    assert snapshot(experiment) == before
    code, _, err = cli("train", config, "--resume", "--init", a, "--set", "train.max_steps=3")
    assert code == 0, err  # the hint, followed, works
