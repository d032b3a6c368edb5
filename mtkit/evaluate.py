"""Scores with sacreBLEU, always on detokenized text against the raw references (as sacreBLEU
intends: its own tokenization makes scores comparable across papers and toolkits). Each score
comes with sacreBLEU's signature, which says exactly how it was computed."""

from sacrebleu.metrics import BLEU, CHRF, TER

METRICS = {"bleu": BLEU, "chrf": CHRF, "ter": TER}


def score(hypotheses: list[str], references: list[list[str]], metrics=("bleu", "chrf", "ter")) -> dict[str, dict]:
    """references: one list per reference stream, each as long as `hypotheses`.
    Returns {metric: {"score": float, "signature": str}} in the order asked."""
    results = {}
    for name in metrics:
        metric = METRICS[name]()
        results[name] = {"score": metric.corpus_score(hypotheses, references).score,
                         "signature": str(metric.get_signature())}
    return results


def bleu(hypotheses: list[str], references: list[str]) -> tuple[float, str]:
    """Corpus BLEU against one reference stream, and its signature."""
    result = score(hypotheses, [references], ("bleu",))["bleu"]
    return result["score"], result["signature"]


def paired_bootstrap(systems: list[tuple[str, list[str]]], references: list[list[str]], samples: int,
                     metrics=("bleu", "chrf", "ter")) -> dict:
    """Paired bootstrap resampling (Koehn 2004), by sacreBLEU's own implementation: N test sets
    are drawn with replacement from the sentences, every system is scored on the same N, and each
    system is compared with the first (the baseline). Gives each system's score, the mean and 95%
    confidence interval over the resamples, and for the others the p-value of the difference from
    the baseline (the chance of a difference this large if the systems were equally good).
    sacreBLEU seeds its generator (SACREBLEU_SEED, default 12345), so the result is repeatable.

    Returns {"samples", "signatures": {metric: str}, "systems": [{"name", metric: {"score",
    "mean", "ci", "p_value"}}]}; the baseline's p_value is None."""
    from sacrebleu.significance import PairedTest

    test = PairedTest(systems, {name: METRICS[name]() for name in metrics}, references, test_type="bs",
                      n_samples=samples)
    signatures, columns = test()
    # sacreBLEU keys the results by display name ("BLEU", "chrF2", "TER"), in the order asked.
    names = [key for key in columns if key != "System"]
    result = {"samples": samples, "signatures": {m: str(signatures[n]) for m, n in zip(metrics, names)},
              "systems": []}
    for i, (name, _) in enumerate(systems):
        row = {"name": name}
        for m, n in zip(metrics, names):
            r = columns[n][i]
            row[m] = {"score": float(r.score), "mean": float(r.mean), "ci": float(r.ci),
                      "p_value": None if r.p_value is None else float(r.p_value)}
        result["systems"].append(row)
    return result
