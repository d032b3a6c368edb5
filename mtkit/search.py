"""Search: turning the model's next-token distributions into a translation.

The decoder gives, for a prefix, a distribution over the next token. Greedy search takes the most
likely token at every step. It is fast and often good, but it can never take back a choice: a
token that looks best now may lead to a poor sentence. Beam search keeps the K best prefixes
("beams") alive: at every step each beam is extended by every token, and the K best extensions
by total log-probability survive. Finished hypotheses (ending in EOS) are scored with a length
penalty, because a sum of log-probabilities favours short outputs.

Both only call model.encode and model.decode, and decode incrementally: the DecoderCache keeps
each layer's keys/values, so each step feeds just the newest token. Beam search folds the K beams
of each sentence into the batch (B*K rows) and does all of its bookkeeping with tensor ops.

With attention=True both also keep, for every hypothesis, the cross-attention that chose each of
its tokens: where the decoder looked in the source. It is collected as the search runs and moves
with the beams (a surviving beam inherits its parent's), so it is exactly what produced that
hypothesis (tested against a forced decode of it).
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from mtkit.data import length_batches, pad_rows
from mtkit.model import DecoderCache, Transformer


def max_lengths(src_lengths: Tensor, a: float, b: int, cap: int) -> Tensor:
    """How many tokens each output may have (EOS not counted): a * source length + b, within the
    model's positions."""
    return (src_lengths.float() * a + b).long().clamp(min=1, max=cap)


def step_attention(weights: list[Tensor]) -> Tensor:
    """decode()'s per-layer cross-attention of the newest position, (N, H, 1, S) each ->
    (N, L, H, S)."""
    return torch.stack([w[:, :, -1] for w in weights], dim=1)


@torch.no_grad()
def greedy(model: Transformer, src: Tensor, *, bos_id: int, eos_id: int, max_len: Tensor,
           alpha: float = 0.0, attention: bool = False) -> list["Hypothesis"]:
    """src (B, S) padded source ids (with EOS) -> for each sentence its output (no BOS/EOS).

    max_len (B,): the most tokens a sentence may get before EOS is forced. alpha only sets the
    score (scored as beam search scores, so that greedy and beam scores compare); greedy never
    weighs lengths."""
    memory = model.encode(src)
    b = src.size(0)
    last = torch.full((b, 1), bos_id, dtype=torch.long, device=src.device)
    finished = torch.zeros(b, dtype=torch.bool, device=src.device)
    log_prob = torch.zeros(b, device=src.device)
    outputs, looked = [], []
    cache = DecoderCache()
    for step in range(int(max_len.max()) + 1):
        weights = [] if attention else None
        logits, cache = model.decode(last, memory, cache=cache, attention=weights)  # (B, 1, V): the newest token
        if attention:
            looked.append(step_attention(weights))
        log_probs = logits[:, -1].float().log_softmax(dim=-1)
        best = log_probs.argmax(dim=-1)
        best = torch.where(step >= max_len, eos_id, best)  # out of room: end the sentence here
        best = best.masked_fill(finished, eos_id)
        log_prob += log_probs.gather(1, best[:, None])[:, 0].masked_fill(finished | (step >= max_len), 0.0)
        outputs.append(best)
        finished |= best.eq(eos_id)
        if finished.all():
            break
        last = best[:, None]
    result = []
    src_lengths = (~memory.src_pad).sum(dim=1).tolist()
    looked = torch.stack(looked, dim=1) if attention else None  # (B, steps, L, H, S)
    for i, (row, lp) in enumerate(zip(torch.stack(outputs, dim=1).tolist(), log_prob.tolist())):
        tokens = row[:row.index(eos_id)] if eos_id in row else row
        attn = looked[i, :len(tokens) + 1, :, :, :src_lengths[i]] if attention else None
        result.append(Hypothesis(tokens, lp / length_penalty(len(tokens) + 1.0, alpha), lp, attn))
    return result


def length_penalty(length: Tensor | float, alpha: float) -> Tensor | float:
    """GNMT's ((5 + length) / 6) ** alpha (Wu et al. 2016): a hypothesis' log-probability is
    divided by this, so longer outputs are not punished just for having more terms. alpha = 0
    turns it off; larger alpha favours longer outputs."""
    return ((5.0 + length) / 6.0) ** alpha


