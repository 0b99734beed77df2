"""Run on the GPU machine: pytest -m gpu tests/icecache/test_gpu.py

The CUDA engine must make the same page choices and produce the same logits as the CPU
torch backend, on a tiny random-weight model (fp32 on both, so choices are comparable)."""

import copy

import pytest
import torch

import icecache.cache as cache_module
from icecache import Engine, IceCacheConfig, SamplingParams
from icecache.cache import RequestKV, StepBatch
from icecache.packing import pack_into, packed_size, unpack
from icecache.runner import resident_bytes
from icecache.testing import random_model, tiny_config
from icecache.static_decode import CAPTURE_AFTER, JointStep, StaticDecoder

pytestmark = pytest.mark.gpu
CONFIG = IceCacheConfig(token_budget=16 + 16 + 4 * 16, page_size=16, sink_tokens=16, window_tokens=16,
                        prefill_chunk_tokens=256)


@pytest.fixture(scope="module")
def models():
    if not torch.cuda.is_available():
        pytest.fail("the gpu tests need CUDA")
    cpu = random_model(tiny_config("llama", num_hidden_layers=6), torch.device("cpu"), torch.float32)
    return cpu, copy.deepcopy(cpu).cuda()


def record_decode(hf, ids, steps, monkeypatch):
    chosen = []
    real = cache_module.select_pages

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        chosen.append(out.cpu())
        return out

    monkeypatch.setattr(cache_module, "select_pages", spy)
    eng = Engine.from_model(hf, config=CONFIG, model_id="tiny")
    logits_seen = []
    with torch.inference_mode():
        ctx = eng.index(ids)
        req = RequestKV(eng.shape, eng.config, ctx)
        logits = eng.runner.prefill_one(req, [7, 8, 9], ctx.num_tokens)
        req.start_decode()
        pos = ctx.num_tokens + 3
        for _ in range(steps):
            logits_seen.append(logits.float().cpu())
            token = int(logits.argmax())
            logits = eng.runner.forward(StepBatch([req]), torch.tensor([[token]]), torch.tensor([[pos]]))[0]
            pos += 1
    monkeypatch.undo()
    return chosen, torch.stack(logits_seen)


def test_gpu_matches_cpu_backend(models, monkeypatch):
    cpu, gpu = models
    ids = torch.randint(0, 512, (3000,), generator=torch.Generator().manual_seed(0)).tolist()
    pages_cpu, logits_cpu = record_decode(cpu, ids, 24, monkeypatch)
    pages_gpu, logits_gpu = record_decode(gpu, ids, 24, monkeypatch)
    assert len(pages_cpu) == len(pages_gpu) > 0
    same = sum(torch.equal(a, b) for a, b in zip(pages_cpu, pages_gpu)) / len(pages_cpu)
    print(f"identical page selections: {same:.3f}; max |logit diff| {(logits_cpu - logits_gpu).abs().max():.2e}")
    assert same >= 0.95  # ties in fp32 scores may order differently; choices must agree
    assert torch.allclose(logits_cpu, logits_gpu, atol=2e-3, rtol=1e-3)


def test_gpu_bf16_generates_and_keeps_kv_off_the_device(models):
    _, gpu = models
    eng = Engine.from_model(copy.deepcopy(gpu).to(torch.bfloat16), config=CONFIG, model_id="tiny")
    ids = torch.randint(0, 512, (3000,), generator=torch.Generator().manual_seed(1)).tolist()
    ctx = eng.index(ids)
    layer = next(iter(ctx.sparse.values()))
    assert layer.pages.keys.device.type == "cpu" and layer.pages.keys.is_pinned()
    # the tree is on the GPU but for the page boxes, which only the quest selector reads
    assert layer.tree.page_mean.is_cuda and layer.tree.page_lo.device.type == "cpu"
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    out = eng.generate([5, 6], params, context=ctx)
    assert len(out.token_ids) == 16 and out.stats["pages_loaded_per_token"] > 0
    quest = eng.with_config(CONFIG.replace(selector="quest"))  # puts the boxes beside the tree for its requests
    assert len(quest.generate([5, 6], params, context=ctx).token_ids) == 16


