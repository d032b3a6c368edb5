"""What every translation engine is (mtkit's own, translate.Translator, and CTranslate2's,
export.CT2Translator): one interface, `Engine`, which every caller uses (mtkit translate, eval,
serve, the Python API), and the text side both implement it with (`TextSide`: normalize and encode
the source, decode the output, the decoding settings). Only the search differs.
"""

import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from pydantic import ValidationError

from mtkit.config import DataSection, DecodeSection
from mtkit.corpus import normalize, tag, with_tag
from mtkit.errors import MtkitError
from mtkit.search import Hypothesis
from mtkit.tokenizer import Tokenizer


@runtime_checkable
class Engine(Protocol):
    """A translation engine, all of it honoured by each (tests/test_export.py checks both)."""

    tokenizer: Tokenizer
    config: dict  # the experiment config the model was trained with (its decode and data sections)
    path: Path  # the checkpoint or export it was loaded from
    precision: str  # fp32, bf16 or fp16: what it computes in
    device: object  # where it computes: str(device) is "cpu" or "cuda:N"

    @property
    def max_source_tokens(self) -> int:
        """How many source tokens the model reads (a longer source: its beginning only)."""

    def search(self, ids: list[list[int]], opts: DecodeSection, on_sentences=None) -> list[list[Hypothesis]]:
        """Source ids -> for each sentence its hypotheses, best first (none for an empty one).
        on_sentences(n): progress, called as n more sentences are done."""

    def options(self, **overrides) -> DecodeSection: ...
    def tag_for(self, target_lang: str | None) -> str: ...
    def encode(self, lines: Sequence[str], target_lang: str | None = None) -> list[list[int]]: ...
    def texts(self, hyps: list[Hypothesis]) -> list[tuple[float, str]]: ...
    def translate_ids(self, ids: list[list[int]], opts: DecodeSection,
                      on_sentences=None) -> list[list[tuple[float, str]]]: ...
    def translate(self, lines: Sequence[str], target_lang: str | None = None, *, on_sentences=None,
                  **settings) -> list[str]: ...
    def translate_nbest(self, lines: Sequence[str], target_lang: str | None = None, *, on_sentences=None,
                        **settings) -> list[list[tuple[float, str]]]: ...


