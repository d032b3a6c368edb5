"""Stage `mtkit tokenizer train`: learn the subword vocabulary from the train split.

Writes <workdir>/tokenizer/ (the SentencePiece model(s), a readable .vocab listing, and
tokenizer.json with the settings and the SHA-256 of the train data); does nothing when both are
unchanged.
"""

import random
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

from mtkit import corpus, lineage
from mtkit.bookkeeping import keep_for_the_run
from mtkit.config import Config
from mtkit.console import console, info, progress_bar
from mtkit.errors import MtkitError
from mtkit.files import atomic_dir, read_json, write_json
from mtkit.tokenizer import Tokenizer, train_model

FORMAT_VERSION = 1


@dataclass
class TokenizerResult:
    folder: Path
    skipped: bool
    fingerprint: str


def settings_of(cfg: Config) -> dict:
    """Everything that shapes the vocabulary besides the data itself."""
    return {**cfg.tokenizer.model_dump(mode="json"), **cfg.data.languages, "seed": cfg.experiment.seed,
            "version": FORMAT_VERSION}


def train_tokenizer(cfg: Config, force: bool = False) -> TokenizerResult:
    if cfg.train.init:
        return _inherit(cfg)
    out = cfg.tokenizer_dir
    source = corpus.split_source(cfg.data, "train")
    settings = settings_of(cfg)
    train_sha256 = corpus.fingerprint(source)
    previous = read_json(out / "tokenizer.json") or {}
    if "inherited_from" in previous and not force:  # its data and checkpoints were made with that tokenizer
        parent = previous["inherited_from"]["path"]
        raise MtkitError(f"the run in {cfg.workdir} started from {parent} (train.init), whose tokenizer it uses; "
                         "this config has no train.init", hint=f"add --init {shlex.quote(parent)} (e.g. --resume --init {shlex.quote(parent)}), "
                         "or train from scratch in another workdir")
    if not force and (previous.get("train_sha256"), previous.get("settings")) == (train_sha256, settings):
        info(f"tokenizer: up to date ({out})")
        return TokenizerResult(out, True, previous["fingerprint"])
    if not force:
        keep_for_the_run(cfg.workdir, out, "tokenizer")

    start = time.perf_counter()
    # A stream is kept on disk as it is read, for prepare (which deletes it).
    kept = corpus.keep_streams(source, cfg.workdir, train_sha256)
    src_lines, tgt_lines, n_pairs = _sample(kept, cfg.tokenizer.sample_pairs, cfg.experiment.seed)
    t = cfg.tokenizer
    options = dict(model_type=t.type, vocab_size=t.vocab_size, character_coverage=t.character_coverage,
                   byte_fallback=t.byte_fallback, threads=t.threads)
    tags = [corpus.tag(lang) for lang in cfg.data.targets] if cfg.data.tagged else []  # whole pieces, source side
    what = f"{t.type} {'joint' if t.joint else 'separate'} vocabulary of {t.vocab_size}"
    info(f"tokenizer: training {what} on {len(src_lines):,} of {n_pairs:,} train pairs")
    with console.status(f"training SentencePiece ({what})"):
        if t.joint:
            tok = Tokenizer(train_model(src_lines + tgt_lines, what="the train split", symbols=tags, **options))
        else:
            tok = Tokenizer(train_model(src_lines, what=f"the {cfg.data.src or 'source'} side", symbols=tags, **options),
                            train_model(tgt_lines, what=f"the {cfg.data.tgt or 'target'} side", **options))
    with atomic_dir(out) as tmp:
        tok.save(tmp)
        write_json(tmp / "tokenizer.json", {
            "fingerprint": tok.fingerprint, "settings": settings, "train_source": source.describe(),
            "train_sha256": train_sha256, "pairs_seen": n_pairs, "pairs_used": len(src_lines),
            "src_vocab_size": tok.src_vocab_size, "tgt_vocab_size": tok.tgt_vocab_size,
            "special_ids": special_ids(tok),
        })
    info(f"tokenizer: done in {time.perf_counter() - start:.1f}s -> {out}")
    return TokenizerResult(out, False, tok.fingerprint)


def _inherit(cfg: Config) -> TokenizerResult:
    """train.init: the tokenizer of the model the run starts from becomes this run's, so that
    prepare encodes the new data as that model reads."""
    lineage.adopt(cfg)  # a config that asks for another vocabulary is said now, not after prepare
    out, tok = cfg.tokenizer_dir, lineage.load(cfg).make_tokenizer()
    inherited = {"path": str(lineage.parent(cfg)), "fingerprint": tok.fingerprint}
    had = (read_json(out / "tokenizer.json") or {}).get("inherited_from")
    if had == inherited:
        info(f"tokenizer: up to date ({out}, taken over from {inherited['path']})")
        return TokenizerResult(out, True, tok.fingerprint)
    if had and (cfg.workdir / "checkpoints" / "last.pt").exists():  # the run's parent, said by name
        raise MtkitError(f"the run in {cfg.workdir} started from {had['path']} (train.init), not from "
                         f"{inherited['path']}", hint=f"resume it as it started (--resume --init {shlex.quote(had['path'])}), "
                         "or set another experiment.workdir")
    keep_for_the_run(cfg.workdir, out, "tokenizer")
    with atomic_dir(out) as tmp:
        tok.save(tmp)
        write_json(tmp / "tokenizer.json", {
            "fingerprint": tok.fingerprint, "inherited_from": inherited,
            "src_vocab_size": tok.src_vocab_size, "tgt_vocab_size": tok.tgt_vocab_size,
            "special_ids": special_ids(tok),
        })
    info(f"tokenizer: taken over from {inherited['path']} (train.init) -> {out}")
    return TokenizerResult(out, False, tok.fingerprint)


def special_ids(tok: Tokenizer) -> dict[str, int]:
    return {"pad": tok.pad_id, "unk": tok.unk_id, "bos": tok.bos_id, "eos": tok.eos_id}


def _sample(source: corpus.Source, cap: int, seed: int) -> tuple[list[str], list[str], int]:
    """Normalized train pairs, at most `cap` of them: a seeded reservoir sample when the corpus is
    larger, so the vocabulary is reproducible and memory stays bounded."""
    rng = random.Random(seed)
    kept: list[tuple[str, str]] = []
    n = 0
    with progress_bar() as bar:
        task = bar.add_task("reading train split", total=None)
        for n, pair in enumerate(corpus.read_pairs(source), 1):
            if len(kept) < cap:
                kept.append(pair)
            elif (j := rng.randrange(n)) < cap:
                kept[j] = pair
            if n % 10_000 == 0:
                bar.update(task, completed=n)
        bar.update(task, total=n, completed=n)
    # Normalized once sampled (a corpus five times the sample: 4 of 5 lines never are), each pair
    # in place, so that the raw and the normalized sample are never in memory together. Empty
    # sides teach SentencePiece nothing; prepare drops such pairs anyway.
    for i, (src, tgt) in enumerate(kept):
        kept[i] = corpus.normalize(src), corpus.normalize(tgt)
    return [s for s, _ in kept if s], [t for _, t in kept if t], n
