"""annotated_transformer.residual: SublayerConnection (post-LN, pre-LN) and PositionwiseFeedForward."""
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from annotated_transformer.multihead import MultiHeadAttention
from annotated_transformer.norm import LayerNorm
from annotated_transformer.residual import PositionwiseFeedForward, SublayerConnection


def randomise(module: nn.Module, scale: float = 0.3) -> nn.Module:
    """Perturb every parameter so that gamma != 1, beta != 0 and biases matter."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module


# ----------------------------------------------------------------------------- SublayerConnection
def test_attributes_the_model_relies_on():
    sub = SublayerConnection(8, dropout=0.2, norm_first=True, eps=1e-6)
    assert isinstance(sub.norm, LayerNorm) and sub.norm.eps == 1e-6 and sub.norm.d_model == 8
    assert isinstance(sub.dropout, nn.Dropout) and sub.dropout.p == 0.2
    assert sub.norm_first is True and "norm_first=True" in repr(sub)
    default = SublayerConnection(8)
    assert default.norm_first is False and default.dropout.p == 0.1 and default.norm.eps == 1e-5
    assert set(dict(default.named_parameters())) == {"norm.weight", "norm.bias"}


@settings(max_examples=25, deadline=None)
@given(d_model=st.integers(1, 24), batch=st.integers(1, 3), seq=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_post_and_pre_ln_formulas(d_model, batch, seq, seed):
    torch.manual_seed(seed)
    x = torch.randn(batch, seq, d_model, dtype=torch.float64)
    f = randomise(nn.Linear(d_model, d_model)).double()
    post = randomise(SublayerConnection(d_model, dropout=0.0)).double()
    pre = randomise(SublayerConnection(d_model, dropout=0.0, norm_first=True)).double()
    assert torch.allclose(post(x, f), post.norm(x + f(x)))          # post-LN (paper): LN(x + F(x))
    assert torch.allclose(pre(x, f), x + f(pre.norm(x)))            # pre-LN: x + F(LN(x))
    assert not torch.allclose(post(x, f), pre(x, f))


def test_zero_sublayer_is_identity_for_pre_ln_and_norm_for_post_ln():
    x = torch.randn(2, 4, 8) * 3 + 1
    zero = lambda t: torch.zeros_like(t)
    assert torch.equal(SublayerConnection(8, 0.0, norm_first=True)(x, zero), x)   # the skip path is x itself
    post = SublayerConnection(8, 0.0)
    assert torch.allclose(post(x, zero), F.layer_norm(x, (8,)), atol=1e-6)


def test_sublayer_sees_the_normalised_input_only_in_pre_ln():
    x = torch.randn(2, 3, 6) * 5 + 2
    seen = {}
    for norm_first in (False, True):
        SublayerConnection(6, 0.0, norm_first)(x, lambda t: seen.setdefault(norm_first, t))
    assert torch.equal(seen[False], x)
    assert torch.allclose(seen[True], F.layer_norm(x, (6,)), atol=1e-6)


def test_dropout_applies_to_the_sublayer_output_only():
    x = torch.randn(4, 10, 8)
    ones = lambda t: torch.ones_like(t)
    sub = SublayerConnection(8, dropout=0.5, norm_first=True).train()
    torch.manual_seed(0)
    y = sub(x, ones) - x                          # the branch after dropout: 0 or 1 / (1 - p) = 2
    assert set(y.unique().round(decimals=4).tolist()) == {0.0, 2.0}
    assert torch.equal(sub.eval()(x, ones), x + 1)  # no dropout in eval mode


def test_gradient_reaches_the_input_through_the_skip():
    x = torch.randn(2, 3, 8, requires_grad=True)
    SublayerConnection(8, 0.0, norm_first=True)(x, lambda t: 0.0 * t).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # d(x + 0)/dx = I


def our_layer(theirs: nn.TransformerEncoderLayer):
    """Our pieces holding the weights of torch's encoder layer."""
    d_model = theirs.linear1.in_features
    attn = MultiHeadAttention.from_torch(theirs.self_attn)
    activation = "gelu" if theirs.activation is F.gelu else "relu"
    ffn = PositionwiseFeedForward(d_model, theirs.linear1.out_features, dropout=0.0, activation=activation)
    subs = [SublayerConnection(d_model, 0.0, theirs.norm_first, theirs.norm1.eps) for _ in range(2)]
    ffn.w_1.load_state_dict(theirs.linear1.state_dict())
    ffn.w_2.load_state_dict(theirs.linear2.state_dict())
    subs[0].norm.load_state_dict(theirs.norm1.state_dict())
    subs[1].norm.load_state_dict(theirs.norm2.state_dict())
    return lambda x: subs[1](subs[0](x, lambda t: attn(t, t, t)[0]), ffn)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_encoder_layer_equals_torch(norm_first, activation):
    torch.manual_seed(0)
    theirs = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, activation=activation, batch_first=True,
                                        norm_first=norm_first, layer_norm_eps=1e-6).eval()
    randomise(theirs, 0.1)
    x = torch.randn(3, 7, 16)
    with torch.no_grad():
        assert torch.allclose(our_layer(theirs)(x), theirs(x), atol=1e-5)


