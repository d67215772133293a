"""Chapter 3's export: MultiHeadAttention, checked against torch.nn.MultiheadAttention(batch_first=True).

torch's boolean masks mean the opposite of ours (True = may NOT attend), so every comparison passes
~mask to torch (attn_mask) or tokens == pad (key_padding_mask).
"""
import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch import nn

from annotated_transformer import MultiHeadAttention, causal_mask, padding_mask, scaled_dot_product_attention

ATOL = 1e-6


def pair(d_model=16, h=4, bias=True, seed=0):
    torch.manual_seed(seed)
    theirs = nn.MultiheadAttention(d_model, h, bias=bias, batch_first=True)
    if bias:  # torch initialises the biases to zero: make them count
        with torch.no_grad():
            theirs.in_proj_bias.normal_()
            theirs.out_proj.bias.normal_()
    return MultiHeadAttention.from_torch(theirs), theirs


def randn(*shape, seed=1):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


TOKENS = torch.tensor([[5, 6, 7, 8, 9, 0], [5, 6, 7, 0, 0, 0]])   # pad = 0, at the end
SRC_TOKENS = torch.tensor([[4, 4, 4, 4, 0, 0, 0, 0], [4, 4, 4, 4, 4, 4, 4, 4]])


def cases():
    """(name, query len, key len, our mask, torch kwargs): self- and cross-attention, padding and causal."""
    pad = padding_mask(TOKENS, 0)
    src_pad = padding_mask(SRC_TOKENS, 0)
    return [
        ("self, no mask", 6, 6, None, {}),
        ("self, padding", 6, 6, pad, dict(key_padding_mask=TOKENS == 0)),
        ("self, causal", 6, 6, causal_mask(6), dict(attn_mask=~causal_mask(6))),
        ("self, padding & causal", 6, 6, pad & causal_mask(6),
         dict(attn_mask=~causal_mask(6), key_padding_mask=TOKENS == 0)),
        ("cross, no mask", 6, 8, None, {}),
        ("cross, source padding", 6, 8, src_pad, dict(key_padding_mask=SRC_TOKENS == 0)),
    ]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("name, q_len, k_len, mask, torch_kwargs", cases(), ids=[c[0] for c in cases()])
