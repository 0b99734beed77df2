"""Continuous batching: requests join and leave between decode steps.

A step prefills at most `prefill_chunk_tokens` prompt tokens, from the oldest requests
still prefilling (several short questions fit in one step, a long document takes many),
so running streams keep flowing while newcomers go in. Then it runs one decode token
for every decoding request. On the dynamic path (CPU) that is a single forward pass
over all of them: the weights are read once per step, and each request attends over its
own context, window and page slots. On the static path (CUDA graphs) the requests on one
context decode together in one batched StaticDecoder (a group): one pass, one CUDA graph
per batch size, the context's tree, host pages and dense KV read once for all of them;
groups on different contexts take turns within the step.

Admission: at most `max_batch` requests are in flight and their estimated device bytes
stay under `device_bytes` (a context's device state counted once, however many requests
share it), and the contexts that prompts without one build on the host stay under
`host_bytes`; the rest wait in FIFO order. A request that could never fit
is refused at submit() with a ValueError that says why, and a full waiting queue raises
SchedulerFull. Cancelling a request frees its state at the next step.

submit() and cancel() may be called from any thread. step() belongs to one driver: the
caller's own loop (Engine.generate / stream) or the thread start() runs (the Serve replica).
"""

from __future__ import annotations

import collections
import statistics
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from icecache.cache import RequestKV, StepBatch
from icecache.config import SamplingParams
from icecache.context import Context
from icecache.sampling import TextStream, make_generator, sample
from icecache.static_decode import StaticDecoder

if TYPE_CHECKING:
    from icecache.engine import Engine, GenerationOutput

_SLOT_TOKENS = 512  # a group's slots hold a multiple of this many own tokens (prompt + decoded)
Sink = Callable[[object], None]  # receives text pieces (str), then a GenerationOutput, or an Exception


class SchedulerFull(RuntimeError):
    """The waiting queue is full; the request was not taken (try again later)."""


