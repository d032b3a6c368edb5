"""Reading raw parallel data: aligned text files (plain or .gz), TSV, and HuggingFace `datasets`.

`source_for(split, spec, format=..., root=..., ...)` finds where a split lives (plain values in,
the config's data section gives them: `DataSection.source_args`) and returns a `Source`;
`read_pairs(source)` streams its (src, tgt) lines; `fingerprint(source)` hashes its raw content.
Every problem with the data is an MtkitError naming the file and line, never a silent skip.
"""

import gzip
import itertools
import random
import re
import shutil
import unicodedata
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from mtkit import demo, hf
from mtkit.errors import MtkitError
from mtkit.files import sha256_file, sha256_json

if TYPE_CHECKING:
    from mtkit.config import DataSection

SPLITS = ("train", "valid", "test")

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0/C1 controls except tab and newline
_SPACE = re.compile(r"\s+")
# Characters that show nothing: spaces, direction marks and other format characters (Unicode Cf, the
# soft hyphen among them). A line of only these is blank, not a sentence for the model to invent.
_INVISIBLE = re.compile(r"[\s\u00ad\u061c\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff]*")


def normalize(line: str) -> str:
    """The one text normalization of the toolkit (training data and translate input alike):
    Unicode NFC, control characters to spaces, whitespace runs to one space, trimmed; a line with
    nothing visible in it (only direction marks, zero-width spaces, ...) is blank."""
    line = unicodedata.normalize("NFC", line)
    line = _SPACE.sub(" ", _CONTROL.sub(" ", line)).strip()
    return "" if _INVISIBLE.fullmatch(line) else line


@dataclass(frozen=True)
class Source:
    """Where one split of a parallel corpus lives."""

    split: str
    kind: str  # "text": paths = (src file, tgt file); "tsv": paths = (file,); "hf": see hf_*
    paths: tuple[Path, ...] = ()
    src: str = ""
    tgt: str = ""
    encoding_errors: str = "strict"
    hf_dataset: str | None = None
    hf_config: str | None = None
    hf_split: str | None = None
    hf_file: Path | None = None
    streaming: bool = False
    src_field: str | None = None
    tgt_field: str | None = None
    lines: tuple[str, str] = ()  # a part of the split, "name[start:end]": ("0", "50%") -> its first half
    parts: tuple["Source", ...] = ()  # kind "several": one Source per direction, read one after another
    tags: tuple[str, ...] = ()  # and the tag put before each one's source lines ("" for none)
    keep: Path | None = None  # a stream: the file its first reader keeps it in for the next (keep_streams)

    @property
    def denoising(self) -> bool:
        """A language into itself (data.denoise): its source lines are noisy copies of its targets."""
        return bool(self.src) and self.src == self.tgt

    def describe(self) -> str:
        if self.kind == "several":
            return "; ".join(f"{p.src}-{p.tgt}: {p.describe()}" for p in self.parts)
        if self.kind == "hf":
            where = str(self.hf_file) if self.hf_file else f"{self.hf_dataset} [{self.hf_split}]"
            return f"HF dataset {where}"
        return " + ".join(str(p) for p in self.paths) + (f" lines [{':'.join(self.lines)}]" if self.lines else "")


def split_source(data: "DataSection", split: str, direction: str | None = None) -> "Source":
    """An experiment's split (of one direction, or of all): what each stage that reads the corpus
    reads. data.format demo: the corpus is generated into data.dir first, unless it is there (it
    is the same every time)."""
    if data.format == "demo":
        demo.ensure_corpus(Path(data.dir))
    return source_for(**data.source_args(split, direction))


def tag(lang: str) -> str:
    """The target-language tag put before a source sentence when a model has several targets."""
    return f"<2{lang}>"


def with_tag(label: str, line: str) -> str:
    """`line` with `label` (a tag, or "" for none) before it; a blank line stays blank, as
    training drops it and translation gives "" for it."""
    return f"{label} {line}" if label and line.strip() else line


