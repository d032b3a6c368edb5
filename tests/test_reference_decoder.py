"""The optimized decoder against a textbook one, on a model trained on the demo corpus (fp32).

The optimized path (Translator -> search_sorted -> greedy / beam_search) sorts sentences by
length, batches them, decodes incrementally with the KV cache and precomputed cross-attention K/V,
folds the beams into the batch and drops finished sentences from it. The reference below does
none of that: one sentence at a time, a Python list of beams, and every step re-runs the decoder
over the whole prefix. Same model, same rules (padding and the start token never written, top 2K candidates, EOS within the first K
finishes, EOS forced at the length limit, GNMT length penalty), so the outputs must be the same.
"""

import pytest
import torch

from mtkit.corpus import read_lines
from mtkit.search import length_penalty, max_lengths
from mtkit.tokenizer import BOS_ID, EOS_ID, PAD_ID
from mtkit.translate import Translator


@torch.no_grad()
def reference_beam(model, src: list[int], k: int, limit: int, alpha: float) -> list[tuple[float, float, list[int]]]:
    """-> up to k finished (score, log_prob, tokens), best first."""
    memory = model.encode(torch.tensor([src + [EOS_ID]]))
    beams = [([BOS_ID], 0.0)]  # (prefix, log-probability)
    finished, count = [], 0
    for step in range(limit + 1):
        totals = []
        for prefix, log_prob in beams:
            next_lp = model.decode(torch.tensor([prefix]), memory)[0][0, -1].float().log_softmax(-1)
            next_lp[[PAD_ID, BOS_ID]] = float("-inf")  # never written
            if step >= limit:  # out of room: only EOS may follow, at no cost
                next_lp = torch.full_like(next_lp, float("-inf"))
                next_lp[EOS_ID] = 0.0
            totals.append(log_prob + next_lp)
        flat = torch.stack(totals).flatten()
        vocab = totals[0].numel()
        top, index = flat.topk(min(2 * k, flat.numel()))
        candidates = [(s, beams[i // vocab][0], i % vocab) for s, i in zip(top.tolist(), index.tolist())]
        for rank, (s, prefix, token) in enumerate(candidates):
            if token == EOS_ID and rank < k and s > float("-inf"):
                finished.append((s / length_penalty(step + 1.0, alpha), s, prefix[1:]))
                count += 1
        finished = sorted(finished, key=lambda f: -f[0])[:k]
        if count >= k or step >= limit:
            return finished
        beams = [(prefix + [token], s) for s, prefix, token in candidates if token != EOS_ID][:k]
    return finished


@pytest.fixture(scope="module")
def demo_model(trained, demo_dir):
    translator = Translator.load(trained)
    assert translator.precision == "fp32"
    lines = list(read_lines(demo_dir / "test.en"))[:40]
    return translator, lines


@pytest.mark.parametrize("beam", [1, 5])
def test_optimized_decoder_equals_the_reference(demo_model, beam):
    translator, lines = demo_model
    opts = translator.options(beam_size=beam, n_best=beam, max_tokens=150)  # several batches
    fast = translator.translate_nbest(lines, **opts.model_dump())
    ids = translator.encode(lines)
    limits = max_lengths(torch.tensor([len(x) + 1 for x in ids]), opts.max_len_a, opts.max_len_b,
                         translator.max_source_tokens)
    ended_by_eos, outputs = 0, set()
    for src, limit, got in zip(ids, limits.tolist(), fast):
        want = reference_beam(translator.model, src, beam, limit, opts.alpha)
        texts = translator.tokenizer.decode_tgt([tokens for _, _, tokens in want])
        assert [text for _, text in got] == texts
        # Greedy's score is normalized by the length penalty as beam search's is.
        assert [score for score, _ in got] == pytest.approx([score for score, _, _ in want], abs=1e-4)
        ended_by_eos += len(want[0][2]) < limit
        outputs.add(texts[0])
    # The model is trained enough to stop by itself and to say different things.
    assert ended_by_eos > len(lines) // 2 and len(outputs) > len(lines) // 2
