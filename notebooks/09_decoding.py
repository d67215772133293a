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
# **key–value cache**, and it is the first thing this chapter builds.
#
# The paper's own decoding recipe, section 6.1 of {cite}`vaswani2017attention`:
#
# > "We used beam search with a beam size of 4 and length penalty $\alpha = 0.6$ […]. We set the
# > maximum output length during inference to input length + 50, but terminate early when possible."
#
# Greedy decoding, then beam search with that length penalty (from GNMT {cite}`wu2016google`) and
# that early stop, both batched, both with the cache; then pictures of the attention of a trained
# model, layer by layer and head by head.

# %% tags=["parameters"]
device = "auto"   # auto | cpu | cuda  (papermill parameter)
profile = "quick"  # quick (CI, about a minute on 2 cores) | full (the published results)
seed = 0

# %%
#| default_exp decoding
from annotated_transformer.runtime import glue, setup

device = setup(device, profile, seed)

import copy
import time

import matplotlib.pyplot as plt
import torch
from tqdm import tqdm

from annotated_transformer.attention import causal_mask, padding_mask
from annotated_transformer.model import make_masks, make_model
from annotated_transformer.train import TrainConfig, exact_match, fit, heldout_batch, synthetic_batches

print("device:", device, "| profile:", profile)

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
# a held-out exact match of {glue:text}`final_acc`. A snapshot is kept on the way, the first time held-out exact match reaches {glue:text}`snapshot_threshold`: a model that still
# makes mistakes is where decoding strategies differ.

# %%
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
# ## 2. One token at a time, and what it costs
#
# Decoding starts from `<s>`. At step $t$ the decoder reads the $t$ tokens chosen so far, and the
# generator's last row is a distribution over token $t+1$. *Greedy* decoding takes its most likely
# token, appends it, and goes on until the model says `</s>` or a length limit is hit.
#
# The obvious implementation calls `model.decode` on the whole prefix at every step. It is correct,
# because the causal mask makes position $i$'s output depend on tokens $\le i$ only (the
# [model chapter](07_the_transformer.ipynb) proved that exactly), but that same fact means the
# outputs of positions $0..t-1$ are *the same at step $t$ as they were at step $t-1$*. Recomputing
# them is wasted work: generating $L$ tokens costs $1 + 2 + \dots + L = L(L+1)/2$ position-passes
# through every layer instead of $L$.
#
# ## 3. The KV cache
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
# So a step runs the projections and the feed-forward network on one position, not $t$. What still grows
# is the cache, per layer $2 \times t \times d_\text{model}$ numbers for self-attention plus the fixed
# $2 \times S \times d_\text{model}$ for cross-attention, and the new query's attention over it, which
# reads all $t$ cached keys (section 5 counts both). The cache lives in this module: a
# `KVCache` holds the tensors, and `decode_step` runs the model's own layers (their `self_attn`,
# `src_attn`, `feed_forward` and `sublayer` wrappers, with the same weights) on the newest position,
# using `MultiHeadAttention.attend`, the entry point of the [multi-head
# chapter](03_multi_head_attention.ipynb) that takes already-projected heads. `model.py` is
# untouched: the model that `stacks_from_torch` checks against PyTorch is the model that is decoded.
#
# No causal mask is needed inside the cached step: the newest position may see every cached one,
# and there is nothing later to hide. Post-LN and pre-LN both work, because the sublayer wrapper
# passes the (normed, for pre-LN) input to the function it wraps, and that function is where the
# cache is read and extended.

# %%
#| export
import math

import torch

