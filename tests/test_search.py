"""Greedy search: the cached, batched search equals the obvious slow one."""

import math
from types import SimpleNamespace

import pytest
import torch

from mtkit.search import BeamStep, GreedyStep, Trace, beam_search, greedy, max_lengths, top_few
from tests.helpers import BOS, EOS, PAD, batch, tiny


def slow_greedy(model, src, limit):
    """One sentence at a time, re-decoding the whole prefix each step (no cache, no batch)."""
    memory = model.encode(src)
    out = [BOS]
    while len(out) <= limit:
        scores = model.decode(torch.tensor([out]), memory)[0][0, -1]
        scores[[PAD, BOS]] = float("-inf")  # never written
        next_id = scores.argmax().item()
        if next_id == EOS:
            break
        out.append(next_id)
    return out[1:limit + 1]


def test_greedy_equals_uncached_one_by_one_search():
    model = tiny()
    src, _ = batch(b=3)
    limit = torch.tensor([5, 9, 12])
    fast = [h.tokens for h in greedy(model, src, bos_id=BOS, eos_id=EOS, max_len=limit)]
    for i in range(3):
        row = src[i:i + 1]
        row = row[:, : int(row.ne(0).sum())]
        assert fast[i] == slow_greedy(model, row, int(limit[i]))
    assert [len(f) for f in fast] == [5, 9, 12]  # an untrained model rarely stops: the limits hold


def test_greedy_stops_at_eos():
    model = tiny()
    with torch.no_grad():  # the decoder's output is all ones; EOS's (tied) output row is all tens
        model.dec_norm.weight.zero_()
        model.dec_norm.bias.fill_(1.0)
        model.tgt_embed.tokens.weight[EOS] = 10.0
    src, _ = batch(b=2)
    assert [h.tokens for h in greedy(model, src, bos_id=BOS, eos_id=EOS, max_len=torch.tensor([7, 7]))] == [[], []]


def test_padding_and_the_start_token_are_never_written():
    model = tiny()
    with torch.no_grad():  # as in the test above, but the start token's and padding's rows win
        model.dec_norm.weight.zero_()
        model.dec_norm.bias.fill_(1.0)
        model.tgt_embed.tokens.weight[BOS] = 10.0
        model.tgt_embed.tokens.weight[PAD] = 9.0
    src, _ = batch(b=2)
    limit = torch.tensor([6, 6])
    found = [h.tokens for h in greedy(model, src, bos_id=BOS, eos_id=EOS, max_len=limit)]
    found += [h.tokens for hyps in beam_search(model, src, beam_size=3, bos_id=BOS, eos_id=EOS, max_len=limit,
                                              n_best=3) for h in hyps]
    assert any(found) and all(BOS not in tokens and PAD not in tokens for tokens in found)


def test_max_lengths():
    assert max_lengths(torch.tensor([1, 10, 100]), 1.5, 10, 60).tolist() == [11, 25, 60]


# ---------------------------------------------------------------------------------------------
# Beam search against a scripted model: its next-token probabilities are a table keyed by the
# prefix, so every hypothesis' probability can be computed by hand.

A, B_ = 4, 5  # two word tokens (B_ : "B" is the batch letter in shapes)
TABLE = {
    (): {A: 0.6, B_: 0.4},
    (A,): {A: 0.45, B_: 0.3, EOS: 0.25},
    (B_,): {EOS: 0.9, A: 0.1},
    (A, A): {EOS: 1.0},
    (A, B_): {EOS: 1.0},
    (B_, A): {EOS: 1.0},
}


class Scripted:
    """Looks like a Transformer to search.py. The prefix lives in the cache (as 'keys'), so
    the search's own cache.reorder keeps it right."""

    vocab = 6
    cfg = SimpleNamespace(pad_id=PAD)

    def encode(self, src, attention=None):
        from mtkit.model import Memory

        return Memory(torch.zeros(src.size(0), 1, 1), torch.zeros(src.size(0), 1, dtype=torch.bool))

    def decode(self, tgt_in, memory, *, cache=None, attention=None, self_attention=None):
        new = tgt_in.float()[:, None, :, None]  # (B, 1, T, 1)
        prefix = torch.cat([cache.self_kv[0][0], new], dim=2) if cache.self_kv else new
        cache.self_kv = [(prefix, prefix)]
        logits = torch.full((tgt_in.size(0), tgt_in.size(1), self.vocab), float("-inf"))
        for row, seq in enumerate(prefix[:, 0, :, 0].long().tolist()):
            for token, p in TABLE.get(tuple(seq[1:]), {EOS: 1.0}).items():
                logits[row, -1, token] = math.log(p)
        return logits, cache


