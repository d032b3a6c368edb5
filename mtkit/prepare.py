"""Stage `mtkit prepare`: normalize -> filter -> encode -> token arrays + manifest.json.

Only the train split is filtered (empty side, duplicate pair, length, length ratio); valid and
test keep every line in order, because they are what models are scored on. The output folder
<workdir>/data/ is replaced atomically, and its manifest records the fingerprints of the raw
inputs, the tokenizer and the settings: a rerun with all three unchanged does nothing.
"""

import errno
import itertools
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mtkit import chunks, corpus, lineage
from mtkit.bookkeeping import keep_for_the_run
from mtkit.config import Config
from mtkit.console import console, info, progress_bar, table
from mtkit.data import ArrayWriter, token_dtype
from mtkit.errors import MtkitError
from mtkit.files import atomic_dir, read_json, sha256_json, write_json
from mtkit.tokenizer import Tokenizer

FORMAT_VERSION = 1
CHUNK = 10_000
DROP_REASONS = ("empty", "duplicate", "too_short", "too_long", "ratio")


@dataclass
class PrepareResult:
    folder: Path
    skipped: bool
    manifest: dict


def prepare(cfg: Config, force: bool = False) -> PrepareResult:
    out = cfg.data_cache_dir
    tok = Tokenizer.load(cfg.tokenizer_dir)
    sources = {split: corpus.split_source(cfg.data, split) for split in corpus.SPLITS}
    inputs = {split: {"source": s.describe(), "sha256": corpus.fingerprint(s)} for split, s in sources.items()}
    tok_info = read_json(cfg.tokenizer_dir / "tokenizer.json") or {}
    _check_tokenizer_is_current(cfg, tok_info, inputs["train"]["sha256"])
    d = cfg.data
    settings = {**d.languages, "min_len": d.min_len, "max_len": d.max_len,
                "max_ratio": d.max_ratio, "dedup": d.dedup, "encoding_errors": d.encoding_errors,
                "format_version": FORMAT_VERSION}
    if d.subword_sampling:  # (only then: data prepared without it keeps its fingerprint)
        settings |= {"subword_sampling": d.subword_sampling, "sampled_copies": d.sampled_copies,
                     "seed": cfg.experiment.seed}
        if d.sampled_sides != "both":  # (data sampled on both sides before keeps its fingerprint)
            settings["sampled_sides"] = d.sampled_sides
    fingerprint = sha256_json({"inputs": inputs, "tokenizer": tok.fingerprint, "settings": settings})
    previous = read_json(out / "manifest.json")
    if not force and previous and previous.get("fingerprint") == fingerprint:
        corpus.drop_kept_streams(cfg.workdir)
        info(f"prepare: up to date ({out}; inputs, tokenizer and settings unchanged)")
        return PrepareResult(out, True, previous)
    sources = {split: corpus.keep_streams(s, cfg.workdir, inputs[split]["sha256"]) for split, s in sources.items()}
    if not force:
        keep_for_the_run(cfg.workdir, out, "prepared data")

    start = time.perf_counter()
    dtype = token_dtype(max(tok.src_vocab_size, tok.tgt_vocab_size))
    # Memory: the overlap check keeps only the keys of valid/test (small) and of the train pairs
    # that match them; only dedup must remember every distinct train pair (6 bytes each: SeenKeys).
    train_seen = {"heldout": _heldout_keys(sources), "src": set(), "pair": set(), "dedup": SeenKeys()}
    splits, done = {}, {}  # done: pairs read of each split so far
    with atomic_dir(out) as tmp, progress_bar() as bar:
        try:
            for split, source in sources.items():
                expected = tok_info.get("pairs_seen") if split == "train" else None
                workers = chunks.workers_for(expected, chunks.cores())
                task = bar.add_task(f"prepare {split}" + (f" ({workers} processes)" if workers else ""), total=expected)
                copies = d.sampled_copies if split == "train" and d.subword_sampling else 0
                splits[split] = _write_split(
                    tmp, split, source, tok, dtype, settings, train_seen, copies,
                    lambda n, task=task, s=split: done.update({s: n}) or bar.update(task, completed=n),
                    (cfg.tokenizer_dir, workers))
                bar.update(task, total=splits[split]["pairs_in"], completed=splits[split]["pairs_in"])
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            raise _disk_full(tmp, out, done.get("train", 0), tok_info.get("pairs_seen")) from None
        manifest = {
            "format_version": FORMAT_VERSION, "fingerprint": fingerprint, "dtype": dtype.name,
            "tokenizer_fingerprint": tok.fingerprint, "src_vocab_size": tok.src_vocab_size,
            "tgt_vocab_size": tok.tgt_vocab_size, "inputs": inputs, "settings": settings, "splits": splits,
            "seconds": round(time.perf_counter() - start, 2),
        }
        write_json(tmp / "manifest.json", manifest)
    corpus.drop_kept_streams(cfg.workdir)
    _print_summary(manifest)
    info(f"prepare: done in {manifest['seconds']:.1f}s -> {out}")
    return PrepareResult(out, False, manifest)


