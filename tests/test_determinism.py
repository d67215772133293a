"""Determinism (issue 9): the same seed gives the same model, the same training run and the same chapter.

- make_model under one seed builds bit-identical parameters;
- a few steps of `fit` (dropout on) give bit-identical losses and parameters twice on CPU, even when the
  global random state differs between the runs (fit draws dropout from cfg.seed and the step alone);
- chapter 01, executed by the runner (quick profile, CPU, seed 0), prints in every cell tagged
  nbval-check-output exactly what the committed notebook holds, which an earlier run in another process
  stored.

The model and training properties have counter-checks (another seed does change the result) and the
chapter test needs several non-empty checked cells, so no test passes by comparing two empty or constant things.
"""
import copy

import pytest
import torch
from nbval.plugin import coalesce_streams

import annotated_transformer.model as tmodel
import annotated_transformer.train as train
import nb

TINY = dict(N=2, d_model=16, d_ff=32, h=2, dropout=0.1, max_len=32)
VOCAB = 11


def build(seed: int, **overrides):
    torch.manual_seed(seed)
    return tmodel.make_model(VOCAB, VOCAB, **{**TINY, **overrides})


def same_parameters(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-LN", "pre-LN"])
def test_make_model_same_seed_same_parameters(norm_first):
    a, b = build(0, norm_first=norm_first), build(0, norm_first=norm_first)
    assert same_parameters(a, b)
    assert not same_parameters(a, build(1, norm_first=norm_first)), "the seed does not reach the initialisation"


def train_run(model_seed: int, cfg_seed: int, data_seed: int = 0, disturb: bool = False):
    """A few optimizer steps of fit on the copy task; returns (losses, final state_dict)."""
    model = build(model_seed)
    if disturb:  # another global random state when fit starts: fit must not depend on it
        torch.rand(1000)
    cfg = train.TrainConfig(steps=4, warmup=2, accum=2, seed=cfg_seed, log_every=2)
    get_batch = train.synthetic_batches("copy", VOCAB, batch_size=6, min_len=2, max_len=6, seed=data_seed)
    history = train.fit(model, get_batch, cfg, device="cpu", progress=False)
    return [r["loss"] for r in history], model.state_dict()


def test_fit_same_seed_same_losses_and_parameters():
    (losses_a, params_a), (losses_b, params_b) = train_run(0, 0), train_run(0, 0, disturb=True)
    assert len(losses_a) == 4 and all(torch.isfinite(torch.tensor(losses_a)))
    assert losses_a == losses_b                                    # exact, not approximate
    assert params_a.keys() == params_b.keys()
    assert all(torch.equal(params_a[k], params_b[k]) for k in params_a)
    # Counter-checks: the dropout seed, the data seed and the initialisation each change the run.
    assert train_run(0, 1)[0] != losses_a, "cfg.seed does not reach dropout"
    assert train_run(0, 0, data_seed=1)[0] != losses_a, "the data seed does not reach the batches"
    assert train_run(1, 0)[0] != losses_a, "the model seed does not reach the initialisation"


def test_synthetic_batches_are_a_function_of_seed_and_step():
    a = train.synthetic_batches("reverse", VOCAB, batch_size=4, min_len=1, max_len=5, seed=3)
    b = train.synthetic_batches("reverse", VOCAB, batch_size=4, min_len=1, max_len=5, seed=3)
    torch.rand(100)  # the global random state must not matter
    for step in range(3):
        x, y = a(step, 0), b(step, 0)
        assert torch.equal(x.src, y.src) and torch.equal(x.tgt, y.tgt)
    assert not torch.equal(a(0, 0).src, a(1, 0).src), "every step got the same batch"


# --------------------------------------------------------------------------- a chapter, run twice
CHAPTER = "01_embeddings_to_attention"
CHECKED = "nbval-check-output"


def checked_outputs(executed) -> list[tuple[str, list]]:
    """(source, text outputs) of every code cell tagged nbval-check-output, as nbval compares them.

    nbval compares text: stream text and text/plain (images are not compared), never execution counts.
    Like nbval, merge each stream's pieces first: how the kernel chunks a cell's prints varies from run
    to run (the text does not).
    """
    cells = []
    for cell in executed.cells:
        if cell.cell_type != "code" or CHECKED not in cell.metadata.get("tags", []):
            continue
        outs = []
        for o in coalesce_streams(copy.deepcopy(cell.outputs)):
            if o.output_type == "stream":
                outs.append((o.output_type, o.name, o.text))
            elif o.output_type in ("execute_result", "display_data"):
                outs.append((o.output_type, o.data.get("text/plain")))
            else:  # an error output: keep all of it, a determinism test must not hide it
                outs.append((o.output_type, o.get("ename"), o.get("evalue")))
        cells.append((cell.source, outs))
    return cells


def run_chapter(stem: str, out_dir):
    """Execute one chapter as `tools/nb.py run` does (quick, cpu, seed 0); return the executed notebook."""
    [src] = nb.select([stem])
    report = nb.run_one(src, out_dir, {"device": "cpu", "profile": "quick", "seed": 0})
    assert report["ok"], f"{stem} failed: {report.get('error')}"
    return nb.read(out_dir / f"{src.stem}.ipynb")


def test_chapter_01_is_deterministic(tmp_path):
    """A run now prints, in every checked cell, exactly what the run that stored the committed outputs
    printed (another process, another day): compared here cell by cell, streams merged as nbval does."""
    [src] = nb.select([CHAPTER])
    first = checked_outputs(nb.read(src.with_suffix(".ipynb")))
    second = checked_outputs(run_chapter(CHAPTER, tmp_path / "a"))
    assert len(first) >= 5 and all(outs for _, outs in first), "no (or empty) checked cells: nothing compared"
    assert len(first) == len(second)
    for (source, a), (_, b) in zip(first, second):
        assert a == b, f"a checked cell printed different outputs in the stored run and this one:\n{source}"
