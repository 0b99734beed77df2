"""Decode speed and GPU memory at long context, side by side in one run (GPU).

    python benchmarks/decode_speed.py                       # 16k..128k, budgets 256 and 1024
    python benchmarks/decode_speed.py --contexts 16384 131072 --budgets 256 --skip-hf --rerank 2 4
    python benchmarks/decode_speed.py --shape deepseek-r1-distill-qwen-7b --contexts 4096 8192 16384 --budgets 256

Model: Llama-3.1-8B shape (--shape: DeepSeek-R1-Distill-Qwen 1.5B/7B, Codestral-22B), random
bf16 weights built on the GPU (timing does not depend on weight values). For each context:
  (a) transformers `generate`, full KV (sdpa)          -- the usual way to serve it
  (b) our engine, mode="full" (same static decode path, all KV on the GPU)
  (c) our engine, IceCache at each budget (pages stay in pinned host memory)
Reported: TTFT, TPOT (median over the decoded tokens), peak GPU memory, GPU memory held
for KV-side state, and for (c) a per-token breakdown (index query, page gather, attention,
rest of the model). The weight-read floor is the model's bytes over the device copy
bandwidth measured in the same run. Writes JSON and a PNG next to it.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from benchmarks import accuracy
from icecache import Engine, IceCacheConfig, SamplingParams
from icecache.internals import RequestKV, StaticDecoder

GiB = 1 << 30


# Real models' shapes (their config.json), built with random weights: timing and memory
# depend on the shapes, not the values. name -> (architecture, config fields)
SHAPES = {
    "llama-3.1-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                   rope_theta=500000.0)),
    "deepseek-r1-distill-qwen-1.5b": ("qwen2", dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                                    num_attention_heads=12, num_key_value_heads=2,
                                                    vocab_size=151936, rope_theta=10000.0)),
    "deepseek-r1-distill-qwen-7b": ("qwen2", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                                  num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                                  rope_theta=10000.0)),
    "codestral-22b": ("mistral", dict(hidden_size=6144, intermediate_size=16384, num_hidden_layers=56,
                                      num_attention_heads=48, num_key_value_heads=8, vocab_size=32768,
                                      rope_theta=1000000.0, sliding_window=None)),
}


def shaped_model(shape: str, max_positions: int, vocab_size: int | None = None):
    """A model of SHAPES[shape] (its vocabulary resized to vocab_size, e.g. a real
    tokenizer's) with random bf16 weights, built on the GPU."""
    from transformers import AutoConfig, AutoModelForCausalLM
    arch, fields = SHAPES[shape]
    if vocab_size is not None:
        fields = {**fields, "vocab_size": vocab_size}
    config = AutoConfig.for_model(arch, **fields, max_position_embeddings=max_positions, tie_word_embeddings=False,
                                  attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    return model.eval()


def add_shape_arg(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.1-8b",
                    help="the model shape, built with random bf16 weights")


def random_ids(n: int, vocab_size: int, gen: torch.Generator) -> list[int]:
    """n random token ids of the vocabulary, clear of the special ids at its ends."""
    return torch.randint(100, vocab_size - 100, (n,), generator=gen).tolist()


def copy_bandwidth() -> float:
    """Bytes/s moved by a device-to-device copy (read + write)."""
    src = torch.empty(4 * GiB, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(5):
        dst.copy_(src)
    torch.cuda.synchronize()
    bw = 2 * src.numel() * 5 / (time.perf_counter() - start)
    del src, dst
    torch.cuda.empty_cache()
    return bw


class _Clock:
    """transformers streamer that timestamps each new token."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def run_hf(model, ids: list[int], tokens: int) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    clock = _Clock()
    input_ids = torch.tensor([ids], device="cuda")
    start = time.perf_counter()
    with torch.inference_mode():
        model.generate(input_ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, streamer=clock,
                       pad_token_id=0)
    torch.cuda.synchronize()
    steps = [b - a for a, b in zip(clock.times[1:], clock.times[2:])]  # times[0] is the prompt
    c = model.config
    kv = len(ids) * c.num_hidden_layers * 2 * c.num_key_value_heads * (c.hidden_size // c.num_attention_heads) * 2
    return {"ttft_s": clock.times[1] - start, "tpot_s": statistics.median(steps),
            "peak_gpu_gib": (torch.cuda.max_memory_allocated() - base) / GiB, "kv_gpu_gib": kv / GiB}


def cuda_time(fn, reps: int = 20) -> float:
    """GPU seconds of fn, captured as a CUDA graph like the decode step it is part of (so
    host launch overhead, which the real step does not pay, is not counted)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps / 1000


def top_operations(prof, top: int) -> dict:
    """A profile's operations with the most self time on the GPU and on the CPU, and its count of
    CPU operations (what a launch-bound pass pays for)."""
    events = prof.key_averages()
    rows = lambda evs: [{"name": e.key[:100], "calls": e.count,  # noqa: E731
                         "self_cpu_ms": e.self_cpu_time_total / 1e3,
                         "self_device_ms": getattr(e, "self_device_time_total", 0) / 1e3} for e in evs]
    by = lambda key: sorted(events, key=key, reverse=True)[:top]  # noqa: E731
    return {"cpu_operations": sum(e.count for e in events if e.device_type.name == "CPU"),
            "device_ms": sum(getattr(e, "self_device_time_total", 0) for e in events) / 1e3,
            "by_device": rows(by(lambda e: getattr(e, "self_device_time_total", 0))),
            "by_cpu": rows(by(lambda e: e.self_cpu_time_total))}


def run_engine(eng: Engine, ctx, tokens: int, breakdown: bool) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    question = [11, 12, 13, 14, 15, 16, 17, 18]
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    stream = eng.stream(question, params, context=ctx)
    for _ in stream:
        pass
    out = stream.output
    assert out.stats["output_tokens"] == tokens, out.stats
    result = {"ttft_s": out.stats["ttft_s"], "tpot_s": out.stats["tpot_s"], "tpot_median_s": out.stats["tpot_median_s"],
              "peak_gpu_gib": (torch.cuda.max_memory_allocated() - base) / GiB,
              "pages_selected_per_token": out.stats["pages_selected_per_token"]}
    # a decoder of our own, to size its state and time its parts in isolation
    with torch.inference_mode():
        req = RequestKV(eng.shape, eng.config, ctx.with_index_on(eng.device))
        eng.runner.prefill_one(req, question, ctx.num_tokens)
        dec = StaticDecoder(eng.model, eng.config, ctx.with_index_on(eng.device), [(kv.k, kv.v) for kv in req.own],
                            tokens, question_pages=req.question_pages, resident=eng.runner.resident)
        result["pages_from_resident_copy"] = dec.resident_rows
        result["kv_gpu_gib"] = dec.device_bytes() / GiB
        if breakdown:
            from icecache.internals import sparse_attention
            sparse, scratch = dec.sparse_states, dec.scratch
            H, D, G = eng.shape.num_kv_heads, eng.shape.head_dim, eng.shape.group
            q = torch.randn(H, G, D, device="cuda")
            scaling = D ** -0.5
            ids = [s.select(q, scaling) for s in sparse]
            none = torch.full_like(ids[0], -1)
            out = torch.empty(H, G, D, dtype=torch.bfloat16, device="cuda")

            def attention(page_ids):
                for s, i in zip(sparse, page_ids):
                    sparse_attention(q, s.sink_k, s.sink_v, i, s.rows_k, s.rows_v, s.shared_valid, s.priv_k[0],
                                     s.priv_v[0], s.priv_valid[0], s.win_k[0], s.win_v[0], s.ring.counts[:1], scaling,
                                     scratch, out, s.rows_at, s.rest)
            with_pages = cuda_time(lambda: attention(ids))
            without = cuda_time(lambda: attention([none] * len(sparse)))
            parts = {"index_query_s": cuda_time(lambda: [s.select(q, scaling) for s in sparse]),
                     "page_read_s": max(0.0, with_pages - without), "attention_s": without}
            parts["rest_of_model_s"] = max(0.0, result["tpot_median_s"] - sum(parts.values()))
            result["breakdown"] = parts
        del dec, req
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[16384, 32768, 65536, 131072])
    ap.add_argument("--budgets", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--reuse-layers", type=int, default=0,
                    help="also run IceCache-reuse with cycles of this many sparse layers (own index)")
    ap.add_argument("--rerank", type=int, nargs="*", default=[],
                    help="also run IceCache re-ranking this many of the bounds' candidates per retrieved page by "
                         "their keys, without question pages")
    ap.add_argument("--question-pages", type=int, nargs="*", default=[],
                    help="also run the default with this many question pages per KV head (decode reads them all "
                         "as re-ranking candidates at every step)")
    accuracy.add_variant_option(ap, "also run the default with these IceCacheConfig fields at every budget "
                                "(on the same context: no page, sink or window fields), e.g. rerank2:rerank=2")
    ap.add_argument("--bounds", action="store_true",
                    help="also run IceCache choosing pages by the bounds alone (no question pages, no re-ranking)")
    add_shape_arg(ap)
    args = parse_gpu_args(ap, argv, "decode_speed", plot)
    if args is None:
        return 0

    # the default with fields changed, each a row icecache_{budget}_{name}; --rerank, --question-pages and
    # --bounds name common ones
    variants = [(f"rerank{r}", dict(rerank=r, question_pages=0)) for r in args.rerank]
    variants += [(f"question{qp}", dict(question_pages=qp)) for qp in args.question_pages]
    variants += args.variant + ([("bounds", accuracy.VARIANTS["icecache_bounds"])] if args.bounds else [])
    bw = copy_bandwidth()
    model = shaped_model(args.shape, max(args.contexts) + args.tokens + 64)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    floor_s = weight_bytes / bw
    report = {"gpu": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
              "model": f"{args.shape} shape, random bf16", "shape": args.shape, "weight_gib": weight_bytes / GiB,
              "copy_bandwidth_gbs": bw / 1e9, "weight_read_floor_s": floor_s, "tokens": args.tokens, "runs": []}
    print(f"{report['gpu']}: weights {weight_bytes / GiB:.1f} GiB, copy {bw / 1e9:.0f} GB/s, "
          f"floor {floor_s * 1e3:.2f} ms/token")
    gen = torch.Generator().manual_seed(0)
    for n in args.contexts:
        ids = random_ids(n, model.config.vocab_size, gen)
        row = {"context": n}
        if not args.skip_hf:
            model.config._attn_implementation = "sdpa"
            row["hf_full"] = run_hf(model, ids, args.tokens)
            print(f"[{n}] (a) HF full: {row['hf_full']}")
        eng = Engine.from_model(model, config=IceCacheConfig(mode="full"), model_id=f"{args.shape}-random")
        t = time.perf_counter()
        ctx = eng.index(ids)
        row["prefill_s"], row["index_build_s"] = ctx.prefill_s, ctx.build_s
        row["index_wall_s"] = time.perf_counter() - t
        row["host_gib"] = ctx.host_bytes / GiB
        print(f"[{n}] prefill {ctx.prefill_s:.1f}s + index build {ctx.build_s:.1f}s, host {row['host_gib']:.1f} GiB")
        row["engine_full"] = run_engine(eng, ctx, args.tokens, breakdown=False)
        print(f"[{n}] (b) engine full: {row['engine_full']}")
        for budget in args.budgets:
            sparse = eng.with_config(IceCacheConfig(token_budget=budget))
            row[f"icecache_{budget}"] = run_engine(sparse, ctx, args.tokens, breakdown=True)
            print(f"[{n}] (c) IceCache@{budget}: {row[f'icecache_{budget}']}")
            for name, changes in variants:
                key = f"icecache_{budget}_{name}"
                row[key] = run_engine(eng.with_config(IceCacheConfig(token_budget=budget).replace(**changes)),
                                      ctx, args.tokens, breakdown=True)
                print(f"[{n}] IceCache@{budget}, {name} {changes}: {row[key]}")
        if args.reuse_layers > 1:  # its own context: followers are stored in their leader's page layout
            reuse_eng = eng.with_config(IceCacheConfig(reuse_layers=args.reuse_layers))
            t = time.perf_counter()
            reuse_ctx = reuse_eng.index(ids)
            row["reuse_index_build_s"], row["reuse_index_wall_s"] = reuse_ctx.build_s, time.perf_counter() - t
            for budget in args.budgets:
                key = f"icecache_{budget}_reuse{args.reuse_layers}"
                row[key] = run_engine(reuse_eng.with_config(IceCacheConfig(token_budget=budget,
                                                                           reuse_layers=args.reuse_layers)),
                                      reuse_ctx, args.tokens, breakdown=True)
                print(f"[{n}] (c') IceCache-reuse@{budget}: index build {reuse_ctx.build_s:.1f}s, {row[key]}")
            del reuse_ctx
        report["runs"].append(row)
        del ctx, eng
        torch.cuda.empty_cache()
        save(report, args.out)  # partial results survive a timeout
    finish(report, args.out, summarise, plot)
    return 0


def parse_gpu_args(ap: argparse.ArgumentParser, argv, name: str, plot) -> argparse.Namespace | None:
    """Add --out and --plot-only, parse; None once --plot-only has redrawn the PNG. A run
    needs a CUDA GPU."""
    ap.add_argument("--out", type=Path, default=Path(f"benchmarks/results/{name}.json"))
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNG from an existing JSON")
    args = ap.parse_args(argv)
    if args.plot_only:
        plot(json.loads(args.out.read_text()), args.out.with_suffix(".png"))
        return None
    if not torch.cuda.is_available():
        raise SystemExit(f"{name}.py needs a CUDA GPU")
    return args


def software() -> dict[str, str | None]:
    """The versions a GPU figure depends on (a kernel's registers, and so its speed, change
    with Triton's compiler: 3.6 spills where 3.9 does not)."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": triton_version}


def save(report: dict, out: Path) -> None:
    """Write the report as JSON (with the software it ran on)."""
    report.setdefault("software", software())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))


def finish(report: dict, out: Path, summarise, plot) -> None:
    """Print the summary (it adds the ratios to the report), write the JSON and the PNG next to it."""
    summarise(report)
    save(report, out)
    try:
        plot(report, out.with_suffix(".png"))
    except ImportError:
        print(f"matplotlib is missing here: draw the plot with --plot-only --out {out}")


def summarise(report: dict) -> None:
    runs, floor = report["runs"], report["weight_read_floor_s"]
    b = report["runs"][0]
    budgets = [k for k in b if k.startswith("icecache_")]
    ratios = {}
    for key in budgets:
        first, last = runs[0][key]["tpot_median_s"], runs[-1][key]["tpot_median_s"]
        ratios[key] = {"tpot_last_over_first": last / first, "tpot_last_over_floor": last / floor}
        if "hf_full" in runs[-1]:
            ratios[key]["hf_tpot_over_ours_at_last"] = runs[-1]["hf_full"]["tpot_s"] / last
    report["ratios"] = ratios
    print(f"\n{'context':>8} | {'HF full TPOT':>12} | {'ours full':>9} | " +
          " | ".join(f"{k:>13}" for k in budgets) + " | KV GiB: HF / ours full / " + " / ".join(budgets))
    for r in runs:
        hf = r.get("hf_full", {})
        print(f"{r['context']:>8} | {hf.get('tpot_s', float('nan')) * 1e3:>10.1f}ms | "
              f"{r['engine_full']['tpot_median_s'] * 1e3:>7.1f}ms | " +
              " | ".join(f"{r[k]['tpot_median_s'] * 1e3:>11.1f}ms" for k in budgets) +
              f" | {hf.get('kv_gpu_gib', float('nan')):.2f} / {r['engine_full']['kv_gpu_gib']:.2f} / " +
              " / ".join(f"{r[k]['kv_gpu_gib']:.2f}" for k in budgets))
    print(json.dumps(ratios, indent=1))


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = report["runs"]
    x = [r["context"] // 1024 for r in runs]
    keys = [k for k in runs[0] if k in ("hf_full", "engine_full") or k.startswith("icecache_")]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for k in keys:
        tpot = [r[k].get("tpot_median_s", r[k]["tpot_s"]) * 1e3 for r in runs]
        a1.plot(x, tpot, marker="o", label=k)
        a2.plot(x, [r[k]["kv_gpu_gib"] for r in runs], marker="o", label=k)
    a1.axhline(report["weight_read_floor_s"] * 1e3, ls="--", c="k", label="weight-read floor")
    a1.set(xlabel="context (k tokens)", ylabel="TPOT (ms)", title=f"decode, {report['gpu']}")
    a2.set(xlabel="context (k tokens)", ylabel="GPU GiB for KV-side state", yscale="log", title="KV memory")
    a1.legend(fontsize=7)
    a2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
