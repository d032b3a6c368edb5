"""Online back-translation (Zhang et al. 2020, "Improving Massively Multilingual Neural Machine
Translation and Zero-Shot Translation"): a multilingual model learns a direction it has no pairs for
from its own translations, while it trains.

Say the model is trained on en-de and en-fr, and data.backtranslate asks for de-fr. Each French
target sentence y of a batch (from en-fr) is translated into German by the model as it is at that
step (greedy, without gradients: that is the zero-shot fr-de, poor at first), and the pair
(<2fr> + that German, y) joins the batch. The source is synthetic, but the target is a real French
sentence, and it follows a German source and the tag <2fr>: what the model never saw, and why it
answers a zero-shot request in English, or copies its German source, until it does. As the model
improves, so do the German sources it makes for itself.
"""

import numpy as np
import torch

from mtkit import devices
from mtkit.config import DataSection, DecodeSection
from mtkit.corpus import tag
from mtkit.data import Batch, TokenArray, Stacked, pad_rows
from mtkit.model import Transformer
from mtkit.search import greedy, max_lengths
from mtkit.tokenizer import Tokenizer


def for_training(data: DataSection, decode: DecodeSection, start: int, ranges: dict[str, list[int]],
                 tok: Tokenizer, tgt: TokenArray | Stacked, place) -> "BackTranslation | None":
    """data.backtranslate's directions for a run that trains on `tgt`, from step `start` on (None
    when it names none)."""
    if not data.backtranslate:
        return None
    return BackTranslation([tuple(d.split("-")) for d in data.backtranslate], ranges, tok, tgt, place,
                           start=start, max_len_a=decode.max_len_a, max_len_b=decode.max_len_b)


class BackTranslation:
    def __init__(self, directions: list[tuple[str, str]], ranges: dict[str, list[int]], tok: Tokenizer,
                 tgt: TokenArray | Stacked, place, *, start: int = 0, max_len_a: float, max_len_b: int):
        """directions: the (source, target) languages to learn this way; ranges: the train split's
        lines of each direction it was prepared with ({"en-fr": [a, b]}, in order); tgt: its target
        side; place: a batch moved to the training device; start: the step after which it begins
        (the trainer's: the warmup's end; before that the model's translations are noise, and as
        slow to make as the longest allowed, since it never ends a sentence)."""
        self.tok, self.tgt, self.place = tok, tgt, place
        self.start, self.a, self.b = start, max_len_a, max_len_b
        self.starts = np.array([a for a, _ in ranges.values()])
        # A direction's target language; None for data.denoise's, whose targets the translation
        # directions already hold (a line of fr-fr is a line of en-fr).
        self.targets = [t if s != t else None for s, t in (name.split("-") for name in ranges)]
        self.lines = max(b for _, b in ranges.values())  # one copy of the split (data.Stacked holds several)
        # The source side of a tagged line is "▁ <2xx> words...": the tag's own pieces, then the sentence.
        self.prefix = {lang: tok.encode_src([tag(lang)])[0] for pair in directions for lang in pair}
        self.sources = {t: [s for s, tt in directions if tt == t] for _, t in directions}
        self.directions = directions

    def __str__(self) -> str:
        return f"{', '.join(f'{s}-{t}' for s, t in self.directions)} also back-translated after step {self.start:,}"

    def target_languages(self, indices: np.ndarray) -> list[str | None]:
        """The target language of each train line (None for a denoising line), found in one pass."""
        return [self.targets[k] for k in np.searchsorted(self.starts, np.asarray(indices) % self.lines, side="right") - 1]

    def __call__(self, model: Transformer, drawn: list[np.ndarray], step: int, precision: str) -> list[Batch]:
        """A batch of synthetic pairs for each batch of train lines `drawn` at `step` that has a
        target in a language to learn. Where a target language has several sources to learn, each
        line's is drawn from a seed of the step and the batch's first line: the same draws however
        the step's batches are shared among processes."""
        if step <= self.start:
            return []
        found = [self.batch(model, ix, np.random.default_rng([step, int(ix[0])]), precision) for ix in drawn]
        return [b for b in found if b is not None]

    def batch(self, model: Transformer, indices: np.ndarray, rng: np.random.Generator, precision: str) -> Batch | None:
        positions = model.cfg.max_positions
        rows = [(self.tgt[i][:positions - 1], t, self.sources[t][rng.integers(len(self.sources[t]))])
                for i, t in zip(indices, self.target_languages(indices)) if t in self.sources]
        if not rows:
            return None
        keep = positions - 1 - max(len(p) for p in self.prefix.values())  # room for a tag and EOS
        eos = self.tok.eos_id
        # The target sentence as a source: translated into the language the direction starts from.
        asked = self.place(_rows_batch([np.concatenate([self.prefix[s], y[:keep], [eos]]) for y, _, s in rows],
                                  [y for y, _, _ in rows], self.tok))
        was_training = model.training
        model.eval()  # no dropout in the translation: the model's best guess at that step
        try:
            with devices.autocast(asked.src.device, precision):
                lengths = asked.src.ne(self.tok.pad_id).sum(dim=1)
                outputs = greedy(model, asked.src, bos_id=self.tok.bos_id, eos_id=eos,
                                 max_len=max_lengths(lengths, self.a, self.b, keep))
        finally:
            model.train(was_training)
        sources = [np.concatenate([self.prefix[t], np.array(h.tokens[:keep], dtype=np.int64), [eos]])
                   for h, (_, t, _) in zip(outputs, rows)]
        return self.place(_rows_batch(sources, [y for y, _, _ in rows], self.tok))


def _rows_batch(sources: list[np.ndarray], targets: list[np.ndarray], tok: Tokenizer) -> Batch:
    """A Batch of these source rows (EOS included) and target sentences."""
    tgt_in = pad_rows([np.insert(y, 0, tok.bos_id) for y in targets], tok.pad_id)
    tgt_out = pad_rows([np.append(y, tok.eos_id) for y in targets], tok.pad_id)
    return Batch(np.arange(len(sources)), pad_rows(sources, tok.pad_id), tgt_in, tgt_out,
                 sum(map(len, sources)), sum(len(y) + 1 for y in targets))
