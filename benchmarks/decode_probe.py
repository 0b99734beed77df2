"""A first look at GPU decode speed (the full benchmark is issue 5's decode_speed.py):
Llama-3.1-8B shape, random bf16 weights, one context per length, IceCache vs mode="full",
TPOT and index cost, in one run. Writes JSON (+ PNG) next to --out.

    python benchmarks/decode_probe.py --contexts 8192 16384 --out $OUT/decode_probe.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from icecache import Engine, IceCacheConfig, SamplingParams  # noqa: E402


def llama8b_shape(layers: int):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                       max_position_embeddings=131072, rope_theta=500000.0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 16384])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--out", default="benchmarks/results/decode_probe.json")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(llama8b_shape(args.layers), dtype=torch.bfloat16)
    base = Engine.from_model(model, config=IceCacheConfig(prefill_chunk_tokens=4096), model_id="llama8b-random")
    params = SamplingParams(max_tokens=args.tokens, temperature=0.0, ignore_eos=True)
    rows = []
    for n in args.contexts:
        ids = torch.randint(0, 128000, (n,), generator=torch.Generator().manual_seed(n)).tolist()
        t0 = time.perf_counter()
        ctx = base.index(ids)
        row = {"context": n, "prefill_s": ctx.prefill_s, "index_build_s": ctx.build_s,
               "host_gib": ctx.host_bytes / 2**30, "wall_index_s": time.perf_counter() - t0}
        for mode in ("icecache", "full"):
            eng = base.with_config(IceCacheConfig(mode=mode, prefill_chunk_tokens=4096))
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            out = eng.generate([1, 2, 3], params, context=ctx)
            row[mode] = {"tpot_ms": out.stats["tpot_s"] * 1e3, "ttft_s": out.stats["ttft_s"],
                         "pages_loaded_per_token": out.stats["pages_loaded_per_token"],
                         "peak_extra_gib": (torch.cuda.max_memory_allocated() - before) / 2**30}
        row["full_over_icecache_tpot"] = row["full"]["tpot_ms"] / row["icecache"]["tpot_ms"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        del ctx
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    result = {"device": torch.cuda.get_device_name(), "model": "Llama-3.1-8B shape, random bf16",
              "layers": args.layers, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in ("icecache", "full"):
        ax.plot([r["context"] for r in rows], [r[mode]["tpot_ms"] for r in rows], "o-", label=mode)
    ax.set_xlabel("context tokens")
    ax.set_ylabel("TPOT (ms)")
    ax.set_title(f"{result['device']}: decode probe (torch backend)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out.replace(".json", ".png"), dpi=110)


if __name__ == "__main__":
    main()
