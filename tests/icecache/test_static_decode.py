"""The static-shape decode path (the one CUDA graphs capture on a GPU), run eagerly on CPU:
the same tokens as the dynamic path where their designs agree, and the passkey on real weights."""

import pytest
import torch

from icecache import Engine, IceCacheConfig, SamplingParams
from icecache.testing import random_model, tiny_config
from tests.icecache.haystack import QUESTION, passkey_document

SMALL = dict(token_budget=64, page_size=4, sink_tokens=4, window_tokens=4, dense_layers=1)


def test_full_mode_static_equals_dynamic_token_for_token():
    model = random_model(tiny_config("llama"), torch.device("cpu"))
    ids = torch.randint(0, 500, (400,), generator=torch.Generator().manual_seed(1)).tolist()
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    outs = {}
    for path in ("dynamic", "static"):
        eng = Engine.from_model(model, config=IceCacheConfig(mode="full", decode_path=path, **SMALL))
        outs[path] = eng.generate(list(range(3, 20)), params, context=eng.index(ids)).token_ids
    assert outs["static"] == outs["dynamic"] and len(outs["static"]) == 20


def test_a_budget_that_holds_every_page_is_full_attention_on_both_paths():
    """A context short enough that every page fits the budget is attended whole at every
    step, on the static path as on the dynamic one: the tokens and stats are full
    attention's (the static path once searched the tree all the same, and lost pages its
    walk did not reach)."""
    model = random_model(tiny_config("llama"), torch.device("cpu"))
    ids = torch.randint(0, 500, (400,), generator=torch.Generator().manual_seed(4)).tolist()
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    config = IceCacheConfig(**{**SMALL, "token_budget": 1024, "search_width": 2, "top_level_max": 4})
    full = Engine.from_model(model, config=config.replace(mode="full"))
    want = full.generate(list(range(3, 20)), params, context=full.index(ids)).token_ids
    for path in ("dynamic", "static"):
        eng = Engine.from_model(model, config=config.replace(decode_path=path))
        ctx = eng.index(ids)
        assert ctx.sparse and next(iter(ctx.sparse.values())).tree.num_pages < config.retrieved_pages
        assert eng.generate(list(range(3, 20)), params, context=ctx).token_ids == want, path


def test_static_icecache_finds_the_passkey_and_selects_within_budget(engine):
    static = engine.with_config(IceCacheConfig(token_budget=256, decode_path="static"))
    doc = passkey_document(engine.tokenizer, 2500, 0.3, 90417)
    out = static.generate(QUESTION, SamplingParams(max_tokens=8, temperature=0.0), context=static.index(doc))
    assert "90417" in out.text
    sparse_layers = engine.shape.num_layers - static.config.dense_layers
    per_layer_head = out.stats["pages_selected_per_token"] / (sparse_layers * engine.shape.num_kv_heads)
    assert 0 < per_layer_head <= static.config.retrieved_pages


def test_decode_path_is_validated():
    with pytest.raises(ValueError, match="decode_path"):
        IceCacheConfig(decode_path="fast")


@pytest.mark.parametrize("selector,rerank,question,unselected,heads", [
    ("quest", 1, 0, "off", "flat"), ("oracle", 1, 0, "off", "flat"), ("streaming", 1, 0, "off", "flat"),
    ("icecache", 1, 0, "off", "flat"), ("icecache", 4, 0, "off", "flat"), ("icecache", 2, 6, "off", "flat"),
    ("icecache", 2, 6, "means", "flat"), ("quest", 1, 0, "means", "flat"), ("icecache", 2, 6, "off", "share")])
def test_selectors_on_the_static_path_equal_the_dynamic_path(selector, rerank, question, unselected, heads):
    """Quest, the oracle, StreamingLLM and IceCache (with and without re-ranking the
    bounds' candidates by their keys, with the question's own pages among them, with
    the pages left out folded in by their means, and with a layer's pages split among its
    KV heads by share) give the same tokens on the static path
    (the GPU's, where the accuracy suite runs) as on the dynamic path. Four-token pages,
    and a prompt and answer long enough to fill private pages: both paths keep a request's
    own tokens on them in arrival order."""
    model = random_model(tiny_config("llama"), torch.device("cpu"))
    ids = torch.randint(0, 500, (400,), generator=torch.Generator().manual_seed(2)).tolist()
    config = IceCacheConfig(token_budget=4 + 4 + 12 * 4, page_size=4, sink_tokens=4, window_tokens=4, dense_layers=1,
                            selector=selector, rerank=rerank, question_pages=question, unselected=unselected,
                            head_pages=heads)
    prompt = list(range(7, 17))  # with the context's 4-token tail: 10 tokens past the window before decoding
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    outs = {}
    for path in ("dynamic", "static"):
        eng = Engine.from_model(model, config=config.replace(decode_path=path))
        outs[path] = eng.generate(prompt, params, context=eng.index(ids))
    assert outs["static"].token_ids == outs["dynamic"].token_ids and len(outs["static"].token_ids) == 20
    if heads == "share":  # the split is in force on both paths: not the flat split's tokens
        flat = Engine.from_model(model, config=config.replace(head_pages="flat"))
        assert outs["static"].token_ids != flat.generate(prompt, params, context=flat.index(ids)).token_ids
    full = Engine.from_model(model, config=config.replace(mode="full"))
    if unselected == "off":  # with the pages left out folded in, the answer here is full attention's
        assert outs["static"].token_ids != full.generate(prompt, params, context=full.index(ids)).token_ids
    for out in outs.values():  # StreamingLLM reads no pages; the others fill the budget every step
        sparse_rows = (model.config.num_hidden_layers - 1) * model.config.num_key_value_heads
        expected = 0 if selector == "streaming" else 12 * sparse_rows
        assert out.stats["pages_selected_per_token"] == expected


