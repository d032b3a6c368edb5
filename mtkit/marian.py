"""Stage `mtkit import marian`: a Marian model (an OPUS-MT model, as Hugging Face's MarianMTModel
saves it) brought into mtkit, translating exactly as it did.

A Marian Transformer is the model of model.py with four choices of its own, each an option there:
SiLU ("swish") in the feed-forward blocks, post-norm (LayerNorm after each residual sum, and no
final LayerNorm), the sinusoidal position table laid out in halves, and a bias on the output
logits. Its text side is two SentencePiece models (source.spm, target.spm) whose pieces map,
through one shared vocabulary (vocab.json), to ids that are not SentencePiece's; the Tokenizer
carries that map and Marian's special ids (</s> = 0, <unk> = 1, <pad> = the last id, which also
starts the decoder).

The weights go over one by one. Hugging Face keeps Q, K and V as three projections where
model.py has one fused Q/K/V (and one K/V for cross-attention): those are stacked row-wise, the
layout model.py splits again with chunk(). The result is an ordinary mtkit workdir
(checkpoints/best.pt): translate, eval, attention, the Explorer, export and --init take it as they
take a model mtkit trained.

transformers (pip install 'mtkit[hf]') is imported here only: it reads the folder (config.json and
the weights, in whichever format they were saved) or fetches a hub name where there is a network.
"""

import json
from dataclasses import asdict
from pathlib import Path

import torch

from mtkit import checkpoint
from mtkit.config import Config, DataSection, ModelSection
from mtkit.errors import MtkitError
from mtkit.files import ensure_writable_dir, sha256_file
from mtkit.model import ModelConfig, Transformer
from mtkit.tokenizer import Tokenizer

# model.py's name <- Hugging Face's names in each layer (several: stacked row-wise, in this order).
ENCODER_LAYER = {"attention.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                 "attention.out": ("self_attn.out_proj",), "res1.norm": ("self_attn_layer_norm",),
                 "feed_forward.inner": ("fc1",), "feed_forward.outer": ("fc2",), "res2.norm": ("final_layer_norm",)}
DECODER_LAYER = {"self_attention.qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                 "self_attention.out": ("self_attn.out_proj",), "res1.norm": ("self_attn_layer_norm",),
                 "cross_attention.q": ("encoder_attn.q_proj",),
                 "cross_attention.kv": ("encoder_attn.k_proj", "encoder_attn.v_proj"),
                 "cross_attention.out": ("encoder_attn.out_proj",), "res2.norm": ("encoder_attn_layer_norm",),
                 "feed_forward.inner": ("fc1",), "feed_forward.outer": ("fc2",), "res3.norm": ("final_layer_norm",)}
ACTIVATIONS = {"swish": "silu", "silu": "silu", "relu": "relu", "gelu": "gelu"}
FILES = ("source.spm", "target.spm", "vocab.json")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise MtkitError("importing a Marian model needs Hugging Face transformers, which is not installed",
                         hint="pip install 'mtkit[hf]' (or: pip install transformers)") from None
    return transformers


