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
