"""annotated_transformer.variants (chapter 16): each change since 2017 against a reference.

References: chapter 4's offset_matrix and the complex-number form of LLaMA's reference code (RoPE), the formula
and the authors' code (ALiBi's slopes), torch.nn.RMSNorm, F.silu / F.gelu, F.scaled_dot_product_attention with
enable_gqa and chapter 3's MultiHeadAttention (grouped-query attention), make_model (make_variant_model with every
option at its 2017 value), and the recorded full-profile runs in results/variants-*.json, whose BLEU is recomputed
from their stored translations."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from annotated_transformer.decoding import greedy_decode
from annotated_transformer.model import count_parameters
from annotated_transformer.multihead import MultiHeadAttention
from annotated_transformer.positional import _frequencies, offset_matrix
from annotated_transformer.residual import PositionwiseFeedForward
from annotated_transformer.variants import (GQACache, GroupedQueryAttention, LearnedPositionalEmbedding,
                                            NoPositionalEncoding,
                                            RMSNorm, SwiGLU, alibi_bias, alibi_slopes, apply_rope,
                                            kv_cache_bytes_per_token, make_variant_model, rope_frequencies,
                                            swiglu_d_ff, translate_greedy)

ROOT = Path(__file__).resolve().parents[1]
RECORDS = sorted((ROOT / "results").glob("variants-*.json"))


# --------------------------------------------------------------------------- RoPE
def test_rope_frequencies_are_chapter_4s():
    assert torch.equal(rope_frequencies(64), _frequencies(64))


def test_rope_is_the_offset_matrix_on_rows():
    torch.manual_seed(0)
    x = torch.randn(7, 16, dtype=torch.float64)                        # rows at positions 3..9
    rotated = apply_rope(x, start=3)
    for s in range(7):
        assert torch.allclose(rotated[s], x[s] @ offset_matrix(3 + s, 16, torch.float64), atol=1e-12)


def test_rope_matches_the_complex_number_reference():
    """LLaMA's reference code: view pairs as complex numbers and multiply by e^(i m θ_j)."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 32)                                        # (batch, heads, seq, d_k)
    theta = 10000.0 ** (-torch.arange(0, 32, 2).float() / 32)
    angles = torch.outer(torch.arange(5, 14).float(), theta)            # positions 5..13
    ref = torch.view_as_real(torch.view_as_complex(x.reshape(2, 3, 9, 16, 2)) * torch.polar(torch.ones_like(angles), angles))
    assert torch.allclose(apply_rope(x, start=5), ref.flatten(-2), atol=1e-5)


@pytest.mark.parametrize("shift", [1, 17, 1000])
def test_rope_scores_are_invariant_to_a_common_shift(shift):
    torch.manual_seed(shift)
    q, k = torch.randn(2, 4, 10, 16, dtype=torch.float64), torch.randn(2, 4, 10, 16, dtype=torch.float64)
    scores = apply_rope(q) @ apply_rope(k).transpose(-2, -1)
    shifted = apply_rope(q, start=shift) @ apply_rope(k, start=shift).transpose(-2, -1)
    assert torch.allclose(scores, shifted, atol=1e-10)
    assert not torch.allclose(scores, q @ k.transpose(-2, -1), atol=1e-3), "the rotation did nothing"
    assert torch.allclose(apply_rope(q).norm(dim=-1), q.norm(dim=-1)), "a rotation keeps lengths"


def test_rope_errors():
    with pytest.raises(ValueError, match="even"):
        apply_rope(torch.randn(3, 5))
    with pytest.raises(ValueError, match="floating-point"):
        apply_rope(torch.arange(8).view(2, 4))
    with pytest.raises(ValueError, match="start"):
        apply_rope(torch.randn(3, 4), start=-1)


# --------------------------------------------------------------------------- ALiBi
def _authors_slopes(n):
    """get_slopes from the ALiBi authors' repository (ofirpress/attention_with_linear_biases), verbatim in logic."""
    def power_of_2(n):
        start = 2 ** (-2 ** -(math.log2(n) - 3))
        return [start * start ** i for i in range(n)]
    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + _authors_slopes(2 * closest)[0::2][: n - closest]


