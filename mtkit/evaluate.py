"""Stage `mtkit eval`: translate a split of the experiment with its eval.checkpoint (best.pt,
averaged.pt, ...) and score it against the raw references; or score files of translations,
and compare systems by paired bootstrap resampling. The scores themselves are metrics.py's."""

import time
from pathlib import Path

from mtkit import checkpoint, corpus, metrics
from mtkit.config import Config
from mtkit.console import console, info, progress_bar, table
from mtkit.errors import MtkitError
from mtkit.files import read_json, sha256_file, sha256_json, write_json, write_text
from mtkit.language import LanguageCheck
from mtkit.translate import Translator

LABEL = {"bleu": "BLEU", "chrf": "chrF", "ter": "TER"}
LANGUAGE_LINES = 2000  # train lines per language for the language check: on Multi30k, 500 already tell
# de, en and fr apart on all 3,000 test references (docs/translating.md)


def check_scoring(cfg: Config) -> None:
    """Prove BLEU's tokenizer usable for each target language of the experiment: a missing MeCab
    is said before any work, not at the end of training."""
    for tgt in cfg.data.targets:
        metrics.check_tokenizer(metrics.bleu_tokenizer(cfg.eval.tokenize, tgt))


def directions_to_score(cfg: Config, direction: str | None) -> list[str | None]:
    """What `mtkit eval` scores: the named direction (another than the trained ones too: zero-shot,
    when the model knows its target language), else each of the experiment's (None: its one pair)."""
    if direction is None:
        return cfg.data.names or [None]
    src, _, tgt = direction.partition("-")
    if not src or not tgt or src == tgt:
        raise MtkitError(f"the direction {direction!r}: a source and a target language, e.g. de-en", setting="direction")
    return [direction]


def evaluate_split(cfg: Config, split: str | None = None, beam: int | None = None,
                   model: Path | None = None, device: str = "auto", precision: str = "auto",
                   direction: str | None = None) -> dict:
    """Translate a split's raw source with the experiment's eval.checkpoint (or `model`) and
    score it against the raw references. Output: <workdir>/eval/<split>.hyp and <split>.json
    (<split>.<direction>.* for one of several directions); a rerun with the same checkpoint,
    data and decoding settings (precision included) reuses them."""
    split = split or cfg.eval.split
    if direction is None and cfg.data.names:
        raise MtkitError("this experiment has several translation directions: score one at a time",
                         hint=f"mtkit eval CONFIG --direction {cfg.data.names[0]} (Python: direction=...)")
    if split not in ("valid", "test"):
        raise MtkitError(f"the split to score is valid or test, not {split!r}")
    ckpt = checkpoint.resolve(model) if model else cfg.eval_checkpoint
    if not ckpt.is_file():
        if not model and cfg.eval.checkpoint == "averaged" and (ckpt.parent / "best.pt").is_file():
            raise MtkitError(f"no checkpoint {ckpt} to score (eval.checkpoint: averaged): a run writes it when it "
                             f"ends, from its last train.average_last step checkpoints, if it saved 2 or more; this "
                             f"one has not finished, or saved fewer",
                             hint="finish the run (mtkit run CONFIG), lower train.save_every so that it saves several, "
                                  "or score best.pt: --set eval.checkpoint=best")
        raise MtkitError(f"no checkpoint {ckpt} to score" + ("" if model else f" (eval.checkpoint: {cfg.eval.checkpoint})"),
                         hint="train first (mtkit train CONFIG), or name one with --checkpoint")
    source = corpus.split_source(cfg.data, split, direction)
    tokenize = metrics.check_tokenizer(metrics.bleu_tokenizer(cfg.eval.tokenize, source.tgt))
    translator = Translator.load(ckpt, device, precision)  # mapped, not read: cheap when the result is cached
    target_lang = source.tgt if direction is not None else None
    translator.tag_for(target_lang)  # a target the model does not know is said before any work
    # Every setting given, so the experiment's decode section wins over the checkpoint's; validated
    # (a beam of 0 is an error, not the default).
    opts = translator.options(**cfg.decode.model_dump() | ({} if beam is None else {"beam_size": beam, "n_best": 1}))
    key = sha256_json({"checkpoint": sha256_file(ckpt), "path": str(ckpt), "source": corpus.fingerprint(source),
                       "decode": opts.model_dump(), "metrics": list(cfg.eval.metrics), "tokenize": tokenize,
                       "precision": translator.precision, "language_check": LANGUAGE_LINES})
    out, name = cfg.workdir / "eval", split if direction is None else f"{split}.{direction}"
    previous = read_json(out / f"{name}.json")
    if previous and previous.get("key") == key and (out / f"{name}.hyp").exists():
        info(f"eval: up to date ({out / f'{name}.json'})")
        return previous | {"up_to_date": True}  # (not saved: says this call reused the result)
    pairs = list(corpus.read_pairs(source))
    sources, references = [p[0] for p in pairs], [p[1] for p in pairs]
    start = time.perf_counter()
    with progress_bar() as bar:
        task = bar.add_task(f"translate {name} (beam {opts.beam_size})", total=len(sources))
        hypotheses = translator.translate(sources, target_lang, on_sentences=lambda n: bar.advance(task, n),
                                          **opts.model_dump())
    seconds = time.perf_counter() - start
    scores = metrics.score(hypotheses, [references], cfg.eval.metrics, tokenize)
    language = language_report(cfg, hypotheses, source.tgt)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / f"{name}.hyp", "".join(h + "\n" for h in hypotheses))
    result = {"split": name, "checkpoint": str(ckpt), "beam_size": opts.beam_size, "alpha": opts.alpha,
              "precision": translator.precision, "device": str(translator.device),
              "sentences": len(sources), "seconds": round(seconds, 2), **scores,
              **({"language": language} if language else {}), "key": key,
              "samples": [{"src": s, "hyp": h, "ref": r} for s, h, r in zip(sources[:3], hypotheses, references)]}
    write_json(out / f"{name}.json", result)
    return result


