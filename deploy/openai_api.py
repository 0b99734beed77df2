"""The OpenAI-compatible HTTP API of the app: what its routes (deploy/ingress.py) parse,
check and send back, kept apart from Serve so it reads (and is tested) as plain functions.

    GET    /v1/models, /v1/models/{id}
    POST   /v1/completions          prompt -> text, streamed as server-sent events or not; with
                                    echo the prompt first (streamed: as the first event), scored
                                    with logprobs
    POST   /v1/chat/completions     messages -> reply, in the model's chat template
    POST   /v1/contexts             index a document once -> its id
    DELETE /v1/contexts/{id}

A request reuses an indexed document through fields OpenAI clients pass as `extra_body`:
`context_id` (from POST /v1/contexts), or `document` (indexed inline, and cached for the next
request with the same text). A chat over a document continues the chat the document opens
as its first turn (`chat_role`, "system" by default): index it with
`{"document": ..., "chat_role": "system"}` and the messages read as one conversation with it.
Errors have OpenAI's shape ({"error": {"message", "type", "param", "code"}}) and status.
The tenant is the `X-Tenant` header.
"""

from __future__ import annotations

import json
import time
import uuid

from deploy.errors import RequestError, check_document_size
from icecache import SamplingParams
from icecache.config import MAX_LOGPROBS

TENANT_HEADER = "x-tenant"
DEFAULT_MODEL = "SmolLM2-135M-Instruct"
COMPLETION_DEFAULT_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
_STATUS = {"INVALID_ARGUMENT": 400, "NOT_FOUND": 404, "RESOURCE_EXHAUSTED": 429, "UNAVAILABLE": 503,
           "DEADLINE_EXCEEDED": 504, "INTERNAL": 500}
_TYPE = {400: "invalid_request_error", 404: "not_found_error", 429: "rate_limit_error", 503: "service_unavailable",
         504: "timeout", 500: "server_error"}
# accepted only at their no-op values (clients send them explicitly: chat's `logprobs: false`,
# `logit_bias: {}`): this server does not implement them
_NO_OP = {"n": (1,), "best_of": (1,), "presence_penalty": (0,), "frequency_penalty": (0,),
          "logit_bias": ({},), "suffix": ("",)}
_IGNORED = {"user", "stream_options", "service_tier", "store", "metadata", "parallel_tool_calls", "response_format"}


def error_body(error: RequestError, param: str | None = None) -> tuple[int, dict]:
    """(HTTP status, OpenAI error object) of a RequestError."""
    status = _STATUS.get(error.code, 500)
    return status, {"error": {"message": error.message, "type": _TYPE[status], "param": param,
                              "code": error.code.lower()}}


def served_model(model: str | None) -> str:
    """The name /v1/models lists for the app's `model:` argument."""
    return model.rstrip("/").rsplit("/", 1)[-1] if model else DEFAULT_MODEL


def _bad(message: str) -> RequestError:
    return RequestError("INVALID_ARGUMENT", message)


def _number(body: dict, name: str, default, low: float, high: float, integer: bool = False):
    value = body.get(name, default)
    if value is None:
        return default
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or not low <= value <= high:
        raise _bad(f"{name}: expected {'an integer' if integer else 'a number'} in [{low}, {high}], got {value!r}")
    return value


