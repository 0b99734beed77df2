"""Bounded-memory prefill: a document's KV kept in host memory while it is prefilled, each
chunk reading the past back one layer at a time, gives the context a plain prefill gives."""

import logging
from types import SimpleNamespace

import pytest
import torch

from icecache import Engine, IceCacheConfig, SamplingParams
from icecache.attention import prefill_attention, prefill_attention_parts
from icecache.config import OFFLOAD_CHUNK_TOKENS
from icecache.testing import random_model, tiny_config
from icecache.runner import Resident, ResidentContexts


def kv_in_token_order(ctx, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's (K, V) [H, n, D] in token order: a sparse layer's pages hold the middle
    tokens in its tree's layout, which float rounding may change between two prefills."""
    if layer in ctx.dense:
        return ctx.dense[layer]
    s = ctx.sparse[layer]
    H, _, _, D = s.pages.keys.shape
    pos = s.pages.positions.reshape(H, -1)
    out = []
    for pages, edge in ((s.pages.keys, (s.sink_k, s.tail_k)), (s.pages.values, (s.sink_v, s.tail_v))):
        mid = torch.stack([pages[h].reshape(-1, D)[pos[h] >= 0][pos[h][pos[h] >= 0].argsort()] for h in range(H)])
        out.append(torch.cat([edge[0], mid, edge[1]], dim=1))
    return out[0], out[1]


@pytest.mark.parametrize("past", [0, 37])
def test_parts_attention_equals_the_joined_one(past):
    """Past and chunk attended apart and merged by log-sum-exp = one causal attention over
    both (GQA: 3 query heads per KV head)."""
    gen = torch.Generator().manual_seed(past)
    q = torch.randn(6, 11, 16, generator=gen)
    past_k, past_v = torch.randn(2, past, 16, generator=gen), torch.randn(2, past, 16, generator=gen)
    k, v = torch.randn(2, 11, 16, generator=gen), torch.randn(2, 11, 16, generator=gen)
    want = prefill_attention(q, past_k, past_v, k, v, 0.3)
    got = prefill_attention_parts(q, past_k, past_v, k, v, 0.3)
    assert got.shape == want.shape == (11, 6, 16)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()


def test_offloaded_prefill_gives_the_same_context_and_tokens():
    """A document longer than one offloaded chunk (so later chunks attend to a past read
    back from host buffers): the same KV in every layer, the same last logits, and the
    same greedy tokens as a prefill that keeps the KV on its device."""
    model = random_model(tiny_config("llama", num_hidden_layers=3, max_position_embeddings=16384),
                         torch.device("cpu"), torch.float32)
    ids = torch.randint(0, 500, (OFFLOAD_CHUNK_TOKENS + 700,), generator=torch.Generator().manual_seed(2)).tolist()
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    small = dict(token_budget=64, page_size=4, sink_tokens=4, window_tokens=4, dense_layers=1)
    out = {}
    for where in ("device", "host"):
        eng = Engine.from_model(model, config=IceCacheConfig(prefill_offload=where, **small), model_id="tiny")
        assert eng.runner.offload_prefill(len(ids)) == (where == "host")
        ctx = eng.index(ids)
        out[where] = (ctx, eng.generate([7, 8, 9], params, context=ctx).token_ids)
    (plain, plain_tokens), (offloaded, offloaded_tokens) = out["device"], out["host"]
    for layer in range(3):
        for a, b in zip(kv_in_token_order(plain, layer), kv_in_token_order(offloaded, layer)):
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), f"layer {layer}: {(a - b).abs().max()}"
    assert torch.allclose(plain.last_logits, offloaded.last_logits, atol=1e-4, rtol=1e-4)
    assert offloaded_tokens == plain_tokens and len(plain_tokens) == 8


