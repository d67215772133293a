"""The published records in results/: written by full-profile runs, checked here against what they claim.

A record is never edited by hand; these tests recompute what can be recomputed without the run (the
test-set BLEU from the recorded translations) and check the rest for consistency."""
import json
import math
from pathlib import Path

import pytest

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
