"""Bad input, clear errors: one table of every public entry point and the wrong input it can be given.

Each row: a name, a call that must fail, the exception type, and a regular expression the message must
match. The pattern names the offending sizes, dtype or path, so a vague "invalid input" does not pass.
"""
import gzip
import re

import pytest
import torch

import annotated_transformer as at
from annotated_transformer import (attention, data, decoding, model, multihead, norm, positional, residual,
                                   train, translation)
from annotated_transformer import captions


def _mha():
    return multihead.MultiHeadAttention(16, 4)


def _tiny():
    torch.manual_seed(0)
    return model.make_model(11, 13, N=1, d_model=16, d_ff=32, h=2, dropout=0.0, max_len=20)


x3 = torch.randn(2, 5, 16)

CASES = [
    # --- attention (chapter 2)
    ("sdpa d_k mismatch", lambda: attention.scaled_dot_product_attention(torch.randn(2, 3, 8), torch.randn(2, 4, 6),
                                                                         torch.randn(2, 4, 6)),
     ValueError, r"8.*6|6.*8"),
    ("sdpa float mask", lambda: attention.scaled_dot_product_attention(torch.randn(2, 3, 8), torch.randn(2, 4, 8),
                                                                       torch.randn(2, 4, 8), torch.ones(3, 4)),
     TypeError, r"torch\.bool"),
    ("sdpa mask does not broadcast", lambda: attention.scaled_dot_product_attention(
        torch.randn(2, 3, 8), torch.randn(2, 4, 8), torch.randn(2, 4, 8), torch.ones(3, 5, dtype=torch.bool)),
     ValueError, r"\(3, 5\)"),
    ("causal_mask of size 0", lambda: attention.causal_mask(0), ValueError, r"0"),
    ("padding_mask of 1-D ids", lambda: attention.padding_mask(torch.tensor([1, 2, 0]), 0), ValueError, r"\(3,\)"),
    # --- multi-head attention (chapter 3)
    ("d_model not divisible by h", lambda: multihead.MultiHeadAttention(10, 3), ValueError, r"d_model=10.*h=3"),
    ("query with the wrong width", lambda: _mha()(torch.randn(2, 5, 12), x3, x3), ValueError, r"\(2, 5, 12\)"),
    ("query of rank 2", lambda: _mha()(torch.randn(5, 16), x3, x3), ValueError, r"\(5, 16\)"),
    ("batch mismatch query/key", lambda: _mha()(torch.randn(3, 5, 16), x3, x3), ValueError, r"\(3, 5, 16\).*\(2, 5, 16\)"),
    ("key/value length mismatch", lambda: _mha()(x3, x3, torch.randn(2, 6, 16)), ValueError, r"\(2, 6, 16\)"),
    ("non-boolean mask", lambda: _mha()(x3, x3, x3, mask=torch.ones(5, 5)), TypeError, r"torch\.float32"),
    ("mask that does not broadcast", lambda: _mha()(x3, x3, x3, mask=torch.ones(5, 4, dtype=torch.bool)),
     ValueError, r"\(5, 4\)"),
    ("ambiguous 3-D mask", lambda: _mha()(x3, x3, x3, mask=torch.ones(2, 5, 5, dtype=torch.bool)),
     ValueError, r"\(2, 5, 5\)"),
    # --- positional encoding (chapter 4)
    ("odd d_model for the table", lambda: positional.sinusoidal_table(10, 7), ValueError, r"7"),
    ("sequence longer than max_len", lambda: positional.PositionalEncoding(16, max_len=8)(torch.randn(1, 9, 16)),
     ValueError, r"9.*8|8.*9"),
    ("positional input of the wrong width", lambda: positional.PositionalEncoding(16, max_len=8)(torch.randn(1, 4, 12)),
     ValueError, r"12"),
    # --- layer norm, residual, feed-forward (chapters 5, 6)
    ("layer norm of the wrong width", lambda: norm.LayerNorm(8)(torch.randn(2, 3, 7)), ValueError, r"\(2, 3, 7\)"),
    ("layer norm of size 0", lambda: norm.LayerNorm(0), ValueError, r"0"),
    ("unknown activation", lambda: residual.PositionwiseFeedForward(8, 16, activation="tanh"), ValueError, r"tanh"),
    ("feed-forward of the wrong width", lambda: residual.PositionwiseFeedForward(8, 16)(torch.randn(2, 3, 7)),
     ValueError, r"\(2, 3, 7\)"),
    ("sublayer that changes the shape", lambda: residual.SublayerConnection(8, 0.0)(torch.randn(2, 3, 8),
                                                                                    lambda y: y[..., :4]),
     ValueError, r"\(2, 3, 8\).*\(2, 3, 4\)"),
    # --- the whole model (chapter 7)
    ("make_model d_model not divisible by h", lambda: model.make_model(10, 10, d_model=30, h=4), ValueError,
     r"d_model=30.*h=4"),
    ("shared embeddings, two vocabularies", lambda: model.make_model(10, 12, share_embeddings=True), ValueError,
     r"10.*12"),
    # inside forward the id check runs on the device (no host sync): RuntimeError on a CPU
    ("token id out of vocabulary", lambda: _tiny()(torch.tensor([[1, 11]]), torch.tensor([[1, 2]])), RuntimeError,
     r"\[0, 11\)"),
    ("target id out of vocabulary", lambda: _tiny()(torch.tensor([[1, 2]]), torch.tensor([[1, 13]])), RuntimeError,
     r"\[0, 13\)"),
    ("source id out of vocabulary, checked at the decoder's entry", lambda: decoding.greedy_decode(
        _tiny(), torch.tensor([[1, 11]]), 5, 1, 2),
     ValueError, r"src must lie in \[0, 11\).*from 1 to 11"),
    ("(batch, seq) padding mask when batch = q_len", lambda: _mha()(x3[:, :2], x3, x3,
                                                                  mask=torch.ones(2, 5, dtype=torch.bool)),
     ValueError, r"\(2, 5\) is ambiguous"),
    ("integer q, k, v", lambda: attention.scaled_dot_product_attention(torch.ones(2, 3, 4, dtype=torch.long),
                                                                       torch.ones(2, 3, 4, dtype=torch.long),
                                                                       torch.ones(2, 3, 4, dtype=torch.long)),
     TypeError, r"floating-point.*int64"),
    ("make_model N=True", lambda: model.make_model(10, 10, N=True), ValueError, r"N must be a positive int, got True"),
    ("make_model eps=0", lambda: model.make_model(10, 10, N=1, d_model=8, d_ff=8, h=2, eps=0), ValueError,
     r"eps.*got 0"),
    ("float token ids", lambda: _tiny()(torch.tensor([[1.0, 2.0]]), torch.tensor([[1, 2]])), TypeError, r"float"),
    ("src/tgt batch mismatch", lambda: _tiny()(torch.ones(2, 3, dtype=torch.long), torch.ones(3, 3, dtype=torch.long)),
     ValueError, r"2.*3"),
    ("source longer than the positional table", lambda: _tiny()(torch.ones(1, 21, dtype=torch.long),
                                                                torch.ones(1, 3, dtype=torch.long)),
     ValueError, r"21.*20|20.*21"),
    ("empty batch", lambda: _tiny()(torch.ones(0, 3, dtype=torch.long), torch.ones(0, 3, dtype=torch.long)),
     ValueError, r"\(0, 3\)"),
    ("zero-length source", lambda: _tiny()(torch.ones(2, 0, dtype=torch.long), torch.ones(2, 3, dtype=torch.long)),
     ValueError, r"\(2, 0\)"),
    ("zero-length target", lambda: _tiny()(torch.ones(2, 3, dtype=torch.long), torch.ones(2, 0, dtype=torch.long)),
     ValueError, r"\(2, 0\)"),
    ("1-D token ids", lambda: _tiny()(torch.ones(3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long)),
     ValueError, r"\(3,\)"),
    # --- training (chapter 8)
    ("Batch of mismatched batch sizes", lambda: train.Batch(torch.ones(2, 3, dtype=torch.long),
                                                            torch.ones(3, 4, dtype=torch.long)),
     ValueError, r"\(2, 3\).*\(3, 4\)"),
    ("Batch with a one-token target", lambda: train.Batch(torch.ones(2, 3, dtype=torch.long),
                                                          torch.ones(2, 1, dtype=torch.long)),
     ValueError, r"length 1"),
    # --- data, translation, pretrained (issue 15)
    ("load_multi30k unknown split", lambda: at.load_multi30k("dev"), ValueError, r"'dev'"),
    ("load_captions unknown split", lambda: captions.load_captions("dev"), ValueError, r"'dev'"),
    ("translate(None)", lambda: at.translate(None),
     TypeError, r"sentences.*NoneType"),
    ("translate_sentences with a None", lambda: translation.translate_sentences(None, None, ["Ein Hund.", None]), TypeError,
     r"sentences\[1\].*NoneType"),
    ("load_translator on an unknown device", lambda: at.load_translator("absent.pt", device="tpu"), ValueError,
     r"unknown device 'tpu'"),
    # --- training CLI and checkpoints (issue 15)
    ("Batch target id outside tgt_vocab", lambda: train.Batch(torch.tensor([[3, 2]]), torch.tensor([[1, 4, 9]]),
                                                              tgt_vocab=9),
     ValueError, r"\[0, 9\).*from 1 to 9"),
    ("Batch negative target id", lambda: train.Batch(torch.tensor([[3, 2]]), torch.tensor([[1, -1, 2]])),
     ValueError, r"from -1 to 2"),
    ("Batch float target ids", lambda: train.Batch(torch.tensor([[3, 2]]), torch.tensor([[1.0, 4.0]])),
     TypeError, r"torch\.float32"),
    ("fit on targets outside the model's vocabulary",
     lambda: train.fit(_tiny(), lambda step, micro: train.Batch(torch.tensor([[3, 2]]), torch.tensor([[1, 4, 13]])),
                       train.TrainConfig(steps=1, warmup=1), progress=False),
     ValueError, r"step 0.*\[0, 13\).*from 1 to 13"),
    ("TrainConfig log_every=0", lambda: train.TrainConfig(log_every=0), ValueError, r"log_every.*0"),
    ("TrainConfig ckpt_every=-1", lambda: train.TrainConfig(ckpt_every=-1), ValueError, r"ckpt_every.*-1"),
    ("train CLI --log-every 0", lambda: train.train_main(["--log-every", "0", "--steps", "1"]), SystemExit, r"^2$"),
    ("train CLI --ckpt-every -1", lambda: train.train_main(["--ckpt-every", "-1", "--steps", "1"]), SystemExit, r"^2$"),
    ("save_checkpoint under a file",  # optimizer and scheduler: any object with a state_dict() will do here
     lambda: train.save_checkpoint(__file__ + "/ck.pt", _tiny(), _tiny(), _tiny(), 0, {}),
     OSError, r"could not write checkpoint .*test_bad_input\.py/ck\.pt"),
]


