"""annotated_transformer.train and .checkpoint: batches, label smoothing, the Noam schedule, token batching,
fit, checkpoints, the synthetic tasks, and the torchrun entry point."""
import errno
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from annotated_transformer.checkpoint import fingerprint_differences, load_checkpoint, save_checkpoint
from annotated_transformer.model import make_model
from annotated_transformer.train import (
    Batch, LabelSmoothing, NoamSchedule, TrainConfig, batch_by_tokens, exact_match, fit, heldout_batch,
    noam_rate, synthetic_batches, synthetic_pairs, train_main,
)

PAD, BOS, EOS = 0, 1, 2
TASK = dict(vocab=9, min_len=1, max_len=5)
MODEL = dict(N=1, d_model=16, d_ff=32, h=2)


def small_model(seed=0, dropout=0.1, **kw):
    torch.manual_seed(seed)
    return make_model(TASK["vocab"], TASK["vocab"], **{**MODEL, "dropout": dropout, **kw})


# --------------------------------------------------------------------------- Batch
def test_batch_shifts_the_target_and_counts_tokens():
    src = torch.tensor([[3, 4, 2, 0], [5, 2, 0, 0]])
    tgt = torch.tensor([[1, 4, 3, 2], [1, 5, 2, 0]])
    b = Batch(src, tgt, PAD)
    assert b.tgt_in.tolist() == [[1, 4, 3], [1, 5, 2]] and b.tgt_y.tolist() == [[4, 3, 2], [5, 2, 0]]
    assert b.ntokens == 5 and len(b) == 2
    assert b.src_mask.shape == (2, 1, 1, 4) and b.tgt_mask.shape == (2, 1, 3, 3)
    assert b.tgt_mask[1, 0].tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    with pytest.raises(ValueError, match=r"\(2, 4\) and \(3, 4\)"):
        Batch(src, torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="at least <s> and one token"):
        Batch(src, torch.ones(2, 1, dtype=torch.long))


def test_batch_checks_target_ids_once_on_the_host():
    src = torch.tensor([[3, 4, 2], [5, 2, 0]])
    b = Batch(src, torch.tensor([[1, 4, 8, 2], [1, 5, 2, 0]]), PAD, tgt_vocab=9)
    assert b.tgt_range == (0, 8) and b.ntokens == 5
    with pytest.raises(ValueError, match=r"\[0, 9\) for a vocabulary of 9, got ids from 1 to 9"):
        Batch(src, torch.tensor([[1, 4, 3, 2], [1, 5, 2, 9]]), PAD, tgt_vocab=9)   # the last label: in no tgt_in
    with pytest.raises(ValueError, match="got ids from -1 to 5"):
        Batch(src, torch.tensor([[1, 4, 3, 2], [1, 5, -1, 0]]), PAD)                # negative: wrong in any vocabulary
    with pytest.raises(TypeError, match="tgt must hold integer token ids, got torch.float32"):
        Batch(src, torch.ones(2, 4))
    # moving a batch keeps the host-side counts instead of reading them back from the device again
    moved = b.to("meta")
    assert moved.tgt.device.type == "meta" and moved.tgt_y.shape == (2, 3) and moved.src_mask.device.type == "meta"
    assert moved.ntokens == 5 and moved.tgt_range == (0, 8) and b.tgt.device.type == "cpu"


def test_fit_refuses_targets_outside_the_model_vocabulary():
    bad = lambda step, micro: Batch(torch.tensor([[3, 2]]), torch.tensor([[1, 3, 9]]))   # the model has 9 classes
    with pytest.raises(ValueError, match=r"step 0: target ids must lie in \[0, 9\).*got ids from 1 to 9"):
        fit(small_model(), bad, TrainConfig(steps=1, warmup=1), progress=False)


