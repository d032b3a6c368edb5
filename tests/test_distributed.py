"""Multi-process training with torchrun and DistributedDataParallel (gloo on this CPU)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtkit import checkpoint
from tests.conftest import tiny_config

pytestmark = pytest.mark.slow  # the full suite's (CI's); `pytest -m "not slow"` is the fast tier

TORCHRUN = Path(sys.executable).with_name("torchrun")


def test_two_processes_train_as_one_with_their_batches_together_and_resume_in_one(tmp_path, demo_dir, cli):
    # No dropout, so that the two runs differ only in where the gradients were summed.
    settings = dict(max_steps=30, eval_every=15, save_every=15, log_every=5, lr=5e-3, warmup=10)
    (tmp_path / "ddp").mkdir()
    (tmp_path / "one").mkdir()
    ddp = tiny_config(tmp_path / "ddp", demo_dir, **settings)
    one = tiny_config(tmp_path / "one", demo_dir, accum=2, **settings)
    env = {**os.environ, "MTKIT_QUIET": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([TORCHRUN, "--nproc_per_node", "2", "-m", "mtkit", "train", ddp,
                             "--set", "model.dropout=0"], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes (cpu)" in result.stderr
    assert result.stderr.count("valid step 30:") == 1  # rank 0 alone validates and logs
    code, _, err = cli("train", one, "--set", "model.dropout=0")
    assert code == 0, err

    a = checkpoint.load(tmp_path / "ddp/run/checkpoints/last.pt")
    b = checkpoint.load(tmp_path / "one/run/checkpoints/last.pt")
    assert a.step == b.step == 30 and a.sampler == b.sampler  # the same 60 batches
    for name, tensor in a.model.items():  # two halves of a step summed by DDP = one step of both
        assert torch.allclose(tensor, b.model[name], atol=1e-5), name
    events = [json.loads(line) for line in (tmp_path / "ddp/run/metrics.jsonl").read_text().splitlines()]
    losses = [e["loss"] for e in events if e["event"] == "train"]
    assert len(losses) == 6 and losses[-1] < losses[0] - 1.0  # it learns

    # The checkpoint of the 2-process run resumes in a single process, and that one under torchrun.
    code, _, err = cli("train", ddp, "--resume", "--set", "train.max_steps=40", "--set", "model.dropout=0")
    assert code == 0, err
    assert "resuming from" in err and "at step 30" in err
    assert checkpoint.load(tmp_path / "ddp/run/checkpoints/last.pt").step == 40
    result = subprocess.run([TORCHRUN, "--nproc_per_node", "2", "-m", "mtkit", "train", ddp, "--resume",
                             "--set", "train.max_steps=50", "--set", "model.dropout=0"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("resuming from") == 1 and "at step 40" in result.stderr
    assert checkpoint.load(tmp_path / "ddp/run/checkpoints/last.pt").step == 50



def test_an_output_layer_used_only_by_the_loss_is_trained_by_ddp_as_by_one_process(tmp_path, demo_dir, cli):
    """Untied, the output layer's weight takes no part in DDP's forward pass (training runs it
    inside the loss, loss.py): its gradient still reaches every process's weights, summed."""
    settings = dict(max_steps=8, eval_every=8, save_every=8, log_every=4, lr=5e-3, warmup=4)
    for name in ("ddp", "one"):
        (tmp_path / name).mkdir()
    ddp = tiny_config(tmp_path / "ddp", demo_dir, **settings)
    one = tiny_config(tmp_path / "one", demo_dir, accum=2, **settings)
    untied = ["--set", "model.dropout=0", "--set", "model.tie_embeddings=false"]
    env = {**os.environ, "MTKIT_QUIET": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([TORCHRUN, "--nproc_per_node", "2", "-m", "mtkit", "train", ddp, *untied],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    code, _, err = cli("train", one, *untied)
    assert code == 0, err
    a = checkpoint.load(tmp_path / "ddp/run/checkpoints/last.pt").model
    b = checkpoint.load(tmp_path / "one/run/checkpoints/last.pt").model
    assert "generator.weight" in a
    for name, tensor in a.items():
        assert torch.allclose(tensor, b[name], atol=1e-5), name


def test_ctrl_c_on_torchrun_saves_the_run(tmp_path, demo_dir, cli):
    import signal
    import time

    config = tiny_config(tmp_path, demo_dir, max_steps=100_000, save_every=100_000, eval_every=100_000, log_every=5)
    env = {**os.environ, "MTKIT_QUIET": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([TORCHRUN, "--nproc_per_node", "2", "-m", "mtkit", "train", config], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    metrics = tmp_path / "run/metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: torchrun and its workers
    proc.communicate(timeout=120)
    last = checkpoint.load(tmp_path / "run/checkpoints/last.pt")
    assert last.progress["stopped_by"] == "interrupted" and last.step >= 10
    code, _, err = cli("train", config, "--resume", "--set", f"train.max_steps={last.step + 5}")
    assert code == 0 and f"at step {last.step:,}" in err, err


EXIT = """import atexit, sys
from mtkit import distributed

atexit.register(lambda: print("shutdown ran"))
distributed._joined = {joined}
print("written", end="")
distributed.exit_process({code!r})
"""


@pytest.mark.parametrize("joined", [True, False])
def test_a_process_of_a_group_ends_with_its_code_and_output_but_without_pythons_shutdown(joined):
    """`python -m mtkit` ends through distributed.exit_process: a process that joined a group skips
    Python's shutdown, where PyTorch's gloo threads could abort it (the docstring says how), and
    keeps its exit code and everything it wrote; any other process ends as sys.exit would."""
    for code, expected in ((0, 0), (None, 0), (3, 3), ("error: a message", 1)):
        result = subprocess.run([sys.executable, "-c", EXIT.format(joined=joined, code=code)],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode == expected
        assert result.stdout == ("written" if joined else "writtenshutdown ran\n")
        assert result.stderr == ("error: a message\n" if isinstance(code, str) else "")
