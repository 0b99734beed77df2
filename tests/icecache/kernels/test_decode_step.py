"""The GPU decode step with its Triton kernels (icecache/kernels/) against the torch path
of static_decode.py, its reference: same pages, same logits.

On this CPU machine the kernels run in Triton's interpreter (exact, slow), so CI checks
their logic; tests/icecache/test_gpu.py checks them compiled on a GPU."""

import pytest
import torch

from icecache import Engine, IceCacheConfig, SamplingParams
from icecache.cache import RequestKV
from icecache.static_decode import JointStep, StaticDecoder
from icecache.testing import random_model, tiny_config

triton = pytest.importorskip("triton", reason="the kernels need triton (a test dependency)")

from icecache.kernels import common  # noqa: E402

# compiled on a GPU machine, interpreted (TRITON_INTERPRET=1, tests/conftest.py) elsewhere
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# 12 question pages and re-ranking 2x (the defaults are 48 and 4x): as many candidates as these 1,500-token
# contexts exercise, at a third of the Triton interpreter's time on CPU
CONFIG = IceCacheConfig(token_budget=16 + 16 + 4 * 16, page_size=16, sink_tokens=16, window_tokens=16,
                        dense_layers=1, search_width=8, prefill_chunk_tokens=512, question_pages=12, rerank=2)


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


def same_steps(ref: StaticDecoder, fast: StaticDecoder, logits: torch.Tensor, start: int, steps: int) -> list:
    """Both decoders run `steps` tokens from logits: the same pages every step and sparse
    layer, the same logits. -> the torch path's pages (run's)."""
    ref_pages, ref_logits = run(ref, logits, start, steps)
    fast_pages, fast_logits = run(fast, logits, start, steps)
    for step, (a, b) in enumerate(zip(ref_pages, fast_pages)):
        for layer, (x, y) in enumerate(zip(a, b)):
            assert torch.equal(x, y), f"step {step}, sparse layer {layer}: {x.tolist()} vs {y.tolist()}"
    assert (ref_logits - fast_logits).abs().max() < 1e-4
    return ref_pages


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
    if row_programs is not None:
        monkeypatch.setattr(common, "ROW_PROGRAMS", row_programs)
    steps = 12  # each moves a token out of the 16-token window into private pages
    eng, ctx, ((ref, logits), (fast, _)) = decoders(monkeypatch, arch, doc_tokens, question, steps,
                                                    reuse_layers=reuse, page_heads=heads)
    assert fast.scratch is not None and ref.scratch is None
    ref_pages = same_steps(ref, fast, logits, ctx.num_tokens + len(question), steps)
    assert int(ref.ring.counts[0, 1]) > 0  # tokens did move into private pages
    assert any((p >= 0).any() for step in ref_pages for p in step)


@pytest.mark.parametrize("reuse", [1, 2])
def test_the_pages_left_out_join_the_kernels_attention_as_the_torch_paths(monkeypatch, reuse):
    """unselected="means": every sparse layer folds in the shared pages it does not retrieve
    (IceCache-reuse's followers their own pages' means, in the leader's layout), with the
    torch path's logits, as tokens move into private pages."""
    steps = 12
    eng, ctx, ((ref, logits), (fast, _)) = decoders(monkeypatch, "llama", 1500, [5, 6, 7], steps,
                                                    reuse_layers=reuse, unselected="means")
    assert all(s.rest is not None for s in fast.sparse_states + ref.sparse_states)
    same_steps(ref, fast, logits, ctx.num_tokens + 3, steps)


