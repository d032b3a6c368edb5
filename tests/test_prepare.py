from collections import Counter
from pathlib import Path
from unittest import mock

import pytest
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from mtkit import corpus
from mtkit.config import load_config
from mtkit.data import TokenArray
from mtkit.errors import MtkitError
from mtkit.files import read_json
from mtkit.prepare import prepare
from mtkit.tokenizer import Tokenizer, train_model
from mtkit.train_tokenizer import train_tokenizer
from tests.conftest import write_config

FILLER = [(f"die katze {i} schläft im haus", f"the cat {i} sleeps in the house") for i in range(200)]
# (src, tgt, what the train filters must do with it)
TRAIN = [
    ("ein hund", "a dog", "kept"),
    ("", "an empty source", "empty"),
    ("ein hund", "a dog", "duplicate"),
    ("  ein \t hund ", "a  dog", "duplicate"),  # the same pair once normalized
    ("   ", "whitespace only", "empty"),
    ("wort " * 40, "word " * 40, "too_long"),
    ("ja", "yes " * 12, "ratio"),
    ("ein hund", "one dog", "kept"),  # same source, other target: not a duplicate
] + [(s, t, "kept") for s, t in FILLER]
VALID = [("ein hund", "a dog"), ("", ""), ("wort " * 40, "word " * 40), ("ein  hund", "a dog"),
         ("die katze 3 schläft im haus", "the cat 3 sleeps in the house"), ("neu", "new")]
TEST = [("haus", "house"), ("katze", "cat")]


def write_split(folder: Path, split: str, pairs) -> None:
    for i, lang in enumerate(("de", "en")):
        (folder / f"{split}.{lang}").write_text("".join(p[i] + "\n" for p in pairs), encoding="utf-8")


@pytest.fixture
def crafted(tmp_path) -> Path:
    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    write_split(corpus_dir, "train", TRAIN)
    write_split(corpus_dir, "valid", VALID)
    write_split(corpus_dir, "test", TEST)
    return write_config(tmp_path, data={"dir": str(corpus_dir), "src": "de", "tgt": "en", "max_len": 20},
                        tokenizer={"vocab_size": 120}, model={"max_positions": 64})


def run_stages(config: Path, overrides=()):
    cfg = load_config(config, list(overrides))
    train_tokenizer(cfg)
    return cfg, prepare(cfg)


def decode_side(result, split: str, side: str) -> list[str]:
    tok = Tokenizer.load(result.folder.parent / "tokenizer")
    arr = TokenArray(result.folder, split, side, result.manifest["dtype"])
    sp = tok.src if side == "src" else tok.tgt
    return [sp.decode(arr[i].tolist()) for i in range(len(arr))]


def test_train_filters_drop_exactly_what_they_should(crafted):
    _, result = run_stages(crafted)
    train = result.manifest["splits"]["train"]
    expected = [what for *_, what in TRAIN]
    assert train["pairs_in"] == len(TRAIN)
    assert train["kept"] == expected.count("kept")
    assert train["dropped"] == {r: expected.count(r) for r in ("empty", "duplicate", "too_short", "too_long", "ratio")}
    kept_src = [corpus.normalize(s) for s, _, what in TRAIN if what == "kept"]
    assert decode_side(result, "train", "src") == kept_src


def test_overlap_is_counted_without_dedup_too(crafted):
    _, result = run_stages(crafted, ["data.dedup=false"])
    assert result.manifest["splits"]["train"]["dropped"]["duplicate"] == 0
    assert result.manifest["splits"]["valid"]["overlap_with_train"] == {"src": 4, "pair": 4}


def test_min_len_filter(crafted):
    cfg, result = run_stages(crafted, ["data.min_len=3"])
    tok = Tokenizer.load(cfg.tokenizer_dir)

    def shorter_side(src: str, tgt: str) -> int:
        return min(len(tok.encode_src([corpus.normalize(src)])[0]), len(tok.encode_tgt([corpus.normalize(tgt)])[0]))

    short = [s for s, t, what in TRAIN if what == "kept" and shorter_side(s, t) < 3]
    assert len(short) == 2  # "ein hund" / "a dog" and "ein hund" / "one dog"
    assert result.manifest["splits"]["train"]["dropped"]["too_short"] == len(short)


