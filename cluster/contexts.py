"""Replica side of the node cache: find a document's context in shared memory, or prefill
it once and publish it there for every replica on the node.

A request holds a `Lease` while it uses a context; the context's tensors are views of its
extent of a slab (a shm segment holding many contexts) mapped in this process, so nothing
is copied per request and no Ray call happens per layer or token. A slab is mapped and (on
a GPU) page-locked once per process, before the first context placed in it is used, so a
new document is written into already locked memory by DMA and a second question finds its
context locked too. A context unpacked here outlives its leases: idle ones are let go of
when the node cache no longer holds them (each request's acquire says which), or past
`keep_mapped` of them, after `on_unmap` has let go of any device state built on them.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import ray

from cluster import shm
from cluster.node_cache import Reply, get_node_cache
from icecache import Context, Engine
from icecache.context import layout_of
from icecache.packing import pack_into, packed_size_bound, unpack

_PENDING_POLL_S = 0.05
log = logging.getLogger(__name__)


class ContextNotFound(KeyError):
    """No context with this id for this tenant on this node."""


class CacheFull(RuntimeError):
    """The node cache cannot make room for a context."""


class ContextPending(TimeoutError):
    """Another replica has been preparing this context for longer than this one waits."""


@dataclass
class Lease:
    """A request's hold on a cached context; release it when the request ends."""

    lease_id: int
    context_id: str
    context: Context
    cached: bool  # found in the cache (no prefill by this request)
    extent: str | None = None  # the context's place in a slab; None for an unshared private context


@dataclass
class _Held:
    """A context unpacked from its extent of a mapped slab."""

    context: Context
    slab: str
    users: int  # leases of this process on it; 0 = idle, kept for the next request


Build = Callable[[list[int]], Context]  # validated document ids -> its context, pages on the device
Run = Callable[[Callable[[], object]], object]  # runs device work where the device is driven


