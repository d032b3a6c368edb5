"""Prepared data: token arrays memory-mapped from the cache that `mtkit prepare` writes.

Each split side is two flat files: `<split>.<side>.bin`, every sentence's token ids one after
another (uint16 when the vocabulary fits, else int32), and `<split>.<side>.idx`, the int64 offset
of each sentence (n + 1 entries). Reading sentence i is a slice; nothing is loaded until used, so
memory stays flat however large the corpus is.
"""

from pathlib import Path

import numpy as np

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
        return np.diff(self.offsets)


class ArrayWriter:
    """Appends encoded sentences to `<stem>.bin` / `<stem>.idx` (the format TokenArray reads)."""

    def __init__(self, stem: Path, dtype: np.dtype):
        self.dtype = dtype
        self.bin = open(f"{stem}.bin", "wb")
        self.idx = open(f"{stem}.idx", "wb")
        self.total = 0
        np.zeros(1, dtype=np.int64).tofile(self.idx)

    def add(self, sentences: list[list[int]]) -> None:
        if not sentences:
            return
        lengths = np.fromiter((len(s) for s in sentences), dtype=np.int64, count=len(sentences))
        flat = np.fromiter((t for s in sentences for t in s), dtype=self.dtype, count=int(lengths.sum()))
        flat.tofile(self.bin)
        (self.total + np.cumsum(lengths)).tofile(self.idx)
        self.total += int(lengths.sum())

    def close(self) -> None:
        self.bin.close()
        self.idx.close()