def test_valid_and_test_are_never_filtered_or_reordered(crafted):
    _, result = run_stages(crafted)
    for split, pairs in (("valid", VALID), ("test", TEST)):
        stats = result.manifest["splits"][split]
        assert stats["pairs_in"] == stats["kept"] == len(pairs)
        assert decode_side(result, split, "src") == [corpus.normalize(s) for s, _ in pairs]
        assert decode_side(result, split, "tgt") == [corpus.normalize(t) for _, t in pairs]
    valid = result.manifest["splits"]["valid"]
    assert valid["empty_lines"] == 1
    assert valid["longer_than_max_len"] == 1
    # "ein hund" twice (once with extra spaces), the long line and "die katze 3 ..." occur in
    # train as read (the long pair was dropped there by the length filter); the empty line is no
    # sentence and does not count.
    assert valid["overlap_with_train"] == {"src": 4, "pair": 4}
    assert result.manifest["splits"]["test"]["overlap_with_train"] == {"src": 0, "pair": 0}


def test_manifest_records_fingerprints_and_statistics(crafted):
    cfg, result = run_stages(crafted)
    m = read_json(result.folder / "manifest.json")
    assert m == result.manifest
    assert m["tokenizer_fingerprint"] == Tokenizer.load(cfg.tokenizer_dir).fingerprint
    for split in ("train", "valid", "test"):
        assert len(m["inputs"][split]["sha256"]) == 64
        assert str(cfg.data.dir) in m["inputs"][split]["source"]
    src = m["splits"]["train"]["src"]
    assert src["sentences"] == m["splits"]["train"]["kept"]
    arr = TokenArray(result.folder, "train", "src", m["dtype"])
    assert src["tokens"] == int(arr.lengths.sum()) and src["max_len"] == int(arr.lengths.max())
    assert m["dtype"] == "uint16"


def test_rerun_is_a_no_op_and_any_change_reruns(crafted, capsys):
    cfg, first = run_stages(crafted)
    stamp = (first.folder / "manifest.json").stat().st_mtime_ns
    again = prepare(cfg)
    assert again.skipped and "prepare: up to date" in capsys.readouterr().err
    assert (first.folder / "manifest.json").stat().st_mtime_ns == stamp
    # A changed setting, or a changed valid file, makes it run again.
    assert not prepare(load_config(crafted, ["data.max_ratio=10"])).skipped
    write_split(cfg.data.dir, "valid", VALID[:2])
    redone = prepare(load_config(crafted, ["data.max_ratio=10"]))
    assert not redone.skipped and redone.manifest["splits"]["valid"]["pairs_in"] == 2


def test_prepare_refuses_a_stale_tokenizer(crafted):
    cfg, _ = run_stages(crafted)
    with pytest.raises(MtkitError) as info:
        prepare(load_config(crafted, ["tokenizer.vocab_size=100"]))
    assert "vocab_size=120 (config: 100)" in info.value.message
    assert "mtkit tokenizer train" in info.value.hint
    write_split(cfg.data.dir, "train", [(s, t) for s, t, _ in TRAIN[:-1]])
    with pytest.raises(MtkitError) as info:
        prepare(cfg)
    assert "the train data changed" in info.value.message


def test_prepare_without_tokenizer(crafted):
    with pytest.raises(MtkitError) as info:
        prepare(load_config(crafted))
    assert "mtkit tokenizer train" in info.value.hint