class TextSide:
    """The text side of an Engine: everything but `search` and `max_source_tokens`, which each
    engine gives."""

    def __init__(self, tokenizer: Tokenizer, config: dict, path: Path, precision: str, device: object):
        self.tokenizer, self.config, self.path, self.precision, self.device = tokenizer, config, path, precision, device

    def options(self, **overrides) -> DecodeSection:
        """Decoding settings: the experiment's decode section, then the given overrides."""
        saved = self.config.get("decode", {})
        try:
            return DecodeSection(**{**saved, **{k: v for k, v in overrides.items() if v is not None}})
        except ValidationError as e:
            # A field's error is named by its key; the section's own (n_best over beam_size) names its keys.
            problems = "; ".join((f"decode.{'.'.join(map(str, err['loc']))}: " if err["loc"] else "")
                                 + err['msg'].removeprefix('Value error, ')
                                 + (f" (got {err['input']!r})" if err["loc"] else "") for err in e.errors())
            raise MtkitError(f"bad decoding settings: {problems}") from None

    def translate(self, lines: Sequence[str], target_lang: str | None = None, *, on_sentences=None,
                  **settings) -> list[str]:
        """The best translation of each line, in order; a blank line gives "".

        target_lang: the language to translate into, needed by a model with several (their tag
        goes before each line). settings: decoding settings (beam_size, alpha, n_best, max_len_a,
        max_len_b, max_tokens), by default the experiment's `decode` section, e.g.
        translate(lines, beam_size=1). on_sentences(n): progress, as in search."""
        return [hyps[0][1] for hyps in self.translate_nbest(lines, target_lang, on_sentences=on_sentences, **settings)]

    def translate_nbest(self, lines: Sequence[str], target_lang: str | None = None, *, on_sentences=None,
                        **settings) -> list[list[tuple[float, str]]]:
        """For each line up to n_best (score, translation), best first; a blank line gives
        [(0.0, "")]. The score, higher is better, is the log-probability divided by GNMT's length
        penalty ((5 + length) / 6) ** alpha (length counting EOS), for greedy and beam search alike:
        with alpha 0 it is the plain log-probability."""
        return self.translate_ids(self.encode(lines, target_lang), self.options(**settings), on_sentences)

    @functools.cached_property  # read once: tag_for asks for it at every call
    def _data(self) -> DataSection:
        """The data section the model was trained with (a hand-made checkpoint may have none)."""
        data = self.config.get("data")
        return DataSection.model_validate(data) if data else DataSection.model_construct(src=None, tgt=None)

    @property
    def directions(self) -> list[str]:
        """What the model was trained to translate, e.g. ['de-en'] or ['de-en', 'en-fr']."""
        return self._data.names or [f"{self._data.src}-{self._data.tgt}"]

    @property
    def targets(self) -> list[str]:
        """The languages this model translates into (one, unless trained on several directions)."""
        return self._data.targets

    def tag_for(self, target_lang: str | None) -> str:
        """What goes before each source line: a model with several target languages is told which
        one by its tag (<2xx>); one with a single target needs none."""
        targets = self.targets
        if len(targets) > 1:
            if target_lang is None:
                raise MtkitError(f"this model translates into {', '.join(targets)}: say which target language",
                                 hint=f"e.g. {targets[0]}", setting="target_lang")
            if target_lang not in targets:
                raise MtkitError(f"the target language {target_lang!r} is not one this model translates into "
                                 f"({', '.join(targets)})", setting="target_lang")
            return tag(target_lang)
        if target_lang is not None and target_lang != targets[0]:
            raise MtkitError(f"the target language {target_lang!r}: this model translates into {targets[0]} only",
                             setting="target_lang")
        return ""

    def encode(self, lines: Sequence[str], target_lang: str | None = None) -> list[list[int]]:
        """Raw lines -> source ids (normalized first, then tagged when the model has several
        target languages); a blank line -> []."""
        if isinstance(lines, (str, bytes)):  # it would be taken for a list of characters
            raise TypeError(f"expected a list of lines, got one {type(lines).__name__}: write translate([line])")
        lines = list(lines)
        for i, line in enumerate(lines):
            if not isinstance(line, str):
                raise TypeError(f"line {i} is {type(line).__name__}, not str" +
                                (" (decode the bytes first)" if isinstance(line, bytes) else ""))
        label = self.tag_for(target_lang)
        return self.tokenizer.encode_src([with_tag(label, normalize(line)) for line in lines])

    def translate_ids(self, ids: list[list[int]], opts: DecodeSection,
                      on_sentences=None) -> list[list[tuple[float, str]]]:
        return [self.texts(hyps) for hyps in self.search(ids, opts, on_sentences=on_sentences)]

    def texts(self, hyps: list[Hypothesis]) -> list[tuple[float, str]]:
        """A sentence's hypotheses as (score, detokenized text), best first; none: [(0.0, "")]."""
        if not isinstance(hyps, list) or not all(isinstance(h, Hypothesis) for h in hyps):
            raise TypeError(f"texts takes one sentence's hypotheses (from search), not {type(hyps).__name__}")
        texts = self.tokenizer.decode_tgt([h.tokens for h in hyps])
        return [(h.score, t) for h, t in zip(hyps, texts)] or [(0.0, "")]


def cut(engine: Engine, ids: list[list[int]]) -> list[int]:
    """Which sources are longer than the engine's model takes (the search translates their
    beginning only): their indices, for the caller to warn about."""
    return [i for i, x in enumerate(ids) if len(x) > engine.max_source_tokens]


def check_options(opts, on_sentences=None) -> None:
    """A search's arguments, checked before it starts: a mistake would fail deep inside it."""
    if not isinstance(opts, DecodeSection):
        raise TypeError(f"opts: decoding settings from Translator.options(...), not {type(opts).__name__}")
    if on_sentences is not None and not callable(on_sentences):
        raise TypeError(f"on_sentences: a function called with how many sentences are done, "
                        f"not {type(on_sentences).__name__}")
