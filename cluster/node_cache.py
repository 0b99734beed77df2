"""The per-node context cache: one Ray actor per node owning the registry of indexed
contexts and the shared memory that holds them.

Contexts live in slabs: large shm segments, each an arena of contexts at offsets. A slab
outlives the contexts in it, so a replica maps and page-locks it once and every later
context placed there is written and read by DMA at once. Page-locking fresh memory is the
slow part (cudaHostRegister of an unfaulted mapping runs at ~1 GB/s on an H200 host and
stalls the process's GPU work meanwhile: benchmarks/pin_probe.py), so paying it once per
slab instead of once per document is what lets a new document be indexed at prefill
speed. `preallocate()` makes one slab of the whole capacity up front (a GPU replica asks
for it at start); otherwise slabs of at least `slab_bytes` are made as contexts need them.

Replicas talk to the actor once per request (acquire / reserve / publish / release),
never per layer or token. A lease pins a context while a request uses it; leases are held
by process id and the actor runs on the same node as its replicas, so a lease whose
process died is noticed at the next call and dropped. Unleased contexts are evicted least
recently used first when a new one needs room under the byte capacity.
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
DEFAULT_SLAB_BYTES = 256 << 20
_ALIGN = 4096  # contexts start on page boundaries of their slab


@dataclass(frozen=True)
class Reply:
    """The cache's answer to acquire() and reserve(). status:
    "ready": a published context is leased to the caller;
    "reserved": an extent is leased to the caller to write, then publish();
    "pending": another replica is writing that context;
    "missing": no such context for this tenant (acquire only);
    "full": no room (reserve only; `message` says why).
    With a lease: where the bytes are (segment, offset, num_bytes) and the placement's
    unique name (extent). acquire() also returns `gone` (the caller's held extents no
    longer cached) and `slabs` (the slabs that still exist)."""

    status: str
    lease: int | None = None
    segment: str | None = None
    offset: int = 0
    num_bytes: int = 0
    extent: str | None = None
    num_tokens: int = 0
    slabs: list[str] | None = None
    gone: list[str] = field(default_factory=list)
    message: str = ""


def actor_name(node_id: str) -> str:
    return f"icecache_node_cache_{node_id}"


@dataclass(frozen=True)
class CacheStats:
    """What one node's cache holds and has done (NodeCache.stats; the gRPC NodeStats)."""

    node_id: str
    contexts: int  # published contexts
    bytes: int  # bytes the placed contexts take in the slabs
    capacity_bytes: int
    leases: int  # leases held by requests (and writers) now
    segments: int  # contexts placed, published or being written
    slabs: int
    slab_bytes: int
    hits: int
    misses: int
    evictions: int
    prefills: int  # contexts reserved to be written (each a prefill somewhere on the node)
    reaped_leases: int  # leases of dead processes dropped
    slabs_made: int


@dataclass
class Record:
    """One context in the registry."""

    key: str  # hash of (tenant salt, model, layout, token ids); the client-facing context id
    tenant: str
    model_id: str
    num_tokens: int
    slab: str  # the shm segment holding the packed context
    offset: int  # where in the slab
    num_bytes: int
    extent: str  # unique name of this placement: replicas key what they built on it by it
    ready: bool = False  # published: the writer finished filling the segment
    dropped: bool = False  # released by the client: goes as soon as no lease holds it
    last_use: float = field(default_factory=time.monotonic)
    leases: set[int] = field(default_factory=set)