@pytest.mark.parametrize("h", [1, 2, 4, 8, 16, 32])
def test_alibi_slopes_for_a_power_of_2_follow_the_paper(h):
    expected = torch.tensor([2.0 ** (-8 * i / h) for i in range(1, h + 1)])
    assert torch.allclose(alibi_slopes(h), expected)
    assert alibi_slopes(h)[-1].item() == pytest.approx(2.0 ** -8)       # the last head's slope is 1/256


def test_alibi_slopes_for_8_heads_are_halvings():
    assert alibi_slopes(8).tolist() == [2.0 ** -i for i in range(1, 9)]


@pytest.mark.parametrize("h", [3, 5, 6, 12, 20])
def test_alibi_slopes_otherwise_follow_the_authors_code(h):
    assert torch.allclose(alibi_slopes(h), torch.tensor(_authors_slopes(h)))


def test_alibi_bias_formula_and_decoding_rows():
    bias = alibi_bias(4, 5, 5)
    slopes = alibi_slopes(4)
    for head in range(4):
        for i in range(5):
            for j in range(5):
                assert bias[head, i, j].item() == pytest.approx(-slopes[head].item() * abs(i - j))
    assert torch.equal(alibi_bias(4, 2, 5), bias[:, 3:]), "queries are the last positions of the keys"
    with pytest.raises(ValueError, match="self-attention"):
        alibi_bias(4, 6, 5)


# --------------------------------------------------------------------------- positions as modules
def test_learned_positions_add_their_rows_and_refuse_to_extrapolate():
    pe = LearnedPositionalEmbedding(8, max_len=10).eval()
    x = torch.randn(2, 4, 8)
    assert torch.allclose(pe(x, start=3), x + pe.pe[3:7])
    assert torch.allclose(pe(x)[:, 1:], pe(x[:, 1:], start=1))
    with pytest.raises(ValueError, match="cannot extrapolate"):
        pe(torch.randn(1, 11, 8))
    with pytest.raises(ValueError, match="d_model=8"):
        pe(torch.randn(1, 3, 6))


def test_no_positional_encoding_adds_nothing_and_refuses_the_kv_cache():
    pe = NoPositionalEncoding(8, max_len=10).eval()
    x = torch.randn(2, 4, 8)
    assert torch.equal(pe(x), x)
    with pytest.raises(RuntimeError, match="use_cache=False"):
        pe.pe


# --------------------------------------------------------------------------- RMSNorm
def test_rmsnorm_equals_torch_in_outputs_and_gradients():
    torch.manual_seed(0)
    theirs = nn.RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        theirs.weight.normal_()
    ours = RMSNorm(64)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 5, 64) * 4 + 2
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    ours(x1).pow(2).sum().backward()
    theirs(x2).pow(2).sum().backward()
    assert torch.allclose(x1.grad, x2.grad, atol=1e-4)
    assert torch.allclose(ours.weight.grad, theirs.weight.grad, atol=1e-3)
    by_hand = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * theirs.weight
    assert torch.allclose(ours(x), by_hand, atol=1e-5) and torch.allclose(ours(x), theirs(x), atol=1e-5)


def test_rmsnorm_half_precision_and_errors():
    norm = RMSNorm(32)
    x = torch.randn(4, 32) * 300
    assert norm(x.half()).dtype == torch.float16
    assert torch.allclose(norm(x.half()).float(), norm(x), atol=1e-2)
    with pytest.raises(ValueError, match="d_model=32"):
        norm(torch.randn(4, 31))
    with pytest.raises(ValueError, match="eps"):
        RMSNorm(32, eps=-1.0)


# --------------------------------------------------------------------------- feed-forward
def test_swiglu_is_the_gated_formula():
    torch.manual_seed(0)
    ffn = SwiGLU(16, 24)
    x = torch.randn(3, 16)
    gate, value = x @ ffn.w_1.weight.T, x @ ffn.w_3.weight.T
    assert torch.allclose(ffn(x), (gate * torch.sigmoid(gate) * value) @ ffn.w_2.weight.T, atol=1e-6)
    assert all(lin.bias is None for lin in (ffn.w_1, ffn.w_2, ffn.w_3))


