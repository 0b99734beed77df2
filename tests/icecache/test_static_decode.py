"""The static-shape decode path (the one CUDA graphs capture on a GPU), run eagerly on CPU:
the same tokens as the dynamic path where their designs agree, and the passkey on real weights."""

import torch

from icecache import Engine, IceCacheConfig, SamplingParams
from icecache.models import random_model, tiny_config
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


def test_static_icecache_finds_the_passkey_and_selects_within_budget(engine):
    static = engine.with_config(IceCacheConfig(token_budget=256, decode_path="static"))
    doc = passkey_document(engine.tokenizer, 2500, 0.3, 90417)
    out = static.generate(QUESTION, SamplingParams(max_tokens=8, temperature=0.0), context=static.index(doc))
    assert "90417" in out.text
    sparse_layers = engine.shape.num_layers - static.config.dense_layers
    per_layer_head = out.stats["pages_selected_per_token"] / (sparse_layers * engine.shape.num_kv_heads)
    assert 0 < per_layer_head <= static.config.retrieved_pages


def test_decode_path_is_validated():
    import pytest
    with pytest.raises(ValueError, match="decode_path"):
        IceCacheConfig(decode_path="fast")
