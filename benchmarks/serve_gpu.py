"""The served path, through the real app, side by side with its alternatives, in one run.

    python benchmarks/serve_gpu.py --tokenizer .wt/tok                 # GPU: 32k and 128k, 8B shape
    python benchmarks/serve_gpu.py --tokenizer .wt/tok --shape tiny --device cpu \\
        --contexts 2048 --concurrency 1 4 --docs 2 --doc-tokens 1024   # a smoke run on a CPU

Model: Llama-3.1-8B shape with random bf16 weights (timing does not depend on weight
values) and the given tokenizer's vocabulary (so every generated id is text), saved once
so the app loads it like any model. Documents
are random token ids, sent as ids (no tokenisation in the timing); questions are text.
For each document length, in this order:
  (a) transformers, full KV (sdpa): a plain prefill of the document, and the cold answer
      (prefill of document + question, then decode) -- the user's alternative;
  (b) our engine in-process: Engine.index, a question on the indexed context (TTFT, TPOT),
      and 16 questions on it decoding together in one scheduler (tokens/s);
  (c) the Serve app (deploy/app.yaml's app, args overridden here), over gRPC with the
      project's client: IndexDocument, a question (TTFT, TPOT as the client sees them),
      then 1/4/16/64 concurrent questions on the document (a warm-up round of each first).
Then 16 and 64 concurrent questions spread over `--docs` documents. Ratios against the
design's budgets are printed and stored; JSON and a PNG go next to --out.

`--replica-rounds 1 2`, `--autoscale-round` and `--kill-round` (benchmarks/serve_replicas.py)
then start the app again with several replicas (one GPU each, or `--gpus-per-replica`; on a
CPU, CPU replicas) and measure what they share on one node, how the app scales and how it
survives a dead replica. `--replicas-only` skips everything before them.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from pathlib import Path

import torch

from benchmarks.decode_speed import finish, run_hf, save, shaped_model
from benchmarks.serve_app import (QUESTION, ask, concurrent, document, engine_overrides, index_timed, start_app,
                                  tpot_parts)
from benchmarks.serve_replicas import replica_rounds, summarise_rounds
from icecache import Engine, IceCacheConfig, SamplingParams

def build_model(shape: str, device: torch.device, max_positions: int, vocab: int):
    if shape == "8b":
        return shaped_model("llama-3.1-8b", max_positions, vocab)
    from icecache.testing import random_model, tiny_config
    config = tiny_config("llama", vocab_size=vocab, max_position_embeddings=max_positions, num_hidden_layers=4)
    return random_model(config, device, torch.float32)


def first_document(n: int, vocab: int) -> list[int]:
    """Another document of about n tokens, indexed before the timed one: not the same
    length, so the timed one still meets a shape of its own (its last chunk), as a user's does."""
    return document(n - 1000, n + 1, vocab)


