"""Checkpoints: one self-describing file each, written so that a kill never leaves a broken one.

A checkpoint is a dict saved with torch.save: the model config and weights (enough to translate),
and for training also the optimizer, the step, the sampler position, the RNG states, the resolved
experiment config and the tokenizer fingerprint (enough to resume exactly). The file is written
under a temporary name, flushed to disk (fsync) and renamed over the old one: a reader sees the
old file or the new one, never half of one.
"""

import os
import zipfile
from pathlib import Path

import torch

from mtkit.errors import MtkitError
from mtkit.files import fsync_dir, output_file
from mtkit.model import ModelConfig, Transformer

FORMAT = "mtkit-checkpoint"
VERSION = 1


def save(state: dict, path: Path) -> None:
    path = Path(path)
    try:
        with output_file(path, durable=True) as tmp, open(tmp, "wb") as f:
            torch.save({"format": FORMAT, "version": VERSION, **state}, f)
    except OSError as e:  # a full disk, a read-only folder: the old file is still whole
        raise MtkitError(f"could not write the checkpoint {path}: {e.strerror or e}",
                         hint="free disk space or fix the folder's permissions, then run again; the checkpoints "
                              "already there are intact (training goes on from last.pt with --resume)") from e


def link(src: Path, dst: Path) -> None:
    """Make `dst` name the same file as `src` (a hard link: no copy, no second write), atomically."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:  # a file system without hard links: copy (still atomic through the rename)
        save(load(src), tmp)
    os.replace(tmp, dst)
    fsync_dir(dst.parent)


def load(path: Path, mmap: bool = False) -> dict:
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
    return state


def weights(state: dict) -> dict:
    """The weights to translate with: the moving average when training kept one (train.ema), else
    the trained weights ("model", which resuming continues from)."""
    return state["ema"] if "ema" in state else state["model"]


def build_model(state: dict) -> Transformer:
    """The model a checkpoint describes, with its (translation) weights, in eval mode."""
    model = Transformer(ModelConfig(**state["model_config"]))
    model.load_state_dict(weights(state))
    return model.eval()


def average(paths: list[Path]) -> dict:
    """A checkpoint whose weights are the element-wise mean of the given checkpoints' (translation)
    weights (same model config required); config and tokenizer fingerprint come from the last one."""
    if not paths:
        raise MtkitError("average needs at least one checkpoint")
    states = [load(p) for p in paths]
    first = states[0]
    for p, s in zip(paths, states):
        if s["model_config"] != first["model_config"]:
            raise MtkitError(f"{p} has another model config than {paths[0]}: they cannot be averaged")
        if s.get("tokenizer_fingerprint") != first.get("tokenizer_fingerprint"):
            raise MtkitError(f"{p} was trained with another tokenizer than {paths[0]}: a token id means another "
                             f"piece in each, so their weights cannot be averaged",
                             hint="average the checkpoints of one run (its checkpoints/step_*.pt)")
    mean = {}
    for name, tensor in weights(first).items():
        total = torch.zeros_like(tensor, dtype=torch.float64)
        for s in states:
            total += weights(s)[name].double()
        mean[name] = (total / len(states)).to(tensor.dtype)
    last = states[-1]
    kept = ("model_config", "config", "tokenizer", "tokenizer_fingerprint", "precision", *PROVENANCE)
    return {key: last[key] for key in kept if key in last} | {
        "model": mean, "averaged_from": [str(p) for p in paths]}


# What a checkpoint says of where its weights came from: kept by average and export.
PROVENANCE = ("step", "init_from", "imported_from", "averaged_from")


def provenance(state: dict) -> dict:
    return {key: state[key] for key in PROVENANCE if state.get(key) is not None}


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
