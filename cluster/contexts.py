"""Replica side of the node cache: find a document's context in shared memory, or prefill
it once and publish it there for every replica on the node.

A request holds a `Lease` while it uses a context; the context's tensors are views of the
segment mapped in this process, so nothing is copied per request and no Ray call happens
per layer or token. A mapping outlives its leases: the next request on the context finds
it mapped and (on a GPU) page-locked already, which is what makes a second question cheap.
Idle mappings are closed when the node cache no longer holds their segment (each request's
acquire says which), or past `keep_mapped` of them, after `on_unmap` has let go of any
device state built on them.
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import ray

from cluster import shm
from cluster.node_cache import get_node_cache
from icecache import Context, Engine
from icecache.context import layout_of
from icecache.packing import pack_into, packed_size_bound, unpack

_PENDING_POLL_S = 0.05
log = logging.getLogger(__name__)


class ContextNotFound(KeyError):
    """No context with this id for this tenant on this node."""


class CacheFull(RuntimeError):
    """The node cache cannot make room for a context."""


@dataclass
class Lease:
    """A request's hold on a cached context; release it when the request ends."""

    lease_id: int
    context_id: str
    context: Context
    cached: bool  # found in the cache (no prefill by this request)
    segment: str | None = None  # the mapped shm segment; None for an unshared private context


