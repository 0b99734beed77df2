"""The model replica: one engine, its node's shared context cache, and the request methods
the ingress calls through a deployment handle (routed by cluster.router)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future, ThreadPoolExecutor

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.util import metrics

from cluster.contexts import Lease, SharedContexts
from deploy.config import AppArgs
from deploy.errors import RequestError, as_request_error
from deploy.openai_api import served_model
from deploy.streams import ItemStream
from icecache import Context, Engine, SamplingParams

log = logging.getLogger(__name__)


def _log_to_stderr() -> None:
    """Our packages' INFO lines into the replica's stderr (Ray keeps it in the replica's log)."""
    for name in ("icecache", "cluster", "deploy"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        if not logger.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
            logger.addHandler(handler)


@serve.deployment(
    request_router_config=RequestRouterConfig(request_router_class="cluster.router:ContextLocalityRouter"),
    max_ongoing_requests=16,
    health_check_period_s=5,
)
class IceCacheLLM:
    def __init__(self, args: dict, tenant_secret: str) -> None:
        _log_to_stderr()
        self.args = AppArgs(**args)
        self.engine = Engine.from_pretrained(self.args.model, self.args.engine_config(), device=self.args.device,
                                             context_length=self.args.context_length)
        self.max_document_tokens = min(self.args.max_document_tokens or self.engine.max_context_tokens,
                                       self.engine.max_context_tokens)
        # One thread drives the device: the scheduler's. Requests, documents to index and
        # the writes of contexts into shared memory are queued to it; the pool threads below
        # only wait (on the node cache, on the scheduler), never touch the device.
        self.scheduler = self.engine.scheduler(max_batch=self.args.max_batch, max_waiting=self.args.max_waiting,
                                               burst_wait_s=self.args.burst_wait_s)
        self.scheduler.start()
        self.contexts = SharedContexts(self.engine, tenant_secret.encode(), self.args.cache_capacity,
                                       build=self._build, run=lambda fn: self.scheduler.call(fn).result(),
                                       on_unmap=lambda ctx: self.scheduler.forget(ctx).result())
        preallocate = self.args.cache_preallocate
        if preallocate == "auto":
            preallocate = self.engine.device.type == "cuda"
        self.contexts.map_slabs(preallocate)
        self.node_id = ray.get_runtime_context().get_node_id()
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self._threads = ThreadPoolExecutor(max_workers=64, thread_name_prefix="icecache-request")
        warmup = self.args.warmup_tokens
        if warmup == "auto":
            warmup = 4096 if self.engine.device.type == "cuda" else 0
        if warmup:
            self._warm_up(min(warmup, self.max_document_tokens - 64))
        self._metrics()

    def _metrics(self) -> None:
        """Serve-side metrics of this replica (Ray's Prometheus endpoint), tagged by tenant and model."""
        tags = ("tenant", "model")
        seconds = [0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60]
        self._ttft = metrics.Histogram("icecache_ttft_seconds", "Time to first token, from arrival at the replica",
                                       boundaries=seconds, tag_keys=("reused", *tags))
        self._tpot = metrics.Histogram("icecache_tpot_seconds", "Time per output token after the first",
                                       boundaries=seconds, tag_keys=tags)
        self._queue = metrics.Histogram("icecache_queue_seconds", "Arrival at the replica to admission into a batch",
                                        boundaries=seconds, tag_keys=tags)
        self._pages = metrics.Histogram("icecache_pages_per_token", "Pages read per sparse layer, KV head and "
                                        "output token", boundaries=[1, 2, 4, 8, 12, 16, 24, 32, 64], tag_keys=tags)
        # the generation stats sum pages over sparse layers and KV heads; the histogram's unit is one of each
        self._page_rows = max(1, self.engine.sparse_layers * self.engine.shape.num_kv_heads)
        self._requests = metrics.Counter("icecache_requests", "Requests ended, by status", tag_keys=("status", *tags))
        self._tokens = metrics.Counter("icecache_output_tokens", "Tokens generated", tag_keys=tags)
        self._prompt_tokens = metrics.Counter("icecache_prompt_tokens", "Prompt tokens prefilled (a reused "
                                              "document's not counted)", tag_keys=tags)
        self._indexed = metrics.Counter("icecache_documents_indexed", "Documents this replica prefilled and indexed",
                                        tag_keys=tags)
        model = served_model(self.args.model)
        for m in (self._ttft, self._tpot, self._queue, self._pages, self._requests, self._tokens, self._prompt_tokens,
                  self._indexed):
            m.set_default_tags({"model": model})

    def _ended(self, tenant: str, status: str) -> None:
        self._requests.inc(tags={"status": status, "tenant": tenant})
        if status != "OK":
            log.warning("request of tenant %s ended %s", tenant, status)

    def check_health(self) -> None:
        """Serve's health check: fails once the scheduler thread has stopped (a failed step),
        so the replica is replaced instead of hanging requests."""
        if not self.scheduler.alive:
            raise RuntimeError(f"the scheduler thread is not running: {self.scheduler.error!r}")

    def _warm_up(self, num_tokens: int) -> None:
        """Index a private document and answer questions on it, alone and 4 at a time, the
        way requests will, then compile the kernels for every other document shape and
        batch size: kernels compile and the first graphs are captured here, before the
        replica reports healthy, not on a user's request."""
        start = time.perf_counter()
        vocab = self.engine.model.config.vocab_size
        ids = [100 + (i * 7919) % max(1, vocab - 100) for i in range(num_tokens)]
        ctx = self.scheduler.call(lambda: self.engine.index_ids(ids)).result()
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        errors: list[Exception] = []
        for batch in (1, 4, 1):
            done = [threading.Event() for _ in range(batch)]
            for event in done:
                self.scheduler.submit([11, 12, 13], params, ctx, on_done=event.set,
                                      on_item=lambda item: errors.append(item) if isinstance(item, Exception) else None)
            for event in done:
                event.wait()
            if errors:
                raise RuntimeError(f"the replica's warm-up failed: {errors[0]!r}") from errors[0]
        self.scheduler.forget(ctx).result()
        try:
            variants = self.scheduler.call(self.engine.precompile_kernels).result()
        except Exception:  # the replica still serves; a new document's shape then compiles on its first question
            log.exception("precompiling the decode kernels failed")
            variants = 0
        log.info("replica warmed up on a %d-token document in %.1f s (%d kernel variants compiled or loaded)",
                 num_tokens, time.perf_counter() - start, variants)

    def _build(self, ids: list[int]) -> Context:
        """Prefill and index a document in the scheduler thread (between decode steps)."""
        done: Future = Future()
        self.scheduler.submit_index(ids, lambda r: done.set_exception(r) if isinstance(r, BaseException)
                                    else done.set_result(r))
        return done.result()

    # ------------------------------------------------------------------ helpers
    def _document_ids(self, document: str | list[int], chat_role: str | None = None) -> list[int]:
        """A document's ids: as given, or (chat_role) as the first turn of a chat."""
        if chat_role is not None:
            if not isinstance(document, str):
                raise ValueError("document: a chat's document must be text, not token ids")
            ids = self.engine.chat_document_ids(document, chat_role)
        else:
            ids = self.engine.tokenize(document)
        if len(ids) > self.max_document_tokens:
            raise ValueError(f"document: {len(ids)} tokens, over the limit of {self.max_document_tokens}")
        return ids

    def _lease(self, tenant: str, context_id: str | None, document: str | list[int] | None,
               chat_role: str | None = None) -> Lease | None:
        if context_id:
            return self.contexts.open(tenant, context_id)
        if document is not None:
            lease = self.contexts.index(tenant, self._document_ids(document, chat_role))
            if not lease.cached:  # indexed here, whether by IndexDocument or inline with a question
                self._indexed.inc(tags={"tenant": tenant})
            return lease
        return None

    def _logprobs_as_text(self, logprobs) -> list[dict]:
        """Output tokens' log-probabilities with each token (and its alternatives) as text."""
        with self.engine.tokenizer_lock:
            text = self.engine.tokenizer.decode
            return [{"token": text([lp.token_id]), "logprob": lp.logprob,
                     "top": [[text([t]), v] for t, v in lp.top]} for lp in logprobs]

    async def _in_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._threads, fn, *args)

    # ------------------------------------------------------------------ requests
    async def index(self, tenant: str, document: str | list[int], chat_role: str | None = None) -> dict:
        """Prefill and publish a document in this node's cache (or find it there); with
        chat_role, as the first turn of a chat in the model's template."""
        def work() -> dict:
            try:
                lease = self._lease(tenant, None, document, chat_role)
                try:
                    ctx = lease.context
                    return {"context_id": lease.context_id, "num_tokens": ctx.num_tokens, "cached": lease.cached,
                            "prefill_s": 0.0 if lease.cached else ctx.prefill_s,
                            "index_build_s": 0.0 if lease.cached else ctx.build_s, "node_id": self.node_id}
                finally:
                    self.contexts.release(lease)
            except Exception as e:
                raise (as_request_error(e) or e) from None
        return await self._in_thread(work)

    async def generate(self, tenant: str, prompt: str, sampling: dict, context_id: str | None = None,
                       document: str | list[int] | None = None, messages: list[dict] | None = None,
                       chat_role: str | None = None) -> AsyncIterator[dict]:
        """Stream {"text": piece} items (with "logprobs", their tokens', where sampling asks
        for them, and the first with "prompt_logprobs" where it asks for those), then one
        {"stats": {...}}. Cancelling the call stops decoding at the next
        token and releases the context. messages (instead of prompt): chat messages in the
        model's template; with a context or document, they continue the chat it opens as a
        turn of chat_role (default "system")."""
        arrived = time.perf_counter()
        stream = ItemStream(asyncio.get_running_loop())
        put = stream.put  # from the scheduler and request threads
        cancelled = threading.Event()

        submitted: list = []
        leased_at = [arrived]

        def stats(out, lease: Lease | None) -> dict:
            s = out.stats
            return {
                "finish_reason": out.finish_reason, "output_tokens": s["output_tokens"],
                "context_tokens": s["context_tokens"], "prompt_tokens": s["prompt_tokens"],
                "context_reused": bool(lease.cached) if lease else False, "ttft_s": s["ttft_s"],
                "tpot_s": s["tpot_s"], "tpot_median_s": s["tpot_median_s"], "decode_pass_s": s["decode_pass_s"],
                "prefill_s": (lease.context.prefill_s if lease and not lease.cached
                                                     else s["prefill_s"] or 0.0),
                "context_id": lease.context_id if lease else "", "node_id": self.node_id,
                "replica_id": self.replica_id, "pages_loaded_per_token": s["pages_loaded_per_token"],
                "peak_batch": s["peak_batch"], "queue_s": s["queue_s"], "lease_s": leased_at[0] - arrived,
                "prefill_batch": s["prefill_batch"], "prefill_pass_s": s["prefill_pass_s"],
                **({"logprobs": self._logprobs_as_text(out.logprobs)} if out.logprobs is not None else {}),
                **({"prompt_logprobs": self._logprobs_as_text(out.prompt_logprobs)}
                   if out.prompt_logprobs is not None else {})}

        def work() -> None:
            """Lease the context (may prefill a document), then hand the request to the scheduler."""
            lease = None
            try:
                params = SamplingParams(**sampling)
                if cancelled.is_set():
                    put("end", None)
                    return
                text = prompt
                if messages is not None:
                    on_document = context_id is not None or document is not None
                    role = (chat_role or "system") if on_document else None
                    text = self.engine.chat_ids(messages, role)
                    lease = self._lease(tenant, context_id, document, role)
                else:
                    lease = self._lease(tenant, context_id, document)
                first = [True]

                def on_item(item) -> None:
                    if isinstance(item, str):
                        if first[0]:
                            self._ttft.observe(time.perf_counter() - arrived,
                                               tags={"reused": str(bool(lease and lease.cached)), "tenant": tenant})
                            first[0] = False
                        logprobs = getattr(item, "logprobs", None)  # a TextPiece, where they were asked
                        prompt_scores = getattr(item, "prompt_logprobs", None)  # its first, where asked
                        put("text", str(item), None if logprobs is None else self._logprobs_as_text(logprobs),
                            None if prompt_scores is None else self._logprobs_as_text(prompt_scores))
                    elif isinstance(item, Exception):  # the scheduler logged it
                        error = as_request_error(item) or RequestError(
                            "INTERNAL", f"the request failed in the model replica: {item!r}")
                        self._ended(tenant, error.code)
                        put("error", error)
                    else:
                        s, tagged = item.stats, {"tenant": tenant}
                        fresh = s["prompt_tokens"] + (0 if lease and lease.cached else s["context_tokens"])
                        for counter, n in ((self._tokens, len(item.token_ids)), (self._prompt_tokens, fresh)):
                            if n > 0:  # Ray's counters refuse 0
                                counter.inc(n, tags=tagged)
                        self._queue.observe(s["queue_s"], tags=tagged)
                        if s["output_tokens"] > 1:
                            self._tpot.observe(s["tpot_s"], tags=tagged)
                        if s.get("pages_loaded_per_token"):
                            self._pages.observe(s["pages_loaded_per_token"] / self._page_rows, tags=tagged)
                        self._ended(tenant, "OK")
                        log.info("request of tenant %s: %d + %d prompt tokens, %d out (%s), TTFT %.0f ms, TPOT %.1f ms "
                                 "(decode pass %.1f ms), batch up to %d, context %s", tenant, s["context_tokens"],
                                 s["prompt_tokens"], s["output_tokens"], item.finish_reason, 1e3 * (s["ttft_s"] or 0.0),
                                 1e3 * s["tpot_median_s"], 1e3 * s["decode_pass_s"], s["peak_batch"],
                                 "reused" if lease and lease.cached else "indexed" if lease else "none")
                        put("stats", stats(item, lease))

                def on_done() -> None:  # the scheduler no longer reads the context
                    if lease is not None:
                        self.contexts.release(lease)
                    put("end", None)

                leased_at[0] = time.perf_counter()
                submitted.append(self.scheduler.submit(text, params, lease.context if lease else None, on_item=on_item,
                                                       on_done=on_done, arrived=arrived))
                if cancelled.is_set():
                    submitted[0].cancel()
            except Exception as e:
                if lease is not None:
                    self.contexts.release(lease)
                error = as_request_error(e)
                self._ended(tenant, error.code if error else "INTERNAL")
                put("error", error or e)
                put("end", None)

        self._threads.submit(work)
        try:
            async for item in stream:
                yield item
        finally:
            cancelled.set()
            if submitted:
                submitted[0].cancel()  # freed at the scheduler's next step