# --------------------------------------------------------------------------- label smoothing
def test_label_smoothing_target_distribution():
    crit = LabelSmoothing(6, pad_idx=0, smoothing=0.2)
    q = crit.target_distribution(torch.tensor([3, 0, 1]))
    assert torch.allclose(q[0], torch.tensor([0.0, 0.05, 0.05, 0.8, 0.05, 0.05]))
    assert torch.equal(q[1], torch.zeros(6))                         # a padding label: no target at all
    assert q[2, 1] == pytest.approx(0.8) and q[2, 0] == 0
    assert torch.allclose(q[[0, 2]].sum(1), torch.ones(2))


def test_label_smoothing_is_kl_finite_and_ignores_padding():
    torch.manual_seed(0)
    crit = LabelSmoothing(7, pad_idx=0, smoothing=0.1)
    logp = torch.log_softmax(torch.randn(2, 5, 7), -1)
    target = torch.tensor([[3, 4, 0, 0, 0], [1, 6, 2, 5, 0]])
    loss = crit(logp, target)
    assert torch.isfinite(loss)
    q = crit.target_distribution(target.reshape(-1))
    by_hand = sum(q[i, v] * (math.log(q[i, v]) - logp.reshape(-1, 7)[i, v])
                  for i in range(10) for v in range(7) if q[i, v] > 0)
    assert loss.item() == pytest.approx(float(by_hand), rel=1e-5)
    logp2 = logp.clone()
    logp2[target == 0] = torch.log_softmax(torch.randn(int((target == 0).sum()), 7), -1)
    assert crit(logp2, target).item() == pytest.approx(loss.item(), rel=1e-6)   # padded rows don't count
    # extreme log-probabilities (a confident model) stay finite
    confident = torch.full((1, 7), -1e4); confident[0, 3] = 0.0
    assert torch.isfinite(crit(confident, torch.tensor([3])))


def test_label_smoothing_zero_is_nll_and_minimum_is_one_minus_eps():
    torch.manual_seed(1)
    logp = torch.log_softmax(torch.randn(8, 5), -1)
    y = torch.tensor([1, 2, 0, 4, 3, 0, 2, 1])
    assert torch.allclose(LabelSmoothing(5, 0, 0.0)(logp, y), nn.functional.nll_loss(logp, y, ignore_index=0, reduction="sum"))
    # the loss is zero exactly at p = q
    crit = LabelSmoothing(5, 0, 0.1)
    q = crit.target_distribution(torch.tensor([2]))
    assert crit(q.clamp_min(1e-30).log(), torch.tensor([2])).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("smoothing, pad_idx", [(0.1, 0), (0.2, 3), (0.0, 0)])
def test_label_smoothing_equals_kl_div_against_the_full_target_distribution(smoothing, pad_idx):
    """The loss never builds q; PyTorch's kl_div against q built in full (target_distribution) gives the
    same value and the same gradient, at a real vocabulary size, with padding rows in the batch."""
    torch.manual_seed(2)
    vocab = 8000
    crit = LabelSmoothing(vocab, pad_idx=pad_idx, smoothing=smoothing)
    logits = torch.randn(3, 7, vocab) * 3                                # float32, as the loss computes
    target = torch.randint(0, vocab, (3, 7))
    target[0, 4:] = pad_idx
    target[2, 1] = pad_idx
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = crit(torch.log_softmax(a, -1), target)
    q = crit.target_distribution(target.reshape(-1))
    ref = nn.functional.kl_div(torch.log_softmax(b, -1).reshape(-1, vocab), q, reduction="sum")
    ours.backward(), ref.backward()
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-7)
    assert a.grad[target == pad_idx].abs().max() == 0                  # padding rows get no gradient


@pytest.mark.parametrize("kwargs, match", [
    (dict(vocab=2, pad_idx=0), "at least 3"), (dict(vocab=5, pad_idx=5), "outside"),
    (dict(vocab=5, pad_idx=0, smoothing=1.0), r"\[0, 1\)"),
])
def test_label_smoothing_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LabelSmoothing(**kwargs)


