"""Long-context accuracy of page selectors at equal budget, RULER-style, on the built-in model.

    python benchmarks/accuracy.py --quick          # CI-sized: 2 tasks, 2k tokens, 3 cases
    python benchmarks/accuracy.py                  # the suite (days on 2 CPU cores)
    python benchmarks/accuracy.py --device cuda --tasks passkey --out a.json --resume  # a shard; resumable
    python benchmarks/accuracy.py --merge a.json b.json ... --out suite.json          # shards -> one report

Tasks are generated locally from seeds (no download): passkey, single- and multi-key
needles, a multi-value needle, variable tracking, common-word extraction and QA over
synthetic facts. Every case is prefilled and indexed once; each method then answers from
the same context at each budget, so only the choice of pages differs. Budgets below 256
shrink sinks and window to 16 tokens each (64 = 16 + 16 + 2 pages). Reports accuracy mean
and std over seeds per (task, length, method, budget), retention vs full attention, and
wall time; writes JSON and a PNG next to it. The JSON keeps every answer (a record per
case, method and budget), so shards run side by side merge into one report, and a run
that was cut off resumes where it stopped.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from icecache import Engine, IceCacheConfig, SamplingParams
from icecache.internals import layout_of

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
WORDS = ("apple banana cherry delta echo falcon garden harbor island jungle kettle lemon marble nectar ocean "
         "pepper quartz river saddle tiger umbrella violet walnut yonder zephyr anchor bridge candle dragon ember "
         "forest glacier hammer ivory jasmine kayak lantern meadow nickel orchard pirate quiver ribbon silver "
         "thunder velvet willow").split()
CITIES = "Lisbon Oslo Nairobi Lima Hanoi Quito Dakar Riga Sofia Tunis Accra Bern Doha Kyiv Male Minsk".split()
NAMES = "Ada Bo Cyd Dov Eli Fay Gus Hal Ira Jo Kai Lev Max Ned Oda Pia Rex Sol Tam Uma Vic Wes".split()


class Task:
    """A task builds (document, question, expected answers) for a seed; a case scores the
    fraction of expected answers that appear in the generated text."""

    name = "task"
    max_tokens = 12

    def build(self, tokenizer, num_tokens: int, rng: random.Random) -> tuple[str, str, list[str]]:
        raise NotImplementedError


def haystack(tokenizer, num_tokens: int, inserts: list[str], rng: random.Random, intro: str = "") -> str:
    """Filler of about num_tokens tokens with the inserts at random depths (in order)."""
    per_rep = len(tokenizer(FILLER, add_special_tokens=False).input_ids)
    spare = sum(len(tokenizer(s, add_special_tokens=False).input_ids) for s in inserts) + 40
    reps = max(len(inserts) + 1, (num_tokens - spare) // per_rep)
    depths = sorted(rng.sample(range(1, reps), len(inserts)))
    parts = [FILLER] * reps
    for d, text in zip(reversed(depths), reversed(inserts)):
        parts.insert(d, text + " ")
    return intro + "".join(parts)


class Passkey(Task):
    name = "passkey"

    def build(self, tok, n, rng):
        key = str(rng.randint(10000, 99999))
        doc = haystack(tok, n, [f"The pass key is {key}. Remember it. {key} is the pass key."], rng,
                       "There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
                       "it. I will quiz you about the important information there.\n")
        return doc, "\nWhat is the pass key? The pass key is", [key]


class NeedleSingle(Task):
    name = "niah_single"

    def build(self, tok, n, rng):
        word, num = rng.choice(WORDS), str(rng.randint(1000000, 9999999))
        doc = haystack(tok, n, [f"One of the special magic numbers for {word} is: {num}."], rng)
        return doc, f"\nWhat is the special magic number for {word}? The special magic number for {word} is", [num]


class NeedleMultiKey(Task):
    name = "niah_multikey"

    def build(self, tok, n, rng):
        words = rng.sample(WORDS, 4)
        nums = [str(rng.randint(1000000, 9999999)) for _ in words]
        doc = haystack(tok, n, [f"One of the special magic numbers for {w} is: {x}." for w, x in zip(words, nums)],
                       rng)
        i = rng.randrange(4)
        return doc, f"\nWhat is the special magic number for {words[i]}? The special magic number for " \
                    f"{words[i]} is", [nums[i]]


class NeedleMultiValue(Task):
    name = "niah_multivalue"
    max_tokens = 24

    def build(self, tok, n, rng):
        word = rng.choice(WORDS)
        nums = [str(rng.randint(1000000, 9999999)) for _ in range(2)]
        doc = haystack(tok, n, [f"One of the special magic numbers for {word} is: {x}." for x in nums], rng)
        return doc, f"\nWhat are all the special magic numbers for {word}? The special magic numbers for " \
                    f"{word} are", nums


class VariableTracking(Task):
    name = "variable_tracking"
    max_tokens = 16

    def build(self, tok, n, rng):
        names = rng.sample([f"{a}{b}" for a in "QWXZ" for b in "JKVY"], 3)
        value = str(rng.randint(10000, 99999))
        chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in (1, 2)]
        doc = haystack(tok, n, chain, rng)
        return doc, f"\nFind all variables that are assigned the value {value}. They are: VAR", names


class CommonWords(Task):
    name = "common_words"
    max_tokens = 24

    def build(self, tok, n, rng):
        common = rng.sample(WORDS, 3)
        rare = [w for w in WORDS if w not in common]

        def make(total: int) -> str:
            reps = max(3, total // 10)
            words = common * reps + [rng.choice(rare) for _ in range(max(0, total - 3 * reps))]
            rng.shuffle(words)
            return "Below is a numbered list of words.\n" + " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))

        total = max(60, n // 4)
        for _ in range(3):  # calibrate on the real token count (numbers tokenise in pieces)
            actual = len(tok(make(total), add_special_tokens=True).input_ids)
            total = max(60, int(total * (n - 40) / actual))
        return make(total), "\nQuestion: What are the 3 most common words in the above list? Answer: The 3 most " \
                            "common words are", common


class FactsQA(Task):
    name = "facts_qa"

    def build(self, tok, n, rng):
        people = rng.sample(NAMES, 8)
        cities = [rng.choice(CITIES) for _ in people]
        doc = haystack(tok, n, [f"{p} lives in {c}." for p, c in zip(people, cities)], rng)
        i = rng.randrange(len(people))
        return doc, f"\nQuestion: In which city does {people[i]} live? Answer: {people[i]} lives in", [cities[i]]


TASKS = {t.name: t for t in (Passkey(), NeedleSingle(), NeedleMultiKey(), NeedleMultiValue(), VariableTracking(),
                             CommonWords(), FactsQA())}
# the default (the moments' rerank x R best and the question's pages, re-ranked by their keys), fields changed
VARIANTS = {
    "icecache_bounds": dict(rerank=1, question_pages=0),  # pages by the bounds alone (the default until 2026-12)
    "icecache_sum": dict(page_heads="sum"),  # pages ranked by the query heads' summed softmax shares
    "icecache_beam256": dict(search_width=256),  # the tree walk keeps 256 nodes per level, not 64
    "icecache_reuse": dict(reuse_layers=2),  # IceCache-reuse: cycles of 2 sparse layers share one selection
    "icecache_rerank2": dict(rerank=2, question_pages=0),  # the bounds' 2R best, re-ranked: no question pages
    "icecache_rerank4": dict(rerank=4, question_pages=0),
    "icecache_rerank1q": dict(rerank=1),  # the bounds' R best and the question's pages, re-ranked: 1/3 fewer reads
    "icecache_q12": dict(question_pages=12, question_follow=16),  # the question's pages until 2026-12-03
    "icecache_means": dict(unselected="means"),  # the pages left out join attention by their means
}
METHODS = ("full", "icecache", *VARIANTS, "oracle", "quest", "streaming", "random")


def parse_variant(text: str) -> tuple[str, dict]:
    """'NAME:FIELD=VALUE,FIELD=VALUE' -> (NAME, {FIELD: VALUE}), values as Python literals
    (a --variant option: the default config with IceCacheConfig fields changed)."""
    name, sep, fields = text.partition(":")
    if not sep or not name or not fields:
        raise argparse.ArgumentTypeError(f"expected NAME:FIELD=VALUE[,FIELD=VALUE], got {text!r}")
    changes = {}
    for item in fields.split(","):
        field, eq, value = item.partition("=")
        if not eq:
            raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, got {item!r}")
        try:
            changes[field.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            changes[field.strip()] = value.strip()
    try:
        IceCacheConfig().replace(**changes)  # an unknown field or a bad value fails here, by name
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text}: {e}") from None
    return name, changes


def add_variant_option(ap: argparse.ArgumentParser, help: str = "one more method, the default config with "
                       "these IceCacheConfig fields (repeatable), e.g. rerank2:rerank=2") -> None:
    ap.add_argument("--variant", type=parse_variant, action="append", default=[],
                    help=f"NAME:FIELD=VALUE[,FIELD=VALUE]: {help}")


def with_variants(methods: list[str], variants: list[tuple[str, dict]]) -> list[str]:
    """methods, then --variant's (name, changes), which method_config knows from now on."""
    for name, changes in variants:
        if name in METHODS and VARIANTS.get(name) != changes:
            raise ValueError(f"--variant {name}: the name of a built-in method")
        VARIANTS[name] = changes
    return list(dict.fromkeys([*methods, *(name for name, _ in variants)]))