@pytest.mark.parametrize("d_model, d_ff", [(768, 3072), (512, 1536), (32, 96)])
def test_swiglu_at_two_thirds_width_has_the_ffns_weights(d_model, d_ff):
    relu = PositionwiseFeedForward(d_model, d_ff, activation="relu")
    swiglu = SwiGLU(d_model, swiglu_d_ff(d_ff))
    assert swiglu_d_ff(d_ff) * 3 == 2 * d_ff
    assert count_parameters(swiglu) == relu.w_1.weight.numel() + relu.w_2.weight.numel()


def test_gelu_is_x_times_the_normal_cdf():
    z = torch.linspace(-5, 5, 101, dtype=torch.float64)
    ffn = PositionwiseFeedForward(4, 8, dropout=0.0, activation="gelu")
    assert torch.allclose(ffn._act(z), z * 0.5 * (1 + torch.erf(z / math.sqrt(2))))


# --------------------------------------------------------------------------- grouped-query attention
def _reference(q, k, v, bias=None, mask=None):
    """Repeat each key/value head for its group, then the textbook formula."""
    group = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    if bias is not None:
        scores = scores + bias
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, -1) @ v


@pytest.mark.parametrize("n_kv", [8, 4, 2, 1])
@pytest.mark.parametrize("positions", [None, "rope", "alibi"])
def test_gqa_matches_sdpa_with_enable_gqa_and_repeated_heads(n_kv, positions):
    torch.manual_seed(n_kv)
    attn = GroupedQueryAttention(64, 8, n_kv, positions=positions).eval()
    x = torch.randn(2, 6, 64)
    mask = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    mask[1, ..., 4:] = False                                          # the second sentence is padded
    q = attn._heads(attn.w_q(x), 8)
    k, v = attn.project_kv(x, x)
    if positions == "rope":
        q = apply_rope(q)
    bias = alibi_bias(8, 6, 6) if positions == "alibi" else None
    ref = _reference(q, k, v, bias, mask)
    attn_mask = mask if bias is None else bias.masked_fill(~mask, float("-inf"))
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=True)
    merged = lambda t: attn.w_o(t.transpose(1, 2).reshape(2, 6, 64))  # noqa: E731
    fast, _ = attn(x, x, x, mask)
    explicit, weights = attn(x, x, x, mask, need_weights=True)
    assert torch.allclose(fast, merged(ref), atol=1e-5) and torch.allclose(fast, merged(sdpa), atol=1e-5)
    assert torch.allclose(explicit, fast, atol=1e-5)
    assert weights.shape == (2, 8, 6, 6) and torch.allclose(weights.sum(-1), torch.ones(2, 8, 6))
    assert weights[1, :, :, 4:].abs().max() == 0, "padding got weight"
    assert k.shape == (2, n_kv, 6, 8)


def test_gqa_with_all_heads_is_multi_head_attention():
    torch.manual_seed(0)
    mha, gqa = MultiHeadAttention(32, 4).eval(), GroupedQueryAttention(32, 4).eval()
    gqa.load_state_dict(mha.state_dict())                             # same names and shapes
    x, mem = torch.randn(2, 5, 32), torch.randn(2, 7, 32)
    mask = torch.ones(5, 5, dtype=torch.bool).tril()[None, None]
    assert torch.allclose(gqa(x, x, x, mask)[0], mha(x, x, x, mask)[0], atol=1e-6)
    out, w = gqa(x, mem, mem, need_weights=True)
    ref_out, ref_w = mha(x, mem, mem, need_weights=True)
    assert torch.allclose(out, ref_out, atol=1e-6) and torch.allclose(w, ref_w, atol=1e-6)


@pytest.mark.parametrize("positions", ["rope", "alibi"])
def test_a_decoding_query_sees_the_last_row_of_causal_self_attention(positions):
    """Queries are the last positions of the keys: one query after t keys = row t of the full causal pass."""
    torch.manual_seed(0)
    attn = GroupedQueryAttention(32, 4, 2, positions=positions).eval()
    x = torch.randn(1, 6, 32)
    full = attn(x, x, x, torch.ones(6, 6, dtype=torch.bool).tril()[None, None])[0]
    for t in range(1, 7):
        step = attn(x[:, t - 1:t], x[:, :t], x[:, :t])[0]
        assert torch.allclose(step[:, 0], full[:, t - 1], atol=1e-5)


