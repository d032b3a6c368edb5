"""The training loss (mtkit/loss.py): label-smoothed cross-entropy with its gradient written out,
run with the output layer a chunk of tokens at a time, checked against PyTorch's own; R-Drop's term
on top."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mtkit import loss as loss_module
from mtkit.loss import ProjectedCrossEntropy, smoothed_cross_entropy, translation_loss
from mtkit.model import ModelConfig, Transformer


def batch(dtype=torch.float32, n=12, vocab=9):
    torch.manual_seed(0)
    logits = (3 * torch.randn(n, vocab, dtype=torch.float64)).to(dtype)
    target = torch.randint(0, vocab, (n,))
    return logits, target


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_the_written_out_gradient_is_the_true_one(smoothing):
    """Against central finite differences of the loss, in float64, every logit: the gradient
    returned plus its constant part -ε/V, which the caller adds."""
    logits, target = batch(torch.float64)
    loss, _, grad = smoothed_cross_entropy(logits, target, smoothing)
    h, numeric = 1e-6, torch.zeros_like(logits)
    for index in range(logits.numel()):
        step = torch.zeros_like(logits).view(-1)
        step[index] = h
        step = step.view_as(logits)
        up, down = (smoothed_cross_entropy(logits + s, target, smoothing)[0] for s in (step, -step))
        numeric.view(-1)[index] = (up - down) / (2 * h)
    assert torch.allclose(grad - smoothing / logits.size(1), numeric, atol=1e-7)
    expected = F.cross_entropy(logits, target, label_smoothing=smoothing, reduction="sum")
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)


def test_a_word_given_next_to_no_probability_costs_a_finite_loss_and_an_exact_gradient():
    """p[y] underflows fp32 when the right word's logit is 200 below the best: the loss shown is
    capped (at about 103 nats), finite, and the gradient is still the softmax minus the target."""
    logits = torch.zeros(2, 5)
    logits[:, 1] = 200.0
    target = torch.tensor([0, 1])
    loss, nll, grad = smoothed_cross_entropy(logits, target, 0.1)
    assert torch.isfinite(loss) and 100 < nll.item() < 110
    assert torch.allclose(grad[0], torch.tensor([-0.9, 1.0, 0.0, 0.0, 0.0]), atol=1e-6)


def output_layer_batch(n, dtype=torch.float64, bias=True, vocab=37, width=16):
    torch.manual_seed(n)
    states = torch.randn(n, width, dtype=dtype, requires_grad=True)
    weight = torch.randn(vocab, width, dtype=dtype, requires_grad=True)
    b = torch.randn(vocab, dtype=dtype, requires_grad=True) if bias else None
    target = torch.randint(0, vocab, (n,))  # 0 is padding
    return states, weight, b, target


def gradients(loss, tensors):
    (3 * loss).backward()  # the backward pass scales what the forward pass computed
    found = [t.grad.clone() for t in tensors if t is not None]
    for t in tensors:
        if t is not None:
            t.grad = None
    return found


@pytest.mark.parametrize("n", [1, 7, 511, 512, 513, 1300])  # one chunk, a full chunk, several
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_the_chunked_output_layer_and_loss_are_pytorchs(n, bias, smoothing):
    """Loss and gradients (states, weight, bias) equal F.linear + F.cross_entropy's, in float64."""
    states, weight, b, target = output_layer_batch(n, bias=bias)
    ours, nll = ProjectedCrossEntropy.apply(states, weight, b, target, 0, smoothing)
    got = gradients(ours, [states, weight, b])
    theirs = F.cross_entropy(F.linear(states, weight, b), target, ignore_index=0, label_smoothing=smoothing,
                             reduction="sum")
    expected = gradients(theirs, [states, weight, b])
    assert ours.dtype == torch.float64 and ours.item() == pytest.approx(theirs.item(), rel=1e-12)
    for a, e in zip(got, expected):
        assert torch.allclose(a, e, rtol=1e-10, atol=1e-12)
    assert got[0][target == 0].abs().sum() == 0 and got[0].abs().sum() > 0  # padding gets no gradient
    # The plain cross-entropy reported beside it: no smoothing, and no part in the gradient.
    plain = F.cross_entropy(F.linear(states, weight, b), target, ignore_index=0, reduction="sum")
    assert nll.item() == pytest.approx(plain.item(), rel=1e-12) and not nll.requires_grad
    assert smoothing or torch.equal(nll, ours)


