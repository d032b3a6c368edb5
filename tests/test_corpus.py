import gzip
import json
import os
import re
import threading
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mtkit import corpus, hf
from mtkit.config import DataSection
from mtkit.errors import MtkitError

PAIRS = [("Ein Hund läuft.", "A dog runs."), ("Zwei Katzen.", "Two cats."), ("Hallo", "Hello")]


def data(tmp_path: Path, **kw) -> DataSection:
    return DataSection(**{"format": "text", "dir": tmp_path, "src": "de", "tgt": "en", **kw})


def source_for(data: DataSection, split: str) -> corpus.Source:
    return corpus.source_for(**data.source_args(split))


def write_lines(path: Path, lines, packed: bool = False) -> Path:
    payload = "".join(line + "\n" for line in lines).encode()
    path.write_bytes(gzip.compress(payload) if packed else payload)
    return path


def read(tmp_path: Path, split="train", **kw) -> list[tuple[str, str]]:
    return list(corpus.read_pairs(source_for(data(tmp_path, **kw), split)))


def error(tmp_path: Path, split="train", **kw) -> str:
    with pytest.raises(MtkitError) as info:
        read(tmp_path, split, **kw)
    return info.value.message


@pytest.mark.parametrize("packed", [False, True])
def test_dir_prefix_layout_plain_and_gz(tmp_path, packed):
    suffix = ".gz" if packed else ""
    write_lines(tmp_path / f"train.de{suffix}", [s for s, _ in PAIRS], packed)
    write_lines(tmp_path / f"train.en{suffix}", [t for _, t in PAIRS], packed)
    assert read(tmp_path) == PAIRS


def test_gzip_is_detected_by_content_not_name(tmp_path):
    write_lines(tmp_path / "a.de", ["x"], packed=True)
    write_lines(tmp_path / "a.en", ["y"])
    assert read(tmp_path, train=("a.de", "a.en")) == [("x", "y")]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX's (Windows has none to pass)")
@pytest.mark.parametrize("packed", [False, True])
def test_a_pipe_is_read_as_it_comes_gzip_or_not(tmp_path, packed):
    """`mtkit eval --ref <(zcat ref.gz)`: a pipe cannot seek back after its first bytes were read to
    tell gzip from text (it said "cannot read /dev/fd/63: None")."""
    write_lines(tmp_path / "lines", ["eins", "zwei"], packed)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_bytes((tmp_path / "lines").read_bytes()), daemon=True)
    writer.start()
    assert list(corpus.read_lines(fifo)) == ["eins", "zwei"]
    writer.join(timeout=60)


def test_pair_of_files(tmp_path):
    write_lines(tmp_path / "source.txt", [s for s, _ in PAIRS])
    write_lines(tmp_path / "target.txt", [t for _, t in PAIRS])
    assert read(tmp_path, train=("source.txt", "target.txt")) == PAIRS


def test_both_plain_and_gz_present_is_ambiguous(tmp_path):
    for name in ("train.de", "train.en"):
        write_lines(tmp_path / name, ["a"])
    write_lines(tmp_path / "train.de.gz", ["a"], packed=True)
    assert "both" in error(tmp_path) and "train.de.gz" in error(tmp_path)


def test_missing_file_names_what_was_looked_for_and_what_is_there(tmp_path):
    write_lines(tmp_path / "train.de", ["a"])
    with pytest.raises(MtkitError) as info:
        source_for(data(tmp_path), "train")
    assert f"looked for {tmp_path / 'train.en'} and {tmp_path / 'train.en.gz'}" in info.value.message
    assert "train.de" in info.value.hint
    with pytest.raises(MtkitError) as info:
        source_for(data(tmp_path / "nowhere"), "train")
    assert "does not exist" in info.value.hint