@dataclass
class _Mapped:
    """A segment mapped in this process, and the context unpacked from it."""

    context: Context
    mapping: shm.Mapping
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
        context into its segment (default: here); on_unmap: called before an idle mapping
        closes, to free device state built on its context; keep_mapped: idle mappings kept."""
        self.engine = engine
        self.secret = tenant_secret
        self.cache = cache or get_node_cache(capacity_bytes=capacity_bytes)
        self.pid = os.getpid()
        self.pending_timeout_s = pending_timeout_s
        self.build = build or (lambda ids: engine.index_ids(ids, on_device=True))
        self.run = run or (lambda fn: fn())
        self.on_unmap, self.keep_mapped = on_unmap, keep_mapped
        self._mapped: collections.OrderedDict[str, _Mapped] = collections.OrderedDict()  # least recently used first
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
    def _map(self, segment: str) -> Context:
        with self._lock:
            if segment in self._mapped:
                held = self._mapped[segment]
                held.users += 1
                self._mapped.move_to_end(segment)
                return held.context
        mapping = shm.Mapping(segment)
        try:
            if self.engine.device.type == "cuda":
                mapping.register_cuda()  # page-locked: pages go host -> GPU by DMA or UVA, once per process
            # views of the segment (no copy); the tree moves to the engine's device once per mapping
            ctx = unpack(mapping.view).with_index_on(self.engine.device)
        except BaseException:
            mapping.close()
            raise
        return self._hold(segment, mapping, ctx)

    def _hold(self, segment: str, mapping: shm.Mapping, ctx: Context) -> Context:
        with self._lock:
            if segment in self._mapped:  # mapped meanwhile by another thread: use that one
                held = self._mapped[segment]
                held.users += 1
                mapping.close()
                return held.context
            self._mapped[segment] = _Mapped(ctx, mapping, 1)
            return ctx

    def _unmap(self, segment: str) -> None:
        with self._lock:
            self._mapped[segment].users -= 1

    @property
    def idle_mappings(self) -> int:
        """Mapped segments no request of this process holds (kept for the next)."""
        with self._lock:
            return sum(not m.users for m in self._mapped.values())

    def _idle_segments(self) -> list[str]:
        with self._lock:
            return [name for name, m in self._mapped.items() if not m.users]

    def _close_idle(self, gone: list[str]) -> None:
        """Close the idle mappings of segments the node cache no longer holds, and the least
        recently used ones past keep_mapped."""
        with self._lock:
            idle = [name for name, m in self._mapped.items() if not m.users]
            doomed = [n for n in idle if n in set(gone)]
            keep = [n for n in idle if n not in doomed]
            doomed += keep[:max(0, len(keep) - self.keep_mapped)]
            closing = [self._mapped.pop(n) for n in doomed]
        for held in closing:
            if self.on_unmap is not None:
                self.on_unmap(held.context)  # device state built on it goes first
            held.mapping.close()

    def _leased(self, grant: dict, context_id: str, cached: bool) -> Lease:
        try:
            ctx = self._map(grant["segment"])
        except BaseException:
            self.cache.release.remote(grant["lease"])
            raise
        return Lease(grant["lease"], context_id, ctx, cached, grant["segment"])

    # ------------------------------------------------------------------ protocol
    def _await_published(self, tenant: str, context_id: str) -> dict | None:
        """The lease grant of a published context, waiting while another replica writes it;
        None if there is none. TimeoutError if it stays in preparation too long."""
        deadline = time.monotonic() + self.pending_timeout_s
        while True:
            grant = ray.get(self.cache.acquire.remote(tenant, context_id, self.pid, self._idle_segments()))
            self._close_idle(grant.get("gone", []))
            if grant["status"] == "ready":
                return grant
            if grant["status"] == "missing":
                return None
            if time.monotonic() > deadline:
                raise TimeoutError(f"context {context_id} has been in preparation for {self.pending_timeout_s} s")
            time.sleep(_PENDING_POLL_S)

    def open(self, tenant: str, context_id: str) -> Lease:
        """Lease a cached context by id; ContextNotFound if this tenant has none by that id."""
        try:
            grant = self._await_published(tenant, context_id)
        except TimeoutError:
            grant = None
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
            try:
                grant = self._await_published(tenant, context_id)  # another replica may be prefilling it
            except TimeoutError as e:
                raise CacheFull(str(e)) from None
            if grant is not None:
                return self._leased(grant, context_id, cached=True)
            # the segment is reserved before the prefill, at an upper bound of the context's size, so
            # a document that cannot be stored is refused before it costs a prefill, and the segment
            # is page-locked while the document prefills
            eng = self.engine
            bound = packed_size_bound(eng.config, eng.shape.num_layers, eng.shape.num_kv_heads, eng.shape.head_dim,
                                      eng.shape.dtype, eng.model.config.vocab_size, len(token_ids))
            grant = ray.get(self.cache.reserve.remote(tenant, context_id, eng.model_id, len(token_ids), bound,
                                                      self.pid))
            if grant["status"] == "full":
                raise CacheFull(grant["message"])
            if grant["status"] == "ready":
                return self._leased(grant, context_id, cached=True)
            if grant["status"] == "reserved":
                return self._write(context_id, token_ids, grant)
            # "pending": another replica reserved it meanwhile; wait for its copy

    def _write(self, context_id: str, token_ids: list[int], grant: dict) -> Lease:
        """Prefill and index the document into the segment reserved by `grant`, publish it."""
        t0 = time.perf_counter()
        mapping = shm.Mapping(grant["segment"], writable=True)
        locking = None
        if self.engine.device.type == "cuda":  # page-locked while the scheduler prefills: the device writes by DMA
            locking = self._locker.submit(mapping.register_cuda)
        try:
            ctx = self.build(token_ids)
            t1 = time.perf_counter()
            if locking is not None:
                locking.result()
            t2 = time.perf_counter()
            written = self.run(lambda: pack_into(ctx, mapping.view))
            t3 = time.perf_counter()
            ray.get(self.cache.publish.remote(grant["lease"]))
        except BaseException:
            if locking is not None:
                locking.exception()  # wait for it: the mapping must not close under it
            mapping.close()
            ray.get(self.cache.release.remote(grant["lease"]))  # unpublished: the cache discards it
            raise
        shared = unpack(mapping.view).with_index_from(ctx)  # the trees already on the device stay
        log.info("indexed %d tokens as %s: prefill %.2f s, index build %.2f s (%.2f s in all), then waited %.2f s "
                 "for the page-lock, write %.2f s (%.1f GiB of a %.1f GiB segment), publish %.2f s", ctx.num_tokens,
                 context_id[:8], ctx.prefill_s, ctx.build_s, t1 - t0, t2 - t1, t3 - t2, written / 2**30,
                 mapping.num_bytes / 2**30, time.perf_counter() - t3)
        del ctx  # requests use the shared copy, so the device pages are freed now
        return Lease(grant["lease"], context_id, self._hold(grant["segment"], mapping, shared), False,
                     grant["segment"])

    def release(self, lease: Lease) -> None:
        """End a request's hold on its context."""
        if lease.segment is not None:
            self._unmap(lease.segment)
        if lease.lease_id:
            self.cache.release.remote(lease.lease_id)