class SharedContexts:
    """Index-or-reuse of documents for one engine, through this node's cache actor."""

    def __init__(self, engine: Engine, tenant_secret: bytes, capacity_bytes: int, cache=None,
                 pending_timeout_s: float = 600.0, build: Build | None = None, run: Run | None = None,
                 on_unmap: Callable[[Context], None] | None = None, keep_mapped: int = 8) -> None:
        """`cache`: a node cache actor handle; default this node's (created if needed).
        build: prefills and indexes a document (default Engine.index_ids on this thread; a
        replica queues it to its scheduler); run: runs device work such as writing a
        context into its slab (default: here); on_unmap: called before an idle context is
        let go of, to free device state built on it; keep_mapped: idle contexts kept."""
        self.engine = engine
        self.secret = tenant_secret
        self.cache = cache or get_node_cache(capacity_bytes=capacity_bytes)
        self.pid = os.getpid()
        self.pending_timeout_s = pending_timeout_s
        self.build = build or (lambda ids: engine.index_ids(ids, on_device=True))
        self.run = run or (lambda fn: fn())
        self.on_unmap, self.keep_mapped = on_unmap, keep_mapped
        self._held: collections.OrderedDict[str, _Held] = collections.OrderedDict()  # by extent, least recent first
        self._slabs: dict[str, tuple[shm.Mapping, Future | None]] = {}  # slab -> its mapping, page-locking
        self._lock = threading.Lock()
        self._building: dict[str, threading.Event] = {}  # context id -> set once this process has indexed it
        self._locker = ThreadPoolExecutor(max_workers=2, thread_name_prefix="icecache-pagelock")

    def context_id(self, tenant: str, token_ids: list[int]) -> str:
        """The registry key: hash of (tenant salt, model, layout, token ids). Without the
        server's secret, one tenant cannot derive another's ids for the same document."""
        salt = hmac.new(self.secret, tenant.encode(), hashlib.sha256).digest()
        h = hashlib.sha256(salt)
        h.update(repr((self.engine.model_id, layout_of(self.engine.config))).encode())
        h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
        return h.hexdigest()[:32]

    # ------------------------------------------------------------------ mapping
    def _slab(self, name: str) -> tuple[shm.Mapping, Future | None]:
        """A slab mapped in this process (writable: the contexts this process indexes are
        written into it), and its page-locking (on a GPU; begun on a side thread the first
        time, so a writer's prefill runs meanwhile)."""
        with self._lock:
            entry = self._slabs.get(name)
            if entry is None:
                mapping = shm.Mapping(name, writable=True)
                locking = self._locker.submit(mapping.register_cuda) if self.engine.device.type == "cuda" else None
                entry = self._slabs[name] = (mapping, locking)
        return entry

    def _locked(self, name: str, entry: tuple[shm.Mapping, Future | None]) -> shm.Mapping:
        """The slab's mapping once page-locked; a slab the driver refused is forgotten (the
        next request maps it again) and the error raised."""
        mapping, locking = entry
        if locking is not None:
            try:
                locking.result()
            except BaseException:
                with self._lock:
                    if self._slabs.get(name) is entry:
                        del self._slabs[name]
                raise
        return mapping

    def map_slabs(self, preallocate: bool = False) -> int:
        """Map and page-lock every slab of the node cache now (a replica's start), after
        asking it to make one slab of its whole capacity if preallocate. -> bytes mapped."""
        start = time.perf_counter()
        names = ray.get(self.cache.preallocate.remote() if preallocate else self.cache.slabs_held.remote())
        mapped = sum(self._locked(name, self._slab(name)).num_bytes for name in names)
        log.info("mapped %d slab(s) of the node cache, %.1f GiB, in %.1f s", len(names), mapped / 2**30,
                 time.perf_counter() - start)
        return mapped

    def _context(self, grant: Reply) -> Context:
        """The context a grant names, unpacked from its extent once per process."""
        extent = grant.extent
        with self._lock:
            held = self._held.get(extent)
            if held is not None:
                held.users += 1
                self._held.move_to_end(extent)
                return held.context
        mapping = self._locked(grant.segment, self._slab(grant.segment))
        view = mapping.view[grant.offset:grant.offset + grant.num_bytes]
        # views of the slab (no copy); the tree moves to the engine's device once per context
        ctx = unpack(view).with_index_on(self.engine.device, boxes=self.engine.config.reads_page_boxes)
        return self._hold(extent, grant.segment, ctx)

    def _hold(self, extent: str, slab: str, ctx: Context) -> Context:
        with self._lock:
            if extent in self._held:  # unpacked meanwhile by another thread: use that one
                held = self._held[extent]
                held.users += 1
                return held.context
            self._held[extent] = _Held(ctx, slab, 1)
            return ctx

    @property
    def idle_mappings(self) -> int:
        """Contexts unpacked here that no request of this process holds (kept for the next)."""
        with self._lock:
            return sum(not h.users for h in self._held.values())

    def _idle_extents(self) -> list[str]:
        with self._lock:
            return [extent for extent, h in self._held.items() if not h.users]

    def _close_idle(self, gone: list[str], slabs: list[str] | None) -> None:
        """Let go of idle contexts the node cache no longer holds, and of the least recently
        used ones past keep_mapped; unmap slabs the node cache has given back."""
        with self._lock:
            idle = [extent for extent, h in self._held.items() if not h.users]
            doomed = [e for e in idle if e in set(gone) or (slabs is not None and self._held[e].slab not in slabs)]
            keep = [e for e in idle if e not in doomed]
            doomed += keep[:max(0, len(keep) - self.keep_mapped)]
            closing = [self._held.pop(e) for e in doomed]
            in_use = {h.slab for h in self._held.values()}
            dead = [n for n in self._slabs if slabs is not None and n not in slabs and n not in in_use]
            unmapping = [self._slabs.pop(n) for n in dead]
        for held in closing:
            if self.on_unmap is not None:
                self.on_unmap(held.context)  # device state built on it goes first
        for mapping, locking in unmapping:
            if locking is not None:
                locking.exception()  # wait: the mapping must not close under its page-locking
            mapping.close()

    def _leased(self, grant: Reply, context_id: str, cached: bool) -> Lease:
        try:
            ctx = self._context(grant)
        except BaseException:
            self.cache.release.remote(grant.lease)
            raise
        return Lease(grant.lease, context_id, ctx, cached, grant.extent)

    # ------------------------------------------------------------------ protocol
    def _await_published(self, tenant: str, context_id: str) -> Reply | None:
        """The lease grant of a published context, waiting while another replica writes it;
        None if there is none. ContextPending if it stays in preparation too long."""
        deadline = time.monotonic() + self.pending_timeout_s
        while True:
            grant = ray.get(self.cache.acquire.remote(tenant, context_id, self.pid, self._idle_extents()))
            self._close_idle(grant.gone, grant.slabs)
            if grant.status == "ready":
                return grant
            if grant.status == "missing":
                return None
            if time.monotonic() > deadline:
                raise ContextPending(f"context {context_id} has been in preparation for over "
                                     f"{self.pending_timeout_s:.0f} s by another replica")
            time.sleep(_PENDING_POLL_S)

    def open(self, tenant: str, context_id: str) -> Lease:
        """Lease a cached context by id; ContextNotFound if this tenant has none by that id,
        ContextPending if another replica is still preparing it after pending_timeout_s."""
        grant = self._await_published(tenant, context_id)
        if grant is None:
            raise ContextNotFound(context_id)
        return self._leased(grant, context_id, cached=True)

    def index(self, tenant: str, token_ids: list[int]) -> Lease:
        """Lease the context of a document, prefilling and publishing it if no replica on this
        node has. Raises ValueError for bad documents and CacheFull if it cannot be stored."""
        context_id = self.context_id(tenant, token_ids)
        while True:
            with self._lock:  # one build per document in this process; the others wait for it
                building = self._building.get(context_id)
                if building is None:
                    self._building[context_id] = threading.Event()
            if building is None:
                break
            building.wait()
        try:
            return self._index(tenant, context_id, token_ids)
        finally:
            with self._lock:
                self._building.pop(context_id).set()

    def _index(self, tenant: str, context_id: str, token_ids: list[int]) -> Lease:
        while True:
            grant = self._await_published(tenant, context_id)  # another replica may be prefilling it
            if grant is not None:
                return self._leased(grant, context_id, cached=True)
            # the extent is reserved before the prefill, at an upper bound of the context's size, so
            # a document that cannot be stored is refused before it costs a prefill, and a new slab
            # is page-locked while the document prefills
            eng = self.engine
            bound = packed_size_bound(eng.config, eng.shape.num_layers, eng.shape.num_kv_heads, eng.shape.head_dim,
                                      eng.shape.dtype, eng.model.config.vocab_size, len(token_ids))
            grant = ray.get(self.cache.reserve.remote(tenant, context_id, eng.model_id, len(token_ids), bound,
                                                      self.pid))
            if grant.status == "full":
                raise CacheFull(grant.message)
            if grant.status == "ready":
                return self._leased(grant, context_id, cached=True)
            if grant.status == "reserved":
                return self._write(context_id, token_ids, grant)
            # "pending": another replica reserved it meanwhile; wait for its copy

    def _write(self, context_id: str, token_ids: list[int], grant: Reply) -> Lease:
        """Prefill and index the document into the extent reserved by `grant`, publish it."""
        t0 = time.perf_counter()
        slab = self._slab(grant.segment)  # a new slab is page-locked while the scheduler prefills
        try:
            ctx = self.build(token_ids)
            t1 = time.perf_counter()
            view = self._locked(grant.segment, slab).view[grant.offset:grant.offset + grant.num_bytes]
            t2 = time.perf_counter()
            written = self.run(lambda: pack_into(ctx, view))  # by DMA from the device, once
            t3 = time.perf_counter()
            ray.get(self.cache.publish.remote(grant.lease, written))
            t4 = time.perf_counter()
            # the trees already on the device stay, and so does the KV for its questions' prefills
            # (the first would read it all back from shared memory otherwise)
            shared = unpack(view).with_index_from(ctx, boxes=self.engine.config.reads_page_boxes)
            resident = self.run(lambda: self.engine.make_resident(shared, source=ctx))
        except BaseException:
            ray.get(self.cache.release.remote(grant.lease))  # if unpublished, the cache frees its extent
            raise
        log.info("indexed %d tokens as %s: prefill %.2f s, index build %.2f s (%.2f s in all), then waited %.2f s "
                 "for the page-lock, write %.2f s (%.1f GiB), publish %.2f s%s", ctx.num_tokens, context_id[:8],
                 ctx.prefill_s, ctx.build_s, t1 - t0, t2 - t1, t3 - t2, written / 2**30, t4 - t3,
                 f", kept on the device in {time.perf_counter() - t4:.2f} s" if resident else "")
        del ctx  # requests use the shared copy, so the device pages are freed now
        return Lease(grant.lease, context_id, self._hold(grant.extent, grant.segment, shared), False,
                     grant.extent)

    def release(self, lease: Lease) -> None:
        """End a request's hold on its context."""
        if lease.extent is not None:
            with self._lock:
                self._held[lease.extent].users -= 1
        if lease.lease_id:
            self.cache.release.remote(lease.lease_id)