class Sequence:
    """One request in flight: its phase, KV state, sampling state and output so far."""

    def __init__(self, engine: "Engine", params: SamplingParams, context: Context | None, prompt_ids: list[int],
                 sink: Sink | None, on_done: Callable[[], None] | None = None) -> None:
        self.engine, self.params, self.context = engine, params, context
        self.sink, self.on_done = sink, on_done
        self.items: collections.deque = collections.deque()  # when there is no sink
        self.t0 = time.perf_counter()
        self.prompt_ids = prompt_ids
        self.reused = context is not None
        if context is None:  # the prompt itself is prefilled and indexed, then decoded from
            self.phase, self.own_ids, self.pending = "index", [], list(prompt_ids)
            self.req = RequestKV(engine.shape, engine.config, None)
            self.next_pos = 0
        else:  # the prompt continues an indexed context
            self.phase, self.own_ids, self.pending = "prompt", prompt_ids, list(prompt_ids)
            self.req = RequestKV(engine.shape, engine.config, context)
            self.next_pos = context.num_tokens
        self.prefill_started: float | None = None
        self.logits: torch.Tensor | None = None
        self.chosen: int | None = None  # a token already picked on the device (greedy), else sample logits
        if not self.pending:  # nothing to prefill: decode from the context's last logits
            self.logits, self.phase = context.last_logits, "start"
        self.group: _Group | None = None  # static path: the batch it decodes in
        self.position = 0
        self.generator = make_generator(params)
        self.text = TextStream(engine.tokenizer, params.stop, engine.tokenizer_lock)
        self.eos = set() if params.ignore_eos else engine._eos_ids()
        self.step_times: list[float] = []
        self.ttft: float | None = None
        self.last_token_at = 0.0
        self.finish = "length"
        self.peak_batch = 0  # most requests one decode pass carried along with this one
        self.done = False
        self.cancelled = False
        context_tokens = context.num_tokens if context else len(prompt_ids)
        self.device_bytes = engine.request_device_bytes(context_tokens, len(self.own_ids), params.max_tokens)
        self.context_bytes = engine.context_device_bytes(context_tokens)  # of device_bytes, shareable
        self.host_bytes = engine.context_host_bytes(len(prompt_ids)) if context is None else 0  # its index

    @property
    def slot_tokens(self) -> int:
        """Own tokens a decoder slot must hold for this request: prompt, output, and one spare."""
        return len(self.own_ids) + self.params.max_tokens + 1

    @property
    def context_key(self) -> int:
        """Requests with the same key share their context's device state."""
        return id(self.context) if self.context is not None else id(self)

    # ---------------------------------------------------------------- output
    def _emit(self, item) -> None:
        if self.sink is not None:
            self.sink(item)
        else:
            self.items.append(item)

    def cancel(self) -> None:
        """Stop at the next step; the request's memory is freed then."""
        self.cancelled = True

    # ---------------------------------------------------------------- phases
    def prefill_chunk(self, limit: int) -> int:
        """Prefill the next chunk of the prompt, at most `limit` tokens (exact attention).
        Returns the tokens prefilled."""
        eng = self.engine
        if self.prefill_started is None:
            self.prefill_started = time.perf_counter()
        piece, self.pending = self.pending[:limit], self.pending[limit:]
        ids = torch.tensor([piece])
        pos = torch.arange(self.next_pos, self.next_pos + len(piece))[None]
        logits = eng._forward(StepBatch([self.req]), ids, pos)[0]
        self.next_pos += len(piece)
        if self.pending:
            return len(piece)
        if self.phase == "index":
            ctx = eng._context_of(self.req, self.prompt_ids, logits, self.prefill_started)
            self.context = ctx
            self.req = RequestKV(eng.shape, eng.config, ctx)
            self.logits = ctx.last_logits
        else:
            self.logits = logits
        self.phase = "start"
        return len(piece)

    def start_decode(self, group: "_Group | None") -> None:
        """Into the decode phase: on the static path in a slot of `group`."""
        if group is not None:
            group.add(self, [(kv.k, kv.v) for kv in self.req.own])
            self.req.own = None  # the decoder holds its own copies
        else:
            self.req.start_decode()
        self.position = self.context.num_tokens + len(self.own_ids)
        self.phase = "decode"

    def next_token(self) -> int | None:
        """Sample from the last logits and hand out text; the token to feed next, or None
        when the request is finished (its output has then been emitted)."""
        now = time.perf_counter()
        if self.ttft is None:
            self.ttft = now - self.t0
        else:
            self.step_times.append(now - self.last_token_at)
        self.last_token_at = now
        token = self.chosen if self.chosen is not None else sample(self.logits, self.params, self.generator)
        self.chosen = None
        if token in self.eos:
            self.finish = "eos"
            return self._finish()
        piece = self.text.add(token)
        if piece:
            self._emit(piece)
        if self.text.stopped:
            self.finish = "stop"
            return self._finish()
        if len(self.text.ids) >= self.params.max_tokens or self.position >= self.engine.max_context_tokens:
            return self._finish()
        return token

    def _finish(self) -> None:  # returns None: no token to feed
        from icecache.engine import GenerationOutput
        tail = self.text.flush()
        if tail:
            self._emit(tail)
        steps = len(self.step_times)
        if self.group is not None and steps:  # every selected page is gathered each step
            self.req.pages_loaded = self.req.pages_selected = self.group.pages_per_step(self) * steps
        ctx, n = self.context, max(1, steps)
        self._emit(GenerationOutput(
            text=self.text.text, token_ids=list(self.text.ids), finish_reason=self.finish,
            stats={
                "ttft_s": self.ttft,
                "tpot_s": sum(self.step_times) / n if steps else 0.0,
                # steady state: the first steps include warm-up (kernel compiles, CUDA graph capture)
                "tpot_median_s": statistics.median(self.step_times) if steps else 0.0,
                "context_tokens": ctx.num_tokens,
                "prompt_tokens": len(self.own_ids),
                "output_tokens": len(self.text.ids),
                "context_reused": self.reused,
                "prefill_s": ctx.prefill_s if not self.reused else None,
                "index_build_s": ctx.build_s if not self.reused else None,
                "pages_loaded": self.req.pages_loaded,
                "pages_loaded_per_token": self.req.pages_loaded / n,
                "pages_selected_per_token": self.req.pages_selected / n,
                "host_bytes": ctx.host_bytes,
                "mode": self.engine.config.mode,
                "peak_batch": self.peak_batch,
            }))
        self.release()
        return None

    def release(self) -> None:
        """Drop every tensor the request holds, then call on_done (once): from then on the
        scheduler no longer reads the request's context."""
        if self.done:
            return
        self.done = True
        if self.group is not None:
            self.group.remove(self)
        self.req = self.group = self.logits = None
        if self.on_done is not None:
            self.on_done()


