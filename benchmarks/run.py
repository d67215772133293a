"""The benchmark suite: ours against what a user would pick instead, measured side by side in one run.

    python benchmarks/run.py --profile quick            # minutes on 2 CPU cores (the book's appendix)
    python benchmarks/run.py --profile full --device cuda

Writes one JSON file (default build/benchmarks/<device>-<profile>.json) with the machine, every
absolute figure and every ratio. Targets are recorded next to the ratios, never asserted: speed is
measured here, not in the tests.
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import bench, datasheet_peak, machine, matmul_peak_flops, peak_memory, time_once, write_json  # noqa: E402
from reference import RefTransformer  # noqa: E402

from annotated_transformer.attention import scaled_dot_product_attention  # noqa: E402
from annotated_transformer.model import make_masks, make_model, stacks_from_torch, use_fused_qkv  # noqa: E402

TARGETS = {"train_vs_torch": 1.0, "train_vs_reference": 2.0, "kv_cache_64": 3.0, "mfu": 0.5}

# name -> (N, d_model, d_ff, h, batch, seq)
CONFIGS = {
    "small": dict(N=2, d_model=256, d_ff=1024, h=4),
    "base": dict(N=6, d_model=512, d_ff=2048, h=8),
}
PROFILES = {
    # quick: about a minute on one core (what the test suite and the book build run)
    "quick": dict(configs={"small": (16, 32), "base": (2, 32)}, min_time=0.5, warmup=1,
                  attn_lengths=[128, 256, 512, 1024, 2048], decode_lengths=[64, 256], decode_batch=4,
                  decode_config="small"),
    "full": dict(configs={"small": (64, 64), "base": (32, 64)}, min_time=5.0, warmup=2,
                 attn_lengths=[128, 256, 512, 1024, 2048, 4096], decode_lengths=[64, 256], decode_batch=16,
                 decode_config="base"),
    # A GPU at the paper's scale: about 25 k target tokens per step (the paper's batches), bf16 autocast,
    # fused AdamW, and the decoders' CUDA-graph path. Too big for a CPU.
    "gpu": dict(configs={"small": (512, 64), "base": (512, 64)}, min_time=3.0,
                attn_lengths=[512, 1024, 2048, 4096], decode_lengths=[64, 256], decode_batch=16,
                decode_config="base", warmup=2),
}
VOCAB, PAD = 8000, 0


# --------------------------------------------------------------------------------------------------
# Three models with one architecture: torch.nn.Transformer wrapped with embeddings and a generator,
# ours with the same weights (stacks_from_torch), and the straightforward reference.


class TorchSeq2Seq(nn.Module):
    """torch.nn.Transformer with the embeddings, positions and generator the paper's model has."""

    def __init__(self, t: nn.Transformer, src_embed, tgt_embed, pe, generator):
        super().__init__()
        self.t, self.src_embed, self.tgt_embed, self.generator = t, src_embed, tgt_embed, generator
        self.register_buffer("pe", pe, persistent=False)
        self.scale = math.sqrt(t.d_model)
        self.drop = nn.Dropout(t.encoder.layers[0].dropout.p)

    def forward(self, src, tgt):
        s, n = src.shape[1], tgt.shape[1]
        x = self.drop(self.src_embed(src) * self.scale + self.pe[:s])
        y = self.drop(self.tgt_embed(tgt) * self.scale + self.pe[:n])
        causal = nn.Transformer.generate_square_subsequent_mask(n, device=src.device, dtype=torch.bool)
        out = self.t(x, y, tgt_mask=causal, src_key_padding_mask=src == PAD, tgt_key_padding_mask=tgt == PAD,
                     memory_key_padding_mask=src == PAD)  # True = masked: torch's convention
        return F.log_softmax(self.generator(out), dim=-1)


