"""`mtkit translate`'s files: one output line per input line, always, and a file output that a
kill does not lose (the same command continues it). Either engine translates (engine.Engine).

read -> normalize -> encode -> sort by length -> batch -> search -> restore order -> write.
The contract: exactly one output line per input line, in order, always. An empty or blank line
gives an empty line; a line longer than the model's positions is cut (with a warning naming it),
never dropped; invalid UTF-8 is replaced by U+FFFD (with a warning naming the line). With n-best
N the output is a TSV instead: N rows per input line, `line<TAB>score<TAB>translation`.
"""

import contextlib
import functools
import gzip
import hashlib
import math
import os
import select
import stat
import sys
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, TextIO

from mtkit.config import DecodeSection
from mtkit.console import console, progress_bar
from mtkit.engine import Engine, cut
from mtkit.errors import MtkitError
from mtkit.files import check_output, read_json, real_path, replace, sha256_file, sha256_json, write_json, written_through
from mtkit.portable import lock

CHUNK_LINES = 2000  # lines translated together (sorted by length inside a chunk)


# ---------------------------------------------------------------------------------------------
# Reading: bytes split on "\n" only (like `wc -l`), so that the line count is the file's.

def decode_line(raw: bytes, number: int, warn) -> str:
    if raw.endswith(b"\r"):
        raw = raw[:-1]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        warn(f"line {number}: invalid UTF-8 at byte {e.start + 1}; replaced by U+FFFD and translated")
        return raw.decode("utf-8", errors="replace")


def file_chunks(f: BinaryIO) -> Iterator[list[bytes]]:
    """Lines of a file, a gzip file or a pipe in chunks, without waiting for the end of the input:
    from a pipe or a terminal a chunk is handed over as soon as the input pauses, so an
    interactive user gets each line's translation at once."""
    if isinstance(f, gzip.GzipFile):  # decompressed bytes: no file descriptor to wait on
        fd, read = None, f.read1
    else:
        fd = f.fileno()
        read = functools.partial(os.read, fd)
        if stat.S_ISREG(os.fstat(fd).st_mode):
            fd = None  # a regular file never makes us wait
    buffer, pending = b"", []
    while True:
        if fd is not None and pending and len(pending) < CHUNK_LINES and not select.select([fd], [], [], 0.05)[0]:
            yield pending  # the input paused: translate what has arrived
            pending = []
            continue
        try:
            data = read(1 << 16)
        except (EOFError, gzip.BadGzipFile, zlib.error) as e:
            raise MtkitError(f"{f.name}: damaged gzip data after line {len(pending) + 1} ({e})",
                             hint="the lines before it were translated; check the file with gzip -t") from None
        if not data:
            break
        lines = (buffer + data).split(b"\n")
        buffer = lines.pop()
        pending.extend(lines)
        while len(pending) >= CHUNK_LINES:
            yield pending[:CHUNK_LINES]
            pending = pending[CHUNK_LINES:]
    if buffer:  # a last line without "\n" is still a line
        pending.append(buffer)
    if pending:
        yield pending


def translate_stream(translator: Engine, chunks: Iterable[list[bytes]], out: TextIO, opts: DecodeSection,
                     on_lines=None, on_best=None, target_lang: str | None = None, skip: int = 0,
                     on_written=None, search=None) -> int:
    """Translate chunks of raw lines and write the results; returns the number of lines.
    on_best(line number, line, source ids, best hypothesis): also called for each non-blank line
    (the CLI draws its attention map, from a search that kept it). skip: lines already translated
    (read, not translated again). on_written(lines): called as each chunk's output is flushed.
    search: the translator's, or another call of it (mtkit's engine keeping the attention)."""
    number = 0
    warned_long = 0
    for chunk in chunks:
        lines = []
        for raw in chunk:
            number += 1
            if number <= skip:
                continue
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 BOM is not text
            lines.append(decode_line(raw, number, _warn))
        if not lines:
            continue
        first = number - len(lines) + 1
        ids = translator.encode(lines, target_lang)
        for i in cut(translator, ids):
            warned_long += 1
            if warned_long <= 10:
                _warn(f"line {first + i}: longer than the model's {translator.max_source_tokens} source tokens; "
                      f"translating its beginning only")
        # Progress moves as each batch is done (a 2,000-line chunk of beam search can take minutes).
        found = (search or translator.search)(ids, opts, on_sentences=on_lines if on_best is None else None)
        if on_best is not None:  # a map takes ~1 s to draw: the progress moves with each line
            for i, hyps in enumerate(found):
                if hyps:
                    on_best(first + i, lines[i], ids[i], hyps[0])
                if on_lines:
                    on_lines(1)
        for i, hyps in enumerate(map(translator.texts, found)):
            if opts.n_best > 1:
                for score, text in hyps:
                    out.write(f"{first + i}\t{score:.4f}\t{text}\n")
            else:
                out.write(hyps[0][1] + "\n")
        out.flush()
        if on_written:
            on_written(number)
    if warned_long > 10:
        _warn(f"{warned_long} lines in all were longer than the model accepts (only the first 10 named)")
    return number


def _warn(message: str) -> None:
    console.print(f"[yellow]warning:[/] {message}")


