"""The encoder-decoder Transformer ("Attention Is All You Need", Vaswani et al. 2017), top to bottom.

Reading order: ModelConfig -> positions -> attention -> feed-forward -> encoder layer -> decoder
layer -> DecoderCache -> Transformer. This file imports nothing from mtkit.

Shape legend (batch-first everywhere):
    B batch   S source length   T target length   D d_model   H heads   E head dim (D / H)
    V vocabulary size   K beam size (search.py folds beams into the batch: B*K rows)

The big picture: the encoder reads the source tokens and turns each into a D-dimensional vector
that knows about its context (self-attention: every source token looks at every other one). The
decoder writes the translation one token at a time; each of its layers first looks back at the
target tokens written so far (masked, "causal" self-attention: no peeking at the future), then
looks at the encoder's vectors (cross-attention: this is where the source informs the
translation), then thinks alone (feed-forward). A linear layer and a softmax turn the decoder's
last vectors into a distribution over the next token.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class ModelConfig:
    """The config's model section (config.ModelSection: the defaults and their checks) and what
    the data decides (vocabulary sizes, padding id)."""
    src_vocab: int
    tgt_vocab: int
    d_model: int                      # D: the width of every token's vector
    heads: int                        # H: attention heads, each of width D / H
    enc_layers: int
    dec_layers: int
    ff_dim: int                       # the feed-forward's inner width (the paper: 4 D)
    dropout: float
    attention_dropout: float
    activation: str                   # "relu" (the paper), "gelu" or "silu" (x * sigmoid(x), Marian's "swish")
    norm: str                         # "pre": x + f(LN(x)); "post": LN(x + f(x)), the paper's Add & Norm
    positions: str                    # "sinusoidal" (the paper), "sinusoidal-halves" (Marian's layout of
    max_positions: int                # the same table) or "learned"
    tie_embeddings: bool              # decoder input embedding == output projection
    share_src_tgt: bool = False       # source embedding too (needs one joint vocabulary)
    pad_id: int = 0
    logits_bias: bool = False         # a learned bias added to the output logits (Marian's final_logits_bias)
    no_residual_layer: int | None = None  # an encoder layer (1 = first) with no attention residual: EncoderLayer


# ---------------------------------------------------------------------------------------------
# Positions. Attention itself is blind to order (it is a weighted sum over a set), so each
# token's embedding gets a vector that says where it is.

def sinusoidal_positions(n: int, d: int, halves: bool = False) -> Tensor:
    """(n, D): position p, dimension 2i -> sin(p / 10000^(2i/D)), 2i+1 -> cos(same). Each pair of
    dimensions is a clock with its own period, so nearby positions get similar vectors.
    halves: Marian's layout of the same numbers, all the sines in the first D/2 dimensions and the
    cosines in the second (computed in float64 as Marian's are, so an imported model matches)."""
    dtype = torch.float64 if halves else torch.float32
    position = torch.arange(n, dtype=dtype)[:, None]
    frequency = torch.exp(torch.arange(0, d, 2, dtype=dtype) * (-math.log(10000.0) / d))
    if halves:
        return torch.cat([torch.sin(position * frequency), torch.cos(position * frequency)], dim=1).float()
    table = torch.zeros(n, d)
    table[:, 0::2] = torch.sin(position * frequency)
    table[:, 1::2] = torch.cos(position * frequency)
    return table


class Embedding(nn.Module):
    """Token embedding scaled by sqrt(D), plus position, then dropout."""

    def __init__(self, vocab: int, cfg: ModelConfig):
        super().__init__()
        self.tokens = nn.Embedding(vocab, cfg.d_model, padding_idx=cfg.pad_id)
        # std D^-0.5 so that, after the sqrt(D) scale, embeddings have unit size like the positions.
        nn.init.normal_(self.tokens.weight, std=cfg.d_model ** -0.5)
        nn.init.zeros_(self.tokens.weight[cfg.pad_id])
        self.scale = math.sqrt(cfg.d_model)
        if cfg.positions == "learned":
            self.learned = nn.Embedding(cfg.max_positions, cfg.d_model)
            nn.init.normal_(self.learned.weight, std=cfg.d_model ** -0.5)
        else:
            self.learned = None
            # persistent=False: computed, not learned, so it stays out of checkpoints.
            self.register_buffer("table", sinusoidal_positions(cfg.max_positions, cfg.d_model,
                                                               halves=cfg.positions == "sinusoidal-halves"),
                                 persistent=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, ids: Tensor, start: int = 0) -> Tensor:
        """ids (B, L) -> (B, L, D). `start` is the position of ids[:, 0] (the cache length when
        the decoder runs one step at a time)."""
        length = ids.size(1)
        if self.learned is not None:
            pos = self.learned.weight[start:start + length]
        else:
            pos = self.table[start:start + length]
        return self.dropout(self.tokens(ids) * self.scale + pos)


# ---------------------------------------------------------------------------------------------
# Attention. Each token asks a question (query Q) and every token it may look at offers a label
# (key K) and a content (value V). softmax(Q K^T / sqrt(E)) says how much each query attends to
# each key; the output is that weighted mix of the values. Multi-head: H small attentions of size
# E = D/H run side by side, each free to look for something different, then get concatenated.

def split_heads(x: Tensor, heads: int) -> Tensor:
    b, length, d = x.shape
    return x.view(b, length, heads, d // heads).transpose(1, 2)  # (B, L, D) -> (B, H, L, E)


def merge_heads(x: Tensor) -> Tensor:
    b, h, length, e = x.shape
    return x.transpose(1, 2).reshape(b, length, h * e)  # (B, H, L, E) -> (B, L, D)


def attend(q: Tensor, k: Tensor, v: Tensor, *, keep: Tensor | None, causal: bool, dropout: float,
           weights: list | None) -> Tensor:
    """q (B, H, Lq, E), k/v (B, H, Lk, E) -> (B, H, Lq, E).

    keep: bool, broadcastable to (B, H, Lq, Lk), True = this key may be attended to (SDPA's
    polarity; Transformer._keep converts the padding mask to it in one place).
    weights: when a list is given, the attention probabilities (B, H, Lq, Lk) are appended to it
    (visualization). This is the formula, as written; PyTorch's fused kernel for it
    (F.scaled_dot_product_attention) gives the same numbers, and fast.py uses it where it is faster.
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, H, Lq, Lk)
    if causal:
        lq, lk = scores.shape[-2:]
        scores = scores.masked_fill(~torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril(lk - lq),
                                    float("-inf"))
    if keep is not None:
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = scores.softmax(dim=-1)
    if weights is not None:
        weights.append(probs.detach())
    return F.dropout(probs, dropout, training=dropout > 0) @ v


class SelfAttention(nn.Module):
    """Queries, keys and values all come from the same sequence; one fused Q/K/V projection."""

    attend = staticmethod(attend)  # the formula above (fast.py swaps in faster ways to the same numbers)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads, self.dropout = cfg.heads, cfg.attention_dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)

    def forward(self, x: Tensor, *, keep: Tensor | None = None, causal: bool = False,
                past: tuple[Tensor, Tensor] | None = None, weights: list | None = None
                ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """x (B, L, D) -> (B, L, D), and this call's keys/values (B, H, past + L, E) so the
        decoder can cache them: at the next step only the new token's K/V are computed."""
        q, k, v = (split_heads(t, self.heads) for t in self.qkv(x).chunk(3, dim=-1))
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
            # Trap: with a cache, a one-token query is the newest position and may see every
            # cached key; SDPA's is_causal would align the mask top-left and hide all but the
            # first. Several new tokens after a cache need an offset mask (tril with a diagonal).
            if causal and q.size(2) > 1:
                lq, lk = q.size(2), k.size(2)
                keep = torch.ones(lq, lk, dtype=torch.bool, device=x.device).tril(lk - lq)
            causal = False
        dropout = self.dropout if self.training else 0.0
        y = self.attend(q, k, v, keep=keep, causal=causal, dropout=dropout, weights=weights)
        return self.out(merge_heads(y)), (k, v)


class CrossAttention(nn.Module):
    """The decoder's queries look at the encoder's memory: where source meets target."""

    attend = staticmethod(attend)

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.heads, self.dropout = cfg.heads, cfg.attention_dropout
        self.q = nn.Linear(cfg.d_model, cfg.d_model)
        self.kv = nn.Linear(cfg.d_model, 2 * cfg.d_model)
        self.out = nn.Linear(cfg.d_model, cfg.d_model)

    def memory_kv(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        """memory (B, S, D) -> keys and values (B, H, S, E): computed once per sentence."""
        k, v = self.kv(memory).chunk(2, dim=-1)
        return split_heads(k, self.heads), split_heads(v, self.heads)

    def forward(self, x: Tensor, kv: tuple[Tensor, Tensor], *, keep: Tensor,
                weights: list | None = None) -> Tensor:
        """x (N, T, D), kv (B, H, S, E) and keep (B, 1, 1, S) -> (N, T, D). Usually N = B. Beam
        search has N = B*K rows, the K beams of each sentence one after another: each beam looks at
        its sentence's memory (fast.py spares the K copies)."""
        q = split_heads(self.q(x), self.heads)  # (N, T, D) -> (N, H, T, E)
        if q.size(0) != keep.size(0):
            beams = q.size(0) // keep.size(0)
            kv, keep = tuple(t.repeat_interleave(beams, dim=0) for t in kv), keep.repeat_interleave(beams, dim=0)
        y = self.attend(q, *kv, keep=keep, causal=False, dropout=self.dropout if self.training else 0.0,
                        weights=weights)
        return self.out(merge_heads(y))


# ---------------------------------------------------------------------------------------------
# Feed-forward: the same two-layer network applied to every position on its own.

class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.inner = nn.Linear(cfg.d_model, cfg.ff_dim)
        self.outer = nn.Linear(cfg.ff_dim, cfg.d_model)
        self.activation = {"relu": F.relu, "gelu": F.gelu, "silu": F.silu}[cfg.activation]
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.outer(self.dropout(self.activation(self.inner(x))))


# ---------------------------------------------------------------------------------------------
# Layers. Every sublayer f is wrapped in a residual connection and a LayerNorm. Post-norm (the
# paper): x = LN(x + dropout(f(x))). Pre-norm: x = x + dropout(f(LN(x))), which keeps a clean
# identity path from input to output and trains stably without a careful warm-up; it then needs
# one final LayerNorm after the last layer.

class Residual(nn.Module):
    def __init__(self, cfg: ModelConfig, keep_input: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)
        self.pre = cfg.norm == "pre"
        self.keep_input = keep_input  # False: f(x) alone, no residual (EncoderLayer says when)

    def forward(self, x: Tensor, sublayer) -> Tensor:
        skip = x if self.keep_input else 0
        if self.pre:
            return skip + self.dropout(sublayer(self.norm(x)))
        return self.norm(skip + self.dropout(sublayer(x)))


class EncoderLayer(nn.Module):
    """residual=False: self-attention's output replaces its input instead of adding to it. The
    residual carries each source token's own vector (its position and language) up to the decoder;
    without it in one middle layer, each position is a mix of the sentence, less tied to the source
    language's words and order. Liu et al. 2021 found that this helps zero-shot translation; on
    mtkit's demo corpus it did not (docs/data.md, "Zero-shot")."""

    def __init__(self, cfg: ModelConfig, residual: bool = True):
        super().__init__()
        self.attention, self.feed_forward = SelfAttention(cfg), FeedForward(cfg)
        self.res1, self.res2 = Residual(cfg, keep_input=residual), Residual(cfg)

    def forward(self, x: Tensor, keep: Tensor, weights: list | None = None) -> Tensor:
        x = self.res1(x, lambda h: self.attention(h, keep=keep, weights=weights)[0])
        return self.res2(x, self.feed_forward)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.self_attention, self.cross_attention = SelfAttention(cfg), CrossAttention(cfg)
        self.feed_forward = FeedForward(cfg)
        self.res1, self.res2, self.res3 = Residual(cfg), Residual(cfg), Residual(cfg)

    def forward(self, y: Tensor, memory_kv: tuple[Tensor, Tensor], keep: Tensor, *,
                past: tuple[Tensor, Tensor] | None, weights: list | None, self_weights: list | None = None
                ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        new_kv = None

        def look_back(h: Tensor) -> Tensor:
            nonlocal new_kv
            out, new_kv = self.self_attention(h, causal=True, past=past, weights=self_weights)
            return out

        y = self.res1(y, look_back)
        y = self.res2(y, lambda h: self.cross_attention(h, memory_kv, keep=keep, weights=weights))
        return self.res3(y, self.feed_forward), new_kv


# ---------------------------------------------------------------------------------------------
# Incremental decoding. Search writes one token per step; recomputing the whole prefix each step
# would cost O(T^2) layer passes. Instead each decoder layer keeps the keys/values it has already
# computed for the prefix (self-attention: grows by one per step) and the keys/values of the
# encoder memory (cross-attention: computed once, as the source does not change).

@dataclass
class Memory:
    """What the encoder hands to the decoder."""
    states: Tensor   # (B, S, D)
    src_pad: Tensor  # (B, S) bool, True = padding

    def index_select(self, index: Tensor) -> "Memory":
        return Memory(self.states.index_select(0, index), self.src_pad.index_select(0, index))


@dataclass
class DecoderCache:
    self_kv: list[tuple[Tensor, Tensor]] = field(default_factory=list)   # per layer, (B, H, t, E) each
    cross_kv: list[tuple[Tensor, Tensor]] = field(default_factory=list)  # per layer, (B, H, S, E) each,
    # one row per sentence even when self_kv has K rows per sentence (beam search)

    @property
    def length(self) -> int:
        """How many target positions are cached (the position of the next token)."""
        return self.self_kv[0][0].size(2) if self.self_kv else 0

    def reorder(self, index: Tensor) -> None:
        """Keep rows `index` of the self-attention state (beam search: the surviving hypotheses'
        parents). Cross-attention K/V need no reordering: the beams of one sentence share them."""
        self.self_kv = [(k.index_select(0, index), v.index_select(0, index)) for k, v in self.self_kv]

    def select(self, rows: Tensor, sentences: Tensor) -> None:
        """Finished sentences leave the batch: keep `rows` of the self-attention state (one per
        beam) and `sentences` of the cross-attention state (one per sentence)."""
        self.reorder(rows)
        self.cross_kv = [(k.index_select(0, sentences), v.index_select(0, sentences)) for k, v in self.cross_kv]


# ---------------------------------------------------------------------------------------------

class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tgt_embed = Embedding(cfg.tgt_vocab, cfg)
        if cfg.share_src_tgt:
            if cfg.src_vocab != cfg.tgt_vocab:
                raise ValueError("share_src_tgt needs one joint vocabulary (src_vocab == tgt_vocab)")
            self.src_embed = self.tgt_embed
        else:
            self.src_embed = Embedding(cfg.src_vocab, cfg)
        self.encoder = nn.ModuleList(EncoderLayer(cfg, residual=i + 1 != cfg.no_residual_layer)
                                     for i in range(cfg.enc_layers))
        self.decoder = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.dec_layers))
        final_norm = nn.LayerNorm if cfg.norm == "pre" else nn.Identity
        self.enc_norm, self.dec_norm = final_norm(cfg.d_model), final_norm(cfg.d_model)
        self.generator = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.tgt_vocab, bias=False)
        self.logits_bias = nn.Parameter(torch.zeros(cfg.tgt_vocab)) if cfg.logits_bias else None
        for name, p in self.named_parameters():
            # Xavier for every projection matrix (fairseq, the Annotated Transformer); embeddings
            # keep their normal init, biases start at zero, LayerNorms at (1, 0).
            if p.dim() == 2 and "embed" not in name:
                nn.init.xavier_uniform_(p)
            elif name.endswith("bias") and "norm" not in name:
                nn.init.zeros_(p)

    @staticmethod
    def _keep(src_pad: Tensor) -> Tensor:
        """The one place the padding mask changes polarity: (B, S) True = padding ->
        (B, 1, 1, S) True = may be attended to, broadcast over heads and queries."""
        return ~src_pad[:, None, None, :]

    def encode(self, src: Tensor, attention: list | None = None) -> Memory:
        """src (B, S) token ids, padded with pad_id -> Memory with states (B, S, D). attention: a
        list to receive each layer's self-attention weights (B, H, S, S)."""
        src_pad = src.eq(self.cfg.pad_id)
        keep = self._keep(src_pad)
        x = self.src_embed(src)
        for layer in self.encoder:
            x = layer(x, keep, attention)
        return Memory(self.enc_norm(x), src_pad)

    def decode(self, tgt_in: Tensor, memory: Memory, *, cache: DecoderCache | None = None,
               attention: list | None = None, self_attention: list | None = None, project: bool = True
               ) -> tuple[Tensor, DecoderCache | None]:
        """tgt_in (B, T) -> logits (B, T, V) for the token after each position (project=False: states (B, T, D)).

        cache: None for teacher forcing (the whole target at once, causal mask). For incremental
        decoding pass DecoderCache() at the first step and the returned cache after that; tgt_in
        then holds only the new token(s). attention: a list to receive each layer's
        cross-attention weights (B, H, T, S), for visualization; self_attention: the same for the
        masked self-attention (B, H, T, cached + T).
        """
        start = cache.length if cache is not None else 0  # positions continue after the cache
        keep = self._keep(memory.src_pad)
        y = self.tgt_embed(tgt_in, start)
        if cache is not None and not cache.cross_kv:
            cache.cross_kv = [layer.cross_attention.memory_kv(memory.states) for layer in self.decoder]
        new_self_kv = []
        for i, layer in enumerate(self.decoder):
            memory_kv = cache.cross_kv[i] if cache is not None else layer.cross_attention.memory_kv(memory.states)
            past = cache.self_kv[i] if cache is not None and cache.self_kv else None
            y, kv = layer(y, memory_kv, keep, past=past, weights=attention, self_weights=self_attention)
            new_self_kv.append(kv)
        if cache is not None:
            cache.self_kv = new_self_kv
        y = self.dec_norm(y)
        return (self.project(y) if project else y), cache

    def output_layer(self) -> tuple[Tensor, Tensor | None]:
        """Its weight (V, D) and bias (V,) or None; tied: the weight is the target embedding matrix."""
        return (self.tgt_embed.tokens.weight if self.generator is None else self.generator.weight), self.logits_bias

    def project(self, y: Tensor) -> Tensor:
        """(..., D) -> (..., V) logits."""
        return F.linear(y, *self.output_layer())

    def forward(self, src: Tensor, tgt_in: Tensor, project: bool = True) -> Tensor:
        """Teacher forcing: src (B, S), tgt_in (B, T) = BOS + target -> logits (B, T, V) (or states: decode)."""
        return self.decode(tgt_in, self.encode(src), project=project)[0]
