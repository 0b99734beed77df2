"""Replica-side index-or-reuse through the node cache, on the real model and real shm."""

import os
import time

import pytest
import ray

from cluster import shm
from cluster.contexts import CacheFull, ContextNotFound, ContextPending, SharedContexts
from cluster.node_cache import NAMESPACE, RemoteNodeCache
from icecache import SamplingParams
from icecache.packing import packed_size_bound
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
    assert second.extent == first.extent and ray.get(shared.cache.stats.remote()).contexts == 1

    params = SamplingParams(max_tokens=8, temperature=0.0)
    expected = engine.generate(QUESTION, params, context=engine.index(doc))
    assert engine.generate(QUESTION, params, context=second.context).token_ids == expected.token_ids
    assert "73194" in expected.text

    shared.release(first)
    shared.release(second)
    assert ray.get(shared.cache.stats.remote()).leases == 0
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


def test_a_context_another_replica_keeps_preparing_is_pending_not_missing(ray_local, engine):
    """A document reserved by a live writer that never publishes: after pending_timeout_s a
    question on its id and a second index of it end as ContextPending (retry), not as an
    unknown id or a full cache."""
    cache = RemoteNodeCache.options(name="pending_cache", namespace=NAMESPACE).remote(64 << 20)
    contexts = SharedContexts(engine, b"w", 64 << 20, cache=cache, pending_timeout_s=1.0)
    ids = engine.tokenize("A document that one replica is still prefilling.")
    context_id = contexts.context_id("t", ids)
    try:
        grant = ray.get(cache.reserve.remote("t", context_id, engine.model_id, len(ids), 1 << 20, os.getpid()))
        assert grant.status == "reserved"
        for call in (lambda: contexts.open("t", context_id), lambda: contexts.index("t", ids)):
            start = time.perf_counter()
            with pytest.raises(ContextPending, match="in preparation"):
                call()
            assert 1.0 <= time.perf_counter() - start < 10
        ray.get(cache.release.remote(grant.lease))
        with pytest.raises(ContextNotFound):  # the writer gave up: nothing by that id
            contexts.open("t", context_id)
    finally:
        ray.get(cache.shutdown.remote())
        ray.kill(cache)


def test_a_document_bigger_than_the_cache_is_refused(ray_local, engine):
    tiny = RemoteNodeCache.options(name="tiny_cache", namespace=NAMESPACE).remote(1 << 20)
    small = SharedContexts(engine, b"s", 1 << 20, cache=tiny)
    with pytest.raises(CacheFull, match="needs .* bytes"):
        small.index("t", engine.tokenize("word " * 300))
    assert ray.get(small.cache.stats.remote()).segments == 0
    ray.kill(small.cache)


def test_documents_go_into_the_preallocated_slab_mapped_once(ray_local, engine):
    cache = RemoteNodeCache.options(name="prealloc_cache", namespace=NAMESPACE).remote(64 << 20)
    contexts = SharedContexts(engine, b"p", 64 << 20, cache=cache)
    try:
        assert contexts.map_slabs(preallocate=True) == 64 << 20
        (slab,) = ray.get(cache.slabs_held.remote())
        leases = [contexts.index("t", engine.tokenize(f"Document {i}: " + "some words here. " * 40)) for i in range(2)]
        stats = ray.get(cache.stats.remote())
        assert stats.slabs_made == 1 and stats.contexts == 2 and slab in shm.list_segments()
        assert len({lease.extent for lease in leases}) == 2
        # each was written once into the slab and is read back from it: the same tokens as a private index
        params = SamplingParams(max_tokens=4, temperature=0.0)
        for i, lease in enumerate(leases):
            private = engine.index(f"Document {i}: " + "some words here. " * 40)
            assert (engine.generate(QUESTION, params, context=lease.context).token_ids
                    == engine.generate(QUESTION, params, context=private).token_ids)
            contexts.release(lease)
        assert stats.bytes < 2 * engine_bound(engine, leases)  # the unused tail of each reservation came back
    finally:
        ray.get(cache.shutdown.remote())
        ray.kill(cache)
    assert slab not in shm.list_segments()


def engine_bound(engine, leases) -> int:
    s = engine.shape
    return max(packed_size_bound(engine.config, s.num_layers, s.num_kv_heads, s.head_dim, s.dtype,
                                 engine.model.config.vocab_size, lease.context.num_tokens) for lease in leases)
