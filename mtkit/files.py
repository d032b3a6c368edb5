"""Stage outputs: written atomically, fingerprinted by content.

A stage builds its output folder under a temporary name and swaps it in only when complete, so
an error or a kill never leaves a half-written output that a later run would mistake for done.
"""

import contextlib
import hashlib
import json
import os
import shutil
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


def ensure_writable_dir(path: Path, what: str, hint: str) -> None:
    """Create `path` if needed and prove it writable, so that a bad location is one message
    before any work, not a traceback after an hour of it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
    except FileExistsError:
        raise MtkitError(f"{what} {path} is a file, not a folder", hint=hint) from None
    except NotADirectoryError:
        blocker = next(p for p in path.parents if p.exists())
        raise MtkitError(f"{what} {path} cannot be created: {blocker} is a file, not a folder", hint=hint) from None
    except OSError as e:
        raise MtkitError(f"{what} {path} is not writable: {e.strerror}", hint=hint) from None


def write_json(path: Path, obj: object) -> None:
    """Write JSON via a temporary file and rename, so readers never see a partial file."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


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
