"""Checkpoints: one self-describing file each, written so that a kill never leaves a broken one.

A checkpoint (`Checkpoint`) holds the model config and weights (enough to translate), and for
training also the optimizer, the step, the sampler position, the RNG states, the resolved
experiment config and the tokenizer fingerprint (enough to resume exactly). On disk it is a dict of
plain values saved with torch.save (so that `weights_only` loading, which runs no code, reads it),
written under a temporary name, flushed to disk (fsync) and renamed over the old one: a reader sees
the old file or the new one, never half of one. `load` is the one reader, and the one place where a
file from an older mtkit is brought up to date.
"""

import os
import shutil
import zipfile
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from mtkit import fast
from mtkit.config import Config
from mtkit.errors import MtkitError
from mtkit.files import output_file
from mtkit.model import ModelConfig, Transformer
from mtkit.tokenizer import Tokenizer

FORMAT = "mtkit-checkpoint"
VERSION = 1


@dataclass(frozen=True)
class Checkpoint:
    model_config: dict  # a model.ModelConfig as a dict
    model: dict  # the trained weights (a state dict), which resuming continues from
    tokenizer: tuple[bytes, ...] | None = None  # the SentencePiece model(s): the checkpoint translates on its own
    tokenizer_fingerprint: str | None = None
    config: dict = field(default_factory=dict)  # the resolved experiment config (config.Config, as JSON)
    precision: str = "fp32"  # the precision it was trained in
    ema: dict | None = None  # the moving average of the weights (train.ema), translated with when kept
    step: int | None = None
    data_fingerprint: str | None = None  # the prepared data it was trained on
    # Where the weights came from (PROVENANCE): a parent run (train.init), mtkit import, mtkit average.
    init_from: dict | None = None
    imported_from: dict | None = None
    averaged_from: list[str] | None = None
    # What only resuming needs.
    optimizer: dict | None = None
    sampler: dict | None = None
    progress: dict | None = None  # a bookkeeping.RunState as a dict
    rng: dict | None = None
    scaler: dict | None = None  # fp16's loss scaler
    path: Path | None = field(default=None, compare=False)  # the file it was read from (not saved)

    def to_dict(self) -> dict:
        """What is saved: every field that is set, as plain values."""
        saved = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "path"}
        saved["tokenizer"] = list(self.tokenizer) if self.tokenizer is not None else None
        return {"format": FORMAT, "version": VERSION} | {k: v for k, v in saved.items() if v is not None}

    @property
    def weights(self) -> dict:
        """The weights to translate with: the moving average when training kept one, else the
        trained weights."""
        return self.ema if self.ema is not None else self.model

    def build_model(self, faster: bool = True) -> Transformer:
        """The model the checkpoint describes, with its (translation) weights, in eval mode; faster=False:
        model.py's as written, without fast.py's swaps (the same translations, slower)."""
        model = Transformer(ModelConfig(**self.model_config))
        model = fast.apply(model) if faster else model
        model.load_state_dict(self.weights)
        return model.eval()

    def make_tokenizer(self) -> Tokenizer:
        """The tokenizer it was trained with, checked against the fingerprint it recorded."""
        if self.tokenizer is None:
            raise MtkitError(f"{self.path} holds no tokenizer, so its vocabulary is unknown (it was written by an "
                             f"older mtkit)", hint="use a checkpoint that mtkit train wrote, or retrain")
        tokenizer = Tokenizer(*self.tokenizer)
        if tokenizer.fingerprint != self.tokenizer_fingerprint:
            raise MtkitError(f"{self.path}: its tokenizer does not match the one it was trained with")
        return tokenizer

    def current_config(self) -> dict | None:
        """Its experiment config with this mtkit's defaults filled in, so that a key added to mtkit
        since (at its default) does not count as a change; None if it no longer validates."""
        try:
            return Config.model_validate(self.config).model_dump(mode="json")
        except ValueError:  # pydantic's ValidationError is one
            return None

    def provenance(self) -> dict:
        """Where its weights came from: kept by average and export."""
        return {key: getattr(self, key) for key in PROVENANCE if getattr(self, key) is not None}


# What a checkpoint says of where its weights came from.
PROVENANCE = ("step", "init_from", "imported_from", "averaged_from")


def _upgraded(saved: dict, path: Path) -> Checkpoint:
    """A checkpoint as this mtkit reads it, from the dict that any mtkit of format VERSION or older
    wrote: the one place where what an older mtkit left out is filled in."""
    known = {f.name for f in fields(Checkpoint)} - {"path"}
    state = {k: v for k, v in saved.items() if k in known and v is not None}
    # Before Marian models were imported, no model had a bias on its logits, and the config said nothing.
    state["model_config"] = {"logits_bias": False, **state["model_config"]}
    if state.get("tokenizer") is not None:
        state["tokenizer"] = tuple(state["tokenizer"])
    return Checkpoint(**state, path=path)


