"""annotated_transformer.model: the assembled Transformer, its masks, parameter counts and stacks_from_torch parity."""
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from annotated_transformer.attention import causal_mask
from annotated_transformer.model import (
    Decoder, DecoderLayer, Embeddings, Encoder, EncoderLayer, Generator, Transformer, check_token_ids,
    count_parameters, make_masks, make_model, stacks_from_torch,
)

PAD = 0


def tiny(**kw):
    torch.manual_seed(0)
    args = dict(src_vocab=13, tgt_vocab=11, N=2, d_model=32, d_ff=64, h=4, dropout=0.0)
    return make_model(**{**args, **kw}).eval()


# --------------------------------------------------------------------------- stacks_from_torch parity
def _parity(norm_first, activation, d_model, h, d_ff, N, S, T, batch, seed):
    torch.manual_seed(seed)
    t = nn.Transformer(d_model, h, N, N, d_ff, dropout=0.1, activation=activation, batch_first=True,
                       norm_first=norm_first).eval()
    ours = stacks_from_torch(t).eval()
    g = torch.Generator().manual_seed(seed)
    src, tgt = torch.randn(batch, S, d_model, generator=g), torch.randn(batch, T, d_model, generator=g)
    src_len = torch.randint(1, S + 1, (batch,), generator=g)
    tgt_len = torch.randint(1, T + 1, (batch,), generator=g)
    src_len[0], tgt_len[0] = S, T                                   # one row without padding
    src_keep = torch.arange(S)[None] < src_len[:, None]             # (batch, S) True = real token
    tgt_keep = torch.arange(T)[None] < tgt_len[:, None]
    causal = causal_mask(T)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)                # nested-tensor prototype warning
        mem_t = t.encoder(src, src_key_padding_mask=~src_keep)
        out_t = t.decoder(tgt, mem_t, tgt_mask=~causal, tgt_key_padding_mask=~tgt_keep,
                          memory_key_padding_mask=~src_keep)
        src_mask, tgt_mask = src_keep[:, None, None, :], tgt_keep[:, None, None, :] & causal
        mem_o = ours.encoder(src, src_mask)
        # feed torch's memory to our decoder too, so the decoder is compared on its own
        out_o = ours.decoder(tgt, mem_t, tgt_mask=tgt_mask, memory_mask=src_mask)
        out_oo = ours.decoder(tgt, mem_o, tgt_mask, src_mask)                # torch's positional order
    assert (mem_o - mem_t)[src_keep].abs().max() < 1e-5
    # torch's decoder output at a padded *query* position is still defined (key padding only masks keys)
    assert (out_o - out_t).abs().max() < 1e-5
    assert (out_oo - out_t).abs().max() < 1e-5


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_stacks_from_torch_parity_fixed(norm_first, activation):
    _parity(norm_first, activation, d_model=32, h=4, d_ff=48, N=2, S=7, T=5, batch=3, seed=0)


@settings(max_examples=12, deadline=None)
@given(norm_first=st.booleans(), activation=st.sampled_from(["relu", "gelu"]), h=st.sampled_from([1, 2, 4, 8]),
       d_k=st.integers(2, 8), d_ff=st.integers(4, 64), N=st.integers(1, 3), S=st.integers(1, 9),
       T=st.integers(1, 9), batch=st.integers(1, 4), seed=st.integers(0, 10_000))
def test_stacks_from_torch_parity_random_configs(norm_first, activation, h, d_k, d_ff, N, S, T, batch, seed):
    _parity(norm_first, activation, h * d_k, h, d_ff, N, S, T, batch, seed)


def test_stacks_from_torch_copies_structure_and_refuses_bad_input():
    t = nn.Transformer(16, 2, 2, 3, 24, batch_first=True, norm_first=True)
    ours = stacks_from_torch(t)
    assert len(ours.encoder.layers) == 2 and len(ours.decoder.layers) == 3
    assert ours.encoder.norm is not None and ours.decoder.norm is not None
    with pytest.raises(ValueError, match="batch_first=True"):
        stacks_from_torch(nn.Transformer(16, 2, 1, 1, 24, batch_first=False))
    with pytest.raises(TypeError, match="torch.nn.Transformer"):
        stacks_from_torch(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="ReLU and exact GELU"):
        stacks_from_torch(nn.Transformer(16, 2, 1, 1, 24, batch_first=True, activation=nn.Tanh()))
    with pytest.raises(ValueError, match=r"bias=True"):                    # nothing to copy the biases from
        stacks_from_torch(nn.Transformer(16, 2, 1, 1, 24, batch_first=True, bias=False))


