"""Chaining the stages: `mtkit run CONFIG` (tokenizer -> prepare -> train -> translate + eval),
and `mtkit train` (the tokenizer and data first when missing or stale). Each stage is skipped when
its output is current for the config."""

from pathlib import Path

from mtkit import checkpoint, distributed
from mtkit.bookkeeping import RunState, refuse_a_second_run, stop_reason
from mtkit.config import Config
from mtkit.console import console, info, table
from mtkit.errors import MtkitError
from mtkit.evaluate import check_scoring, evaluate_split, print_scores
from mtkit.prepare import prepare
from mtkit.train import train
from mtkit.train_tokenizer import train_tokenizer


def prepare_data(cfg: Config, force: bool = False) -> tuple:
    """Tokenizer, then prepared data: each is rebuilt only when missing or stale for `cfg` (the
    same rule for mtkit prepare, train and run); force: prepare the data again all the same."""
    return train_tokenizer(cfg), prepare(cfg, force=force)


def prepare_and_train(cfg: Config, resume: bool = False):
    """`mtkit train`: the tokenizer and data when missing or stale, then training. Under torchrun
    the first process builds them while the others wait, then all train together."""
    check_scoring(cfg)
    last = cfg.workdir / "checkpoints" / "last.pt"
    if resume and not last.exists():  # said before the tokenizer and data are built for nothing
        raise MtkitError(f"nothing to resume: {last} does not exist", hint="start training without --resume")
    if not resume:
        refuse_a_second_run(last)
    world = distributed.start(cfg.train.device)
    world.main_first(lambda: prepare_data(cfg))
    check_shared_workdir(cfg, world)
    result = train(cfg, resume=resume, world=world)
    # Leave together, once rank 0 has validated and saved: a process that tears down its
    # connections while another still holds them is aborted by gloo.
    world.barrier()
    distributed.finish()
    return result


def check_shared_workdir(cfg: Config, world: distributed.World) -> None:
    """Rank 0 alone prepares the data and saves checkpoints; a process on another machine sees
    them only if the workdir is on a filesystem all machines share."""
    if not world.main and not (cfg.data_cache_dir / "manifest.json").is_file():
        raise MtkitError(f"process {world.rank} sees no prepared data in {cfg.data_cache_dir}, which process 0 has "
                         f"just written: training on several machines needs the workdir on a filesystem they all "
                         f"share", hint="set experiment.workdir to a shared folder (NFS, Lustre, ...) on every machine")


def finished_run(last: Path, cfg: Config) -> RunState | None:
    """The progress of the run in `last` when it is finished and its settings are cfg's: a finished
    run ended itself (a final save records why; a kill leaves none) and the settings of *this* run
    agree (an older mtkit carried a stopped_by into resumed runs)."""
    if not last.exists():
        return None
    state = checkpoint.load(last, mmap=True)
    progress = RunState.from_dict(state.progress)
    reason = stop_reason(cfg.train, progress, state.sampler["epoch"])
    finished = progress.stopped_by not in (None, "interrupted") and reason is not None
    before, now = state.current_config(), cfg.model_dump(mode="json")
    if finished and before is not None and all(before[k] == now[k] for k in ("model", "train", "data", "tokenizer")):
        info(f"train: up to date ({last}, stopped by {reason} at step {state.step:,})")
        return progress
    return None


def train_if_needed(cfg: Config, world: distributed.World) -> tuple[str, RunState | None]:
    """Train, resume an unfinished run, or skip a finished one whose settings are unchanged.
    Returns (what happened, the last checkpoint's progress: on rank 0)."""
    last = cfg.workdir / "checkpoints" / "last.pt"
    if (progress := world.from_main(finished_run(last, cfg) if world.main else None)) is not None:
        return "up to date", progress
    resume = last.exists()
    result = train(cfg, resume=resume, world=world)
    if result.stopped_by == "interrupted":
        raise KeyboardInterrupt
    return ("resumed" if resume else "done"), RunState.from_dict(checkpoint.load(last, mmap=True).progress) \
        if world.main else None


def run(cfg: Config) -> None:
    """`mtkit run`. Under torchrun the first process builds the corpus, tokenizer and data while
    the others wait, all train together, then the first translates and scores alone."""
    check_scoring(cfg)
    world = distributed.start(cfg.train.device)
    prepared = world.main_first(lambda: prepare_data(cfg))
    check_shared_workdir(cfg, world)
    trained, progress = train_if_needed(cfg, world)
    world.barrier()  # leave together (prepare_and_train says why)
    distributed.finish()
    if not world.main:
        return
    tok, data = prepared
    results = [evaluate_split(cfg, "test", direction=d) for d in cfg.data.names or [None]]
    for result in results:
        console.print(f"[bold]sample translations ({result['split']})[/]")
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
    for result in results:
        t.add_row("translate + eval", "up to date" if result.get("up_to_date") else "done",
                  f"{result['split']} BLEU {result['bleu']['score']:.2f}"
                  + (f", chrF {result['chrf']['score']:.2f}" if "chrf" in result else "")
                  + (f", {result['language']['share']:.1%} in {result['language']['expected']}" if "language" in result else "")
                  + f" (beam {result['beam_size']}) -> {cfg.workdir / 'eval'}")
    console.print(t)