def test_mtkit_prepare_builds_a_missing_or_stale_tokenizer_first(crafted, cli):
    """One rule for every stage: prepare, like train and run, trains the tokenizer it needs."""
    code, _, err = cli("prepare", crafted)
    assert code == 0, err
    assert "tokenizer: training" in err and "prepare: done" in err
    code, _, err = cli("prepare", crafted, "--set", "tokenizer.vocab_size=100")
    assert code == 0, err
    assert "tokenizer: training" in err and "prepare: done" in err
    assert Tokenizer.load(crafted.parent / "run" / "tokenizer").src_vocab_size == 100
    code, _, err = cli("prepare", crafted, "--set", "tokenizer.vocab_size=100")
    assert code == 0 and "tokenizer: up to date" in err and "prepare: up to date" in err, err


def test_failure_keeps_the_previous_output_and_leaves_no_partial_files(crafted):
    cfg, first = run_stages(crafted)
    before = {p.name: p.read_bytes() for p in first.folder.iterdir()}
    (cfg.data.dir / "test.en").write_bytes(b"house\n\xff\xfe broken\n")
    with pytest.raises(MtkitError) as info:
        prepare(cfg)
    assert f"{cfg.data.dir / 'test.en'}:2: invalid UTF-8" in info.value.message
    assert {p.name: p.read_bytes() for p in first.folder.iterdir()} == before
    assert sorted(p.name for p in cfg.workdir.iterdir()) == ["data", "tokenizer"]


def test_failure_on_first_run_leaves_nothing(crafted):
    cfg = load_config(crafted)
    train_tokenizer(cfg)
    (cfg.data.dir / "valid.en").write_text("only one line\n")
    with pytest.raises(MtkitError) as info:
        prepare(cfg)
    assert "has 6 lines but" in info.value.message and "has 1" in info.value.message
    assert sorted(p.name for p in cfg.workdir.iterdir()) == ["tokenizer"]


def test_empty_split_and_everything_dropped_are_errors(crafted):
    cfg = load_config(crafted)
    train_tokenizer(cfg)
    write_split(cfg.data.dir, "test", [])
    with pytest.raises(MtkitError) as info:
        prepare(cfg)
    assert "the test split is empty" in info.value.message
    write_split(cfg.data.dir, "test", TEST)
    with pytest.raises(MtkitError) as info:
        prepare(load_config(crafted, ["data.max_len=1"]))
    assert f"every one of the {len(TRAIN)} train pairs was dropped" in info.value.message


def test_prepare_is_deterministic(crafted):
    cfg, first = run_stages(crafted)
    files = {p.name: p.read_bytes() for p in first.folder.iterdir() if p.suffix in (".bin", ".idx")}
    second = prepare(cfg, force=True)
    assert not second.skipped
    assert {p.name: p.read_bytes() for p in second.folder.iterdir() if p.suffix in (".bin", ".idx")} == files
    first.manifest.pop("seconds"), second.manifest.pop("seconds")
    assert first.manifest == second.manifest


