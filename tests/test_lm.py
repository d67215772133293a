"""The decoder-only language model of chapter 17 (annotated_transformer.lm): causality, the KV cache, sampling
(temperature, top-k, top-p), bad arguments, the Kneser-Ney trigram baseline, and the chapter's records.

Every property has a counter-check where one is possible (a later token does change later positions, another
seed does change a sample), so no test passes by comparing two constant things."""
import functools
import json
import math
from pathlib import Path

import pytest
import torch

from annotated_transformer.lm import (DecoderOnlyLM, KneserNeyTrigram, LMCache, caption_corpus, filter_logits,
                                      sample)

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 37
TINY = dict(N=2, d_model=32, h=4, d_ff=64, dropout=0.0, max_len=64)


def tiny_lm(seed: int = 0, **overrides) -> DecoderOnlyLM:
    torch.manual_seed(seed)
    return DecoderOnlyLM(VOCAB, **{**TINY, **overrides}).eval()


def ids(batch: int, seq: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def kept(logits: torch.Tensor) -> set[int]:
    return set(logits.isfinite().nonzero().flatten().tolist())


# --------------------------------------------------------------------------- the model
@pytest.mark.parametrize("norm_first", [True, False], ids=["pre-LN", "post-LN"])
def test_changing_a_later_token_leaves_earlier_log_probs_unchanged(norm_first):
    model = tiny_lm(norm_first=norm_first)
    x = ids(3, 12)
    y = x.clone()
    y[:, 7:] = ids(3, 5, seed=1)
    with torch.no_grad():
        a, b = model(x), model(y)
    assert a.shape == (3, 12, VOCAB)
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, 7:], b[:, 7:]), "the changed tokens changed nothing: the test cannot fail"


def test_outputs_are_log_probabilities_and_embeddings_are_tied():
    model = tiny_lm()
    with torch.no_grad():
        logp = model(ids(2, 5))
    assert torch.allclose(logp.exp().sum(-1), torch.ones(2, 5), atol=1e-5)
    assert model.generator.proj.weight is model.embed.lut.weight
    untied = tiny_lm(tie_output=False)
    assert sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in model.parameters()) == VOCAB * 32


@pytest.mark.parametrize("chunks", [[12], [1] * 12, [5, 1, 1, 3, 2], [4, 8]], ids=["whole", "one by one",
                                                                                 "mixed", "two chunks"])
def test_cache_gives_the_same_log_probs_as_one_forward_pass(chunks):
    model = tiny_lm()
    x = ids(3, 12)
    cache = LMCache(model, batch=3, capacity=12)
    with torch.no_grad():
        full = model(x)
        pieces, start = [], 0
        for n in chunks:
            pieces.append(model(x[:, start:start + n], cache))
            start += n
    assert cache.length == 12
    assert torch.allclose(torch.cat(pieces, dim=1), full, atol=1e-5)


def test_cache_refuses_what_does_not_fit():
    model = tiny_lm()
    cache = LMCache(model, batch=2, capacity=4)
    with pytest.raises(ValueError, match="holds 2 rows and 4 positions"):
        model(ids(3, 2), cache)
    model(ids(2, 3), cache)
    with pytest.raises(ValueError, match="3 of them written"):
        model(ids(2, 2), cache)
    with pytest.raises(ValueError, match="positional table"):
        LMCache(model, batch=1, capacity=TINY["max_len"] + 1)
    with pytest.raises(TypeError, match="needs a DecoderOnlyLM"):
        LMCache(torch.nn.Linear(2, 2), batch=1, capacity=2)


@pytest.mark.parametrize("bad", [dict(vocab=0), dict(N=0), dict(h=0), dict(d_model=30, h=4), dict(max_len=True),
                                 dict(norm_first=1)])
def test_bad_model_arguments_are_refused(bad):
    args = {"vocab": VOCAB, **TINY, **bad}
    with pytest.raises((ValueError, TypeError)):
        DecoderOnlyLM(**args)


# --------------------------------------------------------------------------- filtering and sampling
def test_top_k_and_top_p_keep_exactly_the_right_set():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(300, 40, generator=g) * 3
    def nucleus(ranked, probs, p):                         # the smallest prefix of the ranking with mass >= p
        n, mass = 0, 0.0
        while mass < p:
            mass += probs[n]
            n += 1
        return set(ranked[:n])

    for row, k, p in zip(rows, torch.randint(1, 41, (300,), generator=g).tolist(), torch.rand(300, generator=g).tolist()):
        ranked = row.argsort(descending=True).tolist()
        probs = row.double().softmax(-1)[ranked].tolist()
        assert kept(filter_logits(row, top_k=k)) == set(ranked[:k])
        assert kept(filter_logits(row, top_p=p)) == nucleus(ranked, probs, p)
        top = sum(probs[:k])                               # top_p applies to what top_k left, renormalised
        assert kept(filter_logits(row, top_k=k, top_p=p)) == nucleus(ranked[:k], [q / top for q in probs[:k]], p)


