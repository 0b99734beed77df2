"""Two Ray nodes (ray.cluster_utils.Cluster), one model replica on each: a request for an
indexed context goes to the node whose cache holds it."""

from __future__ import annotations

import time

import pytest
import ray
from ray.cluster_utils import Cluster

from tests.deploy.conftest import start_serve, stop_serve, wait_for_no_segments
from tests.icecache.haystack import QUESTION, passkey_document

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_nodes():
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    app = start_serve({"num_replicas": 2, "max_replicas_per_node": 1})
    app.shutdown = lambda: (stop_serve(), cluster.shutdown())
    yield app
    app.shutdown()


def test_requests_follow_their_context_to_its_node(two_nodes, engine):
    app = two_nodes
    client = app.client(tenant="routing")
    indexed_on: dict[str, str] = {}  # node id -> a context indexed there
    # index requests go to the least loaded replica: collect one per node (for a moment after the app is
    # up, the ingress's router may know one replica only: keep asking for a while, not a fixed count)
    deadline, i = time.monotonic() + 120, 0
    while len(indexed_on) < 2 and time.monotonic() < deadline:
        reply = client.index(passkey_document(engine.tokenizer, 600, 0.5, 20000 + i))
        indexed_on.setdefault(reply.node_id, reply.context_id)
        i += 1
    assert len(indexed_on) == 2, f"both nodes indexed a document ({i} indexed, all on one node)"

    for node_id, context_id in indexed_on.items():
        served_by = {client.ask(QUESTION, 2, context_id=context_id)[1].node_id for _ in range(6)}
        assert served_by == {node_id}

    stats = app.node_stats()
    assert set(stats) >= set(indexed_on)
    assert all(stats[n].prefills >= 1 and stats[n].hits >= 6 for n in indexed_on)


def test_no_segment_outlives_the_cluster(two_nodes):
    two_nodes.shutdown()
    assert wait_for_no_segments() == []