def test_label_smoothing_bad_input():
    crit = LabelSmoothing(5, 0, 0.1)
    with pytest.raises(ValueError, match="6 classes but the loss was built for 5"):
        crit(torch.zeros(2, 6), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="do not match targets"):
        crit(torch.zeros(2, 5), torch.tensor([1, 2, 3]))
    # target ids are asserted on the device, not read back to the host: on a CPU a RuntimeError that names
    # the range (a GPU raises a device-side assert); Batch and fit raise the ValueError (tests above)
    with pytest.raises(RuntimeError, match=r"\[0, 5\)"):
        crit(torch.zeros(2, 5), torch.tensor([1, 5]))


def test_label_smoothing_reads_nothing_back_to_the_host():
    """No int(tensor)/.item() in the loss: it runs on meta tensors (which have no values to read) and
    torch.compile traces it as one graph (a host read is a graph break, refused by fullgraph=True)."""
    crit = LabelSmoothing(7, pad_idx=0, smoothing=0.1)
    out = crit(torch.empty(2, 5, 7, device="meta"), torch.empty(2, 5, dtype=torch.long, device="meta"))
    assert out.shape == () and out.device.type == "meta"
    logp = torch.log_softmax(torch.randn(2, 5, 7), -1)
    target = torch.tensor([[3, 4, 0, 0, 0], [1, 6, 2, 5, 0]])
    compiled = torch.compile(crit, backend="eager", fullgraph=True)
    assert torch.allclose(compiled(logp, target), crit(logp, target))


