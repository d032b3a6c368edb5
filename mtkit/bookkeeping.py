"""The bookkeeping of a training run, kept out of train.py so that the training reads on its own:
what the run has done (`RunState`) and when it is finished (`stop_reason`), one run per workdir (a
lock), Ctrl-C and SIGTERM, the record (progress bar, metrics.jsonl, TensorBoard) and the summary.
"""

import contextlib
import json
import os
import signal
from dataclasses import dataclass, fields
from pathlib import Path

from rich.progress import BarColumn, Progress as Bar, TextColumn, TimeElapsedColumn

from mtkit.config import TrainSection
from mtkit.console import console, table
from mtkit.errors import MtkitError
from mtkit.files import write_text
from mtkit.portable import lock


def bar_columns(width: int) -> list:
    """The training bar's columns for a terminal `width` wide, each with the width it needs to be
    shown: all of them take ~150 characters, and where they do not fit rich cuts every column to
    an ellipsis; on 80 columns the step, the loss, the speed and the ETA remain."""
    columns = [(TextColumn("{task.description}"), 110), (BarColumn(bar_width=40 if width >= 150 else 8), 0),
               (TextColumn("step {task.completed:,.0f}/{task.total:,.0f}"), 0),
               (TextColumn("epoch {task.fields[epoch]}"), 110), (TextColumn("loss {task.fields[loss]}"), 0),
               (TextColumn("lr {task.fields[lr]}"), 110),
               (TextColumn("{task.fields[tps]} tgt tok/s" if width >= 110 else "{task.fields[tps]} tok/s"), 0),
               (TimeElapsedColumn(), 150), (TextColumn("ETA {task.fields[eta]}"), 0)]
    return [column for column, needs in columns if width >= needs]


@dataclass
class RunState:
    """What the loop has done so far; all of it goes into checkpoints (as a dict)."""
    step: int = 0
    seconds: float = 0.0  # of training, over all sessions of the run
    best_bleu: float | None = None
    best_step: int | None = None
    bad_evals: int = 0  # validations since the best one (train.patience)
    skipped_steps: int = 0  # updates skipped for a NaN/inf loss or gradient
    nonfinite_in_row: int = 0
    last_eval_step: int = 0
    last_save_step: int = 0
    stopped_by: str | None = None  # set by the final save only: max_steps | ... | interrupted

    @classmethod
    def from_dict(cls, saved: dict) -> "RunState":
        """A checkpoint's progress; a counter added since it was saved starts at its default."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in names})


@dataclass
class TrainResult:
    checkpoints: Path
    step: int
    seconds: float
    stopped_by: str  # max_steps | max_epochs | max_time | patience | interrupted
    best_bleu: float | None
    best_step: int | None


def stop_reason(t: TrainSection, progress: RunState, epoch: int) -> str | None:
    """Which stop rule of the train section `t` a run with this progress has met (None: it goes
    on). The one judge of "finished": the loop asks it after every step, and `mtkit run` asks it
    of last.pt, so a run is finished only when its *current* settings say so (a run extended from
    max_steps 40 to 400 and killed at step 180 is not finished, whatever stopped it before)."""
    if progress.step >= t.max_steps:
        return "max_steps"
    if t.max_epochs and epoch >= t.max_epochs:
        return "max_epochs"
    if t.max_time and progress.seconds >= t.max_time:
        return "max_time"
    if t.patience and progress.bad_evals >= t.patience:
        return "patience"
    return None


@contextlib.contextmanager
def workdir_lock(workdir: Path):
    """One training per workdir. The lock is released by the system when the process dies, so a
    killed run never leaves a stale lock behind (portable.lock)."""
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / "train.lock", "a+") as f:
        taken = lock(f)
        if taken is False:
            f.seek(0)
            raise MtkitError(f"another mtkit train is running on {workdir} (pid {f.read().strip() or '?'})",
                             hint="wait for it to finish, or set another experiment.workdir")
        if taken is not True:
            console.print(f"[yellow]warning:[/] {workdir / 'train.lock'} cannot be locked: {taken}; nothing stops a "
                          f"second training on this workdir meanwhile")
        f.seek(0)
        f.truncate(0)
        f.write(str(os.getpid()))
        f.flush()
        yield


def refuse_a_second_run(last: Path) -> None:
    """A new run never starts over a run's checkpoints (they would be lost)."""
    if last.exists():
        raise MtkitError(f"{last.parent.parent} already holds a training run ({last})",
                         hint="continue it with --resume, or set another experiment.workdir")


def keep_for_the_run(workdir: Path, folder: Path, what: str) -> None:
    """The tokenizer and prepared data of a workdir that holds a training run are the ones it was
    made with: replaced, the run could never resume (and train or run would only say so after the
    change). Checked before anything is written."""
    last = workdir / "checkpoints" / "last.pt"
    if last.exists() and folder.exists():
        raise MtkitError(f"{workdir} holds a training run ({last}) made with the {what} in {folder}, which this "
                         f"config would replace", hint="set another experiment.workdir for this config")


class StopRequest:
    """SIGINT (Ctrl-C) and SIGTERM ask the loop to stop after the current step and save; a second
    Ctrl-C stops at once."""

    def __init__(self):
        self.signal: str | None = None

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


