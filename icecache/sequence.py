"""What the scheduler drives: a document being indexed (IndexJob), a request in flight
(Sequence: its phase, KV state, sampling state and output so far), and the requests
decoding together on one context (DecodeGroup, the static path's batch)."""

from __future__ import annotations

import collections
import logging
import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from icecache.cache import RequestKV
from icecache.config import SamplingParams
from icecache.context import Context
from icecache.outputs import GenerationOutput, TextPiece, TokenLogprob
from icecache.sampling import TextStream, make_generator, rows_logprobs, sample, token_logprob
from icecache.static_decode import StaticDecoder

if TYPE_CHECKING:
    from icecache.engine import Engine
    from icecache.runner import ModelRunner

log = logging.getLogger(__name__)

OnItem = Callable[[object], None]  # receives text pieces (str), then a GenerationOutput, or an Exception


class IndexJob:
    """A document being prefilled and indexed a pass at a time: inside the scheduler, one
    pass per step, or all at once by Engine.index_ids. on_done receives the Context (pages
    on the device if on_device) or the Exception."""

    def __init__(self, ids: list[int], on_done: Callable[[object], None], on_device: bool,
                 score: Callable[[int, torch.Tensor], None] | None = None,
                 progress: Callable[[int, int], None] | None = None) -> None:
        """score: called with (first token's index, logits after each token [n, vocab]) for
        every pass, where the document's tokens are scored (a prompt's prompt_logprobs).
        progress: called with (tokens done, tokens total) after every pass."""
        self.ids, self.on_done, self.on_device, self.score = ids, on_done, on_device, score
        self.progress = progress
        self.req: RequestKV | None = None  # allocated at the first pass
        self.done_tokens = 0
        self.started = 0.0
        self.finished = False

    def run_pass(self, runner: "ModelRunner") -> Context | None:
        """Prefill the next pass; the built Context once the document is whole, else None.
        A document whose prefill on the device runs out of memory starts again in host memory."""
        try:
            return self._next_pass(runner)
        except torch.OutOfMemoryError:
            if self.score is not None or not runner.retries_offloaded(self.req):
                raise
        self.req = None  # out of the handler: the failed passes' tensors are free now
        self.req, self.done_tokens = runner.offloaded_request(len(self.ids)), 0
        return None

    def _next_pass(self, runner: "ModelRunner") -> Context | None:
        if self.req is None:
            self.started = time.perf_counter()
            self.req = runner.document_request(len(self.ids))
        chunk = runner.chunk_tokens(self.req)
        if self.score is not None:  # passes a prompt's size: their every row's logits at once
            chunk = min(chunk, runner.config.prefill_chunk_tokens)
        piece = self.ids[self.done_tokens:self.done_tokens + chunk]
        last, rows = runner.prefill_rows([self.req], [piece], [self.done_tokens], (0,) if self.score else ())
        logits = last[0]
        if self.score is not None:
            self.score(self.done_tokens, rows[0])
        self.done_tokens += len(piece)
        if self.progress:
            self.progress(self.done_tokens, len(self.ids))
        if self.done_tokens < len(self.ids):
            return None
        return runner.build_context(self.req, self.ids, logits, self.started, self.on_device)

    def finish(self, result) -> None:
        if not self.finished:
            self.finished = True
            self.req = None
            self.on_done(result)