def record_static(hf, ids, steps, graph: bool):
    """Static decoder: page ids of every sparse layer and the logits, step by step."""
    eng = Engine.from_model(hf, config=CONFIG.replace(decode_path="static"), model_id="tiny")
    pages, logits_seen = [], []
    with torch.inference_mode():
        ctx = eng.index(ids)
        req = RequestKV(eng.shape, eng.config, ctx)
        logits = eng.runner.prefill_one(req, [7, 8, 9], ctx.num_tokens)
        decoder = StaticDecoder(eng.model, eng.config, ctx, [(kv.k, kv.v) for kv in req.own], steps + 1)
        pos = ctx.num_tokens + 3
        for i in range(steps):
            logits_seen.append(logits.float().cpu())
            if graph and i == 1:
                decoder.capture()
            logits = decoder.step(int(logits.argmax()), pos)
            # as sets: the GPU kernels list a layer's pages by id, the torch path best first
            pages.append(torch.stack([p.sort(dim=1).values.cpu() for p in decoder.last_pages if p is not None]))
            pos += 1
    return pages, torch.stack(logits_seen)


def test_static_cuda_graph_decode_matches_cpu(models):
    cpu, gpu = models
    ids = torch.randint(0, 512, (3000,), generator=torch.Generator().manual_seed(2)).tolist()
    pages_cpu, logits_cpu = record_static(cpu, ids, 40, graph=False)
    pages_gpu, logits_gpu = record_static(gpu, ids, 40, graph=True)
    same = sum(torch.equal(a, b) for a, b in zip(pages_cpu, pages_gpu)) / len(pages_cpu)
    print(f"static path, CUDA graph vs CPU eager: identical page selections {same:.3f}; "
          f"max |logit diff| {(logits_cpu - logits_gpu).abs().max():.2e}")
    assert same >= 0.95
    assert torch.allclose(logits_cpu, logits_gpu, atol=2e-3, rtol=1e-3)


def static_question(gpu, seed: int):
    """A static-path engine, a 3000-token context indexed on it, and a 3-token question's
    prefilled KV per layer (to load into decoder slots)."""
    eng = Engine.from_model(gpu, config=CONFIG.replace(decode_path="static"), model_id="tiny")
    ids = torch.randint(0, 512, (3000,), generator=torch.Generator().manual_seed(seed)).tolist()
    with torch.inference_mode():
        ctx = eng.index(ids)
        req = RequestKV(eng.shape, eng.config, ctx)
        eng.runner.prefill_one(req, [7, 8, 9], ctx.num_tokens)
    return eng, ctx, [(kv.k, kv.v) for kv in req.own]


def test_device_pages_decode_like_pages_read_over_pcie(models):
    """StaticDecoder(device_pages=True) reads a GPU copy of the pages: same logits, batched."""
    eng, ctx, own = static_question(models[1], seed=4)
    seen = []
    with torch.inference_mode():
        for device_pages in (False, True):
            dec = StaticDecoder(eng.model, eng.config, ctx, slots=3, slot_tokens=32, device_pages=device_pages)
            for slot in range(3):
                dec.load(slot, own, 16)
            assert dec.states[-1].shared_k.is_cuda
            steps = [dec.step_batch([5, 6, 7], [ctx.num_tokens + 3 + i] * 3, graph=True).clone() for i in range(8)]
            seen.append(torch.stack(steps))
    assert torch.allclose(seen[0], seen[1], atol=1e-5), (seen[0] - seen[1]).abs().max()