class RunLog:
    """The record of a run: metrics.jsonl (one JSON object per event), TensorBoard beside it
    (train.tensorboard), and a progress bar, or without a terminal one parseable line per log
    window. Only the main process keeps it (`active`); the others' RunLog writes nothing."""

    def __init__(self, workdir: Path, progress: RunState, last_checkpoint: Path, *, active: bool,
                 tensorboard: bool, max_steps: int):
        self.path, self.progress, self.last_checkpoint = workdir / "metrics.jsonl", progress, last_checkpoint
        self.active = active
        if active:  # a resumed run: drop what a killed run logged after its checkpoint
            _truncate_metrics(self.path, progress.step)
        self.tensorboard = _tensorboard(workdir / "tensorboard") if tensorboard and active else None
        self.bar = Bar(*bar_columns(console.width), console=console,
                       disable=not active or not console.is_terminal or bool(os.environ.get("MTKIT_QUIET")))
        self.task = self.bar.add_task("train", total=max_steps, completed=progress.step, loss="-", lr="-", tps="-",
                                      eta="-", epoch="-")

    def __enter__(self):
        self.bar.start()
        return self

    def __exit__(self, *exc):
        self.bar.stop()

    def write(self, event: dict) -> None:
        if not self.active:
            return
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(event, ensure_ascii=False) + "\n")
            if self.tensorboard is not None and event["event"] in ("train", "valid"):
                for key in ("loss", "nll", "ppl", "bleu", "lr", "tgt_tokens_per_s"):
                    if key in event:
                        self.tensorboard.add_scalar(f"{event['event']}/{key}", event[key], event["step"])
                for direction, bleu in event.get("bleu_by_direction", {}).items():
                    self.tensorboard.add_scalar(f"valid/bleu/{direction}", bleu, event["step"])
                for direction, e in event.get("examples", {}).items():  # the Text tab: one sentence, step by step
                    self.tensorboard.add_text(f"valid/example/{direction}", f"{e['source']} → {e['translation']}"
                                              f"  (reference: {e['reference']})", event["step"])
                self.tensorboard.flush()
        except OSError as e:
            saved = f"{self.last_checkpoint} (step {self.progress.last_save_step:,}) is intact" \
                if self.last_checkpoint.exists() else "no checkpoint had been saved yet"
            raise MtkitError(f"could not write {self.path}: {e.strerror or e}; {saved}",
                             hint="free disk space or fix permissions, then continue with --resume") from None

    def validation(self, result: dict, improved: bool) -> None:
        """A validation's event, and its line: the scores, then each direction's example sentence as
        the model translates it now (the same sentence every time: a learner watches it learned)."""
        if not self.active:
            return
        p = self.progress
        self.write({"event": "valid", "step": p.step, **result, "best_bleu": p.best_bleu})
        mark = " (best)" if improved else f" (best {p.best_bleu:.2f} at step {p.best_step:,})"
        by = "".join(f" {k} {v:.2f}" for k, v in result.get("bleu_by_direction", {}).items())
        examples = "".join(f"\n  {name + ': ' if by else ''}{e['source']} -> {e['translation']}  (reference: "
                           f"{e['reference']})" for name, e in result["examples"].items())
        console.print(f"valid step {p.step:,}: loss {result['loss']:.3f} | ppl {result['ppl']:.2f} | BLEU "
                      f"{result['bleu']:.2f}{' (mean of' + by + ')' if by else ''}{mark} | {result['seconds']:.1f}s"
                      f"{examples}", markup=False)  # a sentence may hold [brackets]: not rich markup

    def at(self, step: int, epoch: int, total: int | None = None, **figures: str) -> None:
        """Move the bar (figures: loss, lr, tps, eta, as shown; total: the step it runs to, when known)."""
        self.bar.update(self.task, completed=step, total=total, epoch=epoch, **figures)  # total None: unchanged

    def line(self, text: str) -> None:
        """A log line for when no live bar shows the same (a log file, CI)."""
        if self.active and self.bar.disable:
            console.print(text)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def print_summary(name: str, r: "TrainResult", *, epochs: float, precision: str, tgt_per_s: float | None) -> None:
    s = table(f"train {name}", ["", "value"])
    s.add_row("steps", f"{r.step:,} (stopped by {r.stopped_by})")
    s.add_row("epochs", f"{epochs:.2f}")
    s.add_row("time", f"{r.seconds / 60:.1f} min")
    s.add_row("precision", precision)
    if tgt_per_s is not None:
        s.add_row("target tokens/s", f"{tgt_per_s:,.0f} (training steps only)")
    if r.best_bleu is not None:
        s.add_row("best valid BLEU", f"{r.best_bleu:.2f} at step {r.best_step:,}")
    s.add_row("checkpoints", f"{r.checkpoints} (best.pt, last.pt)")
    console.print(s)


def _tensorboard(folder: Path):
    """train.tensorboard: a SummaryWriter beside metrics.jsonl (TensorBoard is an optional extra)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise MtkitError("train.tensorboard needs TensorBoard", hint="pip install 'mtkit[tb]' (or: pip install "
                                                                       "tensorboard), or mtkit plot WORKDIR") from None
    return SummaryWriter(log_dir=str(folder))


def _truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop events after the checkpoint's step (a killed run may have logged beyond it)."""
    if not path.is_file():  # none yet (or not a regular file: nothing to cut)
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except ValueError:  # a line cut short by a kill
            continue
    write_text(path, "".join(kept))