def test_rope_attention_scores_do_not_depend_on_where_the_sentence_starts():
    torch.manual_seed(0)
    attn = GroupedQueryAttention(32, 4, positions="rope").eval()
    x = torch.randn(1, 5, 32)
    padded = torch.cat([torch.randn(1, 3, 32), x], dim=1)             # the same tokens at positions 3..7
    mask = torch.tensor([False] * 3 + [True] * 5)[None, None, None]
    _, w = attn(x, x, x, need_weights=True)
    _, w_shifted = attn(padded, padded, padded, mask, need_weights=True)
    assert torch.allclose(w, w_shifted[:, :, 3:, 3:], atol=1e-5)


def test_qk_norm_keeps_growing_weights_out_of_the_softmax():
    torch.manual_seed(0)
    x = torch.randn(1, 8, 32)
    entropy = {}
    for qk in (False, True):
        attn = GroupedQueryAttention(32, 4, qk_norm=qk).eval()
        w1 = attn(x, x, x, need_weights=True)[1]
        with torch.no_grad():                                          # q and k grow 30-fold
            for p in (*attn.w_q.parameters(), *attn.w_k.parameters()):
                p.mul_(30)
        w30 = attn(x, x, x, need_weights=True)[1]
        entropy[qk] = (torch.special.entr(w1).sum(-1).mean(), torch.special.entr(w30).sum(-1).mean())
    assert entropy[False][1] < 0.5 * entropy[False][0], "without QK-norm large weights should sharpen attention"
    assert torch.allclose(entropy[True][0], entropy[True][1], atol=1e-4)


def test_gqa_zero_output_for_a_query_with_no_key_and_errors():
    attn = GroupedQueryAttention(16, 4, 2).eval()
    x = torch.randn(1, 3, 16)
    nothing = torch.zeros(1, 1, 1, 3, dtype=torch.bool)
    assert torch.allclose(attn(x, x, x, nothing)[0], attn.w_o.bias.expand(1, 3, 16))
    assert torch.isfinite(attn(x, x, x, nothing, need_weights=True)[1]).all()
    with pytest.raises(ValueError, match="n_kv_heads"):
        GroupedQueryAttention(16, 4, 3)
    with pytest.raises(ValueError, match="even"):
        GroupedQueryAttention(12, 4, positions="rope")
    with pytest.raises(ValueError, match="positions"):
        GroupedQueryAttention(16, 4, positions="t5")
    with pytest.raises(ValueError, match="bool"):
        attn(x, x, x, torch.ones(1, 1, 1, 3))
    with pytest.raises(ValueError, match="3-D"):
        attn(x, x, x, torch.ones(1, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="d_model=16"):
        attn(x, torch.randn(1, 3, 8), torch.randn(1, 3, 8))
    with pytest.raises(RuntimeError):
        attn(x, x, x, torch.ones(1, 1, 1, 4, dtype=torch.bool))


@pytest.mark.parametrize("n_kv", [8, 4, 2, 1])
def test_kv_cache_bytes_formula_and_measured_tensors(n_kv):
    N, T = 3, 11
    attn = GroupedQueryAttention(64, 8, n_kv).to(torch.float16)
    k, v = attn.project_kv(torch.randn(1, T, 64, dtype=torch.float16), torch.randn(1, T, 64, dtype=torch.float16))
    assert kv_cache_bytes_per_token(N, 64, 8, n_kv) == N * (k.nbytes + v.nbytes) // T == 2 * N * n_kv * 8 * 2
    assert kv_cache_bytes_per_token(N, 64, 8) == kv_cache_bytes_per_token(N, 64, 8, 8)


# --------------------------------------------------------------------------- the configurable model
SMALL = dict(N=2, d_model=32, h=4, d_ff=96, dropout=0.1, max_len=64)


def test_all_2017_options_are_make_model_exactly():
    from annotated_transformer.model import make_model

    torch.manual_seed(0)
    book = make_model(50, 50, share_embeddings=True, tie_output=True, **SMALL)
    torch.manual_seed(0)
    ours = make_variant_model(50, **SMALL)
    a, b = book.state_dict(), ours.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "same seed, different weights"
    assert [type(m) for m in book.modules()] == [type(m) for m in ours.modules()]
    book.eval(), ours.eval()
    src, tgt = torch.randint(1, 50, (3, 7)), torch.randint(1, 50, (3, 5))
    assert torch.equal(book(src, tgt), ours(src, tgt))
    torch.manual_seed(1)
    other = make_variant_model(50, **SMALL)
    other.load_state_dict(book.state_dict())                          # same weights, another seed's init
    assert torch.equal(other.eval()(src, tgt), book(src, tgt))


OPTIONS = [dict(positions="learned"), dict(positions="rope"), dict(positions="alibi"), dict(norm="rms"),
           dict(qk_norm=True), dict(ffn="gelu"), dict(ffn="swiglu"), dict(n_kv_heads=2), dict(n_kv_heads=1),
           dict(positions="rope", norm="rms", ffn="swiglu", n_kv_heads=2, qk_norm=True)]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "+".join(f"{k}={v}" for k, v in o.items()))
