"""Which language is a line written in? A character n-gram identifier, learned on the spot from
text of each language the experiment has (its training data), so that `mtkit eval` can say how
many outputs are in the language asked for: a multilingual model that answers a German -> French
request in English (off-target translation) scores near zero BLEU, and this says why.

The method is Cavnar & Trenkle's (1994) idea in its naive-Bayes form, as langid.py and CLD use it:
count the 1- to 3-character sequences of each language's text (lower-cased, with a space at each
end, so word starts and ends count), then score a line under each language by the log
probability of its n-grams, add-one smoothed. With a few thousand lines per language it tells the
experiment's languages apart on sentence-length text; it knows nothing about languages it was
not shown (a line in one of those gets the nearest known language).
"""

import math
from collections import Counter
from collections.abc import Iterable, Mapping

ORDERS = (1, 2, 3)


def ngrams(line: str) -> Counter:
    """The character 1-, 2- and 3-grams of a line (lower-cased, spaces collapsed, padded)."""
    text = f" {' '.join(line.lower().split())} "
    return Counter(text[i:i + n] for n in ORDERS for i in range(len(text) - n + 1))


class LanguageCheck:
    """Profiles of named languages (from text of each) -> the likeliest language of a line."""

    def __init__(self, texts: Mapping[str, Iterable[str]]):
        counts = {lang: Counter() for lang in texts}
        for lang, lines in texts.items():
            for line in lines:
                counts[lang].update(ngrams(line))
        empty = [lang for lang, c in counts.items() if not c]
        if empty:
            raise ValueError(f"no text to learn {', '.join(empty)} from")
        seen = len(set().union(*counts.values())) + 1  # + 1: room for n-grams seen in no language
        self.languages = tuple(counts)
        # log P(n-gram | language), add-one smoothed; an n-gram a language never showed gets its floor.
        self._log_p = {lang: {g: math.log((n + 1) / (sum(c.values()) + seen)) for g, n in c.items()}
                       for lang, c in counts.items()}
        self._floor = {lang: math.log(1 / (sum(c.values()) + seen)) for lang, c in counts.items()}

    def identify(self, line: str) -> str | None:
        """The likeliest of the known languages, or None for a line with no letters to go by."""
        if not any(ch.isalpha() for ch in line):
            return None
        grams = ngrams(line)
        return max(self.languages, key=lambda lang: sum(
            n * self._log_p[lang].get(g, self._floor[lang]) for g, n in grams.items()))

    def report(self, lines: Iterable[str], expected: str) -> dict:
        """How many of `lines` are in `expected`: {"expected", "share" (0..1), "lines", "counts"
        per identified language, None for lines without letters (empty output), most first}."""
        if expected not in self.languages:
            raise ValueError(f"{expected!r} is not one of the languages checked ({', '.join(self.languages)})")
        found = Counter(self.identify(line) for line in lines)
        total = sum(found.values())
        return {"expected": expected, "share": found[expected] / total if total else 0.0, "lines": total,
                "counts": {lang or "none": n for lang, n in found.most_common()}}
