"""How far each page selector's next-token distribution is from full attention's, teacher-forced.

    python -m benchmarks.agreement --cache .ruler --lengths 8192 --samples 4 --cases 24
    python -m benchmarks.agreement ... --variant rerank4:rerank=4 --variant sw256:search_width=256

RULER's scores move by whole cases on near-ties (a 135M model answers a quarter of them at 8k
with full attention), so comparing two settings of the default by score needs hundreds of
cases. This measures every answer step instead: full attention answers each RULER case
greedily, then every method is fed full attention's answer token by token through its own
decode path (SamplingParams.force_tokens) and scores it (logprobs), so every step is taken
from the same state. Per case and method:

* `nll_gap`: the mean over the answer's tokens of log p_full(token) - log p_method(token):
  how much less likely the method finds full attention's answer (0 = as likely);
* `agree`: the share of steps whose most likely token is full attention's;
* `same_answer`: every step agrees, i.e. the method's own greedy answer is full attention's;
* `first_flip_margin`: where a method's top token first differs from full attention's, how
  sure full attention was of its own: its top token's log-probability minus its second's
  (None where every step agrees). A 135M model decides many RULER answers on near-ties (a
  7-digit number ends after 6 digits at a 0.1-nat margin), which any change of attention
  tips either way; `clear_flips` counts the steps where the method's top token differs
  although full attention's margin was at least CLEAR_MARGIN: facts it had and the method lost.

Methods are benchmarks/accuracy.py's (`icecache` is the default config) and `--variant
NAME:FIELD=VALUE[,FIELD=VALUE]`, the default with IceCacheConfig fields changed, all at one
budget with the same sinks and window. The report has per method the means over cases with
95% bootstrap intervals, the paired difference of nll_gap against the default, the same on the
cases full attention answers right, and every record. JSON + PNG next to --out.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

from benchmarks import accuracy, ruler
from icecache import Engine, SamplingParams

CLEAR_MARGIN = 1.0  # nats: full attention's top token at least e times as likely as its second


def method_configs(methods: list[str], budget: int) -> dict:
    """Every method's IceCacheConfig at the budget (accuracy.method_config), full attention first."""
    return {m: accuracy.method_config(m, budget) for m in dict.fromkeys(["full", *methods])}


def case_steps(engine: Engine, case: accuracy.Case, configs: dict) -> dict[str, list]:
    """Full attention's greedy answer, then every other method forced along it: per method the
    (token, log-probability, top token) of each answer step. The document is indexed once per layout."""
    contexts = {}

    def context(cfg):
        return accuracy.indexed(engine.with_config(cfg), case.document, contexts)

    full = engine.with_config(configs["full"]).generate(
        case.question, SamplingParams(max_tokens=case.max_tokens, temperature=0.0, logprobs=2),
        context=context(configs["full"]))
    steps = {"full": [(lp.token_id, lp.logprob, lp.top[0][0], margin(lp.top)) for lp in full.logprobs],
             "text": full.text}
    if not full.token_ids:
        return steps
    forced = SamplingParams(max_tokens=len(full.token_ids), temperature=0.0, logprobs=1, ignore_eos=True,
                            force_tokens=full.token_ids)
    for name, cfg in configs.items():
        if name != "full":
            out = engine.with_config(cfg).generate(case.question, forced, context=context(cfg))
            steps[name] = [(lp.token_id, lp.logprob, lp.top[0][0]) for lp in out.logprobs]
    return steps


def margin(top: list[tuple[int, float]]) -> float:
    """How sure a step was of its top token: its log-probability minus the second's (nats)."""
    return top[0][1] - top[1][1] if len(top) > 1 else float("inf")


