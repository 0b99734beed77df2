"""Replicas on one node sharing its indexed documents: the rounds of benchmarks/serve_gpu.py
that start the app afresh with several model replicas (one GPU each, or --gpus-per-replica).

  --replica-rounds 1 2  the app with 1, then 2 replicas: one document indexed once, asked until
                        every replica has answered (each one's TTFT, whether it reused the
                        node's copy; the node's contexts, segments, prefills), then
                        --replica-concurrency questions over --docs documents (tokens/s, and
                        its ratio to the first round's);
  --autoscale-round     the app as deploy/app.yaml's autoscaling block scales it (1 to 2
                        replicas), its downscale delay shortened to --downscale-delay:
                        --replica-concurrency askers keep questions coming until the added
                        replica has answered and --autoscale-hold seconds more, then stop;
                        the round waits for the app to come back to one replica. Failed
                        requests, tokens/s on one replica and on two;
  --kill-round          two replicas, --replica-concurrency long streams on one document; once
                        every stream has its first piece, one replica is killed (SIGKILL):
                        its streams must end UNAVAILABLE and the others finish, the document's
                        segment stays while leases remain, and no segment outlives the app.
"""

from __future__ import annotations

import collections
import os
import signal
import statistics
import threading
import time

from benchmarks.serve_app import QUESTION, ask, concurrent, document, index_timed, node_stats, start_app, tpot_parts

APP, LLM = "icecache", "IceCacheLLM"


def running_replicas() -> int:
    """The model deployment's replicas in state RUNNING."""
    from ray import serve
    app = serve.status().applications.get(APP)
    deployment = app.deployments.get(LLM) if app else None
    return deployment.replica_states.get("RUNNING", 0) if deployment else 0


def stop_app() -> None:
    from ray import serve
    import ray
    serve.shutdown()
    ray.shutdown()


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


def autoscale_round(args, docs: list[list[int]]) -> dict:
    """The app under load scales from one replica to two, then back when idle."""
    from deploy.client import Client
    t0 = time.perf_counter()
    address = start_app(args.model_dir, args, replicas=None)
    out = {"app_start_s": time.perf_counter() - t0, "downscale_delay_s": args.downscale_delay}
    client = Client(address, timeout_s=900)
    try:
        ids = [client.index(d).context_id for d in docs]
        stop, records, workers = threading.Event(), [], args.replica_concurrency

        def asker(i: int) -> None:
            n = i
            while not stop.is_set():
                try:
                    records.append({**ask(client, ids[n % len(ids)], QUESTION.format(n=n), args.tokens), "ok": True})
                except Exception as e:  # every failed request is counted and reported
                    records.append({"ok": False, "error": repr(e)[:300], "end": time.perf_counter()})
                n += workers

        start = time.perf_counter()
        threads = [threading.Thread(target=asker, args=(i,), daemon=True) for i in range(workers)]
        for t in threads:
            t.start()
        timeline, scaled_up_s, both_at = [], None, None
        while time.perf_counter() - start < args.autoscale_timeout:
            time.sleep(1.0)
            running = running_replicas()
            timeline.append((round(time.perf_counter() - start, 1), running))
            if running >= 2 and scaled_up_s is None:
                scaled_up_s = time.perf_counter() - start
            if both_at is None and len({r["replica_id"] for r in records if r["ok"]}) >= 2:
                both_at = time.perf_counter()
            if both_at is not None and time.perf_counter() - both_at >= args.autoscale_hold:
                break  # the load ran on both replicas long enough to time them
        stop.set()
        for t in threads:
            t.join(timeout=900)
        load_end = time.perf_counter()
        scaled_down_s = None
        while time.perf_counter() - load_end < args.downscale_delay + 240:
            running = running_replicas()
            timeline.append((round(time.perf_counter() - start, 1), running))
            if running <= 1:
                scaled_down_s = time.perf_counter() - load_end
                break
            time.sleep(2.0)
        ok = [r for r in records if r["ok"]]
        by_replica = collections.Counter(r["replica_id"] for r in ok)
        first = ok[0]["replica_id"] if ok else None
        added = sorted((r for r in ok if r["replica_id"] != first), key=lambda r: r["end"])
        # tokens/s while one replica served, and after the added one's first answer
        split = added[0]["end"] if added else load_end

        def tok_s(a: float, b: float) -> float | None:
            n = sum(r["tokens"] for r in ok if a <= r["end"] < b)
            return n / (b - a) if b - a > 1 else None

        out.update({
            "askers": workers, "requests": len(records), "failed": len(records) - len(ok),
            "errors": [r["error"] for r in records if not r["ok"]][:10], "by_replica": dict(by_replica),
            "scaled_up_s": scaled_up_s, "added_first_answer_s": split - start if added else None,
            "added_first_ttft_s": added[0]["ttft_s"] if added else None,
            "added_reused": [r["reused"] for r in added[:3]],
            "tok_s_one_replica": tok_s(start, split), "tok_s_two_replicas": tok_s(split, load_end),
            "load_s": load_end - start, "scaled_down_s": scaled_down_s, "timeline": timeline})
        out["after_downscale"] = {k: v for k, v in ask(client, ids[0], QUESTION.format(n=0), 4).items()
                                  if k in ("ttft_s", "tokens", "replica_id")}  # the app still answers
        for cid in ids:
            client.release(cid)
    finally:
        client.close()
        stop_app()
    return out