# --------------------------------------------------------------------------- Noam
@pytest.mark.parametrize("d_model, warmup, factor", [(512, 4000, 1.0), (64, 100, 2.0), (1024, 10, 0.5)])
def test_noam_formula(d_model, warmup, factor):
    for step in (1, 2, warmup // 2 + 1, warmup, warmup + 1, 3 * warmup, 10 * warmup):
        want = factor * d_model ** -0.5 * min(step ** -0.5, step * warmup ** -1.5)
        assert noam_rate(step, d_model, warmup, factor) == pytest.approx(want, rel=1e-12)
    rates = [noam_rate(s, d_model, warmup) for s in range(1, 3 * warmup)]
    assert max(range(len(rates)), key=rates.__getitem__) + 1 == warmup          # peak at the warm-up's end
    assert max(rates) == pytest.approx((d_model * warmup) ** -0.5)


def test_noam_schedule_drives_lambdalr_once_per_step():
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([p], lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, NoamSchedule(64, 10))
    for step in range(1, 25):
        assert opt.param_groups[0]["lr"] == pytest.approx(noam_rate(step, 64, 10))
        opt.step(); sched.step()
    with pytest.raises(ValueError, match="counts from 1"):
        noam_rate(0, 64, 10)
    with pytest.raises(ValueError, match="warmup=0"):
        NoamSchedule(64, 0)


# --------------------------------------------------------------------------- batch_by_tokens
def test_batch_by_tokens_respects_the_budget_and_covers_everything():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(1, 40, (500,), generator=g).tolist()
    batches = batch_by_tokens(lengths, 200, seed=3)
    assert sorted(i for b in batches for i in b) == list(range(500))
    assert all(max(lengths[i] for i in b) * len(b) <= 200 for b in batches)
    assert batches == batch_by_tokens(lengths, 200, seed=3) and batches != batch_by_tokens(lengths, 200, seed=4)
    # bucketing: far less padding than the same number of random batches
    pad = lambda bs: sum(max(lengths[i] for i in b) * len(b) for b in bs) - sum(lengths)
    assert pad(batches) < 0.2 * sum(lengths)
    unshuffled = batch_by_tokens(lengths, 200, shuffle=False)
    firsts = [max(lengths[i] for i in b) for b in unshuffled]
    assert firsts == sorted(firsts)
    assert batch_by_tokens([], 10) == []


def test_batch_by_tokens_errors():
    with pytest.raises(ValueError, match="example 1 has length 12 > max_tokens=10"):
        batch_by_tokens([3, 12, 4], 10)
    with pytest.raises(ValueError, match="positive"):
        batch_by_tokens([3, 0], 10)
    with pytest.raises(ValueError, match="max_tokens"):
        batch_by_tokens([3], 0)


# --------------------------------------------------------------------------- synthetic tasks
@pytest.mark.parametrize("task", ["copy", "reverse", "sort"])
def test_synthetic_pairs(task):
    g = torch.Generator().manual_seed(0)
    src, tgt = synthetic_pairs(task, 50, 9, 1, 6, g)
    assert src.shape == (50, 7) and tgt.shape == (50, 8)
    for s, t in zip(src.tolist(), tgt.tolist()):
        x = s[: s.index(EOS)]
        y = t[1: t.index(EOS)]
        assert 1 <= len(x) <= 6 and all(3 <= v < 9 for v in x) and t[0] == BOS
        assert y == {"copy": x, "reverse": x[::-1], "sort": sorted(x)}[task]
        assert all(v == PAD for v in s[len(x) + 1:]) and all(v == PAD for v in t[len(x) + 2:])
    with pytest.raises(ValueError, match="task"):
        synthetic_pairs("shuffle", 2, 9, 1, 3, g)
    with pytest.raises(ValueError, match="min_len=4, max_len=3"):
        synthetic_pairs("copy", 2, 9, 4, 3, g)


def test_synthetic_batches_are_a_function_of_the_step_and_split_by_rank():
    full = synthetic_batches("copy", batch_size=8, seed=1, **TASK)
    a, b = full(3, 0), full(3, 0)
    assert torch.equal(a.src, b.src) and not torch.equal(full(4, 0).src, a.src)
    assert not torch.equal(full(3, 1).src, a.src)
    halves = [synthetic_batches("copy", batch_size=8, seed=1, rank=r, world_size=2, **TASK)(3, 0) for r in (0, 1)]
    assert torch.equal(torch.cat([h.src for h in halves]), a.src)
    with pytest.raises(ValueError, match="batch_size=7 is not divisible by world_size=2"):
        synthetic_batches("copy", batch_size=7, world_size=2, **TASK)
    held = heldout_batch("copy", n=8, seed=1, **TASK)
    assert all(not torch.equal(held.src, full(s, 0).src) for s in range(5))


def test_exact_match_counts_whole_sequences():
    model = small_model(dropout=0.0)
    batch = heldout_batch("copy", n=20, seed=0, **TASK)
    with torch.no_grad():
        pred = model(batch.src, batch.tgt_in, batch.src_mask, batch.tgt_mask).argmax(-1)
    want = ((pred == batch.tgt_y) | (batch.tgt_y == PAD)).all(1).float().mean().item()
    model.train()
    assert exact_match(model, batch) == want and model.training          # mode restored
    # a "model" that is always right scores 1
    with torch.no_grad():
        model.generator.proj.weight.zero_(); model.generator.proj.bias.zero_()
    one = Batch(torch.tensor([[3, 2]]), torch.tensor([[1, 3]]))
    model.generator.proj.bias.data[3] = 10.0
    assert exact_match(model, one) == 1.0


# --------------------------------------------------------------------------- fit
def test_fit_learns_and_logs():
    model = small_model(dropout=0.0)
    hist = fit(model, synthetic_batches("copy", batch_size=32, seed=0, **TASK),
               TrainConfig(steps=60, warmup=10, seed=0, log_every=20), progress=False)
    assert [r["step"] for r in hist] == list(range(1, 61))
    assert all(math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 and r["tokens"] > 0 for r in hist)
    assert hist[-1]["loss"] < 0.6 * hist[0]["loss"]
    assert hist[0]["lr"] == pytest.approx(noam_rate(1, 16, 10)) and hist[9]["lr"] == pytest.approx(noam_rate(10, 16, 10))
    assert not model.training


def test_fit_on_step_can_stop_early():
    hist = fit(small_model(), synthetic_batches("copy", batch_size=8, **TASK), TrainConfig(steps=50, warmup=5),
               on_step=lambda step, rec: step == 7, progress=False)
    assert len(hist) == 7


def test_gradient_accumulation_equals_one_big_batch_and_steps_the_scheduler_once():
    small = synthetic_batches("copy", batch_size=8, seed=2, **TASK)

    def combined(step, micro):
        assert micro == 0
        parts = [small(step, m) for m in range(3)]
        return Batch(torch.cat([p.src for p in parts]), torch.cat([p.tgt for p in parts]))

    # adam_eps=1e-4: the key biases' true gradient is 0 and Adam with eps=1e-9 would blow their float
    # rounding noise (different summation order) up to full steps (see the appendix Training at scale)
    cfg = dict(steps=5, warmup=3, seed=0, clip=0.0, adam_eps=1e-4)
    a, b = small_model(dropout=0.0), small_model(dropout=0.0)
    ha = fit(a, small, TrainConfig(**cfg, accum=3), progress=False)
    hb = fit(b, combined, TrainConfig(**cfg, accum=1), progress=False)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-5), n
    assert [r["loss"] for r in ha] == pytest.approx([r["loss"] for r in hb], rel=1e-5)
    assert [r["lr"] for r in ha] == [r["lr"] for r in hb] == [noam_rate(s, 16, 3) for s in range(1, 6)]
    assert [r["tokens"] for r in ha] == [r["tokens"] for r in hb]


