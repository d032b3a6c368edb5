"""Speed the model's text does not show: what training and translation put into the textbook model
(model.py) so that a step on a CPU costs less, with the same arithmetic.

`apply(model)` swaps, in place, every nn.Dropout for NumpyDropout (a cheaper random mask), every
nn.Linear for RoundedLinear (rows padded to shapes that recur, for oneDNN's kernel cache), every
SelfAttention for FastSelfAttention (PyTorch's fused attention on a GPU; decoding attends over its
cache in fp32 under bf16 on a CPU) and every CrossAttention for FoldedCrossAttention (the beams of
a sentence share its memory). Each is its class's subclass with another forward: the parameters,
the checkpoint's keys and the results are the same (tests/test_model.py holds each to it), and a
model without the swap is the same model, slower. The trainer applies it unless `train.fast` is
false, and so does every model built from a checkpoint unless asked not to (build_model(faster=False)).
The rest of the seam: the chunked loss (loss.py; train.fast false trains with F.cross_entropy) and
what a training or translating process sets before its first product (the end of this file).
"""

import ctypes
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtkit.model import CrossAttention, SelfAttention, attend, merge_heads, split_heads


def apply(model: nn.Module) -> nn.Module:
    """`model`, its dropouts, linear layers and attentions swapped in place (the exact classes only)."""
    swaps = {nn.Dropout: NumpyDropout, nn.Linear: RoundedLinear, SelfAttention: FastSelfAttention,
             CrossAttention: FoldedCrossAttention}
    for module in model.modules():
        module.__class__ = swaps.get(type(module), type(module))
    return model


def compiles_per_shape(x: Tensor) -> bool:
    """On a CPU in bf16/fp16, oneDNN runs the products of x: it compiles a kernel for every matrix
    shape it meets (~2 ms on an Intel Xeon with AMX, more than the product itself), keeps the last few."""
    return x.device.type == "cpu" and (torch.is_autocast_enabled("cpu") or x.dtype in (torch.bfloat16, torch.float16))


def fused_is_faster(device: str) -> bool:
    """Whether PyTorch's fused attention (F.scaled_dot_product_attention: flash or memory-efficient
    attention on a GPU) beats the formula on `device`. Not on a CPU: at translation's lengths its
    CPU kernel (tuned for long sequences) took 17-32 ms forward + backward in bf16 where the formula
    took 4-6 ms, and beam search spent half its time in it."""
    return device != "cpu"


def fused(q: Tensor, k: Tensor, v: Tensor, **options) -> Tensor:
    """model.attend, by the fused kernel where fused_is_faster and the weights are not asked for
    (the fused kernels never make them)."""
    if options["weights"] is not None or not fused_is_faster(q.device.type):
        return attend(q, k, v, **options)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=options["keep"], dropout_p=options["dropout"],
                                          is_causal=options["causal"])


def cached_in_fp32(q: Tensor, k: Tensor, v: Tensor, **options) -> Tensor:
    """fused(); decoding with a cache (more keys than queries) on a CPU in bf16 attends in fp32: it
    meets a new key length every step, so in bf16 a new kernel to compile every step; in fp32 nothing
    is compiled, and products this small run as fast (greedy +11%)."""
    if k.size(2) == q.size(2) or not compiles_per_shape(q):
        return fused(q, k, v, **options)
    with torch.autocast(q.device.type, enabled=False):
        return attend(q.float(), k.float(), v.float(), **options)


class FastSelfAttention(SelfAttention):
    attend = staticmethod(cached_in_fp32)