def method_config(method: str, budget: int) -> IceCacheConfig:
    """Every method at the same budget, sinks and window, on the engine's own decode path
    (static, with kernels and CUDA graphs on a GPU; dynamic on CPU): only the pages differ.
    A variant's own budget, sinks and window, if it sets them, stand."""
    if method == "full":
        return IceCacheConfig(mode="full")
    edge = 16 if budget < 256 else 32
    variant = VARIANTS.get(method, {} if method == "icecache" else dict(selector=method))
    return IceCacheConfig(**{"token_budget": budget, "sink_tokens": edge, "window_tokens": edge, **variant})


def score(task: str, text: str, answers: list[str]) -> float:
    """The fraction of expected answers that appear in the text (any case)."""
    return sum(a.lower() in text.lower() for a in answers) / len(answers)


@dataclass
class Case:
    """One question on one document, with what a right answer contains."""
    document: str
    question: str
    answers: list[str]
    max_tokens: int


def local_cases(tokenizer, cases: int) -> Callable[[str, int, int], list[Case]]:
    """The suite's own tasks: `cases` cases per (task, length, seed), built from seeds."""
    def make(task_name: str, n: int, seed: int) -> list[Case]:
        task = TASKS[task_name]
        rng = random.Random(f"{task_name}-{n}-{seed}")
        return [Case(*task.build(tokenizer, n, rng), task.max_tokens) for _ in range(cases)]
    return make


