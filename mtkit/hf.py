"""Reading HuggingFace `datasets`: a hub dataset, a local folder of data files, a folder from
save_to_disk, or one data file (json, jsonl, parquet, csv); whole (Arrow tables, memory-mapped) or
streamed (data.streaming: examples read as they come, no Arrow copy of the whole).

A stream is read once per command. Its first reader, given a file to keep it in (`Source.keep`,
set by `corpus.keep_streams`), writes the pairs there as it reads them; the next reader of the
split reads that copy instead of the stream (the tokenizer reads train and prepare reads it after;
prepare reads valid and test twice). Prepare deletes the copies when it is done.
"""

import errno
import itertools
import json
import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from mtkit.errors import MtkitError
from mtkit.files import sha256_file, sha256_json

if TYPE_CHECKING:
    from mtkit.corpus import Source

FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
# "train[:14500]", "train[50%:]": part of a split, written as HuggingFace datasets writes it (format
# hf leaves the name to datasets.load_dataset, which reads the same syntax).
PART = re.compile(r"(?P<name>.+)\[(?P<start>(?:\d+%?)?):(?P<end>(?:\d+%?)?)\]")


def read(source: "Source") -> Iterator[tuple[str, str]]:
    """The (src, tgt) pairs of an hf split, in order; a stream from the copy its first reader kept."""
    if source.keep and source.keep.is_file():
        with open(source.keep, encoding="utf-8") as f:
            yield from (tuple(json.loads(line)) for line in f)
        return
    pairs = _read(source)
    yield from (_keeping(pairs, source.keep) if source.keep else pairs)


