"""annotated_transformer.norm: LayerNorm, checked against torch.nn.LayerNorm."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from annotated_transformer.norm import LayerNorm


def pair(d_model: int, eps: float = 1e-5, dtype=torch.float32):
    """Our LayerNorm and torch's, with the same random gamma and beta."""
    theirs = nn.LayerNorm(d_model, eps=eps).to(dtype)
    with torch.no_grad():
        theirs.weight.normal_()
        theirs.bias.normal_()
    ours = LayerNorm(d_model, eps=eps).to(dtype)
    ours.load_state_dict(theirs.state_dict())  # same parameter names: weight = gamma, bias = beta
    return ours, theirs


def test_parameters_and_init():
    ln = LayerNorm(6)
    assert dict(ln.named_parameters()).keys() == {"weight", "bias"}
    assert torch.equal(ln.weight, torch.ones(6)) and torch.equal(ln.bias, torch.zeros(6))
    assert ln.eps == 1e-5 and "eps=1e-05" in repr(ln)
    assert LayerNorm(6).state_dict().keys() == nn.LayerNorm(6).state_dict().keys()


def test_formula_by_hand():
    x = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
    mean, var = 3.0, ((1 - 3) ** 2 + (2 - 3) ** 2 + 0 + (6 - 3) ** 2) / 4  # biased variance: divide by d
    expected = (x - mean) / (var + 1e-5) ** 0.5
    assert torch.allclose(LayerNorm(4)(x), expected, atol=1e-6)
    y = LayerNorm(4)(torch.randn(3, 7, 4) * 10 + 5)
    assert torch.allclose(y.mean(-1), torch.zeros(3, 7), atol=1e-5)
    assert torch.allclose(y.var(-1, unbiased=False), torch.ones(3, 7), atol=1e-3)


@pytest.mark.parametrize("shape", [(5,), (3, 5), (2, 4, 5), (2, 3, 4, 5)])
def test_outputs_and_gradients_equal_torch(shape):
    torch.manual_seed(0)
    ours, theirs = pair(5)
    x = torch.randn(*shape) * 3 + 1
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    target = torch.randn(*shape)
    y1, y2 = ours(x1), theirs(x2)
    assert torch.allclose(y1, y2, atol=1e-5)
    (y1 * target).sum().backward()
    (y2 * target).sum().backward()
    assert torch.allclose(x1.grad, x2.grad, atol=1e-4)
    assert torch.allclose(ours.weight.grad, theirs.weight.grad, atol=1e-4)
    assert torch.allclose(ours.bias.grad, theirs.bias.grad, atol=1e-4)


@settings(max_examples=40, deadline=None)
@given(
    d_model=st.integers(1, 64),
    lead=st.lists(st.integers(1, 4), min_size=0, max_size=3),
    scale=st.floats(1e-2, 1e3),
    shift=st.floats(-1e3, 1e3),
    eps=st.sampled_from([1e-5, 1e-6, 1e-12, 0.1]),
    seed=st.integers(0, 2**16),
)
def test_property_equals_torch_in_float64(d_model, lead, scale, shift, eps, seed):
    g = torch.Generator().manual_seed(seed)
    ours, theirs = pair(d_model, eps=eps, dtype=torch.float64)
    x = torch.randn(*lead, d_model, generator=g, dtype=torch.float64) * scale + shift
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ours(x1), theirs(x2)
    assert y1.shape == x.shape and y1.dtype == torch.float64
    assert torch.allclose(y1, y2, rtol=1e-7, atol=1e-7)
    target = torch.randn(*lead, d_model, generator=g, dtype=torch.float64)
    (y1 * target).sum().backward()
    (y2 * target).sum().backward()
    assert torch.allclose(x1.grad, x2.grad, rtol=1e-6, atol=1e-6)
    assert torch.allclose(ours.weight.grad, theirs.weight.grad, rtol=1e-6, atol=1e-6)
    assert torch.allclose(ours.bias.grad, theirs.bias.grad, rtol=1e-6, atol=1e-6)