@pytest.mark.parametrize("call,exc,pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_raises_a_clear_error(call, exc, pattern):
    with pytest.raises(exc) as info:
        call()
    assert re.search(pattern, str(info.value), re.S), f"message does not name the problem: {info.value}"


# --- files: missing, corrupt, from another configuration


def test_missing_checkpoint_names_the_path(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        train.load_checkpoint(path, _tiny())


def test_corrupt_checkpoint_names_the_path(tmp_path):
    path = tmp_path / "bad.pt"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises((ValueError, RuntimeError), match=re.escape(str(path))):
        train.load_checkpoint(path, _tiny())


def test_truncated_checkpoint_names_the_path(tmp_path):
    m = _tiny()
    opt = torch.optim.Adam(m.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    path = train.save_checkpoint(tmp_path / "ok.pt", m, opt, sched, step=1, fingerprint={"a": 1})
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises((ValueError, RuntimeError), match=re.escape(str(path))):
        train.load_checkpoint(path, _tiny())


def test_checkpoint_from_another_configuration_is_refused(tmp_path):
    m = _tiny()
    opt = torch.optim.Adam(m.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    path = train.save_checkpoint(tmp_path / "ok.pt", m, opt, sched, step=1, fingerprint={"d_model": 16})
    with pytest.raises(ValueError, match=r"d_model.*16.*32"):
        train.load_checkpoint(path, m, fingerprint={"d_model": 32})


def test_missing_multi30k_says_where_it_looked(tmp_path):
    with pytest.raises(data.Multi30kError, match=re.escape(str(tmp_path))):
        at.load_multi30k("train", root=tmp_path, download=False)


def test_truncated_multi30k_file_is_refused(tmp_path):
    for lang in ("de", "en"):
        with gzip.open(tmp_path / f"val.{lang}.gz", "wb") as f:
            f.write(b"ein satz\n" if lang == "de" else b"a sentence\n")
    with pytest.raises(data.Multi30kError, match=r"val\.(de|en)\.gz"):
        at.load_multi30k("val", root=tmp_path, download=False)


def test_missing_pretrained_folder_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors"):
        at.load_pretrained_encoder(tmp_path)


def test_attention_over_zero_keys_gives_the_documented_zeros():
    """Not an error: a query with no key to attend to gets zeros, the same rule as a fully masked row."""
    mha = multihead.MultiHeadAttention(16, 2, bias=False)
    for need_weights in (True, False):
        out, _ = mha(torch.randn(2, 3, 16), torch.randn(2, 0, 16), torch.randn(2, 0, 16), need_weights=need_weights)
        assert out.shape == (2, 3, 16) and torch.equal(out, torch.zeros_like(out))


def test_nan_in_training_stops_with_the_step():
    """NaN inputs are not scanned for on every call (that would cost a device sync); training, where a
    NaN would silently ruin the run, stops with an error naming the step."""
    m = _tiny()
    with torch.no_grad():
        m.src_embed.lut.weight[3] = float("nan")
    cfg = train.TrainConfig(steps=2, warmup=1, log_every=1)
    batch = train.Batch(torch.tensor([[3, 4, 5]]), torch.tensor([[1, 4, 5, 2]]))
    with pytest.raises((FloatingPointError, RuntimeError, ValueError), match=r"step"):
        train.fit(m, lambda step, micro: batch, cfg, progress=False)
