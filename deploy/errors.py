"""Errors a request can end with, by gRPC status code name. Raised in the model replica,
they cross Ray intact (Ray re-raises a subclass of the original type) and the ingress
turns them into the call's status."""

from __future__ import annotations

from cluster.contexts import CacheFull, ContextNotFound, ContextPending
from icecache.scheduler import SchedulerDead, SchedulerFull


class RequestError(Exception):
    """`code` is a grpc.StatusCode name, `message` says what was wrong."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)
        self.code, self.message = code, message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


def not_found(context_id: str) -> RequestError:
    # one message for unknown ids and other tenants' ids: nothing tells them apart
    return RequestError("NOT_FOUND", f"context {context_id!r} not found")


def as_request_error(error: BaseException) -> RequestError | None:
    """The RequestError an engine/cache exception means, or None for an unexpected one."""
    if isinstance(error, RequestError):
        return error
    if isinstance(error, ContextNotFound):
        return not_found(error.args[0])
    if isinstance(error, (CacheFull, SchedulerFull)):
        return RequestError("RESOURCE_EXHAUSTED", str(error))
    if isinstance(error, ContextPending):  # the context exists; it is not ready yet
        return RequestError("UNAVAILABLE", f"{error}; retry")
    if isinstance(error, SchedulerDead):  # the replica is failing its health check and will be replaced
        return RequestError("UNAVAILABLE", f"the model replica cannot serve: {error}; retry")
    if isinstance(error, ValueError):
        return RequestError("INVALID_ARGUMENT", str(error))
    return None


def check_document_size(num_bytes: int, limit: int) -> None:
    """A document over the app's max_document_bytes is bad input, whichever door it came in by."""
    if num_bytes > limit:
        raise RequestError("INVALID_ARGUMENT", f"document: over the limit of {limit} bytes")
