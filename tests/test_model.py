"""Invariants of the Transformer: no golden numbers, only properties that must hold exactly."""

import pytest
import torch
import torch.nn.functional as F

from mtkit.model import DecoderCache, sinusoidal_positions
from tests.helpers import PAD, batch, tiny


VARIANTS = [dict(), dict(norm="post"), dict(positions="learned"), dict(activation="gelu"),
            dict(tie_embeddings=False, share_src_tgt=False, tgt_vocab=41),
            # Marian's (mtkit import marian): SiLU, post-norm, the halves layout, a logits bias
            dict(activation="silu", norm="post", positions="sinusoidal-halves", logits_bias=True),
            dict(no_residual_layer=2)]  # zero-shot's recipe: an encoder layer without its attention residual


@pytest.mark.parametrize("kw", VARIANTS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
def test_padding_positions_change_nothing(kw):
    model = tiny(**kw)
    src, tgt = batch()
    pad = src.eq(PAD)
    memory = model.encode(src)
    logits = model.decode(tgt, memory)[0]

    def scramble(module, inputs, output):  # new content wherever the source is padding
        if inputs[0] is not src:  # a shared embedding also embeds the target
            return output
        return torch.where(pad[..., None], torch.randn_like(output) * 10, output)

    hook = model.src_embed.register_forward_hook(scramble)
    try:
        memory2 = model.encode(src)
        logits2 = model.decode(tgt, memory2)[0]
    finally:
        hook.remove()
    assert not torch.equal(memory.states[pad], memory2.states[pad])  # the scramble took effect
    assert torch.equal(memory.states[~pad], memory2.states[~pad])
    assert torch.equal(logits, logits2)


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_an_encoder_layer_without_its_residual_passes_on_its_attention_alone(norm):
    model = tiny(no_residual_layer=2, norm=norm)
    assert [layer.res1.keep_input for layer in model.encoder] == [True, False]
    assert all(layer.res2.keep_input for layer in model.encoder)  # the feed-forward keeps its residual
    x, keep = torch.randn(3, 7, 32), torch.ones(3, 1, 1, 7, dtype=torch.bool)
    for layer, residual in ((model.encoder[1], 0), (tiny(norm=norm).encoder[1], 1)):
        attend = lambda h: layer.attention(h, keep=keep)[0]  # noqa: E731
        if norm == "pre":
            h = residual * x + attend(layer.res1.norm(x))
            expected = h + layer.feed_forward(layer.res2.norm(h))
        else:
            h = layer.res1.norm(residual * x + attend(x))
            expected = layer.res2.norm(h + layer.feed_forward(h))
        assert torch.allclose(layer(x, keep), expected, atol=1e-6)


def test_padded_source_gives_same_output_as_unpadded():
    model = tiny()
    src, tgt = batch()
    full = model(src, tgt)
    alone = model(src[1:2, :4], tgt[1:2])
    assert torch.allclose(full[1], alone[0], atol=1e-5)


@pytest.mark.parametrize("kw", VARIANTS[:3], ids=["pre", "post", "learned"])
def test_no_causal_leak(kw):
    model = tiny(**kw)
    src, tgt = batch(t=8)
    logits = model(src, tgt)
    for t in range(1, 8):
        changed = tgt.clone()
        changed[:, t] = (changed[:, t] + 1) % 37
        other = model(src, changed)
        assert torch.equal(logits[:, :t], other[:, :t]), f"changing token {t} changed earlier logits"
        assert not torch.equal(logits[0, t:], other[0, t:])


@pytest.mark.parametrize("kw", VARIANTS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
def test_incremental_decoding_equals_full_forward(kw):
    model = tiny(**kw)
    src, tgt = batch(t=9)
    memory = model.encode(src)
    full = model.decode(tgt, memory)[0]
    cache = DecoderCache()
    steps = []
    for t in range(tgt.size(1)):
        logits, cache = model.decode(tgt[:, t:t + 1], memory, cache=cache)
        steps.append(logits)
    assert cache.length == tgt.size(1)
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    # Several new tokens after a cached prefix (needs the offset causal mask).
    cache = DecoderCache()
    first, cache = model.decode(tgt[:, :4], memory, cache=cache)
    rest, cache = model.decode(tgt[:, 4:], memory, cache=cache)
    assert torch.allclose(torch.cat([first, rest], dim=1), full, atol=1e-5)


@pytest.mark.parametrize("seam", [True, False])
def test_bf16_decoding_attends_over_its_growing_cache_in_fp32(seam):
    """On a CPU in bf16 the model that fast.apply made (every one built from a checkpoint) runs
    the cached self-attention in fp32 (a bf16 product would compile a kernel for every new key
    length) and still equals the full forward pass, within bf16's rounding; the textbook model
    attends in bf16 throughout."""
    from mtkit import fast

    model = fast.apply(tiny()) if seam else tiny()
    src, tgt = batch(t=9)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        memory = model.encode(src)
        full = model.decode(tgt, memory)[0].float()
        cache, looked, steps = DecoderCache(), [], []
        for t in range(tgt.size(1)):
            logits, cache = model.decode(tgt[:, t:t + 1], memory, cache=cache, self_attention=looked)
            steps.append(logits.float())
    layers = len(model.decoder)
    assert [w.dtype for w in looked[:layers]] == [torch.bfloat16] * layers  # the first step: no cache yet
    assert {w.dtype for w in looked[layers:]} == {torch.float32 if seam else torch.bfloat16}
    assert cache.self_kv[0][0].dtype == torch.bfloat16  # the cache itself stays bf16 (half the copying)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=0.1, rtol=0.05)

def test_cache_reorder_selects_rows():
    model = tiny()
    src, tgt = batch()
    memory = model.encode(src)
    cache = DecoderCache()
    _, cache = model.decode(tgt[:, :2], memory, cache=cache)
    cross = cache.cross_kv
    index = torch.tensor([2, 2, 0])
    old = cache.self_kv[0][0]
    cache.reorder(index)
    assert torch.equal(cache.self_kv[0][0], old[index])
    assert cache.cross_kv is cross
    # select: rows leave the batch, and sentences leave the cross-attention state.
    cache.select(torch.tensor([2, 0]), torch.tensor([1]))
    assert torch.equal(cache.self_kv[0][0], old[torch.tensor([0, 2])])
    assert torch.equal(cache.cross_kv[1][1], cross[1][1][torch.tensor([1])])


@pytest.mark.parametrize("seam", [False, True])
def test_beams_share_the_memory_without_copying_it(seam):
    """K target rows per sentence against one memory row each (beam search's layout) give what
    a memory repeated K times gives, attention weights included: in the textbook model, which
    repeats it, and in fast.py's, which folds the K beams' queries into one row."""
    from mtkit import fast

    model = fast.apply(tiny()) if seam else tiny()
    src, tgt = batch()
    k = 3
    memory = model.encode(src)
    repeated = memory.index_select(torch.arange(src.size(0)).repeat_interleave(k))
    tgt = tgt.repeat_interleave(k, dim=0)
    tgt[1::k, 2] = 7  # the beams of a sentence differ
    folded_weights, repeated_weights = [], []
    folded = model.decode(tgt, memory, attention=folded_weights)[0]
    expected = model.decode(tgt, repeated, attention=repeated_weights)[0]
    assert torch.allclose(folded, expected, atol=1e-5)
    for f, r in zip(folded_weights, repeated_weights):
        assert f.shape == r.shape and torch.allclose(f, r, atol=1e-6)
    # and step by step with the cache
    cache, steps = DecoderCache(), []
    for t in range(tgt.size(1)):
        logits, cache = model.decode(tgt[:, t:t + 1], memory, cache=cache)
        steps.append(logits)
    assert cache.cross_kv[0][0].size(0) == src.size(0)
    assert torch.allclose(torch.cat(steps, dim=1), expected, atol=1e-5)


def test_dropout_drops_p_and_keeps_the_expected_value():
    from mtkit.fast import NumpyDropout
    drop = NumpyDropout(0.3).train()
    x = torch.ones(1001, 999, requires_grad=True)  # an odd number of elements
    torch.manual_seed(1)
    y = drop(x)
    kept = y.ne(0)
    assert abs(1 - kept.float().mean().item() - 0.3) < 0.003
    assert torch.allclose(y[kept], torch.tensor(1 / 0.7)) and abs(y.mean().item() - 1) < 0.01
    y.sum().backward()
    assert torch.equal(x.grad, kept.float() / 0.7)  # the gradient flows through the kept ones
    torch.manual_seed(1)
    assert torch.equal(drop(x), y)  # the seed decides the mask
    assert drop.eval()(x) is x
    # the rows of a mask are not copies of each other (four masks come from each 64-bit draw)
    assert not torch.equal(kept[0], kept[1]) and not torch.equal(kept[:, 0], kept[:, 1])
    # p within 1/65536 of 1 drops nearly all (it once wrapped around to keeping all)
    assert NumpyDropout(1 - 1e-7).train()(x.detach()).count_nonzero() < 100


def test_dropout_makes_its_bf16_mask_once():
    """In bf16 the mask is made in x's precision and scaled once (as F.dropout's is): the backward
    pass multiplies by it as it is; x * bool converted the mask again there (7% of a training step).
    It is converted from bytes: torch converted bools to bf16 at a sixth of the speed."""
    from torch.profiler import ProfilerActivity, profile

    from mtkit.fast import NumpyDropout
    drop = NumpyDropout(0.3).train()
    x = torch.ones(101, 99, dtype=torch.bfloat16, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        y = drop(x)
        y.sum().backward()
    conversions = [e for e in prof.events() if e.name == "aten::_to_copy" and e.input_shapes[:1] == [[101, 99]]]
    assert len(conversions) == 1  # of the mask, in the forward pass
    assert conversions[0].input_dtypes[0] == "unsigned char"
    assert y.dtype == x.grad.dtype == torch.bfloat16 and torch.equal(x.grad, y.detach())  # x = 1: both are the mask
    assert set(y.unique().tolist()) == {0.0, torch.tensor(1 / 0.7, dtype=torch.bfloat16).item()}

def test_rounded_rows_adds_at_most_an_eighth_and_makes_eight_shapes_per_doubling():
    from mtkit.fast import rounded_rows
    assert [rounded_rows(n) for n in (1, 7, 15, 16, 17, 99, 1017, 1024, 1025)] == [1, 7, 15, 16, 18, 104, 1024, 1024, 1152]
    for n in range(1, 20_000):
        r = rounded_rows(n)
        assert n <= r <= n + n / 8 and rounded_rows(r) == r
    for k in range(4, 14):  # the values that rows in (2^k, 2^(k+1)] round to
        assert len({rounded_rows(n) for n in range((1 << k) + 1, (1 << (k + 1)) + 1)}) == 8


def products_seen(fn) -> set[tuple[int, ...]]:
    """The shapes of the first operand of every matrix product that fn runs."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return {tuple(e.input_shapes[1 if e.key == "aten::addmm" else 0]) for e in prof.key_averages(group_by_input_shape=True)
            if e.key in ("aten::mm", "aten::addmm")}


def test_training_products_in_bf16_see_rounded_rows_and_give_the_plain_results():
    """Zero rows are added (so oneDNN meets a few shapes, not a new one per batch) and dropped:
    the outputs and gradients are those of F.linear, and decoding (no gradient) is left alone."""
    from mtkit.fast import RoundedLinear
    torch.manual_seed(0)
    layer = RoundedLinear(16, 24)
    x = torch.randn(3, 339, 16, requires_grad=True)  # 1,017 rows
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
        expected = F.linear(x, layer.weight, layer.bias)
        seen = products_seen(lambda: layer(x))
        assert (1017, 16) not in seen and (1024, 16) in seen
        with torch.no_grad():
            assert (1017, 16) in products_seen(lambda: layer(x))
    assert y.shape == (3, 339, 24) and y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), expected.float(), atol=1e-2)
    grads = torch.autograd.grad(y.float().square().sum(), [x, layer.weight, layer.bias])
    plain = torch.autograd.grad(expected.float().square().sum(), [x, layer.weight, layer.bias])
    for g, p in zip(grads, plain):
        assert torch.allclose(g, p, rtol=2e-2, atol=2e-2)
    assert products_seen(lambda: layer(x)) == {(1017, 16)}  # fp32: MKL compiles nothing, nothing to round


def test_tied_weights_are_one_tensor():
    model = tiny()
    assert model.src_embed.tokens.weight is model.tgt_embed.tokens.weight
    assert model.generator is None
    names = [n for n, _ in model.named_parameters()]
    assert sum("tokens.weight" in n for n in names) == 1  # one tensor, counted once
    h = torch.randn(2, 32)
    assert torch.equal(model.project(h), h @ model.tgt_embed.tokens.weight.T)
    untied = tiny(tie_embeddings=False, share_src_tgt=False)
    assert untied.src_embed is not untied.tgt_embed and untied.generator is not None


def test_attention_weights_are_returned_per_layer_and_are_distributions():
    model = tiny()
    src, tgt = batch()
    weights = []
    logits, _ = model.decode(tgt, model.encode(src), attention=weights)
    assert len(weights) == 2 and weights[0].shape == (3, 4, 6, 7)
    assert torch.allclose(weights[0].sum(-1), torch.ones(3, 4, 6))
    assert torch.all(weights[0][1, :, :, 4:] == 0)  # padding gets no attention
    assert torch.allclose(logits, model.decode(tgt, model.encode(src))[0], atol=1e-5)


@pytest.mark.slow
def test_tiny_model_overfits_a_tiny_batch():
    torch.manual_seed(0)
    model = tiny(dropout=0.1).train()
    src, tgt = batch(b=4, s=6, t=6)
    tgt_in, tgt_out = tgt[:, :-1], tgt[:, 1:]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        loss = F.cross_entropy(model(src, tgt_in).flatten(0, 1), tgt_out.flatten(), ignore_index=PAD)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    loss = F.cross_entropy(model(src, tgt_in).flatten(0, 1), tgt_out.flatten(), ignore_index=PAD)
    assert loss.item() < 0.05


def test_share_needs_one_vocabulary():
    with pytest.raises(ValueError, match="joint vocabulary"):
        tiny(tgt_vocab=40)


def test_the_halves_layout_holds_the_same_sines_and_cosines():
    interleaved, halves = sinusoidal_positions(50, 16), sinusoidal_positions(50, 16, halves=True)
    assert torch.allclose(halves[:, :8], interleaved[:, 0::2], atol=1e-5)
    assert torch.allclose(halves[:, 8:], interleaved[:, 1::2], atol=1e-5)
    assert not torch.allclose(halves, interleaved, atol=1e-2)  # (not the same table)


def test_the_logits_bias_is_added_to_every_position_and_learned():
    model = tiny(logits_bias=True, activation="silu")
    assert model.logits_bias.requires_grad and model.logits_bias.shape == (37,)
    src, tgt = batch()
    before = model(src, tgt)
    with torch.no_grad():
        model.logits_bias[5] = 3.0
    after = model(src, tgt)
    assert torch.allclose(after - before, F.one_hot(torch.tensor(5), 37).float() * 3.0, atol=1e-5)
    assert model.decoder[0].feed_forward.activation is F.silu


@pytest.mark.parametrize("kw", VARIANTS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default")
def test_the_trainers_fast_model_is_the_textbook_model(kw):
    """fast.apply swaps model.py's nn.Dropout, nn.Linear and attentions for their cheaper subclasses in place:
    the same parameters and checkpoint keys; without dropout, the same logits (translating: exactly;
    a training step in bf16, where rows are padded: within bf16's rounding) and gradients."""
    import copy

    from mtkit import fast
    from mtkit.model import CrossAttention, SelfAttention

    plain = tiny(dropout=0.0, attention_dropout=0.0, **kw)
    quick = fast.apply(copy.deepcopy(plain))
    assert list(plain.state_dict()) == list(quick.state_dict())
    swapped = {type(m).__name__ for m in quick.modules()} - {type(m).__name__ for m in plain.modules()}
    assert swapped == {"NumpyDropout", "RoundedLinear", "FastSelfAttention", "FoldedCrossAttention"}
    assert not any(type(m) in (torch.nn.Dropout, torch.nn.Linear, SelfAttention, CrossAttention) for m in quick.modules())
    src, tgt = batch()
    with torch.no_grad():
        assert torch.equal(plain.eval()(src, tgt), quick.eval()(src, tgt))
    plain.train(), quick.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = [model(src, tgt) for model in (plain, quick)]
    for model, out in zip((plain, quick), outputs):
        out.float().square().mean().backward()
    assert torch.allclose(outputs[0].float(), outputs[1].float(), atol=3e-2, rtol=3e-2)
    for (name, a), b in zip(plain.named_parameters(), quick.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-2, rtol=5e-2), name


def test_the_fused_attention_a_gpu_gets_equals_the_formula(monkeypatch):
    """fast.fused runs SDPA where fused_is_faster (a GPU): made to here, on a CPU, it gives the
    formula's numbers with a padding mask, causally, and after a cache (the offset mask)."""
    from mtkit import fast
    from mtkit.model import attend

    assert fast.fused_is_faster("cuda") and fast.fused_is_faster("mps") and not fast.fused_is_faster("cpu")
    monkeypatch.setattr(fast, "fused_is_faster", lambda device: True)
    q, k, v = (torch.randn(2, 4, 6, 8) for _ in range(3))
    keep = torch.rand(2, 1, 1, 6) > 0.3
    keep[:, ..., 0] = True
    offset = torch.ones(3, 6, dtype=torch.bool).tril(3)
    for q_, keep_, causal in ((q, keep, False), (q, None, True), (q[:, :, 3:], offset, False)):
        options = dict(keep=keep_, causal=causal, dropout=0.0)
        assert torch.allclose(fast.fused(q_, k, v, weights=None, **options), attend(q_, k, v, weights=None, **options),
                              atol=1e-5)
    weights = []
    fast.fused(q, k, v, keep=keep, causal=False, dropout=0.0, weights=weights)
    assert len(weights) == 1  # asked for the weights: the formula, which makes them
