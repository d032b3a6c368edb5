"""Scores with sacreBLEU, always on detokenized text against the raw references (as sacreBLEU
intends: its own tokenization makes scores comparable across papers and toolkits)."""

from sacrebleu.metrics import BLEU


def bleu(hypotheses: list[str], references: list[str]) -> tuple[float, str]:
    """Corpus BLEU of one reference stream, and sacreBLEU's signature that says how it was computed."""
    metric = BLEU()
    return metric.corpus_score(hypotheses, [references]).score, str(metric.get_signature())