def test_subword_sampling_writes_copies_of_the_same_sentences_cut_anew(crafted, capsys):
    """data.subword_sampling: train.s<k> hold every kept train pair again, in order, each cut by
    SentencePiece's sampling (BPE-dropout): the same text, other pieces, more of them; a cut over
    data.max_len keeps the deterministic one; valid and test are as without sampling."""
    cfg, plain = run_stages(crafted)
    plain_files = {p.name: p.read_bytes() for p in plain.folder.iterdir() if p.suffix in (".bin", ".idx")}
    assert "subword_sampling" not in plain.manifest["settings"]  # data prepared before keeps its fingerprint
    cfg, result = run_stages(crafted, ["data.subword_sampling=0.3", "data.sampled_copies=3"])
    assert "3 subword-sampled copies of train" in capsys.readouterr().err
    m = result.manifest
    assert m["settings"]["subword_sampling"] == 0.3 and m["settings"]["sampled_copies"] == 3
    for name in ("train", "valid", "test"):  # the deterministic cuts are unchanged
        for ext in (".src.bin", ".src.idx", ".tgt.bin", ".tgt.idx"):
            assert (result.folder / f"{name}{ext}").read_bytes() == plain_files[f"{name}{ext}"]
    tok = Tokenizer.load(cfg.tokenizer_dir)
    for side, sp in (("src", tok.src), ("tgt", tok.tgt)):
        det = TokenArray(result.folder, "train", side, m["dtype"])
        copies = [TokenArray(result.folder, f"train.s{k}", side, m["dtype"]) for k in range(3)]
        text = decode_side(result, "train", side)
        for copy in copies:
            assert [sp.decode(copy[i].tolist()) for i in range(len(copy))] == text
            assert copy.lengths.max() <= cfg.data.max_len
            assert (copy.lengths >= det.lengths).all() and copy.lengths.sum() > det.lengths.sum()
        assert not np.array_equal(copies[0].tokens, copies[1].tokens)
        sampling = m["splits"]["train"]["sampling"]
        assert sampling["copies"] == 3
        assert sampling[f"{side}_longer"] == round(sum(c.lengths.sum() for c in copies) / 3 / det.lengths.sum(), 3)
    # Nearly every merge dropped: most sentences would cut to more than max_len pieces, and keep their own.
    cfg, result = run_stages(crafted, ["data.subword_sampling=0.95", "data.sampled_copies=1"])
    det, copy = (TokenArray(result.folder, name, "src", m["dtype"]) for name in ("train", "train.s0"))
    kept_whole = [i for i in range(len(det)) if np.array_equal(copy[i], det[i])]
    assert copy.lengths.max() <= cfg.data.max_len and 0 < len(kept_whole) < len(det)


def test_subword_sampling_repeats_for_a_seed(crafted):
    sampled = ["data.subword_sampling=0.3", "data.sampled_copies=2"]
    cfg, first = run_stages(crafted, sampled)
    copies = {p.name: p.read_bytes() for p in first.folder.iterdir() if p.name.startswith(("train.s0.", "train.s1."))}
    assert len(copies) == 8
    again = prepare(load_config(crafted, sampled), force=True)
    assert {p.name: p.read_bytes() for p in again.folder.iterdir() if p.name.startswith(("train.s0.", "train.s1."))} == copies
    other = prepare(load_config(crafted, [*sampled, "experiment.seed=2"]))
    assert not other.skipped
    assert {p.name: p.read_bytes() for p in other.folder.iterdir() if p.name.startswith(("train.s0.", "train.s1."))} != copies


def test_subword_sampling_on_one_side_keeps_the_other_deterministic(crafted):
    """data.sampled_sides: src samples the source alone; every copy's target is the deterministic
    cut, byte for byte (and the other way round for tgt)."""
    cfg, both = run_stages(crafted, ["data.subword_sampling=0.3", "data.sampled_copies=2"])
    assert "sampled_sides" not in both.manifest["settings"]  # data sampled on both sides keeps its fingerprint
    for sides, kept, sampled in (("src", "tgt", "src"), ("tgt", "src", "tgt")):
        cfg, result = run_stages(crafted, ["data.subword_sampling=0.3", "data.sampled_copies=2",
                                           f"data.sampled_sides={sides}"])
        assert not result.skipped and result.manifest["settings"]["sampled_sides"] == sides
        det = {side: TokenArray(result.folder, "train", side, result.manifest["dtype"]) for side in ("src", "tgt")}
        for k in range(2):
            copy = {side: TokenArray(result.folder, f"train.s{k}", side, result.manifest["dtype"])
                    for side in ("src", "tgt")}
            assert np.array_equal(copy[kept].tokens, det[kept].tokens)
            assert np.array_equal(copy[kept].lengths, det[kept].lengths)
            assert copy[sampled].lengths.sum() > det[sampled].lengths.sum()
        sampling = result.manifest["splits"]["train"]["sampling"]
        assert sampling[f"{kept}_longer"] == 1.0 and sampling[f"{sampled}_longer"] > 1.0