from annotated_transformer.attention import causal_mask, padding_mask
from annotated_transformer.model import Transformer, check_token_ids


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
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity (target positions to hold) must be a positive int, got {capacity!r}")
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
        """Keep rows `index` of the self-attention cache (beam search re-ranks its hypotheses), in place
        when the number of rows stays the same.

        The cross-attention cache is not touched: beam search only moves rows between the beams of
        one source, which share the same memory.
        """
        if index.numel() == self.rows:
            for buf in self.self_k + self.self_v:
                buf.copy_(buf.index_select(0, index))
        else:
            self.self_k = [k.index_select(0, index) for k in self.self_k]
            self.self_v = [v.index_select(0, index) for v in self.self_v]
            self.rows = index.numel()


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
# The claim to check first: step by step through a target, `decode_step` gives the log-probabilities
# of the full decoder, on the trained model and on a pre-LN model with random weights.

# %% tags=["nbval-check-output"]
def cache_error(m, src, tgt, static):
    m.eval()
    src_mask = padding_mask(src, PAD)
    with torch.no_grad():
        memory = m.encode(src, src_mask)
        full = m.generator(m.decode(memory, src_mask, tgt, causal_mask(tgt.size(1), device=tgt.device)[None, None]))
        cache = KVCache(m, memory, capacity=tgt.size(1), static=static)
        steps = torch.stack([decode_step(m, tgt[:, t], cache, src_mask) for t in range(tgt.size(1))], 1)
    return (steps - full).abs().max().item()


torch.manual_seed(seed)
pre_ln = make_model(13, 13, N=3, d_model=32, d_ff=64, h=4, norm_first=True).to(device)
for name, m in (("trained post-LN", model), ("random pre-LN", pre_ln)):
    for static in (False, True):
        print(f"{name}, {'static' if static else 'growing'} cache: cached steps equal the full decoder within 1e-5:",
              cache_error(m, heldout.src[:8], heldout.tgt_in[:8], static) < 1e-5)

# %% [markdown]
# ## 4. Greedy decoding, batched
#
# `greedy_decode` decodes a batch of sources at once. Rows finish at different steps: a row that has
# emitted `</s>` gets `<pad>` from then on, and the loop stops as soon as every row has finished
# (the paper's "terminate early when possible"), or when the output reaches `max_len` tokens.
#
# The conventions, shared with `beam_search` and relied on by the [translation
# chapter](10_translation.ipynb) and the benchmarks:
#
# - `src` is a LongTensor (batch, src_len), padded with `pad_idx`; the source mask is built from it;
# - the result is a LongTensor (batch, L) with $L \le$ `max_len`: `<s>` first, then the tokens,
#   `</s>`, and `pad_idx` after it; `max_len` counts `<s>`, and must fit the positional table;
# - `<pad>` is never generated (its log-probability is set to $-\infty$): padding is not a word, and
#   a `<pad>` in the middle of an output would be indistinguishable from the end;
# - the model is put in eval mode for the call (dropout off) and returned to its previous mode;
# - `use_cache=False` recomputes the whole prefix at every step, the reference the cache is tested
#   against and timed against.

# %%
#| export
class _Stepper:
    """Next-token log-probabilities for every row of ys, with or without the cache."""

    def __init__(self, model: Transformer, memory: torch.Tensor, src_mask: torch.Tensor, use_cache: bool,
                 max_len: int):
        self.model, self.memory, self.src_mask = model, memory, src_mask
        self.cache = KVCache(model, memory, capacity=max_len) if use_cache else None

    def __call__(self, ys: torch.Tensor) -> torch.Tensor:
        # ys (rows, t): every token so far, <s> first -> (rows, vocab)
        if self.cache is not None:
            return decode_step(self.model, ys[:, -1], self.cache, self.src_mask)
        out = self.model.decode(self.memory, self.src_mask, ys, causal_mask(ys.size(1), device=ys.device)[None, None])
        return self.model.generator(out[:, -1])                       # the whole prefix again, every step

    def reorder(self, index: torch.Tensor) -> None:
        if self.cache is not None:
            self.cache.reorder(index)


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

    def reorder(self, index: torch.Tensor) -> None:
        self.cache.reorder(index)                          # in place: the graph's addresses stay valid


