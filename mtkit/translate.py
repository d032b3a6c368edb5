"""Stage `mtkit translate`: raw text in, detokenized translations out, one line per line.

read -> normalize -> encode -> sort by length -> batch -> search -> restore order -> write.
The contract: exactly one output line per input line, in order, always. An empty or blank line
gives an empty line; a line longer than the model's positions is cut (with a warning naming it),
never dropped; invalid UTF-8 is replaced by U+FFFD (with a warning naming the line). With --nbest
N the output is a TSV instead: N rows per input line, `line<TAB>score<TAB>translation`.
"""

import functools
import gzip
import os
import select
import stat
import sys
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, TextIO

import torch
from pydantic import ValidationError

from mtkit import checkpoint, distributed
from mtkit.config import DecodeSection as DecodeOptions
from mtkit.console import console, progress
from mtkit.corpus import normalize
from mtkit.errors import MtkitError
from mtkit.search import Hypothesis, search_sorted
from mtkit.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer

CHUNK_LINES = 2000  # lines translated together (sorted by length inside a chunk)


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint file, or an experiment workdir (then its best checkpoint)."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / "checkpoints" / "best.pt", path / "best.pt"):
            if candidate.is_file():
                return candidate
        raise MtkitError(f"no best checkpoint in {path} (looked for checkpoints/best.pt)",
                         hint="train first (mtkit train CONFIG), or name a checkpoint file")
    return path


