"""A real Ray cluster, a real Serve app with the gRPC proxy, real SmolLM2 replicas."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

import pytest
import ray
from ray import serve
from ray.serve.config import gRPCOptions

from cluster import shm
from deploy.app import build_app_with
from deploy.client import Client

SERVICER = "protos.icecache_pb2_grpc.add_IceCacheServicer_to_server"
APP_ARGS = {"device": "cpu", "cache_capacity": "4GiB", "max_document_tokens": 7000,
            "max_document_bytes": "1MiB", "max_new_tokens": 256, "replica_cpus": 1, "tenant_secret": "test",
            "warmup_tokens": 256}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class App:
    address: str  # gRPC host:port
    http: str = ""  # the HTTP proxy's base URL (the OpenAI-compatible API is under /v1)
    metrics: str = ""  # this node's Prometheus endpoint

    def client(self, tenant: str | None = None, timeout_s: float = 300) -> Client:
        return Client(self.address, tenant=tenant, timeout_s=timeout_s)

    def node_stats(self) -> dict[str, object]:
        client = self.client()
        try:
            return {n.node_id: n for n in client.stats().nodes}
        finally:
            client.close()


def start_serve(llm_options: dict, args: dict | None = None) -> App:
    port, http_port = free_port(), free_port()
    serve.start(grpc_options=gRPCOptions(port=port, grpc_servicer_functions=[SERVICER]),
                http_options={"host": "127.0.0.1", "port": http_port})
    serve.run(build_app_with({**APP_ARGS, **(args or {})}, llm_options=llm_options), name="icecache",
              route_prefix="/")
    return App(f"localhost:{port}", f"http://127.0.0.1:{http_port}")


def stop_serve() -> None:
    """Shut Serve and Ray down, as ops would; the node caches' segments must go with them."""
    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()


def wait_for_no_segments(timeout_s: float = 15.0) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while shm.list_segments() and time.monotonic() < deadline:
        time.sleep(0.2)
    return shm.list_segments()


@pytest.fixture(scope="module")
def app():
    """One node, two model replicas."""
    metrics_port = free_port()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _metrics_export_port=metrics_port)
    app = start_serve({"num_replicas": 2})
    app.metrics = f"http://127.0.0.1:{metrics_port}/metrics"
    yield app
    stop_serve()