def kill_round(args, doc: list[int]) -> dict:
    """Two replicas streaming on one document; one is killed mid-stream."""
    import grpc
    import ray

    from cluster import shm
    from cluster.node_cache import find_node_cache
    from deploy.client import Client
    t0 = time.perf_counter()
    address = start_app(args.model_dir, args, replicas=2)
    out = {"app_start_s": time.perf_counter() - t0}
    client = Client(address, timeout_s=900)
    try:
        cid = client.index(doc).context_id
        seen = {ask(client, cid, QUESTION.format(n=i), 4)["replica_id"] for i in range(12)}  # both map it
        n, tokens = args.replica_concurrency, args.kill_tokens
        first_piece = [threading.Event() for _ in range(n)]
        results: list[dict | None] = [None] * n

        def stream(i: int) -> None:
            stats = None
            try:
                for reply in client.generate(QUESTION.format(n=i), tokens, context_id=cid, temperature=0.0,
                                             ignore_eos=True):
                    if reply.WhichOneof("kind") == "text":
                        first_piece[i].set()
                    else:
                        stats = reply.stats
                results[i] = {"ok": True, "tokens": stats.output_tokens, "replica_id": stats.replica_id}
            except grpc.RpcError as e:
                results[i] = {"ok": False, "code": e.code().name, "details": (e.details() or "")[:200]}
            finally:
                first_piece[i].set()

        threads = [threading.Thread(target=stream, args=(i,), daemon=True) for i in range(n)]
        for t in threads:
            t.start()
        for event in first_piece:
            event.wait(timeout=600)
        cache = find_node_cache(ray.get_runtime_context().get_node_id())
        holders = ray.get(cache.lease_holders.remote())
        before = node_stats(client)
        if not holders:  # every stream ended before its first piece: nothing to kill
            for t in threads:
                t.join(timeout=900)
            raise RuntimeError(f"the kill round's streams did not start: {[r for r in results if r][:3]}")
        victim = holders[0]
        os.kill(victim, signal.SIGKILL)
        killed_at = time.perf_counter()
        time.sleep(1.0)
        during = node_stats(client)  # the others still streaming: the segment stays
        for t in threads:
            t.join(timeout=900)
        done = [r for r in results if r and r["ok"]]
        failed = [r for r in results if r and not r["ok"]]
        out.update({
            "streams": n, "tokens": tokens, "replicas_before": len(seen), "lease_holders": len(holders),
            "completed": len(done), "completed_in_full": sum(r["tokens"] == tokens for r in done),
            "failed_unavailable": sum(r["code"] == "UNAVAILABLE" for r in failed),
            "failed_other": [r for r in failed if r["code"] != "UNAVAILABLE"][:5],
            "survivors_by_replica": dict(collections.Counter(r["replica_id"] for r in done)),
            "node_stats_before_kill": before, "node_stats_after_kill": during,
            "node_stats_after_streams": node_stats(client)})
        # Serve notices the dead replica (one fewer RUNNING), then replaces it (two again)
        noticed_s = replaced_s = None
        while time.perf_counter() - killed_at < 600:
            running = running_replicas()
            if noticed_s is None and running < 2:
                noticed_s = time.perf_counter() - killed_at
            if noticed_s is not None and running >= 2:
                replaced_s = time.perf_counter() - killed_at
                break
            time.sleep(0.5)
        out["noticed_after_s"], out["replaced_after_s"] = noticed_s, replaced_s
        out["answer_after"] = {k: v for k, v in ask(client, cid, QUESTION.format(n=99), 4).items()
                               if k in ("ttft_s", "tokens", "reused", "replica_id")}
        client.release(cid)
    finally:
        client.close()
        stop_app()
    deadline = time.monotonic() + 30
    while shm.list_segments() and time.monotonic() < deadline:
        time.sleep(0.5)
    out["segments_after_shutdown"] = shm.list_segments()
    return out