def test_mismatched_line_counts_name_both_files_and_counts(tmp_path):
    write_lines(tmp_path / "train.de", ["a", "b", "c"])
    write_lines(tmp_path / "train.en", ["a", "b"])
    message = error(tmp_path)
    assert f"{tmp_path / 'train.de'} has 3 lines but {tmp_path / 'train.en'} has 2" in message
    write_lines(tmp_path / "train.en", ["a", "b", "c", "d", "e"])
    assert "has 3 lines but" in error(tmp_path) and "has 5" in error(tmp_path)


def test_crlf_bom_and_inline_separators(tmp_path):
    (tmp_path / "train.de").write_bytes("\ufeffeins\r\nzwei\u2028halb\r\ndrei\rx\n".encode())
    (tmp_path / "train.en").write_bytes(b"one\ntwo\nthree\n")
    # Only \n ends a line: U+2028 and a lone \r stay inside, so the alignment holds.
    assert read(tmp_path) == [("eins", "one"), ("zwei\u2028halb", "two"), ("drei\rx", "three")]


def test_last_line_without_newline_counts(tmp_path):
    (tmp_path / "train.de").write_bytes(b"a\nb")
    (tmp_path / "train.en").write_bytes(b"A\nB")
    assert read(tmp_path) == [("a", "A"), ("b", "B")]


def test_invalid_utf8_names_file_and_line(tmp_path):
    (tmp_path / "train.de").write_bytes(b"gut\nschl\xe9cht\n")
    write_lines(tmp_path / "train.en", ["good", "bad"])
    message = error(tmp_path)
    assert f"{tmp_path / 'train.de'}:2: invalid UTF-8" in message
    assert read(tmp_path, encoding_errors="replace")[1] == ("schl\ufffdcht", "bad")


def test_binary_garbage_is_an_error_not_a_crash(tmp_path):
    (tmp_path / "train.de").write_bytes(bytes(range(256)) * 4)
    write_lines(tmp_path / "train.en", ["x"])
    assert "invalid UTF-8" in error(tmp_path)