def language_report(cfg: Config, hypotheses: list[str], target: str) -> dict | None:
    """How many translations are in the target language (language.LanguageCheck, learned from
    the experiment's own training text of each of its languages); None when that text cannot be
    read (the scores stand without it)."""
    try:
        texts = training_text(cfg, LANGUAGE_LINES)
    except (MtkitError, OSError) as e:
        info(f"eval: no language check (its training text cannot be read: {e})")
        return None
    if target not in texts:
        return None
    return LanguageCheck(texts).report(hypotheses, target) | {"from": f"{LANGUAGE_LINES:,} train lines each of "
                                                                      f"{', '.join(sorted(texts))}"}


def training_text(cfg: Config, lines: int) -> dict[str, list[str]]:
    """The first `lines` of each of the experiment's languages in its train split, either side."""
    source = corpus.split_source(cfg.data, "train")
    texts: dict[str, list[str]] = {}
    for part in [p for p in source.parts or (source,) if not p.denoising]:  # (a noisy copy is no one's language)
        langs = (part.src, part.tgt)
        for lang in langs:
            texts.setdefault(lang, [])
        for pair in corpus.read_pairs(part):
            if all(len(texts[lang]) >= lines for lang in langs):
                break
            for lang, line in zip(langs, pair):
                if len(texts[lang]) < lines:
                    texts[lang].append(line)
    return texts


def score_files(hyps: list[Path], refs: list[Path], tokenize: str, bootstrap: int | None) -> dict:
    """BLEU, chrF and TER of one file of translations; with `bootstrap` samples, of several,
    each compared with the first (paired_bootstrap's result)."""
    metrics.check_tokenizer(tokenize)
    systems, references = _read_aligned(hyps, refs)
    names = ("bleu", "chrf", "ter")
    if bootstrap:
        return metrics.paired_bootstrap(systems, references, bootstrap, names, tokenize)
    if len(systems) > 1:
        raise MtkitError("several files of translations are compared by paired bootstrap resampling", setting="bootstrap",
                         hint="mtkit eval --hyp base.txt --hyp new.txt --ref ref.txt --bootstrap 1000")
    return {"split": systems[0][0], "sentences": len(systems[0][1]), "beam_size": "-", "checkpoint": "-",
            **metrics.score(systems[0][1], references, names, tokenize)}


def _read_aligned(hyps: list[Path], refs: list[Path]) -> tuple[list[tuple[str, list[str]]], list[list[str]]]:
    """-> [(file name, its lines)] per hypothesis file, and the reference streams."""
    systems = [(str(h), list(corpus.read_lines(h))) for h in hyps]
    references = [list(corpus.read_lines(r)) for r in refs]
    n = len(references[0])
    if not n:
        raise MtkitError(f"{refs[0]} has no lines: nothing to score", hint="give the reference translations, one a line")
    for path, lines in [*zip(refs, references), *systems]:
        if len(lines) != n:
            raise MtkitError(f"{path} has {len(lines):,} lines but {refs[0]} has {n:,}",
                             hint="hypotheses and references must be aligned line by line")
    return systems, references


def print_scores(result: dict, names) -> None:
    t = table(f"{result['split']}: {result['sentences']:,} sentences, beam {result['beam_size']}, "
              f"{result['checkpoint']}", ["metric", "score", "sacreBLEU signature"])
    for name in names:
        t.add_row(LABEL[name], f"{result[name]['score']:.2f}", result[name]["signature"])
    if lang := result.get("language"):
        others = ", ".join(f"{k} {n / lang['lines']:.1%}" for k, n in lang["counts"].items() if k != lang["expected"])
        t.add_row(f"in {lang['expected']}", f"{lang['share']:.1%}",
                  f"language check (char n-grams of {lang['from']})" + (f"; the rest: {others}" if others else ""))
    console.print(t)


def print_bootstrap(result: dict, names) -> None:
    t = table(f"paired bootstrap resampling: {result['samples']:,} samples of {result['sentences']:,} sentences; "
              f"score (mean ± 95% CI), p-value against the baseline", ["system", *(LABEL[m] for m in names)])
    for i, row in enumerate(result["systems"]):
        cells = []
        for m in names:
            r = row[m]
            cell = f"{r['score']:.2f} ({r['mean']:.2f} ± {r['ci']:.2f})"
            if r["p_value"] is not None:
                cell += f"\np = {r['p_value']:.4f}" + (" *" if r["p_value"] < 0.05 else "")
            cells.append(cell)
        t.add_row(("baseline: " if i == 0 else "") + row["name"], *cells)
    console.print(t)
    if len(result["systems"]) > 1:
        console.print("* p < 0.05: a difference this large would be unlikely if the system were no better or worse "
                      "than the baseline (TER: lower is better)")
    for m in names:
        console.print(f"{LABEL[m]}: {result['signatures'][m]}")
