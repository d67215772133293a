# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # The Transformer, assembled
#
# The notes end on a title:
#
# > "Annotated Transformer Architecture" (the notes, last line)
#
# Everything above that line is a part: attention as a weighted average, the projections
# $W_q, W_k, W_v$, the $\sqrt{d_k}$, several heads, sinusoidal positions, layer normalisation and
# the skip connection. This chapter puts the parts together into the encoder–decoder of
# {cite}`vaswani2017attention`, checks the result weight for weight against PyTorch's own
# `torch.nn.Transformer`, and counts its parameters against the paper's table. The next chapter
# trains it; the one after decodes with it.
#
# The notes give the reason the whole thing exists:
#
# > "So, they eliminate sequential processing & allows parallelization." (the notes)
#
# True for the encoder, which reads every position at once, and true for *training* the decoder,
# which predicts every target position in one pass behind a causal mask (section 3 below). It is
# not true for *generating* text: the decoder still emits one token after another, which is why the
# decoding chapter needs a cache. "Parallel" describes the training computation, not the model's use.

# %% tags=["parameters"]
device = "auto"   # auto | cpu | cuda  (papermill parameter)
profile = "quick"  # quick (CI, about a minute on 2 cores) | full (the published results)
seed = 0

# %%
#| default_exp model
from annotated_transformer.runtime import glue, setup

device = setup(device, profile, seed)

import math

import torch
from torch import nn

print("device:", device)

# %% [markdown]
# ## The plan of the model
#
# ```text
#  source ids ─► Embeddings·√d_model + PE ─► [EncoderLayer] × N ─► (final norm) ─► memory
#                                                                                   │
#  target ids ─► Embeddings·√d_model + PE ─► [DecoderLayer] × N ─► (final norm) ─► Generator ─► log p(next token)
#   (shifted right)                              ▲ masked self-attention, cross-attention to memory
# ```
#
# Every piece except the embeddings, the layers and the generator is already in the package:
# `MultiHeadAttention` ([multi-head attention](03_multi_head_attention.ipynb)),
# `PositionalEncoding` ([positional encoding](04_positional_encoding.ipynb)), `LayerNorm`
# ([layer normalisation](05_layer_norm.ipynb)), and `SublayerConnection` with
# `PositionwiseFeedForward` ([residual connections](06_residual_connections.ipynb)).

# %%
#| export
import math

import torch
from torch import nn

from annotated_transformer.attention import causal_mask, padding_mask
from annotated_transformer.multihead import MultiHeadAttention
from annotated_transformer.norm import LayerNorm
from annotated_transformer.positional import PositionalEncoding
from annotated_transformer.residual import PositionwiseFeedForward, SublayerConnection

# %% [markdown]
# ## 1. Embeddings, and why they are multiplied by $\sqrt{d_\text{model}}$
#
# The paper, section 3.4: "In the embedding layers, we multiply those weights by
# $\sqrt{d_\text{model}}$." It does not say why. The reason is in the initialisation the paper's
# code (tensor2tensor) used, and it matters because the embedding is *added* to the positional
# encoding, whose entries are $\sin$ and $\cos$ values of order 1 (the cell below measures their
# standard deviation). The embedding's scale decides whether the sum is mostly "which token" or
# mostly "which position".
#
# - tensor2tensor draws the embedding table from $\mathcal N(0, d_\text{model}^{-1/2})$. That scale suits
#   the *output* projection, which the paper ties to the embedding (section 5 below): a unit-variance
#   hidden state dotted with such a row gives logits of variance about 1. Multiplying by
#   $\sqrt{d_\text{model}}$ on the way *in* brings the same table to unit variance, the same order as
#   the positional encoding.
# - `nn.Embedding`'s default $\mathcal N(0, 1)$ times $\sqrt{512}$ gives entries of size
#   $\sqrt{512} \approx 23$: the positions drown.
# - Xavier-uniform on the whole table (what the Harvard Annotated Transformer {cite}`rush2018annotated`
#   does to every matrix) depends on the vocabulary size: with $V = 37000$ the scaled entries are
#   several times *smaller* than the positional signal.
#
# The cell below measures all three on a $37000 \times 512$ table. This package uses the first.

# %% tags=["nbval-check-output"]
V, d = 37000, 512
pe_std = torch.cat([torch.sin(torch.arange(1000.0)[:, None] / 10000 ** (torch.arange(0, d, 2) / d)),
                    torch.cos(torch.arange(1000.0)[:, None] / 10000 ** (torch.arange(0, d, 2) / d))], 1).std()
tables = {
    "N(0, d^-1/2) (tensor2tensor, this package)": torch.randn(V, d) * d ** -0.5,
    "N(0, 1) (nn.Embedding default)": torch.randn(V, d),
    "xavier_uniform (Harvard)": nn.init.xavier_uniform_(torch.empty(V, d)),
}
print(f"positional encoding std over 1000 positions: {pe_std:.2f}")
print(f"{'embedding init':45s} {'std':>7s} {'std x sqrt(d)':>14s}")
for name, table in tables.items():
    print(f"{name:45s} {table.std():7.3f} {table.std() * math.sqrt(d):14.2f}")
del tables