def test_fit_refuses_bad_config():
    with pytest.raises(ValueError, match="amp=True needs a CUDA device"):
        fit(small_model(), synthetic_batches("copy", batch_size=4, **TASK), TrainConfig(steps=1, amp=True), progress=False)
    with pytest.raises(ValueError, match="accum must be >= 1"):
        fit(small_model(), synthetic_batches("copy", batch_size=4, **TASK), TrainConfig(steps=1, accum=0), progress=False)
    cfg = TrainConfig(steps=3, warmup=1)
    cfg.log_every = 0                      # changed after construction: fit checks again
    with pytest.raises(ValueError, match="TrainConfig.log_every must be >= 1, got log_every=0"):
        fit(small_model(), synthetic_batches("copy", batch_size=4, **TASK), cfg, progress=False)
    only_pad = lambda step, micro: Batch(torch.tensor([[3, 2]]), torch.tensor([[1, 0]]))
    with pytest.raises(ValueError, match="no non-padding target tokens"):
        fit(small_model(), only_pad, TrainConfig(steps=1), progress=False)


@pytest.mark.parametrize("field, value", [
    ("log_every", 0), ("log_every", -3), ("ckpt_every", -1), ("steps", -1), ("warmup", 0), ("accum", 0),
    ("smoothing", 1.0), ("smoothing", float("nan")), ("clip", -0.5), ("adam_eps", 0.0), ("factor", 0.0),
])
def test_train_config_refuses_values_fit_cannot_run_with(field, value):
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field} must be .*got {field}={re.escape(repr(value))}"):
        TrainConfig(**{field: value})


# --------------------------------------------------------------------------- checkpoints
def _opt_sched(model):
    opt = torch.optim.Adam(model.parameters(), lr=1.0)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, NoamSchedule(16, 5))


def test_checkpoint_round_trip_is_identical(tmp_path):
    model = small_model()
    data = synthetic_batches("copy", batch_size=8, **TASK)
    path = tmp_path / "sub" / "run.pt"
    fit(model, data, TrainConfig(steps=6, warmup=5), ckpt_path=path, progress=False)
    state = torch.load(path, weights_only=True)
    assert state["step"] == 6 and len(state["history"]) == 6
    fresh = small_model(seed=1)
    opt, sched = _opt_sched(fresh)
    loaded = load_checkpoint(path, fresh, opt, sched)
    for k, v in model.state_dict().items():
        assert torch.equal(v, fresh.state_dict()[k]), k
    assert sched.last_epoch == 6 and opt.param_groups[0]["lr"] == pytest.approx(noam_rate(7, 16, 5))
    saved_opt = state["optimizer"]["state"]
    for i, s in opt.state_dict()["state"].items():
        assert torch.equal(s["exp_avg"], saved_opt[i]["exp_avg"]) and torch.equal(s["exp_avg_sq"], saved_opt[i]["exp_avg_sq"])
    assert loaded["fingerprint"]["model"]["d_model"] == 16
    assert [p.name for p in path.parent.iterdir()] == ["run.pt"]          # no temporary file left behind


