"""`icecache generate | index | bench`: the engine from the command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from icecache.config import IceCacheConfig, SamplingParams


def _engine(args):
    from icecache.engine import Engine
    config = IceCacheConfig(mode=args.mode, token_budget=args.budget)
    print(f"loading {args.model or 'built-in SmolLM2-135M-Instruct'} ...", file=sys.stderr)
    return Engine.from_pretrained(args.model, config=config, device=args.device, context_length=args.context_length)


def _progress(desc: str):
    from tqdm import tqdm
    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = tqdm(total=total, desc=desc, unit="tok", file=sys.stderr)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
    return update


def _read_document(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--file: no such file {path}")
    text = p.read_text(encoding="utf-8", errors="strict")
    if not text.strip():
        raise ValueError(f"--file: {path} is empty")
    return text


def cmd_generate(args) -> int:
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=tuple(args.stop or ()))
    document = _read_document(args.file) if args.file else None  # fail fast, before loading weights
    eng = _engine(args)
    context = eng.index(document, progress=_progress("prefill")) if document is not None else None
    prompt = args.prompt
    if args.chat:
        prompt = eng.chat_ids([{"role": "user", "content": args.prompt}])
    stream = eng.stream(prompt, params, context)
    for piece in stream:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    out = stream.output
    s = out.stats
    prefill_s = context.prefill_s + context.build_s if context is not None else (s["prefill_s"] or 0) + (
        s["index_build_s"] or 0)
    print(f"[{s['mode']}] context {s['context_tokens']} tok + prompt {s['prompt_tokens']} tok -> "
          f"{s['output_tokens']} tok | prefill+index {prefill_s:.2f}s | TTFT {s['ttft_s']:.2f}s | "
          f"TPOT {s['tpot_s'] * 1000:.1f}ms | pages loaded/token {s['pages_loaded_per_token']:.1f} | "
          f"host {s['host_bytes'] / 2**20:.1f} MiB | finish {out.finish_reason}", file=sys.stderr)
    return 0


def cmd_index(args) -> int:
    document = _read_document(args.file)
    eng = _engine(args)
    t0 = time.perf_counter()
    ctx = eng.index(document, progress=_progress("prefill"))
    print(json.dumps({"tokens": ctx.num_tokens, "prefill_s": round(ctx.prefill_s, 3),
                      "index_build_s": round(ctx.build_s, 3), "host_mib": round(ctx.host_bytes / 2**20, 1),
                      "wall_s": round(time.perf_counter() - t0, 3)}))
    return 0


def cmd_bench(args) -> int:
    """Decode speed on a synthetic document of --tokens tokens, IceCache vs full, one run."""
    from icecache.engine import Engine
    base = _engine(args)
    doc = list(range(1000, 1000 + args.tokens))
    ctx = base.index(doc, progress=_progress("prefill"))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    rows = {}
    for mode in ("icecache", "full"):
        eng: Engine = base.with_config(IceCacheConfig(mode=mode, token_budget=args.budget))
        out = eng.generate([42, 43], params, context=ctx)
        rows[mode] = {"tpot_ms": out.stats["tpot_s"] * 1000, "ttft_s": out.stats["ttft_s"],
                      "pages_loaded_per_token": out.stats["pages_loaded_per_token"]}
    rows["speedup"] = rows["full"]["tpot_ms"] / rows["icecache"]["tpot_ms"]
    rows["context_tokens"], rows["prefill_s"] = ctx.num_tokens, ctx.prefill_s
    print(json.dumps(rows, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="icecache", description=__doc__)
    sub = ap.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--model", default=None, help="HF id (cached), local dir or .gguf; default built-in")
        p.add_argument("--budget", type=int, default=256, help="tokens a sparse layer attends to per step")
        p.add_argument("--mode", choices=["icecache", "full"], default="icecache")
        p.add_argument("--device", default="auto")
        p.add_argument("--context-length", type=int, default=None,
                       help="extend the model past its own context to this many tokens (YaRN)")

    g = sub.add_parser("generate", help="answer a prompt, optionally about a document, streaming")
    common(g)
    g.add_argument("--file", help="document to index first; the prompt follows it")
    g.add_argument("--prompt", required=True)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append")
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("index", help="prefill and index a document; print its size and cost")
    common(i)
    i.add_argument("--file", required=True)
    i.set_defaults(func=cmd_index)

    b = sub.add_parser("bench", help="decode speed, IceCache vs full, on a synthetic document")
    common(b)
    b.add_argument("--tokens", type=int, default=4000)
    b.add_argument("--max-tokens", type=int, default=32)
    b.set_defaults(func=cmd_bench)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"icecache: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