class Sequence:
    """One request in flight: its phase, KV state, sampling state and output so far."""

    def __init__(self, engine: "Engine", params: SamplingParams, context: Context | None, prompt_ids: list[int],
                 on_item: OnItem | None, on_done: Callable[[], None] | None = None, arrived: float | None = None) -> None:
        self.engine, self.params, self.context = engine, params, context
        self.on_item, self.on_done = on_item, on_done
        self.items: collections.deque = collections.deque()  # when there is no on_item
        self.t0 = arrived if arrived is not None else time.perf_counter()
        self.admitted: float | None = None  # when it left the waiting queue
        self.prompt_ids = prompt_ids
        self.reused = context is not None
        self.job: IndexJob | None = None
        # SamplingParams.prompt_logprobs: one per prompt token, filled as its passes run
        self.prompt_logprobs: list[TokenLogprob] | None = None
        if params.prompt_logprobs is not None:
            self.prompt_logprobs = [] if context is not None else [TokenLogprob(prompt_ids[0], None, [])]
            if context is not None and prompt_ids:  # its first token, given the context
                self.prompt_logprobs += rows_logprobs(context.last_logits[None], prompt_ids[:1],
                                                      params.prompt_logprobs)
        if context is None and params.max_tokens == 0:  # a prompt only scored: prefilled, no index built
            self.phase, self.own_ids, self.pending = "prompt", prompt_ids, list(prompt_ids)
            self.req = RequestKV(engine.shape, engine.config, None)
            self.next_pos = 0
        elif context is None:  # the prompt itself is indexed, then decoded from
            self.phase, self.own_ids, self.pending = "index", [], []
            self.job = IndexJob(prompt_ids, self._indexed, on_device=False,
                                score=self.score_prompt if params.prompt_logprobs is not None else None)
            self.req = None
            self.next_pos = len(prompt_ids)
        else:  # the prompt continues an indexed context
            self.phase, self.own_ids, self.pending = "prompt", prompt_ids, list(prompt_ids)
            self.req = RequestKV(engine.shape, engine.config, context)
            self.next_pos = context.num_tokens
        self.logits: torch.Tensor | None = None
        self.chosen: int | None = None  # a token already picked on the device (greedy), else sample logits
        if context is not None and not self.pending:  # nothing to prefill: decode from the context's last logits
            self.logits, self.phase = context.last_logits, "start"
        self.group: DecodeGroup | None = None  # static path: the batch it decodes in
        self.position = 0
        self.generator = make_generator(params)
        self.text = TextStream(engine.tokenizer, params.stop, engine.tokenizer_lock)
        self.eos = set() if params.ignore_eos else engine.eos_ids()
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.logprobs_sent = 0  # of them, handed out with text pieces
        self.prompt_shown = False  # whether prompt_logprobs went out with a text piece
        self.step_times: list[float] = []
        self.pass_times: list[float] = []  # its decode group's passes (static path): TPOT less the scheduler's own time
        self.ttft: float | None = None
        self.last_token_at = 0.0
        self.finish = "length"
        self.peak_batch = 0  # most requests one decode pass carried along with this one
        self.prefill_batch = 0  # questions prefilled in the pass that finished this one's prompt
        self.prefill_pass_s = 0.0  # that pass's time
        self.done = False
        self.cancelled = False
        context_tokens = context.num_tokens if context else len(prompt_ids)
        self.device_bytes = engine.request_device_bytes(context_tokens, len(self.own_ids), params.max_tokens)
        self.context_bytes = engine.context_device_bytes(context_tokens)  # of device_bytes, shareable
        self.host_bytes = engine.context_host_bytes(len(prompt_ids)) if self.job is not None else 0  # its index

    def score_prompt(self, start: int, logits: torch.Tensor) -> None:
        """The logits after prompt tokens start, start + 1, ... [n, vocab]: the log-probabilities
        of the prompt tokens they predict (the last prompt token's predict the output)."""
        after = self.prompt_ids[start + 1:start + 1 + logits.shape[0]]
        if after:
            self.prompt_logprobs += rows_logprobs(logits[:len(after)], after, self.params.prompt_logprobs)

    def _indexed(self, result: Context) -> None:
        """The prompt's own index is built (a failure ends the request before this)."""
        self.context = result
        self.req = RequestKV(self.engine.shape, self.engine.config, result)
        self.logits, self.phase = result.last_logits, "start"

    @property
    def slot_tokens(self) -> int:
        """Own tokens a decoder slot must hold for this request: prompt, output, and one spare."""
        return len(self.own_ids) + self.params.max_tokens + 1

    @property
    def context_key(self) -> int:
        """Requests with the same key share their context's device state."""
        return self.context.uid if self.context is not None else -id(self)

    # ---------------------------------------------------------------- output
    def emit(self, item) -> None:
        """Hand a text piece, the final output or an Exception to the request's consumer."""
        if self.on_item is not None:
            self.on_item(item)
        else:
            self.items.append(item)

    def emit_text(self, piece: str) -> None:
        """A text piece; where log-probabilities were asked, with those of its tokens (and the
        first piece with the prompt's, where prompt_logprobs asked: scored by then)."""
        logprobs = prompt = None
        if self.logprobs is not None:
            logprobs = self.logprobs[self.logprobs_sent:]
            self.logprobs_sent = len(self.logprobs)
        if self.prompt_logprobs is not None and not self.prompt_shown:
            prompt, self.prompt_shown = self.prompt_logprobs, True
        if logprobs is not None or prompt is not None:
            piece = TextPiece(piece, logprobs, prompt)
        self.emit(piece)

    def fail(self, error: Exception) -> None:
        """End the request with `error` (its consumer gets it) and free its state."""
        if not self.done:
            self.emit(error)
            self.release()

    def cancel(self) -> None:
        """Stop at the next step; the request's memory is freed then."""
        self.cancelled = True

    # ---------------------------------------------------------------- phases
    def first_token(self) -> int | None:
        """The first output token, from the prefill's logits: handed out before the request
        takes its decode slot (loading a slot is no part of the time to first token)."""
        if self.params.max_tokens == 0:  # a prompt scored, nothing to generate
            self.ttft = time.perf_counter() - self.t0
            return self._finish()
        self.position = self.context.num_tokens + len(self.own_ids)
        return self.next_token()

    def start_decode(self, group: "DecodeGroup | None") -> None:
        """Into the decode phase: on the static path in a slot of `group`."""
        if group is not None:
            group.add(self, [(kv.k, kv.v) for kv in self.req.own])
            self.req.own = None  # the decoder holds its own copies
        else:
            self.req.start_decode()
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
        forced, taken = self.params.force_tokens, len(self.text.ids)  # every output token so far is in text.ids
        if taken < len(forced):
            token = forced[taken]
        elif self.chosen is not None:
            token = self.chosen
        else:
            token = sample(self.logits, self.params, self.generator)
        self.chosen = None
        if token in self.eos:
            self.finish = "eos"
            return self._finish()
        if self.logprobs is not None:
            self.logprobs.append(token_logprob(self.logits, token, self.params.logprobs))
        piece = self.text.add(token)
        if piece:
            self.emit_text(piece)
        if self.text.stopped:
            self.finish = "stop"
            return self._finish()
        if len(self.text.ids) >= self.params.max_tokens or self.position >= self.engine.max_context_tokens:
            return self._finish()
        return token

    def _finish(self) -> None:  # returns None: no token to feed
        tail = self.text.flush()
        if tail:
            self.emit_text(tail)
        steps = len(self.step_times)
        if self.group is not None and steps:  # every selected page is gathered each step
            self.req.pages_loaded = self.req.pages_selected = self.group.pages_per_step(self) * steps
        ctx, n = self.context, max(1, steps)
        self.emit(GenerationOutput(
            text=self.text.text, token_ids=list(self.text.ids), finish_reason=self.finish, logprobs=self.logprobs,
            prompt_logprobs=self.prompt_logprobs, stats={
                "ttft_s": self.ttft,
                "queue_s": (self.admitted or self.t0) - self.t0,  # arrival to admission
                "tpot_s": sum(self.step_times) / n if steps else 0.0,
                # steady state: the first steps include warm-up (kernel compiles, CUDA graph capture)
                "tpot_median_s": statistics.median(self.step_times) if steps else 0.0,
                # the median decode pass of its batch (static path; 0 on the dynamic one): what of
                # tpot_median_s the model took, the rest is the scheduler's and its process's time
                "decode_pass_s": statistics.median(self.pass_times) if self.pass_times else 0.0,
                "context_tokens": ctx.num_tokens if ctx is not None else 0,  # none: a prompt only scored
                "prompt_tokens": len(self.own_ids),
                "output_tokens": len(self.text.ids),
                "context_reused": self.reused,
                "prefill_s": ctx.prefill_s if ctx is not None and not self.reused else None,
                "index_build_s": ctx.build_s if ctx is not None and not self.reused else None,
                "pages_loaded": self.req.pages_loaded,
                # pages read, and pages attended, per output token, summed over sparse layers and KV
                # heads. The dynamic path counts every step; the static path (GPU) counts its last step's
                # pages (one host sync per request) times the steps, an estimate that grows with the
                # private pages, so the two paths differ slightly for the same tokens
                "pages_loaded_per_token": self.req.pages_loaded / n,
                "pages_selected_per_token": self.req.pages_selected / n,
                "host_bytes": ctx.host_bytes if ctx is not None else 0,
                "mode": self.engine.config.mode,
                "peak_batch": self.peak_batch,
                "prefill_batch": self.prefill_batch,
                "prefill_pass_s": self.prefill_pass_s,
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
        self.req = self.group = self.logits = self.job = None
        if self.on_done is not None:
            self.on_done()


class DecodeGroup:
    """Requests decoding together on one context: a batched StaticDecoder whose slot i
    holds seqs[i]. A leaving request's slot takes the last one's, so slots stay dense."""

    def __init__(self, decoder: StaticDecoder, key: int, on_empty: Callable[["DecodeGroup"], None]) -> None:
        self.decoder, self.key, self.on_empty = decoder, key, on_empty
        self.seqs: list[Sequence] = []

    @property
    def device_bytes(self) -> int:
        """What its decoder holds on the device now (it changes as a resident copy of the
        context comes or goes)."""
        return self.decoder.device_bytes()

    def fits(self, seq: Sequence) -> bool:
        return len(self.seqs) < self.decoder.slots and seq.slot_tokens <= self.decoder.slot_tokens

    def add(self, seq: Sequence, own_kv: list) -> None:
        self.decoder.load(len(self.seqs), own_kv, seq.params.max_tokens, seq.req.question_pages)
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

    def inputs(self, tokens: dict[Sequence, int]) -> tuple[list[int], list[int]]:
        """The next tokens and positions of the group's requests, slot by slot."""
        return [tokens[s] for s in self.seqs], [s.position for s in self.seqs]

    def take(self, logits: torch.Tensor, started: float) -> None:
        """The step's logits [B, vocab] (slot by slot) to the requests: greedy picks on the
        device, otherwise the rows to the host for sampling. started: when the pass began
        (each request records the pass's time, through this read back)."""
        if any(s.params.logprobs is not None for s in self.seqs):  # their log-probabilities need the rows
            picked, logits = [None] * len(self.seqs), logits.float().cpu()
        elif all(s.params.temperature == 0.0 for s in self.seqs):  # greedy: pick on the device, copy B ids
            picked, logits = logits.argmax(-1).tolist(), [None] * len(self.seqs)
        else:  # one copy and one sync for the batch; sampling runs on the host
            picked, logits = [None] * len(self.seqs), logits.float().cpu()
        took = time.perf_counter() - started  # through the read back of the picks (or logits): the device's pass
        for b, seq in enumerate(self.seqs):
            seq.logits, seq.chosen = logits[b], picked[b]
            seq.position += 1
            seq.pass_times.append(took)
