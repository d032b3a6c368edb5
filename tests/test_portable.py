"""The portable seam (mtkit/portable.py): a file lock on Linux and macOS (fcntl), on Windows
(msvcrt), or none, said, where the system or the file system has none. Windows and macOS do not
run here: the decision is tested with every answer their modules can give, and mtkit runs whole in a
process where fcntl cannot be imported, as on Windows."""

import errno
import subprocess
import sys
import textwrap

import pytest

from mtkit import portable
from tests.conftest import tiny_config


class FakeFcntl:
    LOCK_EX, LOCK_NB = 2, 4

    def __init__(self, error: Exception | None = None):
        self.error = error

    def flock(self, f, how) -> None:
        if self.error:
            raise self.error


class FakeMsvcrt:
    LK_NBLCK = 2

    def __init__(self, error: Exception | None = None):
        self.error = error

    def locking(self, fd, mode, nbytes) -> None:
        if self.error:
            raise self.error


@pytest.mark.parametrize("fcntl, msvcrt, expected", [
    (FakeFcntl(), None, True),
    (FakeFcntl(BlockingIOError(errno.EAGAIN, "busy")), None, False),
    (FakeFcntl(OSError(errno.ENOLCK, "No locks available")), None, "this file system takes no locks (No locks available)"),
    (FakeFcntl(OSError(errno.ENOSYS, "Function not implemented")), None,
     "this file system takes no locks (Function not implemented)"),
    (None, FakeMsvcrt(), True),  # Windows
    (None, FakeMsvcrt(PermissionError(errno.EACCES, "locked")), False),
    (None, FakeMsvcrt(OSError(errno.ENOLCK, "No locks available")), "this file system takes no locks (No locks available)"),
    (None, None, "this system has neither fcntl nor msvcrt"),
], ids=["posix", "posix-held", "posix-nolck", "posix-nosys", "windows", "windows-held", "windows-nolck", "neither"])
def test_every_answer_of_the_lock(tmp_path, monkeypatch, fcntl, msvcrt, expected):
    monkeypatch.setattr(portable, "fcntl", fcntl)
    monkeypatch.setattr(portable, "msvcrt", msvcrt)
    with open(tmp_path / "x.lock", "a+") as f:
        assert portable.lock(f) == expected


def test_another_error_is_not_taken_for_a_missing_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(portable, "fcntl", FakeFcntl(OSError(errno.EIO, "Input/output error")))
    with open(tmp_path / "x.lock", "a+") as f, pytest.raises(OSError, match="Input/output"):
        portable.lock(f)


def test_a_real_lock_is_held_against_a_second_opening(tmp_path):
    with open(tmp_path / "x.lock", "a+") as first, open(tmp_path / "x.lock", "a+") as second:
        assert portable.lock(first) is True and portable.lock(second) is False
    with open(tmp_path / "x.lock", "a+") as again:  # closed: released
        assert portable.lock(again) is True


@pytest.mark.slow
def test_mtkit_trains_and_translates_where_fcntl_cannot_be_imported(tmp_path, demo_dir):
    """As on Windows, `import fcntl` fails in mtkit (the libraries it uses pick their own way on
    each system, so they are loaded first), and the C library has no mallopt. A run trains, resumes and translates to a file, each
    saying once that it goes unlocked."""
    config = tiny_config(tmp_path, demo_dir, max_steps=4, eval_every=4, save_every=2)

    def mtkit(*args: str) -> subprocess.CompletedProcess:
        code = textwrap.dedent(f"""
            import runpy, sys
            import sacrebleu, torch  # libraries that take fcntl on POSIX take msvcrt on Windows: theirs
            sys.modules["fcntl"] = None  # mtkit's own: import fcntl is an ImportError, as on Windows
            import ctypes
            ctypes.CDLL = lambda *args, **kwargs: object()  # a C library without glibc's mallopt
            sys.argv = ["mtkit", *{[str(a) for a in args]!r}]
            runpy.run_module("mtkit", run_name="__main__", alter_sys=True)
        """)
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)

    done = mtkit("train", config)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("cannot be locked: this system has neither fcntl nor msvcrt") == 1, done.stderr
    resumed = mtkit("train", config, "--resume", "--set", "train.max_steps=6")
    assert resumed.returncode == 0 and "resuming from" in resumed.stderr, resumed.stderr
    (tmp_path / "in.txt").write_text("A dog.\n\nThe cat sees a dog.\n")
    out = tmp_path / "out.txt"
    translated = mtkit("translate", tmp_path / "run", "-i", tmp_path / "in.txt", "-o", out, "--greedy")
    assert translated.returncode == 0, translated.stderr
    assert "cannot be locked: this system has neither fcntl nor msvcrt" in translated.stderr
    assert len(out.read_text().split("\n")) == 4 and out.read_text().split("\n")[1] == ""
