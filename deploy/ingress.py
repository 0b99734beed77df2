"""The gRPC front door (behind Serve's gRPC proxy): validates requests, names the tenant,
forwards to the model deployment and turns every failure into a status code with a clear
message. Protobuf messages exist only here; the model replicas see plain Python values."""

from __future__ import annotations

import re

import grpc
import ray
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.handle import DeploymentHandle

from cluster.node_cache import find_node_cache
from deploy.config import AppArgs
from deploy.errors import RequestError, not_found
from icecache import SamplingParams
from protos import icecache_pb2 as pb

TENANT_KEY = "tenant"
DEFAULT_TENANT = "default"
_TENANT = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")
_CONTEXT_ID = re.compile(r"^[0-9a-f]{32}$")
_REPLICA_GONE = (ActorDiedError, ActorUnavailableError, RayActorError)


def tenant_of(grpc_context) -> str:
    metadata = dict(grpc_context.invocation_metadata() or ())
    tenant = metadata.get(TENANT_KEY, DEFAULT_TENANT)
    if not _TENANT.match(tenant):
        raise RequestError("INVALID_ARGUMENT", "tenant metadata: 1-128 characters of letters, digits and ._:@-")
    return tenant


def check_context_id(context_id: str) -> str:
    if not _CONTEXT_ID.match(context_id):
        raise RequestError("INVALID_ARGUMENT", f"context_id: expected 32 hex digits, got {context_id[:64]!r}")
    return context_id


def decode_text(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RequestError("INVALID_ARGUMENT", f"{what}: not valid UTF-8 (byte {e.start}: {e.reason})") from None


def check_document_size(num_bytes: int, limit: int) -> None:
    if num_bytes > limit:
        raise RequestError("INVALID_ARGUMENT", f"document: over the limit of {limit} bytes")


def sampling_of(msg: pb.Sampling, max_new_tokens: int) -> dict:
    """Proto sampling -> SamplingParams kwargs, validated (the replica rebuilds them)."""
    if msg.max_tokens <= 0:
        raise RequestError("INVALID_ARGUMENT", f"sampling.max_tokens: must be positive, got {msg.max_tokens}")
    if msg.max_tokens > max_new_tokens:
        raise RequestError("INVALID_ARGUMENT",
                           f"sampling.max_tokens: {msg.max_tokens} is over the server's limit of {max_new_tokens}")
    kwargs = {"max_tokens": msg.max_tokens, "stop": tuple(msg.stop), "ignore_eos": msg.ignore_eos}
    for name in ("temperature", "top_p", "top_k", "seed"):
        if msg.HasField(name):
            kwargs[name] = getattr(msg, name)
    try:
        SamplingParams(**kwargs)
    except ValueError as e:
        raise RequestError("INVALID_ARGUMENT", f"sampling.{e}") from None
    return kwargs


def fail(grpc_context, error: RequestError) -> None:
    grpc_context.set_code(getattr(grpc.StatusCode, error.code))
    grpc_context.set_details(error.message)


@serve.deployment(max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0})
class IceCacheIngress:
    def __init__(self, llm: DeploymentHandle, args: dict) -> None:
        self.llm = llm
        self.args = AppArgs(**args)

    async def IndexDocument(self, chunks, grpc_context) -> pb.IndexReply:
        """Client-streamed document chunks -> an indexed context."""
        try:
            tenant = tenant_of(grpc_context)
            text, token_ids = bytearray(), []
            async for chunk in chunks:
                if isinstance(chunk, bytes):
                    chunk = pb.DocumentChunk.FromString(chunk)
                text += chunk.text
                token_ids += chunk.token_ids
                check_document_size(len(text) + 4 * len(token_ids), self.args.max_document_bytes)
            if text and token_ids:
                raise RequestError("INVALID_ARGUMENT", "document: send text or token_ids, not both")
            if not text and not token_ids:
                raise RequestError("INVALID_ARGUMENT", "document: empty")
            document = decode_text(bytes(text), "document") if text else token_ids
            out = await self.llm.index.remote(tenant, document)
            return pb.IndexReply(**out)
        except RequestError as e:
            fail(grpc_context, e)
        except _REPLICA_GONE:
            fail(grpc_context, RequestError("UNAVAILABLE", "the model replica died while indexing; retry"))
        return pb.IndexReply()

    async def Generate(self, request: pb.GenerateRequest, grpc_context):
        """Stream text pieces, then one stats message."""
        try:
            tenant = tenant_of(grpc_context)
            sampling = sampling_of(request.sampling, self.args.max_new_tokens)
            source = request.WhichOneof("source")
            context_id = check_context_id(request.context_id) if source == "context_id" else None
            document = None
            if source == "document":
                check_document_size(len(request.document), self.args.max_document_bytes)  # before decoding it
                document = decode_text(request.document, "document")
                if not document:
                    raise RequestError("INVALID_ARGUMENT", "document: empty")
            if not request.prompt and source is None:
                raise RequestError("INVALID_ARGUMENT", "prompt: empty (and no context_id or document)")
            stream = self.llm.options(stream=True).generate.remote(
                tenant=tenant, prompt=request.prompt, sampling=sampling, context_id=context_id, document=document)
            async for item in stream:
                if "text" in item:
                    yield pb.GenerateReply(text=item["text"])
                else:
                    yield pb.GenerateReply(stats=pb.GenerationStats(**item["stats"]))
        except RequestError as e:
            fail(grpc_context, e)
            raise  # a streaming call carries a status set before it raises, not one set before it ends
        except _REPLICA_GONE:
            fail(grpc_context, RequestError("UNAVAILABLE", "the model replica died mid-stream; retry"))
            raise

    async def ReleaseContext(self, request: pb.ReleaseRequest, grpc_context) -> pb.ReleaseReply:
        try:
            tenant = tenant_of(grpc_context)
            context_id = check_context_id(request.context_id)
            released = False
            for cache in self._caches():
                released |= await cache.drop.remote(tenant, context_id)
            if not released:
                raise not_found(context_id)
            return pb.ReleaseReply(released=True)
        except RequestError as e:
            fail(grpc_context, e)
        return pb.ReleaseReply()

    async def GetStats(self, request: pb.StatsRequest, grpc_context) -> pb.StatsReply:
        nodes = [await cache.stats.remote() for cache in self._caches()]
        fields = set(pb.NodeStats.DESCRIPTOR.fields_by_name)
        return pb.StatsReply(nodes=[pb.NodeStats(**{k: v for k, v in n.items() if k in fields}) for n in nodes])

    @staticmethod
    def _caches() -> list:
        return [h for node in ray.nodes() if node.get("Alive") and (h := find_node_cache(node["NodeID"]))]