def test_filters_at_their_edges():
    logits = torch.tensor([[0.0, 0.0, 0.0, -1.0], [2.0, 1.0, 0.0, -1.0]])
    assert filter_logits(logits, top_k=2).isfinite().sum(-1).tolist() == [2, 2]      # exactly k, ties or not
    assert kept(filter_logits(logits[1], top_p=1.0)) == {0, 1, 2, 3}
    assert kept(filter_logits(logits[1], top_p=1e-9)) == {0}                           # the argmax always stays
    assert torch.equal(filter_logits(logits), logits)
    probs = torch.tensor([0.5, 0.3, 0.2])
    assert kept(filter_logits(probs.log(), top_p=0.75)) == {0, 1}
    assert kept(filter_logits(probs.log(), top_p=0.85)) == {0, 1, 2}


def greedy_by_hand(model, prompt, n):
    out = prompt
    with torch.no_grad():
        for _ in range(n):
            out = torch.cat([out, model(out)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return out


def test_greedy_sampling_with_and_without_cache_and_small_temperature_agree():
    model = tiny_lm()
    prompt = ids(4, 3)
    want = greedy_by_hand(model, prompt, 20)
    assert torch.equal(sample(model, prompt, 20, top_k=1), want)
    assert torch.equal(sample(model, prompt, 20, top_k=1, use_cache=False), want)
    assert torch.equal(sample(model, prompt, 20, temperature=1e-6), want)
    assert torch.equal(sample(model, prompt, 20, top_p=1e-9), want)
    assert not torch.equal(sample(model, prompt, 20, generator=torch.Generator().manual_seed(0)), want)


def test_cached_and_uncached_sampling_draw_the_same_tokens():
    model = tiny_lm()
    prompt = ids(3, 2)
    kwargs = dict(temperature=0.8, top_k=10, top_p=0.9)
    a = sample(model, prompt, 15, generator=torch.Generator().manual_seed(5), **kwargs)
    b = sample(model, prompt, 15, generator=torch.Generator().manual_seed(5), use_cache=False, **kwargs)
    c = sample(model, prompt, 15, generator=torch.Generator().manual_seed(6), **kwargs)
    assert a.shape == (3, 17) and torch.equal(a[:, :2], prompt)
    assert torch.equal(a, b)
    assert not torch.equal(a, c), "another seed drew the same tokens: the generator is not used"


def test_samples_come_only_from_the_kept_tokens():
    model = tiny_lm()
    prompt = ids(1, 3).expand(400, 3).contiguous()
    with torch.no_grad():
        logp = model(prompt[:1])[0, -1]
    first = sample(model, prompt, 1, top_k=3, generator=torch.Generator().manual_seed(0))[:, -1]
    assert set(first.tolist()) == kept(filter_logits(logp, top_k=3))     # all three drawn, nothing else
    first = sample(model, prompt, 1, temperature=2.0, top_p=0.5, generator=torch.Generator().manual_seed(0))[:, -1]
    assert set(first.tolist()) <= kept(filter_logits(logp / 2.0, top_p=0.5))


def test_sampling_leaves_the_training_mode_as_it_was():
    model = tiny_lm().train()
    sample(model, ids(1, 2), 3)
    assert model.training


@pytest.mark.parametrize("bad, message", [
    (dict(temperature=0), "temperature must be a finite number > 0.*top_k=1"),
    (dict(temperature=-1.0), "temperature must be a finite number > 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number > 0"),
    (dict(temperature=float("inf")), "temperature must be a finite number > 0"),
    (dict(temperature=True), "temperature must be a finite number > 0"),
    (dict(top_p=0.0), r"top_p must be None \(no limit\) or a number in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p must be None \(no limit\) or a number in \(0, 1\]"),
    (dict(top_p=-0.1), r"top_p must be None"),
    (dict(top_k=0), r"top_k must be None \(no limit\) or an int >= 1"),
    (dict(top_k=-3), "top_k must be None"),
    (dict(top_k=2.5), "top_k must be None"),
    (dict(max_new_tokens=0), "max_new_tokens must be a positive int"),
    (dict(max_new_tokens=TINY["max_len"]), "positional table"),
    (dict(generator="seed"), "generator must be a torch.Generator"),
])
def test_bad_sampling_arguments_get_clear_errors(bad, message):
    args = dict(max_new_tokens=5) | bad
    with pytest.raises(ValueError, match=message):
        sample(tiny_lm(), ids(1, 3), **args)


def test_bad_prompts_and_models_get_clear_errors():
    model = tiny_lm()
    with pytest.raises(TypeError, match="prompt_ids must be an integer tensor"):
        sample(model, torch.zeros(1, 3), 2)
    with pytest.raises(ValueError, match=rf"prompt_ids must lie in \[0, {VOCAB}\)"):
        sample(model, torch.tensor([[1, VOCAB]]), 2)
    with pytest.raises(ValueError, match="prompt_ids must have shape"):
        sample(model, torch.tensor([1, 2]), 2)
    with pytest.raises(TypeError, match="model must be a DecoderOnlyLM"):
        sample(torch.nn.Linear(2, 2), ids(1, 2), 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the host-sync check needs a CUDA device")
def test_forward_and_cached_steps_do_not_sync_with_the_host():
    model = tiny_lm().cuda()
    x = ids(2, 6).cuda()
    cache = LMCache(model, batch=2, capacity=8)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.no_grad():
            model(x)
            model(x, cache)
            model(x[:, :1], cache)
    finally:
        torch.cuda.set_sync_debug_mode("default")


# --------------------------------------------------------------------------- the trigram baseline
SENTENCES = [[5, 6, 7, 2], [5, 6, 8, 2], [9, 6, 7, 2], [10, 11, 2], [5, 6, 7, 2], [12, 7, 2]]


@pytest.mark.parametrize("context", [(1, 1), (5, 6), (1, 5), (6, 7), (30, 31), (2, 2)])
def test_kneser_ney_probabilities_sum_to_one_in_every_context(context):
    kn = KneserNeyTrigram(VOCAB).fit(SENTENCES)
    probs = [kn.prob(w, *context) for w in range(VOCAB)]
    assert min(probs) > 0
    assert math.isclose(sum(probs), 1.0, rel_tol=1e-12)


def test_kneser_ney_uses_continuation_counts():
    # 7 follows three different tokens, 11 only ever follows 10, though both are frequent: in a context
    # never seen, the model must prefer 7, which raw unigram counts would not.
    kn = KneserNeyTrigram(VOCAB).fit([[10, 11, 2]] * 20 + [[5, 7, 2], [6, 7, 2], [8, 7, 2]])
    assert kn.prob(7, 30, 31) > kn.prob(11, 30, 31)
    assert kn.prob(11, 1, 10) > 0.9                         # a context seen twenty times: its count dominates


def test_kneser_ney_perplexity_is_the_mean_negative_log_probability():
    kn = KneserNeyTrigram(VOCAB).fit(SENTENCES)
    held = [[5, 6, 7, 2], [9, 11, 8, 2]]
    logs = [math.log(kn.prob(w, u, v)) for s in held for u, v, w in zip([1, 1] + s, [1] + s, s)]
    assert math.isclose(kn.perplexity(held), math.exp(-sum(logs) / len(logs)), rel_tol=1e-12)
    tail = [math.log(kn.prob(w, u, v)) for s in held for u, v, w in list(zip([1, 1] + s, [1] + s, s))[2:]]
    assert math.isclose(kn.perplexity(held, start=2), math.exp(-sum(tail) / len(tail)), rel_tol=1e-12)
    assert kn.perplexity(SENTENCES) < kn.perplexity([[30, 31, 32, 2]])


# --------------------------------------------------------------------------- the data
def test_caption_corpus_is_deduplicated_and_held_out_images_are_separate():
    train, held = caption_corpus(max_train=1000, heldout_images=10, seed=3)
    assert len(train) == len(set(train)) == 1000 and len(held) == 50
    again, _ = caption_corpus(max_train=1000, heldout_images=10, seed=3)
    other, _ = caption_corpus(max_train=1000, heldout_images=10, seed=4)
    assert again == train and other != train
    with pytest.raises(ValueError, match="max_train must be a positive int"):
        caption_corpus(max_train=0)


# --------------------------------------------------------------------------- the chapter's records
RECORDS = sorted((ROOT / "results").glob("decoder-only-*.json"))
QUICK = ROOT / "build" / "decoder-only" / "results-quick.json"


@functools.lru_cache(maxsize=None)
def recomputed(config: str, seed: int) -> dict:
    """What a record's configuration determines without its model: data, tokenizer, trigram perplexities and
    parameter counts (cached: each configuration is recomputed once per session)."""
    from annotated_transformer.data import encode_sentences, train_tokenizer
    from annotated_transformer.model import count_parameters, make_model

    cfg = json.loads(config)
    train, held = caption_corpus(cfg["max_train"], cfg["heldout_images"], seed)
    tokenizer = train_tokenizer(train, cfg["vocab_size"], cfg["tokenizer"])
    train_ids, held_ids = encode_sentences(tokenizer, train), encode_sentences(tokenizer, held)
    V, P, sizes = tokenizer.get_vocab_size(), cfg["prompt_tokens"], cfg["model"]
    kn = KneserNeyTrigram(V).fit(train_ids)
    long_enough = [r for r in held_ids if len(r) >= P + 2]
    encdec = make_model(V, V, max_len=cfg["max_len"], norm_first=True, activation="gelu", share_embeddings=True,
                        tie_output=True, **sizes)
    return {
        "data": {"train_sentences": len(train), "heldout_sentences": len(held), "train_tokens": sum(map(len, train_ids)),
                 "heldout_tokens": sum(map(len, held_ids)), "continuation_sentences": len(long_enough)},
        "trigram_kn": round(kn.perplexity(held_ids), 3),
        "continuation_kn": round(kn.perplexity(long_enough, start=P), 3),
        "parameters": {"decoder_only": count_parameters(DecoderOnlyLM(V, max_len=cfg["max_len"], **sizes)),
                       "encoder_decoder": count_parameters(encdec)},
        "vocab": V,
    }


def check_record(record: dict) -> None:
    """A record's claims against their recomputation, and its samples and measurements for consistency."""
    want = recomputed(json.dumps(record["config"], sort_keys=True), record["seed"])
    assert record["data"] == want["data"]
    assert record["perplexity"]["trigram_kn"] == want["trigram_kn"]
    assert record["continuation_perplexity"]["trigram_kn"] == want["continuation_kn"]
    assert record["parameters"] == want["parameters"]
    assert 0 < record["encoder_decoder_updates"] <= record["steps"]
    prompts = {s["prompt"] for s in record["samples"]}
    settings = {s["setting"] for s in record["samples"]}
    assert len(record["samples"]) == len(prompts) * len(settings) >= 6
    assert all(s["text"].startswith(s["prompt"]) for s in record["samples"])
    for value in [*record["perplexity"].values(), *record["continuation_perplexity"].values()]:
        assert math.isfinite(value) and 1.0 < value < want["vocab"]
    assert all(v > 0 for v in record["tokens_per_s"].values())
    assert record["steps"] == record["config"]["steps"] and record["wall_s"]["train_decoder_only"] > 0


@pytest.mark.parametrize("path", RECORDS or [None], ids=lambda p: p.name if p else "none")
def test_full_record_recomputes(path):
    if path is None:
        pytest.skip("results/decoder-only-<device>.json has not been recorded: the full profile "
                    "(python tools/nb.py run --profile full --device cuda 17_decoder_only) writes it")
    record = json.loads(path.read_text())
    assert record["profile"] == "full" and path.name == f"decoder-only-{record['device']}.json"
    check_record(record)


def quick_record() -> dict:
    if not QUICK.is_file():
        pytest.skip(f"{QUICK.relative_to(ROOT)} is written by the chapter's quick profile "
                    "(python tools/nb.py store 17_decoder_only), which has not run in this checkout")
    record = json.loads(QUICK.read_text())
    assert record["profile"] == "quick"
    return record


def test_quick_record_recomputes():
    check_record(quick_record())


@pytest.mark.parametrize("field", ["trigram_kn", "train_tokens", "encoder_decoder"])
def test_a_wrong_record_fails_the_check(field):
    record = quick_record()
    if field == "trigram_kn":
        record["perplexity"]["trigram_kn"] += 0.01
    elif field == "train_tokens":
        record["data"]["train_tokens"] += 1
    else:
        record["parameters"]["encoder_decoder"] -= 1
    with pytest.raises(AssertionError):
        check_record(record)


def test_sampling_is_repeatable_with_a_generator():
    model = tiny_lm()
    prompt = ids(2, 2)
    draws = [sample(model, prompt, 8, top_p=0.95, generator=torch.Generator().manual_seed(s)) for s in (1, 1, 2)]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    torch.manual_seed(123)  # the global random state plays no part
    assert torch.equal(sample(model, prompt, 8, top_p=0.95, generator=torch.Generator().manual_seed(1)), draws[0])