class NodeCache:
    """Actor body. Every public method returns plain dicts so callers need no import of ours."""

    def __init__(self, capacity_bytes: int = DEFAULT_CAPACITY_BYTES, slab_bytes: int = DEFAULT_SLAB_BYTES) -> None:
        if capacity_bytes <= 0:
            raise ValueError(f"capacity_bytes: must be positive, got {capacity_bytes}")
        if slab_bytes <= 0:
            raise ValueError(f"slab_bytes: must be positive, got {slab_bytes}")
        self.capacity_bytes = int(capacity_bytes)
        self.slab_bytes = int(slab_bytes)
        self.slabs: dict[str, int] = {}  # slab segment -> its size
        self.node_id = ray.get_runtime_context().get_node_id()
        self.pid = os.getpid()
        self.records: dict[str, Record] = {}  # key -> its current context
        self.placed: dict[str, Record] = {}  # extent -> context: the current ones and dropped ones still leased
        self.leases: dict[int, tuple[Record, int]] = {}  # lease id -> (context, holder pid)
        self._lease_ids = itertools.count(1)
        self._serial = itertools.count()
        self.counts = {"hits": 0, "misses": 0, "evictions": 0, "prefills": 0, "reaped_leases": 0, "slabs_made": 0}
        self.swept = shm.sweep_dead_owners()  # segments left by a cache that died before us
        shm.start_reaper(self.pid)  # unlinks our segments however we exit
        tags = {"node_id": self.node_id}
        self._gauges = {name: metrics.Gauge(f"icecache_cache_{name}", description, tag_keys=("node_id",))
                        for name, description in (("contexts", "Contexts held in the node cache"),
                                                  ("bytes", "Bytes of contexts held by the node cache"),
                                                  ("slab_bytes", "Bytes of shared memory in the node cache's slabs"),
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
        self._gauges["slab_bytes"].set(sum(self.slabs.values()))
        self._gauges["leases"].set(len(self.leases))

    @property
    def used_bytes(self) -> int:
        return sum(r.num_bytes for r in self.placed.values())

    def _lease(self, record: Record, pid: int) -> int:
        lease = next(self._lease_ids)
        self.leases[lease] = (record, pid)
        record.leases.add(lease)
        record.last_use = time.monotonic()
        return lease

    def _remove(self, record: Record) -> None:
        """Forget a context; its bytes in the slab are free for the next one."""
        for lease in record.leases:
            self.leases.pop(lease, None)
        if self.records.get(record.key) is record:
            del self.records[record.key]
        del self.placed[record.extent]

    def _reap(self) -> None:
        """Drop leases of dead processes, unfinished segments of dead writers and dropped
        contexts nobody holds any more."""
        dead = [lease for lease, (_, pid) in self.leases.items() if not shm.pid_alive(pid)]
        for lease in dead:
            self._release(lease)
        if dead:
            self._count("reaped_leases", len(dead))

    def _release(self, lease: int) -> None:
        record, _ = self.leases.pop(lease, (None, None))
        if record is None:
            return
        record.leases.discard(lease)
        if not record.leases and (record.dropped or not record.ready):
            self._remove(record)  # released without publishing (writer failed) or dropped

    def _hole(self, num_bytes: int) -> tuple[str, int] | None:
        """(slab, offset) of the first free run of num_bytes in a slab, or None."""
        for slab, size in self.slabs.items():
            used = sorted((r.offset, r.offset + r.num_bytes) for r in self.placed.values() if r.slab == slab)
            at = 0
            for start, end in used:
                if start - at >= num_bytes:
                    return slab, at
                at = max(at, -(-end // _ALIGN) * _ALIGN)
            if size - at >= num_bytes:
                return slab, at
        return None

    def _new_slab(self, num_bytes: int) -> str | None:
        """A slab for at least num_bytes (slab_bytes or the capacity left, whichever is less),
        if the capacity allows; unused slabs are given back first when that makes room."""
        free = self.capacity_bytes - sum(self.slabs.values())
        if free < num_bytes:
            empty = [name for name in self.slabs if not any(r.slab == name for r in self.placed.values())]
            if free + sum(self.slabs[name] for name in empty) < num_bytes:
                return None
            for name in empty:
                shm.unlink(name)
                free += self.slabs.pop(name)
        size = min(free, max(num_bytes, self.slab_bytes))
        name = shm.segment_name(self.pid, "", next(self._serial))
        shm.create(name, size)
        self.slabs[name] = size
        self._count("slabs_made")
        return name

    def _place(self, num_bytes: int) -> tuple[str, int] | None:
        """Room for num_bytes: a hole in a slab, else a new slab, else evict unleased contexts,
        least recently used first, until one of those works. None if nothing can make room."""
        idle = sorted((r for r in self.records.values() if r.ready and not r.leases), key=lambda r: r.last_use)
        while True:
            spot = self._hole(num_bytes)
            if spot is None:
                slab = self._new_slab(num_bytes)
                spot = None if slab is None else (slab, 0)
            if spot is not None or not idle:
                return spot
            self._remove(idle.pop(0))
            self._count("evictions")

    def preallocate(self) -> list[str]:
        """Make one slab of all the capacity not yet in slabs (idempotent): done once, at
        start, so no context pays for new shared memory later. Returns every slab's name."""
        free = self.capacity_bytes - sum(self.slabs.values())
        if free >= _ALIGN:
            self._new_slab(free)
        self._export()
        return self.slabs_held()

    def slabs_held(self) -> list[str]:
        """The slabs' names, oldest first (a replica maps each once)."""
        return list(self.slabs)

    def _grant(self, record: Record, pid: int, status: str = "ready", gone: list[str] | None = None) -> Reply:
        return Reply(status, self._lease(record, pid), record.slab, record.offset, record.num_bytes, record.extent,
                     record.num_tokens, self.slabs_held(), gone or [])

    # ------------------------------------------------------------------ protocol
    def acquire(self, tenant: str, key: str, pid: int, held: list[str] | tuple = ()) -> Reply:
        """Lease a published context: "ready" with the lease, or "pending" while another
        replica is writing it, or "missing". A context of another tenant is "missing"
        through the same path as an unknown key. held: extents the caller keeps contexts of
        without a lease; the reply's `gone` lists those no longer cached (evicted or
        dropped), which the caller should let go of, and `slabs` the slabs that still exist
        (the caller unmaps any other)."""
        self._reap()
        live = {r.extent for r in self.records.values() if not r.dropped}
        gone = [name for name in held if name not in live]
        record = self.records.get(key)
        if record is None or record.tenant != tenant or record.dropped:
            self._count("misses")
            return Reply("missing", slabs=self.slabs_held(), gone=gone)
        if not record.ready:
            return Reply("pending", slabs=self.slabs_held(), gone=gone)
        self._count("hits")
        result = self._grant(record, pid, gone=gone)
        self._export()
        return result

    def reserve(self, tenant: str, key: str, model_id: str, num_tokens: int, num_bytes: int, pid: int) -> Reply:
        """Make room for a context the caller is about to write: "reserved" (the caller
        writes num_bytes at offset of the slab segment, then publish()es), or "ready" /
        "pending" if the context exists or is being written, or "full" with a message."""
        self._reap()
        record = self.records.get(key)
        if record is not None and record.tenant == tenant and not record.dropped:
            if not record.ready:
                return Reply("pending")
            self._count("hits")
            return self._grant(record, pid)
        if record is not None and record.dropped and record.leases:  # a fresh copy takes the key; the old one's
            del self.records[key]  # bytes stay taken until its last lease ends
        elif record is not None:
            self._remove(record)
        try:
            spot = self._place(num_bytes) if num_bytes <= self.capacity_bytes else None
        except OSError as e:  # the shm filesystem lacks room for a new slab
            return Reply("full", message=str(e))
        if spot is None:
            leased = sum(r.num_bytes for r in self.placed.values() if r.leases)
            return Reply("full", message=(f"the context needs {num_bytes} bytes; the node cache holds "
                                          f"{self.capacity_bytes} bytes, {leased} of them leased by requests in flight"))
        slab, offset = spot
        record = Record(key, tenant, model_id, num_tokens, slab, offset, num_bytes, f"{slab}+{next(self._serial)}")
        self.records[key] = self.placed[record.extent] = record
        self._count("prefills")
        result = self._grant(record, pid, "reserved")
        self._export()
        return result

    def publish(self, lease: int, num_bytes: int | None = None) -> bool:
        """The writer finished: the context becomes visible to acquire(). Its lease stays.
        num_bytes: what the writer used of its reservation (made at an upper bound); the
        rest is free for the next context."""
        record, _ = self.leases.get(lease, (None, None))
        if record is None:
            return False
        if num_bytes is not None and 0 < num_bytes < record.num_bytes:
            record.num_bytes = int(num_bytes)
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

    def stats(self) -> CacheStats:
        self._reap()
        self._export()
        return CacheStats(self.node_id, sum(r.ready for r in self.records.values()), self.used_bytes,
                          self.capacity_bytes, len(self.leases), len(self.records), len(self.slabs),
                          sum(self.slabs.values()), **self.counts)

    def lease_holders(self) -> list[int]:
        """Process ids holding leases (for operators and fault tests)."""
        self._reap()
        return sorted({pid for _, pid in self.leases.values()})

    def shutdown(self) -> int:
        """Forget every context and unlink every slab (mapped views in replicas stay valid
        until unmapped). Returns the number of contexts dropped."""
        n = len(self.placed)
        for record in list(self.placed.values()):
            self._remove(record)
        for name in self.slabs:
            shm.unlink(name)
        self.slabs.clear()
        self.leases.clear()
        return n


RemoteNodeCache = ray.remote(num_cpus=0, max_restarts=0)(NodeCache)


def get_node_cache(node_id: str | None = None, capacity_bytes: int = DEFAULT_CAPACITY_BYTES,
                   slab_bytes: int = DEFAULT_SLAB_BYTES):
    """The cache actor of a node (this one by default), created on first use and pinned there.
    It is detached: it outlives the replicas that use it, so a redeploy keeps the cache."""
    node_id = node_id or ray.get_runtime_context().get_node_id()
    return RemoteNodeCache.options(
        name=actor_name(node_id), namespace=NAMESPACE, get_if_exists=True, lifetime="detached",
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
    ).remote(capacity_bytes, slab_bytes)


def find_node_cache(node_id: str):
    """The cache actor of a node if one exists there, else None."""
    try:
        return ray.get_actor(actor_name(node_id), namespace=NAMESPACE)
    except ValueError:
        return None