def test_demo_corpus_prepares(demo_config):
    cfg, result = run_stages(demo_config)
    train = result.manifest["splits"]["train"]
    assert train["pairs_in"] == 30_000
    assert train["dropped"]["duplicate"] > 0 and train["dropped"]["empty"] == 0
    assert train["kept"] == 30_000 - sum(train["dropped"].values())
    for split in ("valid", "test"):
        s = result.manifest["splits"][split]
        assert s["kept"] == 1000 and s["overlap_with_train"]["src"] == 0
        assert s["src"]["unk"] == s["tgt"]["unk"] == 0


def test_unknown_tokens_are_counted_while_writing(tmp_path):
    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    write_split(corpus_dir, "train", [(s, t, "kept") for s, t in FILLER])
    write_split(corpus_dir, "valid", [("die katze 象 schläft", "the cat 象 象 sleeps"), ("haus", "house")])
    write_split(corpus_dir, "test", [("ω haus", "house")])
    config = write_config(tmp_path, data={"dir": str(corpus_dir), "src": "de", "tgt": "en"},
                          tokenizer={"vocab_size": 80})
    cfg = load_config(config)
    train_tokenizer(cfg)
    manifest = prepare(cfg).manifest
    for split, side, expected in (("valid", "src", 1), ("valid", "tgt", 2), ("test", "src", 1), ("test", "tgt", 0),
                                  ("train", "src", 0)):
        array = TokenArray(cfg.data_cache_dir, split, side, manifest["dtype"])
        assert manifest["splits"][split][side]["unk"] == int((array.tokens == 1).sum()) == expected


# Fuzzing (hypothesis): for any train pairs, in any chunking, the filters keep exactly the pairs
# the rules allow, in order, and count every other pair under one reason.

WORDS = ["ein", "hund", "katze", "a", "dog", "cat", "  ", "\t", "\x00", "é", "e\u0301", "🐶", "\u2028"]
SENTENCE = st.lists(st.sampled_from(WORDS), max_size=14).map(" ".join) | st.text(max_size=12)


@pytest.fixture(scope="module")
def fuzz_tokenizer() -> Tokenizer:
    sentences = [corpus.normalize(" ".join(WORDS[i:] + WORDS[:i])) for i in range(len(WORDS))] * 4
    return Tokenizer(train_model(sentences, model_type="bpe", vocab_size=40, character_coverage=1.0,
                                 byte_fallback=False, threads=1))


def by_the_rules(pairs, tok: Tokenizer, filters: dict) -> tuple[list, Counter]:
    """The filters applied one pair at a time, as the module docstring states them."""
    kept, counts, seen = [], Counter(), set()
    for src, tgt in pairs:
        src, tgt = corpus.normalize(src), corpus.normalize(tgt)
        if not src or not tgt:
            counts["empty"] += 1
            continue
        if filters["dedup"]:
            if (src, tgt) in seen:
                counts["duplicate"] += 1
                continue
            seen.add((src, tgt))
        ids = tok.encode_src([src])[0], tok.encode_tgt([tgt])[0]
        shorter, longer = sorted(map(len, ids))
        if shorter < filters["min_len"]:
            counts["too_short"] += 1
        elif longer > filters["max_len"]:
            counts["too_long"] += 1
        elif longer > filters["max_ratio"] * shorter:
            counts["ratio"] += 1
        else:
            kept.append(ids)
    return kept, counts


@settings(max_examples=80, deadline=None)
@given(pairs=st.lists(st.tuples(SENTENCE, SENTENCE), max_size=40), chunk=st.integers(1, 12), dedup=st.booleans(),
       min_len=st.integers(1, 3), max_len=st.integers(3, 12), max_ratio=st.sampled_from([1.0, 1.5, 3.0]))