def test_matches_torch_outputs_weights_and_gradients(name, q_len, k_len, mask, torch_kwargs, bias):
    ours, theirs = pair(bias=bias)
    x = randn(2, q_len, 16, seed=1).requires_grad_()
    if q_len == k_len and name.startswith("self"):
        inputs = (x, x, x)
        leaves = [x]
    else:
        mem = randn(2, k_len, 16, seed=2).requires_grad_()
        inputs = (x, mem, mem)
        leaves = [x, mem]
    g = randn(2, q_len, 16, seed=3)

    out_t, w_t = theirs(*inputs, need_weights=True, average_attn_weights=False, **torch_kwargs)
    out_o, w_o = ours(*inputs, mask=mask, need_weights=True)
    torch.testing.assert_close(out_o, out_t, atol=ATOL, rtol=0)
    torch.testing.assert_close(w_o, w_t, atol=ATOL, rtol=0)
    assert w_o.shape == (2, 4, q_len, k_len)

    # gradients: inputs and every weight
    params_t = [theirs.in_proj_weight, theirs.out_proj.weight]
    params_o = [ours.w_q.weight, ours.w_k.weight, ours.w_v.weight, ours.w_o.weight]
    if bias:
        params_t += [theirs.in_proj_bias, theirs.out_proj.bias]
        params_o += [ours.w_q.bias, ours.w_k.bias, ours.w_v.bias, ours.w_o.bias]
    grads_t = torch.autograd.grad((out_t * g).sum(), leaves + params_t)
    grads_o = torch.autograd.grad((out_o * g).sum(), leaves + params_o)
    n = len(leaves)
    for a, b in zip(grads_o[:n], grads_t[:n]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    gi_t, go_t = grads_t[n], grads_t[n + 1]
    torch.testing.assert_close(torch.cat(grads_o[n:n + 3]), gi_t, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads_o[n + 3], go_t, atol=1e-5, rtol=1e-5)
    if bias:
        torch.testing.assert_close(torch.cat(grads_o[n + 4:n + 7]), grads_t[n + 2], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grads_o[n + 7], grads_t[n + 3], atol=1e-5, rtol=1e-5)

    # the fused fast path (need_weights=False) gives the same output and gradients
    out_f, w_f = ours(*inputs, mask=mask)
    assert w_f is None
    torch.testing.assert_close(out_f, out_o, atol=ATOL, rtol=0)
    grads_f = torch.autograd.grad((out_f * g).sum(), leaves + params_o)
    for a, b in zip(grads_f, grads_o):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_matches_torch_in_eval_mode_with_dropout_configured():
    ours, theirs = pair()
    theirs.dropout = 0.3
    ours = MultiHeadAttention.from_torch(theirs)
    assert ours.dropout == 0.3 and ours.training
    ours.eval(), theirs.eval()
    x = randn(2, 6, 16)
    with torch.no_grad():
        out_t, _ = theirs(x, x, x, key_padding_mask=TOKENS == 0, need_weights=False)
        out_o, _ = ours(x, x, x, mask=padding_mask(TOKENS, 0))
    torch.testing.assert_close(out_o, out_t, atol=ATOL, rtol=0)


def test_from_torch_copies_not_shares_and_refuses_what_it_cannot_copy():
    ours, theirs = pair()
    with torch.no_grad():
        theirs.in_proj_weight.zero_()
    assert ours.w_q.weight.abs().sum() > 0
    assert ours.d_model == 16 and ours.h == 4 and ours.d_k == 4
    with pytest.raises(TypeError, match="nn.MultiheadAttention, got Linear"):
        MultiHeadAttention.from_torch(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="kdim=8, vdim=8, embed_dim=16"):
        MultiHeadAttention.from_torch(nn.MultiheadAttention(16, 4, kdim=8, vdim=8))
    with pytest.raises(ValueError, match="add_bias_kv"):
        MultiHeadAttention.from_torch(nn.MultiheadAttention(16, 4, add_bias_kv=True))


def test_from_torch_keeps_dtype():
    theirs = nn.MultiheadAttention(8, 2, batch_first=True).double()
    ours = MultiHeadAttention.from_torch(theirs)
    assert ours.w_q.weight.dtype == torch.float64
    x = randn(1, 3, 8).double()
    torch.testing.assert_close(ours(x, x, x)[0], theirs(x, x, x, need_weights=False)[0])


# ----------------------------------------------------------------------------- the module itself
def test_heads_are_slices_of_the_projections():
    torch.manual_seed(0)
    mha = MultiHeadAttention(12, 3)
    x = randn(2, 5, 12)
    out, w = mha(x, x, x, need_weights=True)
    heads = []
    for i in range(3):
        cols = slice(4 * i, 4 * (i + 1))
        q, k, v = (x @ lin.weight[cols].T + lin.bias[cols] for lin in (mha.w_q, mha.w_k, mha.w_v))
        o, wi = scaled_dot_product_attention(q, k, v)
        torch.testing.assert_close(wi, w[:, i])
        heads.append(o)
    torch.testing.assert_close(out, mha.w_o(torch.cat(heads, -1)))


def test_split_and_merge_heads_are_inverse_and_check_shapes():
    mha = MultiHeadAttention(12, 3)
    x = randn(2, 5, 12)
    s = mha.split_heads(x)
    assert s.shape == (2, 3, 5, 4)
    torch.testing.assert_close(s[:, 1], x[..., 4:8])
    assert torch.equal(mha.merge_heads(s), x)
    with pytest.raises(ValueError, match=r"d_model=12\), got \(2, 5, 10\)"):
        mha.split_heads(randn(2, 5, 10))
    with pytest.raises(ValueError, match=r"h=3, seq, d_k=4\), got \(2, 2, 5, 4\)"):
        mha.merge_heads(randn(2, 2, 5, 4))


def test_parameter_count_does_not_depend_on_h():
    counts = {h: sum(p.numel() for p in MultiHeadAttention(24, h).parameters()) for h in (1, 2, 3, 4, 6, 8, 12, 24)}
    assert set(counts.values()) == {4 * (24 * 24 + 24)}
    assert sum(p.numel() for p in MultiHeadAttention(24, 4, bias=False).parameters()) == 4 * 24 * 24


def test_attend_accepts_cached_keys_and_values():
    torch.manual_seed(0)
    mha = MultiHeadAttention(8, 2).eval()
    x = randn(1, 5, 8)
    full, _ = mha(x, x, x, mask=causal_mask(5))
    k, v = mha.split_heads(mha.w_k(x)), mha.split_heads(mha.w_v(x))      # a KV cache
    last, _ = mha.attend(mha.split_heads(mha.w_q(x[:, -1:])), k, v)
    torch.testing.assert_close(last, full[:, -1:], atol=ATOL, rtol=0)


def test_dropout_applies_only_in_training():
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4, dropout=0.5)
    x = randn(2, 6, 16)
    _, w_train = mha(x, x, x, need_weights=True)
    assert (w_train == 0).any()
    out_a, _ = mha(x, x, x)
    out_b, _ = mha(x, x, x)
    assert not torch.allclose(out_a, out_b)                               # fast path drops too
    mha.eval()
    _, w_eval = mha(x, x, x, need_weights=True)
    assert (w_eval > 0).all()
    torch.testing.assert_close(w_eval.sum(-1), torch.ones(2, 4, 6))
    torch.testing.assert_close(mha(x, x, x)[0], mha(x, x, x)[0])