class _Group:
    """Requests decoding together on one context: a batched StaticDecoder whose slot i
    holds seqs[i]. A leaving request's slot takes the last one's, so slots stay dense."""

    def __init__(self, decoder: StaticDecoder, on_empty: Callable[["_Group"], None]) -> None:
        self.decoder, self.on_empty = decoder, on_empty
        self.seqs: list[Sequence] = []

    def fits(self, seq: Sequence) -> bool:
        return len(self.seqs) < self.decoder.slots and seq.slot_tokens <= self.decoder.slot_tokens

    def add(self, seq: Sequence, own_kv: list) -> None:
        self.decoder.load(len(self.seqs), own_kv, seq.params.max_tokens)
        self.seqs.append(seq)
        seq.group = self

    def remove(self, seq: Sequence) -> None:
        i, last = self.seqs.index(seq), len(self.seqs) - 1
        self.decoder.move(last, i)
        self.seqs[i] = self.seqs[last]
        self.seqs.pop()
        if not self.seqs:
            self.on_empty(self)

    def pages_per_step(self, seq: Sequence) -> int:
        return self.decoder.pages_per_step(self.seqs.index(seq))

    def step(self, tokens: dict[Sequence, int]) -> None:
        """One token for every request of the group (all are decoding)."""
        logits = self.decoder.step_batch([tokens[s] for s in self.seqs], [s.position for s in self.seqs],
                                         graph=self.decoder.device.type == "cuda")
        if all(s.params.temperature == 0.0 for s in self.seqs):  # greedy: pick on the device, copy B ids
            picked, logits = logits.argmax(-1).tolist(), [None] * len(self.seqs)
        else:  # one copy and one sync for the batch; sampling runs on the host
            picked, logits = [None] * len(self.seqs), logits.float().cpu()
        for b, seq in enumerate(self.seqs):
            seq.logits, seq.chosen = logits[b], picked[b]
            seq.position += 1