def test_a_batch_size_is_graphed_once_it_recurs_or_when_the_decoder_idles(models):
    """A size a burst only passes through runs eagerly (no capture on the request path);
    one that recurs is recorded, and capture_pending() records the rest. Same logits as a
    decoder that never records."""
    eng, ctx, own = static_question(models[1], seed=5)
    runs = []
    with torch.inference_mode():
        pos = ctx.num_tokens + 3
        for graph in (False, True):
            dec = StaticDecoder(eng.model, eng.config, ctx, slots=4, slot_tokens=48)
            for slot in range(3):
                dec.load(slot, own, 32)
            out = []
            for i in range(CAPTURE_AFTER + 2):  # 3 requests step at size 4
                out.append(dec.step_batch([5, 6, 7], [pos + i] * 3, graph=graph).clone())
                assert (4 in dec.graphed) == (graph and i + 1 >= CAPTURE_AFTER)
            out.append(dec.step_batch([9], [pos + CAPTURE_AFTER + 2], graph=graph).clone())  # size 1, once: eager
            assert 1 not in dec.graphed
            if graph:
                assert dec.capture_pending() and dec.graphed == {1, 4}
                assert not dec.capture_pending()
            out.append(dec.step_batch([9], [pos + CAPTURE_AFTER + 3], graph=graph).clone())  # replayed when graphed
            runs.append(torch.cat(out))
    assert torch.allclose(runs[0], runs[1], atol=1e-5), (runs[0] - runs[1]).abs().max()


def test_a_joint_step_over_two_contexts_is_graphed_once_it_recurs_and_decodes_as_eager(models):
    """JointStep on CUDA: two decoders on two contexts, stepped in turns until their
    combination recurs, then recorded as one graph and replayed: the same logits as the
    eager joint pass; a decoder's moved pages (its epoch) make the combination record
    again, forget() drops it."""
    contexts = [static_question(models[1], seed=s) for s in (6, 7)]
    runs = []
    with torch.inference_mode():
        for graph in (False, True):
            decs = []
            for (eng, ctx, own), slots in zip(contexts, (1, 2)):
                dec = StaticDecoder(eng.model, eng.config, ctx, slots=slots, slot_tokens=48)
                for slot in range(slots):
                    dec.load(slot, own, 32)
                decs.append(dec)
            joint, out = JointStep(), []
            for i in range(CAPTURE_AFTER + 3):
                parts = [(d, [5 + j for j in range(d.slots)], [c[1].num_tokens + 3 + i] * d.slots)
                         for d, c in zip(decs, contexts)]
                out.extend(x.clone() for x in joint.step(parts, graph=graph))
                assert bool(joint.graphed) == (graph and i + 1 >= CAPTURE_AFTER)
            runs.append(torch.cat(out))
            if graph:
                decs[0].epoch += 1  # as when a resident copy comes or goes
                joint.step(parts, graph=True)
                assert not joint.graphed
                joint.forget(decs[1])
                assert not joint.graphed
    assert torch.allclose(runs[0], runs[1], atol=1e-5), (runs[0] - runs[1]).abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_offloaded_prefill_on_cuda_matches_the_plain_one(dtype):
    """Prefill with the KV in pinned host memory (flash attention with its log-sum-exp in
    bf16, the memory-efficient kernel in fp32): the same context as keeping it on the GPU."""
    from icecache.config import OFFLOAD_CHUNK_TOKENS
    from tests.icecache.test_prefill import kv_in_token_order
    model = random_model(tiny_config("llama", num_hidden_layers=3, max_position_embeddings=16384),
                         torch.device("cuda"), dtype)
    ids = torch.randint(0, 500, (OFFLOAD_CHUNK_TOKENS + 900,), generator=torch.Generator().manual_seed(4)).tolist()
    contexts = {}
    for where in ("device", "host"):
        eng = Engine.from_model(model, config=CONFIG.replace(prefill_offload=where), model_id="tiny")
        contexts[where] = eng.index(ids)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    for layer in range(3):
        for a, b in zip(kv_in_token_order(contexts["device"], layer), kv_in_token_order(contexts["host"], layer)):
            assert torch.allclose(a.float(), b.float(), atol=tol, rtol=tol), f"layer {layer}"
    assert torch.allclose(contexts["device"].last_logits.float(), contexts["host"].last_logits.float(), atol=tol * 10,
                          rtol=tol * 10)