# ----------------------------------------------------------------------------- fully masked rows
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("need_weights", [True, False])
def test_fully_masked_rows_are_zero_attention_not_nan(dtype, need_weights):
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4).to(dtype)
    x = randn(1, 4, 16).to(dtype).requires_grad_()
    mask = padding_mask(torch.tensor([[0, 0, 5, 6]]), 0) & causal_mask(4)  # queries 0, 1: no allowed key
    out, w = mha(x, x, x, mask=mask, need_weights=need_weights)
    assert out.dtype == dtype and not out.isnan().any()
    # zero attention output, so the layer returns W_o's bias for those rows
    torch.testing.assert_close(out[0, :2], mha.w_o.bias.expand(2, 16).detach(), atol=0, rtol=0)
    if need_weights:
        assert (w[0, :, :2] == 0).all()
    out.float().sum().backward()
    assert not x.grad.isnan().any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fast_path_equals_explicit_path_with_fully_masked_rows(dtype):
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4).to(dtype)
    x = randn(3, 5, 16).to(dtype)
    tokens = torch.tensor([[0, 0, 0, 0, 0], [0, 0, 3, 4, 5], [3, 4, 5, 6, 7]])   # all-pad, left-pad, none
    mask = padding_mask(tokens, 0) & causal_mask(5)
    explicit, _ = mha(x, x, x, mask=mask, need_weights=True)
    fast, _ = mha(x, x, x, mask=mask)
    tol = dict(atol=1e-6, rtol=0) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(fast, explicit, **tol)
    assert not fast.isnan().any()


# ----------------------------------------------------------------------------- properties
shapes = dict(batch=st.integers(1, 3), h=st.sampled_from([1, 2, 4]), d_k=st.integers(1, 4),
              q_len=st.integers(1, 6), k_len=st.integers(1, 6), seed=st.integers(0, 2**16))


@settings(max_examples=30, deadline=None)
@given(**shapes)
def test_weight_rows_sum_to_one(batch, h, d_k, q_len, k_len, seed):
    torch.manual_seed(seed)
    mha = MultiHeadAttention(h * d_k, h)
    q, kv = randn(batch, q_len, h * d_k, seed=seed), randn(batch, k_len, h * d_k, seed=seed + 1)
    out, w = mha(q, kv, kv, need_weights=True)
    assert out.shape == (batch, q_len, h * d_k) and w.shape == (batch, h, q_len, k_len)
    assert (w >= 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(batch, h, q_len))
    torch.testing.assert_close(mha(q, kv, kv)[0], out, atol=1e-5, rtol=1e-5)