class Ours(nn.Module):
    """Our Transformer behind the same forward(src, tgt) as the other two; masks built per batch."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, src, tgt):
        src_mask, tgt_mask = make_masks(src, tgt, PAD)
        return self.model(src, tgt, src_mask, tgt_mask)


def three_models(cfg: dict, dropout: float = 0.1, seed: int = 0, compile: bool = False):
    torch.manual_seed(seed)
    ours = make_model(VOCAB, VOCAB, dropout=dropout, **cfg)
    t = nn.Transformer(cfg["d_model"], cfg["h"], cfg["N"], cfg["N"], cfg["d_ff"], dropout, batch_first=True)
    stacks = stacks_from_torch(t)  # ours gets torch's encoder/decoder weights, weight for weight
    ours.encoder, ours.decoder = stacks["encoder"], stacks["decoder"]
    theirs = TorchSeq2Seq(t, copy.deepcopy(ours.src_embed.lut), copy.deepcopy(ours.tgt_embed.lut),
                          ours.pos_encoding.pe[: 4096].clone().squeeze(0), copy.deepcopy(ours.generator.proj))
    ref = RefTransformer(VOCAB, VOCAB, dropout=dropout, **cfg)
    fused = use_fused_qkv(copy.deepcopy(ours))  # the opt-in path: one Q/K/V product in self-attention
    models = {"ours": Ours(ours), "torch": theirs, "reference": ref, "ours_fused_qkv": Ours(fused)}
    if compile:  # opt-in (--compile): torch.compile of our model, compiled during the warm-up steps
        models["ours_compiled"] = torch.compile(Ours(copy.deepcopy(ours)))
    return models


def make_batch(batch: int, seq: int, device, seed: int = 0):
    """Token ids with realistic padding: lengths between seq/2 and seq."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(1, VOCAB, (batch, seq), generator=g)
    tgt = torch.randint(1, VOCAB, (batch, seq + 1), generator=g)
    for row in range(batch):
        src[row, torch.randint(seq // 2, seq + 1, (1,), generator=g).item():] = PAD
        tgt[row, torch.randint(seq // 2, seq + 2, (1,), generator=g).item():] = PAD
    return src.to(device), tgt.to(device)


def train_step_fn(model, src, tgt, device, amp: bool):
    # The same optimizer for every model: fused (one kernel for all parameters) where the device has it.
    opt = torch.optim.Adam(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-9, fused=device.type == "cuda")
    tgt_in, tgt_y = tgt[:, :-1], tgt[:, 1:]

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logp = model(src, tgt_in)
        loss = F.nll_loss(logp.float().reshape(-1, logp.size(-1)), tgt_y.reshape(-1), ignore_index=PAD)
        loss.backward()
        opt.step()

    return step


def step_flops(step) -> int:
    """Model FLOPs of one training step (forward + backward), counted by PyTorch's FlopCounterMode."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops()


def bench_training(profile: dict, device, peak: dict, compile: bool = False) -> dict:
    out = {}
    amp = device.type == "cuda"
    for name, (batch, seq) in profile["configs"].items():
        cfg = CONFIGS[name]
        models = three_models(cfg, compile=compile)
        src, tgt = make_batch(batch, seq, device)
        tokens = int((src != PAD).sum() + (tgt[:, :-1] != PAD).sum())
        row = {"config": {**cfg, "batch": batch, "seq": seq, "tokens_per_step": tokens,
                          "dtype": "bf16 autocast" if amp else "fp32"}}
        steps = {}
        for label, model in models.items():
            model.to(device).train()
            steps[label] = train_step_fn(model, src, tgt, device, amp)
            for _ in range(profile["warmup"]):  # warm-up: allocator, Adam state (made by the first step)
                steps[label]()
        # Interleave the models, one step each per round, so that drift in the machine's speed (other
        # processes, clocks) lands on all of them alike; the median of each model's steps is reported.
        # A step is long enough that one call is one measurement (time_once synchronises CUDA).
        times = {label: [] for label in steps}
        while min(len(t) for t in times.values()) < 3 or sum(map(sum, times.values())) < profile["min_time"] * len(steps):
            for label, step in steps.items():
                times[label].append(time_once(step, device)[0])
            if len(times["ours"]) >= 50:
                break
        for label, model in models.items():
            median = sorted(times[label])[len(times[label]) // 2]
            row[label] = {"step_s": median, "tokens_per_s": tokens / median, "reps": len(times[label]),
                          "params": sum(p.numel() for p in model.parameters())}
        flops = step_flops(steps["ours"])
        sheet = datasheet_peak(torch.cuda.get_device_name(device) if device.type == "cuda" else None)
        for label in [m for m in ("ours", "torch", "ours_compiled") if m in row]:
            row[label]["flops_per_step"] = flops                    # one architecture: the same model FLOPs
            row[label]["mfu_measured_peak"] = flops / row[label]["step_s"] / peak["flops"]
            row[label]["mfu_datasheet"] = flops / row[label]["step_s"] / sheet["flops"] if sheet else None
        row["ours"]["mfu"] = row["ours"]["mfu_measured_peak"]     # the name the older records use
        for model in models.values():
            model.to("cpu")
        row["ratio_vs_torch"] = row["ours"]["tokens_per_s"] / row["torch"]["tokens_per_s"]
        row["ratio_vs_reference"] = row["ours"]["tokens_per_s"] / row["reference"]["tokens_per_s"]
        row["fused_qkv_vs_ours"] = row["ours_fused_qkv"]["tokens_per_s"] / row["ours"]["tokens_per_s"]
        if compile:
            row["compiled_vs_ours"] = row["ours_compiled"]["tokens_per_s"] / row["ours"]["tokens_per_s"]
            row["compiled_vs_torch"] = row["ours_compiled"]["tokens_per_s"] / row["torch"]["tokens_per_s"]
            print(f"train {name:5s}: opt-in torch.compile x{row['compiled_vs_ours']:.2f} vs ours eager", flush=True)
        out[name] = row
        print(f"train {name:5s}: ours {row['ours']['tokens_per_s']:8.0f} tok/s | torch "
              f"{row['torch']['tokens_per_s']:8.0f} | reference {row['reference']['tokens_per_s']:8.0f} | "
              f"x{row['ratio_vs_torch']:.2f} vs torch, x{row['ratio_vs_reference']:.2f} vs reference, "
              f"MFU {row['ours']['mfu']:.0%}; opt-in fused QKV x{row['fused_qkv_vs_ours']:.2f}", flush=True)
    return out


# --------------------------------------------------------------------------------------------------
# Attention alone: the explicit softmax(QK^T/sqrt(d_k))V (chapter 2, which returns the weights) and
# PyTorch's fused kernel (the path MultiHeadAttention takes when weights are not needed).


def bench_attention(profile: dict, device) -> dict:
    h, d_k, batch = 8, 64, 1
    rows = []
    for n in profile["attn_lengths"]:
        q, k, v = (torch.randn(batch, h, n, d_k, device=device) for _ in range(3))
        mask = torch.ones(n, n, dtype=torch.bool, device=device).tril()
        explicit = lambda: scaled_dot_product_attention(q, k, v, mask)  # noqa: E731
        fused = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
        row = {"n": n}
        for label, fn in (("explicit", explicit), ("fused", fused)):
            with torch.no_grad():
                t = bench(fn, device, min_time=min(profile["min_time"], 1.0), min_reps=2)
                mem = peak_memory(fn, device)
            row[label] = {"s": t["median_s"], "peak_bytes": mem}
        rows.append(row)
        print(f"attention n={n:5d}: explicit {row['explicit']['s'] * 1e3:8.2f} ms "
              f"{row['explicit']['peak_bytes'] / 2**20:8.1f} MiB | fused {row['fused']['s'] * 1e3:8.2f} ms "
              f"{row['fused']['peak_bytes'] / 2**20:8.1f} MiB", flush=True)
    fit = {}
    for label in ("explicit", "fused"):
        big = [r for r in rows if r["n"] >= 512]
        xs = torch.tensor([math.log(r["n"]) for r in big], dtype=torch.float64)
        for what in ("s", "peak_bytes"):
            ys = torch.tensor([math.log(max(r[label][what], 1e-12)) for r in big], dtype=torch.float64)
            slope = float(((xs - xs.mean()) * (ys - ys.mean())).sum() / ((xs - xs.mean()) ** 2).sum())
            fit[f"{label}_{'time' if what == 's' else 'memory'}_exponent"] = slope
    return {"h": h, "d_k": d_k, "batch": batch, "rows": rows, "loglog_fit_n_ge_512": fit}


# --------------------------------------------------------------------------------------------------
# Greedy decoding with and without the KV cache.


def bench_decoding(profile: dict, device) -> dict:
    from annotated_transformer.decoding import greedy_decode

    torch.manual_seed(0)
    cfg = CONFIGS[profile["decode_config"]]
    model = make_model(VOCAB, VOCAB, dropout=0.0, max_len=1024, **cfg).to(device).eval()
    bos, eos = 1, 2
    with torch.no_grad():
        model.generator.proj.bias[eos] = -1e9  # never stop early: decode the full length every time
    src, _ = make_batch(profile["decode_batch"], 32, device, seed=1)
    out = {}
    variants = {"cache": dict(use_cache=True), "no_cache": dict(use_cache=False)}
    if device.type == "cuda":  # the static cache captured as a CUDA graph, reading "done?" every 16 steps
        variants["cache_graph"] = dict(use_cache=True, cuda_graph=True, stop_check_every=16)
    with torch.no_grad():
        for kw in variants.values():  # warm up every path on a short run
            greedy_decode(model, src, 8, bos, eos, PAD, **kw)
    for n in profile["decode_lengths"]:
        row, tokens = {}, {}
        for label, kw in variants.items():
            times = []
            with torch.no_grad():
                # One run is long enough to time at these lengths (every path was warmed up above);
                # repeat only the fast ones. The first run's output is kept for same_tokens.
                while not times or (sum(times) < min(profile["min_time"], 1.0) and len(times) < 5):
                    seconds, decoded = time_once(lambda: greedy_decode(model, src, n, bos, eos, PAD, **kw), device)
                    times.append(seconds)
                    tokens.setdefault(label, decoded)
            s = sorted(times)[len(times) // 2]
            row[label] = {"s": s, "runs": len(times), "tokens_per_s": profile["decode_batch"] * n / s}
        row["same_tokens"] = all(torch.equal(tokens[label], tokens["no_cache"]) for label in variants)
        row["speedup"] = row["no_cache"]["s"] / row["cache"]["s"]
        if "cache_graph" in row:
            row["graph_speedup"] = row["no_cache"]["s"] / row["cache_graph"]["s"]
            print(f"greedy {n:4d} tokens: CUDA graph {row['cache_graph']['s']:.3f} s, x{row['graph_speedup']:.2f} "
                  f"vs no cache, {row['cache_graph']['tokens_per_s']:.0f} tok/s", flush=True)
        out[str(n)] = row
        print(f"greedy {n:4d} tokens: cache {row['cache']['s']:.2f} s, no cache {row['no_cache']['s']:.2f} s, "
              f"x{row['speedup']:.2f}, same tokens: {row['same_tokens']}", flush=True)
    return {"config": {**cfg, "name": profile["decode_config"], "batch": profile["decode_batch"], "src_len": 32}, "lengths": out}


def run(profile_name: str = "quick", device: str = "auto", parts=("peak", "train", "attention", "decode"),
        compile: bool = False) -> dict:
    from annotated_transformer.runtime import resolve_device

    device = resolve_device(device)
    profile = PROFILES[profile_name]
    torch.manual_seed(0)
    result = {"profile": profile_name, "device": str(device), "machine": machine(), "targets": TARGETS}
    start = time.perf_counter()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = matmul_peak_flops(device, dtype)
    result["matmul_peak"] = peak
    result["datasheet_peak"] = datasheet_peak(torch.cuda.get_device_name(device) if device.type == "cuda" else None)
    print(f"matmul peak ({peak['dtype']}, n={peak['size']}): {peak['flops'] / 1e9:.1f} GFLOP/s", flush=True)
    if "train" in parts:
        result["training"] = bench_training(profile, device, peak, compile)
    if "attention" in parts:
        result["attention"] = bench_attention(profile, device)
    if "decode" in parts:
        result["decoding"] = bench_decoding(profile, device)
    result["wall_s"] = time.perf_counter() - start
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", choices=sorted(PROFILES), default="quick")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--parts", default="train,attention,decode", help="comma-separated subset")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--compile", action="store_true", help="also time torch.compile of our model (opt-in)")
    args = p.parse_args(argv)
    result = run(args.profile, args.device, tuple(args.parts.split(",")), compile=args.compile)
    out = args.out or Path("build/benchmarks") / f"{result['device'].split(':')[0]}-{args.profile}.json"
    write_json(out, result)
    print(f"wrote {out} ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
