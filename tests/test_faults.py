"""The fault harness: `mtkit train` killed with SIGKILL again and again, at random moments and in
the middle of checkpoint writes, then resumed. After every kill each checkpoint must load, at most
`save_every` logged steps may be lost, and in fp32 the run must end with the very parameters of an
uninterrupted one. And `mtkit translate` of a file killed once, then finished by the same command.

CI runs a short version; the long one is `MTKIT_FAULT_KILLS=25 pytest tests/test_faults.py -n 0 -s`.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mtkit import checkpoint
from tests.conftest import tiny_config

pytestmark = pytest.mark.slow  # the full suite's (CI's); `pytest -m "not slow"` is the fast tier

MTKIT = Path(sys.executable).with_name("mtkit")
KILLS = int(os.environ.get("MTKIT_FAULT_KILLS", "6"))
SAVE_EVERY = 3


def _start(config: Path, log: Path, resume: bool) -> subprocess.Popen:
    with open(log, "a") as err:  # a file, not a pipe: a killed reader could block the writer
        return subprocess.Popen([str(MTKIT), "train", str(config), *(["--resume"] if resume else [])],
                                stdout=subprocess.DEVNULL, stderr=err, env={**os.environ, "MTKIT_QUIET": "1"},
                                start_new_session=True)


def _logged_step(workdir: Path) -> int:
    """The newest step in metrics.jsonl (log_every 1: every finished step is logged)."""
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]
    return max(steps, default=0)


def _wait(condition, proc: subprocess.Popen, log: Path, timeout: float = 600.0) -> bool:
    """Poll `condition` (every millisecond, to catch a checkpoint write) until it holds; False if
    the process ended first. The deadline is only against a hang."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.001)
    return True


def test_sigkill_at_random_moments_and_during_writes(tmp_path, demo_dir):
    rng = random.Random(int(os.environ.get("MTKIT_FAULT_SEED", "1")))
    settings = dict(save_every=SAVE_EVERY, eval_every=10, log_every=1, max_steps=30 + 12 * KILLS, keep_last=2)
    (tmp_path / "killed").mkdir()
    (tmp_path / "whole").mkdir()
    config = tiny_config(tmp_path / "killed", demo_dir, **settings)
    workdir, log = tmp_path / "killed" / "run", tmp_path / "killed" / "train.log"
    folder, last = workdir / "checkpoints", workdir / "checkpoints" / "last.pt"

    kills, during_writes, most_lost = 0, 0, 0
    while kills < KILLS:
        seen = log.stat().st_size if log.exists() else 0
        proc = _start(config, log, resume=last.exists())
        # Kill only once this process has trained a step (or the loop could kill it forever at start-up),
        # then either a random moment later or the instant a checkpoint write begins. Its own log
        # says so: metrics.jsonl may still hold steps a killed process logged and never saved.
        if not _wait(lambda: b"\nstep " in log.read_bytes()[seen:], proc, log):
            break  # it finished before the kill
        if kills % 2 == 0:  # a random number of steps on, not a random time: a fast machine would finish
            on = _logged_step(workdir) + rng.randint(1, 4)
            if not _wait(lambda: _logged_step(workdir) >= on, proc, log):
                break
        elif not _wait(lambda: any(folder.glob(".*.tmp")), proc, log):
            break
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        kills += 1
        during_writes += any(folder.glob(".*.tmp"))  # a write was cut short
        for path in sorted(folder.glob("*.pt")):
            checkpoint.load(path)  # every checkpoint stays readable (raises if not)
        # A kill before the first save leaves no last.pt (the next start is a fresh one): 0 steps saved.
        lost = _logged_step(workdir) - (checkpoint.load(last).step if last.exists() else 0)
        assert 0 <= lost <= SAVE_EVERY, f"kill {kills}: {lost} steps lost"
        most_lost = max(most_lost, lost)

    proc = _start(config, log, resume=True)
    assert proc.wait(timeout=600) == 0, log.read_text()[-2000:]
    assert not list(folder.glob(".*.tmp"))  # leftovers of cut writes are cleared on start

    whole = tiny_config(tmp_path / "whole", demo_dir, **settings)
    proc = _start(whole, tmp_path / "whole" / "train.log", resume=False)
    assert proc.wait(timeout=600) == 0, (tmp_path / "whole" / "train.log").read_text()[-2000:]
    a = checkpoint.load(last)
    b = checkpoint.load(tmp_path / "whole/run/checkpoints/last.pt")
    assert a.step == b.step == settings["max_steps"]
    for name, tensor in a.model.items():
        assert torch.equal(tensor, b.model[name]), name
    assert a.progress["best_bleu"] == b.progress["best_bleu"]
    print(f"\nfault harness: {kills} SIGKILLs survived ({during_writes} during a checkpoint write), "
          f"at most {most_lost} steps lost (save_every {SAVE_EVERY}), final parameters equal to an "
          f"uninterrupted run's after {a.step} steps")
    assert kills == KILLS, f"the run finished after {kills} kills; raise max_steps"


def test_sigkill_while_translating_a_file_then_the_same_command_finishes_it(trained, demo_dir, tmp_path):
    """`mtkit translate -i FILE -o FILE` killed once its first chunk is written, in a real process;
    the same command then continues after that chunk and writes what an uninterrupted run writes."""
    short = [line for line in (demo_dir / "test.en").read_text().splitlines() if len(line.split()) <= 5]
    (tmp_path / "in.txt").write_text("".join(short[i % len(short)] + "\n" for i in range(20_000)))  # 10 chunks

    def start(output: Path) -> subprocess.Popen:
        with open(tmp_path / "log", "a") as log:
            return subprocess.Popen([str(MTKIT), "translate", str(trained), "--greedy", "-i", str(tmp_path / "in.txt"),
                                     "-o", str(output)], stdout=subprocess.DEVNULL, stderr=log,
                                    env={**os.environ, "MTKIT_QUIET": "1"}, start_new_session=True)

    out, note = tmp_path / "out.txt", tmp_path / ".out.txt.tmp.json"
    proc = start(out)
    assert _wait(note.exists, proc, tmp_path / "log"), "it finished before the kill"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists() and 2000 <= json.loads(note.read_text())["lines"] < 20_000
    assert start(out).wait(timeout=300) == 0 and start(tmp_path / "whole.txt").wait(timeout=300) == 0
    assert "continuing" in (tmp_path / "log").read_text()
    assert out.read_bytes() == (tmp_path / "whole.txt").read_bytes() and not note.exists()