def test_decoder_masks_go_where_torch_puts_them():
    """(tgt, memory, tgt_mask, memory_mask) in torch's order. Source and target have the same length, so
    the causal target mask and the padded source mask both broadcast to (batch, h, L, L): swapped, they
    would run without an error and give other outputs. Checked against torch.nn.TransformerDecoder, by
    position and by keyword, and the swap is shown to change the output."""
    torch.manual_seed(0)
    L, d_model = 6, 16
    t = nn.Transformer(d_model, 2, 1, 2, 32, dropout=0.0, batch_first=True).eval()
    dec = stacks_from_torch(t).decoder.eval()
    tgt, memory = torch.randn(2, L, d_model), torch.randn(2, L, d_model)
    src_keep = torch.ones(2, L, dtype=torch.bool)
    src_keep[0, 2:] = False                                          # a padded source: 2 real tokens of 6
    memory_mask, tgt_mask = src_keep[:, None, None, :], causal_mask(L)[None, None]
    with torch.no_grad():
        theirs = t.decoder(tgt, memory, tgt_mask=~causal_mask(L), memory_key_padding_mask=~src_keep)
        positional = dec(tgt, memory, tgt_mask, memory_mask)
        keyword = dec(tgt, memory, memory_mask=memory_mask, tgt_mask=tgt_mask)
        swapped = dec(tgt, memory, memory_mask, tgt_mask)
        layer_out, (w_self, w_cross) = dec.layers[0].forward_with_weights(tgt, memory, tgt_mask, memory_mask)
    torch.testing.assert_close(positional, theirs, atol=1e-5, rtol=1e-5)
    assert torch.equal(positional, keyword)
    assert not torch.allclose(swapped, theirs, atol=1e-3)            # the swap is visible, not silent
    assert torch.equal(w_self.triu(1), torch.zeros_like(w_self))      # self-attention got the causal mask
    assert torch.equal(w_cross[0, :, :, 2:], torch.zeros(2, L, L - 2))  # cross-attention got the padding
    assert torch.allclose(layer_out, dec.layers[0](tgt, memory, tgt_mask, memory_mask), atol=1e-6)


def test_transformer_decode_passes_the_masks_in_the_decoders_order():
    """Transformer.decode keeps harvardnlp's (memory, src_mask, tgt, tgt_mask); with equal lengths a swap
    inside it would go unnoticed by shape checks, so compare with the decoder called by keyword."""
    model = tiny()
    src = torch.tensor([[5, 6, 7, PAD, PAD], [5, 6, 7, 8, 9]])
    tgt = torch.tensor([[1, 4, 5, 6, 7], [1, 4, 5, 6, 7]])
    src_mask, tgt_mask = make_masks(src, tgt, PAD)
    with torch.no_grad():
        memory = model.encode(src, src_mask)
        x = model.pos_encoding(model.tgt_embed(tgt))
        expected = model.decoder(x, memory, tgt_mask=tgt_mask, memory_mask=src_mask)
        swapped = model.decoder(x, memory, tgt_mask=src_mask, memory_mask=tgt_mask)
        assert torch.equal(model.decode(memory, src_mask, tgt, tgt_mask), expected)
    assert not torch.allclose(swapped, expected, atol=1e-3)


