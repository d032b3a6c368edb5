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
Each pass over a chunk's logits costs about as much as a product with them (a CPU's memory, not its
arithmetic, is the limit there), so the loss makes few: padding tokens are left out before the
output layer, and the gradient's constant part -ε/V goes through the products in closed form.
"""

import torch
import torch.nn.functional as F

from mtkit.fast import compiles_per_shape, rounded_rows

CHUNK = 512  # tokens at a time: of 256, 512 and 1,024, the fastest at 4,096-token steps


def smoothed_cross_entropy(logits: torch.Tensor, target: torch.Tensor, smoothing: float
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """logits (n, V) of n real tokens, target (n,) -> (the loss summed over the n tokens, their plain
    cross-entropy -Σ log p[y] (the loss without smoothing, for the log), the loss's gradient with
    respect to the logits but for its constant part), in fp32 (float64 stays float64).
    The constant part, -ε/V on every logit, is the same for every token and word: the caller adds
    it after the output layer's products, in closed form (ProjectedCrossEntropy), which saves a pass
    over the chunk's logits. The loss needs log p only at y and summed over the row, so it is
    found from the softmax, one pass: log p[y] = log(p[y]), log-sum-exp = z[y] - log p[y], and
    Σ_j log p[j] = Σ_j z[j] - V log-sum-exp."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # once, not in every op below
    p = torch.softmax(logits, dim=-1)
    y = target[:, None]
    p_y = p.gather(1, y).squeeze(1)
    # p[y] underflows only where the model gives the right word less than e^-103 in fp32: it then
    # counts as that much in the loss shown (its gradient stays exact).
    tiny = torch.finfo(p.dtype).smallest_normal * torch.finfo(p.dtype).eps
    nll = -p_y.clamp_min(tiny).log()
    loss = (1 - smoothing) * nll
    if smoothing:
        log_sum_exp = logits.gather(1, y).squeeze(1) + nll
        loss = loss + smoothing * log_sum_exp - smoothing / logits.size(1) * logits.sum(dim=1)
    grad = p.scatter_(1, y, (p_y - (1 - smoothing))[:, None])  # p - (1 - ε) at y; -ε/V is the caller's
    return loss.sum(), nll.sum(), grad


class ProjectedCrossEntropy(torch.autograd.Function):
    """states (N, D): the decoder's last states; weight (V, D) and bias (V,) or None: the output
    layer; target (N,) -> (the loss summed over the N tokens, their plain cross-entropy: see
    smoothed_cross_entropy), in fp32. Under autocast the products run in its precision, as the
    output layer's own would. Padding tokens never reach the output layer: only the real tokens'
    states are gathered (about 9% of a 4,096-token Multi30k batch's target tokens are padding)."""

    @staticmethod
    def forward(ctx, states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, target: torch.Tensor,
                pad_id: int, smoothing: float) -> torch.Tensor:
        device = states.device.type
        low = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else states.dtype
        wide = torch.promote_types(low, torch.float32)
        real = target.ne(pad_id).nonzero().squeeze(1)
        n = real.numel()
        # Zero rows up to fast.rounded_rows, so that compiled kernels for these products come back
        # from step to step, as in fast.linear; the loss leaves them out.
        rows = rounded_rows(n) if compiles_per_shape(states) else n
        x = F.pad(states.index_select(0, real).to(low), (0, 0, 0, rows - n))
        target = target.index_select(0, real)
        w, b = weight.to(low), None if bias is None else bias.to(low)
        grad_x = torch.empty(rows, x.size(1), dtype=low, device=states.device)
        loss = nll = torch.zeros((), dtype=wide, device=states.device)
        grad_w = torch.zeros(weight.shape, dtype=wide, device=states.device)  # summed in place over the chunks
        grad_b = None if b is None else torch.zeros(b.shape, dtype=wide, device=states.device)
        with torch.autocast(device, enabled=False):
            for start in range(0, rows, CHUNK):
                chunk, tokens = x[start:start + CHUNK], max(0, min(CHUNK, n - start))
                logits = F.linear(chunk, w, b)
                part, plain, part_grad = smoothed_cross_entropy(logits[:tokens], target[start:start + tokens], smoothing)
                loss, nll = loss + part, nll + plain
                grad = logits  # the gradient takes the logits' place, in their precision; zero rows get none
                grad[:tokens].copy_(part_grad)
                grad[tokens:].zero_()
                if b is not None:
                    grad_b.add_(grad.sum(dim=0, dtype=wide))
                torch.mm(grad, w, out=grad_x[start:start + CHUNK])  # what the chunk's loss asks of its states
                grad_w.add_(grad.t() @ chunk)                       # ... and of the output weights
            # The gradient's constant part, -ε/V on every logit of every token, through the products.
            shift = smoothing / weight.size(0)
            grad_x = grad_x[:n].to(wide).sub_(shift * w.sum(dim=0, dtype=wide))
            grad_w.sub_(shift * x.sum(dim=0, dtype=wide))
            grad_b = None if b is None else grad_b.sub_(shift * n)
        ctx.save_for_backward(real, grad_x, grad_w, grad_b)
        ctx.shape, ctx.dtypes = states.shape, (states.dtype, weight.dtype)
        ctx.mark_non_differentiable(nll)
        return loss, nll

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_nll: torch.Tensor):
        real, grad_x, grad_w, grad_b = ctx.saved_tensors
        grad_states = grad_x.new_zeros(ctx.shape, dtype=ctx.dtypes[0])
        grad_states.index_copy_(0, real, (grad_x * grad_loss).to(ctx.dtypes[0]))
        return (grad_states, (grad_w * grad_loss).to(ctx.dtypes[1]),
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
