"""The training loss (mtkit/loss.py): label-smoothed cross-entropy with its gradient written out,
checked against PyTorch's own, and R-Drop's term on top."""

import pytest
import torch
import torch.nn.functional as F

from mtkit.loss import SmoothedCrossEntropy, translation_loss


def batch(dtype=torch.float32, n=12, vocab=9):
    torch.manual_seed(0)
    logits = (3 * torch.randn(n, vocab, dtype=torch.float64)).to(dtype)
    target = torch.randint(1, vocab, (n,))
    target[-3:] = 0  # padding
    return logits, target


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_the_written_out_gradient_is_the_true_one(smoothing):
    """Against central finite differences of the forward pass, in float64, every logit."""
    logits, target = batch(torch.float64)
    z = logits.clone().requires_grad_()
    SmoothedCrossEntropy.apply(z, target, 0, smoothing).backward()
    h, numeric = 1e-6, torch.zeros_like(logits)
    for index in range(logits.numel()):
        step = torch.zeros_like(logits).view(-1)
        step[index] = h
        step = step.view_as(logits)
        up, down = (SmoothedCrossEntropy.apply(logits + s, target, 0, smoothing) for s in (step, -step))
        numeric.view(-1)[index] = (up - down) / (2 * h)
    assert torch.allclose(z.grad, numeric, atol=1e-7)
    assert z.grad[:-3].abs().sum() > 0


@pytest.mark.parametrize("dtype,tolerance", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_loss_and_gradient_are_pytorchs_cross_entropy(dtype, tolerance, smoothing):
    logits, target = batch(dtype)
    ours, theirs = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    loss = SmoothedCrossEntropy.apply(ours, target, 0, smoothing)
    expected = F.cross_entropy(theirs.float(), target, ignore_index=0, label_smoothing=smoothing, reduction="sum")
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(expected.item(), rel=1e-6)
    (2 * loss).backward()
    (2 * expected).backward()
    assert ours.grad.dtype == dtype
    assert torch.allclose(ours.grad.float(), theirs.grad.float(), atol=tolerance, rtol=tolerance)
    assert ours.grad[-3:].abs().sum() == 0  # padding gets no gradient


def test_padding_costs_nothing_and_the_backward_runs_once():
    logits, target = batch()
    moved = logits.clone()
    moved[-1] += 100.0
    assert SmoothedCrossEntropy.apply(moved, target, 0, 0.1) == SmoothedCrossEntropy.apply(logits, target, 0, 0.1)
    logits.requires_grad_()
    loss = SmoothedCrossEntropy.apply(logits, target, 0, 0.1)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="runs once"):
        loss.backward()


def test_rdrop_loss_is_the_mean_cross_entropy_plus_the_symmetric_kl_of_the_real_tokens():
    torch.manual_seed(0)
    target = torch.tensor([[5, 6, 7], [8, 9, 0]])  # 0 is padding
    one, other = torch.randn(2, 2, 3, 11).unbind(0)
    ce = torch.nn.functional.cross_entropy(one.flatten(0, 1), target.flatten(), ignore_index=0, reduction="sum")
    loss, reported = translation_loss(one, target, pad_id=0, smoothing=0.0)
    assert torch.allclose(loss, ce) and torch.equal(reported, loss)
    # Two identical copies: no divergence, and the loss is that of one copy.
    loss, reported = translation_loss(torch.cat([one, one]), target, pad_id=0, smoothing=0.0, rdrop=5.0)
    assert torch.allclose(loss, ce) and torch.allclose(reported, ce)
    # Two different copies: the mean cross-entropy, plus alpha / 4 times KL(p||q) + KL(q||p).
    loss, reported = translation_loss(torch.cat([one, other]), target, pad_id=0, smoothing=0.0, rdrop=5.0)
    p, q = one.softmax(-1), other.softmax(-1)
    kl = (p * (p.log() - q.log()) + q * (q.log() - p.log())).sum(-1)[target != 0].sum()
    ce_other = torch.nn.functional.cross_entropy(other.flatten(0, 1), target.flatten(), ignore_index=0, reduction="sum")
    assert torch.allclose(reported, (ce + ce_other) / 2)
    assert torch.allclose(loss, (ce + ce_other) / 2 + 5.0 / 4 * kl) and kl > 0
    # What the model says at a padding position counts for nothing.
    moved = other.clone()
    moved[1, 2] += 3.0
    assert torch.allclose(translation_loss(torch.cat([one, moved]), target, pad_id=0, smoothing=0.0, rdrop=5.0)[0], loss)