RECORD_KEY = ("task", "length", "seed", "case", "method", "budget")  # one answer per key; a record adds "score"


def record_key(record: dict) -> tuple:
    return tuple(record[name] for name in RECORD_KEY)


def indexed(eng: Engine, document: str, contexts: dict):
    """The document's context under eng's layout: indexed on first use, then kept in `contexts`."""
    key = (document, layout_of(eng.config))
    if key not in contexts:
        contexts[key] = eng.index(document)
    return contexts[key]


def answer(engine: Engine, case: Case, runs: list[tuple[str, int]], timing: dict,
           contexts: dict | None = None) -> dict[tuple[str, int], str]:
    """The case answered by each (method, budget), greedy: the document is prefilled and
    indexed once per layout (sinks, window, reuse) and every method reads that context,
    so only the choice of pages differs. Cases that share a document and a `contexts`
    dict share its contexts too."""
    params = SamplingParams(max_tokens=case.max_tokens, temperature=0.0)
    contexts, texts = {} if contexts is None else contexts, {}
    for method, budget in runs:
        cfg = method_config(method, budget or 256)
        eng = engine.with_config(cfg)
        t = time.perf_counter()
        context = indexed(eng, case.document, contexts)
        timing["prefill"] += time.perf_counter() - t
        t = time.perf_counter()
        texts[(method, budget)] = until_answered(eng, case, params, context)
        timing[method] += time.perf_counter() - t
    return texts


def until_answered(eng: Engine, case: Case, params: SamplingParams, context) -> str:
    """The case's answer, decoded until every expected answer is in it or max_tokens: the
    scorers (ours, and RULER's string_match_all / _part) ask only whether each appears, so
    the tokens after that cannot change a score and are decode steps for nothing."""
    stream = eng.stream(case.question, params, context=context)
    text = ""
    for piece in stream:
        text += piece
        if all(a.lower() in text.lower() for a in case.answers):
            stream.close()
            break
    return text


