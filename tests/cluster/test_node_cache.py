"""The node cache actor on a real Ray cluster with real shm segments: leases, LRU eviction
under a byte capacity, tenants, and cleanup when holders or the cache itself die."""

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
    assert grant["status"] == "reserved", grant
    mapping = shm.Mapping(grant["segment"], writable=True)
    mapping.view[:num_bytes] = bytes([fill]) * num_bytes
    mapping.close()
    assert call(cache, "publish", grant["lease"])
    return grant


def doomed_process() -> subprocess.Popen:
    return subprocess.Popen(["sleep", "60"])


def test_lru_eviction_spares_leased_contexts(cache):
    a, b, c = (put(cache, k, MiB, fill=i) for i, k in enumerate(("a" * 32, "b" * 32, "c" * 32)))
    call(cache, "release", a["lease"])
    call(cache, "release", c["lease"])  # b stays leased
    touch = call(cache, "acquire", "t", "a" * 32, os.getpid())  # a is now more recent than c
    call(cache, "release", touch["lease"])

    d = put(cache, "d" * 32, MiB)  # needs room: c, the least recently used unleased, goes
    assert not call(cache, "holds", "c" * 32, "t") and c["segment"] not in shm.list_segments()
    assert call(cache, "holds", "a" * 32, "t") and call(cache, "holds", "b" * 32, "t")

    full = call(cache, "reserve", "t", "e" * 32, "m", 10, 2 * MiB, os.getpid())
    assert full["status"] == "full" and "leased" in full["message"]
    assert call(cache, "holds", "b" * 32, "t") and call(cache, "holds", "d" * 32, "t")  # leased: never evicted
    stats = call(cache, "stats")
    assert stats["evictions"] == 2 and stats["contexts"] == 2 and stats["bytes"] == 2 * MiB  # c, then a

    # what a reader maps is what the writer wrote
    view = shm.Mapping(b["segment"]).view
    assert bytes(view[:4]) == bytes([1]) * 4
    with pytest.raises(TypeError):
        view[0] = 0  # read-only mapping
    call(cache, "release", d["lease"])


def test_a_context_bigger_than_the_cache_is_refused(cache):
    grant = call(cache, "reserve", "t", "f" * 32, "m", 10, 4 * MiB, os.getpid())
    assert grant["status"] == "full" and str(4 * MiB) in grant["message"]


def test_leases_of_a_dead_process_are_dropped(cache):
    put(cache, "a" * 32, MiB)
    holder = doomed_process()
    grant = call(cache, "acquire", "t", "a" * 32, holder.pid)
    assert grant["status"] == "ready" and holder.pid in call(cache, "lease_holders")
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert holder.pid not in call(cache, "lease_holders")
    assert call(cache, "stats")["reaped_leases"] == 1


def test_a_dead_writers_unpublished_segment_is_discarded(cache):
    writer = doomed_process()
    grant = call(cache, "reserve", "t", "w" * 32, "m", 10, MiB, writer.pid)
    assert call(cache, "acquire", "t", "w" * 32, os.getpid())["status"] == "pending"
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert call(cache, "acquire", "t", "w" * 32, os.getpid())["status"] == "missing"
    assert grant["segment"] not in shm.list_segments()


def test_tenants_do_not_see_each_other(cache):
    put(cache, "a" * 32, MiB, tenant="alice")
    assert call(cache, "acquire", "bob", "a" * 32, os.getpid()) == call(cache, "acquire", "bob", "0" * 32,
                                                                         os.getpid()) == {"status": "missing", "gone": []}
    assert not call(cache, "holds", "a" * 32, "bob")
    assert not call(cache, "drop", "bob", "a" * 32)
    assert call(cache, "holds", "a" * 32, "alice")


def test_drop_waits_for_the_last_lease(cache):
    grant = put(cache, "a" * 32, MiB)
    assert call(cache, "drop", "t", "a" * 32)
    assert call(cache, "acquire", "t", "a" * 32, os.getpid())["status"] == "missing"  # no new users
    assert grant["segment"] in shm.list_segments()  # the writer's lease still holds it
    call(cache, "release", grant["lease"])
    assert grant["segment"] not in shm.list_segments()


def test_segments_go_when_the_cache_is_killed(ray_local):
    handle = RemoteNodeCache.options(name="doomed_cache", namespace=NAMESPACE).remote(3 * MiB)
    grant = put(handle, "a" * 32, MiB)
    assert grant["segment"] in shm.list_segments()
    ray.kill(handle)  # SIGKILL: no atexit, no shutdown(); the watcher process cleans up
    deadline = time.monotonic() + 10
    while grant["segment"] in shm.list_segments() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert grant["segment"] not in shm.list_segments()