@settings(max_examples=30, deadline=None)
@given(data=st.data(), **{k: v for k, v in shapes.items() if k not in ("q_len", "k_len")}, n=st.integers(1, 7))
def test_self_attention_is_permutation_equivariant(data, batch, h, d_k, seed, n):
    torch.manual_seed(seed)
    mha = MultiHeadAttention(h * d_k, h)
    x = randn(batch, n, h * d_k, seed=seed)
    perm = torch.tensor(data.draw(st.permutations(list(range(n)))))
    out, w = mha(x, x, x, need_weights=True)
    out_p, w_p = mha(x[:, perm], x[:, perm], x[:, perm], need_weights=True)
    torch.testing.assert_close(out_p, out[:, perm], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w_p, w[:, :, perm][..., perm], atol=1e-6, rtol=1e-5)


@settings(max_examples=30, deadline=None)
@given(data=st.data(), **shapes)
def test_masked_keys_have_no_effect(data, batch, h, d_k, q_len, k_len, seed):
    torch.manual_seed(seed)
    mha = MultiHeadAttention(h * d_k, h)
    keep = data.draw(st.lists(st.lists(st.booleans(), min_size=k_len, max_size=k_len), min_size=batch,
                              max_size=batch))
    keep = torch.tensor(keep)                                             # (batch, k_len), may be all False
    mask = keep[:, None, None, :]                                         # (batch, 1, 1, k_len)
    q, kv = randn(batch, q_len, h * d_k, seed=seed), randn(batch, k_len, h * d_k, seed=seed + 1)
    kv2 = kv.clone()
    kv2[~keep] = randn(int((~keep).sum()), h * d_k, seed=seed + 2) * 50   # change only the masked keys
    for need_weights in (True, False):
        out, _ = mha(q, kv, kv, mask=mask, need_weights=need_weights)
        out2, _ = mha(q, kv2, kv2, mask=mask, need_weights=need_weights)
        assert not out.isnan().any()
        torch.testing.assert_close(out2, out, atol=1e-5, rtol=1e-5)
    for b in range(batch):                                                # = attention over the kept keys
        if keep[b].any():
            kept = kv[b:b + 1, keep[b]]
            torch.testing.assert_close(mha(q[b:b + 1], kept, kept)[0], out[b:b + 1], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- errors name the sizes
@pytest.mark.parametrize("d_model, h, match", [
    (30, 4, r"d_model=30 is not divisible by h=4.*\[1, 2, 3, 5, 6, 10, 15, 30\]"),
    (0, 1, "d_model must be a positive int, got 0"),
    (8, 0, "h must be a positive int, got 0"),
    (8.0, 2, "d_model must be a positive int, got 8.0"),
])
def test_bad_sizes(d_model, h, match):
    with pytest.raises(ValueError, match=match):
        MultiHeadAttention(d_model, h)


def test_bad_dropout():
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\], got 1.5"):
        MultiHeadAttention(8, 2, dropout=1.5)


def test_shape_errors_name_the_sizes():
    mha = MultiHeadAttention(32, 4)
    x = randn(2, 8, 32)
    with pytest.raises(ValueError, match=r"query must be \(batch, seq, d_model=32\), got \(2, 8, 16\)"):
        mha(randn(2, 8, 16), x, x)
    with pytest.raises(ValueError, match=r"key must be \(batch, seq, d_model=32\), got \(8, 32\)"):
        mha(x, x[0], x)
    with pytest.raises(ValueError, match=r"key \(2, 8, 32\) and value \(2, 5, 32\)"):
        mha(x, x, x[:, :5])
    with pytest.raises(ValueError, match=r"query \(2, 8, 32\) and key \(1, 8, 32\)"):
        mha(x, x[:1], x[:1])
    with pytest.raises(ValueError, match=r"value must be .*got list"):
        mha(x, x, [1, 2])


