"""Request routing by context locality: a request for an indexed context goes to a replica
on a node whose cache holds it (no second prefill, no cross-node copy), else to the least
loaded replica, which prefills. Uses Ray Serve's request-router API; the base class probes
queue lengths within the first rank that has a replica with room."""

from __future__ import annotations

import asyncio
import random
import time

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

from cluster.node_cache import find_node_cache

_HANDLE_TTL_S = 10.0  # how long a "no cache actor on this node" answer is trusted
_HOLDS_TIMEOUT_S = 2.0


class ContextLocalityRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, **kwargs) -> None:
        self._caches: dict[str, tuple[object, float]] = {}  # node id -> (cache actor or None, looked up at)

    def _cache_of(self, node_id: str):
        handle, at = self._caches.get(node_id, (None, 0.0))
        if handle is None and time.monotonic() - at > _HANDLE_TTL_S:
            handle = find_node_cache(node_id)
            self._caches[node_id] = (handle, time.monotonic())
        return handle

    async def holder_nodes(self, tenant: str, context_id: str, node_ids: set[str]) -> set[str]:
        """Nodes among node_ids whose cache holds this tenant's context."""
        asked = {n: h for n in node_ids if (h := self._cache_of(n)) is not None}
        if not asked:
            return set()
        calls = [h.holds.remote(context_id, tenant) for h in asked.values()]
        try:
            answers = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), _HOLDS_TIMEOUT_S)
        except asyncio.TimeoutError:
            return set()
        return {n for n, ok in zip(asked, answers) if ok is True}

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        kwargs = pending_request.kwargs if pending_request is not None else {}
        context_id, tenant = kwargs.get("context_id"), kwargs.get("tenant")
        if context_id and tenant is not None:
            holders = await self.holder_nodes(tenant, context_id, {r.node_id for r in candidate_replicas})
            local = [r for r in candidate_replicas if r.node_id in holders]
            if local:  # only there: another node would have to prefill a document it never saw
                return [random.sample(local, len(local))]
        # the base class takes the shortest queue within a rank, the first on ties: shuffle the ties
        return [random.sample(candidate_replicas, len(candidate_replicas))]