def test_checkpoint_is_written_atomically(tmp_path, monkeypatch):
    model = small_model()
    opt, sched = _opt_sched(model)
    path = tmp_path / "run.pt"
    save_checkpoint(path, model, opt, sched, step=1, fingerprint={"a": 1})
    before = path.read_bytes()

    def crash(obj, f, *a, **k):
        if hasattr(f, "write"):
            f.write(b"half a checkpoint")
        else:
            Path(f).write_bytes(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match=f"could not write checkpoint {re.escape(str(path))}: No space left") as info:
        save_checkpoint(path, model, opt, sched, step=2, fingerprint={"a": 1})
    assert info.value.errno == errno.ENOSPC                                # callers can still tell disk full apart
    assert path.read_bytes() == before                                     # the old checkpoint is intact
    assert [p.name for p in tmp_path.iterdir()] == ["run.pt"]              # and no temporary file is left
    monkeypatch.undo()
    assert load_checkpoint(path, small_model())["step"] == 1


def test_checkpoint_is_fsynced_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    model = small_model()
    opt, sched = _opt_sched(model)
    path = tmp_path / "run.pt"
    events, real_fsync, real_replace = [], os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.path.isdir(f"/proc/self/fd/{fd}")
                                                                 if os.path.exists("/proc/self/fd") else None)),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", Path(b).name)), real_replace(a, b))[1])
    save_checkpoint(path, model, opt, sched, step=1, fingerprint={})
    assert events[:2] == [("fsync", False), ("replace", "run.pt")]        # the file's bytes, then the rename
    if os.name == "posix":
        assert events[2:] == [("fsync", True)]                              # then the folder that holds the name
    assert oct(path.stat().st_mode & 0o777) == oct(0o666 & ~_current_umask())  # not mkstemp's 0600


def _current_umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_resuming_gives_the_same_losses_as_not_stopping(tmp_path):
    data = synthetic_batches("reverse", batch_size=8, seed=0, **TASK)
    cfg = TrainConfig(steps=16, warmup=5, seed=0, ckpt_every=5)
    straight = fit(small_model(dropout=0.2), data, cfg, progress=False)
    fit(small_model(dropout=0.2), data, TrainConfig(**{**cfg.__dict__, "steps": 8}), ckpt_path=tmp_path / "c.pt",
        progress=False)
    assert torch.load(tmp_path / "c.pt", weights_only=True)["step"] == 8
    resumed_model = small_model(seed=7, dropout=0.2)
    resumed = fit(resumed_model, data, cfg, ckpt_path=tmp_path / "c.pt", resume=True, progress=False)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    assert [r["lr"] for r in resumed] == [r["lr"] for r in straight]
    # and resuming without a checkpoint on disk simply starts from scratch
    fresh = fit(small_model(dropout=0.2), data, cfg, ckpt_path=tmp_path / "none.pt", resume=True, progress=False)
    assert [r["loss"] for r in fresh] == [r["loss"] for r in straight]


