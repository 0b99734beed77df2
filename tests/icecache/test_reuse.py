"""IceCache-reuse (reuse_layers > 1): a cycle's later layers store their KV in the first
layer's page layout and decode with its page selection."""

import pytest
import torch

from icecache import Engine, IceCacheConfig, SamplingParams
from icecache.cache import RequestKV
from icecache.testing import random_model, tiny_config
from icecache.static_decode import StaticDecoder
from tests.icecache.haystack import QUESTION, passkey_document

SMALL = IceCacheConfig(token_budget=64, page_size=4, sink_tokens=4, window_tokens=4, dense_layers=1,
                       reuse_layers=2)


def test_a_cycle_shares_layout_and_selection():
    model = random_model(tiny_config("llama", num_hidden_layers=5), torch.device("cpu"), torch.float32)
    eng = Engine.from_model(model, config=SMALL, model_id="tiny")
    ids = torch.randint(3, 500, (600,), generator=torch.Generator().manual_seed(0)).tolist()
    ctx = eng.index(ids)
    plain = eng.with_config(SMALL.replace(reuse_layers=1)).index(ids)
    assert [ctx.cycle_leader(i) for i in range(1, 5)] == [1, 1, 3, 3]
    assert ctx.sparse[2].tree is ctx.sparse[1].tree and ctx.sparse[4].tree is ctx.sparse[3].tree
    assert ctx.sparse[3].tree is not ctx.sparse[1].tree
    assert torch.equal(ctx.sparse[2].pages.positions, ctx.sparse[1].pages.positions)
    for layer in (2, 4):  # the follower holds its own KV, placed by the leader's layout
        pages, ref = ctx.sparse[layer].pages, plain.sparse[layer].pages
        for h in range(pages.keys.shape[0]):  # token by token, in position order
            at, ref_at = pages.positions[h] >= 0, ref.positions[h] >= 0
            mine = pages.keys[h][at][pages.positions[h][at].argsort()]
            theirs = ref.keys[h][ref_at][ref.positions[h][ref_at].argsort()]
            assert torch.equal(mine, theirs)

    with torch.inference_mode():
        req = RequestKV(eng.shape, eng.config, ctx)
        logits = eng.runner.prefill_one(req, [5, 6, 7], ctx.num_tokens)
        dec = StaticDecoder(eng.model, eng.config, ctx, [(kv.k, kv.v) for kv in req.own], 12)
        for i in range(12):
            logits = dec.step(int(logits.argmax()), ctx.num_tokens + 3 + i)
            pages = dec.last_pages
            assert torch.equal(pages[2], pages[1]) and torch.equal(pages[4], pages[3])
            assert (pages[1] >= 0).any()


def test_reuse_is_validated():
    with pytest.raises(ValueError, match="reuse_layers"):
        IceCacheConfig(reuse_layers=2, decode_path="dynamic")
    with pytest.raises(ValueError, match="reuse_layers"):
        IceCacheConfig(reuse_layers=2, selector="quest")


@pytest.mark.slow
def test_reuse_finds_the_passkey_on_real_weights(engine):
    reuse = engine.with_config(IceCacheConfig(token_budget=256, reuse_layers=2))
    doc = passkey_document(engine.tokenizer, 2500, 0.3, 90417)
    out = reuse.generate(QUESTION, SamplingParams(max_tokens=8, temperature=0.0), context=reuse.index(doc))
    assert "90417" in out.text
