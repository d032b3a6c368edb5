"""CTranslate2: export a checkpoint for fast deployment, and translate with the export.

CTranslate2 (an optional extra: pip install 'mtkit[ct2]') is a C++ inference engine for
Transformers. Its TransformerSpec describes the same model as model.py, weight by weight, so the
export only hands each tensor to its place: the fused Q/K/V and K/V projections are laid out the
same way ([q; k; v] rows), embeddings are scaled by sqrt(D) in both, and the position table goes
over as it is (sinusoidal or learned). The folder also keeps the SentencePiece model(s) and the
experiment's decoding settings, so it translates on its own.

What differs from mtkit's own search: CTranslate2 normalizes beam scores by length^alpha, not by
GNMT's ((5 + length) / 6)^alpha, so beam outputs can differ where two hypotheses are close.
Greedy search does the same computation, in float32 up to rounding (told, as mtkit's search
is, never to write padding or the start token, and that an empty output may be the best).
"""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch

from mtkit import checkpoint
from mtkit.config import DecodeSection
from mtkit.devices import Machine, device_for
from mtkit.engine import TextSide, check_options
from mtkit.errors import MtkitError
from mtkit.model import ModelConfig, sinusoidal_positions
from mtkit.search import Hypothesis, length_penalty, max_lengths
from mtkit.tokenizer import Tokenizer

SETTINGS = "mtkit.json"


def _ctranslate2():
    try:
        import ctranslate2
    except ImportError:
        raise MtkitError("CTranslate2 is not installed", hint="pip install 'mtkit[ct2]' (or: pip install ctranslate2)"
                         ) from None
    return ctranslate2