def run(engine: Engine, tasks: list[str], lengths: list[int], seeds: list[int], methods: list[str],
        budgets: list[int], make_cases: Callable[[str, int, int], list[Case]], scorer=score, log=print,
        checkpoint=None, done: list[dict] | None = None) -> dict:
    """Evaluate every case of make_cases(task, length, seed) with every method and budget,
    scored by scorer(task, text, answers) in [0, 1]. Each answer is a record (task, length,
    seed, case, method, budget, score); `checkpoint(report)` is called after every case.
    Cases whose records are all in `done` (an earlier, interrupted run) are skipped."""
    records = list(done or [])
    have = {record_key(r) for r in records}
    timing = defaultdict(float)
    runs = [(m, b) for m in methods for b in ([0] if m == "full" else budgets)]
    for task_name in tasks:
        for n in lengths:
            for seed in seeds:
                contexts = {}  # the seed's cases may share a document
                for i, case in enumerate(make_cases(task_name, n, seed)):
                    todo = [(m, b) for m, b in runs if (task_name, n, seed, i, m, b) not in have]
                    if not todo:
                        continue
                    scores = {}
                    for (method, budget), text in answer(engine, case, todo, timing, contexts).items():
                        scores[(method, budget)] = scorer(task_name, text, case.answers)
                        records.append({"task": task_name, "length": n, "seed": seed, "case": i,
                                        "method": method, "budget": budget, "score": scores[(method, budget)]})
                    if checkpoint is not None:
                        checkpoint(summarise(records, timing))
                    log(f"{task_name} {n} seed {seed} case {i}: " + ", ".join(
                        f"{m}@{b}={v:.2f}" for (m, b), v in scores.items()))
    return summarise(records, timing)


def run_to(out: Path, resume: bool, engine: Engine, tasks: list[str], lengths: list[int], seeds: list[int],
           methods: list[str], budgets: list[int], make_cases: Callable[[str, int, int], list[Case]],
           scorer=score) -> dict:
    """run(), checkpointed to out's .partial.json after every case (removed at the end);
    resume: keep the answers of that file (an interrupted run) or of out itself (a smaller
    finished one) and answer only the rest."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial.json")
    done = None
    if resume:
        earlier = partial if partial.exists() else out
        done = json.loads(earlier.read_text())["records"] if earlier.exists() else None

    def checkpoint(report: dict) -> None:  # whole or absent: a run killed mid-write leaves the last one
        scratch = partial.with_suffix(".tmp")
        scratch.write_text(json.dumps({**report, "model": engine.model_id, "device": str(engine.device)}))
        os.replace(scratch, partial)

    report = run(engine, tasks, lengths, seeds, methods, budgets, make_cases, scorer, checkpoint=checkpoint, done=done)
    partial.unlink(missing_ok=True)
    return report


def paired(records: list[dict], resamples: int = 2000) -> list[dict]:
    """Per (length, method, budget): the mean over cases (every task) of the method's score
    minus full attention's on the same case, with a 95% bootstrap interval over cases."""
    full = {(r["task"], r["length"], r["seed"], r["case"]): r["score"] for r in records if r["method"] == "full"}
    diffs = defaultdict(list)
    for r in records:
        base = full.get((r["task"], r["length"], r["seed"], r["case"]))
        if r["method"] != "full" and base is not None:
            diffs[(r["length"], r["method"], r["budget"])].append(r["score"] - base)
    rng = random.Random(0)
    return [{"length": n, "method": method, "budget": budget, **bootstrap(d, resamples, rng)}
            for (n, method, budget), d in sorted(diffs.items())]


def paired_against(records: list[dict], method: str = "icecache", resamples: int = 2000) -> list[dict]:
    """Per (length, other method, budget): the mean over cases of `method`'s score minus the
    other's at the same budget on the same case, with a 95% bootstrap interval: whether
    the default is ahead of each baseline."""
    ours = {(r["task"], r["length"], r["seed"], r["case"], r["budget"]): r["score"]
            for r in records if r["method"] == method}
    diffs = defaultdict(list)
    for r in records:
        mine = ours.get((r["task"], r["length"], r["seed"], r["case"], r["budget"]))
        if r["method"] not in (method, "full") and mine is not None:
            diffs[(r["length"], r["method"], r["budget"])].append(mine - r["score"])
    rng = random.Random(0)
    return [{"length": n, "method": method, "against": other, "budget": budget, **bootstrap(d, resamples, rng)}
            for (n, other, budget), d in sorted(diffs.items())]