def _check_decode_args(model, src, max_len, bos_idx, eos_idx, pad_idx) -> None:
    if not isinstance(model, Transformer):
        raise TypeError(f"model must be an annotated_transformer.model.Transformer, got {type(model).__name__}")
    if not isinstance(src, torch.Tensor) or src.dim() != 2 or src.is_floating_point() or src.dtype == torch.bool:
        what = f"{src.dtype} tensor of shape {tuple(src.shape)}" if isinstance(src, torch.Tensor) else type(src).__name__
        raise ValueError(f"src must be an integer tensor of token ids of shape (batch, src_len), got a {what}")
    if src.size(0) == 0 or src.size(1) == 0:
        raise ValueError(f"src must hold at least one token in at least one sequence, got shape {tuple(src.shape)}")
    check_token_ids(src, model.src_embed.vocab, "src")                    # once, on the host
    table = model.pos_encoding.max_len
    if isinstance(max_len, bool) or not isinstance(max_len, int) or not 2 <= max_len <= table:
        raise ValueError(f"max_len (the output length, <s> included) must be an int in [2, {table}] "
                         f"(the model's positional table has {table} positions), got {max_len!r}")
    vocab = model.generator.proj.out_features
    for name, idx in (("bos_idx", bos_idx), ("eos_idx", eos_idx), ("pad_idx", pad_idx)):
        if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < vocab:
            raise ValueError(f"{name}={idx!r} is not an id of the target vocabulary of {vocab}")
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
    is a GPU sync); the output is the same, as padding columns past the last </s> are dropped.
    """
    _check_decode_args(model, src, max_len, bos_idx, eos_idx, pad_idx)
    if isinstance(stop_check_every, bool) or not isinstance(stop_check_every, int) or stop_check_every < 1:
        raise ValueError(f"stop_check_every must be a positive int, got {stop_check_every!r}")
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
            step = _Stepper(model, memory, src_mask, use_cache, max_len)
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
# Greedy decoding of a few held-out sources by the trained model, and the two ways of measuring it.
# The training chapter measured *teacher-forced* exact match (every position's argmax right, given
# the correct prefix) and argued it equals the exact match of greedy decoding: if every
# teacher-forced prediction is right, greedy decoding never leaves the correct prefix; if greedy
# decoding reproduces the target, each of its choices was a teacher-forced prediction. Here both are
# measured, per sequence, on the fully trained model and on the half-trained snapshot.

# %%
def matches(out: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """(n,) bool: decoded rows equal to the target rows (both <s> ... </s> then padding)."""
    width = max(out.size(1), tgt.size(1))
    pad_to = lambda t: torch.nn.functional.pad(t, (0, width - t.size(1)), value=PAD)
    return (pad_to(out) == pad_to(tgt)).all(1)


def teacher_forced_ok(m, batch) -> torch.Tensor:
    with torch.no_grad():
        m.eval()
        pred = m(batch.src, batch.tgt_in, batch.src_mask, batch.tgt_mask).argmax(-1)
    return ((pred == batch.tgt_y) | (batch.tgt_y == PAD)).all(1)


out_len = heldout.tgt.size(1)   # <s> + the longest sequence + </s>
greedy_ok = {name: matches(greedy_decode(m, heldout.src, out_len, BOS, EOS, PAD), heldout.tgt)
             for name, m in (("trained", model), ("half-trained", half))}
tf_ok = {"trained": teacher_forced_ok(model, heldout), "half-trained": teacher_forced_ok(half, heldout)}
show = greedy_decode(model, heldout.src[:3], out_len, BOS, EOS, PAD)
for s, o in zip(heldout.src[:3].tolist(), show.tolist()):
    print("source", s, "-> greedy", o)
for name in greedy_ok:
    print(f"{name:12s}: greedy exact match {greedy_ok[name].float().mean():.1%}, "
          f"teacher-forced exact match {tf_ok[name].float().mean():.1%}")

# %% tags=["nbval-check-output"]
print("greedy exact match == teacher-forced exact match, sequence by sequence:",
      all(torch.equal(greedy_ok[n], tf_ok[n]) for n in greedy_ok))
print("cached greedy == uncached greedy, token for token:",
      all(torch.equal(greedy_decode(m, heldout.src, out_len, BOS, EOS, PAD, use_cache=True),
                      greedy_decode(m, heldout.src, out_len, BOS, EOS, PAD, use_cache=False))
          for m in (model, half, pre_ln)))

# %% [markdown]
# ## 5. What the cache saves
#
# Timing greedy decoding with and without the cache, on a model large enough for the arithmetic to
# matter (random weights: two layers, $d_\text{model} = 256$, a vocabulary of {glue:text}`bench_vocab`;
# a batch of {glue:text}`bench_batch` sources of {glue:text}`bench_src_len` tokens). So that every run decodes the full length, `</s>` is made impossible for
# this model by a large negative bias. Without the cache, the work per step grows with the prefix,
# so the total grows roughly with the square of the output length; with it, every step costs about
# the same, as long as attention over the cache is small next to the rest of the step (counted below).

# %%
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


def best_time(fn, repeat=3):  # the best of 3: this machine's cores are shared
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return min(times)


greedy_decode(bench_model, bench_src, 4, BOS, EOS, PAD)   # warm-up: first calls pay one-time costs
timings = {True: [], False: []}
for L in tqdm(lengths, desc="output length"):
    for use_cache in (True, False):
        timings[use_cache].append(best_time(lambda: greedy_decode(bench_model, bench_src, L + 1, BOS, EOS, PAD,
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
# candidates the $k$ best survive, ranked by their log-probability. Three details decide whether it
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
# **Finished hypotheses.** A hypothesis that emits `</s>` is finished. Here it stays in the beam with
# its score frozen (its only continuation is `<pad>`, at no cost), competing for the $k$ places with
# the live ones on equal terms.
#
# **Stopping early, exactly.** A source is done when its best finished hypothesis outranks anything a
# live one could still reach. A live hypothesis's log-probability can only fall, and its penalty is at
# most $\text{lp}(\text{max\_len} - 1)$ (for $\alpha \ge 0$), so $\log P / \text{lp}(\text{max\_len} - 1)$
# bounds its every future score. When no live bound beats the best finished score, continuing could
# not change the answer, and decoding stops; the batch stops when every source is done.
#
# It is batched the obvious way: the $k$ hypotheses of each source are $k$ rows of a
# (batch·$k$)-row decoder batch; the memory is encoded once per source and repeated $k$ times; after
# each step the self-attention cache is reordered to follow the surviving hypotheses. At the start
# the $k$ rows are all `<s>`, so all but one get score $-\infty$, or the beam would fill with $k$
# copies of the same hypothesis. With $k = 1$ every step keeps the single best extension, which is
# greedy decoding.

# %%
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
    when every source is done. Output as greedy_decode's: <s> ... </s> then pad_idx. beam_size=1 is greedy.
    """
    _check_decode_args(model, src, max_len, bos_idx, eos_idx, pad_idx)
    if isinstance(beam_size, bool) or not isinstance(beam_size, int) or beam_size < 1:
        raise ValueError(f"beam_size must be a positive int, got {beam_size!r}")
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
        step = _Stepper(model, memory, src_mask, use_cache, max_len)
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
            step.reorder(rows)
            best_done = (scores / _length_penalty(lengths, length_penalty)).masked_fill(~finished, -inf).amax(1)
            live_bound = (scores / lp_max).masked_fill(finished, -inf).amax(1)
            if bool((live_bound <= best_done).all()):                         # nothing left can win
                break
        final = scores / _length_penalty(lengths, length_penalty)
        final = torch.where(finished.any(1, keepdim=True), final.masked_fill(~finished, -inf), final)
        best = final.argmax(1)                                                # (batch,)
        out = ys.view(batch, k, -1)[torch.arange(batch, device=dev), best]    # (batch, t + 1)
        return out[:, : int(lengths.gather(1, best[:, None]).max()) + 1]
    finally:
        model.train(was_training)