def replica_rounds(args, vocab: int, report: dict) -> None:
    """The rounds asked for, each on a freshly started app; their results go into report."""
    from deploy.client import Client
    doc = document(args.contexts[0], args.contexts[0], vocab)
    docs = [document(args.doc_tokens, 1000 + i, vocab) for i in range(max(1, args.docs))]
    rounds = []
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
            stop_app()
    first = rounds[0]["concurrent"].get("tok_s") if rounds else None
    for r in rounds:
        if first and "tok_s" in r["concurrent"]:
            r["tok_s_vs_first_round"] = r["concurrent"]["tok_s"] / first  # 2 replicas: >= 1.8 wanted
    if rounds:
        report["replica_rounds"] = rounds
    if args.autoscale_round:
        report["autoscale"] = autoscale_round(args, docs)
        print(f"autoscale: {report['autoscale']}", flush=True)
    if args.kill_round:
        report["kill"] = kill_round(args, doc)
        print(f"kill: {report['kill']}", flush=True)


def fmt(value: float | None, unit: str = "s") -> str:
    return "never" if value is None else f"{value:.1f} {unit}"


def summarise_rounds(report: dict) -> None:
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
                  f"TTFT p50 {c['ttft_p50_s'] * 1e3:.0f} ms, TPOT p50 {c['tpot_p50_s'] * 1e3:.1f} ms (replica "
                  f"{tpot_parts(c)}), by replica {c['by_replica']}, errors {len(c['errors'])}")
    a = report.get("autoscale")
    if a:
        print(f"  autoscale: {a['askers']} askers, {a['requests']} requests, {a['failed']} failed; second "
              f"replica running after {fmt(a['scaled_up_s'])}, its first answer at {fmt(a['added_first_answer_s'])}"
              f"; tok/s {fmt(a['tok_s_one_replica'], 'tok/s')} on one, {fmt(a['tok_s_two_replicas'], 'tok/s')} on "
              f"two; back to one {fmt(a['scaled_down_s'])} after the load stopped; by replica {a['by_replica']}")
    k = report.get("kill")
    if k:
        print(f"  kill: {k['streams']} streams of {k['tokens']} tokens on {k['replicas_before']} replicas; one "
              f"killed: {k['failed_unavailable']} ended UNAVAILABLE, {len(k['failed_other'])} otherwise, "
              f"{k['completed_in_full']}/{k['completed']} finished in full; the segment stayed "
              f"({k['node_stats_after_kill'][0]['segments']} segment, {k['node_stats_after_kill'][0]['leases']} "
              f"leases after the kill); replaced after {fmt(k['replaced_after_s'])}; segments after shutdown "
              f"{k['segments_after_shutdown']}")
