"""The Python API: each command of the CLI as a function, for notebooks and scripts.

    from mtkit import Translator, api
    cfg = api.load_config("configs/demo.yaml", ["train.max_steps=200"])
    result = api.train(cfg)                        # tokenizer and data first, when needed
    scores = api.evaluate(cfg, split="test")       # {"bleu": {"score", "signature"}, ...}
    t = Translator.load(cfg.workdir)               # or a checkpoint file
    t.translate(["The dog follows the cat."], beam_size=5)

`config` is a loaded Config or the path of a YAML file. Mistakes raise mtkit.MtkitError (the CLI
prints the same message and exits with code 2). The stages live here, not at the package's top
level, because mtkit.train, mtkit.prepare and mtkit.evaluate are the modules that implement them.
"""

from pathlib import Path

from mtkit.config import Config, load_config
from mtkit.files import ensure_writable_dir


def _config(config: Config | str | Path) -> Config:
    cfg = config if isinstance(config, Config) else load_config(config)
    ensure_writable_dir(cfg.workdir, "the workdir", "set experiment.workdir to a folder you can write", create=False)
    return cfg


def train_tokenizer(config: Config | str | Path, force: bool = False):
    """Train the SentencePiece model(s) on the train split (skipped when up to date);
    returns a TokenizerResult (folder, skipped, fingerprint)."""
    from mtkit.train_tokenizer import train_tokenizer as stage

    return stage(_config(config), force=force)


def prepare(config: Config | str | Path, force: bool = False):
    """Normalize, filter and encode every split (skipped when up to date), training the
    tokenizer first when it is missing or stale; returns a PrepareResult whose manifest holds the
    counts of every split."""
    from mtkit.pipeline import prepare_data

    return prepare_data(_config(config), force=force)[1]


def train(config: Config | str | Path, resume: bool = False):
    """Train the Transformer, building the tokenizer and the prepared data first when missing
    or stale; returns a TrainResult (checkpoints folder, step, seconds, stopped_by, best_bleu,
    best_step). resume: continue from <workdir>/checkpoints/last.pt."""
    from mtkit.pipeline import prepare_and_train

    return prepare_and_train(_config(config), resume=resume)


def evaluate(config: Config | str | Path, split: str | None = None, beam: int | None = None,
             checkpoint: str | Path | None = None, device: str = "auto", precision: str = "auto",
             direction: str | None = None) -> dict:
    """Translate a split with the experiment's eval.checkpoint (or `checkpoint`) and score it:
    {"bleu": {"score", "signature"}, "chrf": ..., "ter": ..., "sentences", ...}. device and
    precision as for Translator.load; direction: which one, e.g. "de-en", for an experiment of
    several (data.directions)."""
    from mtkit.evaluate import directions_to_score, evaluate_split

    cfg = _config(config)
    if direction is not None:
        directions_to_score(cfg, direction)  # checked
    return evaluate_split(cfg, split, beam, Path(checkpoint) if checkpoint else None, device, precision, direction)


def run(config: Config | str | Path) -> None:
    """Every stage in order (tokenizer, prepare, train, translate and score test), skipping
    those whose output is current, as `mtkit run`."""
    from mtkit.pipeline import run as stage

    stage(_config(config))


__all__ = ["Config", "load_config", "train_tokenizer", "prepare", "train", "evaluate", "run"]