class FoldedCrossAttention(CrossAttention):
    """CrossAttention; beam search's K rows of a sentence look at the same memory, so instead of
    copying it K times their queries are folded into one row of K*T queries: beam 5 +3%, less memory."""

    attend = staticmethod(fused)

    def forward(self, x: Tensor, kv: tuple[Tensor, Tensor], *, keep: Tensor, weights: list | None = None) -> Tensor:
        q = split_heads(self.q(x), self.heads)  # (N, T, D) -> (N, H, T, E)
        n, h, t, e = q.shape
        b = kv[0].size(0)
        if n != b:
            q = q.view(b, n // b, h, t, e).transpose(1, 2).reshape(b, h, n // b * t, e)  # (B, H, K*T, E)
        y = self.attend(q, *kv, keep=keep, causal=False, dropout=self.dropout if self.training else 0.0,
                        weights=weights)
        if n != b:  # unfold: (B, H, K*T, last) -> (N, H, T, last), the output and the weights
            def unfold(z: Tensor) -> Tensor:
                return z.view(b, h, n // b, t, -1).transpose(1, 2).reshape(n, h, t, -1)

            y = unfold(y)
            if weights is not None:
                weights[-1] = unfold(weights[-1])
        return self.out(merge_heads(y))


class NumpyDropout(nn.Dropout):
    """nn.Dropout, with a cheaper random mask on a CPU, where drawing random numbers is the cost (F.dropout
    of a 3,700 x 1,024 bf16 activation: 20 ms forward + backward, a fifth of a step). 16 random bits per
    element (p within 1/65536) from numpy's PCG64, twice as fast as torch's generator, which seeds it
    (torch.manual_seed still decides every mask); made in x's precision, scaled once, as F.dropout's."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, training=True)
        n = x.numel()
        bits = np.random.PCG64(torch.randint(2**63 - 1, ()).item()).random_raw((n + 3) // 4)  # 4 x 16 bits each
        keep = torch.from_numpy(bits).view(torch.int16)[:n].ge(min(round(self.p * 65536), 65535) - 32768).view(x.shape)
        return x * keep.view(torch.uint8).to(x.dtype).mul_(1.0 / (1.0 - self.p))  # bytes convert 6x as fast as bools


# Linear layers: y = x W^T + b over the last dimension, every other dimension folded into rows.

def rounded_rows(rows: int) -> int:
    """`rows` rounded up to one of 8 values per doubling (1,017 -> 1,024, 99 -> 104, 7 -> 7)."""
    step = 1 << max(0, rows.bit_length() - 4)
    return -(-rows // step) * step


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear; in training where kernels are compiled per shape, with zero rows added up to
    rounded_rows and dropped after: a batch's B*L rows are a new number nearly every step, rounded the
    same few come back (a fifth of a 1,024-token step went to compiling). Decoding gained nothing."""
    rows = x.numel() // x.size(-1)
    padded = rounded_rows(rows)
    if not compiles_per_shape(x) or not torch.is_grad_enabled() or padded == rows:
        return F.linear(x, weight, bias)
    flat = x.reshape(rows, x.size(-1))
    flat = torch.cat([flat, flat.new_zeros(padded - rows, flat.size(1))])
    return F.linear(flat, weight, bias)[:rows].view(*x.shape[:-1], weight.size(0))


class RoundedLinear(nn.Linear):  # nn.Linear, through linear()
    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


# The process: what every training and translating process sets before its first product.

def limit_kernel_caches() -> None:
    """oneDNN, which runs the bf16 matrix products on this CPU, compiles a kernel for each matrix
    shape and caches up to 1,024 of them (and PyTorch's ideep layer caches as many again).
    Decoding meets a new shape at nearly every step, as the prefix grows and the batch shrinks, so
    a translate process grew to 1.4 GB. 32 of each keep beam search on test_2016 under 0.6 GB at
    the same speed (measured). Training meets a new shape with nearly every batch: uncapped, a
    45-minute Multi30k `mtkit run` peaked at 4.7 GB; capped, bench_train peaks 22% lower at the
    same speed (docs/results.md).
    Both are read at the first bf16 product, so this only acts if none has run yet in this
    process; the user's own settings win."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "32")
    os.environ.setdefault("LRU_CACHE_CAPACITY", "32")


def keep_freed_memory() -> bool:
    """Let the memory a training or decoding step frees serve the next step. glibc's malloc maps
    large blocks fresh from the kernel and hands the top of its heap back as soon as a few tens of
    MB are free there, so a step's large tensors (the feed-forward activations, a loss chunk's 16 MB
    of log-probabilities) fault their pages in, zeroed, again at every step. Here blocks up to 32 MB
    come from the heap, and up to 1 GB of it is kept: on an Intel Xeon with AMX, 1,024-token steps
    +4-7%, beam search +7-13%, peak RSS +10-20 MB (docs/performance.md). Only glibc on Linux; the
    user's own MALLOC_ settings win. Returns whether it acted."""
    if sys.platform != "linux" or any(name.startswith("MALLOC_") for name in os.environ):
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # the C library this process runs on
    m_trim_threshold, m_mmap_threshold = -1, -3
    # Both: setting either one stops glibc moving its mmap threshold up from 128 KB.
    return bool(mallopt and mallopt(m_mmap_threshold, 32 << 20) and mallopt(m_trim_threshold, 1 << 30))