def source_for(split: str, spec: str | tuple[str, str], *, format: str, root: Path, src: str | None,
               tgt: str | None, encoding_errors: str = "strict", hf_dataset: str | None = None,
               hf_config: str | None = None, src_field: str | None = None, tgt_field: str | None = None,
               streaming: bool = False, directions: list[tuple[str, str, Path, str]] | None = None,
               tagged: bool = False) -> Source:
    """The Source of `split` ('train', 'valid' or 'test'), given as `spec`: a file prefix, a file
    or split name, or a pair of files (format text), in folder `root`. With `directions` (source
    and target languages, folder and spec of each), their files, read one direction after
    another; `tagged`: each source line starts with its target's tag."""
    if directions:
        parts = tuple(source_for(split, part_spec, format=format, root=part_root, src=s, tgt=t,
                                 encoding_errors=encoding_errors) for s, t, part_root, part_spec in directions)
        return Source(split=split, kind="several", parts=parts, tags=tuple(tag(p.tgt) if tagged else "" for p in parts),
                      encoding_errors=encoding_errors)
    common = dict(split=split, src=src, tgt=tgt, encoding_errors=encoding_errors)
    root = Path(root)
    if format != "hf" and isinstance(spec, str) and (part := hf.PART.fullmatch(spec)):
        lines = _check_part(spec, part["start"], part["end"], split)
        whole = source_for(split, part["name"], format=format, root=root, src=src, tgt=tgt, encoding_errors=encoding_errors)
        return replace(whole, lines=lines)
    if format in ("text", "demo"):
        if isinstance(spec, str):
            paths = (_find_file(root, f"{spec}.{src}", split), _find_file(root, f"{spec}.{tgt}", split))
        else:
            paths = tuple(_existing(root / p, split) for p in spec)
        return Source(kind="text", paths=paths, **common)
    if not isinstance(spec, str):
        raise MtkitError(f"data.{split}: a pair of files only works with data.format: text",
                         hint=f"give one {'file' if format == 'tsv' else 'split name'} for data.{split}")
    if format == "tsv":
        candidates = [spec, f"{spec}.tsv", f"{spec}.tsv.gz"]
        found = next((root / c for c in candidates if (root / c).is_file()), None)
        return Source(kind="tsv", paths=(found or _existing(root / spec, split),), **common)
    # format hf: a data file (json/jsonl/parquet/csv) or a split of hf_dataset.
    fields = dict(src_field=src_field, tgt_field=tgt_field, streaming=streaming)
    if Path(spec).suffix in hf.FILE_BUILDERS:
        return Source(kind="hf", hf_file=_existing(root / spec, split), **fields, **common)
    if not hf_dataset:
        raise MtkitError(f"data.{split} is the split name {spec!r} but data.hf_dataset is not set",
                         hint="set data.hf_dataset to a hub name or a local dataset folder, "
                              "or give a .jsonl/.parquet/.csv file as the split")
    return Source(kind="hf", hf_dataset=hf_dataset, hf_config=hf_config, hf_split=spec, **fields, **common)


def _check_part(spec: str, start: str, end: str, split: str) -> tuple[str, str]:
    bounds = [b for b in (start, end) if b]
    if any(b.endswith("%") and int(b[:-1]) > 100 for b in bounds) or (
            len(bounds) == 2 and start.endswith("%") == end.endswith("%") and int(start.rstrip("%")) >= int(end.rstrip("%"))):
        raise MtkitError(f"data.{split}: {spec!r} is an empty or impossible part of a split",
                         hint="write name[start:end] with start < end, in lines or percent (e.g. train[:50%], train[14500:])")
    return start, end


