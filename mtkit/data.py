"""Prepared data: token arrays memory-mapped from the cache that `mtkit prepare` writes.

Each split side is two flat files: `<split>.<side>.bin`, every sentence's token ids one after
another (uint16 when the vocabulary fits, else int32), and `<split>.<side>.idx`, the int64 offset
of each sentence (n + 1 entries). Reading sentence i is a slice; nothing is loaded until used, so
memory stays flat however large the corpus is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported where batches are made: `mtkit prepare` never needs it
    import torch

from mtkit.errors import MtkitError


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.int32)


class TokenArray:
    """The token ids of one side of one prepared split."""

    def __init__(self, folder: Path, split: str, side: str, dtype: str):
        stem = Path(folder) / f"{split}.{side}"
        try:
            self.offsets = np.memmap(f"{stem}.idx", dtype=np.int64, mode="r")
            self.tokens = (np.memmap(f"{stem}.bin", dtype=np.dtype(dtype), mode="r")
                           if self.offsets[-1] > 0 else np.zeros(0, dtype=np.dtype(dtype)))
        except (OSError, ValueError) as e:
            raise MtkitError(f"prepared data {stem}.* is missing or damaged: {e}",
                             hint="run mtkit prepare CONFIG --force") from None
        if len(self.tokens) != self.offsets[-1]:
            raise MtkitError(f"prepared data {stem}.bin is truncated", hint="run mtkit prepare CONFIG --force")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    @property
    def lengths(self) -> np.ndarray:
        """Each sentence's length, in the smallest unsigned type that also holds length + 1 (the
        EOS a batch adds): 2 bytes a sentence, not 8 (50 million pairs in 16 sampled copies: 1.6 GB
        a side, not 6.4)."""
        lengths = np.diff(self.offsets)
        return lengths.astype(np.min_scalar_type(int(lengths.max(initial=0)) + 1))


class Stacked:
    """Several encodings of one split read as one array, item k * n + i being sentence i of copy
    k: the subword-sampled copies of a train split (TokenBucketSampler reads copy e % k in epoch e)."""

    def __init__(self, arrays: list[TokenArray]):
        self.arrays, self.n = arrays, len(arrays[0])

    def __len__(self) -> int:
        return self.n * len(self.arrays)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.arrays[i // self.n][i % self.n]

    @property
    def lengths(self) -> np.ndarray:
        return np.concatenate([a.lengths for a in self.arrays])


def train_arrays(folder: Path, manifest: dict) -> tuple[TokenArray | Stacked, TokenArray | Stacked, int]:
    """The train split's source and target as training reads them, and how many copies they hold:
    the subword-sampled copies when prepare made them (data.subword_sampling), else the one cut."""
    copies = manifest["splits"]["train"].get("sampling", {}).get("copies", 0)
    if not copies:
        return (*(TokenArray(folder, "train", side, manifest["dtype"]) for side in ("src", "tgt")), 1)
    return (*(Stacked([TokenArray(folder, f"train.s{k}", side, manifest["dtype"]) for k in range(copies)])
              for side in ("src", "tgt")), copies)


class ArrayWriter:
    """Appends encoded sentences to `<stem>.bin` / `<stem>.idx` (the format TokenArray reads)."""

    def __init__(self, stem: Path, dtype: np.dtype):
        self.dtype = dtype
        self.bin = open(f"{stem}.bin", "wb")
        self.idx = open(f"{stem}.idx", "wb")
        self.total = 0
        np.zeros(1, dtype=np.int64).tofile(self.idx)

    def add(self, sentences: list[list[int]]) -> None:
        lengths = np.fromiter((len(s) for s in sentences), dtype=np.int64, count=len(sentences))
        self.add_flat(np.fromiter((t for s in sentences for t in s), dtype=self.dtype, count=int(lengths.sum())), lengths)

    def add_flat(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        """Sentences given as their ids one after another and their lengths."""
        if not len(lengths):
            return
        flat.astype(self.dtype, copy=False).tofile(self.bin)
        (self.total + np.cumsum(lengths, dtype=np.int64)).tofile(self.idx)
        self.total += int(lengths.sum())

    def close(self) -> None:
        self.bin.close()
        self.idx.close()


# ---------------------------------------------------------------------------------------------
# Batches for the model: sentences padded into rectangles, and a sampler that groups sentences of
# similar length so that little of each rectangle is padding.

@dataclass
class Batch:
    """One rectangle of sentences (B rows), padded with pad_id on the right."""
    indices: np.ndarray  # (B,) sentence numbers in the split
    src: torch.Tensor     # (B, S) source ids + EOS
    tgt_in: torch.Tensor  # (B, T) BOS + target ids: what the decoder reads
    tgt_out: torch.Tensor  # (B, T) target ids + EOS: what it must predict at each position
    n_src_tokens: int
    n_tgt_tokens: int     # non-padding positions of tgt_out (the loss is averaged over these)

    def to(self, device, non_blocking: bool = False) -> "Batch":
        """On `device`; non_blocking (a CUDA GPU): through pinned memory, copied while the GPU works."""
        def move(t: torch.Tensor) -> torch.Tensor:
            return (t.pin_memory() if non_blocking else t).to(device, non_blocking=non_blocking)

        return Batch(self.indices, move(self.src), move(self.tgt_in), move(self.tgt_out), self.n_src_tokens,
                     self.n_tgt_tokens)


def pad_rows(rows: list[np.ndarray], pad_id: int) -> torch.Tensor:
    import torch

    out = np.full((len(rows), max(len(r) for r in rows)), pad_id, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return torch.from_numpy(out)


def make_batch(src: TokenArray, tgt: TokenArray | None, indices: np.ndarray, *, pad_id: int, bos_id: int,
               eos_id: int, max_positions: int) -> Batch:
    """Gather sentences `indices` into a Batch. Sentences longer than the model's positions (only
    possible in valid/test, which prepare never filters) are cut to fit."""
    keep = max_positions - 1  # room for EOS (source) or BOS (target)
    src_rows = [np.append(src[i][:keep], eos_id) for i in indices]
    batch_src = pad_rows(src_rows, pad_id)
    if tgt is None:
        empty = pad_rows([np.zeros(0)] * len(indices), pad_id)
        return Batch(indices, batch_src, empty, empty, sum(map(len, src_rows)), 0)
    tgt_rows = [tgt[i][:keep] for i in indices]
    tgt_in = pad_rows([np.insert(r, 0, bos_id) for r in tgt_rows], pad_id)
    tgt_out = pad_rows([np.append(r, eos_id) for r in tgt_rows], pad_id)
    return Batch(indices, batch_src, tgt_in, tgt_out, sum(map(len, src_rows)), sum(len(r) + 1 for r in tgt_rows))


def length_batches(order: np.ndarray, cost: np.ndarray, max_tokens: int) -> list[np.ndarray]:
    """Cut `order` (sentence numbers, already sorted by length) into batches whose padded size
    (rows x longest row) stays within max_tokens; a sentence longer than that goes alone."""
    batches, start, longest = [], 0, 0
    for end, i in enumerate(order):
        longest_with = max(longest, int(cost[i]))  # (a Python int: a uint16 times the rows would wrap)
        if end > start and (end - start + 1) * longest_with > max_tokens:
            batches.append(order[start:end])
            start, longest_with = end, int(cost[i])
        longest = longest_with
    if start < len(order):
        batches.append(order[start:])
    return batches


class TokenBucketSampler:
    """An endless stream of training batches (arrays of sentence numbers), epoch after epoch.

    Each epoch: shuffle all sentences, cut them into large pools, sort each pool by length, cut it
    into token-budget batches, then shuffle the batches. Everything is drawn from a generator
    seeded by (seed, epoch), so the position (epoch, batches served) is the whole state: resuming
    from it continues exactly where training stopped, mid-epoch included.
    """

    POOL_BATCHES = 100  # a pool holds about this many batches' worth of sentences

    def __init__(self, src_lengths: np.ndarray, tgt_lengths: np.ndarray, max_tokens: int, seed: int,
                 groups: list[tuple[int, int]] | None = None, temperature: float = 1.0,
                 weights: list[float] | None = None, copies: int = 1):
        """groups: [first, end) of each direction's sentences; with temperature T > 1 or weights
        an epoch draws direction d's share as weight_d * size_d ** (1 / T) (multilingual
        temperature sampling). copies: the lengths are those of k encodings of the same sentences
        one after another (a Stacked array); epoch e reads copy e % k."""
        # A sentence costs its longer side in the padded rectangle: source + EOS, BOS/EOS + target;
        # kept in the smallest type that holds it (2 bytes a sentence and copy, not 8).
        cost = np.maximum(np.asarray(src_lengths), np.asarray(tgt_lengths)) + 1
        self.cost = cost.astype(np.min_scalar_type(int(cost.max(initial=0))), copy=False)
        self.copies, self.size = copies, len(self.cost) // copies
        self.max_tokens, self.seed = max_tokens, seed
        per_batch = max(1, max_tokens // max(1, int(np.median(self.cost))))
        self.pool = per_batch * self.POOL_BATCHES
        self.weights = np.asarray(weights if weights else [1.0] * len(groups or []), dtype=np.float64)
        drawn = temperature != 1.0 or len(set(self.weights)) > 1
        self.groups = groups if groups and len(groups) > 1 and drawn else None
        self.temperature = temperature
        self.epoch, self.position = 0, 0  # epoch counts from 0; position = batches served in it
        self._batches: list[np.ndarray] | None = None

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(self.size) if self.groups is None else self._draw(rng)
        order += (epoch % self.copies) * self.size  # the epoch's copy
        batches = []
        for start in range(0, len(order), self.pool):
            pool = order[start:start + self.pool]
            pool = pool[np.argsort(self.cost[pool], kind="stable")]
            batches.extend(length_batches(pool, self.cost, self.max_tokens))
        return [batches[i] for i in rng.permutation(len(batches))]

    def _draw(self, rng: np.random.Generator) -> np.ndarray:
        """An epoch's sentences (as many as there are), each direction's share by temperature: a
        small direction's sentences come several times, a large one's not all."""
        sizes = np.array([end - start for start, end in self.groups], dtype=np.float64)
        share = self.weights * sizes ** (1.0 / self.temperature)
        counts = np.floor(share / share.sum() * sizes.sum()).astype(np.int64)
        picked = []
        for (start, end), n in zip(self.groups, counts):
            whole, rest = divmod(int(n), end - start)  # every sentence `whole` times, then a sample
            picked += [start + rng.permutation(end - start) for _ in range(whole)]
            picked.append(start + rng.choice(end - start, rest, replace=False))
        return rng.permutation(np.concatenate(picked))

    def __iter__(self):
        return self

    def __next__(self) -> np.ndarray:
        if self._batches is None:
            self._batches = self.epoch_batches(self.epoch)
        if self.position == len(self._batches):
            self.epoch, self.position = self.epoch + 1, 0
            self._batches = self.epoch_batches(self.epoch)
        batch = self._batches[self.position]
        self.position += 1
        return batch

    @property
    def epochs_done(self) -> float:
        """Epochs completed, with the fraction of the current one."""
        n = len(self._batches) if self._batches is not None else len(self.epoch_batches(self.epoch))
        return self.epoch + self.position / max(1, n)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._batches = None