def test_forward_returns_one_type_and_forward_with_weights_adds_the_weights():
    model = tiny()
    src = torch.tensor([[5, 6, 7, PAD], [5, 6, 7, 8]])
    tgt = torch.tensor([[1, 4, 5], [1, 4, 5]])
    src_mask, tgt_mask = make_masks(src, tgt, PAD)
    x = model.pos_encoding(model.src_embed(src))
    with torch.no_grad():
        for layer_or_stack, args in ((model.encoder.layers[0], (x, src_mask)), (model.encoder, (x, src_mask))):
            out = layer_or_stack(*args)
            assert isinstance(out, torch.Tensor)
            out_w, weights = layer_or_stack.forward_with_weights(*args)
            torch.testing.assert_close(out_w, out, atol=1e-6, rtol=1e-6)   # the explicit path, same result
            assert weights is not None
        memory = model.encode(src, src_mask)
        y = model.pos_encoding(model.tgt_embed(tgt))
        out = model.decoder(y, memory, tgt_mask, src_mask)
        out_w, weights = model.decoder.forward_with_weights(y, memory, tgt_mask, src_mask)
    assert isinstance(out, torch.Tensor) and len(weights) == 2 and len(weights[0]) == 2
    torch.testing.assert_close(out_w, out, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------- masks
def test_make_masks_shapes_and_values():
    src = torch.tensor([[5, 6, PAD], [7, PAD, PAD]])
    tgt = torch.tensor([[1, 4, 5, PAD], [1, 4, PAD, PAD]])
    src_mask, tgt_mask = make_masks(src, tgt, PAD)
    assert src_mask.shape == (2, 1, 1, 3) and src_mask.dtype == torch.bool
    assert tgt_mask.shape == (2, 1, 4, 4) and tgt_mask.dtype == torch.bool
    assert src_mask[1, 0, 0].tolist() == [True, False, False]
    expected = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(tgt_mask[1, 0], expected)
    assert make_masks(src, None, PAD)[1] is None


def test_causal_mask_later_target_tokens_do_not_change_earlier_outputs():
    model = tiny()
    src = torch.tensor([[5, 6, 7, 8, 9, 10, 11], [5, 6, 7, 8, PAD, PAD, PAD]])
    tgt = torch.tensor([[1, 4, 5, 6, 7, 8], [1, 4, 5, 6, PAD, PAD]])
    with torch.no_grad():
        out = model(src, tgt, *make_masks(src, tgt, PAD))
        for pos in range(1, tgt.size(1)):
            tgt2 = tgt.clone()
            tgt2[:, pos:] = torch.randint(3, 11, tgt2[:, pos:].shape)
            out2 = model(src, tgt2, *make_masks(src, tgt2, PAD))
            assert torch.equal(out[:, :pos], out2[:, :pos]), pos       # exactly, not approximately
            assert not torch.allclose(out[0, pos], out2[0, pos]) or torch.equal(tgt[0, pos], tgt2[0, pos])


def test_causal_mask_is_needed():
    """Without the causal mask a later token does leak into earlier positions: the test above can fail."""
    model = tiny()
    src = torch.tensor([[5, 6, 7]])
    tgt, tgt2 = torch.tensor([[1, 4, 5, 6]]), torch.tensor([[1, 4, 5, 9]])
    src_mask = make_masks(src, None, PAD)[0]
    with torch.no_grad():
        a, b = model(src, tgt, src_mask, None), model(src, tgt2, src_mask, None)
    assert not torch.allclose(a[:, :3], b[:, :3])


def test_padded_source_positions_are_ignored():
    model = tiny()
    src = torch.tensor([[5, 6, 7, PAD, PAD]])
    tgt = torch.tensor([[1, 4, 5]])
    src_mask, tgt_mask = make_masks(src, tgt, PAD)
    src2 = src.clone()
    src2[0, 3:] = 12
    with torch.no_grad():
        assert torch.equal(model(src, tgt, src_mask, tgt_mask), model(src2, tgt, src_mask, tgt_mask))


# --------------------------------------------------------------------------- the model
def test_forward_shapes_and_log_probs():
    model = tiny()
    src, tgt = torch.randint(3, 13, (3, 6)), torch.randint(3, 11, (3, 4))
    logp = model(src, tgt, *make_masks(src, tgt, PAD))
    assert logp.shape == (3, 4, 11)
    assert torch.allclose(logp.exp().sum(-1), torch.ones(3, 4), atol=1e-5)


def test_attention_maps_shapes_and_rows():
    model = tiny(N=3)
    src = torch.tensor([[5, 6, 7, PAD], [5, 6, 7, 8]])
    tgt = torch.tensor([[1, 4, 5], [1, 4, 5]])
    maps = model.attention_maps(src, tgt, *make_masks(src, tgt, PAD))
    assert set(maps) == {"encoder", "decoder_self", "cross"}
    assert all(len(v) == 3 for v in maps.values())
    assert maps["encoder"][0].shape == (2, 4, 4, 4)
    assert maps["decoder_self"][1].shape == (2, 4, 3, 3)
    assert maps["cross"][2].shape == (2, 4, 3, 4)
    assert torch.allclose(maps["cross"][0].sum(-1), torch.ones(2, 4, 3), atol=1e-5)
    assert torch.equal(maps["cross"][0][0, :, :, 3], torch.zeros(4, 3))        # padding gets no weight
    assert torch.equal(maps["decoder_self"][0].triu(1), torch.zeros(2, 4, 3, 3))  # causal


def test_embeddings_come_out_at_the_scale_of_the_positional_encoding():
    """make_model's N(0, d_model^-1/2) table times sqrt(d_model): unit variance, the order of the sinusoids
    it is added to. nn.Embedding's N(0, 1) default would give std sqrt(d_model) = 16 here."""
    torch.manual_seed(0)
    model = make_model(2000, 2000, N=1, d_model=256, d_ff=32, h=4)
    ids = torch.arange(2000).view(4, 500)
    with torch.no_grad():
        scaled = model.src_embed(ids)
    assert abs(scaled.std().item() - 1.0) < 0.02
    pe_std = model.pos_encoding.pe[:500].std().item()
    assert 0.5 < scaled.std().item() / pe_std < 2.0


def test_embeddings_errors():
    emb = Embeddings(10, 16)
    with pytest.raises(RuntimeError, match=r"\[0, 10\)"):     # checked on the device: no host sync
        emb(torch.tensor([[1, 10]]))
    with pytest.raises(RuntimeError, match=r"\[0, 10\)"):
        emb(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match=r"\[0, 10\).*got ids from 1 to 10"):   # the entry points' host check
        check_token_ids(torch.tensor([[1, 10]]), 10)
    with pytest.raises(TypeError, match="integer"):
        check_token_ids(torch.tensor([[1.0]]), 10)
    with pytest.raises(ValueError, match=r"\(3,\)"):
        check_token_ids(torch.tensor([1, 2, 3]), 10)
    check_token_ids(torch.tensor([[0, 9]]), 10)                      # the edges are fine
    with pytest.raises(TypeError, match="integer"):
        emb(torch.tensor([[1.0]]))
    with pytest.raises(ValueError, match="positive"):
        Embeddings(0, 16)


def test_make_model_initialisation_and_ties():
    model = make_model(50, 50, N=1, d_model=64, d_ff=32, h=4, tie_output=True, share_embeddings=True)
    assert model.src_embed.lut.weight is model.tgt_embed.lut.weight is model.generator.proj.weight
    std = model.tgt_embed.lut.weight.std().item()
    assert abs(std - 64 ** -0.5) < 0.02                 # N(0, d_model^-1/2): unit variance after * sqrt(d)
    untied = make_model(50, 50, N=1, d_model=64, d_ff=32, h=4)
    assert count_parameters(untied) - count_parameters(model) == 2 * 50 * 64
    assert model.config["N"] == 1 and model.config["share_embeddings"] is True
    assert model.encoder.norm is None and make_model(5, 5, N=1, d_model=8, d_ff=8, h=2, norm_first=True).encoder.norm is not None


@pytest.mark.parametrize("kwargs, match", [
    (dict(src_vocab=8000, tgt_vocab=6000, share_embeddings=True), "src_vocab=8000 and tgt_vocab=6000"),
    (dict(src_vocab=10, tgt_vocab=10, d_model=30, h=8), "d_model=30 is not divisible by h=8"),
    (dict(src_vocab=0, tgt_vocab=10), "src_vocab must be a positive int"),
    (dict(src_vocab=10, tgt_vocab=10, activation="tanh"), "activation"),
    (dict(src_vocab=10, tgt_vocab=10, dropout=1.0), "dropout"),
])
def test_make_model_refuses_bad_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        with torch.device("meta"):
            make_model(**kwargs)


def test_bad_input_errors_name_the_sizes():
    model = tiny(max_len=8)
    src = torch.randint(3, 13, (2, 9))                                   # longer than the positional table
    with pytest.raises(ValueError, match="max_len=8"):
        model.encode(src)
    with pytest.raises(RuntimeError, match=r"\[0, 13\)"):                 # a target id fed to the source side
        model.encode(torch.tensor([[3, 13]]))
    with pytest.raises(ValueError, match="src has batch 2 but tgt has batch 3"):
        model(torch.randint(3, 13, (2, 4)), torch.randint(3, 11, (3, 4)))
    layer = DecoderLayer(32, 4, 64)
    with pytest.raises(ValueError, match="d_model=32"):
        layer(torch.randn(1, 3, 16), torch.randn(1, 4, 32))
    with pytest.raises(ValueError, match="memory has batch 2"):
        layer(torch.randn(1, 3, 32), torch.randn(2, 4, 32))
    with pytest.raises(ValueError, match="the encoder memory .* got NoneType"):   # a forgotten memory
        layer(torch.randn(1, 3, 32), None)
    with pytest.raises(ValueError, match="at least one layer"):
        Encoder([])
    with pytest.raises(ValueError, match="at least one layer"):
        Decoder([])


def test_post_ln_and_pre_ln_layers_differ_and_generator_is_log_softmax():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    post = EncoderLayer(16, 2, 32, dropout=0.0, norm_first=False).eval()
    pre = EncoderLayer(16, 2, 32, dropout=0.0, norm_first=True).eval()
    pre.load_state_dict(post.state_dict())
    y_post = post(x)
    assert torch.allclose(y_post.mean(-1), torch.zeros(2, 5), atol=1e-5)      # post-LN output is normalised
    assert not torch.allclose(y_post, pre(x))
    gen = Generator(16, 7).to(torch.bfloat16)
    logp = gen(x.bfloat16())                                     # log-probs in float32 even from bfloat16
    assert logp.dtype == torch.float32
    assert torch.allclose(logp.exp().sum(-1), torch.ones(2, 5), atol=1e-5)


# --------------------------------------------------------------------------- parameter counts
@pytest.mark.parametrize("name, cfg, paper, tol", [
    ("base", dict(N=6, d_model=512, d_ff=2048, h=8), 65e6, 0.04),
    ("big", dict(N=6, d_model=1024, d_ff=4096, h=16), 213e6, 0.02),
])
def test_parameter_counts_match_the_paper(name, cfg, paper, tol):
    V = 37000  # the paper's shared byte-pair vocabulary ("about 37000 tokens"), all embeddings tied
    with torch.device("meta"):
        model = make_model(V, V, **cfg, tie_output=True, share_embeddings=True)
    n = count_parameters(model)
    d, d_ff, N = cfg["d_model"], cfg["d_ff"], cfg["N"]
    enc = 4 * (d * d + d) + 2 * d * d_ff + d_ff + d + 2 * 2 * d
    dec = 8 * (d * d + d) + 2 * d * d_ff + d_ff + d + 3 * 2 * d
    assert n == N * (enc + dec) + V * d + V
    assert abs(n / paper - 1) < tol, (name, n)


def test_model_config_rebuilds_the_same_model():
    """Checkpoints rebuild a model from model.config: every argument must be in it. Every argument here
    differs from its default, so one left out would rebuild a different model."""
    torch.manual_seed(0)
    kw = dict(src_vocab=23, tgt_vocab=23, N=2, d_model=24, d_ff=40, h=3, dropout=0.2, norm_first=True,
              activation="gelu", tie_output=True, share_embeddings=True, max_len=40, eps=1e-6, final_norm=False)
    model = make_model(**kw).eval()
    assert isinstance(model, Transformer) and model.config == kw
    rebuilt = make_model(**model.config).eval()
    assert repr(rebuilt) == repr(model)                                  # eps, activation, norm_first, norms
    assert rebuilt.generator.proj.weight is rebuilt.tgt_embed.lut.weight is rebuilt.src_embed.lut.weight
    rebuilt.load_state_dict(model.state_dict())
    src, tgt = torch.randint(3, 23, (2, 6)), torch.randint(3, 23, (2, 5))
    with torch.no_grad():
        assert torch.equal(rebuilt(src, tgt, *make_masks(src, tgt, PAD)), model(src, tgt, *make_masks(src, tgt, PAD)))
    assert make_model(5, 5, N=1, d_model=8, d_ff=8, h=2, norm_first=True).config["final_norm"] is True   # resolved


@pytest.mark.parametrize("norm_first", [False, True])
def test_use_fused_qkv_keeps_the_model_output(norm_first):
    from annotated_transformer.model import make_masks, make_model, use_fused_qkv

    torch.manual_seed(0)
    model = make_model(17, 19, N=2, d_model=32, d_ff=64, h=4, dropout=0.0, norm_first=norm_first).eval()
    src = torch.tensor([[3, 4, 5, 6, 0], [7, 8, 0, 0, 0]])
    tgt = torch.tensor([[1, 9, 10, 11], [1, 12, 0, 0]])
    src_mask, tgt_mask = make_masks(src, tgt, 0)
    before = model(src, tgt, src_mask, tgt_mask)
    assert use_fused_qkv(model) is model
    flags = [m.fused_qkv for m in model.modules() if hasattr(m, "fused_qkv")]
    assert flags and all(flags)
    torch.testing.assert_close(model(src, tgt, src_mask, tgt_mask), before, atol=1e-5, rtol=1e-5)


def test_torch_compile_opt_in_gives_the_same_outputs():
    """The benchmark's opt-in `--compile` path: torch.compile of our model computes the same function."""
    from annotated_transformer.model import make_masks, make_model

    torch.manual_seed(0)
    model = make_model(23, 23, N=1, d_model=16, d_ff=32, h=2, dropout=0.0).eval()
    src = torch.tensor([[3, 4, 5, 6, 0], [7, 8, 0, 0, 0]])
    tgt = torch.tensor([[1, 9, 10, 11], [1, 12, 0, 0]])
    src_mask, tgt_mask = make_masks(src, tgt, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = torch.compile(model)
        out = compiled(src, tgt, src_mask, tgt_mask)
    torch.testing.assert_close(out, model(src, tgt, src_mask, tgt_mask), atol=1e-5, rtol=1e-5)
