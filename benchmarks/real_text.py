"""Facts planted in real documents, asked on the indexed context, for every page selector.

    python -m benchmarks.real_text --quick                      # CI-sized
    python -m benchmarks.real_text --lengths 2000 4000 7500 --seeds 0 1 2 \\
        --out benchmarks/results/real_text.json

RULER's haystacks repeat one essay collection or one filler line; users hand us licences,
reference manuals and code, which are full of numbers, names and near-repeats that
compete with the fact asked for. The documents here are text that every installation of
the suite has: NumPy's bundled licence file (legal text), Python's language reference
(`pydoc_data.topics`, technical prose) and the source of `argparse` (code). Each case cuts
one of them to about `length` tokens at a line break and plants four facts (a tracking
number, a room, a person, a 36-character ID the answer copies token by token) at four depths
drawn from the seed, each as a line of its own (a comment in code); each fact is one
question on the same indexed context, answered greedily and scored by whether the planted
value appears in the answer.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import inspect
import json
import random
import time
import uuid
from pathlib import Path

import torch

from benchmarks import accuracy
from benchmarks.accuracy import Case
from icecache import Engine

SURNAMES = ("Okafor Lindqvist Moreau Tanaka Haddad Novak Ferreira Kowalski Iyer Brennan Sato Mbeki Castillo "
            "Varga Nakamura Oyelaran Petrov Duarte Halvorsen Quispe").split()
OFFICES = "Lisbon Oslo Nairobi Lima Hanoi Quito Dakar Riga Sofia Tunis Accra Bern Doha Tallinn Minsk".split()


def _numpy_licence() -> str:
    files = importlib.metadata.distribution("numpy").files or []
    path = next(f for f in files if f.name == "LICENSE.txt" and f.parent.name.endswith(".dist-info"))
    return path.read_text()


def _language_reference() -> str:
    from pydoc_data.topics import topics
    return "\n\n".join(topics[name] for name in sorted(topics))


def _argparse_source() -> str:
    import argparse as module
    return inspect.getsource(module)


# name -> (the text, how a planted line reads in it)
DOCUMENTS = {"licence": (_numpy_licence, "{}"), "reference": (_language_reference, "{}"),
             "code": (_argparse_source, "# {}")}


def facts(rng: random.Random) -> list[tuple[str, str, str, int]]:
    """Four (statement, question with its answer prefix, value, tokens to answer in) with
    values from rng; the last value is an ID of about 30 tokens, copied token by token."""
    number, room = str(rng.randint(1000000, 9999999)), str(rng.randint(100, 999))
    person, office = rng.choice(SURNAMES), rng.choice(OFFICES)
    key = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return [
        (f"The internal tracking number of this document is {number}.",
         "What is the internal tracking number of this document? The internal tracking number is", number, 12),
        (f"The signed original of this document is kept in room {room} of the {office} office.",
         "In which room is the signed original of this document kept? It is kept in room", room, 12),
        (f"This document was last reviewed by Dr. {person}.",
         "Who last reviewed this document? It was last reviewed by Dr.", person, 12),
        (f"The archive key of this document is {key}.",
         "What is the archive key of this document? The archive key is", key, 40),
    ]


def plant(text: str, lines: list[str], tokenizer, num_tokens: int, rng: random.Random) -> str:
    """text cut to about num_tokens tokens at a line break, with each of lines inserted as a
    line of its own at a depth drawn from rng (in 0.05..0.95, in order)."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    cut = tokenizer.decode(ids[:num_tokens - 20 * len(lines) - 40])
    rows = cut[:cut.rfind("\n")].split("\n")
    depths = sorted(rng.uniform(0.05, 0.95) for _ in lines)
    for depth, line in sorted(zip(depths, lines), reverse=True):
        rows.insert(max(1, int(depth * len(rows))), line)
    return "\n".join(rows)


def fact_cases(tokenizer) -> callable:
    """make_cases for accuracy.run: (document name, length, seed) -> one case per planted
    fact, all three on the same document (indexed once)."""
    def make(name: str, num_tokens: int, seed: int) -> list[Case]:
        read, form = DOCUMENTS[name]
        rng = random.Random(f"{name}-{num_tokens}-{seed}")
        planted = facts(rng)
        document = plant(read(), [form.format(s) for s, *_ in planted], tokenizer, num_tokens, rng)
        return [Case(document, "\n\nQuestion: " + q, [value], tokens) for _, q, value, tokens in planted]
    return make


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI size: every document at 4000 and 7500 tokens, seed 0, "
                                                         "full attention, the default IceCache and pages by the "
                                                         "bounds alone, at 256")
    ap.add_argument("--documents", nargs="+", default=list(DOCUMENTS), choices=list(DOCUMENTS))
    ap.add_argument("--lengths", type=int, nargs="+", default=[2000, 4000, 7500])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=["full", "icecache", "icecache_bounds", "icecache_rerank4",
                                                     "quest", "oracle", "streaming"], choices=accuracy.METHODS)
    accuracy.add_variant_option(ap)
    ap.add_argument("--budgets", type=int, nargs="+", default=[64, 256, 1024])
    ap.add_argument("--device", default="cpu", help="where the model runs (fp32)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/real_text.json"))
    ap.add_argument("--resume", action="store_true", help="keep the answers of --out's .partial.json or of --out")
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNG from an existing JSON (--out)")
    args = ap.parse_args(argv)
    if args.plot_only:
        accuracy.plot(json.loads(args.out.read_text()), args.out.with_suffix(".png"))
        return 0
    if args.quick:
        args.lengths, args.seeds, args.budgets = [4000, 7500], [0], [256]
        args.methods = ["full", "icecache", "icecache_bounds"]
    args.methods = accuracy.with_variants(args.methods, args.variant)
    start = time.perf_counter()
    engine = Engine.from_pretrained(device=args.device, dtype=torch.float32)
    report = accuracy.run_to(args.out, args.resume, engine, args.documents, args.lengths, args.seeds, args.methods,
                             args.budgets, fact_cases(engine.tokenizer))
    accuracy.write(report, args, engine, start, benchmark="facts planted in real documents")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