def test_damaged_gzip(tmp_path):
    packed = gzip.compress(b"line\n" * 10000)
    (tmp_path / "train.de.gz").write_bytes(packed[: len(packed) // 2])
    write_lines(tmp_path / "train.en", ["x"] * 10000)
    assert "damaged gzip data" in error(tmp_path)


def test_tsv(tmp_path):
    write_lines(tmp_path / "train.tsv", [f"{s}\t{t}" for s, t in PAIRS])
    assert read(tmp_path, format="tsv") == PAIRS
    assert read(tmp_path, format="tsv", train="train.tsv") == PAIRS
    write_lines(tmp_path / "bad.tsv", ["a\tb", "no tab here", "x\ty"])
    assert f"{tmp_path / 'bad.tsv'}:2: expected exactly one tab" in error(tmp_path, format="tsv", train="bad.tsv")
    write_lines(tmp_path / "bad.tsv", ["a\tb", "x\ty", "three\tfields\there"])
    assert ":3: expected exactly one tab (source<TAB>target), found 2" in error(
        tmp_path, format="tsv", train="bad.tsv")


def test_tsv_gz(tmp_path):
    write_lines(tmp_path / "train.tsv.gz", [f"{s}\t{t}" for s, t in PAIRS], packed=True)
    assert read(tmp_path, format="tsv") == PAIRS


@pytest.mark.parametrize("packed", [False, True])
def test_part_of_a_split_in_lines_or_percent(tmp_path, packed):
    """train[start:end] reads lines start..end-1 of the split (percent of its lines too): the two
    halves are the whole, in order, and each has its own fingerprint."""
    pairs = [(f"Satz {i}.", f"Sentence {i}.") for i in range(10)]
    suffix = ".gz" if packed else ""
    write_lines(tmp_path / f"train.de{suffix}", [s for s, _ in pairs], packed)
    write_lines(tmp_path / f"train.en{suffix}", [t for _, t in pairs], packed)
    write_lines(tmp_path / "train.tsv", [f"{s}\t{t}" for s, t in pairs])
    for fmt in ("text", "tsv"):
        assert read(tmp_path, format=fmt, train="train[:50%]") == pairs[:5]
        assert read(tmp_path, format=fmt, train="train[50%:]") == pairs[5:]
        assert read(tmp_path, format=fmt, train="train[3:7]") == pairs[3:7]
        assert read(tmp_path, format=fmt, train="train[8:]") == pairs[8:]
        assert read(tmp_path, format=fmt, train="train[:]") == pairs
    prints = {spec: corpus.fingerprint(source_for(data(tmp_path, train=spec), "train"))
              for spec in ("train", "train[:50%]", "train[50%:]", "train[:5]")}
    assert len(set(prints.values())) == 4  # (the first 50% and the first 5 lines are the same lines, named apart)
    assert "lines [:50%]" in source_for(data(tmp_path, train="train[:50%]"), "train").describe()
    assert "the train split is empty" in error(tmp_path, train="train[10:]")
    for spec in ("train[7:3]", "train[5:5]", "train[:150%]"):
        assert f"data.train: '{spec}' is an empty or impossible part of a split" in error(tmp_path, train=spec)
    assert "no train file: looked for" in error(tmp_path, train="other[:5]")
    assert "no train file: looked for" in error(tmp_path, train="train[%:]")  # not a part: a (missing) file name


def test_normalize():
    assert corpus.normalize("  Cafe\u0301\t\tau\x00lait \u00a0 ") == "Café au lait"
    assert corpus.normalize("\x1b[31mred") == "[31mred"
    assert corpus.normalize("   ") == ""
    # nothing visible: blank, so translated into an empty line (U+200F alone gave invented words)
    for invisible in ("\u200f", "\u200e \u200f", "\u200b\ufeff", "\u2066\u2069", "\u00ad", " \u2060 "):
        assert corpus.normalize(invisible) == "", repr(invisible)
    assert corpus.normalize("\u200fשלום") == "\u200fשלום"  # a mark beside words stays
    assert corpus.normalize("مرحبا 👋🏽 שלום") == "مرحبا 👋🏽 שלום"


def test_fingerprint_follows_content(tmp_path):
    write_lines(tmp_path / "train.de", ["a"])
    write_lines(tmp_path / "train.en", ["b"])
    source = source_for(data(tmp_path), "train")
    before = corpus.fingerprint(source)
    (tmp_path / "train.en").touch()
    assert corpus.fingerprint(source) == before
    write_lines(tmp_path / "train.en", ["c"])
    assert corpus.fingerprint(source) != before


# HuggingFace datasets: the same `datasets` calls as for the hub, on local files and folders.

def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


TRANSLATION_ROWS = [{"translation": {"de": s, "en": t}} for s, t in PAIRS]


def test_hf_jsonl_file_with_translation_field(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", TRANSLATION_ROWS)
    assert read(tmp_path, format="hf", train="train.jsonl") == PAIRS


@pytest.mark.parametrize("streaming", [False, True])
def test_an_hf_row_without_one_side_is_named_by_its_number(tmp_path, streaming):
    """Rows 1-2,500 where row 1,501 lacks its English side: the error says which row (it said only
    that the column had no such field, and asked for another data.tgt_field, though 1,500 rows had
    it); a row whose side is null is an empty side, which prepare counts as it does empty lines."""
    rows = [{"translation": {"de": f"satz {i}", "en": f"sentence {i}"}} for i in range(2500)]
    write_jsonl(tmp_path / "train.jsonl", rows[:1500] + [{"translation": {"de": "nur deutsch"}}] + rows[1501:])
    message = error(tmp_path, format="hf", train="train.jsonl", streaming=streaming)
    assert "train.jsonl, row 1,501: column 'translation' has no field 'en', which the rows before it have" in message
    assert "'nur deutsch'" in message
    write_jsonl(tmp_path / "train.jsonl", [{"translation": {"de": "satz", "en": None}}] + rows)
    assert read(tmp_path, format="hf", train="train.jsonl", streaming=streaming)[:2] == [("satz", ""), ("satz 0", "sentence 0")]
    write_jsonl(tmp_path / "train.jsonl", [{"translation": {"de": "nur deutsch"}}] + rows)
    assert "train.jsonl: column 'translation' has no field 'en'" in error(tmp_path, format="hf", train="train.jsonl",
                                                                         streaming=streaming)


def test_hf_local_dataset_folder_through_load_dataset(tmp_path):
    folder = tmp_path / "my_dataset"
    write_jsonl(folder / "train.jsonl", TRANSLATION_ROWS)
    write_jsonl(folder / "validation.jsonl", TRANSLATION_ROWS[:1])
    kw = dict(format="hf", hf_dataset=str(folder))
    assert read(tmp_path, **kw) == PAIRS
    assert read(tmp_path, "valid", valid="validation", **kw) == PAIRS[:1]
    assert "cannot load" in error(tmp_path, "test", **kw)  # no such split


def test_hf_saved_to_disk_with_columns_and_explicit_fields(tmp_path):
    import datasets

    ds = datasets.DatasetDict({"train": datasets.Dataset.from_dict(
        {"german": [s for s, _ in PAIRS], "english": [t for _, t in PAIRS]})})
    ds.save_to_disk(tmp_path / "saved")
    kw = dict(format="hf", hf_dataset=str(tmp_path / "saved"))
    assert read(tmp_path, src_field="german", tgt_field="english", **kw) == PAIRS
    message = error(tmp_path, **kw)
    assert "no column 'de'" in message and "german" in message


def test_hf_parquet_with_language_columns(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"de": [s for s, _ in PAIRS], "en": [t for _, t in PAIRS]}).to_parquet(
        str(tmp_path / "train.parquet"))
    assert read(tmp_path, format="hf", train="train.parquet") == PAIRS


def test_hf_split_name_without_dataset_and_unreachable_hub(tmp_path):
    with pytest.raises(MtkitError) as info:
        source_for(data(tmp_path, format="hf"), "train")
    assert "data.hf_dataset is not set" in info.value.message
    # No network here (and HF offline in tests): a hub name fails with a clear message.
    message = error(tmp_path, format="hf", hf_dataset="nobody/no-such-dataset-xyz")
    assert "cannot load HF dataset nobody/no-such-dataset-xyz [train]" in message


def test_hf_fingerprint_changes_with_data(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", TRANSLATION_ROWS)
    first = corpus.fingerprint(source_for(data(tmp_path, format="hf", train="train.jsonl"), "train"))
    write_jsonl(tmp_path / "other.jsonl", TRANSLATION_ROWS[:2])
    second = corpus.fingerprint(source_for(data(tmp_path, format="hf", train="other.jsonl"), "train"))
    assert first != second


def test_pair_spec_only_for_text(tmp_path):
    with pytest.raises(MtkitError) as info:
        source_for(data(tmp_path, format="tsv", train=("a", "b")), "train")
    assert "only works with data.format: text" in info.value.message


# Fuzzing (hypothesis): whatever the bytes, the reader keeps every line, in order, or names the
# first line it cannot read.

LINES = st.lists(st.binary(max_size=40) | st.text(max_size=30).map(str.encode), max_size=25).map(
    lambda lines: [line.replace(b"\n", b"").rstrip(b"\r") for line in lines])


@settings(max_examples=150, deadline=None)
@given(lines=LINES, final_newline=st.booleans(), crlf=st.booleans(), bom=st.booleans(), packed=st.booleans())
def test_the_reader_keeps_every_line_in_order(tmp_path_factory, lines, final_newline, crlf, bom, packed):
    eol = b"\r\n" if crlf else b"\n"
    if lines and not bom and lines[0].startswith(b"\xef\xbb\xbf"):
        lines[0] = lines[0][3:]  # without a BOM of its own, the file's would start here
    while lines and lines[-1] == b"" and not final_newline:
        lines.pop()  # an empty last line without its newline is no line at all
    payload = (b"\xef\xbb\xbf" if bom and lines else b"") + b"".join(line + eol for line in lines)
    if lines and not final_newline:
        payload = payload[:-len(eol)]
    path = tmp_path_factory.mktemp("reader") / "train.de"
    path.write_bytes(gzip.compress(payload) if packed else payload)
    if not packed and payload.startswith(b"\x1f\x8b"):  # gzip's magic: read as gzip, whatever the name
        with pytest.raises(MtkitError, match="damaged gzip data"):
            list(corpus.read_lines(path, "replace"))
        return

    assert list(corpus.read_lines(path, "replace")) == [line.decode("utf-8", "replace") for line in lines]
    bad = next((n for n, line in enumerate(lines, 1) if line.decode("utf-8", "replace").encode() != line), None)
    if bad is None:
        assert list(corpus.read_lines(path)) == [line.decode() for line in lines]
    else:
        with pytest.raises(MtkitError, match=f"{re.escape(str(path))}:{bad}: invalid UTF-8"):
            list(corpus.read_lines(path))


@settings(max_examples=40, deadline=None)
@given(n_src=st.integers(0, 30), n_tgt=st.integers(0, 30))
def test_pairs_are_read_only_when_the_files_align(tmp_path_factory, n_src, n_tgt):
    folder = tmp_path_factory.mktemp("pairs")
    write_lines(folder / "train.de", [f"s{i}" for i in range(n_src)])
    write_lines(folder / "train.en", [f"t{i}" for i in range(n_tgt)])
    if n_src == n_tgt and n_src:
        assert read(folder) == [(f"s{i}", f"t{i}") for i in range(n_src)]
    elif n_src == n_tgt:
        assert "the train split is empty" in error(folder)
    else:
        assert f"has {n_src} lines but {folder / 'train.en'} has {n_tgt}" in error(folder)


def test_hf_streaming_reads_the_same_pairs_from_files_folders_and_saved_datasets(tmp_path):
    import datasets

    write_jsonl(tmp_path / "train.jsonl", TRANSLATION_ROWS)
    assert read(tmp_path, format="hf", train="train.jsonl", streaming=True) == PAIRS
    write_jsonl(tmp_path / "folder" / "train.jsonl", TRANSLATION_ROWS)
    assert read(tmp_path, format="hf", hf_dataset=str(tmp_path / "folder"), streaming=True) == PAIRS
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(
        {"german": [s for s, _ in PAIRS], "english": [t for _, t in PAIRS]})}).save_to_disk(tmp_path / "saved")
    kw = dict(format="hf", hf_dataset=str(tmp_path / "saved"), streaming=True)
    assert read(tmp_path, src_field="german", tgt_field="english", **kw) == PAIRS
    assert "no column 'de'" in error(tmp_path, **kw)  # columns known from the first batch
    write_jsonl(tmp_path / "empty.jsonl", [])
    assert "the train split is empty" in error(tmp_path, format="hf", train="empty.jsonl", streaming=True)


def test_hf_streaming_fingerprint_follows_the_content(tmp_path):
    def fingerprint(name):
        return corpus.fingerprint(source_for(data(tmp_path, format="hf", train=name, streaming=True), "train"))

    write_jsonl(tmp_path / "a.jsonl", TRANSLATION_ROWS)
    write_jsonl(tmp_path / "b.jsonl", TRANSLATION_ROWS)
    assert fingerprint("a.jsonl") == fingerprint("b.jsonl")
    write_jsonl(tmp_path / "b.jsonl", TRANSLATION_ROWS[:2])
    assert fingerprint("a.jsonl") != fingerprint("b.jsonl")


def test_a_streamed_source_is_fingerprinted_without_being_read(tmp_path, monkeypatch):
    """A stream was read through once more to be fingerprinted, by the tokenizer and by prepare, on
    every mtkit train or run: a hub dataset downloaded twice more per command. Now a file is hashed
    as bytes, a folder or a hub dataset by the hash datasets' builder makes of it, a saved dataset by
    its Arrow fingerprint; nothing of it is read as examples."""
    import os

    import datasets

    write_jsonl(tmp_path / "train.jsonl", TRANSLATION_ROWS)
    write_jsonl(tmp_path / "folder" / "train.jsonl", TRANSLATION_ROWS)
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(
        {"de": [s for s, _ in PAIRS], "en": [t for _, t in PAIRS]})}).save_to_disk(tmp_path / "saved")
    kinds = {"file": dict(train="train.jsonl"), "folder": dict(hf_dataset=str(tmp_path / "folder")),
             "saved": dict(hf_dataset=str(tmp_path / "saved"))}

    def fingerprint(kind):
        return corpus.fingerprint(source_for(data(tmp_path, format="hf", streaming=True, **kinds[kind]), "train"))

    def no_reading(source):
        raise AssertionError(f"{source.describe()} was read to be fingerprinted")

    monkeypatch.setattr(hf, "_read", no_reading)
    before = {kind: fingerprint(kind) for kind in kinds}
    assert before == {kind: fingerprint(kind) for kind in kinds}  # stable
    write_jsonl(tmp_path / "folder" / "train.jsonl", TRANSLATION_ROWS[:2])
    os.utime(tmp_path / "folder" / "train.jsonl", (1e9, 1e9))  # (another time than the first write's: the same second)
    assert fingerprint("folder") != before["folder"]


