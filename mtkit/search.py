"""Search: turning the model's next-token distributions into a translation.

The decoder gives, for a prefix, a distribution over the next token. Greedy search takes the most
likely token at every step. It is fast and often good, but it can never take back a choice: a
token that looks best now may lead to a poor sentence. (Beam search, which keeps several
prefixes alive, arrives with issue [3/7].)

Both only call model.encode and model.decode, and decode incrementally: the DecoderCache keeps
each layer's keys/values, so each step feeds just the newest token.
"""

import torch
from torch import Tensor

from mtkit.model import DecoderCache, Transformer


def max_lengths(src_lengths: Tensor, a: float, b: int, cap: int) -> Tensor:
    """How many tokens each output may have (EOS not counted): a * source length + b, within the
    model's positions."""
    return (src_lengths.float() * a + b).long().clamp(min=1, max=cap)


@torch.no_grad()
def greedy(model: Transformer, src: Tensor, *, bos_id: int, eos_id: int, max_len: Tensor) -> list[list[int]]:
    """src (B, S) padded source ids (with EOS) -> for each sentence its output ids (no BOS/EOS).

    max_len (B,): the most tokens a sentence may get before EOS is forced."""
    memory = model.encode(src)
    b = src.size(0)
    last = torch.full((b, 1), bos_id, dtype=torch.long, device=src.device)
    finished = torch.zeros(b, dtype=torch.bool, device=src.device)
    outputs = []
    cache = DecoderCache()
    for step in range(int(max_len.max()) + 1):
        logits, cache = model.decode(last, memory, cache=cache)  # (B, 1, V): only the newest token
        best = logits[:, -1].argmax(dim=-1)
        best = torch.where(step >= max_len, eos_id, best)  # out of room: end the sentence here
        best = best.masked_fill(finished, eos_id)
        outputs.append(best)
        finished |= best.eq(eos_id)
        if finished.all():
            break
        last = best[:, None]
    result = []
    for row in torch.stack(outputs, dim=1).tolist():
        result.append(row[:row.index(eos_id)] if eos_id in row else row)
    return result
