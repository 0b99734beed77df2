"""Decode throughput of many concurrent sessions on one GPU, side by side in one run.

    python benchmarks/throughput.py                      # 32k and 128k, 1..64 sessions
    python benchmarks/throughput.py --shape codestral-22b --contexts 16384 32768 --sessions 1 8 32

Model: Llama-3.1-8B shape (or --shape), random bf16 weights built on the GPU. Every
session asks its own question about one shared document (indexed once): N sessions decode
together in one batched step of the engine (StaticDecoder with N slots, one CUDA graph per batch
size), greedy, every step's next tokens read back to the host as a server must.

Compared at each context length and N:
  full, shared    mode="full": the document's whole KV on the GPU once, read once per
                  step for the whole batch (what a prefix-sharing full-KV server does)
  full, separate  mode="full", one KV copy per session (what N different documents, or a
                  server without prefix sharing, cost): as many as fit, in turn
  IceCache@256    pages in pinned host memory, read in place over PCIe; page selection
                  batched over (session, KV head)
  IceCache@256, device pages   the same with the document's pages copied to GPU memory
                  once for all sessions (a hot document's page cache)
Reported per row: output tokens/s, TPOT p50/p99 (one step of the batch), GPU memory held
for KV-side state and the peak. The question's prefill (TTFT) is not part of the figure:
each session's question KV is prefilled once and loaded into its slot. Writes JSON + PNG.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from benchmarks.decode_speed import GiB, add_shape_arg, finish, parse_gpu_args, random_ids, save, shaped_model
from icecache import Engine, IceCacheConfig
from icecache.internals import RequestKV, StaticDecoder


def measure(decoders: list[StaticDecoder], sessions: int, steps: int, first_token: int) -> dict:
    """Decode `steps` tokens for every session: each decoder steps its slots as one batch,
    decoders in turn. -> tokens/s and step times."""
    slots = [d.slots for d in decoders]
    tokens = [[first_token + i for i in range(n)] for n in slots]
    position = [decoders[0].context.num_tokens + 8] * max(slots)
    times = []
    for step in range(steps + 2):  # step 0 eager (warm-up), step 1 records the graphs
        torch.cuda.synchronize()
        t = time.perf_counter()
        for d, tok in zip(decoders, tokens):
            logits = d.step_batch(tok, position[:len(tok)], graph=True)
            tok[:] = logits.argmax(dim=-1).tolist()  # the host needs them to stream and sample
        times.append(time.perf_counter() - t)
        position = [p + 1 for p in position]
    steady = sorted(times[2:])
    p50 = statistics.median(steady)
    return {"sessions": sessions, "tokens_per_s": sessions / p50, "tpot_p50_s": p50,
            "tpot_p99_s": steady[min(len(steady) - 1, int(0.99 * len(steady)))]}


def run(eng: Engine, ctx, own_kv, sessions: int, steps: int, separate: bool, device_pages: bool = False) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    decoders = []
    try:
        with torch.inference_mode():
            for _ in range(sessions if separate else 1):
                d = StaticDecoder(eng.model, eng.config, ctx, slots=1 if separate else sessions,
                                  slot_tokens=8 + steps + 8, device_pages=device_pages)
                for slot in range(d.slots):
                    d.load(slot, own_kv, steps + 4)
                decoders.append(d)
            row = measure(decoders, sessions, steps, 100)
    except torch.OutOfMemoryError:
        return {"sessions": sessions, "fits": False}
    row["fits"] = True
    row["kv_gpu_gib"] = sum(d.device_bytes() for d in decoders) / GiB
    row["peak_gpu_gib"] = (torch.cuda.max_memory_allocated() - base) / GiB
    del decoders
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 16, 32, 64])
    ap.add_argument("--separate", type=int, nargs="+", default=[1, 2, 3, 4, 8, 12],
                    help="session counts for 'full, separate' (stops at the first that does not fit)")
    ap.add_argument("--steps", type=int, default=32, help="tokens each session decodes (after warm-up)")
    ap.add_argument("--budget", type=int, default=256)
    add_shape_arg(ap)
    args = parse_gpu_args(ap, argv, "throughput", plot)
    if args is None:
        return 0
    model = shaped_model(args.shape, max(args.contexts) + args.steps + 64)
    report = {"gpu": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
              "model": f"{args.shape} shape, random bf16", "shape": args.shape, "steps": args.steps,
              "budget": args.budget, "runs": []}
    gen = torch.Generator().manual_seed(0)
    full = Engine.from_model(model, config=IceCacheConfig(mode="full"), model_id=f"{args.shape}-random")
    sparse = full.with_config(IceCacheConfig(token_budget=args.budget))
    for n in args.contexts:
        ctx = full.index(random_ids(n, model.config.vocab_size, gen))
        with torch.inference_mode():
            req = RequestKV(sparse.shape, sparse.config, ctx)
            t = time.perf_counter()
            sparse.runner.prefill_one(req, list(range(11, 19)), ctx.num_tokens)  # the question, once
            question_s = time.perf_counter() - t
            own_kv = [(kv.k, kv.v) for kv in req.own]
        entry = {"context": n, "prefill_s": ctx.prefill_s, "index_build_s": ctx.build_s,
                 "question_prefill_s": question_s, "host_gib": ctx.host_bytes / GiB}
        print(f"[{n}] prefill {ctx.prefill_s:.1f}s, index {ctx.build_s:.1f}s, question {question_s:.2f}s")
        for name, eng, counts, separate in (("icecache", sparse, args.sessions, False),
                                            ("icecache_device_pages", sparse, args.sessions, False),
                                            ("full_shared", full, args.sessions, False),
                                            ("full_separate", full, args.separate, True)):
            entry[name] = []
            for sessions in counts:
                row = run(eng, ctx, own_kv, sessions, args.steps, separate, name == "icecache_device_pages")
                entry[name].append(row)
                print(f"[{n}] {name} x{sessions}: {row}", flush=True)
                if not row["fits"]:
                    break
        report["runs"].append(entry)
        del ctx, req, own_kv
        torch.cuda.empty_cache()
        save(report, args.out)  # partial results survive a timeout
    finish(report, args.out, summarise, plot)
    return 0


NAMES = ("icecache", "icecache_device_pages", "full_shared", "full_separate")


def best(rows: list[dict]) -> dict | None:
    fitting = [r for r in rows if r.get("fits")]
    return max(fitting, key=lambda r: r["tokens_per_s"]) if fitting else None


def summarise(report: dict) -> None:
    ratios = {}
    for entry in report["runs"]:
        r = ratios[entry["context"]] = {}
        for base in ("full_shared", "full_separate"):
            b = best(entry[base])
            r[f"{base}_best_tokens_per_s"] = b["tokens_per_s"] if b else None
            r[f"{base}_most_sessions"] = max((x["sessions"] for x in entry[base] if x.get("fits")), default=0)
        for name in ("icecache", "icecache_device_pages"):
            ice, one = best(entry[name]), entry[name][0]
            at32 = next((x for x in entry[name] if x["sessions"] == 32 and x.get("fits")), None)
            r[name] = {"best_tokens_per_s": ice["tokens_per_s"], "best_sessions": ice["sessions"],
                       "tpot_p50_32_over_1": at32["tpot_p50_s"] / one["tpot_p50_s"] if at32 else None}
            for base in ("full_shared", "full_separate"):
                if r[f"{base}_best_tokens_per_s"]:
                    r[name][f"over_{base}"] = ice["tokens_per_s"] / r[f"{base}_best_tokens_per_s"]
        print(f"\ncontext {entry['context']}: sessions | tokens/s | TPOT p50 / p99 ms | KV GiB")
        for name in NAMES:
            for x in entry[name]:
                if x.get("fits"):
                    print(f"  {name:>13} x{x['sessions']:>3} | {x['tokens_per_s']:>8.0f} | "
                          f"{x['tpot_p50_s'] * 1e3:6.1f} / {x['tpot_p99_s'] * 1e3:6.1f} | {x['kv_gpu_gib']:.2f}")
                else:
                    print(f"  {name:>13} x{x['sessions']:>3} | does not fit")
    report["ratios"] = ratios
    print(json.dumps(ratios, indent=1))


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = report["runs"]
    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 4), squeeze=False)
    for ax, entry in zip(axes[0], runs):
        for name in NAMES:
            rows = [r for r in entry[name] if r.get("fits")]
            ax.plot([r["sessions"] for r in rows], [r["tokens_per_s"] for r in rows], marker="o", label=name)
        ax.set(xlabel="concurrent sessions", ylabel="output tokens/s", xscale="log", yscale="log",
               title=f"{entry['context'] // 1024}k context, {report['gpu']}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
