"""Starting from a trained model: train.init (`mtkit train CONFIG --init CKPT|WORKDIR`).

A new run takes over the model's tokenizer and shape and starts from its weights; the optimizer,
the schedule, the sampler and the progress start fresh, as in any new run. The tokenizer stage
copies the inherited tokenizer into the workdir (so prepare encodes the new data with it),
training loads the weights, and every checkpoint of the run records where it started
(`init_from`), which `mtkit serve` and `mtkit translate` show.
"""

from pathlib import Path

import torch

from mtkit import checkpoint
from mtkit.config import Config, DataSection
from mtkit.errors import MtkitError
from mtkit.files import sha256_file

# What the weights fix: a config may repeat these keys, but not change them.
SHAPE = ("d_model", "heads", "enc_layers", "dec_layers", "ff_dim", "activation", "norm", "positions",
         "tie_embeddings", "logits_bias", "max_positions")
VOCABULARY = ("type", "joint", "vocab_size")


def parent(cfg: Config) -> Path | None:
    """The checkpoint file the run starts from (train.init: a file, or a workdir's best.pt)."""
    return checkpoint.resolve(cfg.train.init) if cfg.train.init else None


def load(cfg: Config) -> checkpoint.Checkpoint:
    state = checkpoint.load(parent(cfg), mmap=True)
    state.make_tokenizer()  # (its vocabulary is taken over)
    return state


def adopt(cfg: Config) -> Config:
    """The config with the shape and vocabulary of the model it starts from. A key the config sets
    to another value is an error naming it: the weights could not be loaded into that model."""
    if not cfg.train.init:
        return cfg
    state = load(cfg)
    shape = state.model_config
    vocabulary = state.config.get("tokenizer", {})
    clashes = [f"model.{key} is {getattr(cfg.model, key)!r} (the model's: {shape[key]!r})"
               for key in SHAPE if key in cfg.model.model_fields_set and getattr(cfg.model, key) != shape[key]]
    clashes += [f"tokenizer.{key} is {getattr(cfg.tokenizer, key)!r} (the model's: {vocabulary[key]!r})"
                for key in VOCABULARY if key in cfg.tokenizer.model_fields_set and key in vocabulary
                and getattr(cfg.tokenizer, key) != vocabulary[key]]
    before = DataSection.model_validate(state.config["data"]) if state.config.get("data") else None
    if before and (before.tagged != cfg.data.tagged or before.tagged and not set(cfg.data.targets) <= set(before.targets)):
        raise MtkitError(f"train.init starts from a model that translates into {', '.join(map(str, before.targets))}"
                         f"{' (told which by a tag)' if before.tagged else ''}; this config's data go into "
                         f"{', '.join(map(str, cfg.data.targets))}: the model has no tag for that",
                         hint="fine-tune on directions into the model's own target languages (all of them, "
                              "for a model of several), or train from scratch")
    if shape["max_positions"] < cfg.data.max_len + 2:  # (the config's own rule, for the model's positions)
        clashes.append(f"data.max_len is {cfg.data.max_len} (the model holds {shape['max_positions'] - 2} tokens "
                       "and BOS and EOS)")
    if clashes:
        raise MtkitError(f"train.init starts from {parent(cfg)}, but this config asks for another model: "
                         + "; ".join(clashes),
                         hint="remove those keys (the model's own are taken over), or train from scratch without --init")
    return cfg.model_copy(update={
        "model": cfg.model.model_copy(update={key: shape[key] for key in SHAPE}),
        "tokenizer": cfg.tokenizer.model_copy(update={k: v for k, v in vocabulary.items() if k in VOCABULARY})})


def record(cfg: Config, state: checkpoint.Checkpoint) -> dict:
    """What a checkpoint of the run says of where it started: the parent's path, SHA-256 and step,
    and where the parent itself started (a chain back to the first run)."""
    path = parent(cfg)
    imported = {"imported_from": state.imported_from} if state.imported_from else {}  # mtkit import
    return {"path": str(path), "sha256": sha256_file(path), "step": state.step,
            "init_from": state.init_from, **imported}


def describe(init_from: dict | None) -> str:
    """'path (step N)', then its own parent, and so on: the chain a model was fine-tuned along
    (back to the model mtkit import brought in, if it started there)."""
    chain = []
    while init_from:
        imported = init_from.get("imported_from")
        chain.append(f"{init_from['path']} (" + (f"imported from {imported['source']})" if imported else
                                                 f"step {init_from.get('step')})"))
        init_from = init_from.get("init_from")
    return " <- ".join(chain)


# Each part train.freeze can name, as the prefixes of its parameters' names in model.py.
PARTS = {"embeddings": ("src_embed.", "tgt_embed.", "generator.", "logits_bias"), "encoder": ("encoder.", "enc_norm."),
         "decoder": ("decoder.", "dec_norm.")}


def start(cfg: Config, model: torch.nn.Module, model_config: dict, tokenizer_fingerprint: str) -> dict:
    """Load the weights of the model the run starts from (the moving average, if it kept one)
    into `model`; returns what the run's checkpoints record of it."""
    state = load(cfg)
    if state.tokenizer_fingerprint != tokenizer_fingerprint:
        raise MtkitError(f"the prepared data were encoded with another tokenizer than {parent(cfg)}'s (train.init)",
                         hint="encode them with it first: mtkit tokenizer train CONFIG, then mtkit prepare CONFIG "
                              "(or mtkit run CONFIG)")
    theirs = state.model_config
    differs = [f"{key}: {theirs.get(key)!r}, not {value!r}" for key, value in model_config.items()
               if key not in ("dropout", "attention_dropout") and theirs.get(key) != value]
    if differs:
        raise MtkitError(f"train.init: {parent(cfg)} is another model than this config's ({', '.join(differs)})",
                         hint="start from a checkpoint whose tokenizer and shape this run takes over")
    model.load_state_dict(state.weights)
    return record(cfg, state)


def freeze(model: torch.nn.Module, parts: tuple[str, ...]) -> None:
    """Keep the named parts (train.freeze) as they are: no gradient, so no update."""
    for name, weight in model.named_parameters():
        if any(name.startswith(prefix) for part in parts for prefix in PARTS[part]):
            weight.requires_grad_(False)
