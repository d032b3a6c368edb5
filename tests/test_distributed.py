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
    # With dropout: each batch's masks come from its own seed, wherever it is computed.
    settings = dict(max_steps=30, eval_every=15, save_every=15, log_every=5, lr=5e-3, warmup=10)
    (tmp_path / "ddp").mkdir()
    (tmp_path / "one").mkdir()
    ddp = tiny_config(tmp_path / "ddp", demo_dir, **settings)
    one = tiny_config(tmp_path / "one", demo_dir, accum=2, **settings)
    env = {**os.environ, "MTKIT_QUIET": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([TORCHRUN, "--nproc_per_node", "2", "-m", "mtkit", "train", ddp],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes (cpu)" in result.stderr
    assert result.stderr.count("valid step 30:") == 1  # rank 0 alone validates and logs
    code, _, err = cli("train", one)
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
    code, _, err = cli("train", ddp, "--resume", "--set", "train.max_steps=40")
    assert code == 0, err
    assert "resuming from" in err and "at step 30" in err
    assert checkpoint.load(tmp_path / "ddp/run/checkpoints/last.pt").step == 40
    result = subprocess.run([TORCHRUN, "--nproc_per_node", "2", "-m", "mtkit", "train", ddp, "--resume",
                             "--set", "train.max_steps=50"],
                            capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("resuming from") == 1 and "at step 40" in result.stderr
    assert checkpoint.load(tmp_path / "ddp/run/checkpoints/last.pt").step == 50


def torchrun(*args, cwd: Path | None = None, timeout: int = 600, script: Path | None = None,
             wait: bool = True) -> subprocess.CompletedProcess | subprocess.Popen:
    """Two processes of `python -m mtkit ARGS` (or of `script`, which runs mtkit its own way)."""
    env = {**os.environ, "MTKIT_QUIET": "1", "OMP_NUM_THREADS": "1"}
    command = [TORCHRUN, "--nproc_per_node", "2", *([script] if script else ["-m", "mtkit"]), *map(str, args)]
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, timeout=timeout)


# Dropout as a GPU draws it: F.dropout, whose draws from the generator grow with the batch's size,
# so that two processes' random states part ways (mtkit's CPU dropout draws one number a call).
GPU_DROPOUT = """import runpy, sys
import torch.nn.functional as F
from mtkit import fast

fast.NumpyDropout.forward = lambda self, x: F.dropout(x, self.p, training=self.training)
runpy.run_module("mtkit", run_name="__main__", alter_sys=True)
"""


def test_mtkit_run_of_the_demo_under_torchrun_is_one_process_with_accum_2(tmp_path, cli, monkeypatch):
    """The README's main job on two processes: the first generates the demo corpus and builds the
    tokenizer and data while the second waits (both used to build them into one folder: a crash),
    both train, the first translates and scores; its weights are those of one process taking both
    processes' batches in each step (train.accum 2)."""
    demo = Path(__file__).resolve().parents[1] / "configs/demo.yaml"
    short = ["--set", "train.max_steps=20", "--set", "train.max_time=null", "--set", "train.eval_every=20",
             "--set", "train.save_every=20", "--set", "decode.beam_size=1"]
    result = torchrun("run", demo, *short, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("translate + eval") == 1 and "20 steps" in result.stderr  # rank 0's table alone
    assert "Traceback" not in result.stderr and (tmp_path / "data/demo/train.vs").is_file()
    monkeypatch.chdir(tmp_path)
    code, out, err = cli("run", demo, *short, "--set", "train.accum=2", "--set", "experiment.workdir=runs/one")
    assert code == 0, err
    a = checkpoint.load(tmp_path / "runs/demo/checkpoints/last.pt")
    b = checkpoint.load(tmp_path / "runs/one/checkpoints/last.pt")
    assert a.step == b.step == 20 and a.sampler == b.sampler
    for name, tensor in a.model.items():
        assert torch.allclose(tensor, b.model[name], atol=1e-5), name


def test_a_sigkill_of_one_process_then_resume_under_torchrun_ends_as_the_uninterrupted_run(tmp_path, demo_dir):
    """One process killed mid-run (torchrun then stops the other), a write cut short left in the
    checkpoints folder, and `--resume` under torchrun: the same weights as a run never stopped,
    with dropout drawn as on a GPU (after a resume, every process used to get rank 0's random state)."""
    import signal
    import time

    settings = dict(max_steps=36, eval_every=1000, save_every=4, log_every=4, lr=5e-3, warmup=10)
    for name in ("whole", "killed"):
        (tmp_path / name).mkdir()
    whole = tiny_config(tmp_path / "whole", demo_dir, **settings)
    killed = tiny_config(tmp_path / "killed", demo_dir, **{**settings, "max_steps": 100_000})
    (script := tmp_path / "gpu_dropout.py").write_text(GPU_DROPOUT)
    assert torchrun("train", whole, script=script).returncode == 0
    proc = torchrun("train", killed, script=script, wait=False)
    checkpoints = tmp_path / "killed/run/checkpoints"
    deadline = time.monotonic() + 120
    while not (checkpoints / "step_0000008.pt").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.02)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    second = next(pid for pid in workers if b"RANK=1" in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"))
    os.kill(int(second), signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    step = checkpoint.load(checkpoints / "last.pt").step
    assert 8 <= step < 36, step
    (checkpoints / f".step_{step + 4:07d}.pt.999.tmp").write_bytes(b"half a checkpoint")  # a save the kill cut
    result = torchrun("train", killed, "--resume", "--set", "train.max_steps=36", script=script)
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"at step {step}" in result.stderr and not list(checkpoints.glob(".*.tmp"))
    a = checkpoint.load(tmp_path / "whole/run/checkpoints/last.pt")
    b = checkpoint.load(checkpoints / "last.pt")
    assert a.step == b.step == 36
    for name, tensor in a.model.items():
        assert torch.allclose(tensor, b.model[name], atol=1e-6), name


def test_an_output_layer_used_only_by_the_loss_is_trained_by_ddp_as_by_one_process(tmp_path, demo_dir, cli):
    """Untied, the output layer's weight takes no part in DDP's forward pass (training runs it
    inside the loss, loss.py): its gradient still reaches every process's weights, summed."""
    settings = dict(max_steps=8, eval_every=8, save_every=8, log_every=4, lr=5e-3, warmup=4)
    for name in ("ddp", "one"):
        (tmp_path / name).mkdir()
    ddp = tiny_config(tmp_path / "ddp", demo_dir, **settings)
    one = tiny_config(tmp_path / "one", demo_dir, accum=2, **settings)
    untied = ["--set", "model.tie_embeddings=false"]
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


def test_the_position_table_is_not_sent_to_every_process_at_every_step(tmp_path, demo_dir):
    """DDP broadcasts a model's buffers from rank 0 before every forward pass by default; the only
    buffer here is the sinusoidal position table, which never changes. (A group of one process in
    this one, which DDP accepts as any other.)"""
    import torch.distributed as dist

    from mtkit.config import load_config
    from mtkit.distributed import World
    from mtkit.pipeline import prepare_data
    from mtkit.train import set_up

    cfg = load_config(tiny_config(tmp_path, demo_dir))
    prepare_data(cfg)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        trainer = set_up(cfg, resume=False, world=World(0, 2, torch.device("cpu")))
        assert isinstance(trainer.net, torch.nn.parallel.DistributedDataParallel)
        assert [name for name, _ in trainer.model.named_buffers()] == ["tgt_embed.table"]  # (shared by both sides)
        assert not trainer.net.will_sync_module_buffers()
    finally:
        dist.destroy_process_group()


def test_a_multilingual_run_and_a_fine_tuning_from_it_under_torchrun(tmp_path, three_way, cli):
    """The other commands that train, on two processes: `mtkit run` of two directions (one model,
    told which by a tag; after the warmup each process also back-translates its batches for
    vs-sv and sv-vs), then `mtkit train --init` from it, in a workdir of its own."""
    from tests.conftest import TINY_MODEL, write_config

    model = TINY_MODEL | {"d_model": 64, "ff_dim": 128}
    train = {"precision": "fp32", "max_tokens": 1500, "warmup": 5, "max_steps": 8, "log_every": 4, "eval_every": 8,
             "save_every": 8, "eval_sample": 10}
    (tmp_path / "multi").mkdir()
    (tmp_path / "tuned").mkdir()
    multi = write_config(tmp_path / "multi", data={"dir": str(three_way), "directions": ["en-vs", "en-sv"],
                                                   "backtranslate": ["vs-sv", "sv-vs"]},
                         tokenizer={"vocab_size": 300}, model=model, train=train, decode={"beam_size": 1})
    result = torchrun("run", multi)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("translate + eval") == 2  # a row per direction, in rank 0's table alone
    assert result.stderr.count("vs-sv, sv-vs also back-translated after step 5") == 1
    tuned = write_config(tmp_path / "tuned", data={"dir": str(three_way), "directions": ["en-vs", "en-sv"]},
                         train=train | {"max_steps": 4})
    result = torchrun("train", tuned, "--init", tmp_path / "multi/run")
    assert result.returncode == 0, result.stderr[-3000:]
    state = checkpoint.load(tmp_path / "tuned/run/checkpoints/last.pt")
    assert state.step == 4 and state.init_from["path"].endswith("best.pt")


# Collectives that give up after 3 seconds (an hour in mtkit), and a data build of 10.
SLOW_BUILD = """import datetime, runpy, time
import torch.distributed as dist
from mtkit import pipeline

real_init, real_prepare = dist.init_process_group, pipeline.prepare_data


def init(*args, **kwargs):
    real_init(*args, **{**kwargs, "timeout": datetime.timedelta(seconds=3)})


def prepare(*args, **kwargs):
    time.sleep(10)
    return real_prepare(*args, **kwargs)


dist.init_process_group, pipeline.prepare_data = init, prepare
runpy.run_module("mtkit", run_name="__main__")
"""


def test_the_other_processes_wait_for_a_data_build_longer_than_the_collectives_timeout(tmp_path, demo_dir):
    """Rank 0 builds the tokenizer and data while the others wait: on their own group, whose
    timeout is days, since preparing tens of millions of pairs takes longer than the hour the
    training's collectives allow (the others used to wait at a barrier of that hour)."""
    config = tiny_config(tmp_path, demo_dir, max_steps=4, eval_every=4, save_every=4)
    (script := tmp_path / "slow_build.py").write_text(SLOW_BUILD)
    result = torchrun("train", config, script=script)
    assert result.returncode == 0, result.stderr[-3000:]
    assert checkpoint.load(tmp_path / "run/checkpoints/last.pt").step == 4