def bootstrap(diffs: list[float], resamples: int, rng: random.Random) -> dict:
    """The mean of paired differences and its 95% bootstrap interval over the cases."""
    means = sorted(statistics.fmean(rng.choices(diffs, k=len(diffs))) for _ in range(resamples))
    return {"cases": len(diffs), "diff": statistics.fmean(diffs),
            "ci95": [means[int(0.025 * resamples)], means[int(0.975 * resamples) - 1]]}


def summarise(records: list[dict], timing: dict) -> dict:
    """Mean and std over seeds (of each seed's mean over its cases) per (task, length,
    method, budget), retention vs full, the task average per method@budget over every
    length and per length (by_length), paired differences against full; the records
    are kept, so reports can be merged and resumed."""
    by_seed = defaultdict(lambda: defaultdict(list))
    for r in records:
        by_seed[(r["task"], r["length"], r["method"], r["budget"])][r["seed"]].append(r["score"])
    per_seed = {key: {seed: statistics.mean(v) for seed, v in seeds.items()} for key, seeds in by_seed.items()}
    rows = []
    for (task, n, method, budget), means in sorted(per_seed.items()):
        values = list(means.values())
        full_means = per_seed.get((task, n, "full", 0))
        full = statistics.mean(full_means.values()) if full_means else None
        mean = statistics.mean(values)
        rows.append({"task": task, "length": n, "method": method, "budget": budget, "mean": mean,
                     "std": statistics.stdev(values) if len(values) > 1 else 0.0, "seeds": len(values),
                     "cases": sum(map(len, by_seed[(task, n, method, budget)].values())),
                     "full_mean": full, "retention": mean / full if full else None})
    averages, per_length = defaultdict(list), defaultdict(lambda: defaultdict(list))
    for r in rows:
        averages[(r["method"], r["budget"])].append(r["mean"])
        per_length[str(r["length"])][f"{r['method']}@{r['budget']}"].append(r["mean"])
    suite = {f"{m}@{b}": statistics.mean(v) for (m, b), v in sorted(averages.items())}
    by_length = {n: {k: statistics.mean(v) for k, v in sorted(row.items())} for n, row in sorted(per_length.items())}
    return {"rows": rows, "suite_average": suite, "by_length": by_length, "paired_vs_full": paired(records),
            "icecache_vs_others": paired_against(records), "wall_s": dict(timing), "records": records}


def merge(reports: list[dict]) -> dict:
    """One report from several (shards run side by side, or a run resumed): the records
    are joined (a repeated answer counts once) and summarised again; wall times add up."""
    seen, records, timing = set(), [], defaultdict(float)
    for report in reports:
        for r in report["records"]:
            key = record_key(r)
            if key not in seen:
                seen.add(key)
                records.append(r)
        for name, value in report["wall_s"].items():
            timing[name] += value
    return summarise(records, timing)


