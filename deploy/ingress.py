"""The app's front door, for gRPC (behind Serve's gRPC proxy) and for OpenAI-compatible
HTTP (behind Serve's HTTP proxy, deploy/openai_api.py): validates requests, names the
tenant, forwards to the model deployment and turns every failure into a status code with
a clear message. Protobuf and HTTP exist only here; the model replicas see plain Python
values."""


import logging
import re
import time
from dataclasses import asdict

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
import ray
from ray import serve
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
from ray.serve.handle import DeploymentHandle

from cluster.node_cache import find_node_cache
from deploy import openai_api as oa
from deploy.config import AppArgs
from deploy.errors import RequestError, check_document_size, not_found
from icecache import SamplingParams
from protos import icecache_pb2 as pb

TENANT_KEY = "tenant"
DEFAULT_TENANT = "default"
_TENANT = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")
_CONTEXT_ID = re.compile(r"^[0-9a-f]{32}$")
_REPLICA_GONE = (ActorDiedError, ActorUnavailableError, RayActorError)
log = logging.getLogger(__name__)
http = FastAPI(title="IceCache", description="OpenAI-compatible API over indexed long documents")


def tenant_of(grpc_context) -> str:
    metadata = dict(grpc_context.invocation_metadata() or ())
    return check_tenant(metadata.get(TENANT_KEY, DEFAULT_TENANT), "tenant metadata")


def http_tenant(request: Request) -> str:
    return check_tenant(request.headers.get(oa.TENANT_HEADER, DEFAULT_TENANT), "X-Tenant header")


def check_tenant(tenant: str, where: str) -> str:
    if not _TENANT.match(tenant):
        raise RequestError("INVALID_ARGUMENT", f"{where}: 1-128 characters of letters, digits and ._:@-")
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


def sampling_of(msg: pb.Sampling, max_new_tokens: int) -> dict:
    """Proto sampling -> SamplingParams kwargs, validated (the replica rebuilds them)."""
    if msg.max_tokens < (0 if msg.HasField("prompt_logprobs") else 1):
        raise RequestError("INVALID_ARGUMENT", f"sampling.max_tokens: must be positive (0 only with "
                           f"prompt_logprobs), got {msg.max_tokens}")
    if msg.max_tokens > max_new_tokens:
        raise RequestError("INVALID_ARGUMENT",
                           f"sampling.max_tokens: {msg.max_tokens} is over the server's limit of {max_new_tokens}")
    kwargs = {"max_tokens": msg.max_tokens, "stop": tuple(msg.stop), "ignore_eos": msg.ignore_eos}
    for name in ("temperature", "top_p", "top_k", "seed", "logprobs", "prompt_logprobs"):
        if msg.HasField(name):
            kwargs[name] = getattr(msg, name)
    try:
        SamplingParams(**kwargs)
    except ValueError as e:
        raise RequestError("INVALID_ARGUMENT", f"sampling.{e}") from None
    return kwargs


def _token_logprobs(logprobs) -> list:
    """The replica's log-probabilities (tokens as text) as the proto's TokenLogprob list."""
    return [pb.TokenLogprob(token=t["token"], top=[pb.TopLogprob(token=a, logprob=v) for a, v in t["top"]],
                            **({"logprob": t["logprob"]} if t["logprob"] is not None else {})) for t in logprobs]


def fail(grpc_context, error: RequestError) -> None:
    grpc_context.set_code(getattr(grpc.StatusCode, error.code))
    grpc_context.set_details(error.message)