class Translator:
    """A trained model with its tokenizer: everything needed comes from one checkpoint file."""

    def __init__(self, state: dict, path: Path, device: str = "cpu", precision: str = "auto"):
        """device: "cpu" or "cuda:N"; precision: auto, fp32, bf16 or fp16 (distributed.decode_precision)."""
        if "tokenizer" not in state:
            raise MtkitError(f"{path} holds no tokenizer (written by an older mtkit)", hint="retrain it")
        self.tokenizer = Tokenizer(*state["tokenizer"])
        if self.tokenizer.fingerprint != state.get("tokenizer_fingerprint"):
            raise MtkitError(f"{path}: its tokenizer does not match the one it was trained with")
        try:
            self.model = checkpoint.build_model(state)
        except (TypeError, RuntimeError) as e:  # unknown config keys; weights of another shape
            raise MtkitError(f"{path}: its weights do not fit its model config ({' '.join(str(e).split())[:160]})",
                             hint="the file was altered or comes from another program; use another checkpoint"
                             ) from None
        self.trained_precision = state.get("precision", "fp32")
        self.precision = distributed.decode_precision(precision, device, self.trained_precision,
                                                      *distributed.machine_facts(device))
        self.device = torch.device(device)
        self.model = self.model.to(self.device)  # the one place the model moves
        self.config = state.get("config", {})
        self.path = path

    @classmethod
    def load(cls, path: Path, device: str = "auto", precision: str = "auto") -> "Translator":
        """A checkpoint file or a workdir (its best.pt). device: auto (a GPU when there is one),
        cpu or cuda. precision: auto (the training precision where the device does it natively,
        else fp32), fp32, bf16 or fp16 (GPU only)."""
        if precision not in ("auto", "fp32", "bf16", "fp16"):
            raise MtkitError(f"--precision {precision!r}: auto, fp32, bf16 or fp16")
        if device not in ("auto", "cpu", "cuda"):
            raise MtkitError(f"--device {device!r}: auto, cpu or cuda")
        path = resolve_checkpoint(path)
        distributed.limit_kernel_caches()
        return cls(checkpoint.load(path, mmap=True), path, str(distributed.choose_device(device, option="--device")),
                   precision)

    def options(self, **overrides) -> DecodeOptions:
        """Decoding settings: the experiment's decode section, then the given overrides."""
        saved = self.config.get("decode", {})
        try:
            return DecodeOptions(**{**saved, **{k: v for k, v in overrides.items() if v is not None}})
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or 'decode'}: "
                                 f"{err['msg'].removeprefix('Value error, ')}" for err in e.errors())
            raise MtkitError(f"bad decoding settings: {problems}") from None

    @property
    def max_source_tokens(self) -> int:
        return self.model.cfg.max_positions - 1  # room for EOS

    def translate(self, lines: Sequence[str], **settings) -> list[str]:
        """The best translation of each line, in order; a blank line gives "".

        settings: decoding settings (beam_size, alpha, n_best, max_len_a, max_len_b, max_tokens),
        by default the experiment's `decode` section, e.g. translate(lines, beam_size=1)."""
        return [hyps[0][1] for hyps in self.translate_nbest(lines, **settings)]

    def translate_nbest(self, lines: Sequence[str], **settings) -> list[list[tuple[float, str]]]:
        """For each line up to n_best (score, translation), best first; a blank line gives
        [(0.0, "")]. The score, higher is better, is the log-probability divided by GNMT's length
        penalty ((5 + length) / 6) ** alpha (length counting EOS), for greedy and beam search alike:
        with alpha 0 it is the plain log-probability."""
        return self.translate_ids(self.encode(lines), self.options(**settings))

    def attention(self, line: str, **settings) -> "AttentionMap":
        """Translate one sentence and return the cross-attention that wrote its best translation
        (the one the search itself used, collected while it ran)."""
        if not isinstance(line, str):
            raise TypeError(f"attention() takes one sentence (str), not {type(line).__name__}")
        ids = self.encode([line])[0]
        if not ids:
            raise MtkitError("nothing to translate: the sentence is empty")
        return self.attention_map(line, ids, self.search([ids], self.options(**settings), attention=True)[0][0])

    def attention_map(self, line: str, ids: list[int], hyp: Hypothesis) -> "AttentionMap":
        """The map of hypothesis `hyp` of source `ids` (cut, as the search cuts it, to the positions)."""
        if not isinstance(hyp, Hypothesis) or hyp.attention is None:
            raise TypeError("attention_map needs a Hypothesis found by search(..., attention=True)")
        pieces = self.tokenizer.src.id_to_piece(ids[:self.max_source_tokens]) + ["</s>"]
        out = self.tokenizer.tgt.id_to_piece(hyp.tokens) + ["</s>"]
        return AttentionMap(line, self.tokenizer.decode_tgt([hyp.tokens])[0], hyp.score, pieces, out,
                            hyp.attention.float().cpu())

    def encode(self, lines: Sequence[str]) -> list[list[int]]:
        """Raw lines -> source ids (normalized first); a blank line -> []."""
        if isinstance(lines, (str, bytes)):  # it would be taken for a list of characters
            raise TypeError(f"expected a list of lines, got one {type(lines).__name__}: write translate([line])")
        lines = list(lines)
        for i, line in enumerate(lines):
            if not isinstance(line, str):
                raise TypeError(f"line {i} is {type(line).__name__}, not str" +
                                (" (decode the bytes first)" if isinstance(line, bytes) else ""))
        return self.tokenizer.encode_src([normalize(line) for line in lines])

    def search(self, ids: list[list[int]], opts: DecodeOptions, attention: bool = False) -> list[list[Hypothesis]]:
        """Source ids -> for each sentence its hypotheses, best first (none for an empty one)."""
        _check_options(opts)
        todo = [i for i, x in enumerate(ids) if x]
        dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
        with torch.autocast(self.device.type, dtype=dtype, enabled=self.precision != "fp32"):
            found = search_sorted(self.model, [ids[i] for i in todo], beam_size=opts.beam_size, alpha=opts.alpha,
                                  n_best=opts.n_best, max_len_a=opts.max_len_a, max_len_b=opts.max_len_b,
                                  max_tokens=opts.max_tokens, pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID,
                                  attention=attention)
        results: list[list[Hypothesis]] = [[] for _ in ids]
        for i, hyps in zip(todo, found):
            results[i] = hyps
        return results

    def translate_ids(self, ids: list[list[int]], opts: DecodeOptions) -> list[list[tuple[float, str]]]:
        return [self._texts(hyps) for hyps in self.search(ids, opts)]

    def _texts(self, hyps: list[Hypothesis]) -> list[tuple[float, str]]:
        texts = self.tokenizer.decode_tgt([h.tokens for h in hyps])
        return [(h.score, t) for h, t in zip(hyps, texts)] or [(0.0, "")]


def _check_options(opts) -> None:
    if not isinstance(opts, DecodeOptions):  # a dict would fail deep inside the search
        raise TypeError(f"opts: decoding settings from Translator.options(...), not {type(opts).__name__}")


@dataclass
class AttentionMap:
    """Where the decoder looked in the source while it wrote one translation."""

    line: str            # the source sentence as given
    translation: str     # its (best) translation, detokenized
    score: float         # its log-probability / the length penalty (Translator.translate_nbest)
    source: list[str]    # source subwords, then "</s>"
    target: list[str]    # output subwords, then "</s>"
    weights: torch.Tensor  # (len(target), layers, heads, len(source)): each row a distribution

    def strongest(self, layer: int = -1) -> list[tuple[str, str, float]]:
        """For each target subword, the source subword it attends to most (the heads of `layer`
        averaged) and that weight."""
        mean = self.weights[:, layer].mean(dim=1)  # (T, S)
        best = mean.max(dim=1)
        return [(t, self.source[j], w) for t, j, w in zip(self.target, best.indices.tolist(), best.values.tolist())]


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