def test_each_variant_builds_runs_and_counts_its_parameters(options):
    torch.manual_seed(0)
    base = count_parameters(make_variant_model(50, **SMALL))
    model = make_variant_model(50, **SMALL, **options).eval()
    src, tgt = torch.randint(1, 50, (2, 6)), torch.randint(1, 50, (2, 4))
    logp = model(src, tgt)
    assert logp.shape == (2, 4, 50) and torch.allclose(logp.exp().sum(-1), torch.ones(2, 4), atol=1e-4)
    assert all(model.config[k] == v for k, v in options.items())
    n, d, d_ff, h = SMALL["N"], SMALL["d_model"], SMALL["d_ff"], SMALL["h"]
    expected = base
    if options.get("positions") == "learned":
        expected += SMALL["max_len"] * d
    if options.get("norm") == "rms":
        expected -= 5 * n * d                                          # post-LN (no final norms): LN biases gone
    if options.get("qk_norm"):
        expected += 3 * n * 2 * (d // h)                              # q and k gains in every attention
    if options.get("ffn") == "swiglu":
        expected -= 2 * n * (d_ff + d)                                # the FFN's biases
    if "n_kv_heads" in options:
        expected -= 3 * n * 2 * (h - options["n_kv_heads"]) * (d // h) * (d + 1)
    assert count_parameters(model) == expected


def test_variant_options_are_checked():
    for bad in (dict(positions="t5"), dict(norm="batch"), dict(ffn="geglu"), dict(n_kv_heads=3), dict(qk_norm=1)):
        with pytest.raises(ValueError):
            make_variant_model(50, **SMALL, **bad)


def test_chapter_9s_cache_refuses_variants_it_cannot_decode_and_works_with_learned_positions():
    torch.manual_seed(0)
    src = torch.randint(3, 50, (2, 5))
    for options in (dict(positions="rope"), dict(n_kv_heads=2)):
        model = make_variant_model(50, **SMALL, **options)
        with pytest.raises((RuntimeError, NotImplementedError), match="use_cache=False"):
            greedy_decode(model, src, 8, 1, 2, 0)
    learned = make_variant_model(50, **SMALL, positions="learned")
    assert torch.equal(greedy_decode(learned, src, 8, 1, 2, 0), greedy_decode(learned, src, 8, 1, 2, 0, use_cache=False))


GERMAN = ["Ein Hund läuft im Schnee.", "Zwei Mädchen überqueren eine große Straße.", "Die Öfen sind heiß.",
          "Ein Mann fährt Fahrrad.", "Eine Frau liest ein Buch."]
ENGLISH = ["A dog runs in the snow.", "Two girls cross a big street.", "The ovens are hot.",
           "A man rides a bike.", "A woman reads a book."]


@pytest.fixture(scope="module")
def tokenizer():
    from annotated_transformer.data import train_tokenizer

    return train_tokenizer((GERMAN + ENGLISH) * 10, 150, "bpe", min_frequency=1)


def _memorise(tokenizer, **options):
    from annotated_transformer.data import encode_sentences
    from annotated_transformer.train import TrainConfig, fit
    from annotated_transformer.translation import token_batches

    torch.manual_seed(0)
    model = make_variant_model(tokenizer.get_vocab_size(), N=1, d_model=64, h=4, d_ff=128, dropout=0.0, max_len=128,
                               norm_first=True, **options)
    get_batch = token_batches(encode_sentences(tokenizer, GERMAN), encode_sentences(tokenizer, ENGLISH, bos=True),
                              max_tokens=1000)
    fit(model, get_batch, TrainConfig(steps=120, warmup=20, smoothing=0.0, log_every=50), progress=False)
    return model


def test_translate_greedy_is_chapter_10s_greedy_decoding_for_the_2017_model(tokenizer):
    from annotated_transformer.data import decode_ids, encode_sentences
    from annotated_transformer.translation import translate_ids

    model = _memorise(tokenizer)
    cached = decode_ids(tokenizer, translate_ids(model, encode_sentences(tokenizer, GERMAN), beam_size=1))
    assert translate_greedy(model, tokenizer, GERMAN, batch_size=2) == cached == ENGLISH


def test_a_model_with_every_change_learns_and_translates(tokenizer):
    model = _memorise(tokenizer, positions="rope", norm="rms", ffn="swiglu", n_kv_heads=2, qk_norm=True)
    assert translate_greedy(model, tokenizer, GERMAN[::-1]) == ENGLISH[::-1]
    with pytest.raises(TypeError, match="list of sentences"):
        translate_greedy(model, tokenizer, GERMAN[0])


# --------------------------------------------------------------------------- decoding with a cache
@pytest.mark.parametrize("positions", [None, "rope", "alibi"])
@pytest.mark.parametrize("g", [8, 2, 1])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_cached_steps_equal_one_causal_pass(positions, g, qk_norm):
    from annotated_transformer.attention import causal_mask

    torch.manual_seed(0)
    attn = GroupedQueryAttention(64, 8, n_kv_heads=g, positions=positions, qk_norm=qk_norm).eval()
    xs = torch.randn(3, 11, 64)
    cache = GQACache(attn, batch=3, capacity=16)
    with torch.no_grad():
        stepped = torch.cat([attn.step(xs[:, t:t + 1], cache) for t in range(11)], dim=1)
        full = attn(xs, xs, xs, causal_mask(11)[None, None])[0]
    assert cache.length == 11
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=1e-5)


def test_the_cache_measures_the_formula_and_refuses_misuse():
    attn = GroupedQueryAttention(64, 8, n_kv_heads=2)
    cache = GQACache(attn, batch=2, capacity=2)
    assert cache.k.shape == (2, 2, 2, 8)
    assert cache.bytes_per_token() == kv_cache_bytes_per_token(1, 64, 8, 2, bytes_per_value=4)
    with torch.no_grad():
        with pytest.raises(ValueError, match="one token a row"):
            attn.step(torch.randn(2, 3, 64), cache)
        with pytest.raises(ValueError, match="x has 1 rows, the cache 2"):
            attn.step(torch.randn(1, 1, 64), cache)
        attn.step(torch.randn(2, 1, 64), cache)
        attn.step(torch.randn(2, 1, 64), cache)
        with pytest.raises(ValueError, match="the cache is full"):
            attn.step(torch.randn(2, 1, 64), cache)
    with pytest.raises(ValueError, match="capacity"):
        GQACache(attn, 2, 0)


# --------------------------------------------------------------------------- the recorded full runs
@pytest.mark.skipif(not RECORDS, reason="no results/variants-*.json: chapter 16's full profile has not been recorded")
@pytest.mark.parametrize("path", RECORDS, ids=lambda p: p.name)
def test_recorded_bleu_recomputes_from_the_recorded_translations(path):
    from annotated_transformer.data import corpus_scores, load_multi30k

    r = json.loads(path.read_text())
    assert r["profile"] == "full" and path.stem == f"variants-{r['device'].split(':')[0]}"
    refs = [en for _, en in load_multi30k("test", download=False)[: r["test_sentences"]]]
    assert len({row["name"] for row in r["rows"]}) == len(r["rows"])
    for row in r["rows"]:
        assert len(row["test_hypotheses"]) == r["test_sentences"] == len(refs)
        scores = corpus_scores(row["test_hypotheses"], refs)
        assert round(scores["bleu"], 2) == row["bleu"], row["name"]
        assert round(scores["chrf"], 2) == row["chrf"], row["name"]
        assert scores["bleu_signature"].split("|version")[0] == row["bleu_signature"].split("|version")[0]
        assert all(row["config"][k] == v for k, v in row["options"].items())


@pytest.mark.skipif(not RECORDS, reason="no results/variants-*.json: chapter 16's full profile has not been recorded")
@pytest.mark.parametrize("path", RECORDS, ids=lambda p: p.name)
def test_recorded_extrapolation_recomputes_bucket_by_bucket(path):
    from annotated_transformer.data import corpus_scores, load_multi30k

    ex = json.loads(path.read_text())["extrapolation"]
    check_extrapolation_record(ex, [en for _, en in load_multi30k("test", download=False)[: ex["test_sentences"]]],
                               corpus_scores)


def check_extrapolation_record(ex, refs, corpus_scores):
    """Every bucket's BLEU in the length-extrapolation record, recomputed from the stored translations and
    source lengths; every test sentence in exactly one bucket."""
    lengths = ex["source_lengths"]
    assert len(lengths) == ex["test_sentences"] == len(refs)
    spans = [tuple(map(int, b.split("-"))) for b in ex["buckets"]]
    assert spans[0][0] == 1 and spans[-1][1] == max(lengths)
    assert all(sum(lo <= n <= hi for lo, hi in spans) == 1 for n in lengths)
    assert {row["positions"] for row in ex["rows"]} == {"sinusoidal", "learned", "rope", "alibi"}
    for row in ex["rows"]:
        assert len(row["test_hypotheses"]) == len(refs)
        assert list(row["bleu_by_length"]) == ex["buckets"]
        for (lo, hi), bucket in zip(spans, row["bleu_by_length"].values()):
            idx = [i for i, n in enumerate(lengths) if lo <= n <= hi]
            score = corpus_scores([row["test_hypotheses"][i] for i in idx], [refs[i] for i in idx])
            assert bucket["sentences"] == len(idx) and bucket["bleu"] == round(score["bleu"], 2), (row["name"], lo, hi)


def test_the_extrapolation_check_catches_a_wrong_bucket():
    from annotated_transformer.data import corpus_scores, load_multi30k

    refs = [en for _, en in load_multi30k("test", download=False)[:12]]
    lengths = [len(r.split()) + 1 for r in refs]                 # any lengths do; buckets as the chapter makes them
    buckets = [(1, 12), (13, max(lengths))]
    rows = []
    for k, positions in enumerate(("sinusoidal", "learned", "rope", "alibi")):
        hyps = [" ".join(r.split()[: len(r.split()) - k]) for r in refs]   # four different systems
        by_length = {}
        for lo, hi in buckets:
            idx = [i for i, n in enumerate(lengths) if lo <= n <= hi]
            by_length[f"{lo}-{hi}"] = dict(sentences=len(idx), bleu=round(corpus_scores(
                [hyps[i] for i in idx], [refs[i] for i in idx])["bleu"], 2))
        rows.append(dict(name=positions, positions=positions, test_hypotheses=hyps, bleu_by_length=by_length))
    ex = dict(max_pair=12, buckets=[f"{lo}-{hi}" for lo, hi in buckets], test_sentences=12, source_lengths=lengths,
              rows=rows)
    check_extrapolation_record(ex, refs, corpus_scores)
    ex["rows"][2]["bleu_by_length"]["13-" + str(max(lengths))]["bleu"] += 0.01
    with pytest.raises(AssertionError):
        check_extrapolation_record(ex, refs, corpus_scores)