class Scheduler:
    """Runs many requests on one engine with continuous batching (see the module doc)."""

    def __init__(self, engine: "Engine", max_batch: int = 32, max_waiting: int = 1024,
                 device_bytes: int | None = None, device_pages: bool = False, host_bytes: int | None = None) -> None:
        """device_bytes: the KV budget of admitted requests (None = no limit); device_pages:
        a group copies its document's pages into GPU memory (see StaticDecoder); host_bytes:
        the budget of the contexts that admitted prompts without one build (None = no
        limit); see Engine.scheduler."""
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch: must be a positive int, got {max_batch!r}")
        if not isinstance(max_waiting, int) or max_waiting < 0:
            raise ValueError(f"max_waiting: must be an int >= 0, got {max_waiting!r}")
        self.engine, self.max_batch, self.max_waiting, self.device_bytes = engine, max_batch, max_waiting, device_bytes
        self.device_pages, self.host_bytes = device_pages, host_bytes
        self._lock = threading.Condition()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self.active: list[Sequence] = []
        self._thread: threading.Thread | None = None
        self._stop = False
        self.steps = 0
        self.largest_batch = 0  # most requests one decode pass has carried
        self._groups: dict[int, list[_Group]] = {}  # static path: context key -> its decoding groups

    # ---------------------------------------------------------------- any thread
    def submit(self, prompt, params: SamplingParams | None = None, context: Context | None = None,
               sink: Sink | None = None, on_done: Callable[[], None] | None = None) -> Sequence:
        """Validate and queue a request. Raises ValueError for bad input or a request that
        can never fit the device budget, SchedulerFull when the queue is full. Its text
        pieces and final GenerationOutput (or an Exception) go to `sink`, else to the
        returned sequence's items; `on_done` runs once the scheduler has let go of it
        (finished, failed or cancelled), e.g. to release the context it reads."""
        seq = self.engine._sequence(prompt, params, context, sink, on_done)
        if self.device_bytes is not None and seq.device_bytes > self.device_bytes:
            raise ValueError(f"request: its KV state needs {seq.device_bytes / 2**20:.0f} MiB of device memory, "
                             f"over this scheduler's budget of {self.device_bytes / 2**20:.0f} MiB")
        if self.host_bytes is not None and seq.host_bytes > self.host_bytes:
            raise ValueError(f"request: indexing its {len(seq.prompt_ids)}-token prompt needs up to "
                             f"{seq.host_bytes / 2**20:.0f} MiB of host memory, over this scheduler's budget of "
                             f"{self.host_bytes / 2**20:.0f} MiB")
        with self._lock:
            if len(self._waiting) >= self.max_waiting:
                raise SchedulerFull(f"{len(self._waiting)} requests are already waiting; try again later")
            self._waiting.append(seq)
            self._lock.notify()
        return seq

    def start(self) -> None:
        """Drive steps from a daemon thread until stop()."""
        self._thread = threading.Thread(target=self._run, name="icecache-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._stop and not self.active and not self._waiting:
                    self._lock.wait()
                if self._stop:
                    return
            self.step()

    # ---------------------------------------------------------------- the driver
    @property
    def has_work(self) -> bool:
        return bool(self.active or self._waiting)

    def _admit(self) -> None:
        with self._lock:
            contexts = {s.context_key for s in self.active}
            used = sum(s.device_bytes - s.context_bytes for s in self.active)
            used += sum(s.context_bytes for s in {s.context_key: s for s in self.active}.values())
            host = sum(s.host_bytes for s in self.active)
            while self._waiting and len(self.active) < self.max_batch:
                seq = self._waiting[0]
                need = seq.device_bytes - (seq.context_bytes if seq.context_key in contexts else 0)
                if self.active and (self.device_bytes is not None and used + need > self.device_bytes
                                    or self.host_bytes is not None and host + seq.host_bytes > self.host_bytes):
                    break  # FIFO: wait for memory rather than let later, smaller requests pass
                self._waiting.popleft()
                if seq.cancelled:
                    seq.release()
                    continue
                self.active.append(seq)
                contexts.add(seq.context_key)
                used += need
                host += seq.host_bytes

    @torch.inference_mode()
    def step(self) -> None:
        """Admit, prefill up to one chunk of tokens, then decode one token for every decoding request."""
        self._admit()
        self.steps += 1
        for seq in self.active:
            if seq.cancelled:
                seq.release()
        self.active = [s for s in self.active if not s.done]
        try:
            budget = self.engine.config.prefill_chunk_tokens  # prefill tokens per step, oldest first
            for seq in self.active:
                if budget <= 0:
                    break
                if seq.phase in ("index", "prompt"):
                    budget -= self._guard(seq, lambda: seq.prefill_chunk(budget)) or budget
            feeding: list[tuple[Sequence, int]] = []
            for seq in self.active:
                if seq.done:
                    continue
                if seq.phase == "start":
                    self._guard(seq, lambda: seq.start_decode(self._group_for(seq)))
                if seq.phase == "decode" and not seq.done:
                    token = self._guard(seq, seq.next_token)
                    if token is not None:
                        feeding.append((seq, token))
            self._decode(feeding)
        finally:
            self.active = [s for s in self.active if not s.done]

    def _guard(self, seq: Sequence, fn):
        """Run one request's part of the step; an error ends that request, not the others."""
        try:
            return fn()
        except Exception as e:  # the request fails with its error; the rest of the batch goes on
            seq._emit(e)
            seq.release()
            return None

    def _group_for(self, seq: Sequence) -> _Group | None:
        """Static path: a group on seq's context with a free slot that fits it (a new one,
        with max_batch slots, if none has). None on the dynamic path."""
        if not self.engine._static():
            return None
        groups = self._groups.setdefault(seq.context_key, [])
        for group in groups:
            if group.fits(seq):
                return group
        slot_tokens = -(-seq.slot_tokens // _SLOT_TOKENS) * _SLOT_TOKENS
        eng = self.engine
        decoder = StaticDecoder(eng.model, eng.config, seq.context, slots=self.max_batch, slot_tokens=slot_tokens,
                                device_pages=self.device_pages)
        group = _Group(decoder, lambda g, key=seq.context_key: self._drop_group(key, g))
        groups.append(group)
        return group

    def _drop_group(self, key: int, group: _Group) -> None:
        self._groups[key].remove(group)
        if not self._groups[key]:
            del self._groups[key]

    def _count_batch(self, seqs: list[Sequence]) -> None:
        """Record that one decode pass carries `seqs` together."""
        self.largest_batch = max(self.largest_batch, len(seqs))
        for seq in seqs:
            seq.peak_batch = max(seq.peak_batch, len(seqs))

    def _decode(self, feeding: list[tuple[Sequence, int]]) -> None:
        if not feeding:
            return
        eng = self.engine
        if eng._static():
            tokens = dict(feeding)
            for group in {id(s.group): s.group for s, _ in feeding}.values():
                self._count_batch(group.seqs)
                try:
                    group.step(tokens)
                except Exception as e:  # the pass failed for the whole group
                    for seq in list(group.seqs):
                        seq._emit(e)
                        seq.release()
        else:
            self._count_batch([seq for seq, _ in feeding])
            batch = StepBatch([seq.req for seq, _ in feeding])
            ids = torch.tensor([[token] for _, token in feeding])
            pos = torch.tensor([[seq.position] for seq, _ in feeding])
            try:
                logits = eng._forward(batch, ids, pos)  # [B, vocab]: one pass, weights read once
            except Exception as e:  # the pass failed for all of them
                for seq, _ in feeding:
                    seq._emit(e)
                    seq.release()
                return
            for b, (seq, _) in enumerate(feeding):
                seq.logits = logits[b]
                seq.position += 1
        if eng.device.type == "cuda":
            torch.cuda.synchronize()