def _messages(value) -> list[dict]:
    """Chat messages with string content (text parts of a content list joined)."""
    if not isinstance(value, list) or not value:
        raise _bad("messages: expected a non-empty list of {role, content}")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _bad(f"messages[{i}]: expected an object with a role")
        content = m.get("content")
        if isinstance(content, list):
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise _bad(f"messages[{i}].content: only text parts are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise _bad(f"messages[{i}].content: expected a string")
        out.append({"role": m["role"], "content": content})
    return out


def parse_request(body, chat: bool, model: str, max_new_tokens: int, max_document_bytes: int) -> dict:
    """A completions or chat-completions body -> the keyword arguments of the replica's
    generate (prompt or messages, sampling, context_id / document / chat_role), plus
    "stream" and "include_usage". Raises RequestError naming the offending field."""
    if not isinstance(body, dict):
        raise _bad("the request body must be a JSON object")
    if body.get("model") not in (None, "", model):
        raise RequestError("NOT_FOUND", f"model {body['model']!r} does not exist; this server serves {model!r}")
    for name, values in _NO_OP.items():
        value = body.get(name)
        if value is not None and not any(type(value) is type(v) and value == v for v in values) and not (
                isinstance(value, float) and value == 0 and 0 in values):
            raise _bad(f"{name}: not supported by this server (only {' or '.join(map(repr, values))}, or null)")
    known = {"model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
             "stop", "seed", "stream", "ignore_eos", "context_id", "document", "chat_role", "logprobs", "top_logprobs",
             "echo", *_NO_OP, *_IGNORED}
    unknown = sorted(set(body) - known)
    if unknown:
        raise _bad(f"{unknown[0]}: unknown field")
    out: dict = {}
    if chat:
        out["messages"] = _messages(body.get("messages"))
        role = body.get("chat_role")
        if role is not None:
            out["chat_role"] = role if isinstance(role, str) else str(role)
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # one prompt of a batch of one
        ids = isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
        if not (isinstance(prompt, str) or ids) or not prompt:
            raise _bad("prompt: expected a non-empty string or list of token ids (one prompt)")
        out["prompt"] = prompt
    echo = _echo(body, chat)
    limit = max_new_tokens
    default = limit if chat else min(COMPLETION_DEFAULT_TOKENS, limit)
    tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < (0 if echo else 1)):
        raise _bad(f"max_tokens: must be a positive integer (0 only with echo), got {tokens!r}")
    if tokens is not None and tokens > limit:
        raise _bad(f"max_tokens: {tokens} is over the server's limit of {limit}")
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, (list, tuple)) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise _bad("stop: expected a string or a list of at most 4 non-empty strings")
    sampling = {"max_tokens": default if tokens is None else tokens,
                "temperature": _number(body, "temperature", 1.0, 0, 2), "top_p": _number(body, "top_p", 1.0, 0, 1),
                "stop": tuple(stop),
                "ignore_eos": bool(body.get("ignore_eos", False))}
    if body.get("top_k") is not None:
        sampling["top_k"] = _number(body, "top_k", 0, 0, 1 << 20, integer=True)
    if body.get("seed") is not None:
        sampling["seed"] = _number(body, "seed", 0, -(1 << 63), (1 << 63) - 1, integer=True)
    logprobs = _logprobs(body, chat)
    if logprobs is not None:
        sampling["logprobs"] = logprobs
    if echo:  # the prompt's tokens come back scored (their text is what is echoed)
        sampling["prompt_logprobs"] = logprobs or 0
        out["echo"] = True
    try:
        SamplingParams(**sampling)
    except ValueError as e:
        raise _bad(str(e)) from None
    out["sampling"] = sampling
    context_id, document = body.get("context_id"), body.get("document")
    if context_id is not None and document is not None:
        raise _bad("context_id, document: send one of them, not both")
    if context_id is not None:
        out["context_id"] = context_id if isinstance(context_id, str) else repr(context_id)
    if document is not None:
        out["document"] = check_document(document, max_document_bytes)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise _bad(f"stream: expected true or false, got {stream!r}")
    options = body.get("stream_options") or {}
    return {**out, "stream": stream, "include_usage": bool(isinstance(options, dict) and options.get("include_usage"))}


def _echo(body: dict, chat: bool) -> bool:
    """Whether a completion echoes its prompt (with the prompt tokens' log-probabilities where
    logprobs asks for them, and max_tokens 0 to score a prompt only)."""
    echo = body.get("echo")
    if echo in (None, False):
        return False
    if echo is not True:
        raise _bad(f"echo: expected true or false, got {echo!r}")
    if chat:
        raise _bad("echo: a completions field; chat completions do not echo")
    return True


def _logprobs(body: dict, chat: bool) -> int | None:
    """How many alternatives per token the request asks log-probabilities for, or None: chat
    sends `logprobs: true` and `top_logprobs: k`, completions `logprobs: k`."""
    top = body.get("top_logprobs")
    if not chat:
        if top is not None:
            raise _bad("top_logprobs: a chat field; completions ask with logprobs: k")
        return _number(body, "logprobs", None, 0, MAX_LOGPROBS, integer=True)
    wanted = body.get("logprobs")
    if wanted is not None and not isinstance(wanted, bool):
        raise _bad(f"logprobs: expected true or false, got {wanted!r}")
    if not wanted:
        if top not in (None, 0):
            raise _bad("top_logprobs: needs logprobs: true")
        return None
    return _number(body, "top_logprobs", 0, 0, MAX_LOGPROBS, integer=True)


def check_document(document, max_document_bytes: int) -> str:
    if not isinstance(document, str) or not document:
        raise _bad("document: expected non-empty text")
    check_document_size(len(document.encode()), max_document_bytes)
    return document


def usage(stats: dict) -> dict:
    """OpenAI usage counts: an indexed document's tokens are prompt tokens, cached when reused."""
    prompt = stats["context_tokens"] + stats["prompt_tokens"]
    return {"prompt_tokens": prompt, "completion_tokens": stats["output_tokens"],
            "total_tokens": prompt + stats["output_tokens"],
            "prompt_tokens_details": {"cached_tokens": stats["context_tokens"] if stats["context_reused"] else 0}}