def save(ckpt: Checkpoint, path: Path) -> None:
    path = Path(path)
    try:
        with output_file(path, durable=True) as tmp, open(tmp, "wb") as f:
            torch.save(ckpt.to_dict(), f)
    except OSError as e:  # a full disk, a read-only folder: the old file is still whole
        raise MtkitError(f"could not write the checkpoint {path}: {e.strerror or e}",
                         hint="free disk space or fix the folder's permissions, then run again; the checkpoints "
                              "already there are intact (training goes on from last.pt with --resume)") from e


def link(src: Path, dst: Path) -> None:
    """Make `dst` name the same file as `src` (a hard link: no copy, no second write), atomically."""
    with output_file(Path(dst), durable=True) as tmp:
        try:
            os.link(src, tmp)
        except OSError:  # a file system without hard links: a copy (still atomic through the rename)
            shutil.copyfile(src, tmp)


def load(path: Path, mmap: bool = False) -> Checkpoint:
    """The checkpoint in `path`; MtkitError naming the file when it is missing, damaged, not an
    mtkit checkpoint, or from a newer mtkit. mmap: map the file instead of reading it, so parts
    never used (the optimizer state, when only translating) never take memory."""
    path = Path(path)
    if path.is_dir():
        raise MtkitError(f"{path} is a folder, not a checkpoint file",
                         hint=f"name a file in it, e.g. {path / 'checkpoints' / 'best.pt'}")
    if path.is_file() and not zipfile.is_zipfile(path):  # torch.save writes a zip archive
        raise MtkitError(f"{path} is not a readable checkpoint (not a PyTorch file)",
                         hint="it may be truncated or from another program; use another checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise MtkitError(f"checkpoint not found: {path}") from None
    except Exception as e:  # torch raises many types for a truncated or foreign file
        raise MtkitError(f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e)[:200]})",
                         hint="it may be truncated or from another program; use another checkpoint") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise MtkitError(f"{path} is not an mtkit checkpoint")
    if state.get("version", 0) > VERSION:
        raise MtkitError(f"{path} has checkpoint format version {state['version']}; this mtkit reads "
                         f"up to {VERSION}", hint="upgrade mtkit")
    missing = [key for key in ("model_config", "model") if key not in state]
    if missing:
        raise MtkitError(f"{path} is an incomplete mtkit checkpoint (it has no {' or '.join(missing)})",
                         hint="use another checkpoint")
    return _upgraded(state, path)


def average(paths: list[Path]) -> Checkpoint:
    """A checkpoint whose weights are the element-wise mean of the given checkpoints' (translation)
    weights (same model config required); config and tokenizer come from the last one."""
    if not paths:
        raise MtkitError("average needs at least one checkpoint")
    states = [load(p) for p in paths]
    first = states[0]
    for p, s in zip(paths, states):
        if s.model_config != first.model_config:
            raise MtkitError(f"{p} has another model config than {paths[0]}: they cannot be averaged")
        if s.tokenizer_fingerprint != first.tokenizer_fingerprint:
            raise MtkitError(f"{p} was trained with another tokenizer than {paths[0]}: a token id means another "
                             f"piece in each, so their weights cannot be averaged",
                             hint="average the checkpoints of one run (its checkpoints/step_*.pt)")
    mean = {}
    for name, tensor in first.weights.items():
        total = torch.zeros_like(tensor, dtype=torch.float64)
        for s in states:
            total += s.weights[name].double()
        mean[name] = (total / len(states)).to(tensor.dtype)
    last = states[-1]
    return Checkpoint(model_config=last.model_config, model=mean, tokenizer=last.tokenizer,
                      tokenizer_fingerprint=last.tokenizer_fingerprint, config=last.config, precision=last.precision,
                      **last.provenance() | {"averaged_from": [str(p) for p in paths]})


def step_checkpoints(folder: Path) -> list[Path]:
    """A run's kept step checkpoints, oldest first: a workdir's (checkpoints/step_*.pt) or a
    checkpoints folder's."""
    folder = Path(folder)
    return sorted((folder / "checkpoints" if (folder / "checkpoints").is_dir() else folder).glob("step_*.pt"))


def resolve(path: Path) -> Path:
    """A checkpoint file, or an experiment workdir (then its best checkpoint)."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / "checkpoints" / "best.pt", path / "best.pt"):
            if candidate.is_file():
                return candidate
        raise MtkitError(f"no best checkpoint in {path} (looked for checkpoints/best.pt)",
                         hint="train first (mtkit train CONFIG), or name a checkpoint file")
    return path