def test_pages_split_by_share_on_the_kernels_as_on_the_torch_path(monkeypatch):
    """head_pages="share": the fused re-ranking splits a layer's pages among its KV heads as
    the torch path does (same pages, up to 2R a head, every layer and step, IceCache-reuse's
    followers reading the leader's), and attention over them gives the same logits."""
    steps = 12
    eng, ctx, ((ref, logits), (fast, _)) = decoders(monkeypatch, "llama", 1500, [5, 6, 7], steps,
                                                    reuse_layers=2, head_pages="share")
    ref_pages = same_steps(ref, fast, logits, ctx.num_tokens + 3, steps)
    R = eng.config.retrieved_pages
    kept = torch.stack([(p >= 0).sum(1) for step in ref_pages for p in step])  # [steps x layers, H] pages a head
    assert kept.shape[1] == 2 and (kept.sum(1) == 2 * R).all()  # the layer's total stays H x R...
    assert (kept != R).any()  # ...and the heads do not keep R each


@pytest.mark.parametrize("selector,rerank,question", [("quest", 1, 0), ("oracle", 1, 0), ("random", 1, 0),
                                                      ("streaming", 1, 0), ("icecache", 3, 0), ("icecache", 1, 3),
                                                      ("icecache", 2, 4)])
def test_torch_selectors_attend_through_the_kernels(monkeypatch, selector, rerank, question):
    """The comparison selectors run as torch ops on the Triton path too, and the
    re-ranking of the kernels' candidate pages (with the question's pages among them, if
    any) as its own kernel; it attends over what they pick (StreamingLLM: a window ring as
    wide as the budget past the sinks) and must give the torch path's logits, with the
    same pages, as tokens move into private pages."""
    steps = 12  # each moves a token out of the 16-token window into private pages
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


def test_engine_generates_the_same_text_on_either_path(monkeypatch):
    """Through Engine.generate (static path): the kernels change no token. One context for
    both (indexed on the torch path: the kernels' index is test_walk's)."""
    model = random_model(tiny_config("llama", num_hidden_layers=3), DEVICE, torch.float32)
    ids = torch.randint(0, 500, (900,), generator=torch.Generator().manual_seed(3)).tolist()
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    tokens, ctx = [], None
    for flag in ("0", "1"):
        monkeypatch.setenv("ICECACHE_KERNELS", flag)
        eng = Engine.from_model(model, config=CONFIG.replace(decode_path="static"), model_id="tiny")
        ctx = ctx or eng.index(ids)
        tokens.append(eng.generate([9, 10, 11], params, context=ctx).token_ids)
    assert tokens[0] == tokens[1] and len(tokens[0]) == 12


@pytest.mark.parametrize("kernels", ["0", "1"])
def test_batched_slots_give_each_request_what_it_gets_alone(monkeypatch, kernels):
    """One decoder, three slots on one context: requests join at different steps (one with
    a question long enough to start in private pages), the first leaves and the last slot
    moves into its place; every request's logits equal those of running it alone (on the
    torch path, the kernels' reference: a third of the interpreter's time)."""
    monkeypatch.setenv("ICECACHE_KERNELS", "0")
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
        monkeypatch.setenv("ICECACHE_KERNELS", kernels)
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