def test_under_bf16_autocast_it_is_the_fp32_loss_within_bf16_rounding():
    """Training's case: fp32 states and weights, bf16 products, fp32 loss and gradients, and rows
    that do not fill a chunk (1,100 rows are padded to 1,152 and cut again)."""
    states, weight, _, target = output_layer_batch(1100, dtype=torch.float32, bias=False, vocab=800, width=64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, _ = ProjectedCrossEntropy.apply(states, weight, None, target, 0, 0.1)
    got = gradients(ours, [states, weight])
    theirs = F.cross_entropy(F.linear(states, weight), target, ignore_index=0, label_smoothing=0.1, reduction="sum")
    expected = gradients(theirs, [states, weight])
    assert ours.dtype == torch.float32 and ours.item() == pytest.approx(theirs.item(), rel=1e-2)
    assert [g.dtype for g in got] == [torch.float32, torch.float32]
    for a, e in zip(got, expected):
        assert (a - e).norm() < 0.02 * e.norm()


def test_no_block_larger_than_a_chunk_of_logits_is_made(monkeypatch):
    """The point of the chunks: the softmax sees CHUNK rows at a time, never all of them."""
    seen = []
    real = loss_module.smoothed_cross_entropy

    def spy(logits, *args):
        seen.append(logits.size(0))
        return real(logits, *args)

    monkeypatch.setattr(loss_module, "smoothed_cross_entropy", spy)
    monkeypatch.setattr(loss_module, "CHUNK", 4)
    states, weight, b, target = output_layer_batch(13)
    target[[2, 5, 11]] = 0
    ProjectedCrossEntropy.apply(states, weight, b, target, 0, 0.1)
    assert (target != 0).sum() == 10 and seen == [4, 4, 2]  # padding never reaches the output layer


def test_padding_costs_nothing():
    states, weight, b, target = output_layer_batch(20)
    moved = states.detach().clone()
    moved[target == 0] += 100.0
    assert (target == 0).any()
    assert all(map(torch.equal, ProjectedCrossEntropy.apply(moved, weight, b, target, 0, 0.1),
                   ProjectedCrossEntropy.apply(states, weight, b, target, 0, 0.1)))


def test_the_model_hands_its_states_and_output_layer_to_the_loss():
    """model(src, tgt_in, project=False) + translation_loss is the loss of model(src, tgt_in)'s logits."""
    torch.manual_seed(0)
    cfg = ModelConfig(src_vocab=30, tgt_vocab=30, d_model=16, heads=2, enc_layers=1, dec_layers=1, ff_dim=32,
                      dropout=0.0, attention_dropout=0.0, activation="relu", norm="pre", positions="sinusoidal",
                      max_positions=32, tie_embeddings=True, logits_bias=True)
    model = Transformer(cfg).double()
    src, tgt_in, tgt_out = torch.randint(1, 30, (3, 5)), torch.randint(1, 30, (3, 6)), torch.randint(0, 30, (3, 6))
    states = model(src, tgt_in, project=False)
    assert states.shape == (3, 6, 16)
    ours, _, _ = translation_loss(states, *model.output_layer(), tgt_out, pad_id=0, smoothing=0.1)
    got = gradients(ours, list(model.parameters()))
    theirs = F.cross_entropy(model(src, tgt_in).flatten(0, 1), tgt_out.flatten(), ignore_index=0, label_smoothing=0.1,
                             reduction="sum")
    expected = gradients(theirs, list(model.parameters()))
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-12)
    assert all(torch.allclose(a, e, rtol=1e-9, atol=1e-12) for a, e in zip(got, expected))


