"""What every translation engine shares (mtkit's own, translate.Translator, and CTranslate2's,
export.CT2Translator): the text side (normalize and encode the source, decode the output, the
decoding settings) and the line I/O of `mtkit translate`.

read -> normalize -> encode -> sort by length -> batch -> search -> restore order -> write.
The contract: exactly one output line per input line, in order, always. An empty or blank line
gives an empty line; a line longer than the model's positions is cut (with a warning naming it),
never dropped; invalid UTF-8 is replaced by U+FFFD (with a warning naming the line). With --nbest
N the output is a TSV instead: N rows per input line, `line<TAB>score<TAB>translation`.
"""

import contextlib
import fcntl
import functools
import gzip
import hashlib
import math
import os
import select
import stat
import sys
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, TextIO

from pydantic import ValidationError

from mtkit.config import DataSection
from mtkit.config import DecodeSection as DecodeOptions
from mtkit.console import console, progress
from mtkit.corpus import normalize, tag, with_tag
from mtkit.errors import MtkitError
from mtkit.files import check_output, read_json, real_path, replace, sha256_file, sha256_json, write_json, written_through
from mtkit.search import Hypothesis
from mtkit.tokenizer import Tokenizer

CHUNK_LINES = 2000  # lines translated together (sorted by length inside a chunk)


class Engine:
    """A tokenizer and a search: subclasses give `search` and `max_source_tokens`."""

    def __init__(self, tokenizer: Tokenizer, config: dict, path: Path, precision: str):
        self.tokenizer, self.config, self.path, self.precision = tokenizer, config, path, precision

    @property
    def max_source_tokens(self) -> int:
        raise NotImplementedError

    def search(self, ids: list[list[int]], opts: DecodeOptions, attention: bool = False,
               trace=None, on_sentences=None) -> list[list[Hypothesis]]:
        """Source ids -> for each sentence its hypotheses, best first (none for an empty one).
        on_sentences(n): progress, called as n more sentences are done."""
        raise NotImplementedError

    def options(self, **overrides) -> DecodeOptions:
        """Decoding settings: the experiment's decode section, then the given overrides."""
        saved = self.config.get("decode", {})
        try:
            return DecodeOptions(**{**saved, **{k: v for k, v in overrides.items() if v is not None}})
        except ValidationError as e:
            # A field's error is named by its key; the section's own (n_best over beam_size) names its keys.
            problems = "; ".join((f"decode.{'.'.join(map(str, err['loc']))}: " if err["loc"] else "")
                                 + err['msg'].removeprefix('Value error, ')
                                 + (f" (got {err['input']!r})" if err["loc"] else "") for err in e.errors())
            raise MtkitError(f"bad decoding settings: {problems}") from None

    def translate(self, lines: Sequence[str], target_lang: str | None = None, *, on_sentences=None,
                  **settings) -> list[str]:
        """The best translation of each line, in order; a blank line gives "".

        target_lang: the language to translate into, needed by a model with several (their tag
        goes before each line). settings: decoding settings (beam_size, alpha, n_best, max_len_a,
        max_len_b, max_tokens), by default the experiment's `decode` section, e.g.
        translate(lines, beam_size=1). on_sentences(n): progress, as in search."""
        return [hyps[0][1] for hyps in self.translate_nbest(lines, target_lang, on_sentences=on_sentences, **settings)]

    def translate_nbest(self, lines: Sequence[str], target_lang: str | None = None, *, on_sentences=None,
                        **settings) -> list[list[tuple[float, str]]]:
        """For each line up to n_best (score, translation), best first; a blank line gives
        [(0.0, "")]. The score, higher is better, is the log-probability divided by GNMT's length
        penalty ((5 + length) / 6) ** alpha (length counting EOS), for greedy and beam search alike:
        with alpha 0 it is the plain log-probability."""
        return self.translate_ids(self.encode(lines, target_lang), self.options(**settings), on_sentences)

    @functools.cached_property  # read once: tag_for asks for it at every call
    def _data(self) -> DataSection:
        """The data section the model was trained with (a hand-made checkpoint may have none)."""
        data = self.config.get("data")
        return DataSection.model_validate(data) if data else DataSection.model_construct(src=None, tgt=None)

    @property
    def directions(self) -> list[str]:
        """What the model was trained to translate, e.g. ['de-en'] or ['de-en', 'en-fr']."""
        return self._data.names or [f"{self._data.src}-{self._data.tgt}"]

    @property
    def targets(self) -> list[str]:
        """The languages this model translates into (one, unless trained on several directions)."""
        return self._data.targets

    def tag_for(self, target_lang: str | None) -> str:
        """What goes before each source line: a model with several target languages is told which
        one by its tag (<2xx>); one with a single target needs none."""
        targets = self.targets
        if len(targets) > 1:
            if target_lang is None:
                raise MtkitError(f"this model translates into {', '.join(targets)}: say which with --tgt-lang",
                                 hint=f"e.g. --tgt-lang {targets[0]} (Python: target_lang=...)")
            if target_lang not in targets:
                raise MtkitError(f"--tgt-lang {target_lang!r}: this model translates into {', '.join(targets)}")
            return tag(target_lang)
        if target_lang is not None and target_lang != targets[0]:
            raise MtkitError(f"--tgt-lang {target_lang!r}: this model translates into {targets[0]} only")
        return ""

    def encode(self, lines: Sequence[str], target_lang: str | None = None) -> list[list[int]]:
        """Raw lines -> source ids (normalized first, then tagged when the model has several
        target languages); a blank line -> []."""
        if isinstance(lines, (str, bytes)):  # it would be taken for a list of characters
            raise TypeError(f"expected a list of lines, got one {type(lines).__name__}: write translate([line])")
        lines = list(lines)
        for i, line in enumerate(lines):
            if not isinstance(line, str):
                raise TypeError(f"line {i} is {type(line).__name__}, not str" +
                                (" (decode the bytes first)" if isinstance(line, bytes) else ""))
        label = self.tag_for(target_lang)
        return self.tokenizer.encode_src([with_tag(label, normalize(line)) for line in lines])

    def translate_ids(self, ids: list[list[int]], opts: DecodeOptions,
                      on_sentences=None) -> list[list[tuple[float, str]]]:
        return [self._texts(hyps) for hyps in self.search(ids, opts, on_sentences=on_sentences)]

    def _texts(self, hyps: list[Hypothesis]) -> list[tuple[float, str]]:
        texts = self.tokenizer.decode_tgt([h.tokens for h in hyps])
        return [(h.score, t) for h, t in zip(hyps, texts)] or [(0.0, "")]


