"""Stage outputs: written atomically, fingerprinted by content.

A stage builds its output folder under a temporary name and swaps it in only when complete, so
an error or a kill never leaves a half-written output that a later run would mistake for done.
An output file a user names (-o) is written by one rule, `output_file`: atomically where the
name is (or leads by a symlink to) a regular file, straight through where it is a FIFO or a device.
"""

import contextlib
import hashlib
import json
import os
import shlex
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from mtkit.errors import MtkitError


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces `path`, on error it is deleted."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    old = path.with_name(path.name + ".old")
    for leftover in (tmp, old):  # from a run that was killed
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    # A kill between these renames leaves no `path`: the stage then counts as not done and reruns.
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def ensure_writable_dir(path: Path, what: str, hint: str, create: bool = True) -> None:
    """Create `path` if needed and prove it writable, so that a bad location is one message
    before any work, not a traceback after an hour of it. create=False: prove only that it could
    be (a folder whose nearest existing parent is writable), for a command that may still refuse."""
    path = Path(path)
    try:
        if create:
            path.mkdir(parents=True, exist_ok=True)
        elif path.exists() and not path.is_dir():
            raise FileExistsError
        nearest = next(p for p in (path, *path.parents) if p.exists())
        if not nearest.is_dir():
            raise NotADirectoryError
        tempfile.TemporaryFile(dir=nearest).close()
    except FileExistsError:
        raise MtkitError(f"{what} {path} is a file, not a folder", hint=hint) from None
    except NotADirectoryError:
        blocker = next(p for p in path.parents if p.exists())
        raise MtkitError(f"{what} {path} cannot be created: {blocker} is a file, not a folder", hint=hint) from None
    except OSError as e:
        raise MtkitError(f"{what} {path} is not writable: {e.strerror}", hint=hint) from None


def check_output(path: Path, example: str = "out.txt", setting: str = "output") -> Path:
    """Say before any work whether the output file `path` can be written: not a folder, and its
    folder there (behind a symlink, the link's target's)."""
    path = Path(path)
    if path.is_dir():
        raise MtkitError(f"the output {path} is a folder", hint=f"name a file to write, e.g. {shlex.quote(str(path / example))}",
                         setting=setting)
    if not written_through(path) and not real_path(path).parent.is_dir():
        raise MtkitError(f"the output {path}: the folder {real_path(path).parent} does not exist", hint="create it first",
                         setting=setting)
    return path


def written_through(path: Path) -> bool:
    """Whether `path` is something other than a regular file (a FIFO, a device such as /dev/null or
    /dev/stdout, a socket), to be written through: replacing it by a file would leave a FIFO's reader
    waiting for nothing, and, run as root, replace /dev/null for every program on the machine."""
    try:
        mode = os.stat(path).st_mode  # follows symlinks
    except OSError:  # nothing there yet (or a dangling link): a new regular file
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def real_path(path: Path) -> Path:
    """Where a regular output named `path` really is: a symlink is followed (to the end of a chain),
    so the link stays and its target gets the new content."""
    return Path(os.path.realpath(path))


@contextlib.contextmanager
def output_file(path: Path, durable: bool = False) -> Iterator[Path]:
    """Yield the name to write the output `path` under. A regular file or a new name (behind a
    symlink too): a temporary beside the real file, renamed over it when the block completes, so a
    reader sees the old content or the new, never half, and a failure keeps the old. A FIFO or a
    device: `path` itself, written through. durable: the file and its rename are flushed to the disk
    before this returns (a checkpoint outlives a power cut)."""
    if written_through(path):
        yield Path(path)
        return
    real = real_path(path)
    tmp = real.with_name(f".{real.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        replace(tmp, real)
    finally:
        tmp.unlink(missing_ok=True)
    if durable:
        fsync_dir(real.parent)


def replace(tmp: Path, real: Path) -> None:
    """Rename the finished `tmp` over the regular file `real`, which keeps its permissions."""
    if real.exists():
        shutil.copymode(real, tmp)
    os.replace(tmp, real)


def fsync_dir(folder: Path) -> None:
    # A rename must reach the disk too, or a power cut could undo it.
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path: Path, text: str) -> None:
    """Write a whole text file atomically (output_file): readers never see a partial file."""
    with output_file(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def write_json(path: Path, obj: object) -> None:
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def read_json(path: Path) -> dict | None:
    """The JSON object in `path`, or None when it is missing or unreadable (treated as stale)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(obj: object) -> str:
    """A fingerprint of plain data (settings, other fingerprints): stable key order."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