def test_the_train_filters_keep_exactly_what_the_rules_allow(tmp_path_factory, fuzz_tokenizer, pairs, chunk, dedup,
                                                              min_len, max_len, max_ratio):
    from mtkit import prepare as stage
    from mtkit.data import ArrayWriter

    # One line each (a "\n" would start another line; a BOM is only ever at the start of a file).
    pairs = [tuple(x.replace("\n", " ").replace("\ufeff", " ") for x in pair) for pair in pairs]
    folder = tmp_path_factory.mktemp("filters")
    write_split(folder, "train", pairs)
    source = corpus.Source(split="train", kind="text", paths=(folder / "train.de", folder / "train.en"))
    filters = {"min_len": min_len, "max_len": max_len, "max_ratio": max_ratio, "dedup": dedup}
    writers = [ArrayWriter(folder / f"train.{side}", np.dtype("uint16")) for side in ("src", "tgt")]
    seen = {"heldout": set(), "src": set(), "pair": set(), "dedup": stage.SeenKeys()}
    kept, counts = by_the_rules(pairs, fuzz_tokenizer, filters)
    with mock.patch.object(stage, "CHUNK", chunk):
        try:
            result = stage._prepare_split(source, fuzz_tokenizer, [writers], filters, seen, lambda n: None)
        except MtkitError as e:
            result = e.message
        finally:
            for w in writers:
                w.close()
    if not pairs:
        assert result.startswith("the train split is empty")
    elif not kept:
        assert result.startswith(f"every one of the {len(pairs)} train pairs was dropped")
    else:
        assert result["pairs_in"] == len(pairs) and result["kept"] == len(kept)
        assert result["dropped"] == {reason: counts[reason] for reason in stage.DROP_REASONS}
        arrays = [TokenArray(folder, "train", side, "uint16") for side in ("src", "tgt")]
        assert [(a.tolist(), b.tolist()) for a, b in zip(*arrays)] == kept


