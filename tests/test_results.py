"""The published records in results/: written by full-profile runs, checked here against what they claim.

A record is never edited by hand; these tests recompute what can be recomputed without the run (the
test-set BLEU from the recorded translations) and check the rest for consistency."""
import json
import math
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"


def record(name):
    path = RESULTS / name
    if not path.is_file():
        pytest.skip(f"{name} has not been recorded")
    return json.loads(path.read_text())


TRANSLATION = sorted(RESULTS.glob("translation-full-*.json")) + sorted(RESULTS.glob("translation-speedrun-*.json"))


@pytest.mark.parametrize("path", TRANSLATION, ids=lambda p: p.name)
def test_translation_bleu_recomputes_from_the_recorded_translations(path):
    from annotated_transformer.data import corpus_scores, load_multi30k

    r = json.loads(path.read_text())
    test = load_multi30k("test", download=False)[: r["test_sentences"]]
    hyps = r["test_hypotheses_beam4"]
    assert len(hyps) == r["test_sentences"] == len(test)
    scores = corpus_scores(hyps, [en for _, en in test])
    assert round(scores["bleu"], 2) == r["bleu_beam4"]
    assert round(scores["chrf"], 2) == r["chrf_beam4"]
    assert scores["bleu_signature"].split("|version")[0] == r["bleu_signature"].split("|version")[0]


@pytest.mark.parametrize("path", TRANSLATION, ids=lambda p: p.name)
def test_translation_record_is_consistent(path):
    r = json.loads(path.read_text())
    assert r["profile"] == "full" and path.stem == f"translation-full-{r['device'].split(':')[0]}"
    steps = [c["step"] for c in r["curve"]]
    assert steps == sorted(steps) and steps[-1] == r["steps"]
    assert max(c["bleu"] for c in r["curve"]) == pytest.approx(r["best_val_bleu_greedy"], abs=0.01)
    assert r["best_step"] in steps
    if r["stopped_by_budget"]:
        assert r["train_wall_s"] >= r["budget_s"]
    assert all(math.isfinite(c["loss"]) for c in r["curve"])


# The attention records chapter 10 writes: the full profile's in results/, the quick profile's (the run the
# stored notebook shows, `python tools/nb.py store 10`) under build/.
ATTENTION = sorted(RESULTS.glob("attention-full-*.json")) + sorted((ROOT / "build" / "translation").glob("attention-quick.json"))
ATTENTION_KINDS = ("encoder", "decoder_self", "cross")


def check_attention_record(r: dict, digits: int = 3) -> None:
    """The layout the chapter states: kind -> layer -> head -> query position -> key position, one query per
    token the decoder reads (encoder: per source token), rows that are distributions, a causal decoder."""
    assert r["layout"] == "kind -> layer -> head -> query position -> key position"
    assert r["sentences"], "a record of no sentences"
    n_layers, n_heads = r["model"]["N"], r["model"]["h"]
    for i, s in enumerate(r["sentences"]):
        src, tgt_in, predicted = s["src_tokens"], s["tgt_in_tokens"], s["predicted_tokens"]
        assert src[-1] == "</s>" and tgt_in[0] == "<s>", i
        assert predicted[:-1] == tgt_in[1:] and len(predicted) == len(tgt_in), i  # teacher-forced on its own output
        shapes = {"encoder": (len(src), len(src)), "decoder_self": (len(tgt_in), len(tgt_in)),
                  "cross": (len(tgt_in), len(src))}
        for kind in ATTENTION_KINDS:
            layers = s[kind]
            assert len(layers) == n_layers and all(len(heads) == n_heads for heads in layers), (i, kind)
            w = torch.tensor(layers, dtype=torch.float64)             # (layers, heads, queries, keys)
            assert tuple(w.shape[2:]) == shapes[kind], (i, kind, tuple(w.shape))
            assert torch.isfinite(w).all() and (w >= 0).all(), (i, kind)
            # each row sums to 1, up to the rounding of its entries to `digits` decimals
            tolerance = w.shape[-1] * 0.5 * 10 ** -digits + 1e-9
            assert (w.sum(-1) - 1).abs().max() <= tolerance, (i, kind, (w.sum(-1) - 1).abs().max().item())
        future = torch.tensor(s["decoder_self"], dtype=torch.float64).triu(1)
        assert (future == 0).all(), f"sentence {i}: decoder self-attention looks at a later position"


@pytest.mark.parametrize("path", ATTENTION or [None], ids=lambda p: p.name if p else "none")
def test_attention_record_has_the_stated_layout(path):
    if path is None:
        pytest.skip("no attention record: results/attention-full-<device>.json comes from a full run of chapter 10, "
                    "build/translation/attention-quick.json from `python tools/nb.py store 10`")
    r = json.loads(path.read_text())
    if path.parent == RESULTS:
        assert r["profile"] == "full" and path.stem == f"attention-full-{r['device'].split(':')[0]}"
    else:
        assert r["profile"] == "quick"
    check_attention_record(r)


def test_the_attention_check_catches_a_bad_record():
    good = {"layout": "kind -> layer -> head -> query position -> key position", "model": {"N": 1, "h": 1},
            "sentences": [{"src_tokens": ["▁Hund", "</s>"], "tgt_in_tokens": ["<s>", "▁dog"],
                           "predicted_tokens": ["▁dog", "</s>"], "encoder": [[[[0.5, 0.5], [0.25, 0.75]]]],
                           "decoder_self": [[[[1.0, 0.0], [0.4, 0.6]]]], "cross": [[[[0.9, 0.1], [0.3, 0.7]]]]}]}
    check_attention_record(good)
    for kind, bad, match in (("decoder_self", [[[[0.5, 0.5], [0.4, 0.6]]]], "later position"),
                             ("cross", [[[[0.9, 0.2], [0.3, 0.7]]]], "cross"),
                             ("encoder", [[[[0.5, 0.5]]]], "encoder")):
        broken = json.loads(json.dumps(good))
        broken["sentences"][0][kind] = bad
        with pytest.raises(AssertionError, match=match):
            check_attention_record(broken)


def test_transfer_record_is_consistent():
    r = record("transfer-full.json")
    assert r["profile"] == "full"
    assert set(r["results"]) == {"(a) pretrained", "(b) from scratch", "(c) fine-tuned"}
    for name, splits in r["results"].items():
        assert set(splits) == set(r["eval_captions"])
        for recall in splits.values():
            assert 0.0 <= recall["1"] <= recall["5"] <= 1.0
    for name, curve in r["curves"].items():
        assert curve[-1]["step"] == r["budget"]["steps"]
        assert curve[-1]["recall"] == r["results"][name]["val"]  # the curve ends where the table is


@pytest.mark.parametrize("path", sorted(RESULTS.glob("benchmarks-*.json")), ids=lambda p: p.name)
def test_benchmark_records_name_their_machine(path):
    r = json.loads(path.read_text())
    assert r["profile"] in ("quick", "full", "gpu") and r["device"] in ("cpu", "cuda")
    assert r["machine"]["torch"] and r["matmul_peak"]["flops"] > 0
    if r["device"] == "cuda":
        assert r["machine"]["cuda"]
    for row in r.get("training", {}).values():
        assert row["ratio_vs_torch"] == pytest.approx(row["ours"]["tokens_per_s"] / row["torch"]["tokens_per_s"])