def cut(engine: Engine, ids: list[list[int]]) -> list[int]:
    """Which sources are longer than the engine's model takes (the search translates their
    beginning only): their indices, for the caller to warn about."""
    return [i for i, x in enumerate(ids) if len(x) > engine.max_source_tokens]


def check_options(opts, on_sentences=None) -> None:
    """A search's arguments, checked before it starts: a mistake would fail deep inside it."""
    if not isinstance(opts, DecodeOptions):
        raise TypeError(f"opts: decoding settings from Translator.options(...), not {type(opts).__name__}")
    if on_sentences is not None and not callable(on_sentences):
        raise TypeError(f"on_sentences: a function called with how many sentences are done, "
                        f"not {type(on_sentences).__name__}")


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


def translate_stream(translator: Engine, chunks: Iterable[list[bytes]], out: TextIO, opts: DecodeOptions,
                     on_lines=None, on_attention=None, target_lang: str | None = None, skip: int = 0,
                     on_written=None) -> int:
    """Translate chunks of raw lines and write the results; returns the number of lines.
    on_attention(line number, AttentionMap): also called for each non-blank line with the
    cross-attention of its translation (the CLI draws it). skip: lines already translated (read,
    not translated again). on_written(lines): called as each chunk's output is flushed."""
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
        found = translator.search(ids, opts, attention=on_attention is not None,
                                  on_sentences=on_lines if on_attention is None else None)
        if on_attention is not None:  # a map takes ~1 s to draw: the progress moves with each line
            for i, hyps in enumerate(found):
                if hyps:
                    on_attention(first + i, translator.attention_map(lines[i], ids[i], hyps[0]))
                if on_lines:
                    on_lines(1)
        for i, hyps in enumerate(map(translator._texts, found)):
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


def translate_file(translator: Engine, source: Path | None, target: Path | None, opts: DecodeOptions,
                   on_attention=None, target_lang: str | None = None) -> int:
    """The CLI's translate: a file or stdin in, a file or stdout out. A file output is written
    under a temporary name and renamed when complete; from a file, a run that does not complete
    keeps what it wrote, and the same command continues after it (Unfinished). on_attention: as
    for translate_stream."""
    if target is not None:
        check_output(target)
    if source is None:
        if sys.stdin is None:  # started with stdin closed (`<&-`)
            raise MtkitError("no input: standard input is closed", hint="pipe text in, or give --input FILE")
        inp, total, digest = sys.stdin.buffer, None, None
    else:
        inp, total, digest = open_input(source)
    try:
        if target is None or written_through(target):  # stdout, a FIFO, a device: nothing to keep or rename
            with contextlib.nullcontext(sys.stdout) if target is None else open(target, "w", encoding="utf-8") as out:
                return translate_stream(translator, file_chunks(inp), out, opts, on_attention=on_attention,
                                        target_lang=target_lang)
        unfinished = Unfinished(target, digest and sha256_json({
            "input": digest, "model": model_digest(translator.path), "engine": type(translator).__name__,
            "device": str(getattr(translator, "device", "cpu")), "precision": translator.precision,
            "settings": opts.model_dump(), "target_lang": target_lang}))
        out = unfinished.open()
        done = unfinished.lines
        finished = False
        try:
            with out, progress() as bar:
                task = bar.add_task(f"translate -> {target}", total=total, completed=done)
                n = translate_stream(translator, file_chunks(inp), out, opts, lambda k: bar.advance(task, k),
                                     on_attention, target_lang, skip=done, on_written=unfinished.record)
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
            raise MtkitError(f"cannot write --output {self.target}: {e.strerror}",
                             hint="check that its folder exists and is writable") from None
        try:
            fcntl.flock(out, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            out.close()
            raise MtkitError(f"another mtkit translate is writing {self.target}",
                             hint="wait until it is done, or write to another --output") from None
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
