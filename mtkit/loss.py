"""The training loss: label-smoothed cross-entropy over the target vocabulary, computed together
with the output layer a chunk of tokens at a time, its gradient written out; R-Drop's term on top.

Cross-entropy with label smoothing ε (Szegedy et al. 2016): the model is asked to give the right
token 1 - ε of the probability and to spread ε evenly over the V tokens of the vocabulary. With
log-probabilities log p = log_softmax(z) of the logits z, one target token y costs

    loss = -(1 - ε) log p[y] - (ε / V) Σ_j log p[j]

and its gradient with respect to the logits is the softmax minus that target distribution:

    d loss / d z[j] = p[j] - (1 - ε) [j = y] - ε / V

The logits of a batch are N tokens x V words: 4,096 target tokens and 8,000 words make 33 million
numbers, 131 MB in fp32. PyTorch's way (the output layer makes them all, F.cross_entropy reads
them, the backward pass writes their gradient and goes back through the output layer) holds
several such blocks, and on a CPU each comes fresh from the operating system at every step. Here
the output layer and the loss run 512 tokens at a time: that chunk's logits, its loss, its gradient
by the formula above, and at once what that gradient means for the decoder's states and for the
output weights. The backward pass only scales those. No block larger than a chunk's logits is ever
made: 4,096-token training steps ran 20% faster on an Intel Xeon with AMX (docs/performance.md).
"""

import torch
import torch.nn.functional as F

from mtkit.fast import compiles_per_shape, rounded_rows

CHUNK = 512  # tokens at a time: of 256, 512 and 1,024, the fastest at 4,096-token steps


def smoothed_cross_entropy(logits: torch.Tensor, target: torch.Tensor, pad_id: int, smoothing: float
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (n, V), target (n,) -> (the loss summed over the n tokens, their plain cross-entropy
    -Σ log p[y] (the loss without smoothing, for the log), the loss's gradient with respect to the
    logits), in fp32 (float64 stays float64). Tokens equal to pad_id cost nothing and get no gradient."""
    log_p = torch.log_softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))
    real = target.ne(pad_id)
    nll = -log_p.gather(1, target[:, None]).squeeze(1).masked_fill(~real, 0.0)
    per_token = (1 - smoothing) * nll
    if smoothing:
        per_token -= smoothing / log_p.size(1) * log_p.sum(dim=1)
    grad = log_p.exp_().sub_(smoothing / log_p.size(1)).mul_(real[:, None])  # p - ε/V, in place of log p
    grad.scatter_add_(1, target[:, None], -(1 - smoothing) * real[:, None].to(grad.dtype))  # - (1 - ε) at y
    return per_token.masked_fill(~real, 0.0).sum(), nll.sum(), grad


class ProjectedCrossEntropy(torch.autograd.Function):
    """states (N, D): the decoder's last states; weight (V, D) and bias (V,) or None: the output
    layer; target (N,) -> (the loss summed over the N tokens, their plain cross-entropy: see
    smoothed_cross_entropy), in fp32. Under autocast the products run in its precision, as the
    output layer's own would."""

    @staticmethod
    def forward(ctx, states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                pad_id: int, smoothing: float) -> torch.Tensor:
        device = states.device.type
        low = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else states.dtype
        n = states.size(0)
        # Zero rows (padding tokens) up to fast.rounded_rows, so that compiled kernels for these
        # products come back from step to step, as in fast.linear.
        rows = rounded_rows(n) if compiles_per_shape(states) else n
        x = F.pad(states.to(low), (0, 0, 0, rows - n)) if rows > n else states.to(low)
        target = F.pad(target, (0, rows - n), value=pad_id)
        w, b = weight.to(low), None if bias is None else bias.to(low)
        wide = torch.promote_types(low, torch.float32)
        grad_x = torch.empty(rows, x.size(1), dtype=low, device=states.device)
        loss = nll = grad_w = grad_b = None
        with torch.autocast(device, enabled=False):
            for start in range(0, rows, CHUNK):
                chunk = x[start:start + CHUNK]
                part, plain, grad = smoothed_cross_entropy(F.linear(chunk, w, b), target[start:start + CHUNK],
                                                           pad_id, smoothing)
                loss, nll = (part, plain) if loss is None else (loss + part, nll + plain)
                if b is not None:
                    grad_b = grad.sum(dim=0) if grad_b is None else grad_b.add_(grad.sum(dim=0))
                grad = grad.to(low)
                torch.mm(grad, w, out=grad_x[start:start + CHUNK])  # what the chunk's loss asks of its states
                part = grad.t() @ chunk                             # ... and of the output weights
                grad_w = part.to(wide) if grad_w is None else grad_w.add_(part)
        ctx.save_for_backward(grad_x[:n], grad_w, grad_b)
        ctx.dtypes = states.dtype, weight.dtype
        ctx.mark_non_differentiable(nll)
        return loss, nll

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_nll: torch.Tensor):
        grad_x, grad_w, grad_b = ctx.saved_tensors
        return ((grad_x.to(grad_loss.dtype) * grad_loss).to(ctx.dtypes[0]), (grad_w * grad_loss).to(ctx.dtypes[1]),
                None if grad_b is None else (grad_b * grad_loss).to(ctx.dtypes[1]), None, None, None)