def _disk_full(tmp: Path, out: Path, done: int, expected: int | None) -> MtkitError:
    """A full disk during prepare: what was written by then, and about how much the whole needs
    (what is written grows with the train pairs read; valid and test are small beside it)."""
    written = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()) / 2**20
    need = f"; it needs about {written * expected / done:,.0f} MB in all" if done and expected else ""
    of = f"{expected:,}" if expected else "an unknown number"
    return MtkitError(f"the disk filled while prepare wrote {out}: {written:,.1f} MB written for {done:,} train pairs "
                      f"of {of}{need}",
                      hint="free that much space there, or set experiment.workdir on another disk, then run again "
                           "(nothing half-written is kept)")


def _write_split(tmp: Path, split: str, source: corpus.Source, tok: Tokenizer, dtype, settings: dict,
                 train_seen: dict, copies: int, report, pool: tuple[Path, int]) -> dict:
    """One split into its token arrays (and `copies` subword-sampled copies, train.s<k>), with the
    counts and token statistics the manifest records of it."""
    names = [split] + [f"train.s{k}" for k in range(copies)]
    writers = [[ArrayWriter(tmp / f"{name}.{side}", dtype) for side in ("src", "tgt")] for name in names]
    try:
        result = _prepare_split(source, tok, writers, settings, train_seen, report, pool)
    finally:
        for w in itertools.chain(*writers):
            w.close()
    if copies:
        result["sampling"] = _sampling_stats(tmp, names)
    for side in ("src", "tgt"):
        idx = tmp / f"{split}.{side}.idx"
        for where, (start, end) in [(result, (0, result["kept"])),
                                    *((result["by_direction"][name], ends) for name, ends in result.get("directions", {}).items())]:
            where[side] = _token_stats(idx, start, end) | {"unk": where["unk"][side]}
    for where in [result, *result.get("by_direction", {}).values()]:
        del where["unk"]
    return result


def _check_tokenizer_is_current(cfg: Config, trained: dict, train_sha256: str) -> None:
    """Refuse to encode with a tokenizer that the config or the train data no longer describe
    (with train.init: that is not the tokenizer of the model the run starts from)."""
    if cfg.train.init or "inherited_from" in trained:
        wanted = lineage.load(cfg).tokenizer_fingerprint if cfg.train.init else None
        if trained.get("fingerprint") != wanted:
            what = f"the tokenizer of {lineage.parent(cfg)} (train.init)" if wanted else "one trained on this data"
            raise MtkitError(f"the tokenizer in {cfg.tokenizer_dir} is not {what}",
                             hint="make it so first: mtkit tokenizer train CONFIG (or use mtkit run CONFIG)")
        return
    wanted = {**cfg.tokenizer.model_dump(mode="json"), **cfg.data.languages}
    had = trained.get("settings", {})
    changed = [f"{k}={had.get(k)!r} (config: {v!r})" for k, v in wanted.items() if had.get(k) != v]
    if trained.get("train_sha256") != train_sha256:
        changed.append("the train data changed")
    if changed:
        raise MtkitError(f"the tokenizer in {cfg.tokenizer_dir} does not match this config: {'; '.join(changed)}",
                         hint="retrain it first: mtkit tokenizer train CONFIG (or use mtkit run CONFIG)")


