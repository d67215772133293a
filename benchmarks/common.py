"""Shared helpers for the benchmark suite: timing, peak memory, the machine's measured matmul peak."""
from __future__ import annotations

import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils import benchmark


def machine() -> dict:
    """What the numbers were measured on (no hostnames)."""
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(fn, device: torch.device, *, min_time: float = 0.5, min_reps: int = 3, warmup: int = 1) -> dict:
    """Median wall time of fn(), by torch.utils.benchmark (it synchronises CUDA itself): blocks of calls
    until min_time seconds are filled, at least min_reps blocks."""
    for _ in range(warmup):
        fn()
    sync(device)
    timer = benchmark.Timer("fn()", globals={"fn": fn})
    m = timer.blocked_autorange(min_run_time=min_time)
    times = list(m.times)
    while len(times) < min_reps:  # slow calls: blocked_autorange may stop after one block
        times.append(time_once(fn, device)[0])
    return {"median_s": statistics.median(times), "min_s": min(times), "reps": len(times)}


def time_once(fn, device: torch.device) -> tuple[float, object]:
    """(seconds, result) of one call of fn(), CUDA synchronised before and after: for calls of a tenth of a
    second or more, where one call is a measurement. (torch.utils.benchmark's Timer.timeit(1) runs the
    statement twice more as warm-up, which triples the cost of timing a training step or a whole decode.)"""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


@contextlib.contextmanager
def quiet_stderr():
    """Silence file descriptor 2 for a moment: torch's profiler (Kineto) prints a start/stop line from C++
    on every run, which would otherwise fill notebook outputs."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory(fn, device: torch.device) -> int:
    """Peak bytes allocated while fn() runs: CUDA allocator stats on GPU, torch's CPU profiler on CPU."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Walk the allocation events in order to find the high-water mark of live tensor memory.
    events = sorted((e for e in prof.events() if e.cpu_memory_usage), key=lambda e: e.time_range.start)
    live = peak = 0
    for e in events:
        live += e.cpu_memory_usage
        peak = max(peak, live)
    return peak


def matmul_peak_flops(device: torch.device, dtype=torch.float32, n: int | None = None, min_time: float = 1.0) -> dict:
    """The machine's measured dense matmul throughput: the denominator of MFU, measured, not looked up."""
    sizes = [n] if n else ([1024, 2048] if device.type == "cpu" else [4096, 8192])
    best = {"flops": 0.0}
    for size in sizes:
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        t = bench(lambda: a @ b, device, min_time=min_time)
        flops = 2 * size**3 / t["median_s"]
        if flops > best["flops"]:
            best = {"flops": flops, "size": size, "dtype": str(dtype).replace("torch.", ""), **t}
    return best


# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, in FLOP/s. The SXM parts; a PCIe
# or NVL card is slower, so MFU against these is a lower bound there. Matched on the device name.
DATASHEET_BF16_PEAKS = {
    "H200": (989e12, "NVIDIA H200 Tensor Core GPU datasheet: BF16 1,979 TFLOPS with sparsity, 989 dense (SXM)"),
    "H100": (989e12, "NVIDIA H100 Tensor Core GPU datasheet: BF16 1,979 TFLOPS with sparsity, 989 dense (SXM)"),
    "A100": (312e12, "NVIDIA A100 Tensor Core GPU datasheet: BF16 312 TFLOPS dense"),
    "L40S": (362e12, "NVIDIA L40S datasheet: BF16 733 TFLOPS with sparsity, 362 dense"),
    "L4": (121e12, "NVIDIA L4 datasheet: BF16 242 TFLOPS with sparsity, 121 dense"),
}


def datasheet_peak(device_name: str | None) -> dict | None:
    """{"flops", "source", "gpu"} for a GPU whose datasheet bf16 dense peak is known, else None."""
    if not device_name:
        return None
    for key in sorted(DATASHEET_BF16_PEAKS, key=len, reverse=True):   # "L40S" before "L4"
        if key in device_name:
            flops, source = DATASHEET_BF16_PEAKS[key]
            return {"flops": flops, "source": source, "gpu": device_name}
    return None


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