def lp(length, alpha):
    return ((5 + length) / 6) ** alpha


def beam(k=2, alpha=0.0, n_best=2, max_len=(10,)):
    src = torch.full((len(max_len), 3), 7)
    return beam_search(Scripted(), src, beam_size=k, bos_id=BOS, eos_id=EOS, max_len=torch.tensor(max_len),
                       alpha=alpha, n_best=n_best)


def test_beam_finds_the_hand_computed_best_that_greedy_misses():
    (g,) = greedy(Scripted(), torch.full((1, 3), 7), bos_id=BOS, eos_id=EOS, max_len=torch.tensor([10]))
    assert g.tokens == [A, A] and g.log_prob == pytest.approx(math.log(0.6 * 0.45 * 1.0))
    (best, second), = beam(k=2, alpha=0.0)
    assert best.tokens == [B_] and best.log_prob == pytest.approx(math.log(0.4 * 0.9))
    assert second.tokens == [A, A] and second.log_prob == pytest.approx(math.log(0.6 * 0.45))
    assert best.score > second.score  # n-best comes in score order


def test_length_penalty_flips_the_winner_when_it_should():
    # "B" scores log(.36)/lp(2); "A A" log(.27)/lp(3) (lengths count EOS): "A A" wins once
    # alpha > log(.27/.36)... i.e. when lp(3)/lp(2) outweighs the lower probability.
    for alpha in (0.0, 0.6, 1.0, 3.0):
        (best, second), = beam(k=2, alpha=alpha)
        b_score, aa_score = math.log(0.36) / lp(2, alpha), math.log(0.27) / lp(3, alpha)
        winner = [B_] if b_score > aa_score else [A, A]
        assert best.tokens == winner, alpha
        assert best.score == pytest.approx(max(b_score, aa_score))
        assert second.score == pytest.approx(min(b_score, aa_score))
    assert beam(alpha=1.0)[0][0].tokens == [B_] and beam(alpha=3.0)[0][0].tokens == [A, A]


def test_max_length_forces_eos_per_sentence():
    short, long = beam(k=2, max_len=(1, 10))  # one batch, two limits
    assert [h.tokens for h in short] == [[A], [B_]]
    assert short[0].log_prob == pytest.approx(math.log(0.6))  # the forced EOS costs nothing
    assert long[0].tokens == [B_]


def test_eos_first_gives_an_empty_hypothesis():
    TABLE_BACKUP = dict(TABLE)
    TABLE[()] = {EOS: 0.7, A: 0.3}
    try:
        (best, second), = beam(k=2)
    finally:
        TABLE.clear()
        TABLE.update(TABLE_BACKUP)
    assert best.tokens == [] and best.log_prob == pytest.approx(math.log(0.7))
    assert second.tokens == [A, A]


def test_n_best_lists_are_sorted_and_as_long_as_asked():
    hyps, = beam(k=3, n_best=3)
    assert len(hyps) == 3
    assert [h.score for h in hyps] == sorted((h.score for h in hyps), reverse=True)
    assert hyps[2].tokens in ([A, B_], [B_, A])


# ---------------------------------------------------------------------------------------------
# Invariants on a real (random) model.

