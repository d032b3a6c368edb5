"""Chaining the stages: `mtkit run CONFIG` (tokenizer -> prepare -> train -> translate -> eval),
and `mtkit eval CONFIG` (translate a split with eval.checkpoint, best.pt or averaged.pt, then
score it). Each stage is skipped when its output is current for the config."""

import time
from pathlib import Path

from mtkit import checkpoint, corpus, distributed, evaluate
from mtkit.config import Config
from mtkit.console import console, info, table
from mtkit.errors import MtkitError
from mtkit.files import read_json, sha256_file, sha256_json, write_json
from mtkit.prepare import prepare
from mtkit.bookkeeping import Progress, stop_reason
from mtkit.train import train
from mtkit.translate import Translator, resolve_checkpoint
from mtkit.vocab import train_tokenizer


def bleu_tokenizer(cfg: Config) -> str:
    """BLEU's tokenizer for this experiment, proven usable (a missing MeCab is said before any work)."""
    return evaluate.check_tokenizer(evaluate.bleu_tokenizer(cfg.eval.tokenize, cfg.data.tgt))


def prepare_data(cfg: Config, force: bool = False) -> tuple:
    """Tokenizer, then prepared data: each is rebuilt only when missing or stale for `cfg` (the
    same rule for mtkit prepare, train and run); force: prepare the data again all the same."""
    return train_tokenizer(cfg), prepare(cfg, force=force)


def prepare_and_train(cfg: Config, resume: bool = False):
    """`mtkit train`: the tokenizer and data when missing or stale, then training. Under torchrun
    the first process builds them while the others wait, then all train together."""
    bleu_tokenizer(cfg)
    last = cfg.workdir / "checkpoints" / "last.pt"
    if resume and not last.exists():  # said before the tokenizer and data are built for nothing
        raise MtkitError(f"nothing to resume: {last} does not exist", hint="start training without --resume")
    world = distributed.start(cfg.train.device)
    try:
        if world.main:
            prepare_data(cfg)
        world.barrier()
        check_shared_workdir(cfg, world)
        result = train(cfg, resume=resume, world=world)
        # Leave together, once rank 0 has validated and saved: a process that tears down its
        # connections while another still holds them is aborted by gloo.
        world.barrier()
        return result
    finally:
        distributed.finish()


def check_shared_workdir(cfg: Config, world: distributed.World) -> None:
    """Rank 0 alone prepares the data and saves checkpoints; a process on another machine sees
    them only if the workdir is on a filesystem all machines share."""
    if not world.main and not (cfg.data_cache_dir / "manifest.json").is_file():
        raise MtkitError(f"process {world.rank} sees no prepared data in {cfg.data_cache_dir}, which process 0 has "
                         f"just written: training on several machines needs the workdir on a filesystem they all "
                         f"share", hint="set experiment.workdir to a shared folder (NFS, Lustre, ...) on every machine")


def train_if_needed(cfg: Config) -> tuple[str, Progress]:
    """Train, resume an unfinished run, or skip a finished one whose settings are unchanged.
    Returns (what happened, the last checkpoint's progress)."""
    last = cfg.workdir / "checkpoints" / "last.pt"
    if last.exists():
        state = checkpoint.load(last, mmap=True)
        progress = Progress.from_dict(state["progress"])
        # Finished: the run ended itself (a final save records why; a kill leaves none) and the
        # settings of *this* run agree (an older mtkit carried a stopped_by into resumed runs).
        reason = stop_reason(cfg.train, progress, state["sampler"]["epoch"])
        finished = progress.stopped_by not in (None, "interrupted") and reason is not None
        before, now = _with_defaults(state["config"]), cfg.model_dump(mode="json")
        same = before is not None and all(before[k] == now[k] for k in ("model", "train", "data", "tokenizer"))
        if finished and same:
            info(f"train: up to date ({last}, stopped by {reason} at step {state['step']:,})")
            return "up to date", progress
    resume = last.exists()
    result = train(cfg, resume=resume)
    if result.stopped_by == "interrupted":
        raise KeyboardInterrupt
    return ("resumed" if resume else "done"), Progress.from_dict(checkpoint.load(last, mmap=True)["progress"])


def _with_defaults(saved: dict) -> dict | None:
    """A checkpoint's config with today's defaults filled in, so that a key added to mtkit since
    (at its default) does not count as a change; None if it no longer validates."""
    try:
        return Config.model_validate(saved).model_dump(mode="json")
    except ValueError:  # pydantic's ValidationError is one
        return None


