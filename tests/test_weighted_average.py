"""Chapter 1's exports: weighted_average, parameter_free_attention, QKVProjection."""
import pytest
import torch
from hypothesis import given, settings, strategies as st

from annotated_transformer.weighted_average import QKVProjection, parameter_free_attention
from annotated_transformer.weighted_average import weighted_average


def test_weighted_average_is_the_notes_formula():
    E = torch.randn(3, 5)
    w = torch.tensor([0.1, 0.5, 0.4])
    torch.testing.assert_close(weighted_average(w, E), 0.1 * E[0] + 0.5 * E[1] + 0.4 * E[2])


def test_weighted_average_batched_rows():
    E = torch.randn(2, 4, 6)
    w = torch.softmax(torch.randn(2, 3, 4), -1)
    out = weighted_average(w, E)
    assert out.shape == (2, 3, 6)
    torch.testing.assert_close(out[1, 2], sum(w[1, 2, j] * E[1, j] for j in range(4)))


@pytest.mark.parametrize("w_shape, v_shape, match", [
    ((3,), (4, 5), "mix 3 vectors but 4 were given"),
    ((2, 3), (5,), "vectors >= 2 dims"),
])
def test_weighted_average_names_bad_shapes(w_shape, v_shape, match):
    with pytest.raises(ValueError, match=match):
        weighted_average(torch.ones(w_shape), torch.ones(v_shape))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 6), d=st.integers(1, 8), batch=st.integers(1, 3))
def test_parameter_free_attention_rows_are_convex_weights(n, d, batch):
    x = torch.randn(batch, n, d)
    out, w = parameter_free_attention(x)
    assert w.shape == (batch, n, n) and out.shape == (batch, n, d)
    torch.testing.assert_close(w.sum(-1), torch.ones(batch, n))
    assert (w >= 0).all()
    torch.testing.assert_close(out, torch.softmax(x @ x.transpose(1, 2), -1) @ x)


def test_parameter_free_attention_has_nothing_to_learn_and_rejects_vectors():
    x = torch.randn(3, 4, requires_grad=True)
    out, _ = parameter_free_attention(x)
    out.sum().backward()  # gradients reach only the input
    assert x.grad is not None
    with pytest.raises(ValueError, match=r"\(\.\.\., n, d\)"):
        parameter_free_attention(torch.randn(4))


def test_qkv_projection_shapes_and_maps():
    proj = QKVProjection(d_model=8, d_k=4, d_v=6)
    x = torch.randn(2, 5, 8)
    q, k, v = proj(x)
    assert q.shape == (2, 5, 4) and k.shape == (2, 5, 4) and v.shape == (2, 5, 6)
    torch.testing.assert_close(q, x @ proj.w_q.weight.T)
    assert sum(p.numel() for p in proj.parameters()) == 8 * 4 + 8 * 4 + 8 * 6
    assert QKVProjection(8, 4).d_v == 4
    assert sum(p.numel() for p in QKVProjection(8, 4, bias=True).parameters()) == 3 * (8 * 4 + 4)


def test_qkv_projection_is_learnable():
    torch.manual_seed(0)
    proj = QKVProjection(4, 4)
    x = torch.randn(3, 4)
    q, k, _ = proj(x)
    loss = -torch.log_softmax(q @ k.T, -1)[0, 2]
    loss.backward()
    assert proj.w_q.weight.grad.abs().sum() > 0 and proj.w_k.weight.grad.abs().sum() > 0


def test_qkv_projection_errors_name_sizes():
    with pytest.raises(ValueError, match="d_model=8 features, got shape \\(2, 7\\)"):
        QKVProjection(8, 4)(torch.randn(2, 7))
    with pytest.raises(ValueError, match="d_k must be a positive int, got 0"):
        QKVProjection(8, 0)