@dataclass
class Hypothesis:
    tokens: list[int]  # output ids, without BOS and EOS
    score: float       # log_prob / length_penalty(len(tokens) + 1, alpha): what beam search ranks
    log_prob: float    # sum of the token log-probabilities (EOS included)
    # With attention=True: the cross-attention that chose each output token and the final EOS,
    # (len(tokens) + 1, layers, heads, source length + 1), over the source tokens and its EOS.
    attention: Tensor | None = None


@torch.no_grad()
def beam_search(model: Transformer, src: Tensor, *, beam_size: int, bos_id: int, eos_id: int, max_len: Tensor,
                alpha: float = 0.6, n_best: int = 1, attention: bool = False) -> list[list[Hypothesis]]:
    """src (B, S) -> for each sentence its n_best hypotheses, best first.

    Every step: add each beam's score to its next-token log-probabilities, (B, K, V); flatten to
    (B, K*V) and take the top 2K, so that even if K of them end in EOS, K live ones remain. EOS
    candidates ranked within the first K are finished hypotheses; the best K others live on. A
    sentence is done once it has K finished hypotheses or reaches its max_len (EOS is forced).
    """
    b, k = src.size(0), beam_size
    device = src.device
    memory = model.encode(src)  # (B, S, D): the K beams of a sentence share it (see CrossAttention)
    cache = DecoderCache()
    longest = int(max_len.max()) + 1
    # The finished hypotheses of every sentence: fixed-size buffers, K per sentence, best first.
    fin_scores = torch.full((b, k), float("-inf"), device=device)  # log-prob / length penalty
    fin_log_probs = torch.zeros(b, k, device=device)
    fin_tokens = torch.full((b, k, longest), eos_id, dtype=torch.long, device=device)
    fin_count = torch.zeros(b, dtype=torch.long, device=device)
    # The sentences still searching (A of them) and their beams: A*K rows of history and cache.
    alive = torch.arange(b, device=device)  # (A,) their numbers in the batch
    history = torch.full((b * k, 1), bos_id, dtype=torch.long, device=device)  # (A*K, 1 + step)
    scores = torch.zeros(b, k, device=device)  # (A, K) log-probability of each live beam
    scores[:, 1:] = float("-inf")  # at the start all beams are the same prefix: let only one live
    if attention:  # the same bookkeeping for what each beam looked at: (rows, steps, L, H, S)
        shape = (len(model.decoder), model.cfg.heads, src.size(1))
        looked = torch.zeros(b * k, 0, *shape, device=device)
        fin_looked = torch.zeros(b, k, longest, *shape, device=device)
        src_lengths = (~memory.src_pad).sum(dim=1).tolist()
    for step in range(longest):
        a = alive.numel()
        weights = [] if attention else None
        logits, cache = model.decode(history[:, -1:], memory, cache=cache, attention=weights)
        log_probs = logits[:, -1].float().log_softmax(dim=-1).view(a, k, -1)  # (A, K, V)
        vocab = log_probs.size(-1)
        at_limit = step >= max_len[alive]  # (A,): out of room, only EOS may follow
        log_probs[at_limit] = float("-inf")
        log_probs[at_limit, :, eos_id] = 0.0
        total = log_probs.add_(scores[:, :, None]).view(a, k * vocab)  # (A, K*V), in place: it is big
        cand_scores, cand = total.topk(min(2 * k, k * vocab), dim=-1)  # (A, 2K), best first
        parent, token = cand // vocab, cand % vocab  # which beam each candidate extends, with what
        parent_rows = torch.arange(a, device=device)[:, None] * k + parent  # (A, 2K) rows of history/cache

        # Finished: EOS among the first K candidates. Merge them into the buffers (top K of 3K).
        rank = torch.arange(cand.size(1), device=device)[None, :]
        is_eos = token.eq(eos_id)
        finishing = is_eos & (rank < k) & cand_scores.isfinite()
        new_scores = torch.where(finishing, cand_scores / length_penalty(step + 1.0, alpha), float("-inf"))
        new_tokens = torch.full((a, cand.size(1), longest), eos_id, dtype=torch.long, device=device)
        new_tokens[:, :, :step] = history[parent_rows.flatten(), 1:].view(a, cand.size(1), step)
        best, keep = torch.cat([fin_scores[alive], new_scores], dim=1).topk(k, dim=1)
        fin_log_probs[alive] = torch.cat([fin_log_probs[alive], cand_scores], dim=1).gather(1, keep)
        fin_tokens[alive] = torch.cat([fin_tokens[alive], new_tokens], dim=1).gather(
            1, keep[:, :, None].expand(-1, -1, longest))
        fin_scores[alive] = best
        fin_count[alive] += finishing.sum(dim=1)
        if attention:  # each candidate: its parent's attention so far, then this step's
            looked = torch.cat([looked, step_attention(weights)[:, None]], dim=1)  # (A*K, step + 1, L, H, S)
            new_looked = torch.zeros(a, cand.size(1), longest, *shape, device=device)
            new_looked[:, :, :step + 1] = looked[parent_rows.flatten()].view(a, cand.size(1), step + 1, *shape)
            fin_looked[alive] = torch.cat([fin_looked[alive], new_looked], dim=1).gather(
                1, keep[:, :, None, None, None, None].expand(-1, -1, longest, *shape))
        searching = (fin_count[alive] < k) & ~at_limit  # (A,)
        if not searching.any():
            break

        # Live on: the K best candidates that did not end in EOS, of the sentences still
        # searching. Finished sentences leave the batch, so later steps do not compute them.
        live_scores, live = cand_scores.masked_fill(is_eos, float("-inf")).topk(k, dim=1)  # (A, K)
        chosen = parent_rows.gather(1, live)[searching].flatten()  # (A'*K,) parent row of each new beam
        history = torch.cat([history[chosen], token.gather(1, live)[searching].view(-1, 1)], dim=1)
        if attention:
            looked = looked[chosen]
        scores, alive = live_scores[searching], alive[searching]
        if searching.all():
            cache.reorder(chosen)
        else:
            still = searching.nonzero()[:, 0]
            cache.select(chosen, still)
            memory = memory.index_select(still)

    results = []
    for i in range(b):  # outside the loop: turn the finished buffers into Hypothesis objects
        hyps = []
        for j in range(min(n_best, k)):
            if not torch.isfinite(fin_scores[i, j]):
                break
            ids = fin_tokens[i, j].tolist()
            ids = ids[:ids.index(eos_id)] if eos_id in ids else ids
            attn = fin_looked[i, j, :len(ids) + 1, :, :, :src_lengths[i]] if attention else None
            hyps.append(Hypothesis(ids, fin_scores[i, j].item(), fin_log_probs[i, j].item(), attn))
        results.append(hyps)
    return results


