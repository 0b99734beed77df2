"""A packed context maps back without copies and decodes exactly like the original."""

import mmap

import pytest
import torch

from icecache import SamplingParams
from icecache.packing import pack_into, packed_size, unpack
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
