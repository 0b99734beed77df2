"""The node cache actor on a real Ray cluster with real shm segments: contexts placed in
slabs, leases, LRU eviction under a byte capacity, tenants, and cleanup when holders or the
cache itself die."""

import os
import signal
import subprocess
import time
import uuid

import pytest
import ray

from cluster import shm
from cluster.node_cache import NAMESPACE, RemoteNodeCache

MiB = 1 << 20


@pytest.fixture
def cache(ray_local):
    handle = RemoteNodeCache.options(name=f"test_cache_{uuid.uuid4().hex[:8]}", namespace=NAMESPACE).remote(3 * MiB)
    yield handle
    ray.get(handle.shutdown.remote())
    ray.kill(handle)


def call(handle, method, *args):
    return ray.get(getattr(handle, method).remote(*args))


def put(cache, key: str, num_bytes: int, pid: int = os.getpid(), tenant: str = "t", fill: int = 7) -> dict:
    """Reserve, write and publish a context; returns the grant (its lease is still held)."""
    grant = call(cache, "reserve", tenant, key, "m", 10, num_bytes, pid)
    assert grant.status == "reserved", grant
    mapping = shm.Mapping(grant.segment, writable=True)
    mapping.view[grant.offset:grant.offset + num_bytes] = bytes([fill]) * num_bytes
    mapping.close()
    assert call(cache, "publish", grant.lease)
    return grant


def read(grant: dict, num_bytes: int) -> memoryview:
    return shm.Mapping(grant.segment).view[grant.offset:grant.offset + num_bytes]


def doomed_process() -> subprocess.Popen:
    return subprocess.Popen(["sleep", "60"])


def test_lru_eviction_spares_leased_contexts(cache):
    a, b, c = (put(cache, k, MiB, fill=i) for i, k in enumerate(("a" * 32, "b" * 32, "c" * 32)))
    call(cache, "release", a.lease)
    call(cache, "release", c.lease)  # b stays leased
    touch = call(cache, "acquire", "t", "a" * 32, os.getpid())  # a is now more recent than c
    call(cache, "release", touch.lease)

    d = put(cache, "d" * 32, MiB)  # needs room: c, the least recently used unleased, goes
    assert not call(cache, "holds", "c" * 32, "t") and (d.segment, d.offset) == (c.segment, c.offset)
    assert call(cache, "holds", "a" * 32, "t") and call(cache, "holds", "b" * 32, "t")

    full = call(cache, "reserve", "t", "e" * 32, "m", 10, 2 * MiB, os.getpid())
    assert full.status == "full" and "leased" in full.message
    assert call(cache, "holds", "b" * 32, "t") and call(cache, "holds", "d" * 32, "t")  # leased: never evicted
    stats = call(cache, "stats")
    assert stats.evictions == 2 and stats.contexts == 2 and stats.bytes == 2 * MiB  # c, then a

    # what a reader maps is what the writer wrote, and contexts never overlap
    view = read(b, MiB)
    assert bytes(view) == bytes([1]) * MiB and bytes(read(d, MiB)) == bytes([7]) * MiB
    assert call(cache, "stats").slabs_made == 1  # one slab, reused
    with pytest.raises(TypeError):
        view[0] = 0  # read-only mapping
    call(cache, "release", d.lease)


def test_a_context_bigger_than_the_cache_is_refused(cache):
    grant = call(cache, "reserve", "t", "f" * 32, "m", 10, 4 * MiB, os.getpid())
    assert grant.status == "full" and str(4 * MiB) in grant.message


def test_leases_of_a_dead_process_are_dropped(cache):
    put(cache, "a" * 32, MiB)
    holder = doomed_process()
    grant = call(cache, "acquire", "t", "a" * 32, holder.pid)
    assert grant.status == "ready" and holder.pid in call(cache, "lease_holders")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert holder.pid not in call(cache, "lease_holders")
    assert call(cache, "stats").reaped_leases == 1


def test_a_dead_writers_unpublished_segment_is_discarded(cache):
    writer = doomed_process()
    grant = call(cache, "reserve", "t", "w" * 32, "m", 10, MiB, writer.pid)
    assert call(cache, "acquire", "t", "w" * 32, os.getpid()).status == "pending"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert call(cache, "acquire", "t", "w" * 32, os.getpid()).status == "missing"
    assert call(cache, "stats").bytes == 0  # its extent is free again...
    again = call(cache, "reserve", "t", "x" * 32, "m", 10, MiB, os.getpid())
    assert (again.segment, again.offset) == (grant.segment, grant.offset)  # ...and is reused
    call(cache, "release", again.lease)


