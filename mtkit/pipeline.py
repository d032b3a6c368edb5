"""`mtkit run CONFIG`: chain the stages; each one skips itself when its output is current."""

from mtkit.config import Config
from mtkit.console import console, table
from mtkit.prepare import prepare
from mtkit.vocab import train_tokenizer


def prepare_data(cfg: Config) -> tuple:
    """Tokenizer, then prepared data: each is rebuilt only when missing or stale for `cfg`."""
    return train_tokenizer(cfg), prepare(cfg)


def run(cfg: Config) -> None:
    tok, data = prepare_data(cfg)
    train = data.manifest["splits"]["train"]
    t = table(f"experiment {cfg.experiment.name}", ["stage", "status", "output"])
    t.add_row("tokenizer", "up to date" if tok.skipped else "done", str(tok.folder))
    t.add_row("prepare", "up to date" if data.skipped else "done",
              f"{data.folder} ({train['kept']:,} of {train['pairs_in']:,} train pairs kept)")
    # `run` chains train, translate and eval with issue [3/7]; until then it stops after prepare.
    t.add_row("train", "not chained yet", "run: mtkit train CONFIG")
    for stage in ("translate", "eval"):
        t.add_row(stage, "not implemented yet", "-")
    console.print(t)
