"""RULER, generated and scored by its own code, on every page selector at equal budget.

    python -m benchmarks.ruler --quick                         # CI-sized: 2 tasks, 2k tokens, 2 cases
    python -m benchmarks.ruler --lengths 4096 8192 --seeds 0 1 2 --out benchmarks/results/ruler.json

The cases come from NVIDIA's RULER as packaged in `nvidia-long-context-eval`: its
generator scripts (niah, variable tracking, common and frequent words, QA over SQuAD and
HotpotQA, with the Paul Graham essays as haystack, all shipped in the package) run as
its own prepare step runs them, with the 13 tasks of its synthetic.yaml, its task
templates and answer prefixes (the "base" model template), the engine's tokenizer, and
a fixed seed per (task, length, seed). Each sample is scored by the package's metric for
its task (string_match_all, or string_match_part for QA) after its own post-processing.

One substitution: the essay haystack splits sentences with nltk's punkt model, which
nltk downloads at run time; the generators get benchmarks/ruler_offline/nltk instead, a
regular-expression splitter (it only decides where needles go between sentences).

Each sample's prompt is cut where its context ends: the document (the task's preamble and
the haystack) is indexed once per layout, and the question (the rest of the template and
its answer prefix) is asked on the indexed context by every method of
benchmarks/accuracy.py, so only the choice of pages differs. The report (JSON + PNG next to
--out) has per task and length the mean and spread over seeds, retention against full
attention, and per length and method the paired difference against full with a 95%
bootstrap interval; it keeps every answer, so an interrupted run resumes (--resume).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from benchmarks import accuracy
from benchmarks.accuracy import Case
from icecache import Engine

SHIMS = Path(__file__).parent / "ruler_offline"
METHODS = ("full", "icecache", "icecache_rerank4", "quest", "oracle", "streaming", "random")
_CONTROL = re.compile(r"[\x00-\x1f]")


def package_dir() -> Path:
    try:
        import long_context_eval
    except ImportError as e:
        raise SystemExit("benchmarks/ruler.py needs RULER's generators: pip install --no-deps "
                         "nvidia-long-context-eval wonderwords tenacity (the bench extra)") from e
    return Path(long_context_eval.__file__).parent


def task_specs() -> dict[str, dict]:
    """The package's 13 tasks: name -> {task, args, template, answer_prefix, tokens_to_generate}."""
    from long_context_eval.data.synthetic.constants import TASKS
    configured = yaml.safe_load((package_dir() / "synthetic.yaml").read_text())
    return {name: {**spec, **TASKS[spec["task"]]} for name, spec in configured.items()}


def prompt_template(spec: dict) -> str:
    """The "base" model template around the task's template, plus its answer prefix."""
    from long_context_eval.data.template import Templates
    return Templates["base"].format(task_template=spec["template"]) + spec.get("answer_prefix", "")


def generate(name: str, spec: dict, length: int, seed: int, samples: int, tokenizer_dir: Path,
             cache: Path) -> list[dict]:
    """`samples` RULER samples ({input, outputs, ...}) of task `name` at `length` tokens
    (prompt plus the task's output budget), from the package's generator; cached on disk."""
    out_dir = cache / f"{name}-{length}-seed{seed}-n{samples}"
    path = out_dir / name / "validation.jsonl"
    if not path.exists():
        script = package_dir() / "data" / "synthetic" / f"{spec['task']}.py"
        argv = [sys.executable, str(script), "--save_dir", str(out_dir), "--save_name", name,
                "--subset", "validation", "--tokenizer_path", str(tokenizer_dir), "--tokenizer_type", "hf",
                "--max_seq_length", str(length), "--tokens_to_generate", str(spec["tokens_to_generate"]),
                "--num_samples", str(samples), "--random_seed", str(42 + seed), "--template", prompt_template(spec)]
        for key, value in spec["args"].items():
            argv += [f"--{key}", str(value)]
        if spec["task"] == "qa":  # each seed its own questions
            argv += ["--pre_samples", str(seed * samples)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SHIMS), os.environ.get("PYTHONPATH", "")])}
        done = subprocess.run(argv, env=env, capture_output=True, text=True)
        if done.returncode != 0 or not path.exists():
            raise RuntimeError(f"RULER's generator for {name} at {length} failed:\n{done.stderr[-2000:]}")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def split(prompt: str, spec: dict) -> tuple[str, str]:
    """(document, question): the prompt cut where the template's text after {context}
    starts, found by its line breaks (the generators reword that text, e.g. into the
    singular, but keep its lines, and the values put in it have none)."""
    breaks = prompt_template(spec).split("{context}", 1)[1].count("\n")
    cut = len(prompt)
    for _ in range(breaks):
        cut = prompt.rfind("\n", 0, cut)
    if breaks == 0 or cut <= 0:
        raise ValueError(f"cannot find where the context ends in a {spec['task']} prompt")
    return prompt[:cut], prompt[cut:]


