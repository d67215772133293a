"""annotated_transformer.ablations (chapter 18): the grid, the verdict rule, one run, parallel runs, the records.

References: the base configuration itself (every row differs from it in the one setting it names), the verdict
rule written out case by case, corpus_scores on the stored translations (every recorded BLEU is recomputed),
and one process (runs in spawned worker processes give what the same runs give in this process)."""
import copy
import json
from pathlib import Path

import pytest

from annotated_transformer.ablations import (ABLATION_SIZES, _split_change, ablation_rows, prepare, run_parallel,
                                             train_one, train_run, verdict)

ROOT = Path(__file__).resolve().parents[1]
RECORDS = sorted((ROOT / "results").glob("ablations-*.json"))
QUICK_RECORD = ROOT / "build" / "ablations" / "ablations-quick.json"


# --------------------------------------------------------------------------- the grid
@pytest.mark.parametrize("profile", sorted(ABLATION_SIZES))
def test_every_row_changes_one_setting_of_the_base(profile):
    sizes = ABLATION_SIZES[profile]
    base = {**sizes["model"], **sizes["train"]}
    rows = ablation_rows(sizes)
    assert rows["base"] == {}
    for name, change in rows.items():
        if name == "base":
            continue
        model_args, train_args = _split_change(sizes, change)
        differs = {k for k, v in {**model_args, **train_args}.items() if base.get(k) != v}
        assert differs == set(change), name
        # one idea per row: tying is two flags of make_model that only make sense together
        assert len(change) == 1 or set(change) == {"tie_output", "share_embeddings"}, name
    assert {"no warm-up", "post-LN", "separate embeddings", "h = 1", "dropout 0", "label smoothing 0"} <= set(rows)


def test_no_warm_up_is_the_inverse_square_root_from_the_first_step():
    from annotated_transformer.train import noam_rate

    rows = ablation_rows(ABLATION_SIZES["full"])
    assert rows["no warm-up"] == {"warmup": 1}
    assert all(noam_rate(s, 128, 1) == 128 ** -0.5 * s ** -0.5 for s in (1, 2, 10, 1000))


def test_a_row_that_repeats_the_base_is_refused():
    sizes = copy.deepcopy(ABLATION_SIZES["quick"])
    sizes["heads"] = (1, sizes["model"]["h"])
    with pytest.raises(ValueError, match=r"row 'h = 4' sets \['h'\] to the base configuration's value"):
        ablation_rows(sizes)


@pytest.mark.parametrize("change", [{"heads": 2}, {"steps": 10}, {"seed": 3}])
def test_a_change_must_be_a_model_or_training_setting(change):
    with pytest.raises(ValueError, match="unknown settings"):
        _split_change(ABLATION_SIZES["quick"], change)


# --------------------------------------------------------------------------- the verdict rule
@pytest.mark.parametrize("row, expected", [
    ([20.0], "inside the band"), ([19.0], "inside the band"), ([21.0], "inside the band"),
    ([21.5], "above (1 seed)"), ([18.9], "below (1 seed)"),
    ([21.1, 22.0, 21.5], "better"), ([18.0, 18.5, 18.9], "worse"),
    ([21.5, 22.0, 20.5], "no measurable difference"), ([17.0, 23.0, 20.0], "no measurable difference")])
def test_verdict(row, expected):
    assert verdict(row, [19.0, 21.0, 20.0]) == expected


def test_verdict_needs_a_band():
    with pytest.raises(ValueError, match="at least two base seeds"):
        verdict([20.0], [20.0])
    with pytest.raises(ValueError, match="at least two base seeds"):
        verdict([], [19.0, 21.0])


@pytest.mark.parametrize("workers", [0, -1, True, 1.5, "2"])
def test_workers_must_be_a_positive_int(workers):
    with pytest.raises(ValueError, match="workers must be a positive int"):
        run_parallel([], workers)


# --------------------------------------------------------------------------- runs on Multi30k
@pytest.fixture(scope="module")
def tiny():
    from annotated_transformer.data import load_multi30k, train_tokenizer

    train = load_multi30k("train", download=False)[:3000]
    tokenizer = train_tokenizer([de for de, _ in train] + [en for _, en in train], 600)
    sizes = copy.deepcopy(ABLATION_SIZES["quick"])
    sizes.update(steps=6, n_val=12, n_test=10, max_pair=12, average_last=3, average_every=2, beams=(1, 2),
                 alphas=(0.0, 1.0), extra_len=4)
    return sizes, tokenizer.to_str()


def _spec(sizes, tok, name="base", change=None, seed=0, extras=False):
    return dict(name=name, change=change or {}, seed=seed, sizes=sizes, tokenizer_json=tok, device="cpu",
                extras=extras)


