"""The Triton kernels of the sparse decode step against their torch reference.

On this CPU machine they run in Triton's interpreter (exact, slow), so CI checks the
kernels' logic; tests/icecache/test_gpu.py checks them compiled on a GPU."""

import pytest
import torch

from icecache import Engine, IceCacheConfig, SamplingParams
from icecache.cache import RequestKV
from icecache.testing import random_model, tiny_config
from icecache.static_decode import StaticDecoder

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
            logits = eng.runner.prefill_one(req, question, ctx.num_tokens) if question else ctx.last_logits
            out.append((StaticDecoder(eng.model, config, ctx, [(kv.k, kv.v) for kv in req.own], steps,
                                      question_pages=req.question_pages), logits))
    return eng, ctx, out


def run(decoder: StaticDecoder, logits: torch.Tensor, start: int, steps: int):
    pages, seen = [], []
    with torch.inference_mode():
        for i in range(steps):
            token = int(logits.argmax())
            logits = decoder.step(token, start + i).clone()
            seen.append(logits)
            # as sets: the kernels list a layer's pages by id, the torch path best first
            pages.append([p.sort(dim=1).values for p in decoder.last_pages if p is not None])
    return pages, torch.stack(seen)


@pytest.mark.parametrize("arch,doc_tokens,question,reuse,row_programs,heads", [
    ("llama", 1500, [5, 6, 7], 1, None, "sum"), ("qwen3", 700, [], 1, None, "sum"),
    ("llama", 60, list(range(3, 40)), 1, None, "sum"), ("llama", 900, [5, 6], 2, None, "sum"),
    ("llama", 1500, [5, 6, 7], 1, 1, "sum"), ("llama", 1500, [5, 6, 7], 1, None, "max")])
def test_kernel_step_matches_torch_reference(monkeypatch, arch, doc_tokens, question, reuse, row_programs, heads):
    """Same pages every layer and step, same logits: documents with a tree, without one
    (60 tokens: all sinks and tail), questions long enough to start in private pages,
    decoding past the window so tokens move into private pages mid-run, IceCache-reuse,
    one scoring program per row looping over all its chunks (as in a big batch), and
    pages ranked by the query heads' largest bound (page_heads="max")."""
    from icecache import kernels
    if row_programs is not None:
        monkeypatch.setattr(kernels, "_ROW_PROGRAMS", row_programs)
    steps = 24
    eng, ctx, ((ref, logits), (fast, _)) = decoders(monkeypatch, arch, doc_tokens, question, steps,
                                                    reuse_layers=reuse, page_heads=heads)
    assert fast.scratch is not None and ref.scratch is None
    start = ctx.num_tokens + len(question)
    ref_pages, ref_logits = run(ref, logits, start, steps)
    fast_pages, fast_logits = run(fast, logits, start, steps)
    for step, (a, b) in enumerate(zip(ref_pages, fast_pages)):
        for layer, (x, y) in enumerate(zip(a, b)):
            assert torch.equal(x, y), f"step {step}, sparse layer {layer}: {x.tolist()} vs {y.tolist()}"
    assert (ref_logits - fast_logits).abs().max() < 1e-4
    assert int(ref.ring.counts[0, 1]) > 0  # tokens did move into private pages
    assert any((p >= 0).any() for step in ref_pages for p in step)


@pytest.mark.parametrize("selector,rerank,question", [("quest", 1, 0), ("oracle", 1, 0), ("random", 1, 0),
                                                      ("streaming", 1, 0), ("icecache", 3, 0), ("icecache", 1, 3),
                                                      ("icecache", 2, 4)])
