"""Speed the model's text does not show: what training and translation put into the textbook model
(model.py) so that a step on a CPU costs less, with the same arithmetic.

`apply(model)` swaps, in place, every nn.Dropout for NumpyDropout (a cheaper random mask), every
nn.Linear for RoundedLinear (rows padded to shapes that recur, for oneDNN's kernel cache), and
every SelfAttention for CachedInFp32 (decoding attends over its cache in fp32 under bf16). Each is
its class's subclass with another forward: the parameters, the checkpoint's keys and the results
are the same (tests/test_model.py holds each to it), and a model without the swap is the same
model, slower. The trainer applies it, and so does every model built from a checkpoint.
"""

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mtkit.model import SelfAttention, attend


def apply(model: nn.Module) -> nn.Module:
    """`model`, its dropouts, linear layers and self-attentions swapped in place (the exact classes only)."""
    swaps = {nn.Dropout: NumpyDropout, nn.Linear: RoundedLinear, SelfAttention: CachedInFp32}
    for module in model.modules():
        module.__class__ = swaps.get(type(module), type(module))
    return model


def compiles_per_shape(x: Tensor) -> bool:
    """On a CPU in bf16/fp16, oneDNN runs the products of x: it compiles a kernel for every matrix
    shape it meets (~2 ms on an Intel Xeon with AMX, more than the product itself), keeps the last few."""
    return x.device.type == "cpu" and (torch.is_autocast_enabled("cpu") or x.dtype in (torch.bfloat16, torch.float16))


class CachedInFp32(SelfAttention):
    """SelfAttention; decoding with a cache (more keys than queries) on a CPU in bf16 attends in
    fp32: it meets a new key length every step, so in bf16 a new kernel to compile every step; in
    fp32 nothing is compiled, and products this small run as fast (greedy +11%)."""

    @staticmethod
    def attend(q: Tensor, k: Tensor, v: Tensor, **options) -> Tensor:
        if k.size(2) == q.size(2) or not compiles_per_shape(q):
            return attend(q, k, v, **options)
        with torch.autocast(q.device.type, enabled=False):
            return attend(q.float(), k.float(), v.float(), **options)


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