def import_marian(source: str, out: Path) -> Path:
    """Write the Marian model in folder (or hub name) `source` as the mtkit workdir `out`;
    returns its checkpoint."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MtkitError(f"-o {out} is " + ("a file" if not out.is_dir() else "a folder that holds files already"),
                         hint="name a new (or empty) folder for the imported model")
    transformers = _transformers()
    folder = _folder(source, transformers)
    hf_config = _config(folder, transformers)
    tok = _tokenizer(folder, hf_config)
    try:
        hf_model = transformers.MarianMTModel.from_pretrained(folder).eval()
    except Exception as e:  # a foreign file, read by transformers and safetensors: each raises its own types
        raise MtkitError(f"{folder}: its weights could not be read ({type(e).__name__}: {' '.join(str(e).split())[:200]})",
                         hint="a Marian folder holds model.safetensors or pytorch_model.bin beside config.json") from None
    cfg = model_config(hf_config)
    model = Transformer(cfg)
    model.load_state_dict(_weights(hf_model.state_dict(), cfg))
    languages = _languages(folder)
    config = Config.model_validate({
        "experiment": {"name": out.name, "workdir": str(out)},
        "data": languages | {"max_len": min(DataSection.model_fields["max_len"].default, cfg.max_positions - 2)},
        "tokenizer": {"type": "unigram", "joint": False, "vocab_size": tok.src_vocab_size},
        "model": {key: getattr(cfg, key) for key in ModelSection.model_fields},
        "decode": _decoding(hf_model.generation_config)})
    ensure_writable_dir(out / "checkpoints", "-o", "name a folder you can write")
    path = out / "checkpoints" / "best.pt"
    checkpoint.save(checkpoint.Checkpoint(
        model_config=asdict(cfg), model=model.state_dict(), config=config.model_dump(mode="json"),
        tokenizer=tok.protos, tokenizer_fingerprint=tok.fingerprint, precision="fp32", step=0,
        imported_from={"source": source, "format": "marian", "transformers": transformers.__version__,
                       "config_sha256": sha256_file(folder / "config.json")}), path)
    return path


def _folder(source: str, transformers) -> Path:
    """A local folder as it is; a hub name (org/name) fetched, where there is a network."""
    folder = Path(source)
    if folder.is_dir():
        return folder
    if folder.exists() or source.count("/") != 1 or source.startswith((".", "/")):
        raise MtkitError(f"{source}: no such folder", hint="name a folder that save_pretrained wrote (config.json, "
                                                           "source.spm, target.spm, vocab.json, the weights)")
    from huggingface_hub import snapshot_download  # (a dependency of transformers)

    try:
        return Path(snapshot_download(source))
    except Exception as e:  # no network, no such model, no access: the hub raises many types
        raise MtkitError(f"{source}: not a folder, and it could not be fetched from the Hugging Face hub "
                         f"({type(e).__name__})", hint="check the name and the network, or download the model "
                                                       "elsewhere and name its folder") from None


def _config(folder: Path, transformers):
    """The model's MarianConfig; MtkitError naming what mtkit's model cannot represent."""
    try:
        raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise MtkitError(f"{folder} is not a Hugging Face model folder (no readable config.json)",
                         hint="name the folder that MarianMTModel.save_pretrained wrote") from None
    if raw.get("model_type") != "marian":
        raise MtkitError(f"{folder} holds a {raw.get('model_type') or 'model of unknown type'} model, not a Marian one "
                         "(config.json: model_type)", hint="mtkit imports MarianMTModel folders (OPUS-MT models)")
    c = transformers.MarianConfig.from_pretrained(folder)
    lacks = [f"{name} ({why})" for name, broken, why in [
        ("scale_embedding: false", not c.scale_embedding, "mtkit scales embeddings by sqrt(d_model)"),
        ("share_encoder_decoder_embeddings: false", not c.share_encoder_decoder_embeddings,
         "separate source and target vocabularies"),
        (f"activation_function: {c.activation_function}", c.activation_function not in ACTIVATIONS,
         f"mtkit has {', '.join(sorted(set(ACTIVATIONS.values())))}"),
        ("normalize_before: true", getattr(c, "normalize_before", False), "pre-norm Marian models"),
        ("add_final_layer_norm: true", getattr(c, "add_final_layer_norm", False), "a final LayerNorm after post-norm"),
        ("normalize_embedding: true", getattr(c, "normalize_embedding", False), "a LayerNorm on the embeddings"),
        ("encoder and decoder of other widths", (c.encoder_attention_heads, c.encoder_ffn_dim)
         != (c.decoder_attention_heads, c.decoder_ffn_dim), "one heads and ff_dim for both sides"),
        ("decoder_start_token_id other than pad_token_id", c.decoder_start_token_id != c.pad_token_id,
         "Marian starts the decoder from <pad>"),
        (f"max_position_embeddings: {c.max_position_embeddings}", c.max_position_embeddings < 3,
         "a sentence needs room for a token and EOS, and the decoder for its start token"),
    ] if broken]
    if lacks:
        raise MtkitError(f"{folder}: mtkit's model cannot represent this Marian model: {'; '.join(lacks)}")
    return c


def _tokenizer(folder: Path, c) -> Tokenizer:
    missing = [name for name in FILES if not (folder / name).is_file()]
    if missing:
        raise MtkitError(f"{folder} has no {' and no '.join(missing)} (a Marian model's tokenizer files)",
                         hint="save the tokenizer with the model: MarianTokenizer.save_pretrained(folder)")
    try:
        tok = Tokenizer(*((folder / name).read_bytes() for name in FILES))
    except (RuntimeError, ValueError, KeyError, AttributeError, TypeError) as e:  # (vocab.json not an object too)
        raise MtkitError(f"{folder}: its tokenizer files could not be read ({type(e).__name__}: {e})",
                         hint="source.spm and target.spm are SentencePiece models; vocab.json maps pieces to "
                              "ids and has <pad>, <unk> and </s>") from None
    ours = (tok.src_vocab_size, tok.pad_id, tok.eos_id)
    theirs = (c.vocab_size, c.pad_token_id, c.eos_token_id)
    if ours != theirs:
        raise MtkitError(f"{folder}: vocab.json does not fit config.json (vocabulary size, <pad> id, </s> id: "
                         f"{ours} against {theirs})")
    return tok


def model_config(c) -> ModelConfig:
    """model.py's config for a MarianConfig."""
    return ModelConfig(
        src_vocab=c.vocab_size, tgt_vocab=c.vocab_size, d_model=c.d_model, heads=c.encoder_attention_heads,
        enc_layers=c.encoder_layers, dec_layers=c.decoder_layers, ff_dim=c.encoder_ffn_dim, dropout=c.dropout,
        attention_dropout=c.attention_dropout, activation=ACTIVATIONS[c.activation_function], norm="post",
        positions="sinusoidal-halves", max_positions=c.max_position_embeddings,
        tie_embeddings=c.tie_word_embeddings, share_src_tgt=c.tie_word_embeddings, pad_id=c.pad_token_id,
        logits_bias=True)


