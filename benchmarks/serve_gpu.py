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

`--replica-rounds 1 2` (one GPU a replica; on a CPU, CPU replicas) then starts the app again
for each replica count and measures what replicas share on one node: one document indexed
once, questions on it until every replica has answered (each replica's TTFT, whether it
reused the node's copy), the node's stats (contexts, segments, prefills), and
`--replica-concurrency` questions over `--docs` documents (tokens/s, and its ratio to the
first count's). `--replicas-only` skips everything before them.
"""

from __future__ import annotations

import argparse
import collections
import gc
import math
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import yaml

from benchmarks.decode_speed import finish, run_hf, save, shaped_model
from icecache import Engine, IceCacheConfig, SamplingParams

QUESTION = "\nQuestion: what does the document say about its {n}th clause? Answer:"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def build_model(shape: str, device: torch.device, max_positions: int, vocab: int):
    if shape == "8b":
        return shaped_model("llama-3.1-8b", max_positions, vocab)
    from icecache.testing import random_model, tiny_config
    config = tiny_config("llama", vocab_size=vocab, max_position_embeddings=max_positions, num_hidden_layers=4)
    return random_model(config, device, torch.float32)


def document(n: int, seed: int, vocab: int) -> list[int]:
    return torch.randint(100, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def first_document(n: int, vocab: int) -> list[int]:
    """Another document of about n tokens, indexed before the timed one: not the same
    length, so the timed one still meets a shape of its own (its last chunk), as a user's does."""
    return document(n - 1000, n + 1, vocab)


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
def start_app(model_dir: Path, args, replicas: int = 1) -> str:
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    from deploy.app import build_app_with
    spec = yaml.safe_load(Path("deploy/app.yaml").read_text())
    app_spec = spec["applications"][0]
    app_args = {**app_spec["args"], "model": str(model_dir), "device": args.device, "cache_capacity": args.cache,
                "engine": engine_overrides(args),
                "max_batch": args.max_batch, "max_waiting": 1024, "burst_wait_s": args.burst_wait,
                "max_new_tokens": max(args.tokens, 64), "max_document_bytes": "64MiB", "tenant_secret": "bench"}
    gpus = math.ceil(replicas * args.gpus_per_replica) if args.device == "cuda" else 0
    if gpus:  # e.g. 0.5: two replicas on one GPU (the code path of N GPUs, on a machine of one)
        app_args["replica_gpus"] = args.gpus_per_replica
    llm = next(d for d in app_spec["deployments"] if d["name"] == "IceCacheLLM")
    options = {"num_replicas": replicas,
               "max_ongoing_requests": max(llm.get("max_ongoing_requests", 16), args.max_batch)}
    ray.init(num_gpus=gpus, include_dashboard=False, log_to_driver=True,
             object_store_memory=2 << 30)
    serve.start(grpc_options=gRPCOptions(port=args.port, grpc_servicer_functions=spec["grpc_options"][
        "grpc_servicer_functions"]), http_options={"host": "127.0.0.1", "port": args.port + 1})
    serve.run(build_app_with(app_args, llm_options=options), name=app_spec["name"],
              route_prefix=app_spec["route_prefix"])
    return f"localhost:{args.port}"


def ask(client, context_id: str, prompt: str, tokens: int) -> dict:
    """One streamed question, timed as the client sees it."""
    start = time.perf_counter()
    first = last = None
    stats = None
    for reply in client.generate(prompt, tokens, context_id=context_id, temperature=0.0, ignore_eos=True):
        now = time.perf_counter()
        if reply.WhichOneof("kind") == "text":
            first = first or now
            last = now
        else:
            stats = reply.stats
    if first is None:
        raise RuntimeError(f"the stream ended without text ({stats.output_tokens if stats else '?'} tokens)")
    n = stats.output_tokens
    return {"ttft_s": first - start, "tpot_s": (last - first) / max(1, n - 1), "tokens": n, "start": start,
            "end": last, "server_ttft_s": stats.ttft_s, "server_tpot_s": stats.tpot_s,
            "peak_batch": stats.peak_batch, "reused": stats.context_reused, "lease_s": stats.lease_s,
            "queue_s": stats.queue_s, "prefill_batch": stats.prefill_batch, "prefill_pass_s": stats.prefill_pass_s,
            "replica_id": stats.replica_id}


def concurrent(client, context_ids: list[str], n: int, tokens: int) -> dict:
    """n questions at once, spread round-robin over context_ids."""
    barrier = threading.Barrier(n)
    errors: list[str] = []

    def one(i: int):
        barrier.wait()
        try:
            return ask(client, context_ids[i % len(context_ids)], QUESTION.format(n=i), tokens)
        except Exception as e:  # reported, not hidden: the run records every failed stream
            errors.append(repr(e)[:300])
            return None

    with ThreadPoolExecutor(n) as pool:
        runs = [r for r in pool.map(one, range(n)) if r is not None]
    if not runs:
        return {"n": n, "errors": errors}
    wall = max(r["end"] for r in runs) - min(r["start"] for r in runs)
    ttft = [r["ttft_s"] for r in runs]
    return {"n": n, "docs": len(context_ids), "completed": len(runs), "errors": errors,
            "ttft_p50_s": statistics.median(ttft), "ttft_p99_s": percentile(ttft, 0.99),
            "server_ttft_p50_s": statistics.median(r["server_ttft_s"] for r in runs),
            "tpot_p50_s": statistics.median(r["tpot_s"] for r in runs),
            "tok_s": sum(r["tokens"] for r in runs) / wall, "peak_batch": max(r["peak_batch"] for r in runs),
            # where a first token's wait goes, server side: leasing the context, then waiting for
            # admission (the step in flight), then the prefill pass the question joined
            **{f"{k}_p50_s": statistics.median(r[f"{k}_s"] for r in runs) for k in ("lease", "queue", "prefill_pass")},
            "prefill_batches": sorted(r["prefill_batch"] for r in runs),
            "by_replica": dict(collections.Counter(r["replica_id"] for r in runs)),
            "queue_s": sorted(round(r["queue_s"], 4) for r in runs)}


def index_timed(index, doc: list[int], build_field: str = "index_build_s") -> tuple[object, dict]:
    """index(doc) -> (its result, {index_s, index_prefill_s, index_build_s}); the result (an
    IndexReply, or a Context with build_field "build_s") names its build time build_field."""
    start = time.perf_counter()
    result = index(doc)
    return result, {"index_s": time.perf_counter() - start, "index_prefill_s": result.prefill_s,
                    "index_build_s": getattr(result, build_field)}


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


def node_stats(client) -> list[dict]:
    fields = ("node_id", "contexts", "segments", "prefills", "leases", "hits", "misses", "bytes")
    return [{f: getattr(n, f) for f in fields} for n in client.stats().nodes]


def run_replicas(client, replicas: int, doc: list[int], docs: list[list[int]], tokens: int, concurrency: int,
                 max_questions: int = 40) -> dict:
    """One app of `replicas` replicas on one node: `doc` indexed once (by whichever replica
    the router picks), then questions on it one at a time until every replica has answered
    three (at most max_questions): each replica's TTFT and whether it reused the node's copy.
    Then `concurrency` questions over `docs` (a warm-up round first)."""
    reply, out = index_timed(client.index, doc)
    cid = reply.context_id
    answers: dict[str, list[dict]] = collections.defaultdict(list)
    for i in range(max_questions):
        r = ask(client, cid, QUESTION.format(n=i), tokens)
        answers[r["replica_id"]].append(r)
        if len(answers) >= replicas and all(len(a) >= 3 for a in answers.values()):
            break
    out["replicas"] = replicas
    out["questions_by_replica"] = {
        rid: {"n": len(a), "ttft_p50_s": statistics.median(r["ttft_s"] for r in a),
              # the replica's first read of the document: from shared memory, unless it indexed it
              "first_ttft_s": a[0]["ttft_s"],
              "server_ttft_p50_s": statistics.median(r["server_ttft_s"] for r in a),
              "tpot_p50_s": statistics.median(r["tpot_s"] for r in a), "reused": [r["reused"] for r in a]}
        for rid, a in answers.items()}
    out["replicas_answered"] = len(answers)
    out["node_stats_one_document"] = node_stats(client)  # one context, one segment, one prefill expected
    ids = [client.index(d).context_id for d in docs]
    concurrent(client, ids, concurrency, 4)  # warm-up: every replica's CUDA graph of this batch
    out["concurrent"] = concurrent(client, ids, concurrency, tokens)
    out["node_stats"] = node_stats(client)
    for c in [cid, *ids]:
        client.release(c)
    return out


def replica_rounds(args, vocab: int) -> list[dict]:
    """--replica-rounds: the app started once per replica count, run_replicas on each."""
    from ray import serve
    import ray

    from deploy.client import Client
    rounds = []
    doc = document(args.contexts[0], args.contexts[0], vocab)
    docs = [document(args.doc_tokens, 1000 + i, vocab) for i in range(max(1, args.docs))]
    for replicas in args.replica_rounds:
        t0 = time.perf_counter()
        address = start_app(args.model_dir, args, replicas)
        client = Client(address, timeout_s=900)
        try:
            out = run_replicas(client, replicas, doc, docs, args.tokens, args.replica_concurrency)
            out["app_start_s"] = time.perf_counter() - t0
            rounds.append(out)
            print(f"{replicas} replicas: {out}", flush=True)
        finally:
            client.close()
            serve.shutdown()
            ray.shutdown()
    first = rounds[0]["concurrent"].get("tok_s") if rounds else None
    for r in rounds:
        if first and "tok_s" in r["concurrent"]:
            r["tok_s_vs_first_round"] = r["concurrent"]["tok_s"] / first  # 2 replicas: >= 1.8 wanted
    return rounds


def engine_overrides(args) -> dict:
    """--engine name=value pairs as IceCacheConfig fields (ints where they parse)."""
    out = {}
    for pair in args.engine:
        name, _, value = pair.partition("=")
        out[name] = int(value) if value.lstrip("-").isdigit() else value
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
                      f"{c['ttft_p99_s'] * 1e3:.0f} ms, TPOT p50 {c['tpot_p50_s'] * 1e3:.1f} ms, {c['tok_s']:.0f} tok/s, "
                      f"{c['completed']}/{c['n']} done, errors {len(c['errors'])}")
        print("  ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in r["ratios"].items()))
    for r in report.get("replica_rounds", []):
        c = r["concurrent"]
        per = ", ".join(f"{rid[:8]}: {q['n']} answers, TTFT first {q['first_ttft_s'] * 1e3:.0f} ms, p50 "
                        f"{q['ttft_p50_s'] * 1e3:.0f} ms, reused "
                        f"{sum(q['reused'])}/{q['n']}" for rid, q in r["questions_by_replica"].items())
        print(f"  {r['replicas']} replica(s): {r['replicas_answered']} answered ({per}); "
              f"node {r['node_stats_one_document']}")
        if "tok_s" in c:
            print(f"    {c['n']} concurrent over {c['docs']} documents: {c['tok_s']:.0f} tok/s "
                  f"({r.get('tok_s_vs_first_round', 1.0):.2f}x the first round), "
                  f"TTFT p50 {c['ttft_p50_s'] * 1e3:.0f} ms, "
                  f"by replica {c['by_replica']}, errors {len(c['errors'])}")
    for c in report.get("multi_doc", []):
        if "ttft_p50_s" in c:
            print(f"  {c['n']} concurrent over {c['docs']} documents: TTFT p50 {c['ttft_p50_s'] * 1e3:.0f} ms, p99 "
                  f"{c['ttft_p99_s'] * 1e3:.0f} ms, {c['tok_s']:.0f} tok/s, {c['completed']}/{c['n']} done, "
                  f"errors {len(c['errors'])}")


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = report["runs"]
    labels = [f"{r['context_tokens'] // 1024}k" for r in runs]
    rounds = report.get("replica_rounds", [])
    panels = (3 if runs else 0) + (1 if rounds else 0)  # --replicas-only: the replicas' panel alone
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
    if rounds:
        done = [r for r in rounds if "tok_s" in r["concurrent"]]
        axes[-1].bar([str(r["replicas"]) for r in done], [r["concurrent"]["tok_s"] for r in done],
                     label=f"{done[0]['concurrent']['n']} questions over {done[0]['concurrent']['docs']} documents"
                     if done else None)
        axes[-1].set(title="replicas on one node", xlabel="replicas", ylabel="tokens/s")
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
    ap.add_argument("--index-chunks", type=int, nargs="*", default=[],
                    help="index_chunk_tokens values to time in-process on the first length")
    ap.add_argument("--replica-rounds", type=int, nargs="*", default=[],
                    help="replica counts to start the app with, one round each (e.g. 1 2: two GPUs)")
    ap.add_argument("--replica-concurrency", type=int, default=32, help="questions at once in a replica round")
    ap.add_argument("--replicas-only", action="store_true", help="only the replica rounds")
    ap.add_argument("--gpus-per-replica", type=float, default=1.0,
                    help="a replica's share of a GPU (0.5: two replicas on each GPU)")
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/icecache-bench-model"))
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
    max_positions = max(args.contexts + [args.doc_tokens]) + 1024
    model = build_model(args.shape, device, max_positions, len(tokenizer))
    vocab = min(len(tokenizer), model.config.vocab_size)
    t0 = time.perf_counter()
    model.save_pretrained(args.model_dir)
    tokenizer.save_pretrained(args.model_dir)
    print(f"model saved for the app in {time.perf_counter() - t0:.0f} s", flush=True)
    gpu = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    report = {"gpu": gpu, "shape": args.shape, "tokens": args.tokens, "args": {k: str(v) for k, v in vars(args).items()},
              "vocab_size": model.config.vocab_size, "runs": []}
    if args.replicas_only:
        del model
        gc.collect()
        report["replica_rounds"] = replica_rounds(args, vocab)
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
    if args.replica_rounds:
        report["replica_rounds"] = replica_rounds(args, vocab)
    finish(report, args.out, summarise, plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