def compare(full: list, other: list) -> dict:
    """One case's figures for a method, from both runs' steps (the same forced tokens)."""
    gap = [f[1] - o[1] for f, o in zip(full, other)]
    agree = [o[2] == f[0] for f, o in zip(full, other)]
    flips = [f[3] for f, same in zip(full, agree) if not same]  # full attention's margins where the method differs
    return {"nll_gap": statistics.fmean(gap), "agree": statistics.fmean(agree), "same_answer": all(agree),
            "max_gap": max(gap), "first_flip_margin": flips[0] if flips else None,
            "clear_flips": sum(m >= CLEAR_MARGIN for m in flips)}


def summarise(records: list[dict], resamples: int = 2000) -> dict:
    """Per method: the means over cases with 95% bootstrap intervals (all cases, and those full
    attention answers right), and nll_gap minus the default's on the same cases."""
    rng = random.Random(0)
    by_method = defaultdict(list)
    for r in records:
        by_method[r["method"]].append(r)
    default = {(r["task"], r["length"], r["seed"], r["case"]): r["nll_gap"] for r in by_method.get("icecache", [])}
    methods = {}
    for method, rows in sorted(by_method.items()):
        entry = {}
        for subset, chosen in (("all", rows), ("full_right", [r for r in rows if r["full_score"] > 0])):
            if not chosen:
                continue
            entry[subset] = {name: accuracy.bootstrap([float(r[name]) for r in chosen], resamples, rng)
                             for name in ("nll_gap", "agree", "same_answer")}
        flipped = [r for r in rows if r.get("first_flip_margin") is not None]  # records before margins: none
        if flipped:
            entry["flips"] = {
                "cases": len(flipped),
                "first_at_near_tie": sum(r["first_flip_margin"] < CLEAR_MARGIN for r in flipped),
                "clear_flip_cases": sum(r["clear_flips"] > 0 for r in flipped),
                "clear_flip_cases_full_right": sum(r["clear_flips"] > 0 and r["full_score"] > 0 for r in flipped)}
        paired = [r["nll_gap"] - default[key] for r in rows
                  if (key := (r["task"], r["length"], r["seed"], r["case"])) in default]
        if method != "icecache" and paired:
            entry["nll_gap_vs_default"] = accuracy.bootstrap(paired, resamples, rng)
        methods[method] = entry
    return {"methods": methods, "records": records}