# %% [markdown]
# The two checks the tests repeat on random models: beam size 1 is greedy decoding, token for token,
# and the cache changes no token of beam search either.

# %% tags=["nbval-check-output"]
for name, m in (("trained", model), ("half-trained", half), ("random pre-LN", pre_ln)):
    g = greedy_decode(m, heldout.src, out_len, BOS, EOS, PAD)
    b1 = beam_search(m, heldout.src, out_len, BOS, EOS, PAD, beam_size=1)
    b4 = beam_search(m, heldout.src[:100], out_len, BOS, EOS, PAD, beam_size=4)
    b4_uncached = beam_search(m, heldout.src[:100], out_len, BOS, EOS, PAD, beam_size=4, use_cache=False)
    print(f"{name:13s}: beam 1 == greedy: {torch.equal(g, b1)} | beam 4 cached == uncached: {torch.equal(b4, b4_uncached)}")

# %% [markdown]
# What beam search buys on this task. The fully trained model is right either way; the half-trained
# snapshot is where the strategies differ. Exact match on the {glue:text}`n_heldout` held-out sequences, with the mean
# output length (tokens after `<s>`, `</s>` included; the targets' mean is on the first line):

# %%
def mean_len(out):
    return ((out != PAD).sum(1) - 1).float().mean().item()