def _line_range(source: Source) -> tuple[int, int | None]:
    """The lines [start, end) a part of a split stands for; percent counts the lines first."""
    total = None
    if any(b.endswith("%") for b in source.lines):
        total = sum(1 for _ in read_lines(source.paths[0], source.encoding_errors))
    start, end = (None if not b else int(b[:-1]) * total // 100 if b.endswith("%") else int(b) for b in source.lines)
    return start or 0, end


def _find_file(root: Path, name: str, split: str) -> Path:
    plain, packed = root / name, root / f"{name}.gz"
    if plain.is_file() and packed.is_file():
        raise MtkitError(f"both {plain} and {packed} exist; mtkit will not guess which one to read",
                         hint="remove or rename one of them")
    if plain.is_file() or packed.is_file():
        return plain if plain.is_file() else packed
    raise MtkitError(f"no {split} file: looked for {plain} and {packed}", hint=_listing_hint(root))


def _existing(path: Path, split: str) -> Path:
    if not path.is_file():
        raise MtkitError(f"no {split} file: {path} does not exist", hint=_listing_hint(path.parent))
    return path


def _listing_hint(root: Path) -> str:
    if not root.is_dir():
        return f"the folder {root} does not exist: set data.dir (e.g. --set data.dir=path/to/corpus)"
    names = sorted(p.name for p in root.iterdir() if p.is_file())[:12]
    return f"{root} has: {', '.join(names) or 'no files'}; check data.dir, data.src/tgt and the split names"


def directions_of(source: Source) -> dict[str, Source]:
    """A source of several directions as one source each (tags kept), by name ('de-en'); any
    other, itself (named '')."""
    if source.kind != "several":
        return {"": source}
    return {f"{p.src}-{p.tgt}": Source(split=source.split, kind="several", parts=(p,), tags=(t,),
                                        encoding_errors=source.encoding_errors)
            for p, t in zip(source.parts, source.tags)}


def keep_streams(source: Source, workdir: Path, sha256: str) -> Source:
    """`source` with each streamed split in it kept in workdir/stream by its first reader for the
    next (hf.read), so that a command reads a stream once, however many of its stages read it.
    sha256: the source's fingerprint, which the caller has (the copy's name changes with it)."""
    if source.kind == "several":
        return replace(source, parts=tuple(keep_streams(p, workdir, sha256) for p in source.parts))
    if source.kind == "hf" and source.streaming:
        name = sha256_json([sha256, source.describe()])[:16]
        return replace(source, keep=Path(workdir) / "stream" / f"{source.split}-{name}.jsonl")
    return source


def drop_kept_streams(workdir: Path) -> None:
    """Prepare is done with them: the prepared data holds what the run needs."""
    shutil.rmtree(Path(workdir) / "stream", ignore_errors=True)


def read_pairs(source: Source) -> Iterator[tuple[str, str]]:
    """Stream the raw (src, tgt) lines of a split, in order, unnormalized; an empty split is an error."""
    if source.kind == "several":
        for part, label in zip(source.parts, source.tags):
            yield from ((with_tag(label, src), tgt) for src, tgt in read_pairs(part))
        return
    if source.kind == "text":
        src_path, tgt_path = source.paths
        pairs = _zip_aligned(src_path, tgt_path, read_lines(src_path, source.encoding_errors, _REPLACE_HINT),
                             read_lines(tgt_path, source.encoding_errors, _REPLACE_HINT))
        if source.denoising:
            rng = random.Random(NOISE_SEED)
            pairs = ((noised(tgt, rng), tgt) for _, tgt in pairs)
    elif source.kind == "tsv":
        pairs = _read_tsv(source.paths[0], source.encoding_errors)
    else:
        pairs = hf.read(source)
    if source.lines:
        pairs = itertools.islice(pairs, *_line_range(source))
    empty = True
    for pair in pairs:
        empty = False
        yield pair
    if empty:
        raise MtkitError(f"the {source.split} split is empty: {source.describe()}",
                         hint="check the files, or data.dir and the split names")


# A corpus may have its bad bytes replaced; a file of translations or references is scored as it is.
_REPLACE_HINT = ", or set data.encoding_errors=replace to replace bad bytes with U+FFFD"


def read_lines(path: Path, encoding_errors: str = "strict", utf8_hint: str = "") -> Iterator[str]:
    """Lines of a UTF-8 text file, plain or gzip; split on '\\n' only (like `wc -l`, so that
    U+2028 or a stray '\\r' inside a line never shifts the alignment); CRLF and a BOM are removed.
    utf8_hint: what else the user can do about invalid UTF-8 (a corpus: data.encoding_errors)."""
    try:
        opened = open(path, "rb")
        packed = opened.peek(2)[:2] == b"\x1f\x8b"  # peeked, not read and sought back: a pipe cannot seek
    except OSError as e:
        raise MtkitError(f"cannot read {path}: {e.strerror or e}")
    with opened, (gzip.open(opened) if packed else opened) as f:
        lineno = 0
        try:
            for lineno, raw in enumerate(f, 1):
                if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                    raw = raw[3:]
                raw = raw.rstrip(b"\n").removesuffix(b"\r")
                try:
                    yield raw.decode("utf-8", errors=encoding_errors)
                except UnicodeDecodeError as e:
                    raise MtkitError(
                        f"{path}:{lineno}: invalid UTF-8 (byte {e.start + 1} of the line is {raw[e.start]:#04x})",
                        hint="convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8)" + utf8_hint) from None
        except (OSError, EOFError, zlib.error) as e:
            what = "damaged gzip data" if packed else "read error"
            raise MtkitError(f"{path}: {what} after line {lineno}: {e}",
                             hint="download or re-compress the file" if packed else None) from None


def _zip_aligned(src_path: Path, tgt_path: Path, src: Iterator[str], tgt: Iterator[str]):
    end = object()
    for n, (s, t) in enumerate(itertools.zip_longest(src, tgt, fillvalue=end)):
        if s is end or t is end:
            n_src = n + (s is not end) + sum(1 for _ in src)
            n_tgt = n + (t is not end) + sum(1 for _ in tgt)
            raise MtkitError(f"{src_path} has {n_src} lines but {tgt_path} has {n_tgt}; "
                             "line i of one must be the translation of line i of the other",
                             hint="re-align the files (compare `wc -l`), or check data.src/data.tgt")
        yield s, t


def _read_tsv(path: Path, encoding_errors: str) -> Iterator[tuple[str, str]]:
    for lineno, line in enumerate(read_lines(path, encoding_errors, _REPLACE_HINT), 1):
        fields = line.split("\t")
        if len(fields) != 2:
            raise MtkitError(f"{path}:{lineno}: expected exactly one tab (source<TAB>target), "
                             f"found {len(fields) - 1}",
                             hint="fix that line; a tab inside a sentence must be removed or replaced")
        yield fields[0], fields[1]


NOISE_SEED = 1  # one fixed noisy copy of each sentence, the same at every read (tokenizer, prepare)


def noised(line: str, rng: random.Random, drop: float = 0.1, reach: float = 3.0) -> str:
    """A denoising example's source (Lample et al. 2018): `line` with each word dropped with
    probability `drop` (one is always kept) and the rest shuffled, none moving more than `reach`
    places. Restoring it teaches nothing about another language, but it shows the model a
    German source with the tag <2de> beside the <2en> of every German-English pair: the tag is no
    longer implied by the source's language, so the model learns to read it."""
    words = line.split()
    kept = [w for w in words if rng.random() >= drop] or words[:1]
    keys = [i + rng.uniform(0, reach) for i in range(len(kept))]
    return " ".join(w for _, w in sorted(zip(keys, kept)))


def fingerprint(source: Source) -> str:
    """SHA-256 of the split's raw content, so that any change to the data is noticed."""
    if source.kind == "several":
        return sha256_json(["several", *source.tags, *(fingerprint(p) for p in source.parts)])
    if source.kind == "hf":
        return hf.fingerprint(source)
    return sha256_json([source.kind] + [sha256_file(p) for p in source.paths] + ([list(source.lines)] if source.lines else [])
                       + (["noised", NOISE_SEED] if source.denoising else []))