def test_torch_selectors_attend_through_the_kernels(monkeypatch, selector, rerank, question):
    """The comparison selectors run as torch ops on the Triton path too, and the
    re-ranking of the kernels' candidate pages (with the question's pages among them, if
    any) as its own kernel; it attends over what they pick (StreamingLLM: a window ring as
    wide as the budget past the sinks) and must give the torch path's logits, with the
    same pages, as tokens move into private pages."""
    steps = 20
    eng, ctx, ((ref, logits), (fast, _)) = decoders(monkeypatch, "llama", 900, [5, 6, 7], steps, selector=selector,
                                                    rerank=rerank, question_pages=question)
    if question:  # the question picked real pages, which are candidates in both decoders
        assert all((s.question[0] >= 0).any() for s in ref.sparse_states)
    assert fast.scratch is not None and ref.scratch is None
    ref_pages, ref_logits = run(ref, logits, ctx.num_tokens + 3, steps)
    fast_pages, fast_logits = run(fast, logits, ctx.num_tokens + 3, steps)
    assert all(torch.equal(x, y) for a, b in zip(ref_pages, fast_pages) for x, y in zip(a, b))
    assert (ref_logits - fast_logits).abs().max() < 1e-4
    picked = sum(int((p >= 0).sum()) for step in ref_pages for p in step)
    assert picked == 0 if selector == "streaming" else picked > 0
    if selector == "streaming":
        assert ref.ring.window == CONFIG.token_budget - CONFIG.sink_tokens


@pytest.mark.parametrize("width,row_programs,dtype", [
    (6, None, torch.float32), (16, 1, torch.float32),
    pytest.param(6, None, torch.bfloat16, marks=pytest.mark.gpu)])  # tensor-core bf16 dots: the GPU