def echo_text(prompt: str | list[int], prompt_logprobs: list[dict]) -> str:
    """The text a completion with echo puts before its own: the prompt as sent, or a prompt
    of token ids as its tokens' text (from their log-probabilities' entries)."""
    return prompt if isinstance(prompt, str) else "".join(t["token"] for t in prompt_logprobs)


def finish_reason(stats: dict) -> str:
    return "length" if stats["finish_reason"] == "length" else "stop"


class Reply:
    """Builds one request's response objects, whole or as stream chunks."""

    def __init__(self, chat: bool, model: str) -> None:
        self.chat, self.model = chat, model
        self.logprobs_sent = 0  # a stream's tokens whose log-probabilities went out with its chunks
        self.offset = 0  # a completion stream's characters sent (text_offset counts from the start)
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if chat else "text_completion"

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _logprobs(self, logprobs: list[dict] | None) -> dict | None:
        if logprobs is None:
            return None
        self.logprobs_sent += len(logprobs)
        if self.chat:
            return chat_logprobs(logprobs)
        return completion_logprobs(logprobs, self.offset)

    def whole(self, text: str, stats: dict, echo: str | None = None) -> dict:
        """The whole response; echo: the prompt's text, put before the completion's (with
        its tokens' log-probabilities first, where they were asked)."""
        logprobs = stats.get("logprobs")
        if echo is not None:
            if logprobs is not None:
                logprobs = stats["prompt_logprobs"] + logprobs
            text = echo + text
        choice = {"index": 0, "finish_reason": finish_reason(stats), "logprobs": self._logprobs(logprobs)}
        choice.update({"message": {"role": "assistant", "content": text}} if self.chat else {"text": text})
        return {**self._head(self.object), "choices": [choice], "usage": usage(stats),
                "icecache": _extension(stats)}

    def chunk(self, text: str | None = None, stats: dict | None = None, first: bool = False,
              logprobs: list[dict] | None = None) -> str:
        """One server-sent event: a text piece (with its tokens' logprobs, if asked), the role
        opening a chat, or the end (with the logprobs of tokens that showed no text, if any)."""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        reason = finish_reason(stats) if stats is not None else None
        if stats is not None and stats.get("logprobs") is not None:
            logprobs = stats["logprobs"][self.logprobs_sent:] or None
        choice = {"index": 0, "finish_reason": reason, "logprobs": self._logprobs(logprobs)}
        if self.chat:
            choice["delta"] = ({"role": "assistant", "content": ""} if first
                               else {} if text is None else {"content": text})
        else:
            choice["text"] = text or ""
        self.offset += len(text or "")
        return event({**self._head(obj), "choices": [choice]})

    def echo_chunk(self, text: str, logprobs: list[dict] | None) -> str:
        """A completion stream's first event with echo: the prompt's text, with its tokens'
        log-probabilities where the request asked for logprobs (they do not count among the
        completion's own, which the chunks after it carry)."""
        scored = None if logprobs is None else completion_logprobs(logprobs, self.offset)
        self.offset += len(text)
        return event({**self._head("text_completion"),
                      "choices": [{"index": 0, "finish_reason": None, "logprobs": scored, "text": text}]})

    def usage_chunk(self, stats: dict) -> str:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return event({**self._head(obj), "choices": [], "usage": usage(stats), "icecache": _extension(stats)})


def chat_logprobs(logprobs: list[dict]) -> dict:
    """A chat choice's `logprobs`: per output token its text, log-probability, UTF-8 bytes and
    the most likely tokens'."""
    def entry(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}
    return {"content": [{**entry(t["token"], t["logprob"]), "top_logprobs": [entry(*alt) for alt in t["top"]]}
                        for t in logprobs], "refusal": None}


def completion_logprobs(logprobs: list[dict], start: int = 0) -> dict:
    """A completion choice's `logprobs`, in the legacy API's columns; text_offset counts from
    `start` (a stream's characters sent before these tokens)."""
    offsets, at = [], start
    for t in logprobs:
        offsets.append(at)
        at += len(t["token"])
    return {"tokens": [t["token"] for t in logprobs], "token_logprobs": [t["logprob"] for t in logprobs],
            "top_logprobs": [dict(t["top"]) if t["logprob"] is not None else None for t in logprobs],
            "text_offset": offsets}


def _extension(stats: dict) -> dict:
    """What this server adds to a response: the context used and the request's timings."""
    keys = ("context_id", "context_reused", "ttft_s", "tpot_s", "prefill_s", "pages_loaded_per_token", "replica_id")
    return {k: stats[k] for k in keys if k in stats}


def event(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


DONE = "data: [DONE]\n\n"
