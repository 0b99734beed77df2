"""The Serve app as the served-path benchmarks drive it: started from deploy/app.yaml with
the benchmark's args, asked over gRPC with the project's client, and timed as a client sees it."""

from __future__ import annotations

import collections
import math
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import yaml

QUESTION = "\nQuestion: what does the document say about its {n}th clause? Answer:"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def document(n: int, seed: int, vocab: int) -> list[int]:
    return torch.randint(100, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def start_app(model_dir: Path, args, replicas: int | None = 1) -> str:
    """Start Ray and the app of deploy/app.yaml (its args overridden for the benchmark) with
    `replicas` model replicas, or None: as the yaml's autoscaling block scales it (its
    downscale delay shortened to --downscale-delay). -> the gRPC address."""
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    from deploy.app import build_app_with
    spec = yaml.safe_load(Path("deploy/app.yaml").read_text())
    app_spec = spec["applications"][0]
    app_args = {**app_spec["args"], "model": str(model_dir), "device": args.device, "cache_capacity": args.cache,
                "engine": engine_overrides(args),
                "max_batch": args.max_batch, "max_waiting": 1024, "burst_wait_s": args.burst_wait,
                "max_new_tokens": max(args.tokens, args.kill_tokens, 64), "max_document_bytes": "64MiB",
                "tenant_secret": "bench", **parse_pairs(args.app)}
    llm = next(d for d in app_spec["deployments"] if d["name"] == "IceCacheLLM")
    options = {"max_ongoing_requests": max(llm.get("max_ongoing_requests", 16), args.max_batch)}
    if replicas is None:
        options["autoscaling_config"] = {**llm["autoscaling_config"], "downscale_delay_s": args.downscale_delay}
        most = llm["autoscaling_config"]["max_replicas"]
    else:
        options["num_replicas"] = most = replicas
    gpus = math.ceil(most * args.gpus_per_replica) if args.device == "cuda" else 0
    if gpus:  # e.g. 0.5: two replicas on one GPU (the code path of N GPUs, on a machine of one)
        app_args["replica_gpus"] = args.gpus_per_replica
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
            "server_tpot_median_s": stats.tpot_median_s, "decode_pass_s": stats.decode_pass_s,
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
            # the replica's own time per token: above it, the client's is lost between them
            "server_tpot_p50_s": statistics.median(r["server_tpot_s"] for r in runs),
            # of that, its median and the decode pass: what is left between them is gaps (loads, recording, prefills)
            "server_tpot_median_p50_s": statistics.median(r["server_tpot_median_s"] for r in runs),
            "decode_pass_p50_s": statistics.median(r["decode_pass_s"] for r in runs),
            "tok_s": sum(r["tokens"] for r in runs) / wall, "peak_batch": max(r["peak_batch"] for r in runs),
            # where a first token's wait goes, server side: leasing the context, then waiting for
            # admission (the step in flight), then the prefill pass the question joined
            **{f"{k}_p50_s": statistics.median(r[f"{k}_s"] for r in runs) for k in ("lease", "queue", "prefill_pass")},
            "prefill_batches": sorted(r["prefill_batch"] for r in runs),
            "by_replica": dict(collections.Counter(r["replica_id"] for r in runs)),
            "queue_s": sorted(round(r["queue_s"], 4) for r in runs)}


def tpot_parts(c: dict) -> str:
    """A round's TPOT on the replica: mean / median / the decode pass (p50s over the requests;
    the median and the pass where the run recorded them)."""
    parts = [c["server_tpot_p50_s"], c.get("server_tpot_median_p50_s"), c.get("decode_pass_p50_s")]
    return " / ".join(f"{x * 1e3:.1f}" for x in parts if x is not None) + " ms"


def index_timed(index, doc: list[int], build_field: str = "index_build_s") -> tuple[object, dict]:
    """index(doc) -> (its result, {index_s, index_prefill_s, index_build_s}); the result (an
    IndexReply, or a Context with build_field "build_s") names its build time build_field."""
    start = time.perf_counter()
    result = index(doc)
    return result, {"index_s": time.perf_counter() - start, "index_prefill_s": result.prefill_s,
                    "index_build_s": getattr(result, build_field)}


def node_stats(client) -> list[dict]:
    fields = ("node_id", "contexts", "segments", "prefills", "leases", "hits", "misses", "bytes")
    return [{f: getattr(n, f) for f in fields} for n in client.stats().nodes]


def parse_pairs(pairs: list[str]) -> dict:
    """name=value pairs -> {name: value}, numbers where they parse."""
    out = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        try:
            out[name] = int(value)
        except ValueError:
            try:
                out[name] = float(value)
            except ValueError:
                out[name] = value
    return out


def engine_overrides(args) -> dict:
    """--engine name=value pairs as IceCacheConfig fields."""
    return parse_pairs(args.engine)
