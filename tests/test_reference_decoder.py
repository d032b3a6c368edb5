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
from mtkit.search import max_lengths
from mtkit.translate import Translator
from tests.helpers import reference_beam


@pytest.fixture(scope="module")
def demo_model(trained, demo_dir):
    translator = Translator.load(trained)
    assert translator.precision == "fp32"
    lines = list(read_lines(demo_dir / "test.en"))[:40]
    return translator, lines


@pytest.mark.slow
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