def ruler_cases(specs: dict, samples: int, tokenizer_dir: Path, cache: Path, max_tokens: int | None):
    def make(name: str, length: int, seed: int) -> list[Case]:
        spec = specs[name]
        cases = []
        for sample in generate(name, spec, length, seed, samples, tokenizer_dir, cache):
            document, question = split(sample["input"], spec)
            budget = spec["tokens_to_generate"] if max_tokens is None else min(max_tokens, spec["tokens_to_generate"])
            cases.append(Case(document, question, list(sample["outputs"]), budget))
        return cases
    return make


def scorer(specs: dict):
    """The package's per-sample metric for the task, on its post-processed prediction, in [0, 1]."""
    from long_context_eval.eval.synthetic.constants import TASKS as METRICS

    def score(name: str, text: str, answers: list[str]) -> float:
        pred = _CONTROL.sub("\n", text.strip()).strip()  # the package's postprocess_pred
        return METRICS[specs[name]["task"]]["metric_fn_per_sample"]([pred], [answers])[0] / 100
    return score


def main(argv=None) -> int:
    specs = task_specs()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI size: 2 tasks, 2k tokens, 2 cases, 3 methods at 256")
    ap.add_argument("--tasks", nargs="+", default=list(specs), choices=list(specs))
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--samples", type=int, default=1, help="samples per task, length and seed")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=accuracy.METHODS)
    accuracy.add_variant_option(ap)
    ap.add_argument("--budgets", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--max-tokens", type=int, default=None, help="cap the tasks' own output lengths")
    ap.add_argument("--device", default="cpu", help="where the model runs (fp32)")
    ap.add_argument("--context-length", type=int, default=None,
                    help="lengths past the model's own context: extend it to this many tokens (YaRN), the same "
                         "for every method; default: the longest of --lengths")
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "icecache" / "ruler",
                    help="generated samples, kept between runs")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/ruler.json"))
    ap.add_argument("--resume", action="store_true",
                    help="keep the answers of --out's .partial.json (an interrupted run), or of --out itself "
                         "(a smaller finished one), and do only the rest")
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNG from an existing JSON (--out)")
    ap.add_argument("--generate-only", action="store_true",
                    help="only generate the cases into --cache (e.g. here, to answer them on a machine without "
                         "RULER's generator dependencies: benchmarks/gpu_ruler.sh)")
    args = ap.parse_args(argv)
    if args.plot_only:
        accuracy.plot(json.loads(args.out.read_text()), args.out.with_suffix(".png"))
        return 0
    if args.quick:
        args.tasks, args.lengths, args.seeds, args.samples = ["niah_single_1", "niah_single_2"], [2048], [0], 2
        args.methods, args.budgets, args.max_tokens = ["full", "icecache", "streaming"], [256], 32
    args.methods = accuracy.with_variants(args.methods, args.variant)
    start = time.perf_counter()
    engine = Engine.from_pretrained(device=args.device, dtype=torch.float32,
                                    context_length=args.context_length or max(args.lengths))
    tokenizer_dir = args.cache / "tokenizer"
    engine.tokenizer.save_pretrained(tokenizer_dir)
    if args.generate_only:
        for name in args.tasks:
            for n in args.lengths:
                for seed in args.seeds:
                    generate(name, specs[name], n, seed, args.samples, tokenizer_dir, args.cache)
        print(f"cases of {len(args.tasks)} tasks x {len(args.lengths)} lengths x {len(args.seeds)} seeds "
              f"in {args.cache}")
        return 0
    report = accuracy.run_to(args.out, args.resume, engine, args.tasks, args.lengths, args.seeds, args.methods,
                             args.budgets, ruler_cases(specs, args.samples, tokenizer_dir, args.cache, args.max_tokens),
                             scorer(specs))
    accuracy.write(report, args, engine, start,
                   benchmark="RULER (nvidia-long-context-eval, synthetic.yaml, base template)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
