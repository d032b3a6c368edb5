"""The language check (mtkit/language.py): which of an experiment's languages a line is in, learned
from text of each; `mtkit eval` reports the share of outputs in the target language."""

import itertools
from pathlib import Path

import pytest

from mtkit.corpus import read_lines
from mtkit.language import LanguageCheck, ngrams

MULTI30K = Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k"


@pytest.fixture(scope="module")
def demo_check(demo_dir):
    return LanguageCheck({lang: itertools.islice(read_lines(demo_dir / f"train.{lang}"), 2000)
                          for lang in ("en", "vs", "sv")})


def test_ngrams_are_lower_cased_padded_and_counted():
    grams = ngrams("Ab  a")
    assert grams[" "] == 3 and grams["a"] == 2 and grams["b"] == 1  # spaces collapsed, one at each end
    assert grams[" ab"] == 1 and grams["b a"] == 1 and grams["a "] == 1 and grams[" a "] == 1
    assert "A" not in grams and sum(grams.values()) == 6 + 5 + 4


def test_the_demo_languages_are_told_apart_on_held_out_lines(demo_check, demo_dir):
    """Veshi and Ihsev share their letters but not their n-grams (Ihsev writes each word backwards):
    the one line missed is the same in both ("Sedes.", you sit, reads the same backwards)."""
    for lang in ("en", "vs", "sv"):
        lines = list(read_lines(demo_dir / f"test.{lang}"))
        missed = [line for line in lines if demo_check.identify(line) != lang]
        assert all(line.rstrip(".").lower() == line.rstrip(".").lower()[::-1] for line in missed), missed
        assert len(missed) <= 1
        assert demo_check.report(lines, lang) == {"expected": lang, "share": 1 - len(missed) / 1000, "lines": 1000,
                                                  "counts": {lang: 1000 - len(missed), **({"vs": 1} if missed else {})}}


def test_the_report_counts_each_language_and_lines_without_letters(demo_check, demo_dir):
    vs, en = (list(read_lines(demo_dir / f"valid.{lang}"))[:4] for lang in ("vs", "en"))
    report = demo_check.report([*vs[:3], *en[:2], "", "12 ."], "vs")
    assert report["counts"] == {"vs": 3, "en": 2, "none": 2} and report["lines"] == 7
    assert report["share"] == pytest.approx(3 / 7)
    assert demo_check.identify("The dog sees a cat.") == "en" and demo_check.identify("...") is None
    assert demo_check.report([], "en")["share"] == 0.0


def test_mistakes_are_said():
    with pytest.raises(ValueError, match="no text to learn fr from"):
        LanguageCheck({"en": ["a line"], "fr": []})
    with pytest.raises(ValueError, match="'de' is not one of the languages checked"):
        LanguageCheck({"en": ["a line"], "fr": ["une ligne"]}).report(["x"], "de")


@pytest.mark.skipif(not MULTI30K.is_dir(), reason="needs ../shared/data/multi30k")
def test_german_english_and_french_are_told_apart_on_multi30k():
    """500 train lines each are enough for every test_2016 reference (2,000 is what eval takes)."""
    check = LanguageCheck({lang: itertools.islice(read_lines(MULTI30K / f"train.{lang}.gz"), 500)
                           for lang in ("de", "en", "fr")})
    for lang in ("de", "en", "fr"):
        lines = list(read_lines(MULTI30K / f"test_2016_flickr.{lang}.gz"))
        assert check.report(lines, lang)["counts"] == {lang: 1000}