@pytest.mark.parametrize("where", ["engine", "scheduler"])
def test_a_prefill_out_of_device_memory_starts_again_in_host_memory(monkeypatch, caplog, where):
    """A document's prefill on the device that runs out of memory mid-way (a fault we
    cannot cause on a CPU: raised at its second pass) starts again with its KV in host
    memory, says so once, and gives the context a plain prefill gives; Engine.index_ids
    and the scheduler's index jobs alike. Out of host memory too, the error stands."""
    from concurrent.futures import Future
    model = random_model(tiny_config("llama", num_hidden_layers=3), torch.device("cpu"), torch.float32)
    config = IceCacheConfig(token_budget=64, page_size=4, sink_tokens=4, window_tokens=4, dense_layers=1,
                            index_chunk_tokens=256)
    eng = Engine.from_model(model, config=config, model_id="tiny")
    ids = torch.randint(0, 500, (900,), generator=torch.Generator().manual_seed(3)).tolist()
    plain = eng.index(ids)
    real, passes = eng.runner.prefill_rows, []

    def short_of_memory(requests, *args, fail_offloaded=False):
        passes.append(requests[0].offload)
        if len(passes) == 2 or (fail_offloaded and requests[0].offload):
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real(requests, *args)

    def index(fail_offloaded=False):
        monkeypatch.setattr(eng.runner, "prefill_rows", lambda *a: short_of_memory(*a, fail_offloaded=fail_offloaded))
        if where == "engine":
            return eng.index_ids(ids)
        done, scheduler = Future(), eng.scheduler(max_batch=2)
        scheduler.submit_index(ids, lambda r: done.set_exception(r) if isinstance(r, BaseException)
                               else done.set_result(r), on_device=False)
        scheduler.start()
        try:
            return done.result(timeout=120)
        finally:
            scheduler.stop()

    with caplog.at_level(logging.WARNING, logger="icecache.runner"):
        ctx = index()
    assert passes == [False, False, True]  # two passes on the device, then one in host memory
    assert caplog.text.count("starting again with its KV in host memory") == 1
    assert torch.allclose(ctx.last_logits, plain.last_logits, atol=1e-4, rtol=1e-4)
    for layer in range(3):
        for a, b in zip(kv_in_token_order(plain, layer), kv_in_token_order(ctx, layer)):
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), f"layer {layer}"
    passes.clear()
    with pytest.raises(torch.OutOfMemoryError, match="injected"):
        index(fail_offloaded=True)
    assert passes == [False, False, True]


def test_resident_contexts_keep_the_most_recent_under_their_budget():
    kv = lambda: Resident({0: (torch.zeros(4, 128), torch.zeros(4, 128))},  # 8 KiB a context, maps counted
                          {0: (torch.zeros(4, 128), torch.zeros(4, 128))})
    resident = ResidentContexts(20 << 10)
    a, b, c, big = (SimpleNamespace(uid=i) for i in range(4))
    assert resident.put(a, kv()) and resident.put(b, kv())
    assert resident.get(a) is not None  # a is now more recent than b
    assert resident.put(c, kv())  # 24 KiB > 20: b goes
    assert a in resident and c in resident and b not in resident and resident.used_bytes == 16 << 10
    assert not resident.put(big, Resident({0: (torch.zeros(4, 1024), torch.zeros(4, 1024))}, {}))  # over the whole budget
    assert big not in resident and a in resident
    resident.forget(a)
    assert a not in resident and resident.used_bytes == 8 << 10
    assert resident.make_room(16 << 10) and c not in resident  # room made ahead of a pass evicts too
    assert not resident.make_room(21 << 10) and resident.used_bytes == 0
    assert resident.put(a, kv()) and resident.put(b, kv()) and resident.get(a) is not None
    assert resident.evict_oldest() == 8 << 10 and b not in resident and a in resident  # for a prefill: b first
    assert resident.evict_oldest() == 8 << 10 and resident.evict_oldest() == 0 and resident.used_bytes == 0


def test_a_context_over_the_resident_budget_is_said_once(caplog):
    """A context too large to keep on the device makes every question's prefill re-read it
    from host memory: the log says so once per context (and again after it is forgotten),
    with its size and the budget."""
    resident = ResidentContexts(20 << 10)
    big, other = SimpleNamespace(uid=1, num_tokens=4096), SimpleNamespace(uid=2, num_tokens=8192)
    with caplog.at_level(logging.INFO, logger="icecache.runner"):
        assert not resident.make_room(64 << 10, big) and not resident.make_room(64 << 10, big)
        assert not resident.make_room(64 << 10, other)
        resident.forget(big)
        assert not resident.make_room(64 << 10, big)
        assert resident.make_room(16 << 10, big)  # one that fits says nothing
    lines = [r.getMessage() for r in caplog.records if "over the device budget" in r.getMessage()]
    assert len(lines) == 3, lines
    assert "4096 tokens" in lines[0] and "8192 tokens" in lines[1] and "4096 tokens" in lines[2]


@pytest.mark.parametrize("device, dtype", [("cpu", torch.float32),
                                           pytest.param("cuda", torch.bfloat16, marks=pytest.mark.gpu)])
