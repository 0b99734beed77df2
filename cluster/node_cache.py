"""The per-node context cache: one Ray actor per node owning the registry of indexed
contexts and the shared-memory segments that hold them.

Replicas talk to it once per request (acquire / reserve / publish / release), never per
layer or token: the pages themselves are read straight from the mapped segments. A
lease pins a context while a request uses it; leases are held by process id and the
actor runs on the same node as its replicas, so a lease whose process died is noticed
at the next call and dropped. Unleased contexts are evicted least recently used first
when a new one needs room under the byte capacity.
"""

from __future__ import annotations

import atexit
import itertools
import os
import time
from dataclasses import dataclass, field

import ray
from ray.util import metrics
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from cluster import shm

NAMESPACE = "icecache"
DEFAULT_CAPACITY_BYTES = 8 << 30


def actor_name(node_id: str) -> str:
    return f"icecache_node_cache_{node_id}"


@dataclass
class Record:
    """One context in the registry."""

    key: str  # hash of (tenant salt, model, layout, token ids); the client-facing context id
    tenant: str
    model_id: str
    num_tokens: int
    segment: str  # shm segment holding the packed context
    num_bytes: int
    ready: bool = False  # published: the writer finished filling the segment
    dropped: bool = False  # released by the client: goes as soon as no lease holds it
    last_use: float = field(default_factory=time.monotonic)
    leases: set[int] = field(default_factory=set)