def export_ctranslate2(path: Path, out: Path, quantization: str | None = None) -> Path:
    """Write the checkpoint (or a workdir's best.pt) as a CTranslate2 model folder."""
    ctranslate2 = _ctranslate2()
    out = Path(os.path.abspath(out))  # `-o ""` or `-o .` is the current folder, which has a name
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / SETTINGS).is_file())):
        raise MtkitError(f"the output {out} is " + ("a file" if not out.is_dir() else "a folder that holds other files"),
                         hint="name a new folder (or an earlier export, which is replaced)", setting="output")
    path = checkpoint.resolve(path)
    state = checkpoint.load(path)
    cfg = ModelConfig(**state.model_config)
    if cfg.no_residual_layer:
        raise MtkitError(f"{path} has an encoder layer without its attention residual (model.no_residual_layer: "
                         f"{cfg.no_residual_layer}), which CTranslate2's Transformer cannot express",
                         hint="translate it with mtkit itself (mtkit translate, mtkit serve)")
    spec = _spec(cfg, {name: t.float().numpy() for name, t in state.weights.items()})
    tok = state.make_tokenizer()
    spec.register_source_vocabulary(tok.src_pieces(range(tok.src_vocab_size)))
    spec.register_target_vocabulary(tok.tgt_pieces(range(tok.tgt_vocab_size)))
    # The special tokens by name (a Marian model's decoder starts from <pad>, and it has no <s>).
    start, end, unknown = tok.tgt_pieces([tok.bos_id, tok.eos_id, tok.unk_id])
    spec.config.decoder_start_token, spec.config.bos_token, spec.config.eos_token, spec.config.unk_token = \
        start, start, end, unknown
    spec.validate()
    try:
        spec.optimize(quantization=quantization)
    except ValueError as e:  # CTranslate2 lists the types it accepts
        raise MtkitError(f"the quantization {quantization}: {e}", setting="quantization") from None
    # Written beside the target and renamed when whole: no half-written export is left behind.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        spec.save(str(tmp))
        tok.save(tmp)
        (tmp / SETTINGS).write_text(json.dumps({
            "checkpoint": str(path), "max_positions": cfg.max_positions, "config": state.config,
            "provenance": state.provenance(), "ctranslate2": ctranslate2.__version__}, indent=2) + "\n",
            encoding="utf-8")
        if out.exists():  # an earlier export (checked above)
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _spec(cfg: ModelConfig, w: dict[str, np.ndarray]):
    """CTranslate2's TransformerSpec with every weight of model.py in its place."""
    from ctranslate2.specs import common_spec, transformer_spec

    pre = cfg.norm == "pre"
    spec = transformer_spec.TransformerSpec.from_config(
        (cfg.enc_layers, cfg.dec_layers), cfg.heads, pre_norm=pre, no_final_norm=not pre,
        activation={"relu": common_spec.Activation.RELU, "gelu": common_spec.Activation.GELU,
                    "silu": common_spec.Activation.SWISH}[cfg.activation])

    def linear(target, name: str) -> None:
        target.weight = w[f"{name}.weight"]
        if f"{name}.bias" in w:
            target.bias = w[f"{name}.bias"]

    def norm(target, name: str) -> None:
        target.gamma, target.beta = w[f"{name}.weight"], w[f"{name}.bias"]

    def positions(side: str) -> np.ndarray:
        if cfg.positions == "learned":
            return w[f"{side}_embed.learned.weight"]
        return sinusoidal_positions(cfg.max_positions, cfg.d_model, halves=cfg.positions == "sinusoidal-halves").numpy()

    def sublayer(target, linears: list[str], norm_name: str) -> None:
        """An attention block (linear = [fused projections..., out]) or a feed-forward block."""
        for spot, name in zip(target.linear if hasattr(target, "linear") else [target.linear_0, target.linear_1],
                              linears):
            linear(spot, name)
        norm(target.layer_norm, norm_name)

    enc, dec = spec.encoder, spec.decoder
    enc.embeddings[0].weight = w["src_embed.tokens.weight"]
    enc.position_encodings.encodings = positions("src")
    for i, layer in enumerate(enc.layer):
        p = f"encoder.{i}"
        sublayer(layer.self_attention, [f"{p}.attention.qkv", f"{p}.attention.out"], f"{p}.res1.norm")
        sublayer(layer.ffn, [f"{p}.feed_forward.inner", f"{p}.feed_forward.outer"], f"{p}.res2.norm")
    dec.embeddings.weight = w["tgt_embed.tokens.weight"]
    dec.position_encodings.encodings = positions("tgt")
    for i, layer in enumerate(dec.layer):
        p = f"decoder.{i}"
        sublayer(layer.self_attention, [f"{p}.self_attention.qkv", f"{p}.self_attention.out"], f"{p}.res1.norm")
        sublayer(layer.attention, [f"{p}.cross_attention.{x}" for x in ("q", "kv", "out")], f"{p}.res2.norm")
        sublayer(layer.ffn, [f"{p}.feed_forward.inner", f"{p}.feed_forward.outer"], f"{p}.res3.norm")
    if pre:
        norm(enc.layer_norm, "enc_norm")
        norm(dec.layer_norm, "dec_norm")
    dec.projection.weight = w["tgt_embed.tokens.weight"] if cfg.tie_embeddings else w["generator.weight"]
    if cfg.logits_bias:
        dec.projection.bias = w["logits_bias"]
    return spec


