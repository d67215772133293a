"""annotated_transformer.decoding: greedy decoding, beam search, and the decoder's KV cache."""
import itertools
import math

import pytest
import torch

from annotated_transformer.attention import causal_mask, padding_mask
from annotated_transformer.decoding import KVCache, beam_search, decode_step, greedy_decode
from annotated_transformer.model import make_model

PAD, BOS, EOS = 0, 1, 2


def random_model(seed=0, vocab=20, norm_first=False, **kw):
    torch.manual_seed(seed)
    args = dict(N=2, d_model=32, d_ff=64, h=4, dropout=0.1, norm_first=norm_first)
    return make_model(vocab, vocab, **{**args, **kw})


def sources(seed=0, batch=5, length=9, vocab=20):
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(3, vocab, (batch, length), generator=g)
    src[1, 6:] = PAD
    src[-1, 3:] = PAD
    return src


def assert_well_formed(out, batch, max_len):
    assert out.dtype == torch.long and out.dim() == 2 and out.size(0) == batch and 2 <= out.size(1) <= max_len
    assert (out[:, 0] == BOS).all()
    for row in out.tolist():
        assert PAD not in row[: row.index(EOS) + 1 if EOS in row else len(row)]   # pad only after </s>
        if EOS in row:
            assert all(t == PAD for t in row[row.index(EOS) + 1:])


# --------------------------------------------------------------------------- the cache
@pytest.mark.parametrize("norm_first,static,capacity", [(False, False, 7), (True, False, 7), (False, True, 7),
                                                        (True, True, 11), (False, False, 2)])
def test_decode_step_matches_the_full_decoder(norm_first, static, capacity):
    """Growing and static caches (and a growing one that starts too small) give the full decoder's rows."""
    model = random_model(norm_first=norm_first).eval()
    src, tgt = sources(), torch.randint(3, 20, (5, 7))
    src_mask = padding_mask(src, PAD)
    with torch.no_grad():
        memory = model.encode(src, src_mask)
        full = model.generator(model.decode(memory, src_mask, tgt, causal_mask(7)))   # (5, 7, vocab)
        cache = KVCache(model, memory, capacity=capacity, static=static)
        for t in range(7):
            step = decode_step(model, tgt[:, t], cache, src_mask)
            assert (step - full[:, t]).abs().max() < 1e-5, t
    assert cache.length == 7 and cache.position.tolist() == [7] and cache.cross[1][0].shape == (5, 4, 9, 8)
    assert cache.self_k[0].shape == (5, 4, 8 if capacity == 2 else capacity, 8)   # 2 -> 4 -> 8: doubled twice


def test_static_cache_writes_in_place_and_refuses_to_overflow():
    model = random_model().eval()
    src = sources()
    src_mask = padding_mask(src, PAD)
    with torch.no_grad():
        cache = KVCache(model, model.encode(src, src_mask), capacity=3, static=True)
        buffers = [t.data_ptr() for t in cache.self_k + cache.self_v]
        for _ in range(3):
            decode_step(model, torch.full((5,), BOS), cache, src_mask)
        cache.reorder(torch.tensor([4, 3, 2, 1, 0]))                  # beam search's reordering: in place
        assert [t.data_ptr() for t in cache.self_k + cache.self_v] == buffers
        with pytest.raises(ValueError, match="holds 3 positions and is full"):
            decode_step(model, torch.full((5,), BOS), cache, src_mask)


@pytest.mark.parametrize("static", [False, True])
def test_a_reordered_cache_continues_the_reordered_hypotheses(static):
    """Beam search's reorder: the step after it is the step of a cache that was built on the reordered rows."""
    model = random_model().eval()
    src = sources()[:1].repeat(5, 1)                 # five beams of one source share its memory, as in beam search
    index, first, second = torch.tensor([2, 2, 0, 1, 4]), torch.arange(3, 8), torch.arange(8, 13)
    with torch.no_grad():
        src_mask = padding_mask(src, PAD)
        memory = model.encode(src, src_mask)
        moved, fresh, stale = (KVCache(model, memory, capacity=4, static=static) for _ in range(3))
        decode_step(model, first, moved, src_mask)
        decode_step(model, first, stale, src_mask)
        decode_step(model, first[index], fresh, src_mask)
        moved.reorder(index)
        want = decode_step(model, second, fresh, src_mask)
        torch.testing.assert_close(decode_step(model, second, moved, src_mask), want)
        assert not torch.allclose(decode_step(model, second, stale, src_mask)[:3], want[:3])  # the rows index moved
        with pytest.raises(ValueError, match=r"one row index per cached row \(5\), got shape \(2,\)"):
            moved.reorder(torch.tensor([0, 1]))


