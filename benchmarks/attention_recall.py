"""How much of the exact attention mass do IceCache's pages capture?

On SmolLM2 real activations over a long document: at each decode step and sparse
layer, the share of the softmax attention mass over the document's middle tokens
that falls in the pages IceCache selects, against the best possible pages of the
same layout at the same budget (oracle), and against the best contiguous pages
(what a positional page layout could reach at best). Writes JSON + PNG.

    python benchmarks/attention_recall.py --tokens 7000 --steps 16
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import sysconfig
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from icecache import Engine, IceCacheConfig  # noqa: E402
from icecache.internals import RequestKV, StepBatch, select_pages  # noqa: E402


def code_document(tokenizer, num_tokens: int) -> str:
    """A real code base: the standard library's own source, as long as needed."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    text, size = [], 0
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            chunk = f"\n# ==== {os.path.basename(path)} ====\n" + f.read()
        text.append(chunk)
        size += len(chunk) // 3
        if size > num_tokens * 2:
            break
    ids = tokenizer("".join(text), add_special_tokens=False).input_ids[:num_tokens]
    return tokenizer.decode(ids)


def page_mass(q: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, scaling: float) -> torch.Tensor:
    """Share of each page in the softmax mass over all valid page slots, per query head.
    q: [H, g, D]; keys: [H, N, P, D]; valid: [H, N] -> [H, g, N]."""
    P = keys.shape[2]
    s = torch.einsum("hgd,hnpd->hgnp", q.float(), keys.float()) * scaling
    ok = torch.arange(P) < valid[..., None]  # [H, N, P]
    s = s.masked_fill(~ok[:, None], float("-inf"))
    p = torch.softmax(s.flatten(2), dim=-1).view_as(s)
    return p.sum(-1)


class Recorder(RequestKV):
    """A request that, at every sparse decode step, measures its page selection."""

    def __init__(self, *args, positional, **kwargs):
        super().__init__(*args, **kwargs)
        self.positional = positional  # layer -> (keys [H, N, P, D], valid [H, N]) in text order
        self.rows: list[dict] = []

    def decode_attend(self, layer, q, k, v, scaling):
        if layer in self.sparse:
            H, g = self.shape.num_kv_heads, self.shape.group
            qg = q.view(H, g, -1).cpu()
            ctx = self.context.sparse[layer]
            R = self.config.retrieved_pages
            mass = page_mass(qg, ctx.pages.keys, ctx.pages.valid, scaling)  # [H, g, N]
            chosen = select_pages(ctx.tree.to(torch.device("cpu")), None, qg, R, self.config.search_width, scaling)
            got = torch.stack([mass[h][:, chosen[h][chosen[h] >= 0]].sum(-1) for h in range(H)])  # [H, g]
            best_union = mass.sum(1).topk(min(R, mass.shape[-1]), dim=-1).indices  # GQA-shared pages
            oracle = mass.gather(2, best_union[:, None].expand(H, g, best_union.shape[1])).sum(-1)
            pk, pv = self.positional[layer]
            pmass = page_mass(qg, pk, pv, scaling)
            pbest = pmass.sum(1).topk(min(R, pmass.shape[-1]), dim=-1).indices
            positional = pmass.gather(2, pbest[:, None].expand(H, g, pbest.shape[1])).sum(-1)
            self.rows.append({"layer": layer, "icecache": got.mean().item(), "oracle": oracle.mean().item(),
                              "positional_oracle": positional.mean().item()})
        return super().decode_attend(layer, q, k, v, scaling)


def positional_pages(ctx, page_size: int):
    """The same middle tokens in text order, cut into contiguous pages."""
    out = {}
    for layer, s in ctx.sparse.items():
        H, _, P, D = s.pages.keys.shape
        pos = s.pages.positions.reshape(H, -1)
        ok = pos >= 0
        n = int(ok[0].sum())
        order = pos.masked_fill(~ok, 1 << 40).argsort(dim=1)[:, :n]
        keys = s.pages.keys.reshape(H, -1, D).gather(1, order[..., None].expand(H, n, D))
        num = (n + page_size - 1) // page_size
        padded = torch.zeros(H, num * page_size, D, dtype=keys.dtype)
        padded[:, :n] = keys
        valid = torch.full((H, num), page_size)
        valid[:, -1] = n - (num - 1) * page_size
        out[layer] = (padded.view(H, num, page_size, D), valid)
    return out


