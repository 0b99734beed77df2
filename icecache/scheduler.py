"""Continuous batching: requests join and leave between decode steps.

One thread drives the model (the caller's own loop, or the thread start() runs); other
threads only queue work: submit() a request, submit_index() a document, call() anything
else that must touch the device (e.g. writing a context into shared memory).

A step, in order:
1. queued calls run;
2. a document being indexed (submit_index, or a prompt without a context) prefills one
   pass of `index_chunk_tokens`, and once whole is built into a Context on the device;
3. questions on indexed contexts prefill: the waiting prompts of one context are packed
   into one forward pass (up to `prefill_chunk_tokens` in all), so the context's KV is read
   once for all of them (runner.ContextReader);
4. one decode token for every decoding request. On the dynamic path (CPU) that is a single
   forward pass over all of them. On the static path (CUDA graphs) the requests on one
   context decode together in one StaticDecoder (a group), and the groups of every context
   decoding share one pass through the model (static_decode.JointStep): the weights are
   read once a step however many documents are being asked about.

Device state of a context: a group whose requests have all left stays, idle, with its
context's dense KV, tree plans and CUDA graphs, and the next request on that context
takes it up: nothing is copied, planned or captured again. Idle groups are freed least
recently used first when admission needs their memory, past `keep_idle` of them, or when
the context is forgotten (forget()).

Admission: at most `max_batch` requests are in flight and their estimated device bytes
(plus the idle groups') stay under `device_bytes` (a context's device state counted once,
however many requests share it), and the contexts that prompts without one build on the
host stay under `host_bytes`; the rest wait in FIFO order. A request that could never fit
is refused at submit() with a ValueError that says why, and a full waiting queue raises
SchedulerFull. Cancelling a request frees its state at the next step.

If a step fails outside any one request (the device itself, say), every request in
flight gets the error, the thread stops, and `alive` turns False (a replica's health
check reads it); later submissions are refused with SchedulerDead.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import TYPE_CHECKING

import torch

from icecache.cache import StepBatch
from icecache.config import SamplingParams
from icecache.context import Context
from icecache.sequence import DecodeGroup, IndexJob, OnItem, Sequence
from icecache.static_decode import JointStep, StaticDecoder

if TYPE_CHECKING:
    from icecache.engine import Engine

log = logging.getLogger(__name__)

_SLOT_TOKENS = 512  # a group's slots hold a multiple of this many own tokens (prompt + decoded)
BURST_GAP_S = 0.005  # a burst of arrivals is over once none has come for this long


class SchedulerFull(RuntimeError):
    """The waiting queue is full; the request was not taken (try again later)."""


class SchedulerDead(RuntimeError):
    """The scheduler's thread has stopped after a failed step; nothing more runs here."""