def translate_stream(translator: Translator, chunks: Iterable[list[bytes]], out: TextIO, opts: DecodeOptions,
                     on_lines=None, on_attention=None) -> int:
    """Translate chunks of raw lines and write the results; returns the number of lines.
    on_attention(line number, AttentionMap): also called for each non-blank line with the
    cross-attention of its translation (the CLI draws it)."""
    number = 0
    warned_long = 0
    for chunk in chunks:
        lines = []
        for raw in chunk:
            number += 1
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]  # a UTF-8 BOM is not text
            lines.append(decode_line(raw, number, _warn))
        first = number - len(lines) + 1
        ids = translator.encode(lines)
        for i in (i for i, x in enumerate(ids) if len(x) > translator.max_source_tokens):
            warned_long += 1
            if warned_long <= 10:
                _warn(f"line {first + i}: longer than the model's {translator.max_source_tokens} source tokens; "
                      f"translating its beginning only")
        found = translator.search(ids, opts, attention=on_attention is not None)
        if on_attention is not None:
            for i, hyps in enumerate(found):
                if hyps:
                    on_attention(first + i, translator.attention_map(lines[i], ids[i], hyps[0]))
        for i, hyps in enumerate(map(translator._texts, found)):
            if opts.n_best > 1:
                for score, text in hyps:
                    out.write(f"{first + i}\t{score:.4f}\t{text}\n")
            else:
                out.write(hyps[0][1] + "\n")
        out.flush()
        if on_lines:
            on_lines(len(lines))
    if warned_long > 10:
        _warn(f"{warned_long} lines in all were longer than the model accepts (only the first 10 named)")
    return number


def _warn(message: str) -> None:
    console.print(f"[yellow]warning:[/] {message}")


def open_input(source: Path) -> tuple[BinaryIO, int | None]:
    """--input: a text file, a gzip file (by its first bytes, as the corpus reader), or what only
    reads once: a pipe or FIFO (`-i <(zcat f.gz)`), /dev/stdin. Returns the open file and, for a
    regular file, its number of lines (for the progress bar; None where counting would consume it)."""
    try:
        inp = open(source, "rb")
    except OSError as e:
        raise MtkitError(f"cannot read {source}: {e.strerror}") from None
    if not stat.S_ISREG(os.fstat(inp.fileno()).st_mode):
        return inp, None
    if inp.read(2) == b"\x1f\x8b":
        inp.close()
        inp = gzip.open(source, "rb")
    inp.seek(0)
    try:
        total = sum(block.count(b"\n") for block in iter(lambda: inp.read(1 << 20), b""))
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        inp.close()
        raise MtkitError(f"{source}: damaged gzip data ({e})", hint="check the file with gzip -t") from None
    inp.seek(0)
    return inp, total


def translate_file(translator: Translator, source: Path | None, target: Path | None, opts: DecodeOptions,
                   on_attention=None) -> int:
    """The CLI's translate: a file or stdin in, a file or stdout out. A file output is written
    under a temporary name and renamed when complete. on_attention: as for translate_stream."""
    if target is not None and target.is_dir():
        raise MtkitError(f"--output {target} is a folder", hint="name a file to write, e.g. -o out.txt")
    if source is None:
        if sys.stdin is None:  # started with stdin closed (`<&-`)
            raise MtkitError("no input: standard input is closed", hint="pipe text in, or give --input FILE")
        inp, total = sys.stdin.buffer, None
    else:
        inp, total = open_input(source)
    try:
        if target is None:
            return translate_stream(translator, file_chunks(inp), sys.stdout, opts, on_attention=on_attention)
        tmp = target.with_name(f".{target.name}.tmp")
        try:
            out = open(tmp, "w", encoding="utf-8")
        except OSError as e:
            raise MtkitError(f"cannot write --output {target}: {e.strerror}",
                             hint="check that its folder exists and is writable") from None
        try:
            with out, progress() as bar:
                task = bar.add_task(f"translate -> {target}", total=total)
                n = translate_stream(translator, file_chunks(inp), out, opts, lambda k: bar.advance(task, k),
                                     on_attention)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return n
    finally:
        if source is not None:
            inp.close()