def test_one_run_scores_what_it_stores(tiny):
    from annotated_transformer.data import corpus_scores, load_multi30k

    sizes, tok = tiny
    r = train_run(_spec(sizes, tok, extras=True))
    refs = [en for _, en in load_multi30k("test", download=False)[:sizes["n_test"]]]
    assert r["steps"] == sizes["steps"] and len(r["test_hypotheses"]) == sizes["n_test"]
    assert round(corpus_scores(r["test_hypotheses"], refs)["bleu"], 2) == r["test_bleu"]
    assert set(r["decoding"]) == {"beam 1, alpha 0", "beam 2, alpha 0", "beam 2, alpha 1"}
    greedy = r["decoding"]["beam 1, alpha 0"]
    assert greedy["test_hypotheses"] == r["test_hypotheses"] and greedy["val_bleu"] == r["val_bleu"]
    assert r["averaged"]["checkpoints"] == sizes["average_last"]


def test_averaging_one_checkpoint_gives_the_final_weights(tiny):
    import torch

    sizes, tok = tiny
    data = prepare(sizes, tok)
    model, history, _, kept = train_one(sizes, {}, 0, data, keep_at={sizes["steps"]})
    assert list(kept) == [sizes["steps"]] and len(history) == sizes["steps"]
    assert all(torch.equal(kept[sizes["steps"]][k], v) for k, v in model.state_dict().items())


def test_worker_processes_give_what_one_process_gives_also_from_a_notebook_cell(tiny):
    """Two runs in two spawned workers equal the same runs in this process. The parallel side runs the exported
    code as the chapter does, as a cell in a kernel's (or tools/run_plain.py's) __main__, where a worker cannot
    import a function defined in the cell: the full profile (workers=2) once failed that way."""
    import annotated_transformer.ablations as module

    sizes, tok = tiny
    specs = [_spec(sizes, tok), _spec(sizes, tok, "h = 1", {"h": 1}, seed=1)]
    cell = {"__name__": "__main__"}
    exec(compile(Path(module.__file__).read_text(), "<the chapter's export cell>", "exec"), cell)
    assert cell["train_run"].__module__ == "__main__"
    here = run_parallel(specs, 1, log=lambda line: None)
    there = cell["run_parallel"](specs, 2, log=lambda line: None)
    for a, b in zip(here, there):
        assert (a["name"], a["seed"]) == (b["name"], b["seed"])
        assert a["val_loss"] == b["val_loss"] and a["test_hypotheses"] == b["test_hypotheses"]


# --------------------------------------------------------------------------- the records
def _bleu(hypotheses, references, signature):
    """sacreBLEU's corpus BLEU as corpus_scores computes it (BLEU() with its defaults, the same signature),
    without the chrF that corpus_scores adds: the records are recomputed here some thirty times."""
    from sacrebleu.metrics import BLEU

    bleu = BLEU()
    score = bleu.corpus_score(hypotheses, [references]).score
    assert str(bleu.get_signature()) == signature
    return score


def _check_record(r):
    from annotated_transformer.data import load_multi30k

    refs = [en for _, en in load_multi30k("test", download=False)]
    base = r["rows"]["base"]["val_bleu"]
    assert len(base) == 3 and r["band"] == [min(base), max(base)]
    for name, row in r["rows"].items():
        runs = [x for x in r["runs"] if x["name"] == name]
        assert [x["seed"] for x in runs] == row["seeds"] and [x["val_bleu"] for x in runs] == row["val_bleu"]
        if name != "base":
            first = verdict(row["val_bleu"][:1], base)
            assert len(runs) == (3 if first == "inside the band" else 1), name   # the rule that adds seeds
            assert row["verdict"] == verdict(row["val_bleu"], base), name
    for run in r["runs"]:
        n = len(run["test_hypotheses"])
        assert n == (r["sizes"]["n_test"] or len(refs))
        assert round(_bleu(run["test_hypotheses"], refs[:n], run["bleu_signature"]), 2) == run["test_bleu"], run["name"]
    grid = r["runs"][0]["decoding"]
    for g in grid.values():
        assert round(_bleu(g["test_hypotheses"], refs[:len(g["test_hypotheses"])], g["bleu_signature"]), 2) == g["test_bleu"]


@pytest.mark.skipif(not RECORDS, reason="no results/ablations-*.json: chapter 18's full profile has not been recorded")
@pytest.mark.parametrize("path", RECORDS, ids=lambda p: p.name)
def test_recorded_runs_recompute(path):
    r = json.loads(path.read_text())
    assert r["profile"] == "full" and path.stem == f"ablations-{r['device'].split(':')[0]}"
    _check_record(r)


@pytest.mark.skipif(not QUICK_RECORD.exists(), reason="build/ablations/ablations-quick.json is written by chapter "
                    "18's quick profile (python tools/nb.py store 18_ablations), which has not run in this checkout")
def test_quick_record_recomputes():
    _check_record(json.loads(QUICK_RECORD.read_text()))
