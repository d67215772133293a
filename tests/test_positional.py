"""annotated_transformer.positional: the sinusoidal table, the offset matrix T_k, PositionalEncoding."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from annotated_transformer.positional import PositionalEncoding, offset_matrix, sinusoidal_table

even_d = st.integers(min_value=1, max_value=48).map(lambda n: 2 * n)


def formula(pos: int, col: int, d_model: int) -> float:
    """The paper's formula, written out in plain Python floats."""
    angle = pos / 10000 ** ((col - col % 2) / d_model)
    return math.sin(angle) if col % 2 == 0 else math.cos(angle)


@settings(max_examples=30, deadline=None)
@given(max_len=st.integers(1, 300), d_model=even_d, data=st.data())
def test_table_matches_the_formula(max_len, d_model, data):
    table = sinusoidal_table(max_len, d_model, dtype=torch.float64)
    assert table.shape == (max_len, d_model) and table.dtype == torch.float64
    for _ in range(10):
        pos = data.draw(st.integers(0, max_len - 1))
        col = data.draw(st.integers(0, d_model - 1))
        assert table[pos, col].item() == pytest.approx(formula(pos, col, d_model), abs=1e-12)


def test_table_known_values_and_default_dtype():
    table = sinusoidal_table(5000, 512)
    assert table.dtype == torch.float32
    assert torch.equal(table[0, 0::2], torch.zeros(256)) and torch.equal(table[0, 1::2], torch.ones(256))
    assert table[1, 0].item() == pytest.approx(math.sin(1.0), abs=1e-7)
    assert table[1, 1].item() == pytest.approx(math.cos(1.0), abs=1e-7)
    # the float32 table is the float64 one rounded, not float32 arithmetic (which drifts ~4e-4 here)
    assert (table.double() - sinusoidal_table(5000, 512, dtype=torch.float64)).abs().max() < 1e-7
    assert sinusoidal_table(0, 4).shape == (0, 4)


@settings(max_examples=25, deadline=None)
@given(d_model=even_d, k=st.integers(-60, 60))
def test_offset_matrix_shifts_every_position(d_model, k):
    rows = 200
    table = sinusoidal_table(rows, d_model, dtype=torch.float64)
    T = offset_matrix(k, d_model, dtype=torch.float64)
    lo, hi = max(0, -k), rows - max(0, k)
    assert torch.allclose(table[lo:hi] @ T.T, table[lo + k : hi + k], atol=1e-10)
    for pos in (lo, (lo + hi) // 2, hi - 1):  # column-vector form, as the notes write it
        assert torch.allclose(T @ table[pos], table[pos + k], atol=1e-10)


@settings(max_examples=25, deadline=None)
@given(d_model=even_d, a=st.integers(-100, 100), b=st.integers(-100, 100))
def test_offset_matrices_compose_and_are_orthogonal(d_model, a, b):
    T = lambda k: offset_matrix(k, d_model, dtype=torch.float64)
    eye = torch.eye(d_model, dtype=torch.float64)
    assert torch.allclose(T(a + b), T(a) @ T(b), atol=1e-10)
    assert torch.allclose(T(-a), T(a).T, atol=1e-12)
    assert torch.allclose(T(a) @ T(a).T, eye, atol=1e-10)
    assert torch.equal(T(0), eye)


def test_offset_matrix_is_block_diagonal_rotation():
    T = offset_matrix(3, 8, dtype=torch.float64)
    mask = torch.block_diag(*[torch.ones(2, 2)] * 4).bool()
    assert torch.equal(T[~mask], torch.zeros(int((~mask).sum()), dtype=torch.float64))
    phi = 3.0  # pair 0 has frequency 1
    assert torch.allclose(T[:2, :2], torch.tensor([[math.cos(phi), math.sin(phi)], [-math.sin(phi), math.cos(phi)]],
                                                   dtype=torch.float64))
    assert offset_matrix(3, 8).dtype == torch.float32


def test_dot_product_depends_only_on_offset():
    table = sinusoidal_table(400, 64, dtype=torch.float64)
    omega = 10000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    for k in (0, 1, 7, 100):
        dots = (table[: 400 - k] * table[k:]).sum(-1)
        assert torch.allclose(dots, torch.cos(k * omega).sum().expand_as(dots), atol=1e-10)


@pytest.mark.parametrize("d_model", [0, -2, 3, 7])
def test_odd_or_nonpositive_d_model_is_an_error(d_model):
    with pytest.raises(ValueError, match=f"d_model={d_model}"):
        sinusoidal_table(10, d_model)
    with pytest.raises(ValueError, match=f"d_model={d_model}"):
        offset_matrix(1, d_model)
    with pytest.raises(ValueError, match=f"d_model={d_model}"):
        PositionalEncoding(d_model)


def test_type_errors():
    with pytest.raises(TypeError):
        sinusoidal_table(10, 4.0)
    with pytest.raises(TypeError):
        offset_matrix(1.5, 4)
    with pytest.raises(ValueError):
        sinusoidal_table(-1, 4)


def test_module_adds_the_table_and_has_a_buffer():
    pe = PositionalEncoding(d_model=16, max_len=100)
    assert "pe" in dict(pe.named_buffers()) and pe.pe.shape == (100, 16)
    assert list(pe.parameters()) == []
    x = torch.randn(3, 20, 16)
    assert torch.equal(pe(x), x + sinusoidal_table(100, 16)[:20])
    assert torch.equal(pe(torch.zeros(1, 5, 16))[0], sinusoidal_table(5, 16))


@settings(max_examples=20, deadline=None)
@given(seq=st.integers(1, 30), start=st.integers(0, 30))
def test_start_offset_equals_slicing(seq, start):
    pe = PositionalEncoding(d_model=8, max_len=64)
    x = torch.randn(2, start + seq, 8)
    assert torch.allclose(pe(x[:, start:], start=start), pe(x)[:, start:])


def test_sequence_longer_than_max_len_is_an_error_naming_sizes():
    pe = PositionalEncoding(d_model=8, max_len=10)
    pe(torch.randn(1, 10, 8))  # exactly max_len is fine
    with pytest.raises(ValueError, match=r"sequence length 11.*max_len=10"):
        pe(torch.randn(1, 11, 8))
    with pytest.raises(ValueError, match=r"sequence length 4 starting at position 7.*max_len=10"):
        pe(torch.randn(1, 4, 8), start=7)
    with pytest.raises(ValueError, match="d_model=8"):
        pe(torch.randn(1, 4, 6))
    with pytest.raises(ValueError, match="start"):
        pe(torch.randn(1, 4, 8), start=-1)


def test_dropout_dtype_and_device_moves():
    pe = PositionalEncoding(d_model=8, max_len=10, dropout=0.5)
    x = torch.randn(4, 10, 8)
    pe.eval()
    assert torch.equal(pe(x), x + pe.pe)
    pe.train()
    torch.manual_seed(0)
    y = pe(x)
    assert (y == 0).any() and not torch.equal(y, x + pe.pe)
    assert pe.eval()(x.double()).dtype == torch.float64
    assert "pe" not in pe.state_dict()  # recomputed, not saved