@serve.deployment(max_ongoing_requests=1024, ray_actor_options={"num_cpus": 0})
@serve.ingress(http)
class IceCacheIngress:
    def __init__(self, llm: DeploymentHandle, args: dict) -> None:
        self.llm = llm
        self.args = AppArgs(**args)
        self.model_name = oa.served_model(self.args.model)
        self.started = int(time.time())

    async def IndexDocument(self, chunks, grpc_context) -> pb.IndexReply:
        """Client-streamed document chunks -> an indexed context."""
        try:
            tenant = tenant_of(grpc_context)
            text, token_ids, chat_role = bytearray(), [], None
            async for chunk in chunks:
                if isinstance(chunk, bytes):
                    chunk = pb.DocumentChunk.FromString(chunk)
                text += chunk.text
                token_ids += chunk.token_ids
                chat_role = chat_role or chunk.chat_role or None
                check_document_size(len(text) + 4 * len(token_ids), self.args.max_document_bytes)
            if text and token_ids:
                raise RequestError("INVALID_ARGUMENT", "document: send text or token_ids, not both")
            if not text and not token_ids:
                raise RequestError("INVALID_ARGUMENT", "document: empty")
            document = decode_text(bytes(text), "document") if text else token_ids
            out = await self.llm.index.remote(tenant, document, chat_role)
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
            messages = [{"role": m.role, "content": m.content} for m in request.messages] or None
            if messages and request.prompt:
                raise RequestError("INVALID_ARGUMENT", "prompt, messages: send one of them, not both")
            if not request.prompt and not messages and source is None:
                raise RequestError("INVALID_ARGUMENT", "prompt: empty (and no messages, context_id or document)")
            stream = self.llm.options(stream=True).generate.remote(
                tenant=tenant, prompt=request.prompt, sampling=sampling, context_id=context_id, document=document,
                messages=messages, chat_role=request.chat_role or None)
            async for item in stream:
                if "text" in item:
                    yield pb.GenerateReply(text=item["text"], logprobs=_token_logprobs(item.get("logprobs") or ()))
                else:
                    stats = dict(item["stats"])
                    logprobs = _token_logprobs(stats.pop("logprobs", ()))
                    prompt_logprobs = _token_logprobs(stats.pop("prompt_logprobs", ()))
                    yield pb.GenerateReply(stats=pb.GenerationStats(**stats, logprobs=logprobs,
                                                                    prompt_logprobs=prompt_logprobs))
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
        return pb.StatsReply(nodes=[pb.NodeStats(**{k: v for k, v in asdict(n).items() if k in fields})
                                    for n in nodes])

    @staticmethod
    def _caches() -> list:
        return [h for node in ray.nodes() if node.get("Alive") and (h := find_node_cache(node["NodeID"]))]

    # ------------------------------------------------------------------ OpenAI-compatible HTTP
    @http.get("/v1/models")
    async def list_models(self) -> dict:
        return {"object": "list", "data": [await self.retrieve_model(self.model_name)]}

    @http.get("/v1/models/{model_id:path}")
    async def retrieve_model(self, model_id: str):
        if model_id != self.model_name:
            return self._error(RequestError("NOT_FOUND", f"model {model_id!r} does not exist; this server serves "
                                            f"{self.model_name!r}"))
        return {"id": self.model_name, "object": "model", "created": self.started, "owned_by": "icecache"}

    @http.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._openai(request, chat=False)

    @http.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._openai(request, chat=True)

    @http.post("/v1/contexts")
    async def create_context(self, request: Request):
        """Index a document ({"document": text, "chat_role": optional}) -> {"id", ...}."""
        try:
            tenant = http_tenant(request)
            body = await self._json(request)
            document = oa.check_document(body.get("document"), self.args.max_document_bytes)
            role = body.get("chat_role")
            out = await self.llm.index.remote(tenant, document, role)
        except RequestError as e:
            return self._error(e)
        except _REPLICA_GONE:
            return self._error(RequestError("UNAVAILABLE", "the model replica died while indexing; retry"))
        return {"id": out["context_id"], "object": "context", **{k: v for k, v in out.items() if k != "context_id"}}

    @http.delete("/v1/contexts/{context_id}")
    async def delete_context(self, context_id: str, request: Request):
        try:
            tenant = http_tenant(request)
            check_context_id(context_id)
            released = False
            for cache in self._caches():
                released |= await cache.drop.remote(tenant, context_id)
            if not released:
                raise not_found(context_id)
        except RequestError as e:
            return self._error(e)
        return {"id": context_id, "object": "context", "deleted": True}

    @staticmethod
    async def _json(request: Request) -> dict:
        try:
            body = await request.json()
        except ValueError:
            raise RequestError("INVALID_ARGUMENT", "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise RequestError("INVALID_ARGUMENT", "the request body must be a JSON object")
        return body

    @staticmethod
    def _error(error: RequestError) -> JSONResponse:
        status, body = oa.error_body(error)
        (log.warning if status < 500 else log.error)("HTTP %d: %s", status, error.message)
        return JSONResponse(body, status_code=status)

    async def _openai(self, request: Request, chat: bool):
        """A completion or chat completion: whole, or streamed as server-sent events. Errors
        before the first token get their HTTP status; later ones end the stream with an
        error event."""
        try:
            tenant = http_tenant(request)
            req = oa.parse_request(await self._json(request), chat, self.model_name, self.args.max_new_tokens,
                                   self.args.max_document_bytes)
            if "context_id" in req:
                check_context_id(req["context_id"])
            stream, include_usage, echo = req.pop("stream"), req.pop("include_usage"), req.pop("echo", False)
            prompt = req.pop("prompt", "")
            items = self.llm.options(stream=True).generate.remote(tenant=tenant, prompt=prompt, **req)
            it = items.__aiter__()
            first = await it.__anext__()
        except RequestError as e:
            return self._error(e)
        except _REPLICA_GONE:
            return self._error(RequestError("UNAVAILABLE", "the model replica died; retry"))
        reply = oa.Reply(chat, self.model_name)
        if not stream:
            pieces, stats, item = [], None, first
            try:
                while True:
                    if "text" in item:
                        pieces.append(item["text"])
                    else:
                        stats = item["stats"]
                    item = await it.__anext__()
            except StopAsyncIteration:
                pass
            except RequestError as e:
                return self._error(e)
            except _REPLICA_GONE:
                return self._error(RequestError("UNAVAILABLE", "the model replica died mid-request; retry"))
            echoed = oa.echo_text(prompt, stats.get("prompt_logprobs", [])) if echo else None
            return JSONResponse(reply.whole("".join(pieces), stats, echoed))
        scored = "logprobs" in req["sampling"]  # the echoed prompt's tokens come with their log-probabilities

        async def events():
            if chat:
                yield reply.chunk(first=True)
            item, to_echo = first, echo
            try:
                while True:
                    if to_echo:  # the prompt first: its scores come with the first piece, or the stats
                        prompt_logprobs = item.get("prompt_logprobs") if "text" in item else \
                            item["stats"].get("prompt_logprobs")
                        yield reply.echo_chunk(oa.echo_text(prompt, prompt_logprobs or []),
                                               prompt_logprobs if scored else None)
                        to_echo = False
                    if "text" in item:
                        yield reply.chunk(item["text"], logprobs=item.get("logprobs"))
                    else:
                        yield reply.chunk(stats=item["stats"])
                        if include_usage:
                            yield reply.usage_chunk(item["stats"])
                    item = await it.__anext__()
            except StopAsyncIteration:
                pass
            except RequestError as e:
                yield oa.event(oa.error_body(e)[1])
            except _REPLICA_GONE:
                yield oa.event(oa.error_body(RequestError("UNAVAILABLE", "the model replica died mid-stream"))[1])
            yield oa.DONE
        return StreamingResponse(events(), media_type="text/event-stream")