def _keeping(pairs: Iterator[tuple[str, str]], path: Path) -> Iterator[tuple[str, str]]:
    """The pairs, written to `path` as they pass; the file is there only once all have passed."""
    part = path.with_name(path.name + ".part")
    made = [folder for folder in (path.parent.parent, path.parent) if not folder.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(part, "w", encoding="utf-8") as f:
            for pair in pairs:
                f.write(json.dumps(pair, ensure_ascii=False) + "\n")
                yield pair
        part.replace(path)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        raise MtkitError(f"the disk filled while keeping a copy of the stream in {part} (for the next reader: "
                         "a stream is read once per command)",
                         hint="free space there, or set experiment.workdir on another disk") from None
    finally:
        part.unlink(missing_ok=True)
        for folder in reversed(made):  # a reader stopped before the end leaves nothing behind
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()


def load(source: "Source"):
    """A datasets.Dataset, or with data.streaming an IterableDataset: examples read as they are
    needed, without downloading and converting the whole dataset to Arrow files first."""
    # No memo here: datasets caches the Arrow table on disk, and a memo would hide edited files.
    import datasets  # heavy (pyarrow, pandas): imported only when an HF source is read

    stream = dict(streaming=True) if source.streaming else {}
    is_saved = saved(source)
    # A part of a split ("train[:50%]"): load_dataset takes it, but neither a save_to_disk folder
    # nor a stream does, so those are cut here.
    part = PART.fullmatch(source.hf_split or "") if is_saved or source.streaming else None
    name = part["name"] if part else source.hf_split
    try:
        if source.hf_file:
            builder = FILE_BUILDERS[source.hf_file.suffix]
            return datasets.load_dataset(builder, data_files=str(source.hf_file), split="train", **stream)
        if is_saved:
            loaded = datasets.load_from_disk(source.hf_dataset)  # a folder from save_to_disk(): memory-mapped
            loaded = loaded[name] if isinstance(loaded, datasets.DatasetDict) else loaded
            loaded = _cut(loaded, part, source) if part else loaded
            return loaded.to_iterable_dataset() if source.streaming else loaded
        loaded = datasets.load_dataset(source.hf_dataset, source.hf_config, split=name, **stream)
        return _cut(loaded, part, source) if part else loaded
    except MtkitError:
        raise
    except StopIteration:  # datasets' feature inference on a file without a single example
        raise MtkitError(f"the {source.split} split is empty: {source.describe()}",
                         hint="check the files, or data.dir and the split names") from None
    except Exception as e:  # datasets raises many types (network, missing split, bad file)
        raise cannot_load(source, e) from None


def cannot_load(source: "Source", e: Exception) -> MtkitError:
    return MtkitError(f"cannot load {source.describe()}: {type(e).__name__}: {e}",
                      hint="check data.hf_dataset / data.hf_config / the split name; hub datasets need network "
                           "access (or a local copy: data.hf_dataset: path/to/folder)")


def saved(source: "Source") -> bool:
    """Whether the source is a folder from datasets' save_to_disk (memory-mapped, of known length)."""
    return bool(source.hf_dataset) and ((Path(source.hf_dataset) / "dataset_dict.json").is_file() or (
        Path(source.hf_dataset) / "state.json").is_file())


def _cut(dataset, part: re.Match, source: "Source"):
    """Rows [start:end] of a Dataset (in rows or percent of its length) or of a stream (in rows:
    its length is unknown until it is read through)."""
    start, end = part["start"], part["end"]
    if not hasattr(dataset, "__len__"):
        if percent := next((b for b in (start, end) if b.endswith("%")), None):
            raise MtkitError(f"data.{source.split}: a streamed split has no length to take {percent} of",
                             hint=f"give rows instead (e.g. {part['name']}[:100000]), or set data.streaming: false")
        dataset = dataset.skip(int(start)) if start else dataset
        return dataset.take(int(end) - int(start or 0)) if end else dataset
    n = len(dataset)
    a, b = (None if not x else int(x[:-1]) * n // 100 if x.endswith("%") else int(x) for x in (start, end))
    return dataset.select(range(a or 0, n if b is None else min(b, n)))


def _field_getter(columns: list[str], field: str | None, lang: str, source: "Source"):
    """Which column holds `lang`: an explicit dotted field, else translation.<lang>, else <lang>."""
    if field is None:
        field = f"translation.{lang}" if "translation" in columns else lang
    column, _, key = field.partition(".")
    if column not in columns:
        raise MtkitError(f"{source.describe()} has no column {column!r} (columns: {', '.join(columns)})",
                         hint="set data.src_field / data.tgt_field, e.g. translation.de or a column name")

    def get(batch: dict[str, list], first_row: int) -> list[str]:
        values = batch[column]
        if key:
            try:
                values = [v[key] for v in values]
            except (KeyError, TypeError):
                i = next((i for i, v in enumerate(values) if not isinstance(v, dict) or key not in v), 0)
                if first_row + i == 0:  # the first row: the field is wrong, not a row
                    raise MtkitError(f"{source.describe()}: column {column!r} has no field {key!r}",
                                     hint="set data.src_field / data.tgt_field to the right dotted path") from None
                raise MtkitError(f"{source.describe()}, row {first_row + i + 1:,}: column {column!r} has no field "
                                 f"{key!r}, which the rows before it have ({column}: {values[i]!r:.200})",
                                 hint="fix or drop that row: its two sides are out of step") from None
        return ["" if v is None else str(v) for v in values]

    return get


def _read(source: "Source") -> Iterator[tuple[str, str]]:
    ds = load(source)
    batches = ds.iter(batch_size=1000)
    first = next(batches, None)
    if first is None:
        return
    # A stream may not know its columns before it is read: take them from the first batch.
    columns = ds.column_names or list(first)
    get_src = _field_getter(columns, source.src_field, source.src, source)
    get_tgt = _field_getter(columns, source.tgt_field, source.tgt, source)
    rows = 0
    for batch in itertools.chain([first], batches):
        yield from zip(get_src(batch, rows), get_tgt(batch, rows))
        rows += len(batch[columns[0]])


def fingerprint(source: "Source") -> str:
    """SHA-256 of an hf split's content, or for a stream of what identifies it without reading it."""
    if source.streaming and not saved(source):
        # A stream is not read through to be fingerprinted (a hub dataset would be downloaded once
        # more for it): a file by its bytes; a hub dataset or a folder of files by the hash that
        # datasets' builder makes of its revision and files (a local file's time and size).
        fields = [source.src_field, source.tgt_field, source.hf_split]
        if source.hf_file:
            return sha256_json(["hf-file", sha256_file(source.hf_file), *fields])
        import datasets

        try:
            builder = datasets.load_dataset_builder(source.hf_dataset, source.hf_config)
        except Exception as e:  # no network, no such dataset: said as loading it would
            raise cannot_load(source, e) from None
        return sha256_json(["hf-builder", builder.hash, source.hf_config, *fields])
    # datasets fingerprints every Dataset from its source files and transforms.
    # (A saved dataset read as a stream: fingerprinted as the memory-mapped table it is.)
    return sha256_json(["hf", load(replace(source, streaming=False))._fingerprint, source.src_field, source.tgt_field])
