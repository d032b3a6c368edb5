"""Scores with sacreBLEU, always on detokenized text against the raw references (as sacreBLEU
intends: its own tokenization makes scores comparable across papers and toolkits). Each score
comes with sacreBLEU's signature, which says exactly how it was computed. BLEU's tokenizer follows
the target language as sacreBLEU's command line chooses it (zh, ja-mecab, ko-mecab, else 13a)."""

from sacrebleu.metrics import BLEU, CHRF, TER

from mtkit.errors import MtkitError

# Languages written without spaces between words, and the tokenizer sacreBLEU's own command line
# takes for each (13a would see a whole Chinese sentence as one word): by ISO 639-1 and -3 code.
_BY_LANGUAGE = {"zh": "zh", "zho": "zh", "cmn": "zh", "ja": "ja-mecab", "jpn": "ja-mecab",
                "ko": "ko-mecab", "kor": "ko-mecab"}
_EXTRA = {"ja-mecab": "sacrebleu[ja]", "ko-mecab": "sacrebleu[ko]"}


def bleu_tokenizer(setting: str, tgt_lang: str) -> str:
    """The tokenizer BLEU uses: `setting` (eval.tokenize) unless it is "auto", then the one for
    the target language ("zh-Hans", "zh_TW" and "ZH" are all Chinese), 13a for the rest."""
    if setting != "auto":
        return setting
    return _BY_LANGUAGE.get(tgt_lang.lower().replace("_", "-").split("-")[0], "13a")


def _metric(name: str, tokenize: str):
    """A sacreBLEU metric object; TER splits CJK characters too when BLEU does (asian_support)."""
    if name == "bleu":
        try:
            return BLEU(tokenize=tokenize)
        except RuntimeError:  # sacreBLEU's word for a missing MeCab
            raise MtkitError(f"BLEU with the {tokenize} tokenizer needs MeCab and its dictionary",
                             hint=f"pip install '{_EXTRA.get(tokenize, 'sacrebleu')}', or set eval.tokenize "
                                  f"to another tokenizer (e.g. char)") from None
    if name == "ter":
        return TER(asian_support=tokenize in ("zh", "ja-mecab", "ko-mecab"))
    return CHRF()


def check_tokenizer(tokenize: str) -> str:
    """Fail now, not at the first validation an hour into training, if the tokenizer cannot run."""
    _metric("bleu", tokenize)
    return tokenize


def score(hypotheses: list[str], references: list[list[str]], metrics=("bleu", "chrf", "ter"),
          tokenize: str = "13a") -> dict[str, dict]:
    """references: one list per reference stream, each as long as `hypotheses`. tokenize: BLEU's
    tokenizer (see bleu_tokenizer); the signature names it.
    Returns {metric: {"score": float, "signature": str}} in the order asked."""
    results = {}
    for name in metrics:
        metric = _metric(name, tokenize)
        results[name] = {"score": metric.corpus_score(hypotheses, references).score,
                         "signature": str(metric.get_signature())}
    return results


def bleu(hypotheses: list[str], references: list[str], tokenize: str = "13a") -> tuple[float, str]:
    """Corpus BLEU against one reference stream, and its signature."""
    result = score(hypotheses, [references], ("bleu",), tokenize)["bleu"]
    return result["score"], result["signature"]


def paired_bootstrap(systems: list[tuple[str, list[str]]], references: list[list[str]], samples: int,
                     metrics=("bleu", "chrf", "ter"), tokenize: str = "13a") -> dict:
    """Paired bootstrap resampling (Koehn 2004), by sacreBLEU's own implementation: N test sets
    are drawn with replacement from the sentences, every system is scored on the same N, and each
    system is compared with the first (the baseline). Gives each system's score, the mean and 95%
    confidence interval over the resamples, and for the others the p-value of the difference from
    the baseline (the chance of a difference this large if the systems were equally good).
    sacreBLEU seeds its generator (SACREBLEU_SEED, default 12345), so the result is repeatable.

    Returns {"samples", "sentences", "signatures": {metric: str}, "systems": [{"name", metric: {"score",
    "mean", "ci", "p_value"}}]}; the baseline's p_value is None."""
    from sacrebleu.significance import PairedTest

    test = PairedTest(systems, {name: _metric(name, tokenize) for name in metrics}, references, test_type="bs",
                      n_samples=samples)
    signatures, columns = test()
    # sacreBLEU keys the results by display name ("BLEU", "chrF2", "TER"), in the order asked.
    names = [key for key in columns if key != "System"]
    result = {"samples": samples, "sentences": len(references[0]), "signatures": {m: str(signatures[n]) for m, n in zip(metrics, names)},
              "systems": []}
    for i, (name, _) in enumerate(systems):
        row = {"name": name}
        for m, n in zip(metrics, names):
            r = columns[n][i]
            row[m] = {"score": float(r.score), "mean": float(r.mean), "ci": float(r.ci),
                      "p_value": None if r.p_value is None else float(r.p_value)}
        result["systems"].append(row)
    return result
