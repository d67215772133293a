"""A straightforward implementation of the paper, written the way most tutorials write it.

Separate Q, K, V projections applied head by head, explicit softmax(QK^T / sqrt(d_k)) V with
masked_fill, and masks rebuilt on every call. It is the baseline the benchmark measures the
package's optimisations against: same architecture (post-LN, the paper's), same parameter count.
"""
from __future__ import annotations

import math

import torch
from torch import nn


class RefAttention(nn.Module):
    def __init__(self, d_model: int, h: int, dropout: float):
        super().__init__()
        self.h, self.d_k = h, d_model // h
        # One (W_q, W_k, W_v) triple per head, as the paper's equation writes it.
        self.q = nn.ModuleList(nn.Linear(d_model, self.d_k) for _ in range(h))
        self.k = nn.ModuleList(nn.Linear(d_model, self.d_k) for _ in range(h))
        self.v = nn.ModuleList(nn.Linear(d_model, self.d_k) for _ in range(h))
        self.o = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, query, key, value, mask=None):
        heads = []
        for i in range(self.h):
            q, k, v = self.q[i](query), self.k[i](key), self.v[i](value)
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.d_k)
            if mask is not None:
                scores = scores.masked_fill(~mask, -1e9)
            heads.append(self.dropout(scores.softmax(-1)) @ v)
        return self.o(torch.cat(heads, dim=-1))


class RefFeedForward(nn.Module):
    def __init__(self, d_model, d_ff, dropout):
        super().__init__()
        self.w_1, self.w_2, self.dropout = nn.Linear(d_model, d_ff), nn.Linear(d_ff, d_model), nn.Dropout(dropout)

    def forward(self, x):
        return self.w_2(self.dropout(torch.relu(self.w_1(x))))


class RefEncoderLayer(nn.Module):
    def __init__(self, d_model, h, d_ff, dropout):
        super().__init__()
        self.attn, self.ff = RefAttention(d_model, h, dropout), RefFeedForward(d_model, d_ff, dropout)
        self.n1, self.n2, self.drop = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.Dropout(dropout)

    def forward(self, x, mask):
        x = self.n1(x + self.drop(self.attn(x, x, x, mask)))
        return self.n2(x + self.drop(self.ff(x)))


class RefDecoderLayer(nn.Module):
    def __init__(self, d_model, h, d_ff, dropout):
        super().__init__()
        self.self_attn, self.src_attn = RefAttention(d_model, h, dropout), RefAttention(d_model, h, dropout)
        self.ff = RefFeedForward(d_model, d_ff, dropout)
        self.n1, self.n2, self.n3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, memory, src_mask, tgt_mask):
        x = self.n1(x + self.drop(self.self_attn(x, x, x, tgt_mask)))
        x = self.n2(x + self.drop(self.src_attn(x, memory, memory, src_mask)))
        return self.n3(x + self.drop(self.ff(x)))


def _positions(max_len, d_model):
    pe = torch.zeros(max_len, d_model)
    pos = torch.arange(max_len).unsqueeze(1).float()
    div = torch.exp(torch.arange(0, d_model, 2).float() * -(math.log(10000.0) / d_model))
    pe[:, 0::2], pe[:, 1::2] = torch.sin(pos * div), torch.cos(pos * div)
    return pe


class RefTransformer(nn.Module):
    """Encoder-decoder with embeddings and generator; masks rebuilt from the tokens on every call."""

    def __init__(self, src_vocab, tgt_vocab, N=6, d_model=512, d_ff=2048, h=8, dropout=0.1, pad=0, max_len=5000):
        super().__init__()
        self.d_model, self.pad = d_model, pad
        self.src_embed, self.tgt_embed = nn.Embedding(src_vocab, d_model), nn.Embedding(tgt_vocab, d_model)
        self.register_buffer("pe", _positions(max_len, d_model), persistent=False)
        self.encoder = nn.ModuleList(RefEncoderLayer(d_model, h, d_ff, dropout) for _ in range(N))
        self.decoder = nn.ModuleList(RefDecoderLayer(d_model, h, d_ff, dropout) for _ in range(N))
        self.generator = nn.Linear(d_model, tgt_vocab)
        self.drop = nn.Dropout(dropout)

    def embed(self, table, tokens):
        return self.drop(table(tokens) * math.sqrt(self.d_model) + self.pe[: tokens.shape[1]])

    def forward(self, src, tgt):
        src_mask = (src != self.pad).unsqueeze(1)  # (batch, 1, src_len), rebuilt every call
        size = tgt.shape[1]
        subsequent = torch.triu(torch.ones(1, size, size, device=tgt.device), diagonal=1) == 0
        tgt_mask = (tgt != self.pad).unsqueeze(1) & subsequent
        memory = self.embed(self.src_embed, src)
        for layer in self.encoder:
            memory = layer(memory, src_mask)
        x = self.embed(self.tgt_embed, tgt)
        for layer in self.decoder:
            x = layer(x, memory, src_mask, tgt_mask)
        return torch.log_softmax(self.generator(x), dim=-1)
