"""Stage `mtkit translate`, mtkit's own engine: a checkpoint's model searching with search.py,
and the cross-attention of what it wrote. The text side and the line I/O (one output line per
input line, always) are engine.py's, shared with the CTranslate2 engine.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from mtkit import checkpoint, devices, fast
from mtkit.config import DecodeSection
from mtkit.engine import TextSide, check_options
from mtkit.errors import MtkitError
from mtkit.search import Hypothesis, Trace, search_sorted


class Translator(TextSide):
    """A trained model with its tokenizer: everything needed comes from one checkpoint file."""

    def __init__(self, state: checkpoint.Checkpoint, device: str = "cpu", precision: str = "auto"):
        """device: "cpu" or "cuda:N"; precision: auto, fp32, bf16 or fp16 (devices.decode_precision)."""
        tokenizer = state.make_tokenizer()
        try:
            self.model = state.build_model()
        except (TypeError, RuntimeError) as e:  # unknown config keys; weights of another shape
            raise MtkitError(f"{state.path}: its weights do not fit its model config ({' '.join(str(e).split())[:160]})",
                             hint="the file was altered or comes from another program; use another checkpoint"
                             ) from None
        self.trained_precision = state.precision
        self.init_from = state.init_from  # the model it was fine-tuned from (train.init), if any
        self.imported_from = state.imported_from  # where mtkit import found it, if it did
        super().__init__(tokenizer, state.config, state.path, devices.decode_precision(
            precision, device, self.trained_precision, devices.this_machine(device)), torch.device(device))
        self.model = self.model.to(self.device)  # the one place the model moves

    @classmethod
    def load(cls, path: Path, device: str = "auto", precision: str = "auto") -> "Translator":
        """A checkpoint file or a workdir (its best.pt). device: auto (a GPU when there is one),
        cpu, cuda or mps. precision: auto (the training precision where the device does it natively,
        else fp32), fp32, bf16 or fp16 (GPU only)."""
        if precision not in ("auto", "fp32", "bf16", "fp16"):
            raise MtkitError(f"the precision {precision!r}: auto, fp32, bf16 or fp16", setting="precision")
        path = checkpoint.resolve(path)
        fast.limit_kernel_caches()
        fast.keep_freed_memory()
        return cls(checkpoint.load(path, mmap=True), str(devices.open_device(device, option="device")), precision)

    @property
    def max_source_tokens(self) -> int:
        return self.model.cfg.max_positions - 1  # room for EOS

    def attention(self, line: str, target_lang: str | None = None, **settings) -> "AttentionMap":
        """Translate one sentence and return the cross-attention that wrote its best translation
        (the one the search itself used, collected while it ran)."""
        if not isinstance(line, str):
            raise TypeError(f"attention() takes one sentence (str), not {type(line).__name__}")
        ids = self.encode([line], target_lang)[0]
        if not ids:
            raise MtkitError("nothing to translate: the sentence is empty")
        return self.attention_map(line, ids, self.search([ids], self.options(**settings), attention=True)[0][0])

    def attention_map(self, line: str, ids: list[int], hyp: Hypothesis) -> "AttentionMap":
        """The map of hypothesis `hyp` of source `ids` (cut, as the search cuts it, to the positions)."""
        if not isinstance(hyp, Hypothesis) or hyp.attention is None:
            raise TypeError("attention_map needs a Hypothesis found by search(..., attention=True)")
        pieces = self.tokenizer.src_pieces(ids[:self.max_source_tokens]) + ["</s>"]
        out = self.tokenizer.tgt_pieces(hyp.tokens) + ["</s>"]
        return AttentionMap(line, self.tokenizer.decode_tgt([hyp.tokens])[0], hyp.score, pieces, out,
                            hyp.attention.float().cpu())

    def search(self, ids: list[list[int]], opts: DecodeSection, on_sentences=None, *, attention: bool = False,
               trace: Trace | None = None) -> list[list[Hypothesis]]:
        """Source ids -> for each sentence its hypotheses, best first (none for an empty one).
        on_sentences(n): progress, as each batch is done (the empty ones first). mtkit's engine
        only: attention, each hypothesis' cross-attention (attention_map); trace, the search of one
        sentence recorded (search.Trace, the Explorer's)."""
        check_options(opts, on_sentences)
        todo = [i for i, x in enumerate(ids) if x]
        if on_sentences is not None and len(todo) < len(ids):
            on_sentences(len(ids) - len(todo))
        with devices.autocast(self.device, self.precision):
            found = search_sorted(self.model, [ids[i] for i in todo], beam_size=opts.beam_size, alpha=opts.alpha,
                                  n_best=opts.n_best, max_len_a=opts.max_len_a, max_len_b=opts.max_len_b,
                                  max_tokens=opts.max_tokens, pad_id=self.tokenizer.pad_id,
                                  bos_id=self.tokenizer.bos_id, eos_id=self.tokenizer.eos_id,
                                  attention=attention, trace=trace, on_batch=on_sentences)
        results: list[list[Hypothesis]] = [[] for _ in ids]
        for i, hyps in zip(todo, found):
            results[i] = hyps
        return results

    @torch.no_grad()
    def read(self, ids: list[int], target: list[int]) -> torch.Tensor:
        """Teacher forcing, as in training: the model reads source `ids` and target `target` and
        gives, at each position, the log-probabilities of the next token (len(target) + 1, V)."""
        for name, seq, size in (("source", ids, self.model.cfg.src_vocab), ("target", target, self.model.cfg.tgt_vocab)):
            if not isinstance(seq, list) or not all(isinstance(x, int) for x in seq):
                raise TypeError(f"read takes lists of token ids (int), not {type(seq).__name__} for the {name}")
            if any(not 0 <= x < size for x in seq):
                raise ValueError(f"{name} id {next(x for x in seq if not 0 <= x < size)} is not in the vocabulary "
                                 f"(0..{size - 1})")
        tok = self.tokenizer
        src = torch.tensor([ids[:self.max_source_tokens] + [tok.eos_id]], device=self.device)
        with devices.autocast(self.device, self.precision):
            logits = self.model(src, torch.tensor([[tok.bos_id] + target], device=self.device))
        return logits[0].float().log_softmax(dim=-1).cpu()


@dataclass
class AttentionMap:
    """Where the decoder looked in the source while it wrote one translation."""

    line: str            # the source sentence as given
    translation: str     # its (best) translation, detokenized
    score: float         # its log-probability / the length penalty (Translator.translate_nbest)
    source: list[str]    # source subwords, then "</s>"
    target: list[str]    # output subwords, then "</s>"
    weights: torch.Tensor  # (len(target), layers, heads, len(source)): each row a distribution

    def strongest(self, layer: int = -1) -> list[tuple[str, str, float]]:
        """For each target subword, the source subword it attends to most (the heads of `layer`
        averaged) and that weight."""
        mean = self.weights[:, layer].mean(dim=1)  # (T, S)
        best = mean.max(dim=1)
        return [(t, self.source[j], w) for t, j, w in zip(self.target, best.indices.tolist(), best.values.tolist())]