def interval(stat: dict) -> str:
    return "[{:+.4f}, {:+.4f}]".format(*stat["ci95"])


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = sorted(report["methods"], key=lambda m: report["methods"][m]["all"]["nll_gap"]["diff"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.5 * len(names) + 2))
    for ax, metric, label in ((axes[0], "nll_gap", "mean log p_full - log p_method per answer token"),
                              (axes[1], "agree", "share of steps whose top token is full attention's")):
        for i, name in enumerate(names):
            stat = report["methods"][name]["all"][metric]
            lo, hi = stat["ci95"]
            ax.errorbar(stat["diff"], i, xerr=[[stat["diff"] - lo], [hi - stat["diff"]]], fmt="o", capsize=3)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.set(xlabel=label, title=f"{metric}, {report['cases']} RULER cases @ {report['budget']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache", type=Path, required=True, help="RULER cases (benchmarks.ruler --generate-only)")
    ap.add_argument("--tasks", nargs="+", default=None, help="default: every task of synthetic.yaml")
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--samples", type=int, default=4, help="samples per task, length and seed in the cache")
    ap.add_argument("--cases", type=int, default=None, help="at most this many cases, a fixed shuffle of them")
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--methods", nargs="+", default=["icecache", "oracle"], choices=accuracy.METHODS)
    accuracy.add_variant_option(ap, "the default config with these IceCacheConfig fields (repeatable)")
    ap.add_argument("--max-tokens", type=int, default=48, help="cap the tasks' own output lengths")
    ap.add_argument("--device", default="cpu", help="where the model runs (fp32)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/agreement.json"))
    ap.add_argument("--resume", action="store_true",
                    help="keep the cases already in --out's .records.jsonl (an interrupted run) and do the rest")
    ap.add_argument("--report-only", action="store_true", help="write the report from --out's .records.jsonl")
    args = ap.parse_args(argv)
    log = args.out.with_suffix(".records.jsonl")  # a line per case, written as it is done
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        return report_to(args.out, [json.loads(line) for line in log.read_text().splitlines()], {})
    specs = ruler.task_specs()
    tasks = args.tasks or list(specs)
    configs = method_configs(accuracy.with_variants(args.methods, args.variant), args.budget)
    engine = Engine.from_pretrained(device=args.device, dtype=torch.float32, context_length=max(args.lengths))
    tokenizer_dir = args.cache / "tokenizer"
    engine.tokenizer.save_pretrained(tokenizer_dir)
    make = ruler.ruler_cases(specs, args.samples, tokenizer_dir, args.cache, args.max_tokens)
    score = ruler.scorer(specs)
    keys = [(t, n, s, i) for t in tasks for n in args.lengths for s in args.seeds for i in range(args.samples)]
    random.Random(0).shuffle(keys)
    keys = sorted(keys[:args.cases] if args.cases else keys)
    start, records, cases = time.perf_counter(), [], {}
    if args.resume and log.exists():
        records = [json.loads(line) for line in log.read_text().splitlines()]
    else:
        log.write_text("")
    done = {(r["task"], r["length"], r["seed"], r["case"]) for r in records}
    for task, n, seed, i in keys:
        if (task, n, seed, i) in done:
            continue
        if (task, n, seed) not in cases:
            cases = {(task, n, seed): make(task, n, seed)}  # a seed's cases share their document
        case = cases[(task, n, seed)][i]
        steps = case_steps(engine, case, configs)
        full_score = score(task, steps["text"], case.answers)
        done_now = [{"task": task, "length": n, "seed": seed, "case": i, "method": name, "budget": args.budget,
                     "full_score": full_score, "steps": len(steps["full"]), **compare(steps["full"], steps[name])}
                    for name in configs if name != "full" and name in steps]
        records += done_now
        with log.open("a") as f:  # the case's records at once: a run cut off mid-case redoes the case
            f.writelines(json.dumps(rec) + "\n" for rec in done_now)
        print(f"{task} {n} seed {seed} case {i} (full {full_score:.2f}, {len(steps['full'])} tokens): "
              + ", ".join(f"{r['method']} {r['nll_gap']:.3f}/{r['agree']:.2f}" for r in done_now), flush=True)
    return report_to(args.out, records, {
        "budget": args.budget, "configs": {name: repr(cfg) for name, cfg in configs.items()},
        "model": engine.model_id, "device": str(engine.device), "wall_s": time.perf_counter() - start})


def report_to(out: Path, records: list[dict], run: dict) -> int:
    """The report of these records (JSON + PNG at out), and a line per method."""
    budget = run.get("budget") or records[0].get("budget", 0)
    cases = len({(r["task"], r["length"], r["seed"], r["case"]) for r in records})
    report = {"benchmark": "teacher-forced agreement with full attention on RULER cases", "budget": budget,
              "cases": cases, **run, **summarise(records)}
    out.write_text(json.dumps(report, indent=1))
    plot(report, out.with_suffix(".png"))
    for name, entry in sorted(report["methods"].items(), key=lambda kv: kv[1]["all"]["nll_gap"]["diff"]):
        a = entry["all"]
        vs = entry.get("nll_gap_vs_default")
        flips = entry.get("flips")
        print(f"{name:>16}: nll_gap {a['nll_gap']['diff']:.4f} {interval(a['nll_gap'])}, agree "
              f"{a['agree']['diff']:.3f}, same answer {a['same_answer']['diff']:.2f}"
              + (f", vs default {vs['diff']:+.4f} {interval(vs)}" if vs else "")
              + (f"; differs on {flips['cases']} cases, first at a near-tie (< {CLEAR_MARGIN} nat) on "
                 f"{flips['first_at_near_tie']}, against a clear choice on {flips['clear_flip_cases']} "
                 f"({flips['clear_flip_cases_full_right']} that full attention answers right)" if flips else ""))
    print(f"wrote {out} ({cases} cases)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
