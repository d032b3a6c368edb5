"""The training loss: label-smoothed cross-entropy over the target vocabulary, with its gradient
written out, and R-Drop's consistency term on top.

Cross-entropy with label smoothing ε (Szegedy et al. 2016): the model is asked to give the right
token 1 - ε of the probability and to spread ε evenly over the V tokens of the vocabulary. With
log-probabilities log p = log_softmax(z) of the logits z, one target token y costs

    loss = -(1 - ε) log p[y] - (ε / V) Σ_j log p[j]

and its gradient with respect to the logits is the softmax minus that target distribution:

    d loss / d z[j] = p[j] - (1 - ε) [j = y] - ε / V

PyTorch's F.cross_entropy computes the same numbers, but on a CPU its backward pass over the
vocabulary (fill a zero gradient, scatter, add the smoothing part, the log-softmax backward, casts)
is slow: forward and backward took 39 ms against this class's 20 for 1,000 target tokens and 8,000
words, a tenth of a training step. The formula above is the whole backward pass.
"""

import torch
import torch.nn.functional as F


class SmoothedCrossEntropy(torch.autograd.Function):
    """logits (N, V) in any float type, target (N,) -> the loss summed over the N tokens, in
    fp32 (or float64); tokens equal to pad_id cost nothing and get no gradient. The backward pass
    turns the saved log-probabilities into the gradient in place (a copy cost 6 ms a step), so it
    runs once per forward pass: a second one is refused, not computed wrongly."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, pad_id: int, smoothing: float) -> torch.Tensor:
        # Read in bf16, computed in fp32 (float64 stays float64: the tests check the gradient in it).
        log_p = torch.log_softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
        real = target.ne(pad_id)
        per_token = -(1 - smoothing) * log_p.gather(1, target[:, None]).squeeze(1)
        if smoothing:
            per_token -= smoothing / log_p.size(1) * log_p.sum(dim=1)
        ctx.save_for_backward(log_p, target, real)
        ctx.smoothing, ctx.dtype, ctx.spent = smoothing, logits.dtype, False
        return per_token.masked_fill(~real, 0.0).sum()

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        if ctx.spent:  # the saved log-probabilities became the first call's gradient
            raise RuntimeError("SmoothedCrossEntropy's backward runs once per forward")
        ctx.spent = True
        log_p, target, real = ctx.saved_tensors
        eps, scale = ctx.smoothing, (grad_loss * real)[:, None]  # 0 on padding
        grad = log_p.exp_().sub_(eps / log_p.size(1)).mul_(scale)  # p - ε/V, in place of log p
        grad.scatter_add_(1, target[:, None], -(1 - eps) * scale)  # - (1 - ε) at the target token
        return grad.to(ctx.dtype), None, None, None


def translation_loss(logits: torch.Tensor, target: torch.Tensor, *, pad_id: int, smoothing: float,
                     rdrop: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(the loss to minimize, the cross-entropy to report), both sums over the target tokens, in fp32.
    With rdrop > 0 the batch went through the model twice, stacked (so each copy had its own dropout
    masks): the loss is the mean of the two cross-entropies plus rdrop / 4 times the two outputs'
    symmetric KL divergence; R-Drop (Liang et al. 2021) with the paper's alpha, halved so that the
    cross-entropy part keeps the scale of one pass."""
    copies = 2 if rdrop > 0 else 1
    ce = SmoothedCrossEntropy.apply(logits.flatten(0, 1), target.repeat(copies, 1).flatten(), pad_id,
                                    smoothing) / copies
    if not rdrop:
        return ce, ce
    a, b = F.log_softmax(logits.float(), dim=-1).chunk(2)
    kl = F.kl_div(a, b, log_target=True, reduction="none") + F.kl_div(b, a, log_target=True, reduction="none")
    return ce + rdrop / 4 * kl.masked_fill((target == pad_id).unsqueeze(-1), 0.0).sum(), ce