class SeenKeys:
    """The train pairs kept so far, for dedup, in 6 bytes each: 52 bits of their BLAKE2b key (a
    Python set of the 16-byte keys took ~100 bytes a pair: 5 GB at 50 million pairs). The keys are
    kept in 16 shards by their first 4 bits, so that merging a shard's sorted arrays copies a
    sixteenth of them at most, and a key is kept as its next 48 bits. Two different pairs share 52
    bits with a chance of about one in four among 50 million pairs (one in 360 among 5 million): a
    pair then dropped as a duplicate."""

    SHARDS = 16

    def __init__(self):
        self.shards = [_SortedLevels() for _ in range(self.SHARDS)]

    def first_seen(self, keys: np.ndarray) -> np.ndarray:
        """Whether each key (uint64) is new: not seen before, nor earlier in `keys`. The new ones
        are remembered."""
        new = np.zeros(len(keys), dtype=bool)
        shard_of = keys >> np.uint64(60)
        # Bits 4-51 as 6 big-endian bytes, which sort as the number they are.
        rest = (keys << np.uint64(4)).astype(">u8").view(np.uint8).reshape(-1, 8)[:, :6]
        rest = np.ascontiguousarray(rest).view("S6").ravel()
        for shard, levels in enumerate(self.shards):
            where = np.flatnonzero(shard_of == shard)
            new[where] = levels.first_seen(rest[where])
        return new

    @property
    def nbytes(self) -> int:
        return sum(level.nbytes for shard in self.shards for level in shard.levels)


class _SortedLevels:
    """Keys in sorted arrays of about doubling sizes: a lookup is a binary search in each, and
    adding keys merges the smallest arrays (as a log-structured merge tree does)."""

    def __init__(self):
        self.levels: list[np.ndarray] = []

    def first_seen(self, keys: np.ndarray) -> np.ndarray:
        unique, first = np.unique(keys, return_index=True)  # sorted: the binary searches go in order
        fresh = np.ones(len(unique), dtype=bool)
        for level in self.levels:
            fresh &= level[np.searchsorted(level, unique).clip(max=len(level) - 1)] != unique
        new = np.zeros(len(keys), dtype=bool)
        new[first[fresh]] = True
        if fresh.any():
            self.levels.append(unique[fresh])
        while len(self.levels) > 1 and len(self.levels[-2]) <= 2 * len(self.levels[-1]):
            merged = np.concatenate([self.levels.pop(), self.levels.pop()])
            merged.sort()  # in place: the merge costs one copy of the two arrays, not two
            self.levels.append(merged)
        return new


def _heldout_keys(sources: dict[str, corpus.Source]) -> set[bytes]:
    """Keys of the valid/test sources and pairs: what train is checked against for overlap."""
    keys = set()
    for split in ("valid", "test"):
        for src, tgt in corpus.read_pairs(sources[split]):
            src, tgt = corpus.normalize(src), corpus.normalize(tgt)
            keys.update((chunks.key(src), chunks.key(src, tgt)))
    return keys


def _prepare_split(source: corpus.Source, tok: Tokenizer, writers: list[list[ArrayWriter]], filters: dict,
                   train_seen: dict, report, pool: tuple[Path | None, int] = (None, 0)) -> dict:
    """Normalize, (for train) filter, encode and write one split; returns its counts. pool: the
    tokenizer's folder and how many worker processes encode (0: this process)."""
    is_train = source.split == "train"
    counts: Counter = Counter()
    ends, by_direction = [], {}  # several directions: where each one's kept pairs end, and its counts
    for name, part in corpus.directions_of(source).items():
        before = counts.copy()
        _prepare_part(corpus.read_pairs(part), is_train, tok, writers, filters, train_seen, counts, pool, report)
        ends.append(counts["kept"])
        by_direction[name] = _summary(counts - before, is_train)
    if counts["kept"] == 0:
        dropped = ", ".join(f"{counts[r]} {r}" for r in DROP_REASONS if counts[r])
        raise MtkitError(f"every one of the {counts['pairs_in']} {source.split} pairs was dropped ({dropped})",
                         hint="loosen data.max_len / data.min_len / data.max_ratio")
    result = _summary(counts, is_train)
    if source.kind == "several":  # where each direction's lines are, in the token arrays, and its counts
        result["directions"] = {name: [start, end] for name, start, end in zip(by_direction, [0, *ends], ends)}
        result["by_direction"] = by_direction
    return result


