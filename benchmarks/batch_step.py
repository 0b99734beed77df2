"""Where a batched decode step's time goes, as a served replica runs it (GPU), side by side in one run.

    python -m benchmarks.batch_step --contexts 32768 131072 --batches 1 16

Model: Llama-3.1-8B shape, random bf16 weights (vocabulary of SmolLM2's tokenizer, as
benchmarks/serve_gpu.py). Per context length, a document is indexed (the engine keeps it
resident on the GPU, as a replica does) and N sessions each prefill a question of their own,
whose pages are candidates at every step (the default). Then, for each batch size N:

  step           a graphed step of N slots (StaticDecoder), p50, with the document's pages
                 read from host memory over PCIe ("host"), from the resident copy the
                 engine keeps for question prefill ("resident", the served default), and
                 from a device_pages copy of the decoder's own ("device_pages");
  index query    the sparse layers' page choice alone for N rows (walk, ranking by key
                 moments, re-ranking by keys), and its walk and walk + ranking parts;
  load           putting N prefilled requests into their slots (what a burst's requests
                 pay between their first and second tokens): a second pass over the same
                 slots, and the fresh decoder's first (load_first_s: allocations too);
and once, through Engine.scheduler as the replica drives it: N sessions of 32 tokens,
tokens/s, each request's TPOT mean and median and its batch's decode pass (p50 over them).

Several documents (--documents K of --document-tokens each, resident): the largest N sessions
spread over them, N/K a document, decoded (a) one decoder after another, each its own graphed
step (what a replica did before JointStep), and (b) in one JointStep (one pass through the
model for all of them, graphed); then the same sessions through Engine.scheduler.
Writes JSON + PNG.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from pathlib import Path

import torch

from benchmarks.decode_speed import cuda_time, finish, parse_gpu_args, random_ids, save, shaped_model, top_operations
from icecache import Engine, IceCacheConfig, SamplingParams
from icecache.internals import JointStep, RequestKV, StaticDecoder

VOCAB = 49152  # SmolLM2's tokenizer, as the served benchmark uses
QUESTION_TOKENS = 20
WHERE = ("host", "resident", "device_pages")


def prefilled(eng: Engine, ctx, n: int) -> list[tuple[list, dict]]:
    """n questions of their own on ctx, prefilled: (own KV per layer, question pages) each."""
    out = []
    with torch.inference_mode():
        for i in range(n):
            req = RequestKV(eng.shape, eng.config, ctx)
            eng.runner.prefill_one(req, random_ids(QUESTION_TOKENS, VOCAB, torch.Generator().manual_seed(i)),
                                   ctx.num_tokens)
            out.append(([(kv.k, kv.v) for kv in req.own], req.question_pages))
    return out


def measure(eng: Engine, ctx, requests: list, where: str, steps: int) -> dict:
    """A decoder of len(requests) slots reading the pages from `where`: its graphed step,
    the index query's parts for as many rows, and the slots' load."""
    from icecache.internals import rank_pages, walk_tree
    B = len(requests)
    resident = eng.runner.resident if where == "resident" else None
    with torch.inference_mode():
        dec = StaticDecoder(eng.model, eng.config, ctx, slots=B, slot_tokens=512, device_pages=where == "device_pages",
                            resident=resident)
        if where == "resident" and not dec.resident_rows:
            raise SystemExit("the engine did not keep the document resident: raise resident_context_share")
        load_s = []  # the first pass (a fresh decoder's allocations) and a second over the same slots
        for _ in range(2):
            torch.cuda.synchronize()
            start = time.perf_counter()
            for slot, (own, pages) in enumerate(requests):
                dec.load(slot, own, 64, pages)
            torch.cuda.synchronize()
            load_s.append(time.perf_counter() - start)
        tokens, positions, times = [100 + i for i in range(B)], [ctx.num_tokens + QUESTION_TOKENS] * B, []
        for _ in range(steps + 4):  # eager until the size recurs, then recorded and replayed
            torch.cuda.synchronize()
            start = time.perf_counter()
            tokens = dec.step_batch(tokens, positions, graph=True).argmax(-1).tolist()
            times.append(time.perf_counter() - start)
            positions = [p + 1 for p in positions]
        H, D, G = eng.shape.num_kv_heads, eng.shape.head_dim, eng.shape.group
        sparse = dec.sparse_states
        q = torch.randn(B * H, G, D, device="cuda")
        scaling = D ** -0.5

        def walk_rank(rank: bool):
            for s in sparse:
                S = s.scratch
                top = walk_tree(q, s.plan, s.root, scaling, S["raw"], S["cand"], S["parts"], S["tops"])
                if rank:
                    rank_pages(q, top, s.plan, s.tree.page_mean, s.tree.page_var, s.tree.page_valid,
                                    s.priv_mean[:B].flatten(0, 1), s.priv_var[:B].flatten(0, 1),
                                    s.priv_valid[:B].flatten(0, 1), scaling, s.ranked, S["raw"], S["cand"],
                                    S["parts"], s.page_heads)
        row = {"batch": B, "where": where, "step_p50_s": statistics.median(times[4:]), "load_s": load_s[1],
               "load_first_s": load_s[0],
               "index_query_s": cuda_time(lambda: [s.select(q, scaling) for s in sparse]),
               "walk_s": cuda_time(lambda: walk_rank(False)), "walk_rank_s": cuda_time(lambda: walk_rank(True)),
               "graphed": sorted(dec.graphed), "kv_gpu_gib": dec.device_bytes() / 2**30}
        del dec
    torch.cuda.empty_cache()
    return row


def scheduler_round(eng: Engine, contexts: list, sessions: int, tokens: int, max_batch: int | None = None,
                    profile: int = 0) -> dict:
    """sessions questions through Engine.scheduler (of max_batch slots a group, default
    sessions), spread round-robin over contexts, in two rounds: the first on fresh decoders
    (they run eagerly, then record their graphs: what a replica's first burst on new
    documents pays), the second as the replica's steady state (its figures lead). Each
    round's first step is its prefill pack (every question in one pass); profile > 0: a
    third round, whose first step runs under torch.profiler (its top `profile` operations;
    the round's timings are the profiler's, so not reported)."""
    sched = eng.scheduler(max_batch=max_batch or sessions)
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    rounds = []
    for round_ in range(3 if profile else 2):
        seqs = [sched.submit(random_ids(QUESTION_TOKENS, VOCAB, torch.Generator().manual_seed(100 * round_ + i)),
                             params, context=contexts[i % len(contexts)]) for i in range(sessions)]
        torch.cuda.synchronize()
        start = time.perf_counter()
        prof = None
        if round_ == 2:
            from torch.profiler import ProfilerActivity
            prof = torch.profiler.profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
        with prof or contextlib.nullcontext():
            sched.step()
            torch.cuda.synchronize()
        first_step = time.perf_counter() - start
        while sched.has_work:
            sched.step()
        wall = time.perf_counter() - start
        if prof is not None:  # the steady round's figures stand; this one's are the profiler's
            rounds[1]["pack_profile"] = top_operations(prof, profile)
            break
        stats = [s.items[-1].stats for s in seqs]
        p50 = lambda key: statistics.median(x[key] for x in stats)  # noqa: E731
        rounds.append({"sessions": sessions, "documents": len(contexts), "tokens": tokens,
                       "tokens_per_s": sessions * tokens / wall, "first_step_s": first_step,
                       "prefill_pass_p50_s": p50("prefill_pass_s"), "ttft_p50_s": p50("ttft_s"),
                       "tpot_mean_p50_s": p50("tpot_s"), "tpot_median_p50_s": p50("tpot_median_s"),
                       "decode_pass_p50_s": p50("decode_pass_s"), "largest_batch": sched.largest_batch})
    return {**rounds[1], "cold": rounds[0]}


def documents_round(eng: Engine, k: int, tokens: int, sessions: int, steps: int, new_tokens: int,
                    profile: int = 0) -> dict:
    """sessions questions over k documents of `tokens` (sessions // k each, all resident):
    the documents' decoders stepped in turn against one JointStep, then the scheduler."""
    contexts = [eng.index(random_ids(tokens, VOCAB, torch.Generator().manual_seed(7000 + d))).with_index_on(eng.device)
                for d in range(k)]
    each = max(1, sessions // k)
    row = {"documents": k, "document_tokens": tokens, "sessions": each * k}
    with torch.inference_mode():
        decs = []
        for ctx in contexts:
            dec = StaticDecoder(eng.model, eng.config, ctx, slots=each, slot_tokens=512, resident=eng.runner.resident)
            for slot, (own, pages) in enumerate(prefilled(eng, ctx, each)):
                dec.load(slot, own, 64, pages)
            decs.append(dec)
        row["resident"] = sum(d.resident_rows for d in decs)
        joint = JointStep()
        for mode in ("turns", "joint"):
            times, pos = [], [[ctx.num_tokens + QUESTION_TOKENS] * each for ctx in contexts]
            for _ in range(steps + 4):  # eager until the combination recurs, then recorded and replayed
                torch.cuda.synchronize()
                start = time.perf_counter()
                parts = [(d, [100 + i for i in range(each)], p) for d, p in zip(decs, pos)]
                if mode == "turns":
                    out = [d.step_batch(t, p, graph=True) for d, t, p in parts]
                else:
                    out = joint.step(parts, graph=True)
                for o in out:  # the picks read back, as a replica does
                    o.argmax(-1).tolist()
                times.append(time.perf_counter() - start)
                pos = [[x + 1 for x in p] for p in pos]
            row[f"{mode}_step_p50_s"] = statistics.median(times[4:])
        row["joint_graphed"] = len(joint.graphed)
        del decs, joint
    # the same sessions on one of the documents, then over all of them (a pack over k contexts)
    row["scheduler_one"] = scheduler_round(eng, contexts[:1], each * k, new_tokens, max_batch=max(64, each * k),
                                           profile=profile)
    row["scheduler"] = scheduler_round(eng, contexts, each * k, new_tokens, max_batch=max(64, each * k),
                                       profile=profile)
    for ctx in contexts:
        eng.runner.forget(ctx)
    del contexts
    torch.cuda.empty_cache()
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--tokens", type=int, default=32, help="tokens per session in the scheduler round")
    ap.add_argument("--documents", type=int, default=4, help="documents of the several-documents round (0 = skip)")
    ap.add_argument("--document-tokens", type=int, default=32768, help="length of each of those documents")
    ap.add_argument("--profile", type=int, default=0,
                    help="profile the documents round's prefill packs (over one document and over all): top N")
    args = parse_gpu_args(ap, argv, "batch_step", plot)
    if args is None:
        return 0
    model = shaped_model("llama-3.1-8b", max(args.contexts + [args.document_tokens]) + 4096, vocab_size=VOCAB)
    eng = Engine.from_model(model, config=IceCacheConfig(), model_id="llama-3.1-8b-random")
    report = {"gpu": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), "model": "llama-3.1-8b shape",
              "runs": []}
    for n in args.contexts:
        ctx = eng.index(random_ids(n, VOCAB, torch.Generator().manual_seed(n))).with_index_on(eng.device)
        requests = prefilled(eng, ctx, max(args.batches))
        entry = {"context": n, "rows": []}
        for B in args.batches:
            for where in WHERE:
                row = measure(eng, ctx, requests[:B], where, args.steps)
                entry["rows"].append(row)
                print(f"[{n}] x{B} {where}: step {row['step_p50_s'] * 1e3:.1f} ms, index query "
                      f"{row['index_query_s'] * 1e3:.1f} ms, load {row['load_s'] * 1e3:.0f} ms "
                      f"(first {row['load_first_s'] * 1e3:.0f})", flush=True)
        entry["scheduler"] = scheduler_round(eng, [ctx], max(args.batches), args.tokens)
        print(f"[{n}] scheduler: {entry['scheduler']}", flush=True)
        report["runs"].append(entry)
        eng.runner.forget(ctx)
        del ctx, requests
        torch.cuda.empty_cache()
        save(report, args.out)  # partial results survive a timeout
    if args.documents:
        report["documents"] = documents_round(eng, args.documents, args.document_tokens, max(args.batches),
                                              args.steps, args.tokens, args.profile)
        print(f"documents: {report['documents']}", flush=True)
    finish(report, args.out, summarise, plot)
    return 0


def summarise(report: dict) -> None:
    ratios = {}
    for entry in report["runs"]:
        rows = {(r["batch"], r["where"]): r for r in entry["rows"]}
        for B in sorted({r["batch"] for r in entry["rows"]}):
            host, resident = rows[(B, "host")], rows[(B, "resident")]
            ratios[f"{entry['context']}_x{B}_resident_over_host"] = resident["step_p50_s"] / host["step_p50_s"]
            print(f"{entry['context']:>7} x{B:<3} step ms host / resident / device_pages: " +
                  " / ".join(f"{rows[(B, w)]['step_p50_s'] * 1e3:.1f}" for w in WHERE) +
                  f"; index query {resident['index_query_s'] * 1e3:.1f} (walk {resident['walk_s'] * 1e3:.1f}, "
                  f"+ranking {resident['walk_rank_s'] * 1e3:.1f}); load {resident['load_s'] * 1e3:.0f} ms")
        s = entry["scheduler"]
        print(f"{entry['context']:>7} scheduler x{s['sessions']}: {s['tokens_per_s']:.0f} tok/s, TPOT mean "
              f"{s['tpot_mean_p50_s'] * 1e3:.1f} / median {s['tpot_median_p50_s'] * 1e3:.1f} / decode pass "
              f"{s['decode_pass_p50_s'] * 1e3:.1f} ms")
    d = report.get("documents")
    if d:
        ratios["documents_joint_over_turns"] = d["joint_step_p50_s"] / d["turns_step_p50_s"]
        print(f"{d['sessions']} sessions over {d['documents']} documents of {d['document_tokens']}: step in turns "
              f"{d['turns_step_p50_s'] * 1e3:.1f} ms, joint {d['joint_step_p50_s'] * 1e3:.1f} ms")
        for name in ("scheduler_one", "scheduler"):
            if name in d:
                for label, s in (("steady", d[name]), ("fresh decoders", d[name]["cold"])):
                    print(f"  scheduler over {s['documents']} document(s), {label}: {s['tokens_per_s']:.0f} tok/s, "
                          f"prefill pack {s['first_step_s'] * 1e3:.0f} ms (pass {s['prefill_pass_p50_s'] * 1e3:.0f}),"
                          f" TTFT {s['ttft_p50_s'] * 1e3:.0f} ms, TPOT mean {s['tpot_mean_p50_s'] * 1e3:.1f} / median "
                          f"{s['tpot_median_p50_s'] * 1e3:.1f} / pass {s['decode_pass_p50_s'] * 1e3:.1f} ms")
                p = d[name].get("pack_profile")
                if p:
                    print(f"  pack over {d[name]['documents']} document(s): {p['cpu_operations']} CPU operations, "
                          f"{p['device_ms']:.1f} ms on the GPU; top GPU:")
                    for r in p["by_device"][:12]:
                        print(f"    {r['self_device_ms']:7.2f} ms x{r['calls']:<5} {r['name'][:90]}")
                    print("   top CPU:")
                    for r in p["by_cpu"][:12]:
                        print(f"    {r['self_cpu_ms']:7.2f} ms x{r['calls']:<5} {r['name'][:90]}")
    report["ratios"] = ratios


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs, docs = report["runs"], report.get("documents")
    panels = len(runs) + bool(docs)
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    if docs:
        ax = axes[0][-1]
        ax.bar(["in turns", "joint step"], [docs["turns_step_p50_s"] * 1e3, docs["joint_step_p50_s"] * 1e3])
        ax.set(ylabel="ms per step of every session", title=f"{docs['sessions']} sessions over {docs['documents']} "
               f"documents of {docs['document_tokens'] // 1024}k")
    for ax, entry in zip(axes[0], runs):
        batches = sorted({r["batch"] for r in entry["rows"]})
        width = 0.8 / len(WHERE)
        for j, where in enumerate(WHERE):
            rows = {r["batch"]: r for r in entry["rows"] if r["where"] == where}
            ax.bar([i + j * width for i in range(len(batches))], [rows[b]["step_p50_s"] * 1e3 for b in batches],
                   width, label=f"step, pages from {where}")
        ax.set_xticks([i + width for i in range(len(batches))], [f"{b} sessions" for b in batches])
        ax.set(ylabel="ms per batched step", title=f"{entry['context'] // 1024}k context, {report['gpu']}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
