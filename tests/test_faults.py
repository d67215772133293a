"""Faults a long training run meets: a kill -9 mid-run, a kill -9 mid-checkpoint-write, a full disk, a
folder it may not write. The claims under test (the training chapter and the appendix Training at scale): a checkpoint on disk is
always a whole one, a failed save says which file and leaves the previous one intact with no
temporary file behind, and a run resumed after any kill ends with bit-identical weights.

The processes killed here are `python -m annotated_transformer.train` and `python -c` scripts over the
package: nothing that runs in a subprocess is defined in a notebook or in this file.
"""
import errno
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from annotated_transformer import checkpoint, train
from annotated_transformer.model import make_model

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

# A tiny synthetic task: ~3 s of interpreter start-up, then ~1.5 s of training on one core.
STEPS, EVERY = 120, 5
RUN = [sys.executable, "-m", "annotated_transformer.train", "--task", "copy", "--N", "1", "--d-model", "16",
       "--d-ff", "32", "--h", "2", "--vocab", "9", "--max-len", "5", "--batch-size", "16", "--warmup", "10",
       "--dropout", "0.1",  # dropout on: its masks must repeat after a resume too
       "--steps", str(STEPS), "--ckpt-every", str(EVERY), "--quiet"]


def _tiny():
    return make_model(9, 9, N=1, d_model=16, d_ff=32, h=2, dropout=0.1)


def _inode(path: Path):
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns


def _strays(folder: Path, name: str):
    """Everything in folder but the checkpoint itself: only hidden temporaries of save_checkpoint may be here."""
    others = sorted(p.name for p in folder.iterdir() if p.name != name)
    assert all(re.fullmatch(rf"\.{re.escape(name)}\..+\.tmp", o) for o in others), others
    return others


def _watch(proc: subprocess.Popen, ckpt: Path, n_new: int | None = None, timeout=120.0) -> list[float]:
    """Times at which a new checkpoint appeared at ckpt (os.replace gives it a new inode), until n_new
    of them have (or, with n_new=None, until the process ends)."""
    seen, times, end = _inode(ckpt), [], time.monotonic() + timeout
    while n_new is None or len(times) < n_new:
        if _inode(ckpt) not in (None, seen):
            seen = _inode(ckpt)
            times.append(time.monotonic())
        elif proc.poll() is not None:
            if n_new is None:
                break
            raise AssertionError(f"the run ended (rc={proc.returncode}) after {len(times)} of {n_new} checkpoints:\n"
                                 + proc.stderr.read()[-3000:])
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError(f"{len(times)} of {n_new} checkpoints at {ckpt} after {timeout} s")
        time.sleep(0.002)
    return times