@pytest.fixture(scope="module")
def copier():
    """A tiny real model briefly trained to copy its source: outputs vary and end with EOS."""
    import torch.nn.functional as F

    model = tiny(dropout=0.0).train()
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        n = int(torch.randint(3, 9, (1,), generator=g))
        src = torch.randint(4, 37, (32, n), generator=g)
        tgt_in = torch.cat([torch.full((32, 1), BOS), src], dim=1)
        tgt_out = torch.cat([src, torch.full((32, 1), EOS)], dim=1)
        loss = F.cross_entropy(model(torch.cat([src, tgt_out[:, -1:]], dim=1), tgt_in).flatten(0, 1),
                               tgt_out.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_beam_of_one_is_greedy(copier):
    model = copier
    src, _ = batch(b=3)
    limit = torch.tensor([6, 12, 12])
    g = [h.tokens for h in greedy(model, src, bos_id=BOS, eos_id=EOS, max_len=limit)]
    b1 = beam_search(model, src, beam_size=1, bos_id=BOS, eos_id=EOS, max_len=limit, alpha=0.0)
    assert [h[0].tokens for h in b1] == g
    g_scores = [h.log_prob for h in greedy(model, src, bos_id=BOS, eos_id=EOS, max_len=limit)]
    assert [h[0].log_prob for h in b1] == pytest.approx(g_scores, abs=1e-4)
    # Scores mean one thing: with a length penalty, greedy's are normalized as beam search's are.
    normalized = greedy(model, src, bos_id=BOS, eos_id=EOS, max_len=limit, alpha=0.6)
    b1 = beam_search(model, src, beam_size=1, bos_id=BOS, eos_id=EOS, max_len=limit, alpha=0.6)
    assert [h[0].score for h in b1] == pytest.approx([h.score for h in normalized], abs=1e-4)
    assert all(h.score == pytest.approx(h.log_prob / ((5 + len(h.tokens) + 1) / 6) ** 0.6) for h in normalized)
    assert len({tuple(x) for x in g}) == 3 and all(len(set(x)) > 2 for x in g)  # varied outputs
    assert any(len(x) < limit[i] for i, x in enumerate(g))  # and some end by EOS


def test_batched_beam_equals_one_sentence_at_a_time(copier):
    model = copier
    src, _ = batch(b=3, s=7)
    limit = torch.tensor([10, 10, 10])
    together = beam_search(model, src, beam_size=4, bos_id=BOS, eos_id=EOS, max_len=limit, n_best=2)
    for i in range(3):
        row = src[i:i + 1, : int(src[i].ne(0).sum())]
        alone = beam_search(model, row, beam_size=4, bos_id=BOS, eos_id=EOS, max_len=limit[:1], n_best=2)
        assert [h.tokens for h in alone[0]] == [h.tokens for h in together[i]]
        for a, t in zip(alone[0], together[i]):
            assert a.score == pytest.approx(t.score, abs=1e-4)


@pytest.mark.parametrize("beam", [1, 4])
def test_the_textbook_model_and_fast_pys_find_the_same_translations(copier, beam):
    """In fp32, what the textbook model finds, fast.apply's (every translator's) finds: the same
    tokens, the same scores and the same attention, greedy and beam (where it folds the beams' queries)."""
    import copy

    from mtkit import fast

    src, _ = batch(b=4, s=7)
    limit = torch.full((4,), 10)
    plain = searched(copier, src, limit, beam, attention=True)
    quick = searched(fast.apply(copy.deepcopy(copier)), src, limit, beam, attention=True)
    assert [[h.tokens for h in n_best] for n_best in plain] == [[h.tokens for h in n_best] for n_best in quick]
    for a, b in zip(sum(plain, []), sum(quick, [])):
        assert a.score == pytest.approx(b.score, abs=1e-5)
        assert torch.allclose(a.attention, b.attention, atol=1e-5)
    assert len({tuple(n_best[0].tokens) for n_best in plain}) == 4  # varied: the comparison could fail


def forced_attention(model, src_row, tokens: list[int]) -> torch.Tensor:
    """The cross-attention of teacher-forcing `tokens` (then EOS) on one source: (T + 1, L, H, S)."""
    weights = []
    with torch.no_grad():
        model.decode(torch.tensor([[BOS] + tokens]), model.encode(src_row), attention=weights)
    return torch.stack([w[0] for w in weights]).permute(2, 0, 1, 3)  # (L, H, T + 1, S) -> (T + 1, L, H, S)


def searched(model, src, limit, beam: int, **options) -> list[list]:
    """Greedy search (beam 1) or beam search with its whole n-best list, as lists of hypotheses."""
    if beam == 1:
        return [[h] for h in greedy(model, src, bos_id=BOS, eos_id=EOS, max_len=limit, **options)]
    return beam_search(model, src, beam_size=beam, bos_id=BOS, eos_id=EOS, max_len=limit, n_best=beam, **options)


@pytest.mark.parametrize("beam", [1, 4])
def test_the_attention_returned_is_the_one_that_chose_each_hypothesis(copier, beam):
    src, _ = batch(b=3, s=7)
    limit = torch.tensor([10, 4, 10])

    found = searched(copier, src, limit, beam, attention=True)
    plain = searched(copier, src, limit, beam, attention=False)
    assert [[h.tokens for h in hyps] for hyps in found] == [[h.tokens for h in hyps] for hyps in plain]
    for i, hyps in enumerate(found):
        row = src[i:i + 1, : int(src[i].ne(0).sum())]  # without the batch's padding
        for h in hyps:  # every hypothesis of the n-best list, not only the best
            forced = forced_attention(copier, row, h.tokens)
            assert h.attention.shape == forced.shape == (len(h.tokens) + 1, 2, 4, row.size(1))
            assert torch.allclose(h.attention, forced, atol=1e-5)
    if beam > 1:  # the n-best hypotheses really differ in where they looked
        first, second = found[0][0].attention, found[0][1].attention
        assert first.shape != second.shape or not torch.equal(first, second)


def forced_self_attention(model, src_row, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder's masked self-attention (T + 1, L, H, T + 1) and the encoder's (L, H, S, S) of
    teacher-forcing `tokens` (then EOS) on one source."""
    decoder, encoder = [], []
    with torch.no_grad():
        model.decode(torch.tensor([[BOS] + tokens]), model.encode(src_row, attention=encoder), self_attention=decoder)
    return torch.stack([w[0] for w in decoder]).permute(2, 0, 1, 3), torch.stack([w[0] for w in encoder])


@pytest.mark.parametrize("beam", [1, 4])
def test_a_trace_changes_nothing_found_and_records_what_chose_each_hypothesis(copier, beam):
    src, _ = batch(b=3, s=7)
    limit = torch.tensor([10, 4, 10])

    trace = Trace()
    found, plain = (searched(copier, src, limit, beam, alpha=0.6, trace=t) for t in (trace, None))
    assert [[(h.tokens, h.score, h.log_prob) for h in hyps] for hyps in found] == \
           [[(h.tokens, h.score, h.log_prob) for h in hyps] for hyps in plain]
    assert all(h.self_attention is None for hyps in plain for h in hyps)
    assert len(trace.encoder) == 2 and trace.encoder[0].shape == (3, 4, 7, 7)
    assert all(isinstance(s, GreedyStep if beam == 1 else BeamStep) for s in trace.steps) and trace.steps
    for i, hyps in enumerate(found):
        n = int(src[i].ne(0).sum())
        row = src[i:i + 1, :n]
        for h in hyps:
            decoder, encoder = forced_self_attention(copier, row, h.tokens)
            assert h.self_attention.shape == decoder.shape == (len(h.tokens) + 1, 2, 4, len(h.tokens) + 1)
            assert torch.allclose(h.self_attention, decoder, atol=1e-5)
            future = torch.ones(len(h.tokens) + 1, len(h.tokens) + 1).triu(1).bool()  # query row, key column
            assert h.self_attention.permute(1, 2, 0, 3)[..., future].eq(0).all()  # the future: masked
            assert torch.allclose(torch.stack(trace.encoder)[:, i, :, :n, :n], encoder, atol=1e-5)
    if beam == 1:  # each step's token and its log-probability, as the hypothesis adds them up
        assert [s.alive.numel() for s in trace.steps][-1] < len(found)  # done sentences left the batch
        for i, (h,) in enumerate(found):
            mine = [(s.token[s.alive == i].item(), s.log_prob[s.alive == i].item()) for s in trace.steps
                    if (s.alive == i).any()]
            tokens, gained = [t for t, _ in mine], [g for _, g in mine]
            assert tokens == h.tokens + [EOS]  # the last step it was in the batch wrote its EOS
            counted = len(h.tokens) + (len(h.tokens) < limit[i])  # an EOS forced by the limit costs nothing
            assert sum(gained[:counted]) == pytest.approx(h.log_prob, abs=1e-5)
        assert any(len(h.tokens) == limit[i] for i, (h,) in enumerate(found))




def rows_per_step(model, search, **options) -> tuple[list[int], list]:
    """The batch rows of each decoder step of a search, and what it found."""
    rows, decode = [], model.decode

    def spy(tgt_in, *args, **kwargs):
        rows.append(tgt_in.size(0))
        return decode(tgt_in, *args, **kwargs)

    model.decode = spy
    try:
        return rows, search(model, **options)
    finally:
        del model.decode


@pytest.mark.parametrize("beam", [1, 3])
def test_done_sentences_leave_a_bf16_cpu_batch_only_when_half_of_it_is_done(copier, beam):
    """On a CPU in bf16 (kernels compiled per shape) done sentences ride along as dead rows until
    half of the batch is done, and riding along changes nothing found; in fp32 they leave at once."""
    src, _ = batch(b=8, s=7, seed=3)
    limit = torch.tensor([1, 2, 2, 3, 9, 9, 9, 9])  # four stop early; the others run on
    options = dict(bos_id=BOS, eos_id=EOS, attention=True)
    if beam == 1:
        search, one = greedy, (lambda found: [found])
    else:
        search, one = beam_search, (lambda found: found)
        options |= dict(beam_size=beam, n_best=beam)
    rows, _ = rows_per_step(copier, search, src=src, max_len=limit, **options)
    assert rows[:4] == [8 * beam, 8 * beam, 7 * beam, 5 * beam], rows  # fp32: one sentence, then two, leave at once
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rows, together = rows_per_step(copier, search, src=src, max_len=limit, **options)
        changes = [(a, b) for a, b in zip(rows, rows[1:]) if a != b]
        assert rows[:4] == [8 * beam] * 4 and changes and all(b * 2 <= a for a, b in changes), rows
        for i in range(8):
            row = src[i:i + 1, : int(src[i].ne(PAD).sum())]
            alone = search(copier, row, max_len=limit[i:i + 1], **options)
            assert [h.tokens for h in one(alone[0])] == [h.tokens for h in one(together[i])]
            for a, t in zip(one(alone[0]), one(together[i])):
                assert a.score == pytest.approx(t.score, abs=1e-2)
                torch.testing.assert_close(a.attention, t.attention, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("beam", [1, 3])
def test_attention_and_a_trace_in_bf16(copier, beam):
    """Under bf16 autocast (translate's default on such CPUs) the records come back in fp32."""
    src, _ = batch(b=4, s=7, seed=3)
    limit = torch.tensor([2, 9, 9, 9])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = searched(copier, src, limit, beam)
        traced = searched(copier, src, limit, beam, attention=True, trace=Trace())
    for mine, theirs in zip(plain, traced):
        assert [h.tokens for h in mine] == [h.tokens for h in theirs]
        assert all(h.attention.dtype == h.self_attention.dtype == torch.float32 for h in theirs)


@pytest.mark.parametrize("width", [40_000, 8_003, 950, 12])
def test_top_few_finds_what_topk_finds(width):
    """The few best of wide rows, found through the maxima of blocks: topk's values, and its
    indices where no two values are equal; rows of -inf (dead beams) and the tail that fills no
    block included."""
    g = torch.Generator().manual_seed(width)
    x = torch.randn(7, width, generator=g)
    x[2] = float("-inf")
    x[3, -1] = 100.0  # the best value of a row in the tail
    x[4, :width // 2] = float("-inf")
    for n in (1, 10):
        values, index = top_few(x, n)
        expected = x.topk(n, dim=1)
        assert torch.equal(values, expected.values)
        assert torch.equal(x.gather(1, index), values)
        live = [r for r in range(7) if r != 2]
        assert torch.equal(index[live], expected.indices[live])
        assert index[3, 0] == width - 1