class Scheduler:
    """Runs many requests on one engine with continuous batching (see the module doc)."""

    def __init__(self, engine: "Engine", max_batch: int = 32, max_waiting: int = 1024,
                 device_bytes: int | None = None, device_pages: bool = False, host_bytes: int | None = None,
                 keep_idle: int = 8, burst_wait_s: float = 0.0) -> None:
        """device_bytes: the KV budget of admitted requests and idle groups (None = no
        limit); device_pages: a group copies its document's pages into GPU memory (see
        StaticDecoder); host_bytes: the budget of the contexts that admitted prompts without
        one build (None = no limit); keep_idle: idle groups kept at most; burst_wait_s: how
        long an idle scheduler may gather a burst of requests before its first pass; see
        Engine.scheduler."""
        if not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch: must be a positive int, got {max_batch!r}")
        if not isinstance(max_waiting, int) or max_waiting < 0:
            raise ValueError(f"max_waiting: must be an int >= 0, got {max_waiting!r}")
        if not isinstance(keep_idle, int) or keep_idle < 0:
            raise ValueError(f"keep_idle: must be an int >= 0, got {keep_idle!r}")
        if not isinstance(burst_wait_s, (int, float)) or not 0 <= burst_wait_s <= 1:
            raise ValueError(f"burst_wait_s: must be a number of seconds in [0, 1], got {burst_wait_s!r}")
        self.engine, self.runner = engine, engine.runner
        self.max_batch, self.max_waiting, self.device_bytes = max_batch, max_waiting, device_bytes
        self.device_pages, self.host_bytes, self.keep_idle = device_pages, host_bytes, keep_idle
        self.burst_wait_s = float(burst_wait_s)
        self._lock = threading.Condition()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._calls: collections.deque[tuple[Callable[[], object], Future]] = collections.deque()
        self._jobs: collections.deque[IndexJob] = collections.deque()  # submit_index, oldest first
        self.active: list[Sequence] = []
        self._thread: threading.Thread | None = None
        self._stop = False
        self.error: BaseException | None = None  # what stopped the thread
        self.steps = 0
        self.largest_batch = 0  # most requests one decode pass has carried
        self._groups: dict[int, list[DecodeGroup]] = {}  # static path: context uid -> its groups, busy or idle
        self._idle: collections.OrderedDict[DecodeGroup, None] = collections.OrderedDict()  # least recently used first
        self._joint = JointStep()  # one pass for the groups of several contexts

    # ---------------------------------------------------------------- any thread
    def submit(self, prompt, params: SamplingParams | None = None, context: Context | None = None,
               on_item: OnItem | None = None, on_done: Callable[[], None] | None = None,
               arrived: float | None = None) -> Sequence:
        """Validate and queue a request. Raises ValueError for bad input or a request that
        can never fit the device budget, SchedulerFull when the queue is full, SchedulerDead
        after a failed step. Its text pieces and final GenerationOutput (or an Exception) go
        to `on_item`, else to the returned sequence's items; `on_done` runs once the scheduler
        has let go of it (finished, failed or cancelled), e.g. to release the context it
        reads. `arrived` (perf_counter) is when the request reached the server: its TTFT
        counts from then (default: now)."""
        ids, params, context = self.engine.validate(prompt, params, context)
        seq = Sequence(self.engine, params, context, ids, on_item, on_done, arrived)
        if self.device_bytes is not None and seq.device_bytes > self.device_bytes:
            raise ValueError(f"request: its KV state needs {seq.device_bytes / 2**20:.0f} MiB of device memory, "
                             f"over this scheduler's budget of {self.device_bytes / 2**20:.0f} MiB")
        if self.host_bytes is not None and seq.host_bytes > self.host_bytes:
            raise ValueError(f"request: indexing its {len(seq.prompt_ids)}-token prompt needs up to "
                             f"{seq.host_bytes / 2**20:.0f} MiB of host memory, over this scheduler's budget of "
                             f"{self.host_bytes / 2**20:.0f} MiB")
        with self._lock:
            self._check_alive()
            if len(self._waiting) >= self.max_waiting:
                raise SchedulerFull(f"{len(self._waiting)} requests are already waiting; try again later")
            self._waiting.append(seq)
            self._lock.notify()
        return seq

    def submit_index(self, ids: list[int], on_done: Callable[[object], None], on_device: bool = True) -> IndexJob:
        """Queue a document (validated token ids, Engine.tokenize) to prefill and index in
        the driver thread, a pass per step between decode steps. on_done(Context | Exception)
        runs in the driver thread; with on_device the context's pages are left on the GPU
        (for the caller to write elsewhere, then drop)."""
        job = IndexJob(ids, on_done, on_device)
        with self._lock:
            self._check_alive()
            self._jobs.append(job)
            self._lock.notify()
        return job

    def call(self, fn: Callable[[], object]) -> Future:
        """Run fn in the driver thread before the next step; its result or exception
        comes back through the Future."""
        future: Future = Future()
        with self._lock:
            self._check_alive()
            self._calls.append((fn, future))
            self._lock.notify()
        return future

    def forget(self, context: Context) -> Future:
        """Free the idle device state kept for `context` (before its memory goes away);
        done in the driver thread, the Future resolves once it is."""
        def drop() -> None:
            for group in [g for g in self._groups.get(context.uid, []) if g in self._idle]:
                self._free(group)
            self.runner.forget(context)
        return self.call(drop)

    def _check_alive(self) -> None:
        if self.error is not None:
            raise SchedulerDead(f"the scheduler stopped after a failed step: {self.error!r}")

    @property
    def alive(self) -> bool:
        """False once a failed step has stopped the driver thread (or it was never started)."""
        return self.error is None and self._thread is not None and self._thread.is_alive()

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
        try:
            while True:
                with self._lock:
                    idle = not self._stop and not self.has_work
                if idle and self.capture_idle():  # one graph recorded; look for work again
                    continue
                with self._lock:
                    while not self._stop and not self.has_work:
                        self._lock.wait()
                    if self._stop:
                        return
                    if idle:
                        self._gather_burst()
                self.step()
        except BaseException as e:  # the device or the scheduler itself: nothing here can go on
            log.exception("scheduler step failed; failing every request in flight")
            with self._lock:
                self.error = e
            self._fail_all(SchedulerDead(f"the scheduler stopped after a failed step: {e!r}"))

    def _gather_burst(self) -> None:
        """Called with the lock held, when requests arrive at an idle scheduler: wait while
        more keep arriving (each within BURST_GAP_S of the last, burst_wait_s at most), so
        questions sent together are prefilled in one pass. Without it the first would be
        prefilled alone and the rest, arrived milliseconds later, would wait for that pass
        and a decode step before theirs."""
        deadline = time.perf_counter() + self.burst_wait_s
        seen = len(self._waiting)
        while not self._stop and seen < self.max_batch and not self._calls:
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            self._lock.wait(min(BURST_GAP_S, left))
            if len(self._waiting) == seen:  # a quiet gap: the burst is over
                return
            seen = len(self._waiting)

    def _fail_all(self, error: Exception) -> None:
        with self._lock:
            waiting, self._waiting = list(self._waiting), collections.deque()
            jobs, self._jobs = list(self._jobs), collections.deque()
            calls, self._calls = list(self._calls), collections.deque()
        for seq in [*self.active, *waiting]:
            seq.fail(error)
        for job in jobs:
            job.finish(error)
        for _, future in calls:
            future.set_exception(error)
        self.active = []

    # ---------------------------------------------------------------- the driver
    @property
    def has_work(self) -> bool:
        return bool(self.active or self._waiting or self._jobs or self._calls)

    def _admit(self) -> None:
        with self._lock:
            contexts = {s.context_key for s in self.active}
            used = sum(s.device_bytes - s.context_bytes for s in self.active)
            used += sum(s.context_bytes for s in {s.context_key: s for s in self.active}.values())
            host = sum(s.host_bytes for s in self.active)
            while self._waiting and len(self.active) < self.max_batch:
                seq = self._waiting[0]
                need = seq.device_bytes - (seq.context_bytes if seq.context_key in contexts else 0)
                if self.device_bytes is not None:  # idle groups make room first, least recently used first
                    while self._idle and used + need + self._idle_bytes() > self.device_bytes:
                        self._free(next(iter(self._idle)))
                if self.active and (self.device_bytes is not None and used + need > self.device_bytes
                                    or self.host_bytes is not None and host + seq.host_bytes > self.host_bytes):
                    break  # FIFO: wait for memory rather than let later, smaller requests pass
                self._waiting.popleft()
                if seq.cancelled:
                    seq.release()
                    continue
                self.active.append(seq)
                seq.admitted = time.perf_counter()
                contexts.add(seq.context_key)
                used += need
                host += seq.host_bytes

    @torch.inference_mode()
    def step(self) -> None:
        """Run queued calls, admit, prefill (a document pass, then packed questions), then
        decode one token for every decoding request."""
        self._run_calls()
        self._admit()
        self.steps += 1
        for seq in self.active:
            if seq.cancelled:
                seq.release()
        self.active = [s for s in self.active if not s.done]
        try:
            self._index_pass()
            self._prefill_prompts()
            feeding: list[tuple[Sequence, int]] = []
            for seq in self.active:
                if seq.phase == "decode" and not seq.done:
                    token = self._guard([seq], seq.next_token)
                    if token is not None:
                        feeding.append((seq, token))
            starting = [s for s in self.active if s.phase == "start" and not s.done]
            first = {seq: self._guard([seq], seq.first_token) for seq in starting}  # every first token out, then
            for seq, token in first.items():  # the slots load
                if token is not None and not seq.done:
                    self._guard([seq], lambda: seq.start_decode(self._group_for(seq)))
                    if not seq.done:
                        feeding.append((seq, token))
            self._decode(feeding)
        finally:
            self.active = [s for s in self.active if not s.done]

    def capture_idle(self) -> bool:
        """With nothing to run: record one CUDA graph a group has run eagerly (a batch size a
        burst passed through). -> whether one was recorded."""
        groups = [g for gs in self._groups.values() for g in gs]
        return any(g.decoder.capture_pending() for g in reversed(groups))

    def _run_calls(self) -> None:
        while True:
            with self._lock:
                if not self._calls:
                    return
                fn, future = self._calls.popleft()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except Exception as e:  # the caller's error, handed back to the caller
                    future.set_exception(e)

    def _guard(self, seqs: list[Sequence], fn):
        """Run some requests' part of the step; an error ends those requests, not the others."""
        try:
            return fn()
        except Exception as e:  # the requests fail with the error; the rest of the batch goes on
            log.warning("%d request(s) failed: %r", len(seqs), e, exc_info=not isinstance(e, ValueError))
            for seq in seqs:
                seq.fail(e)
            return None

    def _index_pass(self) -> None:
        """One prefill pass of the oldest document being indexed (submit_index jobs first,
        then prompts without a context); building its index once it is whole."""
        with self._lock:
            job = self._jobs[0] if self._jobs else None
        if job is not None:  # a submitted document: its context, or its error, goes to its caller
            try:
                ctx = job.run_pass(self.runner)
            except Exception as e:  # this document fails; the scheduler goes on
                log.warning("indexing a %d-token document failed: %r", len(job.ids), e)
                ctx = e
            if ctx is not None:
                with self._lock:
                    self._jobs.popleft()
                job.finish(ctx)
            return
        seq = next((s for s in self.active if s.phase == "index" and not s.done), None)
        if seq is not None:  # a prompt indexed for its own request: an error ends that request

            def index_pass() -> None:
                ctx = seq.job.run_pass(self.runner)
                if ctx is not None:
                    seq.job.finish(ctx)
            self._guard([seq], index_pass)

    def _prefill_prompts(self) -> None:
        """Prefill waiting questions: the oldest prompts, on any contexts, packed into one
        pass up to prefill_chunk_tokens in all (a longer prompt continues at the next step)."""
        budget = self.engine.config.prefill_chunk_tokens
        pack: list[tuple[Sequence, list[int]]] = []
        for seq in self.active:
            if budget <= 0:
                break
            if seq.phase == "prompt" and not seq.done:
                chunk = seq.pending[:budget]
                pack.append((seq, chunk))
                budget -= len(chunk)
        if not pack:
            return
        members = [s for s, _ in pack]
        scored = {i for i, s in enumerate(members) if s.prompt_logprobs is not None}  # every row's logits too
        started = time.perf_counter()
        out = self._guard(members, lambda: self.runner.prefill_rows(
            [s.req for s in members], [c for _, c in pack], [s.next_pos for s in members], scored))
        if out is None:
            return
        logits, rows = out
        for i in scored:
            seq = members[i]
            self._guard([seq], lambda: seq.score_prompt(len(seq.own_ids) - len(seq.pending), rows[i]))
        ready = []
        for i, (seq, chunk) in enumerate(pack):
            if seq.done:  # its scoring failed
                continue
            seq.pending = seq.pending[len(chunk):]
            seq.next_pos += len(chunk)
            if not seq.pending:
                seq.logits, seq.phase = logits[i], "start"
                ready.append((i, seq))
        greedy = [(i, seq) for i, seq in ready if seq.params.temperature == 0.0]
        if greedy:  # the pack's greedy first tokens picked on the device: one copy, one sync
            picks = logits[[i for i, _ in greedy]].argmax(-1).tolist()
            for (_, seq), token in zip(greedy, picks):
                seq.chosen = token
        for seq in members:  # through the picks' sync: the pass's device time when any request is greedy
            seq.prefill_batch, seq.prefill_pass_s = len(members), time.perf_counter() - started

    # ---------------------------------------------------------------- device state of contexts
    def _group_for(self, seq: Sequence) -> DecodeGroup | None:
        """Static path: a group on seq's context with a free slot that fits it (an idle one
        first, else a new one with max_batch slots). None on the dynamic path."""
        if not self.engine.static_decode:
            return None
        groups = self._groups.setdefault(seq.context_key, [])
        for group in sorted(groups, key=lambda g: g not in self._idle):  # busy groups first: fuller batches
            if group.fits(seq):
                self._idle.pop(group, None)
                if self.runner.resident is not None:  # the context may have been made resident since
                    group.decoder.read_resident(self.runner.resident)
                return group
        slot_tokens = -(-seq.slot_tokens // _SLOT_TOKENS) * _SLOT_TOKENS
        eng = self.engine
        decoder = StaticDecoder(eng.model, eng.config, seq.context, slots=self.max_batch, slot_tokens=slot_tokens,
                                device_pages=self.device_pages, resident=self.runner.resident)
        group = DecodeGroup(decoder, seq.context_key, self._park)
        groups.append(group)
        return group

    def _park(self, group: DecodeGroup) -> None:
        """A group whose requests have all left: kept idle for its context's next requests
        (counted by what it holds at each admission: e.g. its questions' keys go while it
        reads a resident copy, and come back when the copy is evicted)."""
        self._idle[group] = None
        while len(self._idle) > self.keep_idle:
            self._free(next(iter(self._idle)))

    def _free(self, group: DecodeGroup) -> None:
        self._idle.pop(group, None)
        self._joint.forget(group.decoder)
        groups = self._groups[group.key]
        groups.remove(group)
        if not groups:
            del self._groups[group.key]

    def _idle_bytes(self) -> int:
        return sum(g.device_bytes for g in self._idle)

    @property
    def idle_groups(self) -> int:
        """Groups kept with no request (their contexts' device state, ready for the next)."""
        return len(self._idle)

    def _count_batch(self, seqs: list[Sequence]) -> None:
        """Record that one decode pass carries `seqs` together."""
        self.largest_batch = max(self.largest_batch, len(seqs))
        for seq in seqs:
            seq.peak_batch = max(seq.peak_batch, len(seqs))

    def _decode(self, feeding: list[tuple[Sequence, int]]) -> None:
        if not feeding:
            return
        if self.engine.static_decode:
            tokens = dict(feeding)
            groups = list({id(s.group): s.group for s, _ in feeding}.values())
            seqs = [s for g in groups for s in g.seqs]
            self._count_batch(seqs)
            started = time.perf_counter()  # one pass through the model for every context's group
            graph = self.engine.device.type == "cuda"
            out = self._guard(seqs, lambda: self._joint.step([(g.decoder, *g.inputs(tokens)) for g in groups],
                                                             graph=graph))
            for group, logits in zip(groups, out or []):
                self._guard(list(group.seqs), lambda: group.take(logits, started))
        else:
            seqs = [seq for seq, _ in feeding]
            self._count_batch(seqs)
            batch = StepBatch([seq.req for seq in seqs])
            ids = torch.tensor([[token] for _, token in feeding])
            pos = torch.tensor([[seq.position] for seq in seqs])
            logits = self._guard(seqs, lambda: self.runner.forward(batch, ids, pos))  # one pass, weights read once
            if logits is None:
                return
            for b, seq in enumerate(seqs):
                seq.logits = logits[b]
                seq.position += 1
        if self.engine.device.type == "cuda":
            torch.cuda.synchronize()