def test_cached_step_compiles_without_a_graph_break():
    """A static-cache step is one graph (no host sync, no data-dependent Python): CUDA graphs can capture it."""
    model = random_model().eval()
    src = sources()
    src_mask = padding_mask(src, PAD)
    with torch.no_grad():
        memory = model.encode(src, src_mask)
        eager, compiled = (KVCache(model, memory, capacity=6, static=True) for _ in range(2))
        step = torch.compile(decode_step, backend="eager", fullgraph=True)
        for t in range(3):
            token = torch.full((5,), BOS) if t == 0 else torch.arange(3, 8)
            torch.testing.assert_close(step(model, token, compiled, src_mask), decode_step(model, token, eager, src_mask))
    assert compiled.length == 3 and compiled.position.tolist() == [3]


def test_kv_cache_refuses_a_bad_capacity():
    model = random_model().eval()
    with pytest.raises(ValueError, match="capacity"):
        KVCache(model, torch.zeros(2, 3, 32), capacity=0)


def test_decode_step_refuses_a_cache_for_another_batch():
    model = random_model().eval()
    src = sources()
    with torch.no_grad():
        cache = KVCache(model, model.encode(src, padding_mask(src, PAD)))
        with pytest.raises(ValueError, match="cache holds 5 rows but the step has 3"):
            decode_step(model, torch.tensor([1, 1, 1]), cache, padding_mask(src, PAD)[:3])


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("norm_first", [False, True])
def test_cached_greedy_gives_exactly_the_uncached_tokens(seed, norm_first):
    model = random_model(seed, norm_first=norm_first)
    src = sources(seed)
    cached = greedy_decode(model, src, 16, BOS, EOS, PAD, use_cache=True)
    assert torch.equal(cached, greedy_decode(model, src, 16, BOS, EOS, PAD, use_cache=False))
    assert_well_formed(cached, 5, 16)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("beam_size", [2, 4])
def test_cached_beam_search_gives_exactly_the_uncached_tokens(seed, beam_size):
    model = random_model(seed)
    src = sources(seed)
    cached = beam_search(model, src, 12, BOS, EOS, PAD, beam_size=beam_size, use_cache=True)
    assert torch.equal(cached, beam_search(model, src, 12, BOS, EOS, PAD, beam_size=beam_size, use_cache=False))
    assert_well_formed(cached, 5, 12)


# --------------------------------------------------------------------------- greedy and beam
@pytest.mark.parametrize("seed", range(4))
def test_beam_size_one_is_greedy(seed):
    model = random_model(seed)
    src = sources(seed)
    for max_len in (2, 5, 16):
        assert torch.equal(beam_search(model, src, max_len, BOS, EOS, PAD, beam_size=1),
                           greedy_decode(model, src, max_len, BOS, EOS, PAD))


def test_greedy_is_the_argmax_of_the_teacher_forced_model():
    model = random_model(3).eval()
    src = sources(3)
    out = greedy_decode(model, src, 10, BOS, EOS, PAD)
    with torch.no_grad():
        src_mask = padding_mask(src, PAD)
        logp = model.generator(model.decode(model.encode(src, src_mask), src_mask, out[:, :-1],
                                            causal_mask(out.size(1) - 1)))
    logp[..., PAD] = -math.inf
    pred = logp.argmax(-1)
    for row, p in zip(out.tolist(), pred.tolist()):
        n = row.index(EOS) if EOS in row else len(row) - 1
        assert row[1:n + 1] == p[:n]


def test_early_stop_at_eos():
    model = random_model()
    with torch.no_grad():
        model.generator.proj.bias[EOS] = 100.0                 # the model says </s> at once, every time
    calls = []
    model.generator.register_forward_hook(lambda *a: calls.append(1))
    src = sources()
    out = greedy_decode(model, src, 50, BOS, EOS, PAD)
    assert out.tolist() == [[BOS, EOS]] * 5 and len(calls) == 1   # one step, not 49
    calls.clear()
    out = beam_search(model, src, 50, BOS, EOS, PAD, beam_size=3)
    assert out.tolist() == [[BOS, EOS]] * 5 and len(calls) == 1


def test_rows_that_finish_early_are_padded_and_never_generate_pad():
    model = random_model(1)
    with torch.no_grad():
        model.generator.proj.bias[PAD] = 100.0                  # pad would win every argmax if allowed
    out = greedy_decode(model, sources(1), 12, BOS, EOS, PAD)
    assert_well_formed(out, 5, 12)
    assert (out[:, 1] != PAD).all()


def _exhaustive_best(model, src, max_len, alpha):
    """The hypothesis with the best log P / lp over every sequence the beam could build (tiny vocab)."""
    vocab = model.generator.proj.out_features
    words = [t for t in range(vocab) if t != PAD]
    src_mask = padding_mask(src, PAD)
    best, best_key = None, -math.inf
    with torch.no_grad():
        memory = model.encode(src, src_mask)
        for n in range(1, max_len):
            for seq in itertools.product(words, repeat=n):
                if EOS in seq[:-1]:
                    continue
                if seq[-1] != EOS and n < max_len - 1:
                    continue                                   # unfinished only when cut at max_len
                ys = torch.tensor([[BOS, *seq]])
                logp = model.generator(model.decode(memory, src_mask, ys[:, :-1], causal_mask(n)))
                logp[..., PAD] = -math.inf                     # as the search sees it (not renormalised)
                score = logp[0, torch.arange(n), ys[0, 1:]].sum().item()
                key = score / ((5 + n) / 6) ** alpha
                if key > best_key + 1e-9:
                    best, best_key = [BOS, *seq], key
    return best


