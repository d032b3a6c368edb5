"""Validation while training: the loss and perplexity on the whole valid split, and BLEU of greedy
translations of a fixed sample of it.

BLEU is scored per direction (one, for a single pair) on a fixed sample of its lines, with the
tokenizer of its target language (13a would score Chinese as one word a line), checked when the
sample is drawn: a missing MeCab is said before training, not at its first validation. With
several directions their mean decides. One sentence of each direction's sample, of its median
length, is shown as the model translates it at every validation.
"""

import math
import time
from collections.abc import Callable

import numpy as np
import torch

from mtkit import devices
from mtkit.config import DecodeSection
from mtkit.data import Batch, TokenArray, length_batches, make_batch
from mtkit.loss import summed_nll
from mtkit.metrics import bleu, bleu_tokenizer, check_tokenizer
from mtkit.model import Transformer
from mtkit.search import search_sorted
from mtkit.tokenizer import Tokenizer


class Validation:
    def __init__(self, src: TokenArray, tgt: TokenArray, pairs: list[tuple[str, str]],
                 ranges: dict[str, list[int]], *, sample: int, seed: int, tokenize: str, max_tokens: int,
                 tok: Tokenizer, decode: DecodeSection, max_positions: int, place: Callable[[Batch], Batch]):
        """src, tgt: the prepared valid split; pairs: its raw (source, reference) lines; ranges: the
        lines of each direction ({"de-en": [0, n]}); sample: how many lines BLEU translates (in
        all); seed: which; tokenize: eval.tokenize; place: a batch moved to the training device."""
        self.src, self.tgt, self.tok, self.decode = src, tgt, tok, decode
        self.max_positions, self.place = max_positions, place
        self.references = [reference for _, reference in pairs]
        rng = np.random.default_rng(seed)
        self.groups = {}
        for name, (a, b) in ranges.items():
            share = sample if len(ranges) == 1 else max(1, round(sample * (b - a) / len(src)))
            ix = a + (np.sort(rng.choice(b - a, share, replace=False)) if 0 < share < b - a else np.arange(b - a))
            self.groups[name] = (ix, check_tokenizer(bleu_tokenizer(tokenize, name.split("-")[1])))
        self.sample = np.concatenate([ix for ix, _ in self.groups.values()])
        self.examples = {name: (i := int(ix[np.argsort(src.lengths[ix], kind="stable")[len(ix) // 2]]), pairs[i][0])
                         for name, (ix, _) in self.groups.items()}
        cost = np.maximum(src.lengths, tgt.lengths) + 1
        self.batches = length_batches(np.argsort(cost, kind="stable"), cost, max_tokens)

    def batch(self, indices: np.ndarray) -> Batch:
        return self.place(make_batch(self.src, self.tgt, indices, pad_id=self.tok.pad_id, bos_id=self.tok.bos_id,
                                     eos_id=self.tok.eos_id, max_positions=self.max_positions))

    @torch.no_grad()
    def __call__(self, model: Transformer, device: torch.device, precision: str) -> dict:
        """Validate `model` in `precision` (it is left in the mode it was in)."""
        was_training = model.training
        model.eval()
        start = time.perf_counter()
        loss_sum, n_tokens = 0.0, 0
        with devices.autocast(device, precision):
            for ix in self.batches:
                b = self.batch(ix)
                states = model(b.src, b.tgt_in, project=False)
                loss_sum += summed_nll(states, *model.output_layer(), b.tgt_out, self.tok.pad_id)
                n_tokens += b.n_tgt_tokens
            hyps = self.greedy(model, self.sample)
        model.train(was_training)
        found = dict(zip(self.sample.tolist(), hyps))
        scores = {}
        for name, (ix, tokenize) in self.groups.items():  # several directions: their mean decides
            scores[name], signature = bleu([found[i] for i in ix], [self.references[i] for i in ix], tokenize)
        loss = loss_sum / n_tokens
        several = {"bleu_by_direction": {k: round(v, 2) for k, v in scores.items()}} if len(scores) > 1 else {}
        examples = {name: {"source": source, "translation": found[i], "reference": self.references[i]}
                    for name, (i, source) in self.examples.items()}
        return {"loss": round(loss, 4), "ppl": round(math.exp(min(loss, 50)), 2),
                "bleu": round(sum(scores.values()) / len(scores), 2), **several,
                "sentences": len(self.sample), "seconds": round(time.perf_counter() - start, 1),
                "signature": signature, "examples": examples}

    def greedy(self, model: Transformer, indices: np.ndarray) -> list[str]:
        d = self.decode
        found = search_sorted(model, [self.src[i] for i in indices], beam_size=1, alpha=0.0, n_best=1,
                              max_len_a=d.max_len_a, max_len_b=d.max_len_b, max_tokens=d.max_tokens,
                              pad_id=self.tok.pad_id, bos_id=self.tok.bos_id, eos_id=self.tok.eos_id)
        return self.tok.decode_tgt([hyps[0].tokens for hyps in found])