def search_sorted(model: Transformer, sentences: Sequence[Sequence[int]], *, beam_size: int, alpha: float,
                  n_best: int, max_len_a: float, max_len_b: int, max_tokens: int, pad_id: int, bos_id: int,
                  eos_id: int, attention: bool = False) -> list[list[Hypothesis]]:
    """Search many sentences (source ids without EOS): sort them by length, cut token-budget
    batches (little padding, similar output lengths), search each batch, return results in the
    input order. A sentence longer than the model's positions is cut to fit (callers warn)."""
    max_positions = model.cfg.max_positions
    lengths = np.array([min(len(s), max_positions - 1) + 1 for s in sentences], dtype=np.int64)
    results: list[list[Hypothesis]] = [[] for _ in sentences]
    device = next(model.parameters()).device
    for ix in length_batches(np.argsort(lengths, kind="stable"), lengths, max_tokens):
        rows = [np.append(np.asarray(sentences[i], dtype=np.int64)[:max_positions - 1], eos_id) for i in ix]
        src = pad_rows(rows, pad_id).to(device)
        limit = max_lengths(torch.as_tensor(lengths[ix], device=device), max_len_a, max_len_b, max_positions - 1)
        if beam_size == 1:
            found = [[h] for h in greedy(model, src, bos_id=bos_id, eos_id=eos_id, max_len=limit, alpha=alpha,
                                         attention=attention)]
        else:
            found = beam_search(model, src, beam_size=beam_size, bos_id=bos_id, eos_id=eos_id, max_len=limit,
                                alpha=alpha, n_best=n_best, attention=attention)
        for i, hyps in zip(ix, found):
            results[i] = hyps
    return results
