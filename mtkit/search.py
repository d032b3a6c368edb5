"""Search: turning the model's next-token distributions into a translation.

The decoder gives, for a prefix, a distribution over the next token. Greedy search takes the most
likely token at every step. It is fast and often good, but it can never take back a choice: a
token that looks best now may lead to a poor sentence. Beam search keeps the K best prefixes
("beams") alive: at every step each beam is extended by every token, and the K best extensions
by total log-probability survive. Finished hypotheses (ending in EOS) are scored with a length
penalty, because a sum of log-probabilities favours short outputs. Neither ever writes the padding
token or the start token (the distribution is taken over all tokens, then those two are struck
out, as Hugging Face's generate() does for Marian models, whose decoder starts from <pad>).

Both only call model.encode and model.decode, and decode incrementally: the DecoderCache keeps
each layer's keys/values, so each step feeds just the newest token. Beam search folds the K beams
of each sentence into the batch (B*K rows) and does all of its bookkeeping with tensor ops.

With attention=True both also keep, for every hypothesis, the cross-attention that chose each of
its tokens: where the decoder looked in the source. It is collected as the search runs and moves
with the beams (a surviving beam inherits its parent's), so it is exactly what produced that
hypothesis (tested against a forced decode of it).

With trace=Trace() they also record what the Explorer draws, as they run: each step's candidates
and what became of them (live on, finished, pruned), the encoder's self-attention, and for every
hypothesis the masked self-attention of each token it wrote (riding along as the cross-attention
does). Recording changes nothing in what they find (tested).
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mtkit.data import length_batches, pad_rows
from mtkit.fast import compiles_per_shape
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
           alpha: float = 0.0, attention: bool = False, trace: "Trace | None" = None) -> list["Hypothesis"]:
    """src (B, S) padded source ids (with EOS) -> for each sentence its output (no BOS/EOS).

    max_len (B,): the most tokens a sentence may get before EOS is forced. alpha only sets the
    score (scored as beam search scores, so that greedy and beam scores compare); greedy never
    weighs lengths. Sentences that are done leave the batch (see time_to_leave)."""
    memory = model.encode(src, attention=trace.encoder if trace is not None else None)
    b, longest, device = src.size(0), int(max_len.max()) + 1, src.device
    src_lengths = (~memory.src_pad).sum(dim=1).tolist()
    never = [model.cfg.pad_id, bos_id]
    alive = torch.arange(b, device=device)  # the sentences in the batch
    last = torch.full((b, 1), bos_id, dtype=torch.long, device=device)
    finished = torch.zeros(b, dtype=torch.bool, device=device)  # of those in the batch
    log_prob = torch.zeros(b, device=device)
    written = {"tokens": torch.full((b, longest), eos_id, dtype=torch.long, device=device)}  # EOS past the end
    if attention:
        written["attention"] = torch.zeros(b, longest, len(model.decoder), model.cfg.heads, src.size(1), device=device)
    if trace is not None:
        written["self_attention"] = torch.zeros(b, longest, len(model.decoder), model.cfg.heads, longest, device=device)
    cache = DecoderCache()
    for step in range(longest):
        weights, mine = [] if attention else None, [] if trace is not None else None
        logits, cache = model.decode(last, memory, cache=cache, attention=weights,  # (A, 1, V): the newest token
                                     self_attention=mine)
        log_probs = logits[:, -1].log_softmax(dim=-1, dtype=torch.float32)
        log_probs[:, never] = float("-inf")
        best = log_probs.max(dim=-1).indices  # as argmax (the first of equals), at 2.5x its speed on a CPU
        out_of_room = step >= max_len[alive]
        best = torch.where(out_of_room, eos_id, best).masked_fill(finished, eos_id)  # no room: end it here
        gained = log_probs.gather(1, best[:, None])[:, 0]
        log_prob[alive] += gained.masked_fill(finished | out_of_room, 0.0)
        written["tokens"][alive, step] = best
        if attention:
            written["attention"][alive, step] = step_attention(weights).float()  # bf16 under autocast
        if trace is not None:
            written["self_attention"][alive, step, :, :, :step + 1] = step_attention(mine).float()
            trace.steps.append(GreedyStep(alive, best, gained, *log_probs.topk(min(5, log_probs.size(-1)), dim=-1)))
        finished |= best.eq(eos_id)
        if finished.all():
            break
        if time_to_leave(finished, memory.states):
            stay = (~finished).nonzero()[:, 0]
            alive, finished, best, memory = alive[stay], finished[stay], best[stay], memory.index_select(stay)
            cache.select(stay, stay)
        last = best[:, None]
    result = []
    for i, (row, lp) in enumerate(zip(written["tokens"].tolist(), log_prob.tolist())):
        tokens = row[:row.index(eos_id)] if eos_id in row else row
        n = len(tokens) + 1
        result.append(Hypothesis(tokens, lp / length_penalty(float(n), alpha), lp,
                                 written["attention"][i, :n, :, :, :src_lengths[i]] if attention else None,
                                 written["self_attention"][i, :n, :, :, :n] if trace is not None else None))
    return result


def time_to_leave(done: Tensor, states: Tensor) -> bool:
    """Whether the sentences that are done leave the batch now (done (A,) of those in it). At once,
    but where kernels are compiled per shape (a CPU in bf16; states: the encoder's) only when half
    the batch is done: each new row count costs compiling new kernels there, more than dead rows
    riding along cost (beam 5 ran 10% faster)."""
    return bool(done.any()) and (not compiles_per_shape(states) or 2 * int(done.sum()) >= done.numel())


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
    # With a trace: the masked self-attention of each of those tokens over the ones before it (BOS
    # first), (len(tokens) + 1, layers, heads, len(tokens) + 1); zero above the diagonal (masked).
    self_attention: Tensor | None = None


@dataclass
class GreedyStep:
    """What greedy search saw at one step, for each sentence in the batch (A,): the token it took,
    that token's log-probability, and the five most likely tokens (log-probabilities, ids), best first."""
    alive: Tensor  # (A,) the sentences in the batch (a done one takes EOS)
    token: Tensor
    log_prob: Tensor
    top_log_probs: Tensor  # (A, 5)
    top_ids: Tensor  # (A, 5)


@dataclass
class BeamStep:
    """One step of beam search: the live beams, their 2K best extensions, and which of those were
    filed as finished. The ones among the next step's beams lived on; the rest were pruned."""
    alive: Tensor  # (A,) the sentences in the batch (a done one's beams score -inf)
    beams: Tensor  # (A*K, t) each beam's tokens so far
    beam_scores: Tensor  # (A, K) their log-probabilities (-inf: not a beam)
    candidates: Tensor  # (A*2K, t + 1) each candidate's tokens
    scores: Tensor  # (A, 2K) their log-probabilities
    filed: Tensor  # (A, 2K) the score of those filed as finished (length-normalized), else -inf


@dataclass
class Trace:
    """A search's record of itself (pass trace=Trace()): one entry per step."""
    encoder: list[Tensor] = field(default_factory=list)  # per encoder layer, self-attention (B, H, S, S)
    steps: list[GreedyStep | BeamStep] = field(default_factory=list)


@torch.no_grad()
def beam_search(model: Transformer, src: Tensor, *, beam_size: int, bos_id: int, eos_id: int, max_len: Tensor,
                alpha: float = 0.6, n_best: int = 1, attention: bool = False, trace: Trace | None = None
                ) -> list[list[Hypothesis]]:
    """src (B, S) -> for each sentence its n_best hypotheses, best first.

    Every step, three small steps: `candidates` extends each beam by every token and takes the
    2K best (so that even if K of them end in EOS, K live ones remain); `Finished.add` files the
    EOS candidates ranked within the first K as finished hypotheses; `live_on` keeps the K best
    others as the next beams. A sentence is done once it has K finished hypotheses or reaches its
    max_len (EOS is forced); done sentences leave the batch (see time_to_leave).
    """
    b, k, longest = src.size(0), beam_size, int(max_len.max()) + 1
    memory = model.encode(src, attention=trace.encoder if trace is not None else None)  # (B, S, D): the K beams
    cache = DecoderCache()  # of a sentence share it (see CrossAttention)
    records = {"tokens": torch.zeros(b * k, 0, dtype=torch.long, device=src.device)}
    if attention:  # rides along as the tokens do: (rows, steps, L, H, S)
        records["attention"] = torch.zeros(b * k, 0, len(model.decoder), model.cfg.heads, src.size(1),
                                           device=src.device)
    if trace is not None:  # the same, over the target so far: (rows, steps, L, H, longest)
        records["self_attention"] = torch.zeros(b * k, 0, len(model.decoder), model.cfg.heads, longest,
                                                device=src.device)
    scores = torch.zeros(b, k, device=src.device)
    scores[:, 1:] = float("-inf")  # at the start all beams are the same prefix: let only one live
    beams = Beams(torch.arange(b, device=src.device), scores,
                  torch.full((b * k, 1), bos_id, dtype=torch.long, device=src.device), records)
    src_lengths = (~memory.src_pad).sum(dim=1).tolist()
    done = Finished.empty(b, k, longest, records, eos_id)
    never = [model.cfg.pad_id, bos_id]
    for step in range(longest):
        weights, mine = [] if attention else None, [] if trace is not None else None
        logits, cache = model.decode(beams.last, memory, cache=cache, attention=weights, self_attention=mine)
        at_limit = step >= max_len[beams.alive]  # (A,): out of room, only EOS may follow
        new = {"attention": step_attention(weights)} if attention else {}
        if trace is not None:
            new["self_attention"] = F.pad(step_attention(mine), (0, longest - step - 1))
        cand = candidates(logits[:, -1], beams, at_limit, new, k=k, eos_id=eos_id, never=never)
        filed = done.add(beams.alive, cand, step=step, alpha=alpha, eos_id=eos_id)
        if trace is not None:
            trace.steps.append(BeamStep(beams.alive, beams.records["tokens"], beams.scores,
                                        cand.records["tokens"], cand.scores, filed))
        searching = (done.count[beams.alive] < k) & ~at_limit  # (A,)
        if not searching.any():
            break
        stay = searching if time_to_leave(~searching, memory.states) else torch.ones_like(searching)
        beams, chosen = live_on(cand, beams.alive, searching, stay, k=k, eos_id=eos_id)
        if stay.all():
            cache.reorder(chosen)
        else:
            still = stay.nonzero()[:, 0]
            cache.select(chosen, still)
            memory = memory.index_select(still)
    return done.best(n_best, eos_id, src_lengths)


@dataclass
class Beams:
    """The beams of the A sentences in the batch, K each: A*K rows."""
    alive: Tensor  # (A,) the sentences' numbers in the batch (done ones ride along until half are)
    scores: Tensor  # (A, K) each beam's log-probability
    last: Tensor  # (A*K, 1) each beam's newest token: what the decoder reads next
    records: dict[str, Tensor]  # one entry a step: "tokens" (A*K, t) and, asked for, "attention"


@dataclass
class Candidates:
    """The 2K best extensions of each sentence's beams, best first."""
    scores: Tensor  # (A, 2K) log-probabilities
    token: Tensor  # (A, 2K) the token each adds
    parent: Tensor  # (A, 2K) the row (of A*K) each extends
    records: dict[str, Tensor]  # (A*2K, t + 1, ...): the parent's records and this step's entry


def candidates(logits: Tensor, beams: Beams, at_limit: Tensor, new: dict[str, Tensor], *, k: int,
               eos_id: int, never: list[int]) -> Candidates:
    """Add each beam's score to its next-token log-probabilities, (A, K, V); flatten to (A, K*V)
    and take the top 2K. new: this step's per-row records (A*K, ...) besides the token. never:
    tokens no output may have (padding, the start token)."""
    a = beams.alive.numel()
    log_probs = logits.log_softmax(dim=-1, dtype=torch.float32).view(a, k, -1)  # (A, K, V)
    log_probs[:, :, never] = float("-inf")
    vocab = log_probs.size(-1)
    limited = at_limit.nonzero()[:, 0]  # by number: a bool index would write the whole tensor
    log_probs[limited] = float("-inf")
    log_probs[limited, :, eos_id] = 0.0
    total = log_probs.add_(beams.scores[:, :, None]).view(a, k * vocab)  # (A, K*V), in place: it is big
    scores, top = top_few(total, min(2 * k, k * vocab))  # (A, 2K), best first
    token = top % vocab
    parent = torch.arange(a, device=top.device)[:, None] * k + top // vocab  # rows of A*K
    rows = parent.flatten()
    new = {"tokens": token.flatten()} | {name: entry[rows] for name, entry in new.items()}
    records = {name: torch.cat([r[rows], new[name][:, None]], dim=1) for name, r in beams.records.items()}
    return Candidates(scores, token, parent, records)


def top_few(x: Tensor, n: int, block: int = 100) -> tuple[Tensor, Tensor]:
    """x.topk(n, dim=1) for a few of very many (beam search: 2K of K*V): the maximum of every block of
    `block` values first; the n best values lie in the n blocks with the best maxima (and the tail
    that fills no block), and only those are ranked. 3x faster than topk on a CPU at (140, 40000).
    The same values; among exactly equal values it may pick another index."""
    rows, width = x.shape
    full = width - width % block
    if full // block <= n:
        return x.topk(n, dim=1)
    blocks = x[:, :full].unflatten(1, (-1, block)).amax(dim=2).topk(n, dim=1).indices  # (rows, n)
    inside = (blocks[:, :, None] * block + torch.arange(block, device=x.device)).flatten(1)
    inside = torch.cat([inside, torch.arange(full, width, device=x.device).expand(rows, -1)], dim=1)
    values, best = x.gather(1, inside).topk(n, dim=1)
    return values, inside.gather(1, best)


def live_on(cand: Candidates, alive: Tensor, searching: Tensor, stay: Tensor, *, k: int, eos_id: int
            ) -> tuple[Beams, Tensor]:
    """The K best candidates that did not end in EOS are the next beams of the sentences that
    `stay` in the batch (those no longer `searching` get dead beams, score -inf). Returns them and
    the row of A*K each came from (to reorder the decoder's cache)."""
    live_scores, live = cand.scores.masked_fill(cand.token.eq(eos_id), float("-inf")).topk(k, dim=1)  # (A, K)
    live_scores = live_scores.masked_fill(~searching[:, None], float("-inf"))
    width = cand.scores.size(1)
    picked = (torch.arange(alive.numel(), device=live.device)[:, None] * width + live)[stay].flatten()
    records = {name: r[picked] for name, r in cand.records.items()}
    beams = Beams(alive[stay], live_scores[stay], records["tokens"][:, -1:], records)
    return beams, cand.parent.gather(1, live)[stay].flatten()


@dataclass
class Finished:
    """The finished hypotheses of every sentence: fixed-size buffers, K per sentence, best first."""
    scores: Tensor  # (B, K) log-prob / length penalty; -inf: empty
    log_probs: Tensor  # (B, K)
    count: Tensor  # (B,) how many have finished (kept or not)
    records: dict[str, Tensor]  # (B, K, longest, ...), past the end: EOS tokens, zero attention
    longest: int

    @classmethod
    def empty(cls, b: int, k: int, longest: int, like: dict[str, Tensor], eos_id: int) -> "Finished":
        device = like["tokens"].device
        records = {name: torch.full((b, k, longest, *r.shape[2:]), eos_id if name == "tokens" else 0,
                                    dtype=r.dtype, device=device) for name, r in like.items()}
        return cls(torch.full((b, k), float("-inf"), device=device), torch.zeros(b, k, device=device),
                   torch.zeros(b, dtype=torch.long, device=device), records, longest)

    def add(self, alive: Tensor, cand: Candidates, *, step: int, alpha: float, eos_id: int) -> Tensor:
        """File the EOS candidates among the first K of each sentence: the buffers keep the best
        K of the K they had and the 2K new ones. Returns the filed ones' scores (A, 2K), else -inf."""
        a, width = cand.scores.shape
        k = self.scores.size(1)
        rank = torch.arange(width, device=cand.scores.device)[None, :]
        finishing = cand.token.eq(eos_id) & (rank < k) & cand.scores.isfinite()
        new_scores = torch.where(finishing, cand.scores / length_penalty(step + 1.0, alpha), float("-inf"))
        best, top = torch.cat([self.scores[alive], new_scores], dim=1).topk(k, dim=1)
        self.log_probs[alive] = torch.cat([self.log_probs[alive], cand.scores], dim=1).gather(1, top)
        sentences = torch.arange(a, device=top.device)[:, None]
        for name, buffer in self.records.items():
            new = buffer.new_full((a, width, *buffer.shape[2:]), eos_id if name == "tokens" else 0)
            new[:, :, :step + 1] = cand.records[name].view(a, width, step + 1, *buffer.shape[3:])
            buffer[alive] = torch.cat([buffer[alive], new], dim=1)[sentences, top]
        self.scores[alive] = best
        self.count[alive] += finishing.sum(dim=1)
        return new_scores

    def best(self, n_best: int, eos_id: int, src_lengths: list[int]) -> list[list[Hypothesis]]:
        """The buffers as Hypothesis objects (attention cut to the source's and the output's length)."""
        results = []
        for i in range(self.scores.size(0)):
            hyps = []
            for j in range(min(n_best, self.scores.size(1))):
                if not torch.isfinite(self.scores[i, j]):
                    break
                ids = self.records["tokens"][i, j].tolist()
                ids = ids[:ids.index(eos_id)] if eos_id in ids else ids
                n = len(ids) + 1
                looked = {name: r[i, j, :n] for name, r in self.records.items()}
                hyps.append(Hypothesis(ids, self.scores[i, j].item(), self.log_probs[i, j].item(),
                                       looked["attention"][..., :src_lengths[i]] if "attention" in looked else None,
                                       looked["self_attention"][..., :n] if "self_attention" in looked else None))
            results.append(hyps)
        return results


def search_sorted(model: Transformer, sentences: Sequence[Sequence[int]], *, beam_size: int, alpha: float,
                  n_best: int, max_len_a: float, max_len_b: int, max_tokens: int, pad_id: int, bos_id: int,
                  eos_id: int, attention: bool = False, trace: Trace | None = None,
                  on_batch: Callable[[int], None] | None = None) -> list[list[Hypothesis]]:
    """Search many sentences (source ids without EOS): sort them by length, cut token-budget
    batches (little padding, similar output lengths), search each batch, return results in the
    input order. A sentence longer than the model's positions is cut to fit (callers warn).
    trace: records one batch's search (e.g. one sentence's). on_batch(n): called as each batch of
    n sentences is done (progress)."""
    max_positions = model.cfg.max_positions
    lengths = np.array([min(len(s), max_positions - 1) + 1 for s in sentences], dtype=np.int64)
    results: list[list[Hypothesis]] = [[] for _ in sentences]
    device = next(model.parameters()).device
    batches = list(length_batches(np.argsort(lengths, kind="stable"), lengths, max_tokens))
    if trace is not None and len(batches) > 1:
        raise ValueError(f"a trace records one batch; these sentences make {len(batches)}")
    for ix in batches:
        rows = [np.append(np.asarray(sentences[i], dtype=np.int64)[:max_positions - 1], eos_id) for i in ix]
        src = pad_rows(rows, pad_id).to(device)
        limit = max_lengths(torch.as_tensor(lengths[ix], device=device), max_len_a, max_len_b, max_positions - 1)
        if beam_size == 1:
            found = [[h] for h in greedy(model, src, bos_id=bos_id, eos_id=eos_id, max_len=limit, alpha=alpha,
                                         attention=attention, trace=trace)]
        else:
            found = beam_search(model, src, beam_size=beam_size, bos_id=bos_id, eos_id=eos_id, max_len=limit,
                                alpha=alpha, n_best=n_best, attention=attention, trace=trace)
        for i, hyps in zip(ix, found):
            results[i] = hyps
        if on_batch is not None:
            on_batch(len(ix))
    return results