def evaluate_split(cfg: Config, split: str | None = None, beam: int | None = None,
                   model: Path | None = None, device: str = "auto", precision: str = "auto") -> dict:
    """Translate a split's raw source with the experiment's eval.checkpoint (or `model`) and
    score it against the raw references. Output: <workdir>/eval/<split>.hyp and <split>.json; a
    rerun with the same checkpoint, data and decoding settings (precision included) reuses them."""
    split = split or cfg.eval.split
    if split not in ("valid", "test"):
        raise MtkitError(f"the split to score is valid or test, not {split!r}")
    ckpt = resolve_checkpoint(model) if model else cfg.eval_checkpoint
    if not ckpt.is_file():
        raise MtkitError(f"no checkpoint {ckpt} to score" + ("" if model else f" (eval.checkpoint: {cfg.eval.checkpoint})"),
                         hint="train first (mtkit train CONFIG), or name one with --checkpoint")
    source = corpus.source_for(cfg.data, split)
    tokenize = bleu_tokenizer(cfg)
    translator = Translator.load(ckpt, device, precision)  # mapped, not read: cheap when the result is cached
    # Every setting given, so the experiment's decode section wins over the checkpoint's; validated
    # (a beam of 0 is an error, not the default).
    opts = translator.options(**cfg.decode.model_dump() | ({} if beam is None else {"beam_size": beam, "n_best": 1}))
    key = sha256_json({"checkpoint": sha256_file(ckpt), "path": str(ckpt), "source": corpus.fingerprint(source),
                       "decode": opts.model_dump(), "metrics": list(cfg.eval.metrics), "tokenize": tokenize,
                       "precision": translator.precision})
    out = cfg.workdir / "eval"
    previous = read_json(out / f"{split}.json")
    if previous and previous.get("key") == key and (out / f"{split}.hyp").exists():
        info(f"eval: up to date ({out / f'{split}.json'})")
        return previous | {"up_to_date": True}  # (not saved: says this call reused the result)
    pairs = list(corpus.read_pairs(source))
    sources, references = [p[0] for p in pairs], [p[1] for p in pairs]
    start = time.perf_counter()
    with console.status(f"translating {len(sources):,} {split} sentences (beam {opts.beam_size})"):
        hypotheses = translator.translate(sources, **opts.model_dump())
    seconds = time.perf_counter() - start
    scores = evaluate.score(hypotheses, [references], cfg.eval.metrics, tokenize)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{split}.hyp").write_text("".join(h + "\n" for h in hypotheses), encoding="utf-8")
    result = {"split": split, "checkpoint": str(ckpt), "beam_size": opts.beam_size, "alpha": opts.alpha,
              "precision": translator.precision, "device": str(translator.device),
              "sentences": len(sources), "seconds": round(seconds, 2), **scores, "key": key,
              "samples": [{"src": s, "hyp": h, "ref": r} for s, h, r in zip(sources[:3], hypotheses, references)]}
    write_json(out / f"{split}.json", result)
    return result


def print_scores(result: dict, metrics) -> None:
    t = table(f"{result['split']}: {result['sentences']:,} sentences, beam {result['beam_size']}, "
              f"{result['checkpoint']}", ["metric", "score", "sacreBLEU signature"])
    for name in metrics:
        t.add_row(name.upper() if name != "chrf" else "chrF", f"{result[name]['score']:.2f}", result[name]["signature"])
    console.print(t)


def run(cfg: Config) -> None:
    bleu_tokenizer(cfg)
    tok, data = prepare_data(cfg)
    trained, progress = train_if_needed(cfg)
    result = evaluate_split(cfg, "test")
    console.print("[bold]sample translations (test)[/]")
    for s in result["samples"]:
        console.print(f"  src: {s['src']}\n  hyp: {s['hyp']}\n  ref: {s['ref']}\n")
    print_scores(result, cfg.eval.metrics)
    train_split = data.manifest["splits"]["train"]
    t = table(f"experiment {cfg.experiment.name}", ["stage", "status", "result"])
    t.add_row("tokenizer", "up to date" if tok.skipped else "done", str(tok.folder))
    t.add_row("prepare", "up to date" if data.skipped else "done",
              f"{train_split['kept']:,} of {train_split['pairs_in']:,} train pairs kept -> {data.folder}")
    best = f"best valid BLEU {progress.best_bleu:.2f} at step {progress.best_step:,}" \
        if progress.best_bleu is not None else "no validation"
    t.add_row("train", trained, f"{progress.step:,} steps, {progress.seconds / 60:.1f} min, {best}")
    t.add_row("translate + eval", "up to date" if result.get("up_to_date") else "done", f"test BLEU {result['bleu']['score']:.2f}"
              + (f", chrF {result['chrf']['score']:.2f}" if "chrf" in result else "")
              + f" (beam {result['beam_size']}) -> {cfg.workdir / 'eval'}")
    console.print(t)
