"""A packed context maps back without copies and decodes exactly like the original."""

import mmap

import pytest
import torch

from icecache import Engine, IceCacheConfig, SamplingParams
from icecache.testing import random_model, tiny_config
from icecache.packing import pack_into, packed_size, packed_size_bound, unpack
from tests.icecache.haystack import passkey_document


@pytest.fixture(scope="module")
def indexed(engine):
    doc = passkey_document(engine.tokenizer, 900, 0.4, 48213)
    return doc, engine.index(doc)


def test_roundtrip_through_a_read_only_mapping_decodes_identically(engine, indexed, tmp_path):
    _, ctx = indexed
    size = packed_size(ctx)
    path = tmp_path / "ctx.bin"
    with open(path, "wb") as f:
        f.truncate(size)
    with open(path, "r+b") as f:
        writable = mmap.mmap(f.fileno(), size)
        assert pack_into(ctx, memoryview(writable)) == size
        writable.close()
    with open(path, "rb") as f:
        view = memoryview(mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ))
    mapped = unpack(view)

    assert mapped.token_ids == ctx.token_ids and mapped.layout == ctx.layout
    assert mapped.host_bytes == ctx.host_bytes
    for layer in ctx.sparse:
        a, b = ctx.sparse[layer], mapped.sparse[layer]
        assert torch.equal(a.pages.keys, b.pages.keys) and torch.equal(a.tree.page_lo, b.tree.page_lo)
        assert a.tree.level_sizes() == b.tree.level_sizes()
    for layer in ctx.dense:
        assert torch.equal(ctx.dense[layer][0], mapped.dense[layer][0])

    params = SamplingParams(max_tokens=8, temperature=0.0)
    question = "\nWhat is the pass key? The pass key is"
    assert engine.generate(question, params, context=mapped).token_ids == \
        engine.generate(question, params, context=ctx).token_ids


def test_bad_buffers_are_refused(indexed):
    _, ctx = indexed
    with pytest.raises(ValueError, match="bad magic"):
        unpack(memoryview(bytearray(64)))
    with pytest.raises(ValueError, match="buffer: .* bytes, the context needs"):
        pack_into(ctx, memoryview(bytearray(128)))


@pytest.mark.parametrize("config", [IceCacheConfig(), IceCacheConfig(reuse_layers=2, dense_layers=1),
                                    IceCacheConfig(token_budget=64, page_size=4, sink_tokens=4, window_tokens=4)])
def test_the_size_bound_known_before_a_prefill_covers_the_context(config):
    """A segment is reserved at packed_size_bound before the document is prefilled: it must
    hold the context, whatever the tree makes of it, and not waste much."""
    model = random_model(tiny_config("llama", num_hidden_layers=4, max_position_embeddings=8192),
                         torch.device("cpu"), torch.float32)
    eng = Engine.from_model(model, config=config, model_id="tiny")
    s = eng.shape
    for n in (5, 64, 700, 3000):
        ids = torch.randint(3, 500, (n,), generator=torch.Generator().manual_seed(n)).tolist()
        actual = packed_size(eng.index(ids))
        bound = packed_size_bound(config, s.num_layers, s.num_kv_heads, s.head_dim, s.dtype, model.config.vocab_size, n)
        assert actual <= bound <= 1.5 * actual + 8192, (n, actual, bound)
