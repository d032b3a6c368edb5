"""Greedy search: the cached, batched search equals the obvious slow one."""

import torch

from mtkit.search import greedy, max_lengths
from tests.test_model import BOS, EOS, batch, tiny


def slow_greedy(model, src, limit):
    """One sentence at a time, re-decoding the whole prefix each step (no cache, no batch)."""
    memory = model.encode(src)
    out = [BOS]
    while len(out) <= limit:
        next_id = model.decode(torch.tensor([out]), memory)[0][0, -1].argmax().item()
        if next_id == EOS:
            break
        out.append(next_id)
    return out[1:limit + 1]


def test_greedy_equals_uncached_one_by_one_search():
    model = tiny()
    src, _ = batch(b=3)
    limit = torch.tensor([5, 9, 12])
    fast = greedy(model, src, bos_id=BOS, eos_id=EOS, max_len=limit)
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
    assert greedy(model, src, bos_id=BOS, eos_id=EOS, max_len=torch.tensor([7, 7])) == [[], []]


def test_max_lengths():
    assert max_lengths(torch.tensor([1, 10, 100]), 1.5, 10, 60).tolist() == [11, 25, 60]