def _summary(counts: Counter, is_train: bool) -> dict:
    """What the manifest records of a split (or of one direction in it)."""
    result = {"pairs_in": counts["pairs_in"], "kept": counts["kept"],
              "unk": {"src": counts["unk_src"], "tgt": counts["unk_tgt"]}}
    if is_train:
        result["dropped"] = {r: counts[r] for r in DROP_REASONS}
    else:
        result["empty_lines"] = counts["empty_lines"]
        result["longer_than_max_len"] = counts["longer_than_max_len"]
        result["overlap_with_train"] = {"src": counts["in_train_src"], "pair": counts["in_train_pair"]}
    return result


def _prepare_part(pairs, is_train: bool, tok: Tokenizer, writers: list[list[ArrayWriter]], filters: dict,
                  train_seen: dict, counts: Counter, pool: tuple[Path | None, int], report) -> None:
    """One direction's pairs (or a single pair's): normalized and encoded (chunks.py: in `pool`'s
    worker processes, if any), then filtered and written in order."""
    batches = iter(lambda: list(itertools.islice(pairs, CHUNK)), [])
    for chunk in chunks.encoded(batches, tok, *pool, with_lines=len(writers) > 1):
        keep = np.ones(chunk.n, dtype=bool)
        if is_train:
            keep &= ~chunk.empty
            counts["empty"] += int(chunk.empty.sum())
            # Overlap is measured against train as read (before dedup and the length filters).
            train_seen["src"].update(src for src, _ in chunk.keys if src in train_seen["heldout"])
            train_seen["pair"].update(pair for _, pair in chunk.keys if pair in train_seen["heldout"])
            if filters["dedup"]:  # the first of identical pairs, in this chunk or before it
                new = train_seen["dedup"].first_seen(np.frombuffer(b"".join(p[:8] for _, p in chunk.keys), np.uint64))
                counts["duplicate"] += len(new) - int(new.sum())
                keep[keep] = new
            keep &= _within_lengths(chunk.src_lengths, chunk.tgt_lengths, keep, filters, counts)
        else:  # kept whole, empty lines too; translation truncates what exceeds the model's positions
            counts["empty_lines"] += int(chunk.empty.sum())
            counts["in_train_src"] += sum(src in train_seen["src"] for src, _ in chunk.keys)
            counts["in_train_pair"] += sum(pair in train_seen["pair"] for _, pair in chunk.keys)
            counts["longer_than_max_len"] += int((chunk.src_lengths > filters["max_len"]).sum())
        # Unknown tokens are counted here, not by reading the arrays back: a memory map of a
        # large output would count against this process's RSS.
        counts["unk_src"] += int(chunk.src_unk[keep].sum())
        counts["unk_tgt"] += int(chunk.tgt_unk[keep].sum())
        writers[0][0].add_flat(chunk.src[np.repeat(keep, chunk.src_lengths)], chunk.src_lengths[keep])
        writers[0][1].add_flat(chunk.tgt[np.repeat(keep, chunk.tgt_lengths)], chunk.tgt_lengths[keep])
        if len(writers) > 1:
            _add_sampled(writers[1:], tok, *([line for line, k in zip(side, keep) if k] for side in chunk.lines),
                         *(_sentences(flat, lengths, keep) for flat, lengths in
                           ((chunk.src, chunk.src_lengths), (chunk.tgt, chunk.tgt_lengths))),
                         filters, counts["pairs_in"])
        counts["pairs_in"] += chunk.n
        counts["kept"] += int(keep.sum())
        report(counts["pairs_in"])


def _within_lengths(src: np.ndarray, tgt: np.ndarray, keep: np.ndarray, filters: dict, counts: Counter) -> np.ndarray:
    """Which pairs pass the length filters; those of `keep` that fail are counted by their first
    failed rule (too_short, too_long, ratio)."""
    shorter, longer = np.minimum(src, tgt), np.maximum(src, tgt)
    failed = np.zeros(len(src), dtype=bool)
    for reason, rule in (("too_short", shorter < filters["min_len"]), ("too_long", longer > filters["max_len"]),
                         ("ratio", longer > filters["max_ratio"] * shorter)):
        counts[reason] += int((rule & keep & ~failed).sum())
        failed |= rule
    return ~failed


def _sentences(flat: np.ndarray, lengths: np.ndarray, keep: np.ndarray) -> list[list[int]]:
    """The kept sentences as lists of ids."""
    ends = np.cumsum(lengths)
    return [flat[end - n:end].tolist() for end, n, k in zip(ends, lengths, keep) if k]