@torch.inference_mode()
def run(args) -> dict:
    config = IceCacheConfig(token_budget=args.budget, promotion_ratio=tuple(args.ratios))
    eng = Engine.from_pretrained(config=config, device="cpu")
    doc = code_document(eng.tokenizer, args.tokens)
    t0 = time.perf_counter()
    ctx = eng.index(doc)
    index_s = time.perf_counter() - t0
    question = "\n\n# Question: which functions above parse command-line arguments? Answer:"
    q_ids = eng.tokenizer(question, add_special_tokens=False).input_ids
    req = Recorder(eng.shape, eng.config, ctx, positional=positional_pages(ctx, config.page_size))
    logits = eng.runner.prefill_one(req, q_ids, ctx.num_tokens)
    req.start_decode()
    batch, pos = StepBatch([req]), ctx.num_tokens + len(q_ids)
    for _ in range(args.steps):
        token = int(logits.argmax())
        logits = eng.runner.forward(batch, torch.tensor([[token]]), torch.tensor([[pos]]))[0]
        pos += 1
    layers = sorted({r["layer"] for r in req.rows})
    per_layer = {}
    for layer in layers:
        rows = [r for r in req.rows if r["layer"] == layer]
        per_layer[layer] = {key: sum(r[key] for r in rows) / len(rows)
                            for key in ("icecache", "oracle", "positional_oracle")}
    mean = {key: sum(v[key] for v in per_layer.values()) / len(per_layer)
            for key in ("icecache", "oracle", "positional_oracle")}
    return {"model": eng.model_id, "document": "python stdlib source", "context_tokens": ctx.num_tokens,
            "budget": args.budget, "retrieved_pages": config.retrieved_pages,
            "promotion_ratio": list(config.promotion_ratio), "decode_steps": args.steps,
            "index_s": round(index_s, 2), "mean": mean,
            "icecache_vs_oracle": mean["icecache"] / mean["oracle"], "per_layer": per_layer}


def plot(result: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    layers = sorted(result["per_layer"], key=int)
    fig, ax = plt.subplots(figsize=(11, 4))
    width = 0.28
    for i, key in enumerate(("icecache", "oracle", "positional_oracle")):
        ax.bar([int(l) + (i - 1) * width for l in layers], [result["per_layer"][l][key] for l in layers],
               width, label=key)
    ax.set_xlabel("layer")
    ax.set_ylabel("share of middle-token attention mass")
    ax.set_title(f"{result['model']}, {result['context_tokens']} tokens, budget {result['budget']} "
                 f"({result['retrieved_pages']} pages): IceCache / oracle = {result['icecache_vs_oracle']:.3f}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=7000)
    ap.add_argument("--budget", type=int, default=256)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--ratios", type=float, nargs="+", default=list(IceCacheConfig().promotion_ratio))
    ap.add_argument("--out", default="benchmarks/results/attention_recall.json")
    args = ap.parse_args()
    result = run(args)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    plot(result, args.out.replace(".json", ".png"))
    print(f"{'layer':>5} {'icecache':>9} {'oracle':>8} {'positional':>10}")
    for layer, v in sorted(result["per_layer"].items()):
        print(f"{layer:>5} {v['icecache']:9.3f} {v['oracle']:8.3f} {v['positional_oracle']:10.3f}")
    m = result["mean"]
    print(f" mean {m['icecache']:9.3f} {m['oracle']:8.3f} {m['positional_oracle']:10.3f}   "
          f"icecache/oracle = {result['icecache_vs_oracle']:.3f}   -> {args.out}")


if __name__ == "__main__":
    main()