def test_rdrop_loss_is_the_mean_cross_entropy_plus_the_symmetric_kl_of_the_real_tokens():
    torch.manual_seed(0)
    target = torch.tensor([[5, 6, 7], [8, 9, 0]])  # 0 is padding
    weight = torch.randn(11, 4)
    one, other = torch.randn(2, 2, 3, 4).unbind(0)  # two copies' states (B, T, D)

    def ce(states):
        return F.cross_entropy(F.linear(states, weight).flatten(0, 1), target.flatten(), ignore_index=0,
                               reduction="sum")

    loss, reported, nll = translation_loss(one, weight, None, target, pad_id=0, smoothing=0.0)
    assert torch.allclose(loss, ce(one)) and torch.equal(reported, loss) and torch.equal(nll, loss)
    # Two identical copies: no divergence, and the loss is that of one copy.
    loss, reported, nll = translation_loss(torch.cat([one, one]), weight, None, target, pad_id=0, smoothing=0.0,
                                           rdrop=5.0)
    assert torch.allclose(loss, ce(one)) and torch.allclose(reported, ce(one)) and torch.allclose(nll, ce(one))
    # Two different copies: the mean cross-entropy, plus alpha / 4 times KL(p||q) + KL(q||p).
    loss, reported, _ = translation_loss(torch.cat([one, other]), weight, None, target, pad_id=0, smoothing=0.0,
                                         rdrop=5.0)
    p, q = F.linear(one, weight).softmax(-1), F.linear(other, weight).softmax(-1)
    kl = (p * (p.log() - q.log()) + q * (q.log() - p.log())).sum(-1)[target != 0].sum()
    assert torch.allclose(reported, (ce(one) + ce(other)) / 2)
    assert torch.allclose(loss, (ce(one) + ce(other)) / 2 + 5.0 / 4 * kl) and kl > 0
    # What the model says at a padding position counts for nothing.
    moved = other.clone()
    moved[1, 2] += 3.0
    assert torch.allclose(translation_loss(torch.cat([one, moved]), weight, None, target, pad_id=0, smoothing=0.0,
                                           rdrop=5.0)[0], loss)


@pytest.mark.parametrize("rdrop", [0.0, 2.0])
def test_the_chunked_loss_is_the_reference_loss_fast_off_trains_with(rdrop):
    """train.fast false: translation_loss(chunked=False), F.cross_entropy(label_smoothing) on all the
    logits at once; the chunked loss gives the same three figures and the same gradients."""
    torch.manual_seed(0)
    target = torch.randint(1, 700, (3, 350))
    target[1, 200:] = 0  # padding
    states = torch.randn(6 if rdrop else 3, 350, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(700, 16, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(700, dtype=torch.float64, requires_grad=True)
    figures, grads = [], []
    for chunked in (True, False):
        got = translation_loss(states, weight, bias, target, pad_id=0, smoothing=0.1, rdrop=rdrop, chunked=chunked)
        figures.append(torch.stack(got).detach())
        grads.append(torch.autograd.grad(got[0], [states, weight, bias]))
    assert torch.allclose(figures[0], figures[1], rtol=1e-10) and figures[0][1] > figures[0][2] > 0
    assert all(torch.allclose(a, b, rtol=1e-8, atol=1e-12) for a, b in zip(*grads))


def test_bench_loss_runs_and_its_last_line_is_json():
    """scripts/bench_loss.py, cut small, timed against this very loss.py: both versions are timed."""
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(repo / "scripts" / "bench_loss.py"), "--rows", "600", "--vocab", "300",
                           "--width", "32", "--repeats", "2", "--against", str(repo / "mtkit" / "loss.py")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["ms_this"] > 0 and figures["ms_against"] > 0 and 500 < figures["real_rows"] < 600