class CT2Translator(TextSide):
    """An engine whose search runs in CTranslate2: the same text side and line I/O as mtkit's."""

    def __init__(self, folder: Path, compute_type: str = "default", device: str = "auto"):
        """device: auto (a CUDA GPU when CTranslate2 sees one), cpu or cuda."""
        ctranslate2 = _ctranslate2()
        folder = Path(folder)
        settings = json.loads((folder / SETTINGS).read_text(encoding="utf-8"))
        if device == "mps":
            raise MtkitError("CTranslate2 computes on CPUs and CUDA GPUs, not on Apple's GPU",
                             hint="use --device cpu, or mtkit's engine (drop --engine ctranslate2)", setting="device")
        place = device_for(device, Machine(gpus=ctranslate2.get_cuda_device_count()), option="device")
        super().__init__(Tokenizer.load(folder), settings.get("config", {}), folder, compute_type, place)
        # As many threads as torch uses (the cores): CTranslate2's default of 4 oversubscribes 2 cores.
        try:
            self.engine = ctranslate2.Translator(str(folder), device=place.split(":")[0],
                                                 device_index=int(place.partition(":")[2] or 0),
                                                 compute_type=compute_type, intra_threads=torch.get_num_threads())
        except ValueError as e:  # an unknown compute type
            raise MtkitError(f"the compute type {compute_type}: {e}", hint="e.g. int8, float32 or default",
                             setting="compute_type") from None
        self.positions = settings["max_positions"]
        # As mtkit's search: padding and the start token are never written (CTranslate2 would).
        self.never = [[piece] for piece in dict.fromkeys(self.tokenizer.tgt_pieces([self.tokenizer.pad_id,
                                                                                  self.tokenizer.bos_id]))]

    @classmethod
    def load(cls, path: Path, compute_type: str = "default", device: str = "auto") -> "CT2Translator":
        if not (Path(path) / SETTINGS).is_file():
            raise MtkitError(f"{path} is not a CTranslate2 export of mtkit (no {SETTINGS})",
                             hint="export one: mtkit export CHECKPOINT --format ctranslate2 -o DIR")
        return cls(Path(path), compute_type, device)

    @property
    def max_source_tokens(self) -> int:
        return self.positions - 1

    def search(self, ids: list[list[int]], opts: DecodeSection, on_sentences=None) -> list[list[Hypothesis]]:
        check_options(opts, on_sentences)
        results: list[list[Hypothesis]] = [[] for _ in ids]
        # mtkit's output limit depends on each source's length; CTranslate2 takes one limit per
        # call, so sentences are grouped by their limit (a handful of calls).
        groups: dict[int, list[int]] = {}
        for i, x in enumerate(ids):
            if x:
                n = min(len(x), self.max_source_tokens) + 1  # with EOS, as search_sorted counts
                limit = int(max_lengths(torch.tensor([n]), opts.max_len_a, opts.max_len_b, self.max_source_tokens))
                groups.setdefault(limit, []).append(i)
        for limit, rows in groups.items():
            sources = [self.tokenizer.src_pieces(ids[i][:self.max_source_tokens] + [self.tokenizer.eos_id])
                       for i in rows]
            found = self.engine.translate_batch(
                sources, beam_size=opts.beam_size, num_hypotheses=opts.n_best, length_penalty=opts.alpha,
                max_decoding_length=limit, return_scores=True, max_batch_size=opts.max_tokens,
                batch_type="tokens", min_decoding_length=0, suppress_sequences=self.never)
            for i, result in zip(rows, found):
                results[i] = self._rescored(result.hypotheses, result.scores, limit, opts.alpha)
        if on_sentences is not None:  # CTranslate2 searches a whole group in one call
            on_sentences(len(ids))
        return results

    def _rescored(self, hypotheses: list[list[str]], scores: list[float], limit: int,
                  alpha: float) -> list[Hypothesis]:
        """mtkit's scoring rule for CTranslate2's hypotheses, so --nbest scores of one model agree
        across engines. CTranslate2 divides the log-probability by length ** alpha, counting EOS
        unless the output was cut at the limit (where mtkit forces EOS at no cost): multiplying back
        recovers the log-probability, which is then divided by GNMT's penalty, EOS counted, as
        search.py does. The n-best are re-sorted by that score."""
        found = []
        for tokens, score in zip(hypotheses, scores):
            length = len(tokens) if len(tokens) >= limit else len(tokens) + 1
            log_prob = score * length ** alpha
            found.append(Hypothesis(self.tokenizer.tgt_ids(tokens),
                                    log_prob / length_penalty(len(tokens) + 1, alpha), log_prob))
        return sorted(found, key=lambda h: -h.score)