def test_sublayer_errors_name_the_problem():
    sub = SublayerConnection(8, 0.0)
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match=r"keep the shape \(2, 3, 8\).*\(2, 3, 4\)"):
        sub(x, lambda t: t[..., :4])
    with pytest.raises(ValueError, match="keep the shape"):
        SublayerConnection(8, 0.0, norm_first=True)(x, lambda t: t[:, :1])
    attn = MultiHeadAttention(8, 2)
    with pytest.raises(TypeError, match="one tensor, got tuple"):
        sub(x, lambda t: attn(t, t, t))           # forgot the [0]
    with pytest.raises(ValueError, match="d_model=8"):
        sub(torch.randn(2, 3, 6), lambda t: t)    # the norm names the width it expects


@pytest.mark.parametrize("dropout", [-0.1, 1.5, "0.1", True, float("nan")])
def test_bad_dropout(dropout):
    with pytest.raises(ValueError, match="dropout"):
        SublayerConnection(8, dropout=dropout)
    with pytest.raises(ValueError, match="dropout"):
        PositionwiseFeedForward(8, 16, dropout=dropout)


def test_bad_d_model_and_eps():
    with pytest.raises(ValueError, match="d_model"):
        SublayerConnection(0)
    with pytest.raises(ValueError, match="eps"):
        SublayerConnection(8, eps=-1.0)


# ----------------------------------------------------------------------------- PositionwiseFeedForward
def test_ffn_attributes_and_shapes():
    ffn = PositionwiseFeedForward(8, 32, dropout=0.1)
    assert ffn.w_1.weight.shape == (32, 8) and ffn.w_2.weight.shape == (8, 32)
    assert ffn.dropout.p == 0.1 and ffn.activation == "relu"
    assert "d_ff=32" in repr(ffn)
    assert ffn(torch.randn(2, 5, 8)).shape == (2, 5, 8)
    assert ffn(torch.randn(8)).shape == (8,)


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_ffn_equals_torch_linear1_linear2_path(activation):
    torch.manual_seed(0)
    theirs = nn.TransformerEncoderLayer(12, 3, 40, dropout=0.0, activation=activation, batch_first=True)
    ffn = PositionwiseFeedForward(12, 40, dropout=0.0, activation=activation)
    ffn.w_1.load_state_dict(theirs.linear1.state_dict())
    ffn.w_2.load_state_dict(theirs.linear2.state_dict())
    x = torch.randn(4, 6, 12)
    expected = theirs.linear2(theirs.activation(theirs.linear1(x)))
    assert torch.allclose(ffn(x), expected, atol=1e-6)
    by_hand = x @ ffn.w_1.weight.T + ffn.w_1.bias
    by_hand = (F.relu if activation == "relu" else F.gelu)(by_hand) @ ffn.w_2.weight.T + ffn.w_2.bias
    assert torch.allclose(ffn(x), by_hand, atol=1e-6)


def test_ffn_is_positionwise():
    torch.manual_seed(0)
    ffn = PositionwiseFeedForward(8, 16, dropout=0.0)
    x = torch.randn(2, 5, 8)
    y = ffn(x)
    for pos in range(5):
        assert torch.allclose(ffn(x[:, pos]), y[:, pos], atol=1e-6)
    perm = torch.randperm(5)
    assert torch.allclose(ffn(x[:, perm]), y[:, perm], atol=1e-6)


def test_ffn_dropout_sits_between_the_two_linears():
    ffn = PositionwiseFeedForward(4, 64, dropout=0.5).train()
    with torch.no_grad():
        ffn.w_2.weight.zero_()
        ffn.w_2.bias.fill_(3.0)
    x = torch.randn(5, 4)
    assert torch.equal(ffn(x), torch.full((5, 4), 3.0))   # dropout before w_2: w_2's bias is not dropped
    hidden = []
    ffn.w_2.register_forward_hook(lambda mod, inp, out: hidden.append(inp[0]))
    torch.manual_seed(0)
    ffn(torch.ones(200, 4) * 10)
    assert (hidden[0] == 0).float().mean() > 0.3          # about half the hidden units dropped


@pytest.mark.parametrize("args", [(0, 16), (8, 0), (8.0, 16), (8, True), (-1, 4)])
def test_ffn_bad_sizes(args):
    with pytest.raises(ValueError, match="d_model|d_ff"):
        PositionwiseFeedForward(*args)


def test_ffn_bad_activation_and_input():
    with pytest.raises(ValueError, match=r"activation must be one of \['gelu', 'relu'\], got 'tanh'"):
        PositionwiseFeedForward(8, 16, activation="tanh")
    with pytest.raises(ValueError, match=r"d_model=8.*\(2, 3, 6\)"):
        PositionwiseFeedForward(8, 16)(torch.randn(2, 3, 6))
    with pytest.raises(ValueError, match="d_model=8"):
        PositionwiseFeedForward(8, 16)(torch.tensor(1.0))