@torch.no_grad()
def summed_nll(states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
               pad_id: int) -> float:
    """The plain cross-entropy -Σ log p[y] of states (B, T, D) against target (B, T), made CHUNK
    tokens at a time as in training, so that validation never holds more than a chunk's logits
    (all of them at once, in fp32, took six times a training step's memory at the same batch)."""
    x, y, total = states.flatten(0, 1), target.flatten(), 0.0
    for start in range(0, x.size(0), CHUNK):
        logits = F.linear(x[start:start + CHUNK], weight, bias)
        total += F.cross_entropy(logits.float(), y[start:start + CHUNK], ignore_index=pad_id, reduction="sum").item()
    return total


def translation_loss(states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor, *,
                     pad_id: int, smoothing: float, rdrop: float = 0.0, chunked: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """states (B, T, D), the output layer (model.Transformer.output_layer), target (B, T) -> (the
    loss to minimize, its label-smoothed cross-entropy and the plain one, to report), all sums over
    the target tokens, in fp32. chunked=False (train.fast: false): PyTorch's F.cross_entropy on all
    the logits at once, the reference that ProjectedCrossEntropy equals.
    With rdrop > 0 the batch went through the model twice, stacked (so each copy had its own dropout
    masks): the loss is the mean of the two cross-entropies plus rdrop / 4 times the two outputs'
    symmetric KL divergence; R-Drop (Liang et al. 2021) with the paper's alpha, halved so that the
    cross-entropy part keeps the scale of one pass. The divergence needs all the logits at once."""
    copies = 2 if rdrop > 0 else 1
    targets = target.repeat(copies, 1).flatten()
    if chunked:
        ce, nll = ProjectedCrossEntropy.apply(states.flatten(0, 1), weight, bias, targets, pad_id, smoothing)
    else:
        logits = F.linear(states, weight, bias).flatten(0, 1)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        ce = F.cross_entropy(logits, targets, ignore_index=pad_id, label_smoothing=smoothing, reduction="sum")
        nll = F.cross_entropy(logits.detach(), targets, ignore_index=pad_id, reduction="sum")
    ce, nll = ce / copies, nll / copies
    if not rdrop:
        return ce, ce, nll
    a, b = F.log_softmax(F.linear(states, weight, bias).float(), dim=-1).chunk(2)
    kl = F.kl_div(a, b, log_target=True, reduction="none") + F.kl_div(b, a, log_target=True, reduction="none")
    return ce + rdrop / 4 * kl.masked_fill((target == pad_id).unsqueeze(-1), 0.0).sum(), ce, nll