def test_streaming_prepares_the_same_data_without_converting_the_dataset(tmp_path):
    """data.streaming: the examples are read as they come; datasets writes no Arrow copy."""
    import json
    import os

    corpus_dir = tmp_path / "corpus"
    for split, pairs in (("train", FILLER), ("validation", VALID), ("test", TEST)):
        rows = [{"translation": {"de": p[0], "en": p[1]}} for p in pairs]
        (corpus_dir / split).mkdir(parents=True)
        (corpus_dir / split / "part.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    arrays = {}
    for streaming in (True, False):
        arrow_before = set(Path(os.environ["HF_HOME"]).rglob("*.arrow"))
        (tmp_path / str(streaming)).mkdir()
        config = write_config(tmp_path / str(streaming), data={
            "format": "hf", "dir": str(corpus_dir), "src": "de", "tgt": "en", "valid": "validation",
            "hf_dataset": str(corpus_dir), "streaming": streaming}, tokenizer={"vocab_size": 120})
        cfg, result = run_stages(config)
        arrays[streaming] = {p.name: p.read_bytes() for p in result.folder.iterdir() if p.suffix in (".bin", ".idx")}
        arrow_new = set(Path(os.environ["HF_HOME"]).rglob("*.arrow")) - arrow_before
        assert not arrow_new if streaming else arrow_new  # without streaming, datasets converts to Arrow first
    assert arrays[True] == arrays[False] and len(arrays[True]) == 12


def test_a_stream_is_read_once_by_the_tokenizer_and_prepare_together(tmp_path, monkeypatch):
    """A streamed hub dataset is downloaded as it is read: the tokenizer reads train, prepare reads
    it again, and valid and test twice (the overlap check, then the arrays). Each split's stream is
    now read once, by its first reader, which keeps a copy in the workdir for the next; prepare
    deletes the copies. The prepared data is what reading every stream each time gave."""
    import json

    from mtkit import hf

    corpus_dir = tmp_path / "corpus"
    for split, pairs in (("train", FILLER), ("validation", VALID), ("test", TEST)):
        (corpus_dir / split).mkdir(parents=True)
        (corpus_dir / split / "part.jsonl").write_text(
            "".join(json.dumps({"translation": {"de": s, "en": t}}) + "\n" for s, t in pairs))
    reads = Counter()
    read = hf._read

    def counted(source):
        reads[source.split] += 1
        yield from read(source)

    monkeypatch.setattr(hf, "_read", counted)
    arrays = {}
    for name, overrides in (("kept", []), ("read each time", [])):
        (tmp_path / name).mkdir()
        config = write_config(tmp_path / name, data={
            "format": "hf", "dir": str(corpus_dir), "src": "de", "tgt": "en", "valid": "validation",
            "hf_dataset": str(corpus_dir), "streaming": True}, tokenizer={"vocab_size": 120})
        if name == "read each time":  # as before: no copies kept
            monkeypatch.setattr(corpus, "keep_streams", lambda source, workdir, sha256: source)
        reads.clear()
        cfg, result = run_stages(config, overrides)
        arrays[name] = {p.name: p.read_bytes() for p in result.folder.iterdir() if p.suffix in (".bin", ".idx")}
        if name == "kept":
            assert reads == {"train": 1, "valid": 1, "test": 1}
            assert not (cfg.workdir / "stream").exists()
        else:
            assert reads == {"train": 2, "valid": 2, "test": 2}
    assert arrays["kept"] == arrays["read each time"] and len(arrays["kept"]) == 12


def test_a_stream_left_half_read_is_never_taken_for_a_whole_one(tmp_path):
    """A reader that stops early (an error, a ctrl-C) leaves no copy; one read to its end does."""
    from mtkit import hf

    rows = tmp_path / "train.jsonl"
    rows.write_text("".join(f'{{"de": "satz {i}", "en": "sentence {i}"}}\n' for i in range(2500)))
    source = corpus.Source(split="train", kind="hf", hf_file=rows, src="de", tgt="en", streaming=True,
                           keep=tmp_path / "stream" / "train.jsonl")
    pairs = hf.read(source)
    assert [next(pairs) for _ in range(1200)][-1] == ("satz 1199", "sentence 1199")
    pairs.close()
    assert not (tmp_path / "stream").exists()
    whole = list(hf.read(source))
    assert len(whole) == 2500 and source.keep.is_file()
    rows.unlink()  # read from the copy now
    assert list(hf.read(source)) == whole


def test_a_disk_that_fills_while_a_stream_is_kept_says_so_and_keeps_nothing(tmp_path, monkeypatch):
    import errno
    import json
    from types import SimpleNamespace

    from mtkit import hf

    rows = tmp_path / "train.jsonl"
    rows.write_text("".join(f'{{"de": "satz {i}", "en": "sentence {i}"}}\n' for i in range(50)))
    source = corpus.Source(split="train", kind="hf", hf_file=rows, src="de", tgt="en", streaming=True,
                           keep=tmp_path / "run" / "stream" / "train.jsonl")
    written = []

    def dumps(pair, **kw):
        written.append(pair)
        if len(written) == 30:
            raise OSError(errno.ENOSPC, "No space left on device")
        return json.dumps(pair, **kw)

    # hf's json only (datasets writes JSON too, as it loads the file into a fresh cache)
    monkeypatch.setattr(hf, "json", SimpleNamespace(dumps=dumps, loads=json.loads))
    with pytest.raises(MtkitError) as info:
        list(hf.read(source))
    assert info.value.message.startswith(f"the disk filled while keeping a copy of the stream in {source.keep}.part")
    assert "set experiment.workdir on another disk" in info.value.hint
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("sampled", [False, True])
def test_worker_processes_prepare_exactly_what_one_process_does(crafted, monkeypatch, sampled):
    """Large train splits are normalized and encoded by one worker process a core (chunks.py), in
    chunks given back in order: the arrays, counts and overlap figures are those of one process,
    with every filter at work (TRAIN) across chunks of 7 pairs, and subword-sampled copies."""
    from mtkit import chunks
    from mtkit import prepare as stage

    monkeypatch.setattr(stage, "CHUNK", 7)
    overrides = ["data.subword_sampling=0.1", "data.sampled_copies=2"] if sampled else []
    made = {}
    for workers in (0, 2):
        monkeypatch.setattr(chunks, "workers_for", lambda pairs, cores, n=workers: n if pairs else 0)
        cfg, _ = run_stages(crafted, overrides)
        result = prepare(cfg, force=True)
        made[workers] = ({p.name: p.read_bytes() for p in result.folder.iterdir() if p.suffix in (".bin", ".idx")},
                         {k: v for k, v in result.manifest.items() if k != "seconds"})
    assert made[0] == made[2] and len(made[0][0]) == 12 + 8 * sampled


def test_how_many_processes_encode_a_split():
    from mtkit.chunks import POOL_FROM, workers_for

    assert [workers_for(pairs, cores) for pairs in (None, 0, POOL_FROM - 1, POOL_FROM, 50_000_000)
            for cores in (1, 2, 16)] == [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2, 16, 0, 2, 16]


def test_dedup_remembers_a_pair_in_6_bytes_where_a_set_of_its_keys_took_over_80():
    """WMT-sized corpora: dedup must remember every distinct train pair. A Python set of their
    16-byte keys (what prepare kept) costs over 80 bytes a pair, 4 GB at 50 million; SeenKeys keeps
    6, and merging its sorted arrays never copies them all at once."""
    import sys
    import tracemalloc

    from mtkit.prepare import SeenKeys

    n = 160_000  # 16 chunks: the last one merges every array
    keys = np.random.default_rng(0).integers(0, 2**64, n, dtype=np.uint64)
    seen = SeenKeys()
    tracemalloc.start()
    for start in range(0, n, 10_000):
        assert seen.first_seen(keys[start:start + 10_000]).all()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert seen.nbytes == 6 * n
    # The merges copy a shard's arrays, not all of them: the peak is the keys and little more
    # (merging everything in one array peaked at 1.7 times the keys).
    assert peak < 1.25 * 6 * n
    as_before = {bytes(16) + k.tobytes() for k in keys[:20_000]}  # 16-byte keys in a set, as prepare kept them
    per_pair = (sys.getsizeof(as_before) + sum(sys.getsizeof(k) for k in as_before)) / len(as_before)
    assert per_pair > 80 and seen.nbytes / n <= 6


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 40), max_size=300), st.integers(1, 50))
def test_dedup_keeps_the_first_of_equal_keys_across_chunks(values, chunk):
    from mtkit.prepare import SeenKeys

    seen, reference, kept = SeenKeys(), set(), []
    # Spread over the 64 bits, so that keys fall in every shard.
    keys = np.array(values, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    for start in range(0, len(keys), chunk):
        kept += seen.first_seen(keys[start:start + chunk]).tolist()
    for v in values:
        kept_here = v not in reference
        reference.add(v)
        assert kept.pop(0) == kept_here


def test_token_statistics_are_read_a_million_sentences_at_a_time(tmp_path):
    """A split's statistics come from its .idx file in slices (the lengths of 50 million pairs at
    once grew prepare's peak with the corpus): the same figures as from all the lengths at once,
    for the split and for any run of its sentences (a direction's)."""
    from mtkit.prepare import _token_stats

    lengths = np.random.default_rng(1).integers(0, 90, 2_500_000)
    lengths[1_048_576] = 250  # the longest, first of a slice
    np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64).tofile(tmp_path / "train.src.idx")
    for start, end in ((0, len(lengths)), (5, 1_048_576), (1_048_576, 1_048_577), (7, 7)):
        part = lengths[start:end]
        assert _token_stats(tmp_path / "train.src.idx", start, end) == {
            "sentences": len(part), "tokens": int(part.sum()),
            "mean_len": round(float(part.mean()), 2) if len(part) else 0.0, "max_len": int(part.max(initial=0))}