def test_a_packed_prefill_gives_each_question_what_it_gets_alone(device, dtype):
    """Questions on two contexts packed into one pass (one of them continuing a chunk of
    its own from an earlier pass) get the logits and own KV they get prefilled alone: no
    question sees another's tokens or another's context."""
    from icecache.cache import RequestKV
    if device == "cuda" and not torch.cuda.is_available():
        pytest.fail("the gpu tests need CUDA")
    model = random_model(tiny_config("llama"), torch.device(device), dtype)
    eng = Engine.from_model(model, config=IceCacheConfig(token_budget=96, page_size=16, sink_tokens=16,
                                                         window_tokens=16), model_id="tiny")
    gen = torch.Generator().manual_seed(3)
    questions = [[5, 6, 7], [8] * 9, [11, 12, 13, 14, 15]]
    with torch.inference_mode():
        first, second = (eng.index(torch.randint(0, 500, (n,), generator=gen).tolist()) for n in (700, 530))
        on = [first, second, first]  # the question's context
        alone = []
        for q, ctx in zip(questions, on):
            req = RequestKV(eng.shape, eng.config, ctx)
            alone.append((eng.runner.prefill([req], [q], [ctx.num_tokens])[0], req))
        reqs = [RequestKV(eng.shape, eng.config, ctx) for ctx in on]
        n = first.num_tokens
        eng.runner.prefill([reqs[2]], [questions[2][:2]], [n])  # an earlier chunk of the third
        packed = eng.runner.prefill(reqs, [questions[0], questions[1], questions[2][2:]],
                                    [n, second.num_tokens, n + 2])
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for i, (logits, req) in enumerate(alone):
        scale = logits.float().abs().max()
        assert (packed[i].float() - logits.float()).abs().max() <= tol * scale, i
        for layer in (0, len(req.own) - 1):
            want, got = req.own[layer].k, reqs[i].own[layer].k
            assert got.shape == want.shape
            assert (got.float() - want.float()).abs().max() <= tol * want.float().abs().max(), (i, layer)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])  # q/k/v biases; q/k norms
def test_questions_on_one_context_give_the_same_with_the_gpu_kernels(monkeypatch, arch):
    """On a GPU a prefill pass runs the model as the decode step does (model_pass.ModelPass:
    fused norms, rotary, merged projections), questions whose rows are all on one context
    (a pack of two, one continuing an earlier chunk of its own) fold their causal part and
    other parts into the context's split-key kernel (attention.attention_merged) and pick
    their pages with kernels.question. All of it here (through Triton's interpreter on a CPU)
    gives the logits, own KV and question pages of the torch path."""
    from icecache import runner
    from icecache.attention import torch_backend
    from icecache.cache import RequestKV
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv("ICECACHE_KERNELS", "0")  # the reference: the torch path, on a GPU too
    model = random_model(tiny_config(arch), device, torch.float32)
    with torch.no_grad():  # biases and norms that do something (random_model leaves them 0 and 1)
        for name, p in model.named_parameters():
            if name.endswith(("proj.bias", "q_norm.weight", "k_norm.weight")):
                p.add_(torch.randn_like(p) * 0.5)
    config = IceCacheConfig(token_budget=96, page_size=16, sink_tokens=16, window_tokens=16, question_pages=4)
    eng = Engine.from_model(model, config=config, model_id="tiny")
    gen = torch.Generator().manual_seed(5)
    questions = [[5, 6, 7, 9], [11, 12, 13, 14, 15]]

    def run(engine):
        reqs = [RequestKV(engine.shape, engine.config, ctx) for _ in questions]
        engine.runner.prefill([reqs[1]], [questions[1][:2]], [ctx.num_tokens])  # an earlier chunk of the second
        logits = engine.runner.prefill(reqs, [questions[0], questions[1][2:]], [ctx.num_tokens, ctx.num_tokens + 2])
        return logits, reqs

    with torch.inference_mode():
        ctx = eng.index(torch.randint(0, 500, (600,), generator=gen).tolist())
        want, want_reqs = run(eng)
        assert eng.runner.passes is None  # the model's forward
        launched = []
        monkeypatch.setenv("ICECACHE_KERNELS", "1")
        monkeypatch.setattr(torch_backend, "_kernel_takes", lambda q: True)
        monkeypatch.setattr(runner, "_fused_question_pages", lambda keys: True)
        from icecache.kernels import attention as kernels
        real = kernels.prefix_attention_lse
        monkeypatch.setattr(kernels, "prefix_attention_lse",
                            lambda q, k, v, scaling, others=(), own=None:
                            launched.append((len(others), own is not None)) or real(q, k, v, scaling, others, own))
        fused = Engine.from_model(model, config=config, model_id="tiny")
        assert fused.runner.passes is not None and fused.runner.passes.fused
        got, got_reqs = run(fused)
    assert (1, True) in launched  # the pack's rows: the second's earlier chunk folded in, each chunk over itself
    for a, b in zip(got, want):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max()
    for a, b in zip(got_reqs, want_reqs):
        assert a.question_pages.keys() == b.question_pages.keys() and a.question_pages
        for layer in b.question_pages:
            assert torch.equal(a.question_pages[layer], b.question_pages[layer]), layer
        assert torch.allclose(a.own[1].k, b.own[1].k, atol=1e-5)
