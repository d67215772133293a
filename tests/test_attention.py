"""Chapter 2's exports: scaled_dot_product_attention, causal_mask, padding_mask.

Checked against torch.nn.functional.scaled_dot_product_attention (fp32, atol 1e-6), with the
package's mask convention (bool, True = may attend, broadcastable to (batch, h, q_len, k_len)).
"""
import math
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from annotated_transformer import causal_mask, padding_mask, scaled_dot_product_attention

ATOL = 1e-6


def qkv(batch=2, h=3, q_len=5, k_len=7, d_k=8, d_v=6, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, h, q_len, d_k, generator=g)
    k = torch.randn(batch, h, k_len, d_k, generator=g)
    v = torch.randn(batch, h, k_len, d_v, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


# ----------------------------------------------------------------------------- the formula
def test_equals_the_formula_written_out():
    q, k, v = qkv()
    out, w = scaled_dot_product_attention(q, k, v)
    expected_w = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
    torch.testing.assert_close(w, expected_w)
    torch.testing.assert_close(out, expected_w @ v)
    assert out.shape == (2, 3, 5, 6) and w.shape == (2, 3, 5, 7)


def test_scale_is_one_over_sqrt_d_k():
    # The weights are softmax(q.k / sqrt(d_k)): with d_k = 16, multiplying q by 4 gives softmax(q.k).
    q, k, v = qkv(d_k=16)
    _, w = scaled_dot_product_attention(q, k, v)
    unscaled = torch.softmax(q @ k.transpose(-2, -1), dim=-1)
    assert not torch.allclose(w, unscaled, atol=1e-3)
    _, w4 = scaled_dot_product_attention(q * 4, k, v)  # sqrt(16) = 4 undoes the scale
    torch.testing.assert_close(w4, unscaled)


# ----------------------------------------------------------------------------- against PyTorch
@pytest.mark.parametrize("q_len, k_len", [(5, 7), (7, 7), (1, 4)])
def test_matches_torch_without_mask(q_len, k_len):
    q, k, v = qkv(q_len=q_len, k_len=k_len)
    out, _ = scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=ATOL, rtol=0)


def test_matches_torch_causal():
    q, k, v = qkv(q_len=9, k_len=9)
    out, w = scaled_dot_product_attention(q, k, v, mask=causal_mask(9))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=ATOL, rtol=0)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(9)),
                               atol=ATOL, rtol=0)
    assert (w.triu(diagonal=1) == 0).all()  # nothing from the future


def test_matches_torch_padding():
    q, k, v = qkv(q_len=6, k_len=6)
    tokens = torch.tensor([[4, 5, 6, 7, 0, 0], [4, 5, 6, 7, 8, 9]])
    mask = padding_mask(tokens, 0)
    out, w = scaled_dot_product_attention(q, k, v, mask=mask)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=ATOL, rtol=0)
    assert (w[0, :, :, 4:] == 0).all()


def test_matches_torch_padding_and_causal_and_per_head_masks():
    q, k, v = qkv(q_len=6, k_len=6)
    tokens = torch.tensor([[4, 5, 6, 7, 0, 0], [4, 5, 6, 7, 8, 9]])
    both = padding_mask(tokens, 0) & causal_mask(6)                       # (2, 1, 6, 6)
    per_head = torch.rand(2, 3, 6, 6, generator=torch.Generator().manual_seed(1)) > 0.3
    per_head[..., 0] = True                                               # every query keeps a key
    for mask in (both, per_head):
        out, _ = scaled_dot_product_attention(q, k, v, mask=mask)
        torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                                   atol=ATOL, rtol=0)


def test_matches_torch_rectangular_causal_like_mask_and_3d_inputs():
    # No head dimension: (batch, seq, d) inputs and a (q_len, k_len) mask.
    g = torch.Generator().manual_seed(2)
    q, k, v = torch.randn(3, 4, 8, generator=g), torch.randn(3, 10, 8, generator=g), torch.randn(3, 10, 5, generator=g)
    mask = torch.ones(4, 10, dtype=torch.bool).tril(diagonal=6)
    out, _ = scaled_dot_product_attention(q, k, v, mask=mask)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=ATOL, rtol=0)


def test_gradients_match_torch():
    q, k, v = (t.requires_grad_() for t in qkv(q_len=6, k_len=6))
    mask = padding_mask(torch.tensor([[1, 2, 3, 0, 0, 0], [1, 2, 3, 4, 5, 6]]), 0) & causal_mask(6)
    g_out = torch.randn(2, 3, 6, 6)
    ours = torch.autograd.grad((scaled_dot_product_attention(q, k, v, mask)[0] * g_out).sum(), (q, k, v))
    theirs = torch.autograd.grad((F.scaled_dot_product_attention(q, k, v, attn_mask=mask) * g_out).sum(), (q, k, v))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- properties