def test_mask_errors_name_the_sizes():
    mha = MultiHeadAttention(32, 4)
    x, mem = randn(2, 8, 32), randn(2, 5, 32)
    with pytest.raises(TypeError, match=r"torch\.bool.*got dtype torch\.float32 \(mask shape \(8, 8\)"):
        mha(x, x, x, mask=causal_mask(8).float())
    with pytest.raises(ValueError, match=r"mask of shape \(6, 6\) does not broadcast.*\(2, 4, 8, 8\)"):
        mha(x, x, x, mask=causal_mask(6))
    with pytest.raises(ValueError, match=r"mask of shape \(8, 8\) does not broadcast.*\(2, 4, 8, 5\)"):
        mha(x, mem, mem, mask=causal_mask(8))                            # cross-attention: keys are the memory
    with pytest.raises(ValueError, match=r"mask of shape \(3, 1, 1, 8\).*\(2, 4, 8, 8\)"):
        mha(x, x, x, mask=torch.ones(3, 1, 1, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"3-D mask \(2, 8, 8\) is ambiguous.*mask\[:, None\]"):
        mha(x, x, x, mask=torch.ones(2, 8, 8, dtype=torch.bool))
    for need_weights in (True, False):                                    # both paths check
        with pytest.raises(ValueError, match=r"\(2, 1, 1, 7\)"):
            mha(x, x, x, mask=torch.ones(2, 1, 1, 7, dtype=torch.bool), need_weights=need_weights)


def test_attend_checks_head_shapes():
    mha = MultiHeadAttention(8, 2)
    q = randn(1, 2, 3, 4)
    with pytest.raises(ValueError, match=r"k must be \(batch, h=2, seq, d_k=4\), got \(1, 2, 3, 5\)"):
        mha.attend(q, randn(1, 2, 3, 5), randn(1, 2, 3, 4))
    with pytest.raises(ValueError, match=r"k \(1, 2, 3, 4\) and v \(1, 2, 2, 4\)"):
        mha.attend(q, q, randn(1, 2, 2, 4))


@pytest.mark.parametrize("bias", [True, False])
def test_fused_qkv_opt_in_equals_separate_projections(bias):
    """fused_qkv=True (one (3 d_model, d_model) product for self-attention) gives the same outputs and
    gradients as three projections; cross-attention is unaffected by the flag."""
    torch.manual_seed(0)
    plain = MultiHeadAttention(32, 4, bias=bias)
    fused = MultiHeadAttention(32, 4, bias=bias, fused_qkv=True)
    fused.load_state_dict(plain.state_dict())
    x = torch.randn(3, 7, 32)
    mask = padding_mask(torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 2 + [0] * 5]), 0) & causal_mask(7)
    for need_weights in (False, True):
        a_in, b_in = x.clone().requires_grad_(), x.clone().requires_grad_()
        a, wa = plain(a_in, a_in, a_in, mask, need_weights)
        b, wb = fused(b_in, b_in, b_in, mask, need_weights)
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)
        (a * x).sum().backward()
        (b * x).sum().backward()
        torch.testing.assert_close(b_in.grad, a_in.grad, atol=1e-5, rtol=1e-5)
    for p, q in zip(plain.parameters(), fused.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-5)
    memory = torch.randn(3, 4, 32)
    torch.testing.assert_close(fused(x, memory, memory)[0], plain(x, memory, memory)[0])


def test_a_batch_seq_padding_mask_is_not_silently_applied_per_query():
    """With batch == q_len, a (batch, k_len) padding mask has the shape of a (q_len, k_len) mask.
    Accepting it applied row i of the padding to query i of *every* sentence: refused instead."""
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, 4).eval()
    tokens = torch.randint(1, 9, (5, 5))
    tokens[0, 3:] = 0
    tokens[2, 1:] = 0
    x = torch.randn(5, 5, 16)
    with pytest.raises(ValueError, match=r"\(5, 5\) is ambiguous.*padding_mask"):
        mha(x, x, x, mask=tokens != 0)
    right, _ = mha(x, x, x, mask=padding_mask(tokens, 0))
    as_queries, _ = mha(x, x, x, mask=(tokens != 0)[None, None])      # what the 2-D mask used to mean
    assert (right - as_queries).abs().max() > 0.1                      # the two readings really differ
    # the model's stacks reach the same check
    from annotated_transformer.model import make_model
    model = make_model(9, 9, N=1, d_model=16, d_ff=32, h=4).eval()
    with pytest.raises(ValueError, match="ambiguous"):
        model.encode(tokens, tokens != 0)
    # a 2-D mask whose shape fixes its meaning is still accepted
    mha(x[:, :3], x, x, mask=torch.ones(3, 5, dtype=torch.bool))