def test_tenants_do_not_see_each_other(cache):
    put(cache, "a" * 32, MiB, tenant="alice")
    other, unknown = (call(cache, "acquire", "bob", k * 32, os.getpid()) for k in "a0")
    assert other == unknown and other.status == "missing" and other.gone == []
    assert not call(cache, "holds", "a" * 32, "bob")
    assert not call(cache, "drop", "bob", "a" * 32)
    assert call(cache, "holds", "a" * 32, "alice")


def test_drop_waits_for_the_last_lease(cache):
    grant = put(cache, "a" * 32, MiB)
    assert call(cache, "drop", "t", "a" * 32)
    assert call(cache, "acquire", "t", "a" * 32, os.getpid()).status == "missing"  # no new users
    assert call(cache, "stats").bytes == MiB  # the writer's lease still holds it...
    again = put(cache, "a" * 32, MiB, fill=9)  # ...so a fresh copy of it goes elsewhere
    assert again.offset != grant.offset and bytes(read(grant, MiB)) == bytes([7]) * MiB
    call(cache, "release", grant.lease)
    assert call(cache, "stats").bytes == MiB and call(cache, "holds", "a" * 32, "t")
    call(cache, "release", again.lease)


def test_segments_go_when_the_cache_is_killed(ray_local):
    handle = RemoteNodeCache.options(name="doomed_cache", namespace=NAMESPACE).remote(3 * MiB)
    grant = put(handle, "a" * 32, MiB)
    assert grant.segment in shm.list_segments()
    ray.kill(handle)  # SIGKILL: no atexit, no shutdown(); the watcher process cleans up
    deadline = time.monotonic() + 10
    while grant.segment in shm.list_segments() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert grant.segment not in shm.list_segments()


def test_a_writer_returns_what_it_did_not_use_of_its_reservation(cache):
    grant = call(cache, "reserve", "t", "a" * 32, "m", 10, 2 * MiB, os.getpid())
    assert call(cache, "publish", grant.lease, MiB // 2)  # reserved at an upper bound, used less
    assert call(cache, "stats").bytes == MiB // 2
    b = put(cache, "b" * 32, 2 * MiB)  # fits beside it only because the tail came back
    assert b.offset >= MiB // 2 and call(cache, "holds", "a" * 32, "t")
    assert call(cache, "acquire", "t", "a" * 32, os.getpid()).num_bytes == MiB // 2


def test_slabs_are_made_as_needed_and_given_back_for_a_larger_context(ray_local):
    handle = RemoteNodeCache.options(name=f"test_cache_{uuid.uuid4().hex[:8]}", namespace=NAMESPACE).remote(
        4 * MiB, MiB)  # 1 MiB slabs
    try:
        a = put(handle, "a" * 32, MiB // 2)
        b = put(handle, "b" * 32, MiB // 2)
        assert a.segment == b.segment and call(handle, "stats").slabs == 1  # two in one slab
        put(handle, "c" * 32, MiB)
        assert call(handle, "stats").slabs == 2
        for grant in (a, b):
            call(handle, "release", grant.lease)
        assert call(handle, "drop", "t", "a" * 32) and call(handle, "drop", "t", "b" * 32)
        big = put(handle, "d" * 32, 3 * MiB)  # 2 MiB free: the emptied 1 MiB slab is given back for a 3 MiB one
        stats = call(handle, "stats")
        assert stats.slabs == 2 and stats.slab_bytes == 4 * MiB and a.segment not in shm.list_segments()
        assert big.segment in shm.list_segments() and call(handle, "holds", "c" * 32, "t")
    finally:
        ray.get(handle.shutdown.remote())
        ray.kill(handle)


def test_preallocate_makes_one_slab_of_the_capacity(ray_local):
    handle = RemoteNodeCache.options(name=f"test_cache_{uuid.uuid4().hex[:8]}", namespace=NAMESPACE).remote(
        4 * MiB, MiB)
    try:
        slabs = call(handle, "preallocate")
        assert call(handle, "preallocate") == slabs and len(slabs) == 1  # idempotent
        grants = [put(handle, k * 32, MiB) for k in "abcd"]
        assert {g.segment for g in grants} == set(slabs) and call(handle, "stats").slabs_made == 1
        assert sorted(g.offset for g in grants) == [0, MiB, 2 * MiB, 3 * MiB]
        assert os.stat(shm.SHM_DIR / slabs[0]).st_size == 4 * MiB
    finally:
        ray.get(handle.shutdown.remote())
        ray.kill(handle)
    assert slabs[0] not in shm.list_segments()