def test_a_selector_added_to_the_table_runs_on_both_paths(monkeypatch):
    """A selector is one entry of selectors.SELECTORS: config validation accepts it and both
    decode paths call its function, with the same view of a request's pages (here: the
    request's own pages, then the shared pages with the highest ids), and agree."""
    from icecache.selectors import SELECTORS, Selector
    calls = {"dynamic": 0, "static": 0}

    def newest(q, view, num_pages, scaling):
        shared_valid, private_valid = view.shared[1].to(q.device), view.private[1]
        assert len(view.bounds()) >= 1 and q.shape[0] == shared_valid.shape[0]
        ids = torch.arange(shared_valid.shape[1] + private_valid.shape[1], device=q.device)
        valid = torch.cat([shared_valid, private_valid], dim=1) > 0
        weight = torch.where(valid, ids.float(), float("-inf"))  # the highest ids: private, then newest shared
        calls[path] += 1
        best = weight.topk(num_pages, dim=1)
        return torch.where(best.values > float("-inf"), best.indices, -1)

    monkeypatch.setitem(SELECTORS, "newest", Selector("newest", newest))
    model = random_model(tiny_config("llama"), torch.device("cpu"))
    ids = torch.randint(0, 500, (400,), generator=torch.Generator().manual_seed(4)).tolist()
    config = IceCacheConfig(token_budget=4 + 4 + 12 * 4, page_size=4, sink_tokens=4, window_tokens=4, dense_layers=1,
                            selector="newest")
    assert config.candidates == (1, 0)  # not the tree's query: no re-ranking, no question pages
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    outs = {}
    for path in ("dynamic", "static"):
        eng = Engine.from_model(model, config=config.replace(decode_path=path))
        outs[path] = eng.generate([7, 8, 9], params, context=eng.index(ids)).token_ids
        assert calls[path] > 0
    assert outs["static"] == outs["dynamic"] and len(outs["static"]) == 12


def test_random_pages_are_valid_distinct_and_fixed_by_the_draw():
    from icecache.selectors import random_pages
    valid = torch.randint(0, 3, (2, 500), generator=torch.Generator().manual_seed(0))
    picks = [random_pages(valid, 40, draw) for draw in (0, 1, 0)]
    for p in picks:
        assert p.shape == (2, 40) and bool((p >= 0).all())
        assert bool((valid.gather(1, p) > 0).all())  # only pages holding tokens
        assert all(len(set(row.tolist())) == 40 for row in p)
    assert torch.equal(picks[0], picks[2]) and not torch.equal(picks[0], picks[1])
    counts = torch.zeros(2, 500)  # over many draws every valid page comes up about as often
    for draw in range(400):
        counts.scatter_add_(1, random_pages(valid, 40, torch.tensor([draw])), torch.ones(2, 40))
    expected = 400 * 40 / (valid > 0).sum(1, keepdim=True)
    assert bool((counts[valid == 0] == 0).all())
    assert (counts / expected)[valid > 0].std() < 0.25


def test_the_page_means_count_in_a_decoders_device_memory():
    """unselected="means": a decoder holds every sparse layer's value means (its key means are
    its tree's), counted in its device_bytes, and the engine's estimate for admission covers them."""
    from icecache.cache import RequestKV
    from icecache.static_decode import StaticDecoder
    model = random_model(tiny_config("llama"), torch.device("cpu"))
    ids = torch.randint(0, 500, (600,), generator=torch.Generator().manual_seed(3)).tolist()
    config = IceCacheConfig(token_budget=4 + 4 + 12 * 4, page_size=4, sink_tokens=4, window_tokens=4, dense_layers=1)
    held, estimate = {}, {}
    for unselected in ("off", "means"):
        eng = Engine.from_model(model, config=config.replace(unselected=unselected, decode_path="static"))
        ctx = eng.index(ids)
        req = RequestKV(eng.shape, eng.config, ctx)
        decoder = StaticDecoder(eng.model, eng.config, ctx, [(kv.k, kv.v) for kv in req.own], 8)
        held[unselected], estimate[unselected] = decoder.device_bytes(), eng.context_device_bytes(len(ids))
    means = sum(s.pages.value_mean.nbytes for s in ctx.sparse.values())
    assert means > 0 and held["means"] - held["off"] == means
    assert estimate["means"] - estimate["off"] >= means