def test_a_resident_context_prefills_questions_as_its_host_pages_do(models):
    _, gpu = models
    ids = torch.randint(0, 512, (2000,), generator=torch.Generator().manual_seed(5)).tolist()
    off = Engine.from_model(gpu, config=CONFIG.replace(resident_context_share=0.0), model_id="tiny")
    on = Engine.from_model(gpu, config=CONFIG, model_id="tiny")
    assert off.runner.resident is None and on.runner.resident.budget_bytes > 0
    with torch.inference_mode():
        ctx = on.index(ids)
        assert ctx in on.runner.resident  # kept as it was indexed, before any question...
        s = on.shape  # what the budget ("auto") is sized by holds what a copy takes: its K and V, and maps
        kv = ctx.num_tokens * s.num_layers * s.kv_bytes_per_token
        assert kv < on.runner.resident.used_bytes <= resident_bytes(
            ctx.num_tokens, s.num_layers, len(ctx.sparse), s.num_kv_heads, s.head_dim, s.dtype.itemsize)
        on.runner.forget(ctx)
        requests = [RequestKV(e.shape, e.config, ctx) for e in (off, on, on)]
        expected = off.runner.prefill_one(requests[0], [7, 8, 9], ctx.num_tokens)
        first = on.runner.prefill_one(requests[1], [7, 8, 9], ctx.num_tokens)
        assert ctx in on.runner.resident  # ...or by the first question's pass
        second = on.runner.prefill_one(requests[2], [7, 8, 9], ctx.num_tokens)
    torch.testing.assert_close(first, expected)
    torch.testing.assert_close(second, expected)  # ...and the second attends to it, with the same result
    assert requests[0].question_pages.keys() == set(ctx.sparse)  # the question's pages, from the kept maps too
    for req in requests[1:]:
        for layer, pages in requests[0].question_pages.items():
            assert torch.equal(req.question_pages[layer], pages), f"layer {layer}"
    on.runner.forget(ctx)
    assert ctx not in on.runner.resident and on.runner.resident.used_bytes == 0


def test_engines_of_one_model_under_other_configs_keep_one_set_of_resident_contexts(models):
    """A baseline engine (with_config) reads the device copy its parent made instead of making
    a second one (a 128k document of an 8B model is 16 GiB): decode_speed's rows differed in
    whether their pages came from a resident copy only by which engine was built first."""
    _, gpu = models
    on = Engine.from_model(gpu, config=CONFIG, model_id="tiny")
    full = on.with_config(CONFIG.replace(mode="full"))
    assert full.runner.resident is on.runner.resident
    assert on.with_config(CONFIG.replace(resident_context_share=0.0)).runner.resident is None
    with torch.inference_mode():
        ctx = full.index(torch.randint(0, 512, (1500,), generator=torch.Generator().manual_seed(6)).tolist())
        assert ctx in on.runner.resident
        used = on.runner.resident.used_bytes
        full.generate([7, 8, 9], SamplingParams(max_tokens=2, temperature=0.0), context=ctx)
        on.generate([7, 8, 9], SamplingParams(max_tokens=2, temperature=0.0), context=ctx)
        assert on.runner.resident.used_bytes == used  # one copy, both engines' questions read it
    on.runner.forget(ctx)
    assert full.runner.resident.used_bytes == 0


@pytest.fixture(scope="module")
def wide():
    """8x the models fixture's KV a token: the device-memory figures of a test using it
    (~0.2-0.5 GB) dwarf what the allocator keeps cached in segments still partly in use
    (~25 MB, counted as free)."""
    config = tiny_config("llama", num_hidden_layers=12, num_attention_heads=8, num_key_value_heads=4, head_dim=64)
    return random_model(config, torch.device("cuda"), torch.float32)