def _weights(hf: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """MarianMTModel's state dict -> model.py's."""
    w = {"src_embed.tokens.weight": hf["model.encoder.embed_tokens.weight"],
         "tgt_embed.tokens.weight": hf["model.decoder.embed_tokens.weight"],
         "logits_bias": hf["final_logits_bias"][0]}
    if not cfg.tie_embeddings:
        w["generator.weight"] = hf["lm_head.weight"]
    for side, count, names in (("encoder", cfg.enc_layers, ENCODER_LAYER), ("decoder", cfg.dec_layers, DECODER_LAYER)):
        for i in range(count):
            for ours, theirs in names.items():
                for kind in ("weight", "bias"):
                    w[f"{side}.{i}.{ours}.{kind}"] = torch.cat([hf[f"model.{side}.layers.{i}.{t}.{kind}"]
                                                                for t in theirs])
    return {name: tensor.float() for name, tensor in w.items()}  # (load_state_dict copies them)


def _languages(folder: Path) -> dict:
    """The direction, as MarianTokenizer.save_pretrained records it (tokenizer_config.json)."""
    try:
        saved = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        saved = {}
    src, tgt = saved.get("source_lang"), saved.get("target_lang")
    return {"src": src, "tgt": tgt} if isinstance(src, str) and isinstance(tgt, str) and src != tgt else {}


def _decoding(generation) -> dict:
    """The model's own beam size; its length penalty is another formula than mtkit's (see
    docs/importing.md), so mtkit's default alpha stays."""
    beams = getattr(generation, "num_beams", None)
    return {"beam_size": beams} if isinstance(beams, int) and beams > 1 else {}
