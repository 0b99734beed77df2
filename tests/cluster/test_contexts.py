"""Replica-side index-or-reuse through the node cache, on the real model and real shm."""

import time

import pytest
import ray

from cluster import shm
from cluster.contexts import CacheFull, ContextNotFound, SharedContexts
from cluster.node_cache import NAMESPACE, RemoteNodeCache
from icecache import SamplingParams
from tests.icecache.haystack import QUESTION, passkey_document

GiB = 1 << 30


@pytest.fixture(scope="module")
def shared(ray_local, engine):
    contexts = SharedContexts(engine, b"test-secret", GiB)
    yield contexts
    ray.get(contexts.cache.shutdown.remote())


def test_second_index_of_a_document_is_a_shared_hit(shared, engine):
    doc = passkey_document(engine.tokenizer, 1200, 0.5, 73194)
    ids = engine.tokenize(doc)
    first = shared.index("t", ids)
    assert not first.cached and first.context_id == shared.context_id("t", ids)
    start = time.perf_counter()
    second = shared.index("t", ids)
    reuse_s = time.perf_counter() - start
    assert second.cached and second.context_id == first.context_id
    assert reuse_s < first.context.prefill_s / 5  # a lookup and a map, no prefill
    assert second.context is first.context  # the same mapping, not a second copy
    assert len([s for s in shm.list_segments() if first.segment in s]) == 1

    params = SamplingParams(max_tokens=8, temperature=0.0)
    expected = engine.generate(QUESTION, params, context=engine.index(doc))
    assert engine.generate(QUESTION, params, context=second.context).token_ids == expected.token_ids
    assert "73194" in expected.text

    shared.release(first)
    shared.release(second)
    assert ray.get(shared.cache.stats.remote())["leases"] == 0
    # the mapping outlives its leases (the next question finds it mapped and page-locked)...
    assert shared.idle_mappings == 1
    third = shared.open("t", first.context_id)
    assert third.context is first.context
    shared.release(third)
    assert shared.idle_mappings == 1
    # ...until the node cache no longer holds the context: the next request's acquire says so
    unmapped = []
    shared.on_unmap = unmapped.append
    assert ray.get(shared.cache.drop.remote("t", first.context_id))
    with pytest.raises(ContextNotFound):
        shared.open("t", first.context_id)
    assert shared.idle_mappings == 0 and unmapped == [first.context]
    shared.on_unmap = None


def test_ids_are_per_tenant(shared, engine):
    ids = engine.tokenize("A short document about tenants and their secrets.")
    lease = shared.index("alice", ids)
    assert shared.context_id("bob", ids) != lease.context_id
    with pytest.raises(ContextNotFound):
        shared.open("bob", lease.context_id)
    with pytest.raises(ContextNotFound):
        shared.open("alice", "0" * 32)
    shared.release(lease)
    shared.release(shared.open("alice", lease.context_id))


def test_a_document_bigger_than_the_cache_is_refused(ray_local, engine):
    tiny = RemoteNodeCache.options(name="tiny_cache", namespace=NAMESPACE).remote(1 << 20)
    small = SharedContexts(engine, b"s", 1 << 20, cache=tiny)
    with pytest.raises(CacheFull, match="needs .* bytes"):
        small.index("t", engine.tokenize("word " * 300))
    assert ray.get(small.cache.stats.remote())["segments"] == 0
    ray.kill(small.cache)
