"""Does a training step or a decoding step wait for the GPU? Run them under
torch.cuda.set_sync_debug_mode("error"), which raises at any host synchronisation.

    python benchmarks/sync_check.py --device cuda    # the real check (a GPU)
    python benchmarks/sync_check.py --device cpu     # the same code path on a CPU: it runs, checks nothing

A sync in these loops stalls the CPU until the GPU drains its queue (no overlap of launches and kernels)
and splits torch.compile graphs. Setup (masks built from a host batch, the first step's allocations) runs
before the checked region, as it would in a training loop.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from annotated_transformer.decoding import KVCache, decode_step
from annotated_transformer.model import make_masks, make_model
from annotated_transformer.runtime import resolve_device
from annotated_transformer.train import LabelSmoothing, NoamSchedule


def check(name: str, fn, device) -> dict:
    fn()                                                  # the first call may allocate and sync: not checked
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
        fn()
        result = {"name": name, "host_syncs": "none"}
    except RuntimeError as err:
        result = {"name": name, "host_syncs": f"found: {err}"}
    finally:
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    print(f"{name}: {result['host_syncs']}", flush=True)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    a = p.parse_args(argv)
    device = resolve_device(a.device)
    torch.manual_seed(0)
    vocab = 1000
    model = make_model(vocab, vocab, N=2, d_model=128, d_ff=256, h=4, norm_first=True).to(device)
    g = torch.Generator().manual_seed(0)
    src, tgt = torch.randint(3, vocab, (8, 20), generator=g), torch.randint(3, vocab, (8, 21), generator=g)
    src[1, 15:], tgt[2, 12:] = 0, 0
    src, tgt = src.to(device), tgt.to(device)
    tgt_in, tgt_y = tgt[:, :-1], tgt[:, 1:]
    src_mask, tgt_mask = make_masks(src, tgt_in, 0)
    criterion = LabelSmoothing(vocab, pad_idx=0, smoothing=0.1)
    opt = torch.optim.Adam(model.parameters(), lr=1.0, betas=(0.9, 0.98), eps=1e-9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, NoamSchedule(128, 100))
    ntokens = int((tgt_y != 0).sum())                     # counted once, from the host batch

    def train_step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logp = model(src, tgt_in, src_mask, tgt_mask)
        loss = criterion(logp, tgt_y) / ntokens
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)

    model.eval()
    with torch.no_grad():
        memory = model.encode(src, src_mask[:, :, :, :])
    caches = []

    def decode_steps():
        with torch.no_grad():
            cache = KVCache(model, memory, capacity=8, static=True)
            token = torch.ones(src.size(0), dtype=torch.long, device=device)
            for _ in range(4):
                token = decode_step(model, token, cache, src_mask).argmax(-1)
            caches.append(cache)

    model.train()
    results = [check("training step (forward, loss, backward, clip, Adam, schedule)", train_step, device)]
    model.eval()
    results.append(check("cached greedy decoding steps (static KV cache)", decode_steps, device))
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"device": str(device), "torch": torch.__version__, "checks": results}, f, indent=2)
    return 0 if all(r["host_syncs"] == "none" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