def open_input(source: Path) -> tuple[BinaryIO, int | None, str | None]:
    """--input: a text file, a gzip file (by its first bytes, as the corpus reader), or what only
    reads once: a pipe or FIFO (`-i <(zcat f.gz)`), /dev/stdin. Returns the open file and, for a
    regular file, its number of lines (for the progress bar) and the SHA-256 of its text (to resume
    by); None for both where reading would consume it."""
    try:
        inp = open(source, "rb")
    except OSError as e:
        raise MtkitError(f"cannot read {source}: {e.strerror}") from None
    if not stat.S_ISREG(os.fstat(inp.fileno()).st_mode):
        return inp, None, None
    if inp.read(2) == b"\x1f\x8b":
        inp.close()
        inp = gzip.open(source, "rb")
    inp.seek(0)
    total, digest = 0, hashlib.sha256()
    try:
        for block in iter(lambda: inp.read(1 << 20), b""):
            total += block.count(b"\n")
            digest.update(block)
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        inp.close()
        raise MtkitError(f"{source}: damaged gzip data ({e})", hint="check the file with gzip -t") from None
    inp.seek(0)
    return inp, total, digest.hexdigest()


def translate_file(translator: Engine, source: Path | None, target: Path | None, opts: DecodeSection,
                   on_best=None, target_lang: str | None = None, search=None) -> int:
    """The CLI's translate: a file or stdin in, a file or stdout out. A file output is written
    under a temporary name and renamed when complete; from a file, a run that does not complete
    keeps what it wrote, and the same command continues after it (Unfinished). on_best, search:
    as for translate_stream."""
    if target is not None:
        check_output(target)
    if source is None:
        if sys.stdin is None:  # started with stdin closed (`<&-`)
            raise MtkitError("no input: standard input is closed", hint="pipe text in, or name an input file",
                             setting="input")
        inp, total, digest = sys.stdin.buffer, None, None
    else:
        inp, total, digest = open_input(source)
    try:
        if target is None or written_through(target):  # stdout, a FIFO, a device: nothing to keep or rename
            with contextlib.nullcontext(sys.stdout) if target is None else open(target, "w", encoding="utf-8") as out:
                return translate_stream(translator, file_chunks(inp), out, opts, on_best=on_best,
                                        target_lang=target_lang, search=search)
        unfinished = Unfinished(target, digest and sha256_json({
            "input": digest, "model": model_digest(translator.path), "engine": type(translator).__name__,
            "device": str(translator.device), "precision": translator.precision,
            "settings": opts.model_dump(), "target_lang": target_lang}))
        out = unfinished.open()
        done = unfinished.lines
        finished = False
        try:
            with out, progress_bar() as bar:
                task = bar.add_task(f"translate -> {target}", total=total, completed=done)
                n = translate_stream(translator, file_chunks(inp), out, opts, lambda k: bar.advance(task, k),
                                     on_best, target_lang, skip=done, on_written=unfinished.record, search=search)
            replace(unfinished.tmp, unfinished.real)
            finished = True
        finally:
            unfinished.end(finished)
        return n
    finally:
        if source is not None:
            inp.close()


def model_digest(path: Path) -> str:
    """The SHA-256 of a checkpoint file, or of the files of a model folder (a CTranslate2 export)."""
    path = Path(path)
    if path.is_dir():
        return sha256_json({p.name: sha256_file(p) for p in sorted(path.iterdir()) if p.is_file()})
    return sha256_file(path)


class Unfinished:
    """An --output being written: its text so far (.OUT.tmp) and a note of it (.OUT.tmp.json: how
    many input lines and bytes are done, and the fingerprint of the input, model and settings that
    made them), updated as each chunk is written. A run that does not complete (Ctrl-C, a kill, a
    full disk) leaves both; the same command then continues after the last chunk written, and any
    other command starts over. key None (input from a pipe): nothing is kept."""

    def __init__(self, target: Path, key: str | None):
        self.target, self.key, self.real = target, key, real_path(target)  # a symlink's target gets the text
        self.tmp = self.real.with_name(f".{self.real.name}.tmp")
        self.note = self.real.with_name(f".{self.real.name}.tmp.json")
        self.lines, self.out = 0, None

    def open(self) -> TextIO:
        """The text to write on, locked: a second run writing the same --output at once would
        interleave with this one. Cut to the note (a kill may have cut a chunk short after it), with
        `lines` done; or emptied, when the note is of other work or missing."""
        try:
            out = open(self.tmp, "a", encoding="utf-8")
        except OSError as e:
            raise MtkitError(f"cannot write the output {self.target}: {e.strerror}",
                             hint="check that its folder exists and is writable", setting="output") from None
        taken = lock(out)
        if taken is False:
            out.close()
            raise MtkitError(f"another mtkit translate is writing {self.target}",
                             hint="wait until it is done, or write another output file", setting="output")
        if taken is not True:
            _warn(f"{self.tmp} cannot be locked: {taken}; nothing stops a second run writing {self.target} meanwhile")
        note = read_json(self.note) if self.key else None
        if note and note.get("key") == self.key and os.fstat(out.fileno()).st_size >= note.get("bytes", math.inf):
            out.truncate(note["bytes"])
            self.lines = note["lines"]
            console.print(f"translate: continuing {self.target} after line {self.lines:,}, where an earlier run "
                          f"of the same command stopped")
        else:
            if note:
                console.print(f"translate: an unfinished {self.target} from another input, model or settings is "
                              f"started over")
            out.truncate(0)
            self.note.unlink(missing_ok=True)
        self.out = out
        return out

    def record(self, lines: int) -> None:
        """`lines` input lines are done and their text flushed."""
        if self.key:
            write_json(self.note, {"key": self.key, "lines": lines, "bytes": os.fstat(self.out.fileno()).st_size})
            self.lines = lines

    def end(self, finished: bool) -> None:
        """Done (renamed), or not: then what was written is kept to continue from, if anything was."""
        if not finished and self.lines:  # (lines are counted only with a key)
            console.print(f"translate: the first {self.lines:,} lines of {self.target} are translated and kept "
                          f"({self.tmp}): the same command continues after them")
            return
        self.tmp.unlink(missing_ok=True)
        self.note.unlink(missing_ok=True)
