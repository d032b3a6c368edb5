"""When a training run is finished: only when the stop rules of the *current* settings say so.

Each rule is extended, the extended run is killed (SIGKILL, mid-run) and `mtkit run` is run
again: it must continue the run, never take it for finished because of what stopped the run
before the extension. A small corpus keeps an epoch to a few steps.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mtkit import checkpoint
from mtkit.config import TrainSection
from mtkit.bookkeeping import RunState, stop_reason
from tests import fake_clock
from tests.conftest import REPO, TINY_MODEL, write_config

pytestmark = pytest.mark.slow  # the full suite's (CI's); `pytest -m "not slow"` is the fast tier

TICK = 0.005


@pytest.fixture(scope="module")
def small_corpus(demo_dir, tmp_path_factory) -> Path:
    """240 training pairs of the demo corpus (about 6 batches of 600 tokens: an epoch is short)."""
    folder = tmp_path_factory.mktemp("small")
    for split, n in (("train", 240), ("valid", 40), ("test", 40)):
        for lang in ("en", "vs"):
            lines = (demo_dir / f"{split}.{lang}").read_text(encoding="utf-8").splitlines()[:n]
            (folder / f"{split}.{lang}").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def config(folder: Path, corpus: Path, **train) -> Path:
    settings = {"precision": "fp32", "threads": 1, "max_tokens": 600, "warmup": 5, "max_steps": 100_000,
                "log_every": 1, "eval_every": 4, "save_every": 1, "keep_last": 2, "eval_sample": 0}
    return write_config(folder, data={"dir": str(corpus), "src": "en", "tgt": "vs"}, tokenizer={"vocab_size": 300},
                        model=TINY_MODEL, train=settings | train, decode={"beam_size": 2})


def sets(overrides: dict) -> list[str]:
    return [a for k, v in overrides.items() for a in ("--set", f"train.{k}={v}")]


def last_state(workdir: Path) -> dict:
    return checkpoint.load(workdir / "checkpoints" / "last.pt")


def kill_after(config_path: Path, overrides: dict, workdir: Path, step: int) -> None:
    """`mtkit run` in its own process (on the fake clock), SIGKILLed once it has saved a step
    checkpoint past `step`."""
    folder = workdir / "checkpoints"
    proc = subprocess.Popen([sys.executable, "-m", "tests.fake_clock", str(TICK), "run", config_path, *sets(overrides)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=REPO,
                            env={**os.environ, "MTKIT_QUIET": "1"}, start_new_session=True)
    deadline = time.monotonic() + 600  # only against a hang
    while not any(int(p.stem[5:]) > step for p in folder.glob("step_*.pt")):
        assert proc.poll() is None, f"the run ended before the kill: {proc.stderr.read().decode()[-2000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


# rule: (first settings, extended settings, what the extended run must end with)
RULES = {
    "max_steps": ({"max_steps": 6}, {"max_steps": 30}, lambda s: s.step == 30),
    "max_epochs": ({"max_epochs": 1}, {"max_epochs": 3}, lambda s: s.sampler["epoch"] == 3),
    "max_time": ({"max_time": 1.0}, {"max_time": 3.0}, lambda s: s.progress["seconds"] >= 3.0),
    # lr so small that greedy BLEU never improves: patience 2 stops at the second bad validation.
    "patience": ({"patience": 2, "lr": 1e-9, "max_steps": 40}, {"patience": 50, "lr": 1e-9, "max_steps": 40},
                 lambda s: s.step == 40),
}


@pytest.mark.parametrize("rule", sorted(RULES))
def test_an_extended_run_killed_midway_is_continued_not_taken_for_finished(cli, tmp_path, small_corpus, rule,
                                                                           monkeypatch):
    # max_time counts on the fake clock (~0.02 s a step): 1 s is ~44 steps and 3 s ~133 on any machine,
    # so the extended run is never over before the kill, however busy the machine.
    fake_clock.install(monkeypatch, TICK)
    first, extended, ended = RULES[rule]
    config_path = config(tmp_path, small_corpus)
    workdir = tmp_path / "run"
    code, _, err = cli("run", config_path, *sets(first))
    assert code == 0, err
    before = last_state(workdir)
    assert before.progress["stopped_by"] == rule, before.progress

    kill_after(config_path, extended, workdir, before.step + 1)
    killed = last_state(workdir)
    assert killed.step > before.step
    assert killed.progress["stopped_by"] is None  # the first run's reason is not carried along
    # An older mtkit did carry it along: `mtkit run` must still judge by the current settings.
    killed.progress["stopped_by"] = rule
    checkpoint.save(killed, workdir / "checkpoints" / "last.pt")

    code, _, err = cli("run", config_path, *sets(extended))
    assert code == 0, err
    assert "train: up to date" not in err and f"resuming from {workdir / 'checkpoints' / 'last.pt'}" in err
    final = last_state(workdir)
    expected = "max_steps" if rule == "patience" else rule  # patience 50 is never reached in 40 steps
    assert final.progress["stopped_by"] == expected and ended(final), final.progress
    code, _, err = cli("run", config_path, *sets(extended))  # and now it is finished
    assert code == 0 and "train: up to date" in err, err


def test_patience_stops_after_that_many_validations_without_a_better_bleu(cli, tmp_path, small_corpus):
    code, _, err = cli("run", config(tmp_path, small_corpus, patience=2, lr=1e-9, eval_every=2, max_steps=40))
    assert code == 0, err
    state = last_state(tmp_path / "run")
    # Validations at steps 2 (the best so far), 4 and 6 (no better: 2 in a row), then the stop.
    assert state.step == 6 and state.progress["stopped_by"] == "patience", state.progress
    assert state.progress["best_step"] == 2 and state.progress["bad_evals"] == 2


def test_stop_reason_judges_progress_by_the_settings_given():
    progress = RunState(step=180, seconds=100.0, bad_evals=3)
    assert stop_reason(TrainSection(max_steps=400), progress, epoch=0) is None
    assert stop_reason(TrainSection(max_steps=180), progress, epoch=0) == "max_steps"
    assert stop_reason(TrainSection(max_epochs=2), progress, epoch=1) is None
    assert stop_reason(TrainSection(max_epochs=2), progress, epoch=2) == "max_epochs"
    assert stop_reason(TrainSection(max_time=100.5), progress, epoch=0) is None
    assert stop_reason(TrainSection(max_time=100.0), progress, epoch=0) == "max_time"
    assert stop_reason(TrainSection(patience=4), progress, epoch=0) is None
    assert stop_reason(TrainSection(patience=3), progress, epoch=0) == "patience"
    assert stop_reason(TrainSection(patience=0), progress, epoch=0) is None  # 0: no early stopping