def test_kill_9_during_training_then_resume_is_bit_identical(tmp_path):
    """Kill the run with SIGKILL at random moments (a seeded draw), resume it each time with --resume:
    at every kill the checkpoint on disk loads whole, and the final weights equal an uninterrupted run's."""
    # the uninterrupted run; its checkpoints' arrival times give the time between two checkpoints
    proc = subprocess.Popen(RUN + ["--ckpt", str(tmp_path / "ref.pt"), "--save-params", str(tmp_path / "want.pt")],
                            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    times = _watch(proc, tmp_path / "ref.pt")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    gap = sorted(b - a for a, b in zip(times, times[1:]))[len(times) // 2]     # median: robust to a busy CPU
    want = torch.load(tmp_path / "want.pt", weights_only=True)

    # A kill point: after n new checkpoints of the (resumed) run, then a fraction of a gap later: anywhere
    # in its training, at a speed-independent place. Each kill falls in the run the previous one resumed.
    run = tmp_path / "run"
    run.mkdir()
    ckpt, params = run / "ck.pt", tmp_path / "got.pt"
    rng = random.Random(15)
    step, kills = 0, []
    for left in (3, 2, 1):
        room = (STEPS - step) // EVERY - 1                     # checkpoints still to come, but the last
        n_new, frac = rng.randint(1, max(1, room // left)), rng.random()
        resume = ["--resume"] if step else []
        proc = subprocess.Popen(RUN + ["--ckpt", str(ckpt), "--save-params", str(params)] + resume,
                                env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        _watch(proc, ckpt, n_new)
        time.sleep(frac * gap)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL, "the run ended by itself before the kill"
        state = checkpoint.load_checkpoint(ckpt, _tiny())  # never partial: it loads, whole, at a checkpoint step
        assert state["step"] % EVERY == 0 and step < state["step"] <= STEPS and len(state["history"]) == state["step"]
        _strays(run, "ck.pt")
        step = state["step"]
        kills.append((step, n_new, round(frac, 2)))
    assert step < STEPS                                         # every kill fell in training

    final = subprocess.run(RUN + ["--ckpt", str(ckpt), "--save-params", str(params), "--resume"],
                           env=ENV, capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, final.stderr[-3000:]
    got = torch.load(params, weights_only=True)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), f"{k} differs after kills at (checkpoint step, n, frac) {kills}"
    assert final.stdout.split("steps=")[1] == out.split("steps=")[1]   # same final loss and exact match printed
    print(f"{len(kills)} kills at (checkpoint step on disk, new checkpoints, fraction of a gap): {kills}")


# --------------------------------------------------------------------------- kill -9 mid-write
# A model whose checkpoint is ~40 MB, so that a write takes most of the loop's time.
_BIG = "make_model(2000, 2000, N=1, d_model=256, d_ff=1024, h=4, dropout=0.0)"
_SAVER = textwrap.dedent(f"""
    import sys, torch
    from annotated_transformer.model import make_model
    from annotated_transformer.checkpoint import save_checkpoint
    from annotated_transformer.train import NoamSchedule
    torch.manual_seed(0)
    model = {_BIG}
    opt = torch.optim.Adam(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, NoamSchedule(256, 10))
    step = int(sys.argv[2])
    slow = sys.argv[3] == "slow"
    if slow:  # the next save stops half-way through its bytes and waits to be killed
        import io, time
        real_save = torch.save
        def half_then_wait(obj, f, *a, **k):
            buf = io.BytesIO()
            real_save(obj, buf, *a, **k)
            data = buf.getvalue()
            f = f if hasattr(f, "write") else open(f, "wb")
            f.write(data[: len(data) // 2]); f.flush()
            print("half-written", flush=True)
            time.sleep(120)
            f.write(data[len(data) // 2:])
        torch.save = half_then_wait
    while True:
        step += 1
        with torch.no_grad():
            next(model.parameters()).fill_(step)  # each checkpoint differs: its step is in its weights
        save_checkpoint(sys.argv[1], model, opt, sched, step=step, fingerprint={{"saver": 1}})
        print("saved", step, flush=True)
""")


def _saver(path: Path, start: int, mode: str = "loop") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _SAVER, str(path), str(start), mode], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _check_whole(path: Path, model, at_least: int) -> int:
    state = checkpoint.load_checkpoint(path, model, fingerprint={"saver": 1})
    step = state["step"]
    assert step >= at_least and torch.equal(next(model.parameters()), torch.full_like(next(model.parameters()), step))
    return step


def test_kill_9_during_checkpoint_writes_never_leaves_a_partial_checkpoint(tmp_path):
    path = tmp_path / "ck.pt"
    torch.manual_seed(0)
    model = eval(_BIG)
    rng = random.Random(15)
    step, mid_write = 0, 0
    for _ in range(4):                                  # kill a tight loop of saves at random moments
        strays_before = set(_strays(tmp_path, "ck.pt"))
        proc = _saver(path, step)
        saved = int(proc.stdout.readline().split()[1])  # one save done: the loop is writing the next
        time.sleep(rng.uniform(0.0, 0.25))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
        assert proc.returncode == -signal.SIGKILL
        mid_write += bool(set(_strays(tmp_path, "ck.pt")) - strays_before)  # a new temporary file: it hit a write
        step = _check_whole(path, model, at_least=saved)
    # and once exactly half-way through a write, so that this case is certain to have been exercised
    strays_before = set(_strays(tmp_path, "ck.pt"))
    proc = _saver(path, step, "slow")
    assert proc.stdout.readline().startswith("half-written")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert _check_whole(path, model, at_least=step) == step  # the previous checkpoint, intact
    half = [tmp_path / s for s in set(_strays(tmp_path, "ck.pt")) - strays_before]
    assert len(half) == 1 and 0 < half[0].stat().st_size < path.stat().st_size
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        checkpoint.load_checkpoint(half[0], model)            # a stray is never taken for a checkpoint...
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["ck.pt"]   # ...nor found by a *.pt pattern
    print(f"{4 + 1} kills, {mid_write + 1} of them mid-write")


# --------------------------------------------------------------------------- full disk, read-only folder
def _parts():
    torch.manual_seed(0)
    m = _tiny()
    opt = torch.optim.Adam(m.parameters(), lr=1.0)
    return m, opt, torch.optim.lr_scheduler.LambdaLR(opt, train.NoamSchedule(16, 5))


@pytest.fixture
def saved(tmp_path):
    """A folder holding one good checkpoint (step 1); returns (path, its bytes, model, optimizer, scheduler)."""
    m, opt, sched = _parts()
    path = checkpoint.save_checkpoint(tmp_path / "ck.pt", m, opt, sched, step=1, fingerprint={"a": 1})
    return path, path.read_bytes(), m, opt, sched


def _intact(path, before):
    assert path.read_bytes() == before
    assert checkpoint.load_checkpoint(path, _tiny())["step"] == 1
    assert [p.name for p in path.parent.iterdir()] == [path.name]          # no temporary file left


def test_disk_full_after_a_partial_write(saved, monkeypatch):
    path, before, m, opt, sched = saved

    def fill_the_disk(obj, f, *a, **k):
        f.write(b"\0" * 4096)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", fill_the_disk)
    with pytest.raises(OSError, match=rf"could not write checkpoint {re.escape(str(path))}: No space left") as info:
        checkpoint.save_checkpoint(path, m, opt, sched, step=2, fingerprint={"a": 1})
    assert info.value.errno == errno.ENOSPC and isinstance(info.value.__cause__, OSError)
    monkeypatch.undo()
    _intact(path, before)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_disk_full_as_the_kernel_reports_it(saved, monkeypatch):
    """The temporary file's descriptor is swapped for /dev/full, where every write fails with ENOSPC."""
    path, before, m, opt, sched = saved
    real_mkstemp = checkpoint.tempfile.mkstemp

    def mkstemp_on_a_full_disk(*a, **k):
        fd, name = real_mkstemp(*a, **k)
        full = os.open("/dev/full", os.O_WRONLY)
        os.dup2(full, fd)
        os.close(full)
        return fd, name

    monkeypatch.setattr(checkpoint.tempfile, "mkstemp", mkstemp_on_a_full_disk)
    with pytest.raises(OSError, match=rf"could not write checkpoint {re.escape(str(path))}") as info:
        checkpoint.save_checkpoint(path, m, opt, sched, step=2, fingerprint={"a": 1})
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    _intact(path, before)


def test_permission_denied_at_the_rename(saved, monkeypatch):
    """A folder that refuses the new name (what a read-only folder does; chmod cannot show it to root)."""
    path, before, m, opt, sched = saved

    def refuse(src, dst):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(dst))

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(PermissionError, match=rf"could not write checkpoint {re.escape(str(path))}: Permission denied"):
        checkpoint.save_checkpoint(path, m, opt, sched, step=2, fingerprint={"a": 1})
    monkeypatch.undo()
    _intact(path, before)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_read_only_folder(saved):
    path, before, m, opt, sched = saved
    folder = path.parent
    folder.chmod(0o500)
    try:
        probe = folder / "probe"
        try:
            probe.write_bytes(b"")
        except PermissionError:
            pass
        else:  # root (as in CI containers) writes anyway: the rename test above covers this case
            probe.unlink()
            pytest.skip("running as root: chmod does not stop writes")
        with pytest.raises(PermissionError, match=rf"could not write checkpoint {re.escape(str(path))}"):
            checkpoint.save_checkpoint(path, m, opt, sched, step=2, fingerprint={"a": 1})
    finally:
        folder.chmod(0o700)
    _intact(path, before)


def test_folder_that_is_a_file(tmp_path):
    m, opt, sched = _parts()
    (tmp_path / "runs").write_text("a file, not a folder")
    path = tmp_path / "runs" / "ck.pt"
    with pytest.raises(OSError, match=rf"could not write checkpoint {re.escape(str(path))}"):
        checkpoint.save_checkpoint(path, m, opt, sched, step=1, fingerprint={})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_an_error_that_is_not_io_still_removes_the_temporary_file(saved, monkeypatch):
    path, before, m, opt, sched = saved

    def interrupted(obj, f, *a, **k):
        f.write(b"\0" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save_checkpoint(path, m, opt, sched, step=2, fingerprint={"a": 1})
    monkeypatch.undo()
    _intact(path, before)