@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 3), h=st.integers(1, 3), q_len=st.integers(1, 6), k_len=st.integers(1, 6),
       d_k=st.integers(1, 8), d_v=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_rows_sum_to_one_and_match_torch(batch, h, q_len, k_len, d_k, d_v, seed):
    q, k, v = qkv(batch, h, q_len, k_len, d_k, d_v, seed=seed)
    out, w = scaled_dot_product_attention(q, k, v)
    assert out.shape == (batch, h, q_len, d_v) and w.shape == (batch, h, q_len, k_len)
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(batch, h, q_len))
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 3), q_len=st.integers(1, 6), k_len=st.integers(2, 7), seed=st.integers(0, 2**16),
       data=st.data())
def test_masked_keys_have_no_effect(batch, q_len, k_len, seed, data):
    q, k, v = qkv(batch, 2, q_len, k_len, 4, 3, seed=seed)
    keep = data.draw(st.lists(st.booleans(), min_size=k_len, max_size=k_len).filter(any))
    mask = torch.tensor(keep)                                             # (k_len,): broadcasts
    out, w = scaled_dot_product_attention(q, k, v, mask=mask)
    torch.testing.assert_close(w.sum(-1), torch.ones(batch, 2, q_len))
    assert (w[..., ~mask] == 0).all()
    k2, v2 = k.clone(), v.clone()
    k2[..., ~mask, :] = torch.randn_like(k2[..., ~mask, :]) * 100         # change the masked keys...
    v2[..., ~mask, :] = torch.randn_like(v2[..., ~mask, :]) * 100         # ...and their values
    out2, w2 = scaled_dot_product_attention(q, k2, v2, mask=mask)
    torch.testing.assert_close(out2, out)
    torch.testing.assert_close(w2, w)
    # the same as attention over the kept keys only
    out3, _ = scaled_dot_product_attention(q, k[..., mask, :], v[..., mask, :])
    torch.testing.assert_close(out3, out)


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 3), n=st.integers(1, 7), seed=st.integers(0, 2**16), data=st.data())
def test_self_attention_is_permutation_equivariant(batch, n, seed, data):
    x = qkv(batch, 1, n, n, 4, 4, seed=seed)[0]                            # q = k = v = x, no positions
    perm = torch.tensor(data.draw(st.permutations(list(range(n)))))
    out, w = scaled_dot_product_attention(x, x, x)
    out_p, w_p = scaled_dot_product_attention(x[..., perm, :], x[..., perm, :], x[..., perm, :])
    torch.testing.assert_close(out_p, out[..., perm, :])
    torch.testing.assert_close(w_p, w[..., perm, :][..., perm])


# ----------------------------------------------------------------------------- fully masked rows
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fully_masked_rows_give_zeros_not_nan(dtype):
    q, k, v = qkv(1, 2, 4, 4, 8, 8, dtype=dtype)
    mask = padding_mask(torch.tensor([[0, 0, 5, 6]]), 0) & causal_mask(4)  # rows 0, 1: no allowed key
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, w = scaled_dot_product_attention(q, k, v, mask=mask)
    assert out.dtype == dtype and not out.isnan().any() and not w.isnan().any()
    assert (out[..., :2, :] == 0).all() and (w[..., :2, :] == 0).all()
    torch.testing.assert_close(w[..., 2:, :].sum(-1).float(), torch.ones(1, 2, 2))
    out.sum().backward()
    for t in (q, k, v):
        assert not t.grad.isnan().any()
    assert (q.grad[..., :2, :] == 0).all()  # a query with nothing to attend to gets no gradient


def test_fully_masked_batch_element_and_all_false_mask():
    q, k, v = qkv(2, 1, 3, 3, 4, 4)
    mask = padding_mask(torch.tensor([[0, 0, 0], [1, 2, 0]]), 0)            # sentence 0 is all padding
    out, w = scaled_dot_product_attention(q, k, v, mask=mask)
    assert (out[0] == 0).all() and (w[0] == 0).all() and not out.isnan().any()
    torch.testing.assert_close(out[1], scaled_dot_product_attention(q[1], k[1, :, :2], v[1, :, :2])[0])
    out, w = scaled_dot_product_attention(q, k, v, mask=torch.zeros(3, 3, dtype=torch.bool))
    assert (out == 0).all() and (w == 0).all()


def test_dropout_drops_weights_and_zero_dropout_is_deterministic():
    q, k, v = qkv()
    torch.manual_seed(0)
    out, w = scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    _, w_clean = scaled_dot_product_attention(q, k, v)
    dropped = w == 0
    assert dropped.any() and (~dropped).any()
    torch.testing.assert_close(w[~dropped], 2 * w_clean[~dropped])      # inverted dropout: kept / (1 - p)
    torch.testing.assert_close(out, w @ v)                                 # the returned weights are the ones used
    assert torch.equal(scaled_dot_product_attention(q, k, v)[0], scaled_dot_product_attention(q, k, v)[0])


# ----------------------------------------------------------------------------- masks
def test_causal_mask():
    m = causal_mask(4)
    assert m.dtype == torch.bool and m.shape == (4, 4)
    assert m.tolist() == [[True, False, False, False], [True, True, False, False],
                          [True, True, True, False], [True, True, True, True]]
    assert causal_mask(1).tolist() == [[True]]