def test_checkpoint_from_another_configuration_is_refused(tmp_path):
    data = synthetic_batches("copy", batch_size=8, **TASK)
    fit(small_model(), data, TrainConfig(steps=2, warmup=5), ckpt_path=tmp_path / "c.pt", progress=False)
    with pytest.raises(ValueError, match=r"another configuration(.|\n)*model.d_model: checkpoint has 16, this run has 32"):
        fit(small_model(d_model=32), data, TrainConfig(steps=4, warmup=5), ckpt_path=tmp_path / "c.pt", resume=True,
            progress=False)
    with pytest.raises(ValueError, match=r"train.smoothing: checkpoint has 0.1, this run has 0.0"):
        fit(small_model(), data, TrainConfig(steps=4, warmup=5, smoothing=0.0), ckpt_path=tmp_path / "c.pt",
            resume=True, progress=False)
    # the run length may change on resume
    fit(small_model(), data, TrainConfig(steps=4, warmup=5), ckpt_path=tmp_path / "c.pt", resume=True, progress=False)
    (tmp_path / "junk.pt").write_bytes(b"")
    torch.save({"hello": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a checkpoint written by"):
        load_checkpoint(tmp_path / "other.pt", small_model())


# --------------------------------------------------------------------------- the entry point, one and two processes
BAD_ARGS = [
    (["--log-every", "0"], "--log-every: must be >= 1, got 0"),
    (["--ckpt-every", "-1"], "--ckpt-every: must be >= 0"),
    (["--steps", "-2"], "--steps: must be >= 0, got -2"),
    (["--batch-size", "0"], "--batch-size: must be >= 1"),
    (["--vocab", "3"], "--vocab: must be >= 4"),
    (["--min-len", "0"], "--min-len: must be >= 1"),
    (["--min-len", "6"], r"--max-len: must be >= --min-len \(6\), got 5"),
    (["--N", "0"], "--N: must be >= 1"),
    (["--d-model", "0"], "--d-model: must be >= 1"),
    (["--d-ff", "0"], "--d-ff: must be >= 1"),
    (["--h", "3"], r"--h: must be >= 1 and divide --d-model \(16\), got 3"),
    (["--dropout", "1"], r"--dropout: must be in \[0, 1\), got 1.0"),
    (["--warmup", "0"], "--warmup: must be >= 1"),
    (["--factor", "nan"], "--factor: must be a positive number, got nan"),
    (["--smoothing", "-0.1"], r"--smoothing: must be in \[0, 1\)"),
    (["--clip", "-1"], "--clip: must be >= 0"),
    (["--adam-eps", "0"], "--adam-eps: must be a positive number"),
    (["--accum", "0"], "--accum: must be >= 1"),
    (["--resume"], "--resume: needs --ckpt"),
]


@pytest.mark.parametrize("extra, message", BAD_ARGS, ids=[" ".join(a) for a, _ in BAD_ARGS])
def test_train_main_reports_bad_numbers_as_usage_errors(extra, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        train_main(ARGS + ["--save-params", str(tmp_path / "p.pt")] + extra)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m annotated_transformer.train") and "Traceback" not in err
    assert re.search(message, err), err
    assert not (tmp_path / "p.pt").exists()                                # nothing ran


ARGS = ["--task", "copy", "--steps", "3", "--batch-size", "8", "--dropout", "0", "--warmup", "2", "--N", "1",
        "--adam-eps", "1e-4",  # see test_gradient_accumulation_...: eps=1e-9 amplifies the key biases' rounding noise
        "--d-model", "16", "--d-ff", "32", "--h", "2", "--max-len", "5", "--vocab", "9", "--quiet"]


def test_train_main_single_process(tmp_path):
    out = train_main(ARGS + ["--save-params", str(tmp_path / "p.pt"), "--ckpt", str(tmp_path / "c.pt")])
    assert out["world_size"] == 1 and len(out["history"]) == 3 and 0.0 <= out["exact_match"] <= 1.0
    assert (tmp_path / "p.pt").exists() and torch.load(tmp_path / "c.pt", weights_only=True)["step"] == 3


def test_two_processes_equal_one_process_on_the_combined_batch(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "annotated_transformer.train", *ARGS, "--save-params", str(tmp_path / "two.pt")],
                         capture_output=True, text=True, env=env, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "processes=2" in two.stdout
    one = subprocess.run([sys.executable, "-m", "annotated_transformer.train", *ARGS, "--save-params",
                          str(tmp_path / "one.pt")], capture_output=True, text=True, env=env, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    p2, p1 = torch.load(tmp_path / "two.pt"), torch.load(tmp_path / "one.pt")
    start = small_model(dropout=0.0).state_dict()
    assert any(not torch.equal(p1[k], start[k]) for k in p1)                # training moved the parameters
    for k in p1:
        assert torch.allclose(p2[k], p1[k], atol=1e-5), k


def test_fit_reads_the_loss_back_once_per_log_line_not_once_per_step(monkeypatch):
    """Each read of a device tensor is a GPU sync: fit keeps the losses on the device and reads them in one
    go at each log line (here every 5 of 10 steps), never with .item()."""
    batches = synthetic_batches("copy", batch_size=8, seed=1, **TASK)
    prepared = [batches(step, 0) for step in range(10)]          # built (and checked) on the host up front
    reads, items = [], []
    real_tolist, real_item = torch.Tensor.tolist, torch.Tensor.item

    def from_fit():  # PyTorch's own CPU-side counters (Adam's step) are not ours to count
        return sys._getframe(2).f_code.co_filename.endswith(os.path.join("annotated_transformer", "train.py"))

    def counting_item(self):
        if from_fit():
            items.append(self)
        return real_item(self)

    def counting_tolist(self):
        if from_fit() and self.is_floating_point():
            reads.append(self.numel())
        return real_tolist(self)

    monkeypatch.setattr(torch.Tensor, "item", counting_item)
    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    history = fit(small_model(), lambda step, micro: prepared[step], TrainConfig(steps=10, warmup=5, log_every=5),
                  progress=False)
    monkeypatch.undo()
    assert reads == [5, 5] and items == []                            # two reads of five losses each
    assert [r["step"] for r in history] == list(range(1, 11)) and all(math.isfinite(r["loss"]) for r in history)


def test_atomic_save_is_what_both_checkpoint_writers_use(tmp_path, monkeypatch):
    """save_checkpoint and translation.save_translator share one atomic writer; its errors name the file."""
    import annotated_transformer.checkpoint as checkpoint_module
    from annotated_transformer.checkpoint import atomic_save

    path = atomic_save({"x": torch.arange(3)}, tmp_path / "sub" / "obj.pt", "thing")
    assert torch.equal(torch.load(path)["x"], torch.arange(3))
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OSError, match=r"could not write thing .*file/obj\.pt"):
        atomic_save({"x": 1}, blocker / "obj.pt", "thing")
    calls = []
    monkeypatch.setattr(checkpoint_module, "atomic_save", lambda obj, p, what="file": calls.append(what) or Path(p))
    import annotated_transformer.translation as translation
    monkeypatch.setattr(translation, "atomic_save", lambda obj, p, what="file": calls.append(what) or Path(p))
    model = small_model()
    checkpoint_module.save_checkpoint(tmp_path / "c.pt", model, torch.optim.Adam(model.parameters()),
                                      torch.optim.lr_scheduler.LambdaLR(torch.optim.Adam(model.parameters()),
                                                                        lambda s: 1.0),
                                      0, {})
    translation.save_translator(tmp_path / "t.pt", model)
    assert calls == ["checkpoint", "translator"]
    assert not list(tmp_path.rglob("*.tmp"))


def test_fingerprint_differences_name_each_nested_field():
    saved = {"model": {"d_model": 16, "N": 1}, "train": {"betas": (0.9, 0.98)}, "data": {"task": "copy"}}
    assert fingerprint_differences(saved, saved) == []
    assert fingerprint_differences(saved, {**saved, "train": {"betas": [0.9, 0.98]}}) == []   # a list read back from JSON
    now = {"model": {"d_model": 32, "N": 1}, "train": {"betas": (0.9, 0.98)}, "data": {"task": "copy", "vocab": 9}}
    assert fingerprint_differences(saved, now) == [
        "data.vocab: checkpoint has '(missing)', this run has 9",
        "model.d_model: checkpoint has 16, this run has 32",
    ]


def test_modules_keep_to_their_concern():
    """train holds the recipe and the loop, checkpoint the files: checkpoint needs nothing from train."""
    import ast

    import annotated_transformer.checkpoint as checkpoint_module
    import annotated_transformer.train as train_module

    imports = {node.module for node in ast.walk(ast.parse(Path(checkpoint_module.__file__).read_text()))
               if isinstance(node, ast.ImportFrom)}
    assert not any(m and m.startswith("annotated_transformer") for m in imports), imports
    assert not set(train_module.__all__) & set(checkpoint_module.__all__)
    assert train_module.save_checkpoint is checkpoint_module.save_checkpoint   # fit writes through checkpoint
