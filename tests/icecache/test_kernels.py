"""The Triton kernels of the sparse decode step against their torch reference.

On this CPU machine they run in Triton's interpreter (exact, slow), so CI checks the
kernels' logic; tests/icecache/test_gpu.py checks them compiled on a GPU."""

import pytest
import torch

from icecache import Engine, IceCacheConfig, SamplingParams
from icecache.cache import RequestKV
from icecache.models import random_model, tiny_config
from icecache.static_decode import StaticDecoder, _SparseState

triton = pytest.importorskip("triton", reason="the kernels need triton (a test dependency)")

# compiled on a GPU machine, interpreted (TRITON_INTERPRET=1, tests/conftest.py) elsewhere
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CONFIG = IceCacheConfig(token_budget=16 + 16 + 4 * 16, page_size=16, sink_tokens=16, window_tokens=16,
                        dense_layers=1, search_width=8, prefill_chunk_tokens=512)


def decoders(monkeypatch, arch: str, doc_tokens: int, question: list[int], steps: int, **overrides):
    """Two decoders over the same indexed context, torch path and Triton path."""
    config = CONFIG.replace(**overrides)
    model = random_model(tiny_config(arch, num_hidden_layers=3, hidden_size=192, num_attention_heads=6,
                                     num_key_value_heads=2),
                         DEVICE, torch.float32)
    eng = Engine.from_model(model, config=config, model_id="tiny")
    ids = torch.randint(0, 500, (doc_tokens,), generator=torch.Generator().manual_seed(doc_tokens)).tolist()
    ctx = eng.index(ids)
    out = []
    for flag in ("0", "1"):
        monkeypatch.setenv("ICECACHE_KERNELS", flag)
        with torch.inference_mode():
            req = RequestKV(eng.shape, eng.config, ctx)
            logits = eng._prefill(req, question, ctx.num_tokens) if question else ctx.last_logits
            out.append((StaticDecoder(eng.model, config, ctx, [(kv.k, kv.v) for kv in req.own], steps), logits))
    return eng, ctx, out


def run(decoder: StaticDecoder, logits: torch.Tensor, start: int, steps: int):
    pages, seen = [], []
    with torch.inference_mode():
        for i in range(steps):
            token = int(logits.argmax())
            logits = decoder.step(token, start + i).clone()
            seen.append(logits)
            pages.append([p.clone() for p in decoder.last_pages if p is not None])
    return pages, torch.stack(seen)


@pytest.mark.parametrize("arch,doc_tokens,question", [("llama", 1500, [5, 6, 7]), ("qwen3", 700, []),
                                                      ("llama", 60, list(range(3, 40)))])
def test_kernel_step_matches_torch_reference(monkeypatch, arch, doc_tokens, question):
    """Same pages every layer and step, same logits: documents with a tree, without one
    (60 tokens: all sinks and tail), questions long enough to start in private pages,
    and decoding past the window so tokens move into private pages mid-run."""
    steps = 40
    eng, ctx, ((ref, logits), (fast, _)) = decoders(monkeypatch, arch, doc_tokens, question, steps)
    assert fast.scratch is not None and ref.scratch is None
    start = ctx.num_tokens + len(question)
    ref_pages, ref_logits = run(ref, logits, start, steps)
    fast_pages, fast_logits = run(fast, logits, start, steps)
    for step, (a, b) in enumerate(zip(ref_pages, fast_pages)):
        for layer, (x, y) in enumerate(zip(a, b)):
            assert torch.equal(x, y), f"step {step}, sparse layer {layer}: {x.tolist()} vs {y.tolist()}"
    assert (ref_logits - fast_logits).abs().max() < 1e-4
    assert int(ref.ring.counts[1]) > 0  # tokens did move into private pages
    assert any((p >= 0).any() for step in ref_pages for p in step)


def test_level_and_page_scores_match_tree_walk():
    """The kernel tree walk keeps the same level-1 clusters as index.tree.tree_keep, on a
    tree with several levels and clusters of many pages."""
    from icecache import kernels
    from icecache.index.tree import build_tree, tree_keep
    H, G, D, n = 2, 3, 32, 6000
    keys = (torch.randn(H, n, D, generator=torch.Generator().manual_seed(0)) * 2).to(DEVICE)
    tree, _ = build_tree(keys, 16, (0.03, 0.2), 16, seed=1)
    assert tree.num_levels >= 3
    q = torch.randn(H, G, D, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    width, scaling = 12, D ** -0.5
    expected = tree_keep(tree, q, width, scaling)
    sizes = kernels.scratch_sizes(H, G, D, [k.shape[1] for k in tree.node_keys], width, tree.num_pages, 0, 1, 1, 16)
    raw, parts, out = (torch.empty(sizes[k], device=DEVICE) for k in ("raw", "parts", "out"))
    keep = None
    for j in range(tree.num_levels, 0, -1):
        parent = tree.node_parent[j - 1] if j < tree.num_levels else None
        score = kernels.level_scores(q, tree.node_keys[j - 1], parent, keep, scaling, raw, parts, out)
        top = score.topk(min(width, score.shape[1]), dim=1)
        keep = torch.zeros(score.shape, dtype=torch.uint8, device=DEVICE).scatter_(1, top.indices,
                                                                     (top.values > float("-inf")).to(torch.uint8))
    assert torch.equal(keep.bool(), expected)


def test_engine_generates_the_same_text_on_either_path(monkeypatch):
    """Through Engine.generate (static path): the kernels change no token."""
    model = random_model(tiny_config("llama", num_hidden_layers=3), DEVICE, torch.float32)
    ids = torch.randint(0, 500, (900,), generator=torch.Generator().manual_seed(3)).tolist()
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    tokens = []
    for flag in ("0", "1"):
        monkeypatch.setenv("ICECACHE_KERNELS", flag)
        eng = Engine.from_model(model, config=CONFIG.replace(decode_path="static"), model_id="tiny")
        tokens.append(eng.generate([9, 10, 11], params, context=eng.index(ids)).token_ids)
    assert tokens[0] == tokens[1] and len(tokens[0]) == 12
