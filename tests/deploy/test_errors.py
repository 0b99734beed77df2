"""How an engine or cache failure reaches a client: one gRPC status per kind, and over
HTTP the status and OpenAI error type that clients retry on (429 and 503) or not."""

import pytest

from cluster.contexts import CacheFull, ContextNotFound, ContextPending
from deploy.errors import as_request_error
from deploy.openai_api import error_body
from icecache.scheduler import SchedulerDead, SchedulerFull


@pytest.mark.parametrize("error, code, status, kind", [
    (CacheFull("the node cache holds 4 GiB; this document needs 5"), "RESOURCE_EXHAUSTED", 429, "rate_limit_error"),
    (SchedulerFull("1024 requests waiting"), "RESOURCE_EXHAUSTED", 429, "rate_limit_error"),
    (SchedulerDead("the scheduler stopped after a failed step"), "UNAVAILABLE", 503, "service_unavailable"),
    (ContextNotFound("ab12"), "NOT_FOUND", 404, "not_found_error"),
    (ContextPending("context ab12 has been in preparation for over 600 s by another replica"), "UNAVAILABLE", 503,
     "service_unavailable"),
    (ValueError("max_tokens: must be >= 1, got 0"), "INVALID_ARGUMENT", 400, "invalid_request_error"),
])
def test_each_failure_has_its_status_and_keeps_its_message(error, code, status, kind):
    mapped = as_request_error(error)
    assert mapped.code == code
    got, body = error_body(mapped)
    assert (got, body["error"]["type"], body["error"]["code"]) == (status, kind, code.lower())
    words = str(error.args[0]).split()[-1]
    assert words in body["error"]["message"]


def test_an_unexpected_failure_is_not_dressed_as_a_request_error():
    assert as_request_error(RuntimeError("CUDA error: an illegal memory access")) is None