# %% [markdown]
# Only the first row puts tokens and positions on the same footing. `Embeddings` below is a lookup
# table times $\sqrt{d_\text{model}}$; `make_model` initialises it as tensor2tensor did. It checks
# token ids are inside the vocabulary, because an out-of-range id is the most common bug in a
# data pipeline and `nn.Embedding`'s own error (an index error deep in the kernel, or a device-side
# assert on a GPU) does not say which sizes disagreed. The check runs *on the device*
# (`torch._assert_async`): reading `tokens.max()` back to Python would stall a GPU once per call and
# split a `torch.compile` graph. The entry points that take ids from a user (`check_token_ids`,
# called by the decoders and the training batches) check them once on the host, with a `ValueError`
# that names the offending id.

# %%
#| export
class Embeddings(nn.Module):
    """Token ids -> vectors, multiplied by sqrt(d_model) (paper, section 3.4).

    With the table drawn from N(0, d_model^-1/2) (see `make_model`), the scaled vectors have unit
    variance: the same order as the positional encoding they are added to.
    """

    def __init__(self, vocab: int, d_model: int):
        super().__init__()
        if vocab < 1 or d_model < 1:
            raise ValueError(f"vocab and d_model must be positive, got vocab={vocab}, d_model={d_model}")
        self.vocab, self.d_model = vocab, d_model
        self.lut = nn.Embedding(vocab, d_model)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # tokens (batch, seq) integer ids -> (batch, seq, d_model)
        if tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
            raise TypeError(f"token ids must be an integer tensor, got {tokens.dtype}")
        if tokens.dim() != 2 or tokens.size(0) == 0 or tokens.size(1) == 0:
            raise ValueError(f"token ids must have shape (batch, seq) with batch >= 1 and seq >= 1 "
                             f"(an empty batch or sequence has nothing to embed), got {tuple(tokens.shape)}")
        # On the device, without a host sync: a CPU raises RuntimeError here, a GPU a device-side assert.
        torch._assert_async(((tokens >= 0) & (tokens < self.vocab)).all(),
                            f"token ids must lie in [0, {self.vocab}) for a vocabulary of {self.vocab}")
        return self.lut(tokens) * math.sqrt(self.d_model)


def check_token_ids(tokens: torch.Tensor, vocab: int, what: str = "token ids") -> None:
    """Host-side check for public entry points: tokens is a (batch, seq) integer tensor of ids in
    [0, vocab). Reads the extremes back to Python: call it once per batch, not inside forward."""
    if not isinstance(tokens, torch.Tensor) or tokens.is_floating_point() or tokens.is_complex() \
            or tokens.dtype == torch.bool:
        kind = f"a {tokens.dtype} tensor" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise TypeError(f"{what} must be an integer tensor, got {kind}")
    if tokens.dim() != 2 or tokens.numel() == 0:
        raise ValueError(f"{what} must have shape (batch, seq) with batch >= 1 and seq >= 1, got {tuple(tokens.shape)}")
    low, high = int(tokens.min()), int(tokens.max())
    if low < 0 or high >= vocab:
        raise ValueError(f"{what} must lie in [0, {vocab}) for a vocabulary of {vocab}, got ids from {low} to {high}")

# %% [markdown]
# ## 2. The encoder layer: two sublayers
#
# Each encoder layer is self-attention followed by a position-wise feed-forward network, each
# wrapped in the residual-plus-norm of [residual connections](06_residual_connections.ipynb). The
# notes' promise, "skip connection → better gradient flow → reduced burden on layers", is kept by
# the wrapper, and *where* the norm sits decides how well:
#
# $$\text{post-LN (the paper)}:\quad x \leftarrow \text{LayerNorm}\big(x + \text{Sublayer}(x)\big)$$
#
# $$\text{pre-LN}:\quad x \leftarrow x + \text{Sublayer}\big(\text{LayerNorm}(x)\big)$$
#
# Post-LN normalises the residual stream itself after every sublayer; pre-LN leaves an untouched
# identity path from the output back to the input, which is why it trains deep stacks without a
# careful warm-up {cite}`xiong2020layer`. The Harvard Annotated Transformer uses pre-LN although
# the paper it annotates is post-LN; `torch.nn.Transformer` offers both (`norm_first`). So does
# this package: `norm_first=False` (the default) is the paper.
#
# The layer keeps the attribute names `self_attn`, `feed_forward` and `sublayer[0]`,
# `sublayer[1]` on purpose: a later chapter loads pretrained BERT weights into exactly this class,
# and BERT {cite}`devlin2019bert` is a post-LN encoder with GELU and `eps=1e-12`, which is why the
# activation and `eps` are arguments.

# %%
#| export
def _check_d_model(x: torch.Tensor, d_model: int, what: str) -> None:
    if x.dim() != 3 or x.size(-1) != d_model:
        raise ValueError(f"{what} must have shape (batch, seq, d_model={d_model}), got {tuple(x.shape)}")