def plot(report: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4))
    # one colour per method of this report in both panels (full first, then in METHODS' order;
    # methods of older reports, since removed, after ours): distinct up to ten methods
    present = {key.split("@")[0] for key in report["suite_average"]}
    names = ["full"] + [m for m in METHODS if m in present and m != "full"] + sorted(present - set(METHODS) - {"full"})
    colour = {m: f"C{i % 10}" for i, m in enumerate(names)}
    by_method = defaultdict(dict)
    for key, value in report["suite_average"].items():
        method, budget = key.split("@")
        by_method[method][int(budget)] = value
    full = by_method.pop("full", {}).get(0)
    for method, points in by_method.items():
        budgets = sorted(points)
        a1.plot(budgets, [points[b] for b in budgets], marker="o", label=method, c=colour[method])
    if full is not None:
        a1.axhline(full, ls="--", c=colour["full"], label="full")
    top = max([full or 0.0] + [v for points in by_method.values() for v in points.values()])
    a1.set_ylim(0, 1.1 * top if top > 0 else 1.0)  # the full-attention line inside the frame
    a1.set(xscale="log", xlabel="token budget", ylabel="suite accuracy", title="accuracy vs budget")
    a1.legend(fontsize=7)
    tasks = sorted({r["task"] for r in report["rows"]})
    budget = 256 if any(r["budget"] == 256 for r in report["rows"]) else max(r["budget"] for r in report["rows"])
    methods = ["full"] + [m for m in by_method]
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        vals = []
        for task in tasks:
            sel = [r["mean"] for r in report["rows"] if r["task"] == task and r["method"] == method
                   and r["budget"] == (0 if method == "full" else budget)]
            vals.append(statistics.mean(sel) if sel else 0.0)
        a2.bar([t + i * width for t in range(len(tasks))], vals, width, label=method, color=colour[method])
    a2.set_xticks([t + (len(methods) - 1) * width / 2 for t in range(len(tasks))], tasks, rotation=30, fontsize=7,
                  ha="right")  # under each group's middle bar
    a2.set(ylabel="accuracy", title=f"per task at budget {budget}")
    a2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI size: passkey + single needle, 2k, 3 cases")
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    ap.add_argument("--lengths", type=int, nargs="+", default=[2000, 4000, 7000])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--cases", type=int, default=20, help="cases per seed, task and length")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--budgets", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--device", default="cpu", help="where the model runs (fp32 on any device, as in CI)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/accuracy.json"))
    ap.add_argument("--resume", action="store_true",
                    help="keep the answers of --out's .partial.json (an interrupted run), or of --out itself "
                         "(a smaller finished one), and do only the rest")
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNG from an existing JSON (--out)")
    ap.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                    help="write --out (JSON and PNG) from these reports' records (cases below --cases, of --methods): "
                         "shards of one suite")
    args = ap.parse_args(argv)
    if args.plot_only:
        plot(json.loads(args.out.read_text()), args.out.with_suffix(".png"))
        return 0
    if args.merge:
        parts = [json.loads(p.read_text()) for p in args.merge]
        missing = [str(p) for p, r in zip(args.merge, parts) if "records" not in r]
        if missing:
            raise SystemExit(f"--merge: {', '.join(missing)} hold no per-case records (written before they were kept)")
        for part in parts:  # keep the cases and methods asked for (a shard may have run further or more)
            part["records"] = [r for r in part["records"] if r["case"] < args.cases and r["method"] in args.methods]
        report = merge(parts)
        report.update({"model": next((r["model"] for r in parts if "model" in r), None),
                       "date": time.strftime("%Y-%m-%d"),
                       "merged_from": [{"file": p.name, "args": r.get("args"), "date": r.get("date"),
                                        "total_wall_s": r.get("total_wall_s")} for p, r in zip(args.merge, parts)]})
        args.out.write_text(json.dumps(report, indent=1))
        plot(report, args.out.with_suffix(".png"))
        print(json.dumps(report["suite_average"], indent=1))
        return 0
    if args.quick:
        args.tasks, args.lengths, args.seeds, args.cases = ["passkey", "niah_single"], [2000], [0], 3
        args.methods, args.budgets = ["full", "icecache", "streaming"], [256]
    start = time.perf_counter()
    engine = Engine.from_pretrained(device=args.device, dtype=torch.float32)
    report = run_to(args.out, args.resume, engine, args.tasks, args.lengths, args.seeds, args.methods, args.budgets,
                    local_cases(engine.tokenizer, args.cases))
    write(report, args, engine, start, show="suite_average")
    return 0


def write(report: dict, args: argparse.Namespace, engine: Engine, start: float, show: str = "by_length",
          **about) -> None:
    """Add the run's facts (model, device, date, wall time, arguments but --out and --cache,
    `about`) to report, print its `show` part, write it to args.out and its plot beside it."""
    report.update({**about, "model": engine.model_id, "device": str(engine.device), "date": time.strftime("%Y-%m-%d"),
                   "total_wall_s": time.perf_counter() - start,
                   "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()
                            if k not in ("out", "cache")}})
    print(json.dumps(report[show], indent=1))
    args.out.write_text(json.dumps(report, indent=1))
    plot(report, args.out.with_suffix(".png"))


if __name__ == "__main__":
    raise SystemExit(main())
