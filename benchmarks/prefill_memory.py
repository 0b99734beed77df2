"""Indexing a long document on one GPU with bounded memory (GPU): the exact prefill with
its KV kept on the device, against the same prefill with the KV in pinned host memory
(`IceCacheConfig(prefill_offload="host")`: every chunk reads the past back one layer at a
time), side by side in one run. Llama-3.1-8B shape, random bf16.

    python benchmarks/prefill_memory.py [--contexts 32768 131072]

For each: prefill and index-build seconds, peak GPU memory above the weights, and whether
the two contexts agree (last logits). JSON + PNG in benchmarks/results/.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.decode_speed import GiB, finish, parse_gpu_args, random_ids, shaped_model
from icecache import Engine, IceCacheConfig

MODES = ("device", "host")


def index_once(eng: Engine, ids: list[int]) -> tuple[dict, torch.Tensor]:
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    ctx = eng.index(ids)
    wall = time.perf_counter() - t
    row = {"prefill_s": ctx.prefill_s, "index_build_s": ctx.build_s, "wall_s": wall,
           "peak_gpu_above_weights_gib": (torch.cuda.max_memory_allocated() - base) / GiB,
           "host_gib": ctx.host_bytes / GiB}
    logits = ctx.last_logits.float()
    del ctx
    return row, logits


def summarise(report: dict) -> None:
    print(f"\n context | {'peak GiB above weights':>24} | {'prefill s':>17} | {'index build s':>17}")
    print(f"{'':>8} | {'device':>11} {'host':>12} | {'device':>8} {'host':>8} | {'device':>8} {'host':>8}")
    for r in report["runs"]:
        d, h = r["device"], r["host"]
        peak_d, peak_h = d["peak_gpu_above_weights_gib"], h["peak_gpu_above_weights_gib"]
        print(f"{r['context']:>8} | {peak_d:>11.2f} {peak_h:>12.2f} | "
              f"{d['prefill_s']:>8.1f} {h['prefill_s']:>8.1f} | {d['index_build_s']:>8.1f} {h['index_build_s']:>8.1f}")
        r["ratios"] = {"peak_host_over_device": h["peak_gpu_above_weights_gib"] / d["peak_gpu_above_weights_gib"],
                       "prefill_host_over_device": h["prefill_s"] / d["prefill_s"]}
    print({r["context"]: r["ratios"] for r in report["runs"]})


def plot(report: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = report["runs"]
    x = range(len(runs))
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for i, mode in enumerate(MODES):
        a1.bar([j + 0.4 * i for j in x], [r[mode]["peak_gpu_above_weights_gib"] for r in runs], 0.4,
               label=f"KV on {mode}")
        a2.bar([j + 0.4 * i for j in x], [r[mode]["prefill_s"] for r in runs], 0.4, label=f"prefill, KV on {mode}")
        a2.bar([j + 0.4 * i for j in x], [r[mode]["index_build_s"] for r in runs], 0.4,
               bottom=[r[mode]["prefill_s"] for r in runs], alpha=0.5, label=f"index build ({mode})")
    for a, label in ((a1, "peak GPU GiB above the weights"), (a2, "seconds")):
        a.set_xticks([j + 0.2 for j in x], [f"{r['context'] // 1024}k" for r in runs])
        a.set(xlabel="document tokens", ylabel=label)
        a.legend(fontsize=7)
    fig.suptitle(f"{report['model']} on {report['gpu']}, {report['date']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    args = parse_gpu_args(ap, argv, "prefill_memory", plot)
    if args is None:
        return 0
    model = shaped_model("llama-3.1-8b", max(args.contexts) + 64)
    report = {"gpu": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
              "model": "Llama-3.1-8B shape, random bf16", "runs": []}
    gen = torch.Generator().manual_seed(0)
    for n in args.contexts:
        ids = random_ids(n, model.config.vocab_size, gen)
        row, logits = {"context": n}, {}
        for mode in MODES:
            eng = Engine.from_model(model, config=IceCacheConfig(prefill_offload=mode), model_id="llama-8b-random")
            row[mode], logits[mode] = index_once(eng, ids)
            print(f"[{n}] KV on {mode}: {row[mode]}", flush=True)
        row["last_logits_max_abs_diff"] = float((logits["device"] - logits["host"]).abs().max())
        row["same_next_token"] = bool(logits["device"].argmax() == logits["host"].argmax())
        report["runs"].append(row)
    finish(report, args.out, summarise, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