def _add_sampled(writers: list[list[ArrayWriter]], tok: Tokenizer, srcs: list[str], tgts: list[str],
                 src_ids: list[list[int]], tgt_ids: list[list[int]], filters: dict, start: int) -> None:
    """Each sampled copy of these kept train pairs (read from pair `start` on): the sampled sides
    cut anew by SentencePiece's sampling, each call with a seed of its own drawn from the run's (a
    side not sampled is the deterministic cut again). A sampled cut longer than data.max_len keeps
    the deterministic one, so training cuts nothing."""
    sides = filters.get("sampled_sides", "both")
    for k, (src_writer, tgt_writer) in enumerate(writers):
        for side, writer, lines, plain, encode in (("src", src_writer, srcs, src_ids, tok.encode_src),
                                                   ("tgt", tgt_writer, tgts, tgt_ids, tok.encode_tgt)):
            if sides not in ("both", side):
                writer.add(plain)
                continue
            seed = int.from_bytes(chunks.key(str(filters["seed"]), str(k), str(start), side)[:4], "little") >> 1
            sampled = encode(lines, sampling=filters["subword_sampling"], seed=seed)
            writer.add([ids if len(ids) <= filters["max_len"] else p for ids, p in zip(sampled, plain)])


def _sampling_stats(folder: Path, names: list[str]) -> dict:
    """How much longer the sampled copies are than the deterministic cut, per side."""
    stats = {"copies": len(names) - 1}
    for side in ("src", "tgt"):
        plain = int(_offsets(folder / f"{names[0]}.{side}.idx", -1)[0])
        sampled = sum(int(_offsets(folder / f"{name}.{side}.idx", -1)[0]) for name in names[1:])
        stats[f"{side}_tokens_per_copy"] = round(sampled / (len(names) - 1))
        stats[f"{side}_longer"] = round(sampled / (len(names) - 1) / max(1, plain), 3)
    return stats


def _token_stats(idx: Path, start: int, end: int) -> dict:
    """Sentences start..end of a written .idx file: their count, tokens, mean and longest length.
    Read a million offsets at a time: the lengths of a whole split in memory would grow prepare's
    peak with the corpus (and so would the pages of a memory map of its offsets)."""
    longest = 0
    for first in range(start, end, 1 << 20):
        longest = max(longest, int(np.diff(_offsets(idx, first, min(end, first + (1 << 20)) + 1)).max()))
    tokens = int(_offsets(idx, end)[0] - _offsets(idx, start)[0])
    n = end - start
    return {"sentences": n, "tokens": tokens, "mean_len": round(tokens / n, 2) if n else 0.0, "max_len": longest}


def _offsets(idx: Path, start: int, end: int | None = None) -> np.ndarray:
    """Offsets start..end (end excluded; None: the one at start; -1: the last) of an .idx file."""
    count = 1 if end is None else end - start
    with open(idx, "rb") as f:
        f.seek(start * 8, os.SEEK_SET if start >= 0 else os.SEEK_END)
        return np.fromfile(f, dtype=np.int64, count=count)


def _print_summary(manifest: dict) -> None:
    t = table("prepared data", ["split", "pairs", "kept", "dropped", "src tokens", "tgt tokens", "unk",
                                "src seen in train"])
    for split, s in manifest["splits"].items():
        # Several directions: a row for each under its split's, so that a leak is seen where it is.
        for name, row in [(split, s), *((f"  {d}", r) for d, r in s.get("by_direction", {}).items())]:
            dropped = ", ".join(f"{n:,} {r}" for r, n in row.get("dropped", {}).items() if n)
            overlap = row.get("overlap_with_train")
            t.add_row(name, f"{row['pairs_in']:,}", f"{row['kept']:,}", dropped or "-",
                      f"{row['src']['tokens']:,}", f"{row['tgt']['tokens']:,}",
                      f"{row['src']['unk'] + row['tgt']['unk']:,}", f"{overlap['src']:,}" if overlap else "")
    t.caption = "valid and test are never filtered or reordered"
    console.print(t)
    if sampled := manifest["splits"]["train"].get("sampling"):
        info(f"prepare: {sampled['copies']} subword-sampled copies of train (data.subword_sampling "
             f"{manifest['settings']['subword_sampling']}), {sampled['src_longer']:.0%} / "
             f"{sampled['tgt_longer']:.0%} of the deterministic cut's source / target tokens")