@pytest.mark.parametrize("size", [0, -3, 2.0, True, "4"])
def test_causal_mask_rejects_bad_sizes(size):
    with pytest.raises(ValueError, match="positive int size"):
        causal_mask(size)


def test_padding_mask():
    tokens = torch.tensor([[5, 6, 0], [0, 7, 0]])
    m = padding_mask(tokens, 0)
    assert m.dtype == torch.bool and m.shape == (2, 1, 1, 3)
    assert m[:, 0, 0].tolist() == [[True, True, False], [False, True, False]]
    assert padding_mask(tokens, 7)[1, 0, 0].tolist() == [True, False, True]


@pytest.mark.parametrize("bad", [torch.tensor([1, 2, 0]), torch.zeros(2, 3, 4, dtype=torch.long), [[1, 0]]])
def test_padding_mask_rejects_non_2d(bad):
    with pytest.raises(ValueError, match=r"\(batch, seq\)"):
        padding_mask(bad, 0)


# ----------------------------------------------------------------------------- errors name the sizes
def test_float_or_int_mask_is_refused():
    q, k, v = qkv(q_len=4, k_len=4)
    for mask in (causal_mask(4).float(), causal_mask(4).long()):
        with pytest.raises(TypeError, match=r"torch\.bool.*got dtype torch\.(float32|int64) "
                                            r"\(mask shape \(4, 4\), scores shape \(2, 3, 4, 4\)\)"):
            scaled_dot_product_attention(q, k, v, mask=mask)
    with pytest.raises(TypeError, match="bool tensor"):
        scaled_dot_product_attention(q, k, v, mask=[[True] * 4] * 4)


@pytest.mark.parametrize("mask_shape", [(5, 5), (3, 1, 4, 4), (2, 3, 4, 4, 1), (2, 1, 1, 1, 4)])
def test_mask_that_does_not_broadcast_names_both_shapes(mask_shape):
    q, k, v = qkv(q_len=4, k_len=4)                                       # scores (2, 3, 4, 4)
    mask = torch.ones(mask_shape, dtype=torch.bool)
    shape = re.escape(str(tuple(mask_shape)))
    with pytest.raises(ValueError, match=rf"{shape} does not broadcast.*\(2, 3, 4, 4\)"):
        scaled_dot_product_attention(q, k, v, mask=mask)


def test_4d_padding_mask_on_3d_scores_is_refused_not_broadcast():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 5, 4, generator=g)
    mask = padding_mask(torch.tensor([[1, 2, 3, 0, 0], [1, 2, 3, 4, 5]]), 0)  # (2, 1, 1, 5)
    with pytest.raises(ValueError, match=r"\(2, 1, 1, 5\) does not broadcast.*\(2, 5, 5\)"):
        scaled_dot_product_attention(q, q, q, mask=mask)


def test_shape_errors_name_the_sizes():
    q, k, v = qkv(q_len=4, k_len=4, d_k=8, d_v=6)
    with pytest.raises(ValueError, match=r"d_k=8.*d_k=5"):
        scaled_dot_product_attention(q, k[..., :5], v)
    with pytest.raises(ValueError, match=r"k_len=4.*k_len=3"):
        scaled_dot_product_attention(q, k, v[..., :3, :])
    with pytest.raises(ValueError, match=r"\(3, 3, 4, 8\).*do not broadcast"):
        scaled_dot_product_attention(q, torch.randn(3, 3, 4, 8), torch.randn(3, 3, 4, 6))
    with pytest.raises(ValueError, match=r"q must be .*got \(8,\)"):
        scaled_dot_product_attention(torch.randn(8), k, v)
    with pytest.raises(ValueError, match=r"dropout_p must be in \[0, 1\], got 1.5"):
        scaled_dot_product_attention(q, k, v, dropout_p=1.5)



@pytest.mark.parametrize("dtype", [torch.long, torch.int32, torch.bool])
def test_non_floating_inputs_are_refused(dtype):
    """Integer q, k, v used to return int64 zeros (the softmax weights cast to v's dtype)."""
    q = torch.ones(2, 3, 4).to(dtype)
    with pytest.raises(TypeError, match=f"floating-point.*{str(dtype).split('.')[-1]}"):
        scaled_dot_product_attention(q, q, q)
    with pytest.raises(TypeError, match="v must be a floating-point"):
        scaled_dot_product_attention(torch.ones(2, 3, 4), torch.ones(2, 3, 4), q)


def test_two_d_mask_is_ambiguous_only_when_batch_equals_q_len():
    q = torch.randn(4, 4, 8)
    with pytest.raises(ValueError, match="ambiguous"):
        scaled_dot_product_attention(q, q, q, mask=torch.ones(4, 4, dtype=torch.bool))
    scaled_dot_product_attention(q, q, q, mask=torch.ones(4, 4, dtype=torch.bool)[None])       # (1, q, k): fine
    scaled_dot_product_attention(q[:1], q[:1], q[:1], mask=causal_mask(4))                     # batch 1: fine