@pytest.mark.parametrize("kernels", ["0", "1"])
def test_a_joint_step_over_two_contexts_gives_each_request_what_it_gets_alone(monkeypatch, kernels):
    """JointStep: one pass through the model for a decoder on one context (one slot) and a
    decoder on another (three requests in four slots: the pass pads it); every request's
    logits equal those of running it alone (on the torch path: the kernels' reference, and
    a fifth of the interpreter's time). A decoder named twice in a step is refused."""
    monkeypatch.setenv("ICECACHE_KERNELS", "0")
    model = random_model(tiny_config("llama", num_hidden_layers=3, hidden_size=192, num_attention_heads=6,
                                     num_key_value_heads=2), DEVICE, torch.float32)
    eng = Engine.from_model(model, config=CONFIG, model_id="tiny")
    contexts = [eng.index(torch.randint(0, 500, (n,), generator=torch.Generator().manual_seed(n)).tolist())
                for n in (1500, 900)]
    questions = [[[5, 6, 7]], [[8, 9], list(range(3, 40)), [4]]]  # per context
    steps = 5
    with torch.inference_mode():
        prefilled = []  # per context: (own KV, logits) per question
        for ctx, qs in zip(contexts, questions):
            prefilled.append([])
            for q in qs:
                req = RequestKV(eng.shape, eng.config, ctx)
                prefilled[-1].append(([(kv.k, kv.v) for kv in req.own],
                                      eng.runner.prefill_one(req, q, ctx.num_tokens)))
        alone = [[run(StaticDecoder(eng.model, CONFIG, ctx, own, steps), logits, ctx.num_tokens + len(q), steps)[1]
                  for (own, logits), q in zip(pf, qs)] for ctx, pf, qs in zip(contexts, prefilled, questions)]
        monkeypatch.setenv("ICECACHE_KERNELS", kernels)
        decs = [StaticDecoder(eng.model, CONFIG, ctx, slots=n, slot_tokens=64) for ctx, n in zip(contexts, (1, 4))]
        assert all((dec.scratch is not None) == (kernels == "1") for dec in decs)
        for dec, pf in zip(decs, prefilled):
            for slot, (own, _) in enumerate(pf):
                dec.load(slot, own, steps)
        joint = JointStep()
        last = [[lg for _, lg in pf] for pf in prefilled]
        got = [[[] for _ in qs] for qs in questions]
        for t in range(steps):
            parts = [(dec, [int(lg.argmax()) for lg in last[c]],
                      [contexts[c].num_tokens + len(q) + t for q in questions[c]]) for c, dec in enumerate(decs)]
            for c, logits in enumerate(joint.step(parts)):
                assert logits.shape[0] == len(questions[c])
                for r in range(len(questions[c])):
                    last[c][r] = logits[r].clone()
                    got[c][r].append(last[c][r])
        with pytest.raises(ValueError, match="twice"):
            joint.step([parts[0], parts[0]])
    for c, qs in enumerate(questions):
        for r in range(len(qs)):
            diff = (torch.stack(got[c][r]) - alone[c][r]).abs().max()
            assert diff < 1e-4, f"context {c}, request {r}: logits differ by {diff}"


@pytest.mark.parametrize("kernel", ["flat", "split"])
def test_a_rerank_kernel_that_cannot_build_leaves_re_ranking_to_torch_ops(monkeypatch, caplog, kernel):
    """A GPU where a fused re-ranking kernel fails to build (a fault we cannot cause here)
    still decodes, re-ranking in torch ops, and says so once; the other kernel (the flat
    split's, when the share split's failed) still runs in a later decoder."""
    from triton.errors import TritonError

    from icecache.kernels import rerank
    import icecache.decode_layers as decode_layers

    built, calls = rerank.rerank_pages, []

    def broken_for_one(*args, fixed=None, **kwargs):
        if (fixed is not None) == (kernel == "split"):
            raise TritonError("no such instruction on this GPU")
        calls.append(fixed is None)
        return built(*args, fixed=fixed, **kwargs)

    monkeypatch.setattr(decode_layers, "FUSED_RERANK_FAILED", {})
    monkeypatch.setattr(rerank, "rerank_pages", broken_for_one)
    steps, head_pages = 4, "share" if kernel == "split" else "flat"
    eng, ctx, ((ref, logits), (fast, _)) = decoders(monkeypatch, "llama", 900, [5, 6, 7], steps, rerank=3,
                                                    head_pages=head_pages)
    ref_pages, ref_logits = run(ref, logits, ctx.num_tokens + 3, steps)
    fast_pages, fast_logits = run(fast, logits, ctx.num_tokens + 3, steps)
    assert all(torch.equal(x, y) for a, b in zip(ref_pages, fast_pages) for x, y in zip(a, b))
    assert (ref_logits - fast_logits).abs().max() < 1e-4
    assert list(decode_layers.FUSED_RERANK_FAILED) == [kernel] and not calls
    assert caplog.text.count("re-ranking in torch ops") == 1
    if kernel == "split":  # a flat decoder after it still re-ranks in its kernel
        monkeypatch.setenv("ICECACHE_KERNELS", "0")  # the index in torch ops (the interpreter's takes a minute)
        _, ctx, (_, (flat, logits)) = decoders(monkeypatch, "llama", 900, [5, 6, 7], 1, rerank=3,
                                               head_pages="flat")
        run(flat, logits, ctx.num_tokens + 3, 1)
        assert calls and all(calls) and list(decode_layers.FUSED_RERANK_FAILED) == ["split"]


