"""Chunks of raw pairs made ready for prepare: normalized, keyed and encoded, in this process or in
worker processes, one chunk each at a time, given back in order.

What needs every pair in order (the overlap sets, dedup, the filters, writing) stays in prepare's
process; what a chunk needs alone goes here. The normalizing (Python) and encoding (SentencePiece)
of the chunks were 86% of prepare's time in one process (200,000 pairs, 2 cores), where the
encoding runs on every core and the normalizing on one; in workers both run on every core.
"""

import hashlib
import os
import signal
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from mtkit import corpus
from mtkit.tokenizer import Tokenizer

# Below this many train pairs a pool costs more than it gives (starting its processes: ~1 s).
POOL_FROM = 200_000


def workers_for(pairs: int | None, cores: int) -> int:
    """How many worker processes encode a split of `pairs` pairs (None: not known) on `cores`
    cores: 0 (this process, the encoding on every core) for small or unknown splits or one core,
    else one a core."""
    return cores if cores > 1 and pairs is not None and pairs >= POOL_FROM else 0


def cores() -> int:
    """The cores this process may run on (a container or taskset may allow fewer than the machine has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def key(*parts: str) -> bytes:
    """A pair's or a sentence's identity: 16 bytes of BLAKE2b of its normalized text."""
    return hashlib.blake2b("\t".join(parts).encode(), digest_size=16).digest()


@dataclass
class Encoded:
    """One chunk of n raw pairs, each normalized and encoded (an empty side encodes to nothing)."""
    n: int
    empty: np.ndarray          # (n,) bool: a side is empty after normalizing
    src: np.ndarray            # every source sentence's ids, one after another
    src_lengths: np.ndarray    # (n,) int64
    src_unk: np.ndarray        # (n,) unknown tokens in each source sentence
    tgt: np.ndarray
    tgt_lengths: np.ndarray
    tgt_unk: np.ndarray
    keys: list[tuple[bytes, bytes]]  # each non-empty pair's (source key, pair key)
    lines: tuple[list[str], list[str]] | None  # the normalized sides, when asked for (sampled copies)


def encode(pairs: list[tuple[str, str]], tok: Tokenizer, threads: int, with_lines: bool) -> Encoded:
    srcs = [corpus.normalize(s) for s, _ in pairs]
    tgts = [corpus.normalize(t) for _, t in pairs]
    empty = np.fromiter((not s or not t for s, t in zip(srcs, tgts)), dtype=bool, count=len(pairs))
    keys = [(key(s), key(s, t)) for s, t, e in zip(srcs, tgts, empty) if not e]
    sides = [_flat(ids, tok.unk_id) for ids in (tok.encode_src(srcs, threads), tok.encode_tgt(tgts, threads))]
    return Encoded(len(pairs), empty, *sides[0], *sides[1], keys, (srcs, tgts) if with_lines else None)


def _flat(ids: list[list[int]], unk: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter((t for s in ids for t in s), dtype=np.int32, count=int(lengths.sum()))
    ends = np.cumsum(lengths)
    unknown = np.concatenate([[0], np.cumsum(flat == unk)])
    return flat, lengths, unknown[ends] - unknown[ends - lengths]


def encoded(chunks: Iterable[list[tuple[str, str]]], tok: Tokenizer, tokenizer_dir: Path, workers: int,
            with_lines: bool) -> Iterator[Encoded]:
    """Each chunk encoded, in order: in this process (workers 0), or by `workers` processes with at
    most two chunks each in hand (the corpus is read as they take it, never ahead)."""
    if not workers:
        yield from (encode(chunk, tok, cores(), with_lines) for chunk in chunks)
        return
    # spawn: the same on Linux, macOS and Windows, and no fork of a process with threads running
    with get_context("spawn").Pool(workers, _start_worker, (str(tokenizer_dir),)) as pool:
        pending = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_work, (chunk, with_lines)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


_TOKENIZER: Tokenizer | None = None  # a worker's


def _start_worker(tokenizer_dir: str) -> None:
    global _TOKENIZER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # ctrl-C is prepare's to handle: it stops the pool
    _TOKENIZER = Tokenizer.load(Path(tokenizer_dir))


def _work(chunk: list[tuple[str, str]], with_lines: bool) -> Encoded:
    return encode(chunk, _TOKENIZER, 1, with_lines)