@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0])
def test_wide_beam_finds_the_exhaustive_optimum(alpha):
    model = random_model(2, vocab=5, d_model=16, h=2).eval()
    src = torch.tensor([[3, 4, 4, 3]])
    want = _exhaustive_best(model, src, 5, alpha)
    got = beam_search(model, src, 5, BOS, EOS, PAD, beam_size=200, length_penalty=alpha)[0].tolist()
    assert got[: len(want)] == want and all(t == PAD for t in got[len(want):])


def test_length_penalty_changes_the_choice_towards_longer_outputs():
    """alpha = 0 ranks by the raw log P, which favours short outputs; a large alpha divides long ones by more."""
    model = random_model(5, vocab=6)
    src = sources(5, vocab=6)
    lengths = {}
    for alpha in (0.0, 5.0):
        out = beam_search(model, src, 12, BOS, EOS, PAD, beam_size=6, length_penalty=alpha)
        lengths[alpha] = (out != PAD).sum(1)
    assert (lengths[5.0] >= lengths[0.0]).all() and lengths[5.0].sum() > lengths[0.0].sum(), lengths


def test_decoding_restores_training_mode():
    model = random_model().train()
    greedy_decode(model, sources(), 5, BOS, EOS, PAD)
    beam_search(model, sources(), 5, BOS, EOS, PAD)
    assert model.training
    model.eval()
    greedy_decode(model, sources(), 5, BOS, EOS, PAD)
    assert not model.training


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("call, error, match", [
    (lambda m, s: greedy_decode(m, s.float(), 5, BOS, EOS), TypeError, "src must be an integer tensor"),
    (lambda m, s: greedy_decode(m, s[0], 5, BOS, EOS), ValueError, r"src must have shape \(batch, seq\)"),
    (lambda m, s: greedy_decode(m, s[:0], 5, BOS, EOS), ValueError, r"batch >= 1 and seq >= 1"),
    (lambda m, s: greedy_decode(m, s, 1, BOS, EOS), ValueError, r"max_len .* \[2, 30\]"),
    (lambda m, s: beam_search(m, s, 31, BOS, EOS), ValueError, "positional table has 30 positions"),
    (lambda m, s: greedy_decode(m, s, 5, BOS, 20), ValueError,
     "eos_idx must be an id of the target vocabulary of 20, got 20"),
    (lambda m, s: greedy_decode(m, s, 5, BOS, EOS, pad_idx=EOS), ValueError, "must differ"),
    (lambda m, s: greedy_decode(m, s, 5, True, EOS), ValueError, "bos_idx must be an id .* got True"),
    (lambda m, s: beam_search(m, s, 5, BOS, EOS, beam_size=0), ValueError, "beam_size must be a positive int, got 0"),
    (lambda m, s: beam_search(m, s, 5, BOS, EOS, length_penalty=-1.0), ValueError, "length_penalty"),
    (lambda m, s: greedy_decode(torch.nn.Linear(2, 2), s, 5, BOS, EOS), TypeError, "Transformer"),
    (lambda m, s: greedy_decode(m, s + 20, 5, BOS, EOS), ValueError, r"\[0, 20\)"),
])
def test_bad_input_is_refused_clearly(call, error, match):
    model = random_model(max_len=30)
    with pytest.raises(error, match=match):
        call(model, sources())


@pytest.mark.parametrize("every", [2, 3, 7])
def test_checking_for_the_end_less_often_gives_the_same_tokens(every):
    """stop_check_every saves GPU syncs; the padding columns it may add are dropped again."""
    model = random_model(seed=3).eval()
    src = sources(seed=3)
    with torch.no_grad():
        model.generator.proj.bias[EOS] = 0.2        # rows end at different steps, all before step 7
    for max_len in (4, 12, 30):
        want = greedy_decode(model, src, max_len, BOS, EOS, PAD)
        got = greedy_decode(model, src, max_len, BOS, EOS, PAD, stop_check_every=every)
        assert torch.equal(got, want), (every, max_len)
    assert want.shape == (5, 7)                      # so the extra padding columns were really dropped


def test_cuda_graph_decoding_is_refused_off_cuda():
    model = random_model().eval()
    with pytest.raises(ValueError, match="cuda_graph=True needs a CUDA model"):
        greedy_decode(model, sources(), 5, BOS, EOS, PAD, cuda_graph=True)
    with pytest.raises(ValueError, match="stop_check_every must be a positive int"):
        greedy_decode(model, sources(), 5, BOS, EOS, PAD, stop_check_every=0)