print(f"{'targets':32s} {'':>12s}  mean length {mean_len(heldout.tgt):.2f}")
for name, m in (("trained", model), ("half-trained", half)):
    for label, fn in (("greedy", lambda: greedy_decode(m, heldout.src, out_len, BOS, EOS, PAD)),
                      ("beam 4, alpha 0", lambda: beam_search(m, heldout.src, out_len, BOS, EOS, PAD, 4, 0.0)),
                      ("beam 4, alpha 0.6", lambda: beam_search(m, heldout.src, out_len, BOS, EOS, PAD, 4, 0.6))):
        out = fn()
        print(f"{name + ', ' + label:32s} exact {matches(out, heldout.tgt).float().mean():6.1%}  "
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
# keys, and each row sums to 1.

# %%
row = int((heldout.src != PAD).sum(1).argmax())
src1, tgt1 = heldout.src[row:row + 1], heldout.tgt_in[row:row + 1]
maps = model.attention_maps(src1, tgt1, *make_masks(src1, tgt1, PAD))
names = {PAD: "<pad>", BOS: "<s>", EOS: "</s>"}
src_tok = [names.get(i, str(i)) for i in src1[0].tolist()]
tgt_tok = [names.get(i, str(i)) for i in tgt1[0].tolist()]
kinds = [("encoder", "encoder self-attention", src_tok, src_tok),
         ("decoder_self", "decoder self-attention", tgt_tok, tgt_tok),
         ("cross", "cross-attention (decoder -> source)", tgt_tok, src_tok)]
N_layers, h = len(maps["encoder"]), maps["encoder"][0].size(1)
fig, axes = plt.subplots(3 * N_layers, h, figsize=(2.6 * h, 2.7 * 3 * N_layers), squeeze=False)
for r, (key, title, q_tok, k_tok) in enumerate(kinds):
    for layer in range(N_layers):
        w = maps[key][layer][0].cpu()                             # (h, q, k)
        assert torch.isfinite(w).all()
        for head in range(h):
            ax = axes[r * N_layers + layer, head]
            ax.imshow(w[head], cmap="viridis", vmin=0, vmax=1)
            ax.set_xticks(range(len(k_tok)), k_tok, fontsize=7, rotation=90)
            ax.set_yticks(range(len(q_tok)), q_tok, fontsize=7)
            ax.set_title(f"{title}\nlayer {layer + 1}, head {head + 1}", fontsize=8)
plt.tight_layout(); plt.show()

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
