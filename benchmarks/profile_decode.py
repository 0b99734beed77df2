"""Where a static decode step's GPU time goes (GPU): kernel totals per step from the
profiler (eager, so kernels are attributed), next to the CUDA-graph TPOT of the same step.

    python benchmarks/profile_decode.py --context 32768 [--slots 32] [--variant share:head_pages=share]

--slots N profiles the batched step of N sessions on the context (StaticDecoder slots);
--variant profiles the same step with these IceCacheConfig fields after the default's.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks import accuracy
from benchmarks.decode_speed import shaped_model
from icecache import IceCacheConfig
from icecache.internals import StaticDecoder, build_context


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--mode", default="icecache")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--slots", type=int, default=1, help="sessions decoding together")
    ap.add_argument("--search-widths", type=int, nargs="+", default=[64],
                    help="tree-walk beams to profile in turn on the same index")
    accuracy.add_variant_option(ap, "also profile the step with these IceCacheConfig fields")
    args = ap.parse_args(argv)
    model = shaped_model("llama-3.1-8b", args.context + 256)
    c = model.config
    H, D, L = c.num_key_value_heads, c.hidden_size // c.num_attention_heads, c.num_hidden_layers
    config = IceCacheConfig(mode=args.mode, token_budget=args.budget)
    gen = torch.Generator(device="cuda").manual_seed(0)
    t = time.perf_counter()
    # keys with some cluster structure: a few hundred centres plus noise
    centres = torch.randn(H, 512, D, device="cuda", generator=gen)
    kv = []
    for _ in range(L):
        pick = torch.randint(0, 512, (H, args.context), device="cuda", generator=gen)
        k = (centres.gather(1, pick[..., None].expand(H, args.context, D)) +
             0.5 * torch.randn(H, args.context, D, device="cuda", generator=gen)).to(torch.bfloat16)
        kv.append((k, torch.randn_like(k)))
    ctx = build_context("x", list(range(args.context)), kv, torch.zeros(c.vocab_size), config, torch.device("cuda"))
    del kv
    print(f"context {args.context}: synthetic index built in {time.perf_counter() - t:.1f}s")
    for name, changes in [("default", {}), *args.variant]:
        for width in args.search_widths:
            print(f"--- {name}, search width {width}")
            profile_step(model, config.replace(search_width=width, **changes), ctx, args)
    return 0


def profile_step(model, config: IceCacheConfig, ctx, args) -> None:
    c = model.config
    H, D, L = c.num_key_value_heads, c.hidden_size // c.num_attention_heads, c.num_hidden_layers
    empty = torch.zeros(H, 0, D, dtype=torch.bfloat16, device="cuda")
    dec = StaticDecoder(model, config, ctx, slots=args.slots, slot_tokens=128)
    for slot in range(args.slots):
        dec.load(slot, [(empty, empty)] * L, 100)
    pos = args.context

    def step(pos: int) -> None:
        dec.step_batch([5 + i for i in range(args.slots)], [pos] * args.slots)

    for _ in range(3):
        step(pos)
        pos += 1
    torch.cuda.synchronize()
    steps = 3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step(pos)
            pos += 1
        torch.cuda.synchronize()
    events = prof.key_averages()
    total = sum(e.device_time_total for e in events) / steps / 1e3
    kernels = sum(e.count for e in events) / steps
    print(f"eager step: {total:.2f} ms of GPU kernel time, {kernels:.0f} kernels")
    print(events.table(sort_by="device_time_total", row_limit=args.top))
    dec.capture(args.slots)
    for _ in range(3):
        step(pos)
        pos += 1
    torch.cuda.synchronize()
    t = time.perf_counter()
    n = 20
    for _ in range(n):
        step(pos)
        pos += 1
    torch.cuda.synchronize()
    print(f"CUDA-graph step: {(time.perf_counter() - t) / n * 1e3:.2f} ms")


if __name__ == "__main__":
    raise SystemExit(main())