class NodeCache:
    """Actor body. Every public method returns plain dicts so callers need no import of ours."""

    def __init__(self, capacity_bytes: int = DEFAULT_CAPACITY_BYTES) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes: must be positive, got {capacity_bytes}")
        self.capacity_bytes = int(capacity_bytes)
        self.node_id = ray.get_runtime_context().get_node_id()
        self.pid = os.getpid()
        self.records: dict[str, Record] = {}
        self.leases: dict[int, tuple[str, int]] = {}  # lease id -> (key, holder pid)
        self._lease_ids = itertools.count(1)
        self._serial = itertools.count()
        self.counts = {"hits": 0, "misses": 0, "evictions": 0, "prefills": 0, "reaped_leases": 0}
        self.swept = shm.sweep_dead_owners()  # segments left by a cache that died before us
        shm.start_reaper(self.pid)  # unlinks our segments however we exit
        tags = {"node_id": self.node_id}
        self._gauges = {name: metrics.Gauge(f"icecache_cache_{name}", description, tag_keys=("node_id",))
                        for name, description in (("contexts", "Contexts held in the node cache"),
                                                  ("bytes", "Bytes of shared memory held by the node cache"),
                                                  ("leases", "Live leases on cached contexts"))}
        self._counters = {name: metrics.Counter(f"icecache_cache_{name}", f"Node cache {name}", tag_keys=("node_id",))
                          for name in self.counts}
        for m in (*self._gauges.values(), *self._counters.values()):
            m.set_default_tags(tags)
        atexit.register(self.shutdown)

    # ------------------------------------------------------------------ internals
    def _count(self, name: str, n: int = 1) -> None:
        self.counts[name] += n
        self._counters[name].inc(n)

    def _export(self) -> None:
        self._gauges["contexts"].set(sum(r.ready for r in self.records.values()))
        self._gauges["bytes"].set(self.used_bytes)
        self._gauges["leases"].set(len(self.leases))

    @property
    def used_bytes(self) -> int:
        return sum(r.num_bytes for r in self.records.values())

    def _lease(self, record: Record, pid: int) -> int:
        lease = next(self._lease_ids)
        self.leases[lease] = (record.key, pid)
        record.leases.add(lease)
        record.last_use = time.monotonic()
        return lease

    def _remove(self, record: Record) -> None:
        for lease in record.leases:
            self.leases.pop(lease, None)
        del self.records[record.key]
        shm.unlink(record.segment)

    def _reap(self) -> None:
        """Drop leases of dead processes, unfinished segments of dead writers and dropped
        contexts nobody holds any more."""
        dead = [lease for lease, (_, pid) in self.leases.items() if not shm.pid_alive(pid)]
        for lease in dead:
            self._release(lease)
        if dead:
            self._count("reaped_leases", len(dead))

    def _release(self, lease: int) -> None:
        key, _ = self.leases.pop(lease, (None, None))
        record = self.records.get(key)
        if record is None:
            return
        record.leases.discard(lease)
        if not record.leases and (record.dropped or not record.ready):
            self._remove(record)  # released without publishing (writer failed) or dropped

    def _make_room(self, num_bytes: int) -> bool:
        """Evict unleased contexts, least recently used first, until num_bytes fit."""
        idle = sorted((r for r in self.records.values() if r.ready and not r.leases), key=lambda r: r.last_use)
        for record in idle:
            if self.used_bytes + num_bytes <= self.capacity_bytes:
                break
            self._remove(record)
            self._count("evictions")
        return self.used_bytes + num_bytes <= self.capacity_bytes

    def _grant(self, record: Record, pid: int) -> dict:
        return {"status": "ready", "lease": self._lease(record, pid), "segment": record.segment,
                "num_bytes": record.num_bytes, "num_tokens": record.num_tokens}

    # ------------------------------------------------------------------ protocol
    def acquire(self, tenant: str, key: str, pid: int, held: list[str] | tuple = ()) -> dict:
        """Lease a published context. {"status": "ready", lease, segment, ...}, or
        {"status": "pending"} while another replica is writing it, or {"status": "missing"}.
        A context of another tenant is "missing" through the same path as an unknown key.
        held: segments the caller keeps mapped without a lease; the reply's "gone" lists
        those no longer cached (evicted or dropped), which the caller should unmap."""
        self._reap()
        live = {r.segment for r in self.records.values() if not r.dropped}
        gone = [name for name in held if name not in live]
        record = self.records.get(key)
        if record is None or record.tenant != tenant or record.dropped:
            self._count("misses")
            return {"status": "missing", "gone": gone}
        if not record.ready:
            return {"status": "pending", "gone": gone}
        self._count("hits")
        result = self._grant(record, pid)
        self._export()
        return {**result, "gone": gone}

    def reserve(self, tenant: str, key: str, model_id: str, num_tokens: int, num_bytes: int, pid: int) -> dict:
        """Make a segment for a context the caller is about to write. {"status": "reserved",
        lease, segment} (the caller writes, then publish()es), or "ready" / "pending" if
        the context exists or is being written, or {"status": "full", "message"}."""
        self._reap()
        record = self.records.get(key)
        if record is not None and record.tenant == tenant and not record.dropped:
            if not record.ready:
                return {"status": "pending"}
            self._count("hits")
            return self._grant(record, pid)
        if record is not None:  # a dropped record still held by a lease: a fresh copy takes its key
            self._remove(record)
        if num_bytes > self.capacity_bytes or not self._make_room(num_bytes):
            leased = sum(r.num_bytes for r in self.records.values() if r.leases)
            return {"status": "full", "message": (
                f"the context needs {num_bytes} bytes; the node cache holds {self.capacity_bytes} bytes, "
                f"{leased} of them leased by requests in flight")}
        segment = shm.segment_name(self.pid, key, next(self._serial))
        try:
            shm.create(segment, num_bytes)
        except OSError as e:
            return {"status": "full", "message": str(e)}
        record = Record(key, tenant, model_id, num_tokens, segment, num_bytes)
        self.records[key] = record
        self._count("prefills")
        result = {"status": "reserved", "lease": self._lease(record, pid), "segment": segment}
        self._export()
        return result

    def publish(self, lease: int) -> bool:
        """The writer finished: the context becomes visible to acquire(). Its lease stays."""
        key, _ = self.leases.get(lease, (None, None))
        record = self.records.get(key)
        if record is None:
            return False
        record.ready = True
        self._export()
        return True

    def release(self, lease: int) -> None:
        """End a lease. An unpublished segment whose writer releases it is discarded."""
        self._release(lease)
        self._reap()
        self._export()

    def drop(self, tenant: str, key: str) -> bool:
        """The client is done with a context: remove it now, or when its last lease ends."""
        self._reap()
        record = self.records.get(key)
        if record is None or record.tenant != tenant or record.dropped:
            return False
        record.dropped = True
        if not record.leases:
            self._remove(record)
        self._export()
        return True

    def holds(self, key: str, tenant: str) -> bool:
        """Whether this tenant's published context with this key is here (for request routing)."""
        record = self.records.get(key)
        return record is not None and record.tenant == tenant and record.ready and not record.dropped

    def stats(self) -> dict:
        self._reap()
        self._export()
        return {"node_id": self.node_id, "contexts": sum(r.ready for r in self.records.values()),
                "bytes": self.used_bytes, "capacity_bytes": self.capacity_bytes, "leases": len(self.leases),
                "segments": len(self.records), **self.counts}

    def lease_holders(self) -> list[int]:
        """Process ids holding leases (for operators and fault tests)."""
        self._reap()
        return sorted({pid for _, pid in self.leases.values()})

    def shutdown(self) -> int:
        """Unlink every segment (mapped views in replicas stay valid until unmapped)."""
        n = 0
        for record in list(self.records.values()):
            self._remove(record)
            n += 1
        self.leases.clear()
        return n


RemoteNodeCache = ray.remote(num_cpus=0, max_restarts=0)(NodeCache)


def get_node_cache(node_id: str | None = None, capacity_bytes: int = DEFAULT_CAPACITY_BYTES):
    """The cache actor of a node (this one by default), created on first use and pinned there.
    It is detached: it outlives the replicas that use it, so a redeploy keeps the cache."""
    node_id = node_id or ray.get_runtime_context().get_node_id()
    return RemoteNodeCache.options(
        name=actor_name(node_id), namespace=NAMESPACE, get_if_exists=True, lifetime="detached",
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
    ).remote(capacity_bytes)


def find_node_cache(node_id: str):
    """The cache actor of a node if one exists there, else None."""
    try:
        return ray.get_actor(actor_name(node_id), namespace=NAMESPACE)
    except ValueError:
        return None


def shutdown_node_caches(timeout_s: float = 30.0) -> int:
    """Unlink every node's segments and stop the cache actors (for `serve shutdown` scripts
    and tests). Returns the number of segments removed."""
    removed = 0
    for node in ray.nodes():
        handle = find_node_cache(node["NodeID"]) if node.get("Alive") else None
        if handle is not None:
            removed += ray.get(handle.shutdown.remote(), timeout=timeout_s)
            ray.kill(handle)
    return removed