def test_kernel_tree_walk_keeps_the_same_clusters(monkeypatch, width, row_programs, dtype):
    """The kernel tree walk keeps the same level-1 clusters as index.tree.tree_keep, on a
    tree with several levels and clusters of many pages, for two requests sharing the
    tree (rows = request x KV head) with different queries; with a beam as wide as the top
    level (which the plan then skips), one scoring program per row, and bf16 keys and
    queries (tensor-core dots)."""
    from icecache import kernels
    if row_programs is not None:
        monkeypatch.setattr(kernels, "_ROW_PROGRAMS", row_programs)
    from icecache.index.tree import build_tree, tree_keep
    H, G, D, n, B = 2, 3, 32, 6000, 2
    keys = (torch.randn(H, n, D, generator=torch.Generator().manual_seed(0)) * 2).to(DEVICE, dtype)
    tree, _ = build_tree(keys, 16, (0.03, 0.2), 16, seed=1)
    assert tree.num_levels >= 3
    q = torch.randn(B * H, G, D, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    scaling = D ** -0.5
    plan = kernels.WalkPlan(tree, width)
    assert len(plan.levels) == tree.num_levels - (tree.level_sizes()[-1] <= width)
    sizes = kernels.scratch_sizes(B * H, G, D, plan, 0, 0, 1, 1, 16)
    scratch = {k: torch.empty(sizes[k], dtype=kernels.SCRATCH_DTYPES.get(k, torch.float32), device=DEVICE)
               for k in ("raw", "cand", "parts", "tops")}
    root = torch.zeros(B * H, dtype=torch.int32, device=DEVICE)
    top = kernels.walk_tree(q, plan, root, scaling, scratch["raw"], scratch["cand"], scratch["parts"], scratch["tops"])
    for b in range(B):
        expected = tree_keep(tree, q[b * H:(b + 1) * H].float(), width, scaling)
        got = top[b * H:(b + 1) * H].long().sort(dim=1).values
        assert torch.equal(got, expected.nonzero()[:, 1].view(H, width)), f"request {b}"


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


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_fused_norm_and_rope_equal_the_modules(arch):
    """RMSNorm and rotary embedding as single kernels give what transformers' modules give,
    in fp32 and, on a GPU, in bf16 (where they must round after each product, as torch
    does; Triton's interpreter mishandles bf16 memory, so CPU CI checks fp32 only)."""
    from icecache.model_kernels import can_fuse_norm, rms_norm, rope
    for dtype in (torch.float32, torch.bfloat16) if DEVICE.type == "cuda" else (torch.float32,):
        model = random_model(tiny_config(arch, num_hidden_layers=1), DEVICE, dtype)
        layer, D = model.model.layers[0], model.config.head_dim
        h = torch.randn(1, 1, model.config.hidden_size, generator=torch.Generator().manual_seed(0)).to(DEVICE, dtype)
        norm = layer.input_layernorm
        assert can_fuse_norm(norm, h)
        with torch.no_grad():
            norm.weight.normal_()
            assert torch.equal(rms_norm(h, norm), norm(h))
            positions = torch.tensor([[1234], [5], [77777]], device=DEVICE)  # a batch of 3 tokens
            cos, sin = model.model.rotary_emb(h, positions)  # [3, 1, D]
            q = torch.randn(3, 1, 4, D, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
            k = torch.randn(3, 1, 2, D, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
            module = __import__(type(layer.self_attn).__module__, fromlist=["apply_rotary_pos_emb"])
            ref_q, ref_k = module.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            got_q, got_k = rope(q.view(3, 4, D), k.view(3, 2, D), cos.view(3, D), sin.view(3, D))
        # bf16: the last two bits may round differently than transformers' expression does;
        # a wrong partner or sign is off by the value's own size
        tol = 1e-6 if dtype == torch.float32 else 2 ** -5
        for got, ref in ((got_q, ref_q[:, :, 0]), (got_k, ref_k[:, :, 0])):
            assert torch.allclose(got.float(), ref.float(), atol=tol, rtol=tol), (got - ref).abs().max()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fused_add_norm_mlp_and_merged_projections_equal_the_modules(arch):
    """The residual add folded into RMSNorm, silu(gate) * up as one kernel, and q/k/v (and
    gate/up) merged into one weight give what the modules give; the modules, now views
    into the merged weight, still give what they gave, and merging twice reuses it."""
    from icecache.model_kernels import add_rms_norm, merge_linears, rope, silu_mul
    model = random_model(tiny_config(arch, num_hidden_layers=1), DEVICE, torch.float32)
    layer, D = model.model.layers[0], model.config.head_dim
    attn, mlp = layer.self_attn, layer.mlp
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(3, 1, model.config.hidden_size, generator=gen).to(DEVICE)
    delta = torch.randn(3, 1, model.config.hidden_size, generator=gen).to(DEVICE)
    with torch.no_grad():
        norm = layer.post_attention_layernorm
        norm.weight.normal_()
        if attn.q_proj.bias is not None:
            for m in (attn.q_proj, attn.k_proj, attn.v_proj):
                m.bias.normal_()
        ref_h = h + delta
        ref_x = norm(ref_h)
        got_x = add_rms_norm(h, delta, norm)
        assert torch.allclose(h, ref_h, atol=1e-6) and torch.allclose(got_x, ref_x, atol=1e-5, rtol=1e-5)
        ref = [m(got_x) for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
        ref_mlp = mlp(got_x)
        qkv = merge_linears([attn.q_proj, attn.k_proj, attn.v_proj])
        assert merge_linears([attn.q_proj, attn.k_proj, attn.v_proj])[0] is qkv[0]
        assert attn.q_proj.weight.data_ptr() == qkv[0].data_ptr()  # a view: no second copy
        got = torch.nn.functional.linear(got_x, *qkv).split([r.shape[-1] for r in ref], dim=-1)
        for g_, r in zip(got, ref):
            assert torch.allclose(g_, r, atol=1e-5, rtol=1e-5)
        assert torch.allclose(attn.k_proj(got_x), ref[1], atol=1e-6)  # the module alone, unchanged
        gate_up = merge_linears([mlp.gate_proj, mlp.up_proj])
        got_mlp = mlp.down_proj(silu_mul(torch.nn.functional.linear(got_x, *gate_up)))
        assert torch.allclose(got_mlp, ref_mlp, atol=1e-5, rtol=1e-5)
        # rope reads q and k straight from the merged output (each token's heads contiguous)
        cos, sin = model.model.rotary_emb(h, torch.tensor([[3], [900], [41]], device=DEVICE))
        Hq, Hk = model.config.num_attention_heads, model.config.num_key_value_heads
        q, k = got[0].view(3, Hq, D), got[1].view(3, Hk, D)
        assert not q.is_contiguous()
        got_q, got_k = rope(q, k, cos.view(3, D), sin.view(3, D))
        ref_q, ref_k = rope(q.contiguous(), k.contiguous(), cos.view(3, D), sin.view(3, D))
        assert torch.equal(got_q, ref_q) and torch.equal(got_k, ref_k)
    assert merge_linears([attn.q_proj, torch.nn.Identity()]) is None


@pytest.mark.parametrize("kernels", ["0", "1"])
def test_batched_slots_give_each_request_what_it_gets_alone(monkeypatch, kernels):
    """One decoder, three slots on one context: requests join at different steps (one with
    a question long enough to start in private pages), the first leaves and the last slot
    moves into its place; every request's logits equal those of running it alone."""
    monkeypatch.setenv("ICECACHE_KERNELS", kernels)
    model = random_model(tiny_config("llama", num_hidden_layers=3, hidden_size=192, num_attention_heads=6,
                                     num_key_value_heads=2), DEVICE, torch.float32)
    eng = Engine.from_model(model, config=CONFIG, model_id="tiny")
    ids = torch.randint(0, 500, (1500,), generator=torch.Generator().manual_seed(5)).tolist()
    ctx = eng.index(ids)
    questions, joins, steps = [[5, 6, 7], list(range(3, 40)), [8]], [0, 2, 4], [8, 12, 10]
    prefilled = []
    with torch.inference_mode():
        for q in questions:
            req = RequestKV(eng.shape, eng.config, ctx)
            prefilled.append(([(kv.k, kv.v) for kv in req.own], eng.runner.prefill_one(req, q, ctx.num_tokens)))
        alone = []
        for (own, logits), q, n in zip(prefilled, questions, steps):
            dec = StaticDecoder(eng.model, CONFIG, ctx, own, n)
            alone.append(run(dec, logits, ctx.num_tokens + len(q), n)[1])
        batch = StaticDecoder(eng.model, CONFIG, ctx, slots=3, slot_tokens=64)
        assert (batch.scratch is not None) == (kernels == "1")
        slots, got, last = [], [[] for _ in questions], [lg for _, lg in prefilled]
        for t in range(max(j + n for j, n in zip(joins, steps))):
            for r, j in enumerate(joins):
                if j == t:
                    batch.load(len(slots), prefilled[r][0], steps[r])
                    slots.append(r)
            if not slots:
                continue
            tokens = [int(last[r].argmax()) for r in slots]
            positions = [ctx.num_tokens + len(questions[r]) + len(got[r]) for r in slots]
            logits = batch.step_batch(tokens, positions).clone()
            for b, r in enumerate(slots):
                got[r].append(logits[b])
                last[r] = logits[b]
            for r in [r for r in slots if len(got[r]) == steps[r]]:  # finished: the last slot moves in
                i = slots.index(r)
                batch.move(len(slots) - 1, i)
                slots[i] = slots[-1]
                slots.pop()
    for r in range(len(questions)):
        assert len(got[r]) == steps[r]
        diff = (torch.stack(got[r]) - alone[r]).abs().max()
        assert diff < 1e-4, f"request {r}: logits differ by {diff}"


@pytest.mark.gpu
def test_after_precompile_a_document_of_another_shape_compiles_nothing():
    """Walks over two trees of very different widths after precompile(): no kernel compiles
    on the second (sizes are not specialized on; the widths' variants were built)."""
    from icecache import kernels
    from icecache.index.tree import build_tree

    def compiled() -> int:
        return sum(len(cache[0]) for k in (kernels._select_compact, kernels._child_scores)
                   for cache in k.device_caches.values())

    def walk(n: int, seed: int) -> None:
        keys = (torch.randn(2, n, 32, generator=torch.Generator().manual_seed(seed)) * 2).to(DEVICE, torch.bfloat16)
        plan = kernels.WalkPlan(build_tree(keys, 16, (0.03, 0.2), 16, seed=seed)[0], 8)
        sizes = kernels.scratch_sizes(2, 3, 32, plan, 0, 0, 1, 1, 16)
        scratch = [torch.empty(sizes[k], dtype=kernels.SCRATCH_DTYPES.get(k, torch.float32), device=DEVICE)
                   for k in ("raw", "cand", "parts", "tops")]
        q = torch.randn(2, 3, 32, device=DEVICE, dtype=torch.bfloat16)
        kernels.walk_tree(q, plan, torch.zeros(2, dtype=torch.int32, device=DEVICE), 0.2, *scratch)

    walk(3000, 0)
    assert kernels.precompile(8, widest=4096) > 0
    before = compiled()
    walk(60000, 1)
    assert compiled() == before


@pytest.mark.parametrize("num_shared", [40, 0])
def test_fused_rerank_keeps_the_pages_the_torch_reference_keeps(num_shared):
    """rerank_kernel.rerank_pages = index.tree.rerank_pages: same pages, same order, over
    shared and private candidates, with absent (-1) and empty candidates among them."""
    from icecache.index.tree import rerank_pages as reference
    from icecache.rerank_kernel import rerank_pages
    gen = torch.Generator().manual_seed(num_shared)
    B, HS, G, D, P, M, C, R = 2, 2, 3, 16, 16, 6, 12, 4
    rows = B * HS
    q = torch.randn(rows, G, D, generator=gen)
    shared_k = torch.randn(HS, num_shared, P, D, generator=gen).to(torch.bfloat16)
    shared_valid = torch.randint(1, P + 1, (HS, num_shared), generator=gen)
    if num_shared:
        shared_valid[:, 3] = 0  # an empty page among the candidates
    priv_k = torch.randn(rows, M, P, D, generator=gen)
    priv_valid = torch.randint(0, P + 1, (rows, M), generator=gen)
    candidates = torch.stack([torch.randperm(num_shared + M, generator=gen)[:C] for _ in range(rows)]).to(torch.int32)
    candidates[:, -2:] = -1
    candidates[1, 4] = candidates[1, 1]  # a page named twice (a question's page the bounds picked too) counts once
    if num_shared:
        candidates[0, 0] = 3
    want = reference(q, candidates.long(), (shared_k, shared_valid), (priv_k, priv_valid), R, 0.25)
    got = rerank_pages(*(t.to(DEVICE) for t in (q, candidates, shared_k, shared_valid, priv_k, priv_valid)), R, 0.25)
    assert got.dtype == torch.int32
    assert torch.equal(got.cpu().long(), want), (got, want)
    assert (got >= 0).sum() > 0


def test_a_rerank_kernel_that_cannot_build_leaves_re_ranking_to_torch_ops(monkeypatch, caplog):
    """A GPU where the fused kernel fails to build (a fault we cannot cause here) still
    decodes, re-ranking in torch ops, and says so once."""
    from triton.errors import TritonError

    import icecache.rerank_kernel as rerank_kernel
    import icecache.static_decode as static_decode

    def broken(*args, **kwargs):
        raise TritonError("no such instruction on this GPU")

    monkeypatch.setattr(static_decode, "_FUSED_RERANK_FAILED", [])
    monkeypatch.setattr(rerank_kernel, "rerank_pages", broken)
    steps = 4
    eng, ctx, ((ref, logits), (fast, _)) = decoders(monkeypatch, "llama", 900, [5, 6, 7], steps, rerank=3)
    ref_pages, ref_logits = run(ref, logits, ctx.num_tokens + 3, steps)
    fast_pages, fast_logits = run(fast, logits, ctx.num_tokens + 3, steps)
    assert all(torch.equal(x, y) for a, b in zip(ref_pages, fast_pages) for x, y in zip(a, b))
    assert (ref_logits - fast_logits).abs().max() < 1e-4
    assert len(static_decode._FUSED_RERANK_FAILED) == 1
    assert caplog.text.count("re-ranking in torch ops") == 1