def fill_device_but(room: int) -> torch.Tensor:
    """A tensor that leaves `room` bytes of the device free, as runner.free_device_bytes counts."""
    from icecache.runner import free_device_bytes
    torch.cuda.empty_cache()
    return torch.empty(free_device_bytes(torch.device("cuda")) - room, dtype=torch.uint8, device="cuda")


def test_resident_copies_give_way_to_a_prefill_that_fits_without_them(wide):
    """An 8B model on an 80 GB card: a 128k document kept resident left too little room to
    prefill the next one on the device, which was offloaded (8x slower). With the device as
    full, the copy is evicted and the prefill stays on the device; when evicting everything
    would not make room, nothing is evicted and it is offloaded."""
    from icecache.runner import PREFILL_DEVICE_SHARE
    eng = Engine.from_model(wide, config=CONFIG, model_id="tiny")
    runner, ids = eng.runner, torch.randint(0, 512, (8000,), generator=torch.Generator().manual_seed(9)).tolist()
    with torch.inference_mode():
        ctx = eng.index(ids)
        kept = runner.resident.used_bytes
        assert ctx in runner.resident and kept > 0
        enough = int(runner.prefill_device_bytes(len(ids)) / PREFILL_DEVICE_SHARE)  # free memory it asks for
        assert enough > 2 * kept
        for room, offloaded, evicted in ((enough - kept // 2, False, True), (enough - 3 * kept // 2, True, False)):
            blocker = fill_device_but(room)
            figures = dict(room=room, enough=enough, kept=kept)
            assert runner.offload_prefill(len(ids)) is offloaded, figures
            assert (ctx not in runner.resident) is evicted, figures
            del blocker
            torch.cuda.empty_cache()
            if ctx not in runner.resident:
                assert eng.make_resident(ctx) and runner.resident.used_bytes == kept
        assert not runner.offload_prefill(len(ids)) and ctx in runner.resident  # room enough: nothing goes


def test_a_context_copied_elsewhere_is_kept_resident_from_the_indexed_one(models):
    """The served path: indexed with its pages on the device, packed into shared memory,
    and that copy made resident from the device pages (no read back from the host)."""
    _, gpu = models
    ids = torch.randint(0, 512, (2000,), generator=torch.Generator().manual_seed(6)).tolist()
    off = Engine.from_model(gpu, config=CONFIG.replace(resident_context_share=0.0), model_id="tiny")
    on = Engine.from_model(gpu, config=CONFIG, model_id="tiny")
    with torch.inference_mode():
        built = on.index_ids(ids, on_device=True)
        assert built not in on.runner.resident  # the caller decides which copy is kept
        buffer = bytearray(packed_size(built))  # shared memory's stand-in
        pack_into(built, memoryview(buffer))
        copy_ = unpack(memoryview(buffer)).with_index_from(built)
        assert not off.make_resident(copy_)  # no resident budget: nothing kept
        assert on.make_resident(copy_, source=built) and copy_ in on.runner.resident
        kept = on.runner.resident.get(copy_)
        del built
        torch.cuda.empty_cache()
        req_off, req_on = RequestKV(off.shape, off.config, copy_), RequestKV(on.shape, on.config, copy_)
        expected = off.runner.prefill_one(req_off, [7, 8, 9], copy_.num_tokens)
        got = on.runner.prefill_one(req_on, [7, 8, 9], copy_.num_tokens)
    assert on.runner.resident.get(copy_) is kept  # the question read the kept copy, not the host pages
    torch.testing.assert_close(got, expected)
    for layer, pages in req_off.question_pages.items():
        assert torch.equal(req_on.question_pages[layer], pages), f"layer {layer}"
    on.runner.forget(copy_)


def test_decode_reads_a_resident_context_from_the_device(models):
    """A context kept on the device for its questions' prefills is where the decode kernels
    read its pages too (no PCIe reads): through the scheduler, as a replica runs it, the
    same tokens as an engine that keeps nothing resident, graphed. Forgotten, the copy's
    decoder lets it go; the next questions' prefill keeps a new one, which the same (idle)
    decoder then reads: the same tokens again. (Decoding on after an eviction mid-request:
    tests/icecache/kernels/test_decode_step.py.)"""
    _, gpu = models
    ids = torch.randint(0, 512, (3000,), generator=torch.Generator().manual_seed(9)).tolist()
    config = CONFIG.replace(decode_path="static")
    off = Engine.from_model(gpu, config=config.replace(resident_context_share=0.0), model_id="tiny")
    on = Engine.from_model(gpu, config=config, model_id="tiny")
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    questions = [[7, 8, 9], [10, 11], [12, 13, 14, 15]]
    ctx = on.index(ids)
    assert ctx in on.runner.resident
    want = [off.generate(q, params, context=ctx).token_ids for q in questions]
    sched = on.scheduler(max_batch=4, device_bytes=None)
    for round_ in ("resident", "kept again"):
        seqs = [sched.submit(q, params, context=ctx) for q in questions]
        while sched.has_work:
            sched.step()
            if any(s.group is not None for s in seqs):
                assert on.runner.resident.readers(ctx) == 1  # the group's decoder reads the copy
        assert [s.items[-1].token_ids for s in seqs] == want, round_
        if round_ == "resident":
            on.runner.forget(ctx)
            assert on.runner.resident.readers(ctx) == 0 and ctx not in on.runner.resident
    assert sched.idle_groups == 1  # the same decoder served both rounds


def test_a_questions_prefill_through_the_split_key_kernel_matches_cudnns(models, caplog):
    """bf16: a question's attention over its context through kernels.attention's split-key
    kernel and over itself through the varlen flash kernel (no per-shape plan) is as close
    to the fp32 model's as cuDNN's fused attention (what ran before), and picks the same
    question pages."""
    import contextlib

    from icecache.internals import cudnn_for_every_shape
    _, gpu = models
    config = CONFIG.replace(resident_context_share=0.0)
    ids = torch.randint(0, 512, (2500,), generator=torch.Generator().manual_seed(7)).tolist()
    question = torch.randint(0, 512, (21,), generator=torch.Generator().manual_seed(8)).tolist()
    exact = Engine.from_model(gpu, config=config, model_id="tiny")
    eng = Engine.from_model(copy.deepcopy(gpu).to(torch.bfloat16), config=config, model_id="tiny")
    runs = []
    with torch.inference_mode():
        ctx = exact.index(ids)
        want = exact.runner.prefill_one(RequestKV(exact.shape, exact.config, ctx), question, ctx.num_tokens)
        ctx = eng.index(ids)
        for dispatch in (contextlib.nullcontext(), cudnn_for_every_shape()):
            with dispatch:
                req = RequestKV(eng.shape, eng.config, ctx)
                runs.append((eng.runner.prefill_one(req, question, ctx.num_tokens).float(), req.question_pages))
    assert "cannot run here" not in caplog.text  # the kernels ran, no fallback
    (kernel, kernel_pages), (cudnn, cudnn_pages) = runs
    err_kernel, err_cudnn = (kernel - want).abs().max().item(), (cudnn - want).abs().max().item()
    assert err_kernel <= 1.5 * err_cudnn + 1e-3, f"max |logit - fp32| {err_kernel:.4f} against cuDNN's {err_cudnn:.4f}"
    shared = [len(set(kernel_pages[l].flatten().tolist()) & set(cudnn_pages[l].flatten().tolist()))
              / cudnn_pages[l].numel() for l in cudnn_pages]
    assert min(shared) >= 0.8, f"question pages shared per layer: {shared}"  # bf16 near-ties may swap a page