def test_the_kernels_read_a_resident_copy_of_the_context_until_it_is_evicted(monkeypatch):
    """A context kept whole on the device (runner.ResidentContexts, for its questions'
    prefills) is where the kernels read its shared pages from: same logits as reading the
    pages, from the copy's own memory; evicting the copy tells the decoder, which reads
    the pages again and still agrees."""
    from icecache.runner import Resident, ResidentContexts
    model = random_model(tiny_config("llama", num_hidden_layers=3, hidden_size=192, num_attention_heads=6,
                                     num_key_value_heads=2), DEVICE, torch.float32)
    eng = Engine.from_model(model, config=CONFIG, model_id="tiny")
    ctx = eng.index(torch.randint(0, 500, (1500,), generator=torch.Generator().manual_seed(8)).tolist())
    monkeypatch.setenv("ICECACHE_KERNELS", "1")  # after the index: its passes through the interpreter took ~90 s
    resident = ResidentContexts(1 << 30)
    kv = {i: tuple(t.to(DEVICE) for t in ctx.flat_kv(i)) for i in [*ctx.dense, *ctx.sparse]}
    assert resident.put(ctx, Resident(kv, {}))
    steps, question = 6, [5, 6, 7]
    with torch.inference_mode():
        req = RequestKV(eng.shape, eng.config, ctx)
        logits = eng.runner.prefill_one(req, question, ctx.num_tokens)
        own = [(b.k, b.v) for b in req.own]
        pages = StaticDecoder(eng.model, CONFIG, ctx, own, steps, question_pages=req.question_pages)
        copy_ = StaticDecoder(eng.model, CONFIG, ctx, own, steps, question_pages=req.question_pages,
                              resident=resident)
        assert copy_.resident_rows and not pages.resident_rows
        for i, state in enumerate(copy_.states):
            if i in ctx.sparse:
                assert state.rows_k.data_ptr() == kv[i][0].data_ptr()
                assert state.question_k.shape[2] == 0  # the question's pages are read from the copy too
        assert any(s.question_k.shape[2] for s in pages.sparse_states)
        token, start = int(logits.argmax()), ctx.num_tokens + len(question)
        held = copy_.device_bytes()
        for step in range(steps):
            if step == steps // 2:
                resident.forget(ctx)  # evicted mid-request: back to the pages
                assert not copy_.resident_rows
                # what it holds now counts its questions' keys (a scheduler's admission reads it)
                assert copy_.device_bytes() == pages.device_bytes() > held
                assert all(s.rows_k.data_ptr() == s.shared_k.data_ptr() for s in copy_.sparse_states)
                for mine, theirs in zip(copy_.sparse_states, pages.sparse_states):  # its questions' keys again
                    assert torch.equal(mine.question_k, theirs.question_k)
            want = pages.step(token, start + step).clone()
            got = copy_.step(token, start + step).clone()
            assert (want - got).abs().max() < 1e-5, f"step {step}"
            chosen = [(a.sort(dim=1).values, b.sort(dim=1).values)
                      for a, b in zip(pages.last_pages, copy_.last_pages) if a is not None]
            assert chosen and all(torch.equal(a, b) for a, b in chosen), f"step {step}"
            token = int(want.argmax())
