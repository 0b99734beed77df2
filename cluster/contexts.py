"""Replica side of the node cache: find a document's context in shared memory, or prefill
it once and publish it there for every replica on the node.

A request holds a `Lease` while it uses a context; the context's tensors are views of the
segment mapped read-only in this process, so nothing is copied per request and no Ray
call happens per layer or token.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import threading
import time
from dataclasses import dataclass

import numpy as np
import ray

from cluster import shm
from cluster.node_cache import get_node_cache
from icecache import Context, Engine
from icecache.context import layout_of
from icecache.packing import pack_into, packed_size, unpack

_PENDING_POLL_S = 0.05


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


class SharedContexts:
    """Index-or-reuse of documents for one engine, through this node's cache actor."""

    def __init__(self, engine: Engine, tenant_secret: bytes, capacity_bytes: int, cache=None,
                 pending_timeout_s: float = 600.0) -> None:
        """`cache`: a node cache actor handle; default this node's (created if needed)."""
        self.engine = engine
        self.secret = tenant_secret
        self.cache = cache or get_node_cache(capacity_bytes=capacity_bytes)
        self.pid = os.getpid()
        self.pending_timeout_s = pending_timeout_s
        self._mapped: dict[str, tuple[Context, shm.Mapping, int]] = {}  # segment -> (context, mapping, users)
        self._lock = threading.Lock()

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
                ctx, mapping, users = self._mapped[segment]
                self._mapped[segment] = (ctx, mapping, users + 1)
                return ctx
            mapping = shm.Mapping(segment)
            if self.engine.device.type == "cuda":
                mapping.register_cuda()  # pages go host -> GPU by DMA, straight from shared memory
            # views of the segment (no copy); the tree moves to the engine's device once per mapping
            ctx = unpack(mapping.view).with_index_on(self.engine.device)
            self._mapped[segment] = (ctx, mapping, 1)
            return ctx

    def _unmap(self, segment: str) -> None:
        with self._lock:
            ctx, mapping, users = self._mapped[segment]
            if users > 1:
                self._mapped[segment] = (ctx, mapping, users - 1)
            else:
                del self._mapped[segment]
                mapping.close()  # the kernel unmaps once no tensor of it is alive

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
            grant = ray.get(self.cache.acquire.remote(tenant, context_id, self.pid))
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

    def index(self, tenant: str, token_ids: list[int], progress=None) -> Lease:
        """Lease the context of a document, prefilling and publishing it if no replica on this
        node has. Raises ValueError for bad documents and CacheFull if it cannot be stored."""
        context_id = self.context_id(tenant, token_ids)
        try:
            grant = self._await_published(tenant, context_id)  # another replica may be prefilling it
        except TimeoutError as e:
            raise CacheFull(str(e)) from None
        if grant is not None:
            return self._leased(grant, context_id, cached=True)
        ctx = self.engine.index(token_ids, progress)
        num_bytes = packed_size(ctx)
        grant = ray.get(self.cache.reserve.remote(tenant, context_id, ctx.model_id, ctx.num_tokens, num_bytes,
                                                  self.pid))
        if grant["status"] == "full":
            raise CacheFull(grant["message"])
        if grant["status"] == "pending":  # raced with another writer: use ours, unshared
            return Lease(0, context_id, ctx, cached=False)
        if grant["status"] == "ready":
            return self._leased(grant, context_id, cached=True)
        try:
            mapping = shm.Mapping(grant["segment"], writable=True)
            pack_into(ctx, mapping.view)
            mapping.close()
            ray.get(self.cache.publish.remote(grant["lease"]))
        except BaseException:
            ray.get(self.cache.release.remote(grant["lease"]))  # unpublished: the cache discards it
            raise
        del ctx  # requests use the shared copy, so the private one is freed now
        return self._leased(grant, context_id, cached=False)

    def release(self, lease: Lease) -> None:
        """End a request's hold on its context."""
        if lease.segment is not None:
            self._unmap(lease.segment)
        if lease.lease_id:
            self.cache.release.remote(lease.lease_id)