@settings(max_examples=25, deadline=None)
@given(d_model=st.integers(2, 32), shift=st.floats(-100, 100), seed=st.integers(0, 2**16))
def test_property_invariant_to_shift_and_scale_of_each_token(d_model, shift, seed):
    """LN(a x + b) = LN(x) for a > 0: each token is normalised on its own (eps = 0 makes it exact)."""
    g = torch.Generator().manual_seed(seed)
    ln = LayerNorm(d_model, eps=0.0).double()
    x = torch.randn(3, d_model, generator=g, dtype=torch.float64)
    a = torch.rand(3, 1, generator=g, dtype=torch.float64) * 10 + 0.1  # a different scale per token
    assert torch.allclose(ln(a * x + shift), ln(x), atol=1e-8)
    # and no token's output depends on another token's (unlike batch norm)
    assert torch.equal(ln(x[:1]), ln(x)[:1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matches_torch_and_keeps_dtype(dtype):
    torch.manual_seed(0)
    ours, theirs = pair(64, dtype=dtype)
    x = (torch.randn(4, 10, 64) * 50 + 200).to(dtype)  # a large mean: a float16 sum of squares would lose it
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = ours(x1), theirs(x2)
    assert y1.dtype == dtype and y2.dtype == dtype
    reference = nn.functional.layer_norm(x.double(), (64,), theirs.weight.double(), theirs.bias.double())
    tol = 1e-2 if dtype == torch.float16 else 6e-2
    assert (y1.double() - reference).abs().max() < tol
    assert (y1.double() - y2.double()).abs().max() < tol
    target = torch.randn(4, 10, 64).to(dtype)
    (y1.float() * target.float()).sum().backward()
    (y2.float() * target.float()).sum().backward()
    assert x1.grad.dtype == dtype and ours.weight.grad.dtype == dtype
    assert torch.allclose(x1.grad.float(), x2.grad.float(), rtol=5e-2, atol=5e-2)
    assert torch.allclose(ours.weight.grad.float(), theirs.weight.grad.float(), rtol=5e-2, atol=0.5)
    assert torch.isfinite(y1).all()


def test_half_input_with_float32_parameters():
    """Autocast-style use: float32 parameters, half input -> half output, computed in float32."""
    ours, theirs = pair(16)
    x = torch.randn(2, 3, 16).to(torch.bfloat16)
    y = ours(x)
    assert y.dtype == torch.bfloat16
    assert torch.allclose(y.float(), theirs(x.float()), atol=3e-2)


def test_constant_token_gives_beta_not_nan():
    ln = LayerNorm(4)
    with torch.no_grad():
        ln.bias.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    y = ln(torch.full((2, 4), 7.0))
    assert torch.isfinite(y).all() and torch.allclose(y, ln.bias.expand(2, 4))


@pytest.mark.parametrize("d_model", [0, -3, 2.5, True, "8"])
def test_bad_d_model(d_model):
    with pytest.raises(ValueError, match="d_model"):
        LayerNorm(d_model)


@pytest.mark.parametrize("eps", [-1e-5, float("nan"), "1e-5", None])
def test_bad_eps(eps):
    with pytest.raises(ValueError, match="eps"):
        LayerNorm(4, eps=eps)


def test_wrong_last_dim_names_sizes():
    ln = LayerNorm(8)
    with pytest.raises(ValueError, match=r"d_model=8.*\(2, 3, 6\)"):
        ln(torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match="d_model=8"):
        ln(torch.tensor(1.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_module_equals_the_formula_written_out(dtype):
    """The module runs the fused kernel; layer_norm_by_hand is the definition. They must agree."""
    from annotated_transformer.norm import layer_norm_by_hand

    torch.manual_seed(0)
    m = LayerNorm(64).to(dtype if dtype != torch.bfloat16 else torch.float32)
    with torch.no_grad():
        m.weight.normal_(), m.bias.normal_()
    x = (torch.randn(3, 7, 64) * 4 + 2).to(dtype)
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(m(x), layer_norm_by_hand(x, m.weight, m.bias, m.eps), atol=tol, rtol=tol)
