"""Where a question's time to first token goes on an indexed document (GPU), in-process,
8B shape with random weights, side by side in one run:
  - questions of lengths not seen before against lengths seen before, with the prefill's
    attention as it dispatches now (a split-key Triton kernel over the context, the
    varlen flash kernel over the question itself) and as it was (cuDNN's fused attention
    for both, which builds a plan for every new shape);
  - a second document's first question (a new context length);
  - the attention call alone on new and seen shapes, the kernel against cuDNN;
  - a profile of a question of a new length and of a seen one.

    python -m benchmarks.question_prefill --contexts 32768 131072

A user's questions differ in length and every document has its own, so the TTFT of a
shape seen before is the benchmark's, and that of a new shape is the user's.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from benchmarks.decode_speed import random_ids, save, shaped_model, top_operations
from icecache import Engine, SamplingParams
from icecache.internals import attention_lse, cudnn_for_every_shape, prefix_attention_lse

LENGTHS = [20, 20, 23, 31, 20, 47, 23, 58, 31, 64]  # question tokens, in order asked


def timed(fn, *args) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn(*args)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def cudnn(q, k, v, scaling: float):
    """cuDNN's fused attention as attention_lse called it before the split-key kernel:
    a KV head's rows as one sequence."""
    Hq, T, D = q.shape
    H = k.shape[0]
    return torch.ops.aten._scaled_dot_product_cudnn_attention(q.reshape(H, Hq // H * T, D)[None], k[None], v[None],
                                                              None, True, 0.0, False, False, scale=scaling)


def attention_shapes(n: int, H: int, g: int, D: int) -> list[dict]:
    """Attention over n context keys for question rows of a few token counts (the last two
    are a pack of 16 and of 64 questions): attention_lse as it dispatches now (first call of
    each shape, then again) and, side by side, the split-key kernel and cuDNN on a shape
    each has seen before (median of 5)."""
    k = torch.randn(H, n, D, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    rows = []
    for T in (17, 29, 17, 41, 320, 1280):
        q = torch.randn(H * g, T, D, dtype=torch.bfloat16, device="cuda")
        row = {"context": n, "tokens": T, "rows_per_kv_head": g * T,
               "first_s": timed(attention_lse, q, k, v, False, D ** -0.5),
               "again_s": timed(attention_lse, q, k, v, False, D ** -0.5)}
        for name, fn in (("kernel", prefix_attention_lse), ("cudnn", cudnn)):
            fn(q, k, v, D ** -0.5)
            row[f"{name}_s"] = statistics.median(timed(fn, q, k, v, D ** -0.5) for _ in range(5))
        rows.append(row)
    return rows


def profile_question(eng: Engine, ctx, ids: list[int], top: int) -> dict:
    from torch.profiler import ProfilerActivity, profile
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        out = eng.generate(ids, params, context=ctx)
    return {"ttft_s": out.stats["ttft_s"], **top_operations(prof, top)}


def ask_all(eng: Engine, ctx, lengths: list[int], vocab: int, gen: torch.Generator) -> dict:
    """Questions of `lengths` tokens in turn on ctx: TTFT of each, p50 over new and seen lengths."""
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    seen, questions = set(), []
    for length in lengths:
        out = eng.generate(random_ids(length, vocab, gen), params, context=ctx)
        questions.append({"tokens": length, "new_length": length not in seen, "ttft_s": out.stats["ttft_s"],
                          "prefill_pass_s": out.stats["prefill_pass_s"]})
        seen.add(length)
    return {"questions": questions,
            "ttft_new_length_p50_s": statistics.median(q["ttft_s"] for q in questions if q["new_length"]),
            "ttft_seen_length_p50_s": statistics.median(q["ttft_s"] for q in questions if not q["new_length"])}


def run(eng: Engine, n: int, vocab: int, top: int) -> dict:
    gen = torch.Generator().manual_seed(n)
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    ctx = eng.index(random_ids(n, vocab, gen))
    eng.generate(random_ids(19, vocab, gen), params, context=ctx)  # the process's first question (compiles)
    report = {"context_tokens": n, **ask_all(eng, ctx, LENGTHS, vocab, gen)}
    # the same with the attention as it was (cuDNN for every shape), on lengths new to it
    with cudnn_for_every_shape():
        report["cudnn"] = ask_all(eng, ctx, [t + 1 for t in LENGTHS], vocab, gen)
    other = eng.index(random_ids(n + 100, vocab, gen))  # another document: a new context length
    again = [eng.generate(random_ids(20, vocab, gen), params, context=other).stats["ttft_s"] for _ in range(2)]
    report.update({"other_document_ttft_s": again,
                   "profile_new_length": profile_question(eng, other, random_ids(37, vocab, gen), top),
                   "profile_seen_length": profile_question(eng, other, random_ids(37, vocab, gen), top)})
    print(f"{n} tokens: TTFT p50 new length {report['ttft_new_length_p50_s'] * 1e3:.0f} ms, seen length "
          f"{report['ttft_seen_length_p50_s'] * 1e3:.0f} ms (cuDNN for every shape: "
          f"{report['cudnn']['ttft_new_length_p50_s'] * 1e3:.0f} / {report['cudnn']['ttft_seen_length_p50_s'] * 1e3:.0f}"
          f" ms); another document's first question {again[0] * 1e3:.0f} ms, then {again[1] * 1e3:.0f} ms")
    for q, c in zip(report["questions"], report["cudnn"]["questions"]):
        print(f"  {q['tokens']:>3} tokens {'new ' if q['new_length'] else 'seen'}: TTFT {q['ttft_s'] * 1e3:.0f} ms"
              f" (cuDNN: {c['ttft_s'] * 1e3:.0f} ms)")
    for name in ("profile_new_length", "profile_seen_length"):
        p = report[name]
        print(f"  {name}: TTFT {p['ttft_s'] * 1e3:.0f} ms; self CPU top:")
        for row in p["by_cpu"][:12]:
            print(f"    {row['self_cpu_ms']:8.1f} ms CPU {row['self_device_ms']:7.1f} ms GPU x{row['calls']:<5} "
                  f"{row['name'][:90]}")
        print("   self GPU top:")
        for row in p["by_device"][:8]:
            print(f"    {row['self_device_ms']:8.1f} ms GPU x{row['calls']:<5} {row['name'][:90]}")
    del ctx, other
    torch.cuda.empty_cache()
    return report


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = [f"{r['context_tokens'] // 1024}k" for r in report["runs"]]
    x = range(len(labels))
    bars = [("new length", lambda r: r["ttft_new_length_p50_s"]), ("seen length", lambda r: r["ttft_seen_length_p50_s"]),
            ("cuDNN, new length", lambda r: r["cudnn"]["ttft_new_length_p50_s"]),
            ("cuDNN, seen length", lambda r: r["cudnn"]["ttft_seen_length_p50_s"])]
    for i, (label, get) in enumerate(bars):
        ax.bar([j + (i - 1.5) * 0.2 for j in x], [get(r) * 1e3 for r in report["runs"]], 0.2, label=label)
    ax.set(xticks=list(x), xticklabels=labels, ylabel="TTFT p50 (ms)", title=f"{report['gpu']}: question TTFT")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--top", type=int, default=25, help="profile rows kept")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/question_prefill.json"))
    args = ap.parse_args(argv)
    vocab = 49152
    model = shaped_model("llama-3.1-8b", max(args.contexts) + 512, vocab)
    eng = Engine.from_model(model, model_id="llama-8b-shape")
    c = model.config
    H, D = c.num_key_value_heads, c.hidden_size // c.num_attention_heads
    g = c.num_attention_heads // H
    report = {"gpu": torch.cuda.get_device_name(), "attention": [], "runs": []}
    for n in args.contexts:
        report["attention"] += attention_shapes(n, H, g, D)
    for row in report["attention"]:
        print(f"attention over {row['context']} keys, {row['tokens']} tokens: attention_lse first "
              f"{row['first_s'] * 1e3:.1f} ms, again {row['again_s'] * 1e3:.2f} ms; kernel "
              f"{row['kernel_s'] * 1e3:.2f} ms, cuDNN {row['cudnn_s'] * 1e3:.2f} ms")
    for n in args.contexts:
        with torch.inference_mode():
            report["runs"].append(run(eng, n, vocab, args.top))
    save(report, args.out)
    plot(report, args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
