"""Shared fixtures: a demo corpus generated once per session, configs written to tmp, the CLI
run in-process."""

import importlib.util
import json
import os
import tempfile

# datasets reads its cache location at import: keep test caches out of the user's home, and never
# wait on the network (hub look-ups must fail fast here; local files need no network). One cache a
# test process: xdist's workers inherit the first process's, and a test that looks for the Arrow
# files datasets wrote must not see another worker's.
if os.environ.get("HF_HOME", "") == os.environ.get("MTKIT_TESTS_HF_HOME", ""):
    os.environ["HF_HOME"] = os.environ["MTKIT_TESTS_HF_HOME"] = tempfile.mkdtemp(prefix="mtkit-hf-")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The suite runs two tests at a time (`-n 2` in pyproject.toml, one per core of the CI machine):
# one torch thread per test, in process and in the commands it starts, so that the two never
# fight over the cores (two tests of two threads each ran the slowest ones 2-3x slower).
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402
from hypothesis import settings  # noqa: E402

from mtkit import demo  # noqa: E402
from mtkit.cli import main  # noqa: E402
from mtkit.corpus import read_lines  # noqa: E402
from tests.helpers import STARTED  # noqa: E402

# The fuzz tests draw the same examples on every run, so that CI never fails by luck;
# HYPOTHESIS_PROFILE=explore draws new ones each run (run it after changing what they test).
settings.register_profile("repeatable", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))

REPO = Path(__file__).resolve().parents[1]
MULTI30K = Path(os.environ.get("MTKIT_MULTI30K", REPO.parent / "shared" / "data" / "multi30k"))


@pytest.fixture(autouse=True, scope="module")
def no_server_outlives_the_tests():
    """A server (tests/helpers.py: Server) that a failed test did not stop is killed."""
    yield
    for process in STARTED:  # one a failed test did not stop
        if process.poll() is None:
            process.kill()


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("demo") / "corpus"
    demo.ensure_corpus(folder)
    return folder


def write_config(folder: Path, **sections) -> Path:
    """A config file in `folder` whose workdir is folder/run; sections are merged over defaults."""
    cfg = {"experiment": {"workdir": str(folder / "run")}}
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


@pytest.fixture
def demo_config(tmp_path, demo_dir) -> Path:
    return write_config(tmp_path, data={"format": "demo", "dir": str(demo_dir), "src": "en", "tgt": "vs"},
                        tokenizer={"vocab_size": 500})


# scripts/same_behaviour.py: every command `cli` runs, with its answer, appended to this file.
RECORD_CLI = os.environ.get("MTKIT_RECORD_CLI")


@pytest.fixture
def cli(capsys):
    """Run `mtkit ARGS...` in-process; returns (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out, err = capsys.readouterr()
        if RECORD_CLI:
            with open(RECORD_CLI, "a", encoding="utf-8") as f:
                f.write(json.dumps({"test": os.environ.get("PYTEST_CURRENT_TEST"), "args": [str(a) for a in args],
                                    "code": code, "out": out, "err": err}) + "\n")
        return code, out, err

    return run


TINY_MODEL = {"d_model": 32, "heads": 2, "enc_layers": 1, "dec_layers": 1, "ff_dim": 64, "max_positions": 128}


def tiny_config(folder: Path, demo_dir: Path, **train) -> Path:
    settings = {"precision": "fp32", "threads": 1, "max_tokens": 600, "warmup": 5, "max_steps": 12,
                "log_every": 2, "eval_every": 6, "save_every": 6, "eval_sample": 40}
    settings.update(train)
    return write_config(folder, data={"format": "demo", "dir": str(demo_dir), "src": "en", "tgt": "vs"},
                        tokenizer={"vocab_size": 300}, model=TINY_MODEL, train=settings)


@pytest.fixture(scope="session")
def trained(tmp_path_factory, demo_dir) -> Path:
    """A tiny demo model, trained once per session (its translations are poor; the contracts
    tested with it do not depend on quality)."""
    folder = tmp_path_factory.mktemp("translate")
    config = tiny_config(folder, demo_dir, max_steps=800, eval_every=800, save_every=800, lr=5e-3, warmup=50)
    try:
        main(["train", str(config)])
    except SystemExit as e:
        assert not e.code
    return folder / "run"


# A three-way corpus (en, vs and sv: Veshi written backwards) and one model of two directions.
MULTI_SIZES = {"train": 4000, "valid": 60, "test": 60}


@pytest.fixture(scope="session")
def three_way(tmp_path_factory, demo_dir) -> Path:
    folder = tmp_path_factory.mktemp("three_way")
    for split, n in MULTI_SIZES.items():
        for lang in ("en", "vs", "sv"):
            lines = list(read_lines(demo_dir / f"{split}.{lang}"))[:n]
            (folder / f"{split}.{lang}").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return folder


@pytest.fixture(scope="session")
def multi_run(three_way, tmp_path_factory):
    """`mtkit run` of a two-direction experiment (tests/test_multilingual.py): tokenizer, prepare,
    train, eval of each."""
    folder = tmp_path_factory.mktemp("multi")
    config = write_config(folder, data={"dir": str(three_way), "directions": ["en-vs", "en-sv"]},
                          tokenizer={"vocab_size": 300}, model=TINY_MODEL | {"d_model": 64, "ff_dim": 128},
                          train={"precision": "fp32", "max_tokens": 1500, "warmup": 30, "max_steps": 500, "lr": 5e-3,
                                 "log_every": 50, "eval_every": 250, "save_every": 250, "eval_sample": 40,
                                 "tensorboard": importlib.util.find_spec("tensorboard") is not None},  # the dev extra
                          decode={"beam_size": 2})
    try:
        main(["run", str(config)])
    except SystemExit as e:
        assert not e.code
    return config, folder / "run"