def release_pinned_cache() -> None:
    """Give the pinned host blocks this process's contexts freed back to the OS. torch's
    pinned allocator keeps them for reuse: at 128k the in-process rounds' four documents
    left 45 GB of them, and the app's replica (48 GiB of shared memory) was then killed by
    the node's OOM guard (H100, 128 GiB host)."""
    empty = getattr(torch.accelerator, "empty_host_cache", None) or getattr(torch._C, "_host_emptyCache", None)
    if empty is not None:
        empty()
    kept = getattr(torch.cuda, "host_memory_stats", dict)().get("allocated_bytes.current", 0)
    print(f"pinned host memory torch keeps after releasing its cache: {kept / 2**30:.1f} GiB", flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------- (a) transformers
def hf_prefill_s(model, ids: list[int], device: torch.device) -> float:
    x = torch.tensor([ids], device=device)
    with torch.inference_mode():
        sync(device)
        start = time.perf_counter()
        model(x, use_cache=True, logits_to_keep=1)
        sync(device)
    return time.perf_counter() - start


def run_transformers(model, doc: list[int], question: list[int], tokens: int, device: torch.device) -> dict:
    impl = model.config._attn_implementation
    model.config._attn_implementation = "sdpa"  # the engine wrapping this model set its own
    try:
        hf_prefill_s(model, doc[:256], device)  # warm-up
        out = {"prefill_s": hf_prefill_s(model, doc, device)}
        if device.type == "cuda":
            out.update({f"cold_{k}": v for k, v in run_hf(model, doc + question, tokens).items()})
    finally:
        model.config._attn_implementation = impl
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


# ---------------------------------------------------------------- (b) in-process engine
def run_engine(eng: Engine, doc: list[int], tokens: int, sessions: int, chunks: list[int],
               first_doc: list[int]) -> dict:
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    out = {"index_by_chunk": {}}
    for chunk in chunks:  # the document's prefill pass size, compared (the last one's index is kept)
        chunked = eng.with_config(eng.config.replace(index_chunk_tokens=chunk))
        start = time.perf_counter()
        ctx = chunked.index(doc)
        out["index_by_chunk"][chunk] = {"index_s": time.perf_counter() - start, "prefill_s": ctx.prefill_s,
                                        "build_s": ctx.build_s}
        if chunk != chunks[-1]:
            del ctx
    ctx, out["first_document"] = index_timed(eng.index, first_doc, "build_s")  # as in run_serve
    del ctx
    ctx, timed = index_timed(eng.index, doc, "build_s")
    out.update(timed)
    first = eng.generate(QUESTION.format(n=0), params, context=ctx)
    out["first_ttft_s"], out["first_tpot_s"] = first.stats["ttft_s"], first.stats["tpot_s"]
    runs = [eng.generate(QUESTION.format(n=i), params, context=ctx).stats for i in range(1, 4)]
    out["ttft_s"] = statistics.median(r["ttft_s"] for r in runs)
    out["tpot_s"] = statistics.median(r["tpot_median_s"] for r in runs)
    # sessions on the document decoding together (what the Serve replica's scheduler does)
    sched = eng.scheduler(max_batch=sessions)
    for rnd in ("warmup", "timed"):
        start = time.perf_counter()
        seqs = [sched.submit(QUESTION.format(n=i), params, context=ctx) for i in range(sessions)]
        while sched.has_work:
            sched.step()
        wall = time.perf_counter() - start
        outs = [s.items[-1] for s in seqs]
        assert all(o.stats["output_tokens"] == tokens for o in outs), "a session ended early"
    out[f"batch{sessions}_tok_s"] = sessions * tokens / wall
    out[f"batch{sessions}_ttft_p50_s"] = statistics.median(o.stats["ttft_s"] for o in outs)
    del sched, ctx
    return out


# ---------------------------------------------------------------- (c) the Serve app
def run_serve(client, doc: list[int], tokens: int, levels: list[int], first_doc: list[int]) -> dict:
    # the replica's first document of this size pays one-time costs (attention plans for its
    # shapes); it is reported apart, and the timed document is the next one, as most are
    reply, first = index_timed(client.index, first_doc)
    client.release(reply.context_id)
    reply, out = index_timed(client.index, doc)
    out["first_document"] = first
    cid = reply.context_id
    out["first_question"] = ask(client, cid, QUESTION.format(n=0), tokens)
    singles = [ask(client, cid, QUESTION.format(n=i), tokens) for i in range(1, 4)]
    out["ttft_s"] = statistics.median(r["ttft_s"] for r in singles)
    out["tpot_s"] = statistics.median(r["tpot_s"] for r in singles)
    out["server_ttft_s"] = statistics.median(r["server_ttft_s"] for r in singles)
    out["concurrent"] = []
    for n in levels:
        concurrent(client, [cid], n, 4)  # warm-up: this batch size's CUDA graph
        out["concurrent"].append(concurrent(client, [cid], n, tokens))
    client.release(cid)
    return out


# ---------------------------------------------------------------- report
def summarise(report: dict) -> None:
    print(f"\n{report['gpu']}, {report['shape']} shape, {report['tokens']} new tokens per question")
    for r in report["runs"]:
        hf, eng, srv = r["transformers"], r["engine"], r["serve"]
        cold = hf.get("cold_ttft_s", hf["prefill_s"])
        one = srv["ttft_s"]
        c16 = next((c for c in srv["concurrent"] if c["n"] == 16), None)
        r["ratios"] = {
            "question_ttft_vs_hf_cold": one / cold,  # budget <= 0.1
            "index_vs_hf_prefill": srv["index_s"] / hf["prefill_s"],  # budget <= 1.5
            "first_index_vs_hf_prefill": srv["first_document"]["index_s"] / hf["prefill_s"],  # one-time costs too
            "serve_tpot_vs_engine": srv["tpot_s"] / eng["tpot_s"],  # budget <= 1.15
        }
        if c16 and "ttft_p50_s" in c16:
            r["ratios"]["ttft16_p50_vs_one"] = c16["ttft_p50_s"] / one  # budget <= 3
            r["ratios"]["tok_s16_vs_engine"] = c16["tok_s"] / eng["batch16_tok_s"]  # budget >= 0.7
        print(f"\n{r['context_tokens']} tokens")
        print(f"  transformers: prefill {hf['prefill_s']:.2f} s, cold TTFT {cold:.2f} s")
        print(f"  engine:       index {eng['index_s']:.2f} s, question TTFT {eng['ttft_s'] * 1e3:.0f} ms, "
              f"TPOT {eng['tpot_s'] * 1e3:.1f} ms, 16 sessions {eng['batch16_tok_s']:.0f} tok/s")
        print(f"  serve:        index {srv['index_s']:.2f} s (prefill {srv['index_prefill_s']:.2f}, build "
              f"{srv['index_build_s']:.2f}; the replica's first of this size {srv['first_document']['index_s']:.2f}),"
              f" question TTFT {one * 1e3:.0f} ms (first {srv['first_question']['ttft_s'] * 1e3:.0f}),"
              f" TPOT {srv['tpot_s'] * 1e3:.1f} ms")
        for c in srv["concurrent"]:
            if "ttft_p50_s" in c:
                print(f"    {c['n']:>3} concurrent: TTFT p50 {c['ttft_p50_s'] * 1e3:.0f} ms p99 "
                      f"{c['ttft_p99_s'] * 1e3:.0f} ms, TPOT p50 {c['tpot_p50_s'] * 1e3:.1f} ms "
                      f"(replica {tpot_parts(c)}), {c['tok_s']:.0f} tok/s, "
                      f"{c['completed']}/{c['n']} done, errors {len(c['errors'])}")
        print("  ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in r["ratios"].items()))
    summarise_rounds(report)
    for c in report.get("multi_doc", []):
        if "ttft_p50_s" in c:
            print(f"  {c['n']} concurrent over {c['docs']} documents: TTFT p50 {c['ttft_p50_s'] * 1e3:.0f} ms, p99 "
                  f"{c['ttft_p99_s'] * 1e3:.0f} ms, TPOT p50 {c['tpot_p50_s'] * 1e3:.1f} ms (replica {tpot_parts(c)}), "
                  f"{c['tok_s']:.0f} tok/s, {c['completed']}/{c['n']} done, errors {len(c['errors'])}")


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = report["runs"]
    labels = [f"{r['context_tokens'] // 1024}k" for r in runs]
    rounds, scaled = report.get("replica_rounds", []), report.get("autoscale")
    panels = (3 if runs else 0) + (1 if rounds else 0) + (1 if scaled else 0)  # --replicas-only: theirs alone
    fig, axes = plt.subplots(1, max(1, panels), figsize=(5 * max(1, panels), 4), squeeze=False)
    axes = list(axes[0])
    if runs:
        x = range(len(runs))
        w = 0.27
        for i, (name, get) in enumerate([("transformers cold", lambda r: r["transformers"].get(
                "cold_ttft_s", r["transformers"]["prefill_s"])), ("engine", lambda r: r["engine"]["ttft_s"]),
                                         ("serve", lambda r: r["serve"]["ttft_s"])]):
            axes[0].bar([j + (i - 1) * w for j in x], [get(r) for r in runs], w, label=name)
        axes[0].set(title="time to first token (s)", xticks=list(x), xticklabels=labels, yscale="log")
        for i, (name, get) in enumerate([("transformers prefill", lambda r: r["transformers"]["prefill_s"]),
                                         ("engine index", lambda r: r["engine"]["index_s"]),
                                         ("serve IndexDocument", lambda r: r["serve"]["index_s"])]):
            axes[1].bar([j + (i - 1) * w for j in x], [get(r) for r in runs], w, label=name)
        axes[1].set(title="a new document (s)", xticks=list(x), xticklabels=labels)
        for r, label in zip(runs, labels):
            cs = [c for c in r["serve"]["concurrent"] if "tok_s" in c]
            axes[2].plot([c["n"] for c in cs], [c["tok_s"] for c in cs], marker="o", label=f"serve {label}")
        axes[2].set(title="concurrent questions on one document", xlabel="streams", ylabel="tokens/s",
                    xscale="log")
    if scaled:
        t, n = zip(*scaled["timeline"]) if scaled["timeline"] else ((), ())
        axes[-1].step(t, n, where="post", label=f"{scaled['askers']} askers, {scaled['failed']} failed")
        axes[-1].axvline(scaled["load_s"], color="grey", linestyle=":", label="the load stops")
        axes[-1].set(title="autoscaling: replicas running", xlabel="s since the load began", ylabel="replicas",
                     yticks=range(0, 1 + max(n, default=1)))
    if rounds:
        done = [r for r in rounds if "tok_s" in r["concurrent"]]
        axes[-1 - bool(scaled)].bar([str(r["replicas"]) for r in done], [r["concurrent"]["tok_s"] for r in done],
                     label=f"{done[0]['concurrent']['n']} questions over {done[0]['concurrent']['docs']} documents"
                     if done else None)
        axes[-1 - bool(scaled)].set(title="replicas on one node", xlabel="replicas", ylabel="tokens/s")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(f"{report['gpu']}: the served path")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", type=Path, required=True, help="a tokenizer directory (e.g. SmolLM2's)")
    ap.add_argument("--shape", choices=("8b", "tiny"), default="8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per question")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    ap.add_argument("--docs", type=int, default=8, help="documents for the many-documents round (0 = skip)")
    ap.add_argument("--doc-tokens", type=int, default=16384, help="length of each of those documents")
    ap.add_argument("--multi-concurrency", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--max-batch", type=int, default=64, help="the replica scheduler's max_batch")
    ap.add_argument("--burst-wait", type=float, default=0.0, help="the app's burst_wait_s (seconds)")
    ap.add_argument("--cache", default="48GiB", help="the node cache's shared-memory capacity")
    ap.add_argument("--engine", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="IceCacheConfig fields for the engine and the app (e.g. index_chunk_tokens=8192)")
    ap.add_argument("--app", nargs="*", default=[], metavar="FIELD=VALUE",
                    help="the app's args (deploy/config.py AppArgs), e.g. warmup_tokens=0")
    ap.add_argument("--index-chunks", type=int, nargs="*", default=[],
                    help="index_chunk_tokens values to time in-process on the first length")
    ap.add_argument("--replica-rounds", type=int, nargs="*", default=[],
                    help="replica counts to start the app with, one round each (e.g. 1 2: two GPUs)")
    ap.add_argument("--replica-concurrency", type=int, default=32, help="questions at once in a replica round")
    ap.add_argument("--autoscale-round", action="store_true",
                    help="the app as app.yaml's autoscaling block scales it, under --replica-concurrency askers")
    ap.add_argument("--downscale-delay", type=float, default=30.0,
                    help="the autoscale round's downscale_delay_s (the yaml's 300 s would idle the run)")
    ap.add_argument("--autoscale-timeout", type=float, default=300.0,
                    help="the autoscale round's longest load before the added replica answers")
    ap.add_argument("--autoscale-hold", type=float, default=20.0,
                    help="seconds the autoscale round's load goes on once both replicas answer")
    ap.add_argument("--kill-round", action="store_true",
                    help="two replicas, streams on both, one replica killed mid-stream")
    ap.add_argument("--kill-tokens", type=int, default=256, help="tokens each stream of the kill round asks for")
    ap.add_argument("--replicas-only", action="store_true", help="only the replica, autoscale and kill rounds")
    ap.add_argument("--gpus-per-replica", type=float, default=1.0,
                    help="a replica's share of a GPU (0.5: two replicas on each GPU)")
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/icecache-bench-model"))
    ap.add_argument("--reuse-model", action="store_true",
                    help="with --replicas-only: serve the model a previous run saved in --model-dir")
    ap.add_argument("--port", type=int, default=9100)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/serve_gpu.json"))
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNG from an existing JSON")
    args = ap.parse_args(argv)
    if args.plot_only:
        import json
        plot(json.loads(args.out.read_text()), args.out.with_suffix(".png"))
        return 0
    device = torch.device(args.device)
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    report = {"gpu": gpu, "shape": args.shape, "tokens": args.tokens, "runs": [],
              "args": {k: str(v) for k, v in vars(args).items()}}
    if args.reuse_model:
        if not args.replicas_only:
            raise SystemExit("--reuse-model: only with --replicas-only (the other rounds run the model here)")
        from transformers import AutoConfig
        report["vocab_size"] = AutoConfig.from_pretrained(args.model_dir).vocab_size
        replica_rounds(args, min(len(tokenizer), report["vocab_size"]), report)
        finish(report, args.out, summarise, plot)
        return 0
    max_positions = max(args.contexts + [args.doc_tokens]) + 1024
    model = build_model(args.shape, device, max_positions, len(tokenizer))
    vocab = min(len(tokenizer), model.config.vocab_size)
    report["vocab_size"] = model.config.vocab_size
    t0 = time.perf_counter()
    model.save_pretrained(args.model_dir)
    tokenizer.save_pretrained(args.model_dir)
    print(f"model saved for the app in {time.perf_counter() - t0:.0f} s", flush=True)
    if args.replicas_only:
        del model
        gc.collect()
        if device.type == "cuda":  # this process's cached blocks would shrink the replicas' share
            torch.cuda.empty_cache()
        replica_rounds(args, vocab, report)
        finish(report, args.out, summarise, plot)
        return 0
    rows = {}
    config = IceCacheConfig(**{"token_budget": 256, **engine_overrides(args)})
    eng = Engine.from_model(model, tokenizer, config=config, model_id="bench")
    question = tokenizer(QUESTION.format(n=0), add_special_tokens=False).input_ids
    for n in args.contexts:
        doc = document(n, n, vocab)
        hf = run_transformers(model, doc, question, args.tokens, device)
        print(f"{n}: transformers {hf}", flush=True)
        engine = run_engine(eng, doc, args.tokens, 16, args.index_chunks if n == args.contexts[0] else [],
                            first_document(n, vocab))
        print(f"{n}: engine {engine}", flush=True)
        rows[n] = {"context_tokens": n, "transformers": hf, "engine": engine}
        if device.type == "cuda":
            torch.cuda.empty_cache()
    del eng, model
    gc.collect()  # the engine and model hold reference cycles: collect them before the app starts,
    if device.type == "cuda":  # or its replica (sharing this GPU) sizes its resident budget on less
        torch.cuda.empty_cache()
        release_pinned_cache()
        free, total = torch.cuda.mem_get_info(device)
        report["gpu_before_app"] = {"free_gib": free / 2**30, "total_gib": total / 2**30,
                                    "this_process_reserved_gib": torch.cuda.memory_reserved(device) / 2**30}
        print(f"GPU before the app: {report['gpu_before_app']}", flush=True)

    from deploy.client import Client
    t0 = time.perf_counter()
    address = start_app(args.model_dir, args)
    report["app_start_s"] = time.perf_counter() - t0
    print(f"app up in {report['app_start_s']:.0f} s", flush=True)
    client = Client(address, timeout_s=900)
    try:
        for n in args.contexts:
            rows[n]["serve"] = run_serve(client, document(n, n, vocab), args.tokens, args.concurrency,
                                         first_document(n, vocab))
            report["runs"].append(rows[n])
            save(report, args.out)  # partial results survive a timeout
            print(f"{n}: serve {rows[n]['serve']}", flush=True)
        if args.docs:
            ids = [client.index(document(args.doc_tokens, 1000 + i, vocab)).context_id for i in range(args.docs)]
            report["multi_doc"] = []
            for c in args.multi_concurrency:
                concurrent(client, ids, c, 4)  # warm-up
                report["multi_doc"].append(concurrent(client, ids, c, args.tokens))
            report["node_stats"] = [str(s).replace("\n", " ") for s in client.stats().nodes]
            for cid in ids:
                client.release(cid)
    finally:
        client.close()
        from ray import serve
        import ray
        serve.shutdown()
        ray.shutdown()
    replica_rounds(args, vocab, report)
    finish(report, args.out, summarise, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