class EncoderLayer(nn.Module):
    """Self-attention then a feed-forward network, each in a residual + LayerNorm wrapper.

    norm_first=False is the paper's post-LN, True is pre-LN. activation "relu" (paper) or "gelu" (BERT).
    """

    def __init__(self, d_model: int, h: int, d_ff: int, dropout: float = 0.1, norm_first: bool = False,
                 activation: str = "relu", eps: float = 1e-5):
        super().__init__()
        self.d_model, self.norm_first = d_model, norm_first
        self.self_attn = MultiHeadAttention(d_model, h, dropout)
        self.feed_forward = PositionwiseFeedForward(d_model, d_ff, dropout, activation)
        self.sublayer = nn.ModuleList(SublayerConnection(d_model, dropout, norm_first, eps) for _ in range(2))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        # x (batch, seq, d_model); mask broadcastable to (batch, h, seq, seq), True = may attend
        return self._layer(x, mask, need_weights=False)[0]

    def forward_with_weights(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        """forward's output and the self-attention weights (batch, h, seq, seq), by the explicit path."""
        return self._layer(x, mask, need_weights=True)

    def _layer(self, x, mask, need_weights: bool):
        _check_d_model(x, self.d_model, "the encoder layer's input")
        weights = None

        def attend(y):
            nonlocal weights
            out, weights = self.self_attn(y, y, y, mask=mask, need_weights=need_weights)
            return out

        x = self.sublayer[0](x, attend)
        return self.sublayer[1](x, self.feed_forward), weights

# %% [markdown]
# ## 3. The decoder layer: three sublayers, and the masks
#
# The decoder layer adds a third sublayer between the two: *cross-attention*, whose queries come
# from the decoder and whose keys and values are the encoder's output (the "memory"). Its
# self-attention is masked so that position $i$ sees only positions $\le i$: during training the
# whole shifted target goes in at once, and without the mask the model could read the token it is
# asked to predict. That mask is what makes the notes' "parallelization" legal for the decoder.
#
# Three masks, all in the package's convention (boolean, `True` = may attend):
#
# | where | mask | shape |
# |---|---|---|
# | encoder self-attention | `padding_mask(src, pad)` | (batch, 1, 1, src_len) |
# | decoder self-attention | `padding_mask(tgt, pad) & causal_mask(tgt_len)` | (batch, 1, tgt_len, tgt_len) |
# | cross-attention | `padding_mask(src, pad)` | (batch, 1, 1, src_len) |
#
# `DecoderLayer` and `Decoder` take their arguments in `torch.nn.TransformerDecoderLayer`'s order
# and names, `(tgt, memory, tgt_mask, memory_mask)`: the decoder self-attention's mask first, the
# cross-attention's second. Only the meaning of `True` differs from PyTorch's. Every layer's `forward`
# returns one tensor; `forward_with_weights` also returns the attention weights (they need the
# explicit, slower attention path), which is how `Transformer.attention_maps` reads them.

# %%
#| export
class DecoderLayer(nn.Module):
    """Masked self-attention, cross-attention to the encoder's memory, then a feed-forward network.

    Attribute names: self_attn, src_attn (cross-attention), feed_forward, sublayer[0..2].
    """

    def __init__(self, d_model: int, h: int, d_ff: int, dropout: float = 0.1, norm_first: bool = False,
                 activation: str = "relu", eps: float = 1e-5):
        super().__init__()
        self.d_model, self.norm_first = d_model, norm_first
        self.self_attn = MultiHeadAttention(d_model, h, dropout)
        self.src_attn = MultiHeadAttention(d_model, h, dropout)
        self.feed_forward = PositionwiseFeedForward(d_model, d_ff, dropout, activation)
        self.sublayer = nn.ModuleList(SublayerConnection(d_model, dropout, norm_first, eps) for _ in range(3))

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, tgt_mask: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tgt (batch, tgt_len, d_model) reads memory (batch, src_len, d_model): torch's argument order
        (TransformerDecoderLayer), but the masks in this package's convention, True = may attend.
        tgt_mask (self-attention) broadcasts to (batch, h, tgt_len, tgt_len), causal and padding in one;
        memory_mask (cross-attention) to (batch, h, tgt_len, src_len), usually the source's padding."""
        return self._layer(tgt, memory, tgt_mask, memory_mask, need_weights=False)[0]

    def forward_with_weights(self, tgt: torch.Tensor, memory: torch.Tensor, tgt_mask: torch.Tensor | None = None,
                             memory_mask: torch.Tensor | None = None):
        """forward's output and (self-attention weights, cross-attention weights), by the explicit path."""
        return self._layer(tgt, memory, tgt_mask, memory_mask, need_weights=True)

    def _layer(self, x, memory, tgt_mask, memory_mask, need_weights: bool):
        _check_d_model(x, self.d_model, "the decoder layer's input")
        _check_d_model(memory, self.d_model, "the encoder memory")
        if memory.size(0) != x.size(0):
            raise ValueError(f"memory has batch {memory.size(0)} but the target has batch {x.size(0)}")
        w_self = w_cross = None

        def self_attend(y):
            nonlocal w_self
            out, w_self = self.self_attn(y, y, y, mask=tgt_mask, need_weights=need_weights)
            return out

        def cross_attend(y):
            nonlocal w_cross
            out, w_cross = self.src_attn(y, memory, memory, mask=memory_mask, need_weights=need_weights)
            return out

        x = self.sublayer[0](x, self_attend)
        x = self.sublayer[1](x, cross_attend)
        return self.sublayer[2](x, self.feed_forward), (w_self, w_cross)

# %% [markdown]
# ## 4. Stacks of $N$ layers, and the final norm
#
# An `Encoder` is $N$ encoder layers applied in turn, a `Decoder` is $N$ decoder layers that all
# read the same memory. Each takes an optional final `LayerNorm`. Post-LN does not need one (every
# layer already ends in a norm; the paper has none), but pre-LN does: its residual stream is a sum
# of $N$ unnormalised sublayer outputs and grows with depth. `torch.nn.Transformer` always adds the
# final norm, in both modes; `make_model` adds it only for pre-LN, like the paper in post-LN mode.
#
# The cell below pushes random inputs through 6 randomly initialised layers of each kind and prints
# the standard deviation of the residual stream after each layer.

# %%
#| export
class Encoder(nn.Module):
    """A stack of encoder layers, with an optional final LayerNorm (needed for pre-LN)."""

    def __init__(self, layers, norm: nn.Module | None = None):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        if len(self.layers) == 0:
            raise ValueError("an Encoder needs at least one layer")
        self.norm = norm

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        # x (batch, src_len, d_model) -> memory (batch, src_len, d_model)
        for layer in self.layers:
            x = layer(x, mask)
        return x if self.norm is None else self.norm(x)

    def forward_with_weights(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        """forward's output and every layer's self-attention weights, a list of (batch, h, seq, seq)."""
        weights = []
        for layer in self.layers:
            x, w = layer.forward_with_weights(x, mask)
            weights.append(w)
        return (x if self.norm is None else self.norm(x)), weights


class Decoder(nn.Module):
    """A stack of decoder layers reading one memory, with an optional final LayerNorm."""

    def __init__(self, layers, norm: nn.Module | None = None):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        if len(self.layers) == 0:
            raise ValueError("a Decoder needs at least one layer")
        self.norm = norm

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, tgt_mask: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None) -> torch.Tensor:
        # tgt (batch, tgt_len, d_model), memory (batch, src_len, d_model) -> (batch, tgt_len, d_model)
        # torch's order and names (TransformerDecoder); masks as in DecoderLayer, True = may attend
        x = tgt
        for layer in self.layers:
            x = layer(x, memory, tgt_mask=tgt_mask, memory_mask=memory_mask)
        return x if self.norm is None else self.norm(x)

    def forward_with_weights(self, tgt: torch.Tensor, memory: torch.Tensor, tgt_mask: torch.Tensor | None = None,
                             memory_mask: torch.Tensor | None = None):
        """forward's output and every layer's (self-attention, cross-attention) weights."""
        x, weights = tgt, []
        for layer in self.layers:
            x, w = layer.forward_with_weights(x, memory, tgt_mask=tgt_mask, memory_mask=memory_mask)
            weights.append(w)
        return (x if self.norm is None else self.norm(x)), weights

# %% tags=["nbval-check-output"]
torch.manual_seed(seed)
x0 = torch.randn(4, 20, 64)
print("std of the residual stream after each of 6 layers (d_model=64, random weights)")
for norm_first in (False, True):
    torch.manual_seed(seed)
    layers = [EncoderLayer(64, 4, 256, dropout=0.0, norm_first=norm_first).eval() for _ in range(6)]
    x, stds = x0, []
    with torch.no_grad():
        for layer in layers:
            x = layer(x)
            stds.append(x.std().item())
    print(f"{'pre-LN ' if norm_first else 'post-LN'}: " + "  ".join(f"{s:5.2f}" for s in stds))

# %% [markdown]
# Post-LN keeps the stream at unit scale after every layer; pre-LN's grows layer by layer, so
# without a final norm the decoder's output (and the logits) would change scale with $N$.
#
# **Which one each chapter uses, and why.** The toy experiments of the training and decoding
# chapters use post-LN, the paper's choice: they reproduce the paper, and with the Noam warm-up
# post-LN trains those one- and two-layer models without trouble. The real translation models of the
# [translation chapter](10_translation.ipynb) are **pre-LN**: their runs are short, and post-LN needs
# a long warm-up before its large early gradients settle {cite}`xiong2020layer`. That chapter trains a
# post-LN model at the same budget beside its pre-LN one and reports both, so the choice is measured
# there, not assumed. Every model in the book records which one it is (`model.config["norm_first"]`).
#
# ## 5. The generator, and weight tying
#
# The generator turns the decoder's output into a distribution over the target vocabulary:
# a linear layer and a log-softmax. The paper (section 3.4): "we share the same weight matrix
# between the two embedding layers and the pre-softmax linear transformation, similar to
# {cite}`press2017using`." That is two separate ties:
#
# - `tie_output=True`: the target embedding and the generator share one $V_\text{tgt} \times d_\text{model}$
#   matrix. Always possible.
# - `share_embeddings=True`: the source and target embeddings are the same table. Only possible
#   with one vocabulary for both languages; the paper used a shared byte-pair vocabulary
#   {cite}`sennrich2016neural` of about 37000 tokens for English–German. With two vocabularies of
#   different sizes `make_model` refuses, naming both sizes.

# %%
#| export
class Generator(nn.Module):
    """The decoder's output -> log-probabilities over the target vocabulary (linear + log_softmax)."""

    def __init__(self, d_model: int, vocab: int):
        super().__init__()
        self.proj = nn.Linear(d_model, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (..., d_model) -> (..., vocab) log-probabilities, in float32 even under autocast
        return torch.log_softmax(self.proj(x).float(), dim=-1)

# %% [markdown]
# ## 6. The model, its masks, and `make_model`
#
# `Transformer` holds the two embeddings, the positional encoding (one module: it has no
# parameters, only the fixed table), the two stacks and the generator. `encode` and `decode` are
# separate methods because decoding (a later chapter) runs the encoder once and the decoder many
# times. `make_masks` builds the two masks of the table above from token ids.

# %%
#| export
def make_masks(src: torch.Tensor, tgt: torch.Tensor | None, pad_idx: int):
    """Masks for a batch of token ids (True = may attend).

    Returns src_mask (batch, 1, 1, src_len) and tgt_mask (batch, 1, tgt_len, tgt_len): padding, and for
    the target also causal (position i sees positions <= i). tgt may be None (encoder only).
    """
    src_mask = padding_mask(src, pad_idx)  # (batch, 1, 1, src_len)
    if tgt is None:
        return src_mask, None
    tgt_mask = padding_mask(tgt, pad_idx) & causal_mask(tgt.size(1), device=tgt.device)  # (batch, 1, tgt_len, tgt_len)
    return src_mask, tgt_mask


class Transformer(nn.Module):
    """Encoder-decoder Transformer: embeddings + positional encoding, two stacks, a generator."""

    def __init__(self, encoder: Encoder, decoder: Decoder, src_embed: Embeddings, tgt_embed: Embeddings,
                 pos_encoding: PositionalEncoding, generator: Generator):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder
        self.src_embed, self.tgt_embed = src_embed, tgt_embed
        self.pos_encoding = pos_encoding
        self.generator = generator
        self.config: dict = {}  # make_model records its arguments here (checkpoints compare them)

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        # src (batch, src_len) ids -> memory (batch, src_len, d_model)
        return self.encoder(self.pos_encoding(self.src_embed(src)), src_mask)

    def decode(self, memory: torch.Tensor, src_mask: torch.Tensor | None, tgt: torch.Tensor,
               tgt_mask: torch.Tensor | None = None) -> torch.Tensor:
        # tgt (batch, tgt_len) ids -> (batch, tgt_len, d_model), before the generator (harvardnlp's order)
        return self.decoder(self.pos_encoding(self.tgt_embed(tgt)), memory, tgt_mask=tgt_mask, memory_mask=src_mask)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, src_mask: torch.Tensor | None = None,
                tgt_mask: torch.Tensor | None = None) -> torch.Tensor:
        # src (batch, src_len), tgt (batch, tgt_len) ids -> log-probs (batch, tgt_len, tgt_vocab)
        if src.dim() != 2 or tgt.dim() != 2:
            raise ValueError(f"src and tgt must be token ids of shape (batch, seq), got {tuple(src.shape)} "
                             f"and {tuple(tgt.shape)}")
        if src.size(0) != tgt.size(0):
            raise ValueError(f"src has batch {src.size(0)} but tgt has batch {tgt.size(0)}")
        return self.generator(self.decode(self.encode(src, src_mask), src_mask, tgt, tgt_mask))

    @torch.no_grad()
    def attention_maps(self, src, tgt, src_mask=None, tgt_mask=None) -> dict:
        """Attention weights of every layer: {'encoder', 'decoder_self', 'cross'} -> list of (batch, h, q, k)."""
        memory, enc_w = self.encoder.forward_with_weights(self.pos_encoding(self.src_embed(src)), src_mask)
        _, dec_w = self.decoder.forward_with_weights(self.pos_encoding(self.tgt_embed(tgt)), memory,
                                                     tgt_mask=tgt_mask, memory_mask=src_mask)
        return {"encoder": enc_w, "decoder_self": [w[0] for w in dec_w], "cross": [w[1] for w in dec_w]}


def make_model(src_vocab: int, tgt_vocab: int, N: int = 6, d_model: int = 512, d_ff: int = 2048, h: int = 8,
               dropout: float = 0.1, norm_first: bool = False, activation: str = "relu",
               tie_output: bool = False, share_embeddings: bool = False, max_len: int = 5000,
               eps: float = 1e-5, final_norm: bool | None = None) -> Transformer:
    """Build the paper's model. Defaults are the base configuration (N=6, d_model=512, d_ff=2048, h=8).

    norm_first: False = post-LN (paper), True = pre-LN. final_norm defaults to norm_first.
    tie_output: target embedding = generator weight. share_embeddings: source embedding = target
    embedding (needs src_vocab == tgt_vocab). Matrices get Xavier-uniform, embeddings N(0, d_model^-1/2).
    """
    for name, value in (("src_vocab", src_vocab), ("tgt_vocab", tgt_vocab), ("N", N), ("d_model", d_model),
                        ("d_ff", d_ff), ("h", h), ("max_len", max_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if d_model % h:
        raise ValueError(f"d_model={d_model} is not divisible by h={h}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a number in [0, 1), got {dropout!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0.0 < eps < 1.0:
        raise ValueError(f"eps (LayerNorm's variance floor) must be a number in (0, 1), got {eps!r}: with eps=0 "
                         "a constant row divides 0 by 0")
    for name, flag in (("norm_first", norm_first), ("tie_output", tie_output), ("share_embeddings", share_embeddings)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be True or False, got {flag!r}")
    if activation not in ("relu", "gelu"):
        raise ValueError(f"activation must be 'relu' or 'gelu', got {activation!r}")
    if share_embeddings and src_vocab != tgt_vocab:
        raise ValueError(
            f"share_embeddings=True needs one vocabulary for source and target, "
            f"got src_vocab={src_vocab} and tgt_vocab={tgt_vocab}"
        )
    final_norm = norm_first if final_norm is None else final_norm
    layer_args = dict(d_model=d_model, h=h, d_ff=d_ff, dropout=dropout, norm_first=norm_first,
                      activation=activation, eps=eps)
    encoder = Encoder([EncoderLayer(**layer_args) for _ in range(N)], LayerNorm(d_model, eps) if final_norm else None)
    decoder = Decoder([DecoderLayer(**layer_args) for _ in range(N)], LayerNorm(d_model, eps) if final_norm else None)
    src_embed, tgt_embed = Embeddings(src_vocab, d_model), Embeddings(tgt_vocab, d_model)
    model = Transformer(encoder, decoder, src_embed, tgt_embed, PositionalEncoding(d_model, max_len, dropout),
                        Generator(d_model, tgt_vocab))
    for p in model.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)
    for emb in (src_embed, tgt_embed):
        nn.init.normal_(emb.lut.weight, mean=0.0, std=d_model ** -0.5)
    if share_embeddings:
        src_embed.lut.weight = tgt_embed.lut.weight
    if tie_output:
        model.generator.proj.weight = tgt_embed.lut.weight
    model.config = dict(src_vocab=src_vocab, tgt_vocab=tgt_vocab, N=N, d_model=d_model, d_ff=d_ff, h=h,
                        dropout=dropout, norm_first=norm_first, activation=activation, tie_output=tie_output,
                        share_embeddings=share_embeddings, max_len=max_len, eps=eps, final_norm=final_norm)
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (a tied matrix counts once)."""
    return sum(p.numel() for p in model.parameters())  # .parameters() already skips duplicates


def use_fused_qkv(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Opt-in: every self-attention in model projects Q, K, V with one matrix product (same weights,
    same outputs to float rounding; see MultiHeadAttention's fused_qkv). Returns model."""
    for m in model.modules():
        if isinstance(m, MultiHeadAttention):
            m.fused_qkv = bool(enabled)
    return model

# %% [markdown]
# A tiny model, end to end: a batch of 2 source sentences of length 7 and targets of length 5,
# with padding. The output is one log-distribution over the target vocabulary per target position.

# %% tags=["nbval-check-output"]
torch.manual_seed(seed)
PAD = 0
tiny = make_model(src_vocab=13, tgt_vocab=11, N=2, d_model=32, d_ff=64, h=4, dropout=0.0).eval()
src = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [5, 6, 7, 8, PAD, PAD, PAD]])
tgt = torch.tensor([[1, 4, 5, 6, 7], [1, 4, 5, PAD, PAD]])
src_mask, tgt_mask = make_masks(src, tgt, PAD)
with torch.no_grad():
    logp = tiny(src, tgt, src_mask, tgt_mask)
print("src_mask", tuple(src_mask.shape), " tgt_mask", tuple(tgt_mask.shape))
print("log-probs", tuple(logp.shape), " rows sum to 1:", torch.allclose(logp.exp().sum(-1), torch.ones(2, 5)))
print(tgt_mask[1, 0].int())

# %% [markdown]
# The printed mask is the second sentence's: lower-triangular (causal), with the last two columns
# zeroed (padding).
#
# **The masks do what they claim.** Changing a *later* target token must leave the decoder's
# outputs at *earlier* positions unchanged, and changing a *padded* source token must change
# nothing at all. Both are exact equalities, not approximations:

# %% tags=["nbval-check-output"]
with torch.no_grad():
    tgt2 = tgt.clone(); tgt2[0, 3] = 9                       # change target position 3 of sentence 0
    out1, out2 = tiny(src, tgt, src_mask, tgt_mask), tiny(src, tgt2, *make_masks(src, tgt2, PAD))
    print("positions 0-2 unchanged:", torch.equal(out1[0, :3], out2[0, :3]),
          "| position 3 changed:", not torch.allclose(out1[0, 3], out2[0, 3]))
    src3 = src.clone(); src3[1, 5] = 12                       # write a token *into* a padded source slot...
    src_mask3 = src_mask.clone()                              # ...but keep the mask saying "padding"
    print("padded source slot ignored:", torch.equal(out1, tiny(src3, tgt, src_mask3, tgt_mask)))

# %% [markdown]
# And the errors bad input raises, each naming the sizes that disagree: the paper's tie with two
# vocabularies of different sizes, a sequence longer than the positional table, and an id outside
# the vocabulary (here a target id fed to the smaller source side, a classic swapped-arguments bug).

# %% tags=["nbval-check-output"]
short = make_model(src_vocab=11, tgt_vocab=13, N=1, d_model=32, d_ff=64, h=4, max_len=16)
bad_calls = {
    "tied vocabularies": lambda: make_model(src_vocab=8000, tgt_vocab=6000, share_embeddings=True),
    "too long": lambda: short.encode(torch.randint(3, 11, (1, 20))),
    "out of vocabulary (inside forward: checked on the device)": lambda: short.encode(torch.tensor([[3, 12]])),
    "out of vocabulary (an entry point's host check)": lambda: check_token_ids(torch.tensor([[3, 12]]), 11, "src"),
}
for what, call in bad_calls.items():
    try:
        call()
    except (ValueError, RuntimeError) as err:
        print(f"{what}: {type(err).__name__}: {err}")

# %% [markdown]
# ## 7. Counting parameters: base and big
#
# The paper's Table 3 gives 65M parameters for the base model and 213M for the big one. With a
# shared vocabulary of $V$ tokens, all three embedding matrices tied, and $d = d_\text{model}$:
#
# $$\underbrace{4(d^2 + d)}_{\text{attention}} + \underbrace{2\,d\,d_{ff} + d_{ff} + d}_{\text{feed-forward}} + \underbrace{2 \cdot 2d}_{\text{2 LayerNorms}} \quad\text{per encoder layer,}$$
#
# $$8(d^2 + d) + 2\,d\,d_{ff} + d_{ff} + d + 3 \cdot 2d \quad\text{per decoder layer,}$$
#
# plus $Vd$ for the one embedding matrix and $V$ for the generator's bias. The cell below builds
# both models on PyTorch's `meta` device (shapes without memory: the big model would otherwise
# need the memory printed below just to be counted), counts with `count_parameters`, checks the count against the
# formula, and compares with the paper for $V = 37000$, the paper's "about 37000 tokens".

# %%
def formula(V, N, d_model, d_ff, h):
    d = d_model
    enc = 4 * (d * d + d) + 2 * d * d_ff + d_ff + d + 2 * 2 * d
    dec = 8 * (d * d + d) + 2 * d * d_ff + d_ff + d + 3 * 2 * d
    return N * (enc + dec) + V * d + V


configs = {"base": dict(N=6, d_model=512, d_ff=2048, h=8), "big": dict(N=6, d_model=1024, d_ff=4096, h=16)}
paper = {"base": 65e6, "big": 213e6}
V = 37000
counts = {}
with torch.device("meta"):
    for name, cfg in configs.items():
        m = make_model(V, V, **cfg, tie_output=True, share_embeddings=True)
        counts[name] = count_parameters(m)
        assert counts[name] == formula(V, **cfg), (counts[name], formula(V, **cfg))
        del m
for name, cfg in configs.items():
    glue(f"{name}_count", counts[name], ",d")
    glue(f"{name}_ratio", counts[name] / paper[name], ".3f")
    glue(f"{name}_v_implied", (paper[name] - formula(0, **cfg)) / (cfg["d_model"] + 1), ",.0f")
glue("untied_base", formula(V, **configs["base"]) + 2 * V * 512, ",d")
glue("embedding_share", V * 512 / counts["base"], ".0%")

# %% tags=["nbval-check-output"]
print(f"{'config':6s} {'N':>2s} {'d_model':>7s} {'d_ff':>5s} {'h':>3s} {'counted':>12s} {'paper':>6s} {'ratio':>6s}"
      f" {'V that gives the paper':>23s}")
for name, cfg in configs.items():
    d = cfg["d_model"]
    # the vocabulary size at which the formula equals the paper's figure exactly
    v_implied = (paper[name] - formula(0, **cfg)) / (d + 1)
    print(f"{name:6s} {cfg['N']:2d} {d:7d} {cfg['d_ff']:5d} {cfg['h']:3d} {counts[name]:12,d} "
          f"{paper[name] / 1e6:5.0f}M {counts[name] / paper[name]:6.3f} {v_implied:23,.0f}")
print("untied (3 separate V x d matrices), base:", f"{formula(V, **configs['base']) + 2 * V * 512:,d}")
print(f"share of the base model in its one embedding matrix: {V * 512 / counts['base']:.0%}")
print(f"float32 memory the big model would need just to be built: {counts['big'] * 4 / 2**20:,.0f} MiB")

# %% [markdown]
# The big model lands on the paper's figure to within a percent: {glue:text}`big_count` parameters,
# {glue:text}`big_ratio` of 213M. The base model comes out a few percent under 65M,
# {glue:text}`base_count` ({glue:text}`base_ratio` of it): to hit 65M exactly the formula needs a
# vocabulary of {glue:text}`base_v_implied`, not 37000, while the big model's figure implies
# {glue:text}`big_v_implied`. The paper only says "about 37000" and rounds its counts to the million,
# so the two figures are not quite consistent with one vocabulary, and the honest summary is: the
# architecture the paper describes, with the tying it describes, has the size it reports to within a few
# percent, while untying the embeddings would add tens of millions of parameters the paper does not have
# ({glue:text}`untied_base` for the base model). The split is worth seeing: in the base model the one
# shared embedding matrix holds {glue:text}`embedding_share` of the parameters.
#
# ## 8. Weight for weight equal to `torch.nn.Transformer`
#
# The strongest check of the assembly is to take PyTorch's own implementation, copy its weights into
# ours, and compare outputs. `stacks_from_torch(t)` reads a `torch.nn.Transformer(batch_first=True)`,
# post-LN or pre-LN, ReLU or GELU, and returns our two stacks (with `t`'s final norms) as a module
# with `.encoder` and `.decoder`. They take embedded inputs of shape (batch, seq, d_model), as
# `t.encoder` and `t.decoder` do, but masks in *our* convention: PyTorch's boolean masks mean the
# opposite (`True` = *not* allowed), so every mask is inverted on the way in.

# %%
#| export
def _activation_name(layer: nn.Module) -> str:
    act = layer.activation
    if act is nn.functional.relu or isinstance(act, nn.ReLU):
        return "relu"
    if act is nn.functional.gelu or (isinstance(act, nn.GELU) and act.approximate == "none"):
        return "gelu"
    raise ValueError(f"stacks_from_torch supports ReLU and exact GELU activations, got {act!r}")


def _copy_norm(ours: LayerNorm, theirs: nn.LayerNorm) -> None:
    if theirs.bias is None or theirs.weight is None:
        raise ValueError("stacks_from_torch needs LayerNorms with weight and bias (nn.Transformer(bias=True))")
    ours.weight.copy_(theirs.weight)
    ours.bias.copy_(theirs.bias)


def _copy_ffn(ours: PositionwiseFeedForward, layer: nn.Module) -> None:
    if layer.linear1.bias is None:
        raise ValueError("stacks_from_torch needs linear layers with biases (nn.Transformer(bias=True))")
    ours.w_1.weight.copy_(layer.linear1.weight)
    ours.w_1.bias.copy_(layer.linear1.bias)
    ours.w_2.weight.copy_(layer.linear2.weight)
    ours.w_2.bias.copy_(layer.linear2.bias)


@torch.no_grad()
def stacks_from_torch(t: nn.Transformer) -> nn.ModuleDict:
    """Copy a torch.nn.Transformer(batch_first=True) into our Encoder and Decoder, weight for weight.

    Returns a ModuleDict with .encoder and .decoder taking embedded inputs (batch, seq, d_model) and
    masks in this package's convention (True = may attend). Post-LN and pre-LN, ReLU and GELU.
    """
    if not isinstance(t, nn.Transformer):
        raise TypeError(f"stacks_from_torch expects a torch.nn.Transformer, got {type(t).__name__}")
    if not t.batch_first:
        raise ValueError("stacks_from_torch expects nn.Transformer(batch_first=True): our stacks are batch-first")
    stacks = {}
    for kind, theirs, make in (("encoder", t.encoder, EncoderLayer), ("decoder", t.decoder, DecoderLayer)):
        layers = []
        for layer in theirs.layers:
            d_model, h = layer.self_attn.embed_dim, layer.self_attn.num_heads
            ours = make(d_model, h, layer.linear1.out_features, dropout=layer.dropout.p,
                        norm_first=layer.norm_first, activation=_activation_name(layer), eps=layer.norm1.eps)
            ours.self_attn = MultiHeadAttention.from_torch(layer.self_attn)
            if kind == "decoder":
                ours.src_attn = MultiHeadAttention.from_torch(layer.multihead_attn)
            _copy_ffn(ours.feed_forward, layer)
            norms = (layer.norm1, layer.norm2) + ((layer.norm3,) if kind == "decoder" else ())
            for sub, norm in zip(ours.sublayer, norms):
                _copy_norm(sub.norm, norm)
            layers.append(ours)
        final = None
        if theirs.norm is not None:
            final = LayerNorm(theirs.norm.normalized_shape[0], theirs.norm.eps)
            _copy_norm(final, theirs.norm)
        stacks[kind] = (Encoder if kind == "encoder" else Decoder)(layers, final)
    return nn.ModuleDict(stacks).to(next(t.parameters()).device)

# %% [markdown]
# Four configurations, each with a padded source batch and a causal, padded target. The encoder is
# compared at the non-padded positions (PyTorch's fast inference path returns zeros at padded
# positions, which are meaningless either way), the decoder at every position.

# %%
def compare_with_torch(norm_first, activation, d_model=32, h=4, d_ff=48, N=2, seed=0):
    torch.manual_seed(seed)
    t = nn.Transformer(d_model, h, N, N, d_ff, dropout=0.1, activation=activation, batch_first=True,
                       norm_first=norm_first).eval()
    ours = stacks_from_torch(t).eval()
    batch, S, T = 3, 7, 5
    src, tgt = torch.randn(batch, S, d_model), torch.randn(batch, T, d_model)
    src_keep = torch.ones(batch, S, dtype=torch.bool); src_keep[1, 5:] = False; src_keep[2, 3:] = False
    tgt_keep = torch.ones(batch, T, dtype=torch.bool); tgt_keep[2, 4:] = False
    causal = causal_mask(T)
    with torch.no_grad():
        mem_t = t.encoder(src, src_key_padding_mask=~src_keep)
        out_t = t.decoder(tgt, mem_t, tgt_mask=~causal, tgt_key_padding_mask=~tgt_keep,
                          memory_key_padding_mask=~src_keep)
        src_mask = src_keep[:, None, None, :]                       # (batch, 1, 1, S)
        tgt_mask = tgt_keep[:, None, None, :] & causal              # (batch, 1, T, T)
        mem_o = ours.encoder(src, src_mask)
        out_o = ours.decoder(tgt, mem_o, tgt_mask=tgt_mask, memory_mask=src_mask)  # torch's order, our masks
    enc_err = (mem_o - mem_t)[src_keep].abs().max().item()
    dec_err = (out_o - out_t).abs().max().item()
    return enc_err, dec_err


import warnings

with warnings.catch_warnings():  # PyTorch's nested-tensor fast path warns that it is a prototype
    warnings.simplefilter("ignore", UserWarning)
    results = {(nf, act): compare_with_torch(nf, act) for nf in (False, True) for act in ("relu", "gelu")}
for (nf, act), (e, dd) in results.items():
    print(f"{'pre-LN ' if nf else 'post-LN'} {act}: max |encoder diff| {e:.1e}, max |decoder diff| {dd:.1e}")

# %% tags=["nbval-check-output"]
for (nf, act), (e, dd) in results.items():
    print(f"{'pre-LN ' if nf else 'post-LN'} {act}: encoder and decoder within 1e-5 of torch.nn.Transformer:",
          e < 1e-5 and dd < 1e-5)

# %% [markdown]
# All four agree to float32 rounding. The test suite repeats this on random sizes, depths, head
# counts and masks (`tests/test_model.py`).
#
# ## What the chapter exports
#
# `annotated_transformer.model`: `Embeddings`, `EncoderLayer`, `DecoderLayer`, `Encoder`,
# `Decoder`, `Generator`, `Transformer`, `make_masks`, `make_model`, `count_parameters` and
# `stacks_from_torch`. The [training chapter](08_training.ipynb) trains it.