@pytest.mark.parametrize("where", ["folder", "saved", "folder streamed", "saved streamed"])
def test_hf_split_slicing_for_local_and_streamed_datasets(tmp_path, where):
    """configs/base.yaml says hf sources take `train[:50%]`: a folder of files read through
    load_dataset did, a save_to_disk folder failed (KeyError: 'train[:2]'), and so did streaming."""
    import datasets

    write_jsonl(tmp_path / "folder" / "train.jsonl", TRANSLATION_ROWS)
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(
        {"de": [s for s, _ in PAIRS], "en": [t for _, t in PAIRS]})}).save_to_disk(tmp_path / "saved")
    kw = dict(format="hf", hf_dataset=str(tmp_path / where.split()[0]), streaming=where.endswith("streamed"))
    assert read(tmp_path, train="train[:2]", **kw) == PAIRS[:2]
    assert read(tmp_path, train="train[1:]", **kw) == PAIRS[1:]
    if where == "folder streamed":  # a stream's length is unknown until it is read through (a saved one's is not)
        message = error(tmp_path, train="train[:67%]", **kw)
        assert "a streamed split has no length to take 67% of" in message
    else:
        assert read(tmp_path, train="train[:67%]", **kw) == PAIRS[:2]


def test_a_language_into_itself_reads_noisy_copies_the_same_at_every_read(demo_dir):
    """data.denoise's pairs: each source is its target with words dropped and shuffled a little,
    the same noise at every read (the tokenizer and prepare read it apart)."""
    from collections import Counter

    from mtkit.corpus import read_pairs, source_for

    source = source_for("valid", "valid", format="text", root=demo_dir, src="vs", tgt="vs")
    assert source.denoising and source.paths == (demo_dir / "valid.vs",) * 2
    pairs = list(read_pairs(source))
    assert pairs == list(read_pairs(source))
    targets = (demo_dir / "valid.vs").read_text(encoding="utf-8").splitlines()
    assert [tgt for _, tgt in pairs] == targets
    words = kept = changed = 0
    for src, tgt in pairs:
        assert not Counter(src.split()) - Counter(tgt.split()) and src.split()  # only its own words, one at least
        words, kept, changed = words + len(tgt.split()), kept + len(src.split()), changed + (src != tgt)
    assert 0.85 < kept / words < 0.95 and changed > 0.5 * len(pairs)  # about a tenth dropped
    assert not source_for("valid", "valid", format="text", root=demo_dir, src="en", tgt="vs").denoising
