"""The model runner: every forward pass through the transformers model, prefill included.

Prefill is exact and packed: the prompt chunks of several requests on one context run as
one sequence of one forward pass (positions per request), so the weights are read once and
the context's KV is read once per layer for all of them (`ContextReader`), however many
questions wait on it. Each chunk attends to the context, to its own request's earlier
tokens and causally to itself; the three parts are flash attentions merged by their
log-sum-exps (attention.merge_attention), so no [T, N + T] mask is ever built.

The scheduler decides what runs; this module runs it. It never imports the scheduler.
"""

from __future__ import annotations

import collections
import itertools
import logging
import time
import weakref
from collections.abc import Callable, Collection, Sequence
from typing import NamedTuple

import torch

from icecache.attention import Spans, attention_lse, attention_merged, merge_attention, packed_causal_lse
from icecache.cache import BATCH_KWARG, ModelShape, RequestKV, StepBatch
from icecache.config import OFFLOAD_CHUNK_TOKENS, IceCacheConfig
from icecache.context import Context, build_context
from icecache.decode_layers import use_kernels
from icecache.index.select import question_mass, question_pages
from icecache.model_pass import ModelPass

Progress = Callable[[int, int], None]  # (tokens done, tokens total)

log = logging.getLogger(__name__)


class ResidentContexts:
    """Whole copies of hot contexts' KV on the device, least recently used first out, under
    a byte budget. A question's prefill attends to every token of its context; with the
    context resident that costs a pass over device memory instead of reading all its host
    pages over PCIe again (4.3 GB for 32k tokens of an 8B model: ~80 ms a pass), which is
    what questions arriving one after another on one document would otherwise each pay.
    With the KV each sparse layer's token-to-page map is kept (ContextReader.token_pages),
    what a question's pages are picked by."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._kept: collections.OrderedDict[int, tuple[Resident, int]] = collections.OrderedDict()
        self._too_large: set[int] = set()  # contexts already said to be over the budget
        # decoders reading a kept copy's pages (StaticDecoder.read_resident), told before it goes
        self._readers: dict[int, weakref.WeakSet] = {}

    @property
    def used_bytes(self) -> int:
        return sum(n for _, n in self._kept.values())

    def __contains__(self, context: Context) -> bool:
        return context.uid in self._kept

    def get(self, context: Context) -> Resident | None:
        entry = self._kept.get(context.uid)
        if entry is None:
            return None
        self._kept.move_to_end(context.uid)
        return entry[0]

    def make_room(self, size: int, context: Context | None = None) -> bool:
        """Evict the least recently used copies until `size` more bytes fit; False (and no
        eviction) if size is over the whole budget (said once per context in the log: its
        questions' prefills will each read it from host memory)."""
        if size > self.budget_bytes:
            if context is not None and context.uid not in self._too_large:
                self._too_large.add(context.uid)
                log.info("a context of %d tokens (%.1f GiB) is over the device budget for resident contexts "
                         "(%.1f GiB): each question's prefill reads it from host memory", context.num_tokens,
                         size / 2**30, self.budget_bytes / 2**30)
            return False
        while self._kept and self.used_bytes + size > self.budget_bytes:
            self._drop(next(iter(self._kept)))
        return True

    def evict_oldest(self) -> int:
        """Drop the least recently used copy (its readers told first). -> its bytes, 0 if none."""
        if not self._kept:
            return 0
        uid = next(iter(self._kept))
        size = self._kept[uid][1]
        self._drop(uid)
        return size

    def put(self, context: Context, kept: Resident) -> bool:
        """Keep a context's device copy if it fits the budget, evicting the least recently
        used; False if it is larger than the whole budget."""
        size = sum(t.numel() * t.element_size() for part in kept for pair in part.values() for t in pair)
        if not self.make_room(size):
            return False
        self._kept[context.uid] = (kept, size)
        return True

    def forget(self, context: Context) -> None:
        self._drop(context.uid)
        self._too_large.discard(context.uid)

    def watch(self, context: Context, reader) -> None:
        """reader (a StaticDecoder) reads the kept copy of context: its drop_resident() runs
        before the copy is evicted or forgotten (held weakly: a freed decoder drops out)."""
        self._readers.setdefault(context.uid, weakref.WeakSet()).add(reader)

    def readers(self, context: Context) -> int:
        """Decoders reading the kept copy of context's pages now."""
        return len(self._readers.get(context.uid, ()))

    def _drop(self, uid: int) -> None:
        for reader in list(self._readers.pop(uid, ())):
            reader.drop_resident()
        self._kept.pop(uid, None)


class Resident(NamedTuple):
    """A context's copy on the device: every layer's (K, V) [H, n, D] as ContextReader.layer
    returns them, and every sparse layer's (page, position) [H, n] as token_pages does."""
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]]
    token_pages: dict[int, tuple[torch.Tensor, torch.Tensor]]


def free_device_bytes(device: torch.device) -> int:
    """CUDA memory free now, torch's cached blocks counted (after a prefill they hold its
    KV's worth: mem_get_info alone then says a 128k document's 16 GiB are taken)."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


RESIDENT_SHARE_AUTO = (0.25, 0.5)  # resident_context_share "auto": at least, at most
# prefill_offload "auto": a document is prefilled on the device when its KV and the paged copy
# built beside it take at most this share of the free device memory (the rest for the chunks'
# activations and the decode steps interleaved with its passes); one that runs out of device
# memory anyway starts again in host memory (ModelRunner.retries_offloaded)
PREFILL_DEVICE_SHARE = 0.75


def resident_bytes(tokens: int, layers: int, sparse_layers: int, kv_heads: int, head_dim: int,
                   itemsize: int) -> int:
    """What a context's resident copy takes on the device: every layer's K and V, and each
    sparse layer's token-to-page map (an int64 page and position per token and KV head)."""
    return tokens * kv_heads * (layers * 2 * head_dim * itemsize + sparse_layers * 2 * 8)


def resident_budget(share: float | str, free_bytes: int, longest_bytes: int) -> int:
    """The resident contexts' byte budget: `share` of the device memory free now; "auto" =
    the share one context of `longest_bytes` (the model's longest length) needs, within
    RESIDENT_SHARE_AUTO."""
    if share == "auto":
        low, high = RESIDENT_SHARE_AUTO
        share = min(high, max(low, 1.01 * longest_bytes / max(free_bytes, 1)))
    return int(free_bytes * share)


def resident_contexts(model: torch.nn.Module, shape: ModelShape, config: IceCacheConfig) -> ResidentContexts | None:
    """The resident contexts a runner of this config keeps: on CUDA, a budget of the device
    memory free now (config.resident_context_share); elsewhere, or at share 0, none."""
    if shape.device.type != "cuda" or config.resident_context_share == 0:
        return None
    free = free_device_bytes(shape.device)
    longest = int(model.config.max_position_embeddings)
    budget = resident_budget(config.resident_context_share, free, resident_bytes(
        longest, shape.num_layers, shape.num_layers - config.dense_layers, shape.num_kv_heads,
        shape.head_dim, shape.dtype.itemsize))
    log.info("resident contexts: up to %.1f GiB of the device (%.0f%% of the %.1f GiB free now; "
             "resident_context_share %s, the model's longest context %d tokens)", budget / 2**30,
             100 * budget / free, free / 2**30, config.resident_context_share, longest)
    return ResidentContexts(budget) if budget else None


class ContextReader:
    """A context's KV on the device, one layer at a time, for a prefill pass that attends to
    all of it. On CUDA each layer's host tensors (pinned, or a CUDA-registered shm segment)
    are copied by DMA on a side stream one layer ahead of the layer attending, and the
    pages' valid slots are gathered on the device; token order does not matter to
    attention. Elsewhere the host tensors are read where they are."""

    def __init__(self, context: Context, device: torch.device, dtype: torch.dtype,
                 resident: ResidentContexts | None = None, source: Context | None = None) -> None:
        """resident: where the context's KV is kept on the device once read (used, if it
        is there already, instead of the host pages). source: the same document's context
        to read the KV from instead of this one's, e.g. the one just indexed, whose pages
        are still on the device (read in place, no copy)."""
        self.ctx, self.device, self.dtype = context, device, dtype
        self.source = source if source is not None else context
        self.order = sorted([*context.dense, *context.sparse])
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.in_flight: dict[int, tuple[torch.cuda.Event, list[torch.Tensor]]] = {}
        self.resident = resident if self.stream is not None else None
        self.kept = resident.get(context) if self.resident is not None else None
        self.read: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layers read from the host this pass
        self.maps: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # their token_pages, made as they are read
        # a pass that keeps what it reads holds every layer until its end: room is made first,
        # and a context larger than the whole budget is read a layer at a time as before
        self.keep = (self.kept is None and self.resident is not None
                     and self.resident.make_room(self._device_bytes(), context))

    def _device_bytes(self) -> int:
        """What the context's resident copy takes on the device (resident_bytes)."""
        first = self._host_tensors(self.order[0])[0]  # [H, tokens, D]
        return resident_bytes(self.ctx.num_tokens, len(self.order), len(self.ctx.sparse), first.shape[0],
                              first.shape[-1], self.dtype.itemsize)

    def finish(self) -> None:
        """The pass is over: keep what it read on the device if the resident budget allows."""
        if self.keep and len(self.read) == len(self.order):
            self.resident.put(self.ctx, Resident(self.read, self.maps))
        self.read, self.maps = {}, {}

    def _host_tensors(self, layer: int) -> list[torch.Tensor]:
        if layer in self.source.dense:
            return list(self.source.dense[layer])
        s = self.source.sparse[layer]
        return [s.sink_k, s.sink_v, s.tail_k, s.tail_v, s.pages.keys, s.pages.values, s.pages.valid,
                s.pages.positions]

    def _issue(self, layer: int) -> None:
        """Start the copy of `layer` on the side stream, into memory allocated on this one
        (the side stream waits for this one first, so the memory's past users are done;
        this one waits for the copy before it reads). No record_stream: cross-stream frees
        left for the allocator to settle later can break a CUDA graph capture."""
        current = torch.cuda.current_stream(self.device)
        host = self._host_tensors(layer)
        moved = [t if t.is_cuda else torch.empty(t.shape, dtype=t.dtype, device=self.device) for t in host]
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            for dst, src in zip(moved, host):
                if dst is not src:  # a source on the device already is read where it is
                    dst.copy_(src, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        self.in_flight[layer] = (done, moved)

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every context token's (K, V) in `layer`: [H, n, D] each, on the device."""
        if self.kept is not None:
            return self.kept.kv[layer]
        kv = self._read(layer)
        if self.keep:
            self.read[layer] = kv
        elif layer in self.maps:  # nothing kept past the pass: only the layer now attending needs its map
            self.maps = {layer: self.maps[layer]}
        return kv

    def _read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.stream is None:
            k, v = self.source.flat_kv(layer)
            return k.to(self.device, self.dtype), v.to(self.device, self.dtype)
        if layer not in self.in_flight:
            self._issue(layer)
        at = self.order.index(layer)
        if at + 1 < len(self.order) and self.order[at + 1] not in self.in_flight:
            self._issue(self.order[at + 1])  # the next layer crosses PCIe while this one attends
        done, moved = self.in_flight.pop(layer)
        torch.cuda.current_stream(self.device).wait_event(done)
        if layer in self.ctx.dense:
            k, v = moved
            return k.to(self.dtype), v.to(self.dtype)
        sink_k, sink_v, tail_k, tail_v, keys, values, valid, positions = moved
        H, N, P, D = keys.shape
        n = self.ctx.num_tokens - sink_k.shape[1] - tail_k.shape[1]  # every head holds n middle tokens
        slots = _valid_slots(valid, P, n)
        self.maps[layer] = (slots // P, positions.reshape(H, N * P).gather(1, slots))
        slots = slots[..., None].expand(H, n, D)
        mid_k = keys.reshape(H, N * P, D).gather(1, slots)  # valid slots in page order, as HostPageStore.flat
        mid_v = values.reshape(H, N * P, D).gather(1, slots)
        k = torch.cat([sink_k, mid_k, tail_k], dim=1).to(self.dtype)
        v = torch.cat([sink_v, mid_v, tail_v], dim=1).to(self.dtype)
        return k, v

    def token_pages(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The page and the position of every middle token that layer(layer) returns after the
        sinks (the valid slots in page order, as both reads order them): ([H, n], [H, n]) on
        the device, without a host sync. Made once per context where it stays resident."""
        if self.kept is not None:
            return self.kept.token_pages[layer]
        if layer in self.maps:  # made by the layer's read from the host
            return self.maps[layer]
        s = self.ctx.sparse[layer]
        H, N, P, _ = s.pages.keys.shape
        n = self.ctx.num_tokens - s.sink_k.shape[1] - s.tail_k.shape[1]  # every head holds n middle tokens
        slots = _valid_slots(s.pages.valid.to(self.device, non_blocking=True), P, n)
        positions = s.pages.positions.to(self.device, non_blocking=True).reshape(H, N * P)
        return slots // P, positions.gather(1, slots)


def _valid_slots(valid: torch.Tensor, page_size: int, n: int) -> torch.Tensor:
    """The n valid slots of pages [H, N] holding valid[h, p] tokens each, in page order, as
    flat slot indices [H, n] (every head holds n tokens), without a host sync."""
    H, N = valid.shape
    empty = torch.arange(page_size, device=valid.device) >= valid[..., None]  # [H, N, P]
    return empty.reshape(H, N * page_size).to(torch.int8).argsort(dim=1, stable=True)[:, :n]


class PrefillPack:
    """One forward pass's prefill: chunks of `requests` packed in one sequence (spans of
    it, in order), each continuing its request's context (read through `readers`, by the
    context's uid) or none. Requests on different contexts share the pass: the weights
    are read, and the layers launched, once for all of them."""

    decoding = False  # StepBatch routes it to prefill_attend

    def __init__(self, requests: list[RequestKV], lengths: list[int], readers: dict[int, ContextReader]) -> None:
        self.requests, self.readers, self.lengths = requests, readers, lengths
        ends = torch.tensor(lengths).cumsum(0).tolist()
        self.spans = [(end - n, end) for end, n in zip(ends, lengths)]
        self.offsets = torch.tensor([0, *ends], dtype=torch.int32)  # the spans' starts and end, for the varlen kernel
        columns: dict[int, list[int]] = {}  # context uid -> the pack's token positions on it
        for req, (s, e) in zip(requests, self.spans):
            if req.context is not None:
                columns.setdefault(req.context.uid, []).extend(range(s, e))
        self.columns = {uid: torch.tensor(cols) for uid, cols in columns.items()}
        self.row_starts = [s for s, e in self.spans for _ in range(s, e)] if columns else []  # each row's span start
        # per context: the requests that want question pages, their chunks' last QUESTION_ROWS rows
        # in the pack, and each row's request (an index into that list)
        self.question_rows: dict[int, tuple[list[RequestKV], list[int], list[int]]] = {}
        for req, (s, e) in zip(requests, self.spans):
            if req.context is not None and req.config.candidates[1]:
                wanting, rows, owner = self.question_rows.setdefault(req.context.uid, ([], [], []))
                first = max(s, e - QUESTION_ROWS)
                rows.extend(range(first, e))
                owner.extend([len(wanting)] * (e - first))
                wanting.append(req)
        self._on_device: dict[tuple, torch.Tensor] = {}  # index lists every layer uses, copied once a pass

    def _device(self, key: tuple, values, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
        """An index list on the device, copied once for the pass without waiting for the GPU
        (a blocking copy a layer would stall the CPU's launches until the GPU caught up)."""
        if key not in self._on_device:
            host = torch.as_tensor(values, dtype=dtype)
            if device.type == "cuda":
                host = host.pin_memory()  # freed only once the copy is done (the caching host allocator)
            self._on_device[key] = host.to(device, non_blocking=True)
        return self._on_device[key]

    def prefill_attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       scaling: float) -> torch.Tensor:
        """q: [Hq, T, D], k/v: [H, T, D] for the whole pack -> [T, Hq, D]."""
        offsets = self._device(("offsets",), self.offsets, q.device)
        parts = []  # the rows' parts over other keys than their context's
        T = q.shape[1]
        owns = [req.own[layer] for req in self.requests]
        if any(own.length for own in owns):  # requests' earlier chunks (offloaded ones come back from the host)
            earlier = _no_attention(q) if len(owns) > 1 else None  # a document's chunk: its rows are all of q
            for own, (s, e) in zip(owns, self.spans):
                if own.length:
                    part = attention_lse(q[:, s:e], own.k.to(q.device, non_blocking=True),
                                         own.v.to(q.device, non_blocking=True), False, scaling)
                    if earlier is None:
                        earlier = part
                    else:
                        earlier[0][:, s:e], earlier[1][:, s:e] = part
            parts.append(earlier)
        whole = [uid for uid, cols in self.columns.items() if len(cols) == T]  # the context of every row, if one is
        if whole:  # (questions on a document): its part takes the others in, each chunk over itself too
            ctx_k, ctx_v = self.readers[whole[0]].layer(layer)
            starts = self._device(("starts",), self.row_starts, q.device, torch.int32)
            out, lse = attention_merged(q, ctx_k, ctx_v, scaling, parts, Spans(k, v, self.lengths, offsets, starts))
            self._pick_question_pages(layer, whole[0], q, lse, ctx_k, scaling)
        else:
            causal = packed_causal_lse(q, k, v, self.lengths, scaling, offsets)  # each chunk over itself
            out = merge_attention([causal, *parts, *self._spread_contexts(layer, q, scaling)])
        for own, (s, e) in zip(owns, self.spans):
            own.append(k[:, s:e], v[:, s:e])
        return out.transpose(0, 1)

    def _spread_contexts(self, layer: int, q: torch.Tensor, scaling: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The pack's rows over their contexts where they are not all on one: each context
        read once, attended by the rows on it, into one (out, lse) over the pack's rows (none
        where a row has no context); [] without contexts (a document's chunks)."""
        if not self.columns:
            return []
        spread = _no_attention(q)
        for uid, cols in self.columns.items():
            ctx_k, ctx_v = self.readers[uid].layer(layer)
            cols = self._device(("columns", uid), cols, q.device)
            out, lse = attention_lse(q.index_select(1, cols), ctx_k, ctx_v, False, scaling)
            spread[0].index_copy_(1, cols, out)
            spread[1].index_copy_(1, cols, lse)
            self._pick_question_pages(layer, uid, q, spread[1], ctx_k, scaling)
        return [spread]

    def _pick_question_pages(self, layer: int, uid: int, q: torch.Tensor, lse: torch.Tensor, ctx_k: torch.Tensor,
                             scaling: float) -> None:
        """For the requests of the pack on context uid that want them (config.question_pages),
        the context pages their chunks' last QUESTION_ROWS tokens point to in this layer, all
        at once: what the rows attend to (lse: [Hq, T] their log-sum-exp over the context),
        and the config.question_follow positions after it (index.select.question_pages; on
        CUDA kernels.question's, a few launches instead of ~30). A request's last chunk's
        choice stands."""
        reader = self.readers[uid]
        if uid not in self.question_rows or layer not in reader.ctx.sparse:
            return
        wanting, rows, owner = self.question_rows[uid]
        rows = self._device(("rows", uid), rows, q.device)
        sparse = reader.ctx.sparse[layer]
        page_of, position = reader.token_pages(layer)
        num_sink = sparse.sink_k.shape[1]
        keys = ctx_k[:, num_sink:num_sink + page_of.shape[1]]
        config = wanting[0].config
        pick = (reader.ctx.num_tokens, sparse.tree.num_pages, config.question_pages, config.question_follow)
        if _fused_question_pages(keys):
            from icecache.kernels.question import question_pages as fused
            start = self._device(("start", uid), [0, *itertools.accumulate(collections.Counter(owner).values())],
                                 q.device, torch.int32)
            picked = fused(q, lse, rows, start, keys, page_of, position, *pick, scaling)
        else:
            owner = self._device(("owner", uid), owner, q.device)
            mass = question_mass(q.index_select(1, rows), lse.index_select(1, rows), owner, len(wanting), keys,
                                 scaling)
            picked = question_pages(mass, page_of, position, *pick)
        for req, pages in zip(wanting, picked):
            req.question_pages[layer] = pages


QUESTION_ROWS = 16  # a question's last tokens, whose attention over the context picks its question pages


def _fused_question_pages(keys: torch.Tensor) -> bool:
    """Whether a question's pages are picked by kernels.question: on CUDA, for a head dim
    the kernel's dot tiles take."""
    if keys.device.type != "cuda":
        return False
    from icecache.kernels.common import is_tile
    return is_tile(keys.shape[-1])


def _no_attention(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """An (out, lse) part with no mass on any row (lse -inf), to fill some rows of."""
    return torch.zeros_like(q), torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)


class ModelRunner:
    """Runs the model for one engine: packed exact prefill, the dynamic path's batched
    decode pass, and indexing a prefilled document into a Context."""

    def __init__(self, model: torch.nn.Module, shape: ModelShape, config: IceCacheConfig, model_id: str,
                 resident: ResidentContexts | None = None) -> None:
        """resident: another runner's resident contexts (the device copies of hot contexts' KV, for
        question prefill) over the same weights, to share rather than keep a second copy of a
        context under another config; None = this config's own (resident_contexts)."""
        self.model, self.shape, self.config, self.model_id = model, shape, config, model_id
        self.device = shape.device
        self.resident = resident if resident is not None else resident_contexts(model, shape, config)
        # where the decode step's fused kernels run, every pass runs the decode step's way too:
        # a question's prefill is bound by its launches (~35 a layer fewer than the model's forward)
        fused = use_kernels(self.device, config, shape.head_dim, shape.group, 0)
        self.passes = ModelPass(model, fused) if fused else None

    def forget(self, context: Context) -> None:
        """Drop the device copy of a context's KV kept for prefills (before its pages go)."""
        if self.resident is not None:
            self.resident.forget(context)

    def make_resident(self, context: Context, source: Context | None = None) -> bool:
        """Keep a context's KV on the device now, for its questions' prefills, instead of at
        its first question (whose pass would otherwise read all of it from host memory: 16
        GiB at 128k tokens of an 8B model, ~0.3 s over PCIe). source: the same document's
        context with its pages still on the device (the one just indexed), read in place.
        -> whether the context is resident (False without a resident budget, or over it)."""
        if self.resident is None:
            return False
        if context in self.resident:
            return True
        reader = ContextReader(context, self.device, self.shape.dtype, self.resident, source)
        if not reader.keep:
            return False
        try:
            with torch.no_grad():
                for layer in reader.order:
                    reader.layer(layer)
        except torch.OutOfMemoryError as e:  # within the budget but not free now: its first question reads it
            log.warning("no device memory free to keep a context of %d tokens resident now (%s)",
                        context.num_tokens, str(e).split(". See documentation")[0])
            return False
        reader.finish()
        return context in self.resident

    def forward(self, batch: StepBatch, ids: torch.Tensor, positions: torch.Tensor,
                logits_at: torch.Tensor | None = None) -> torch.Tensor:
        """ids, positions: [B, T]. -> logits [B, vocab] of each row's last token, or with
        logits_at ([n] indices into T, B = 1) [n, vocab] of those tokens."""
        keep = 1 if logits_at is None else logits_at.to(self.device)
        if self.passes is None:
            out = self.model(input_ids=ids.to(self.device), position_ids=positions.to(self.device), use_cache=False,
                             logits_to_keep=keep, **{BATCH_KWARG: batch})
            return out.logits[:, -1] if logits_at is None else out.logits[0]
        N, T = ids.shape

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
            # StepBatch.attend takes transformers' layout, [N, heads, T, D]
            out = batch.attend(layer, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scaling)
            return out.reshape(N, T, -1)

        x = self.passes.run(ids.to(self.device), positions.to(self.device), attend)
        return self.model.lm_head(x[:, -1] if logits_at is None else x[0, keep])

    def prefill(self, requests: Sequence[RequestKV], chunks: Sequence[list[int]], starts: Sequence[int]
                ) -> torch.Tensor:
        """One packed pass: chunks[i] (token ids at positions starts[i]...) of requests[i],
        each on its request's context (or none). -> logits [len(chunks), vocab] after each chunk."""
        return self.prefill_rows(requests, chunks, starts, ())[0]

    def prefill_rows(self, requests: Sequence[RequestKV], chunks: Sequence[list[int]], starts: Sequence[int],
                     every_row: Collection[int]) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """prefill, with the logits after every token of the chunks `every_row` names (a prompt
        being scored) as well. -> (logits [len(chunks), vocab] after each chunk,
        {i: logits [len(chunks[i]), vocab]} for i in every_row)."""
        assert len(requests) == len(chunks) == len(starts) and all(chunks), "one non-empty chunk per request"
        ids = torch.tensor([t for c in chunks for t in c])[None]
        positions = torch.cat([torch.arange(s, s + len(c)) for s, c in zip(starts, chunks)])[None]
        lengths = [len(c) for c in chunks]
        rows: list[int] = []  # the pack's rows whose logits are kept: each chunk's last, or all of it
        last, spans, end = [], {}, 0
        for i, n in enumerate(lengths):
            end += n
            if i in every_row:
                spans[i] = (len(rows), len(rows) + n)
                rows.extend(range(end - n, end))
            else:
                rows.append(end - 1)
            last.append(len(rows) - 1)
        contexts = {req.context.uid: req.context for req in requests if req.context is not None}
        readers = {uid: ContextReader(ctx, self.device, self.shape.dtype, self.resident) for uid, ctx in contexts.items()}
        logits = self.forward(StepBatch([PrefillPack(list(requests), lengths, readers)]), ids, positions,
                              torch.tensor(rows))
        for reader in readers.values():
            reader.finish()
        if not spans:
            return logits, {}
        return logits[torch.tensor(last, device=logits.device)], {i: logits[a:b] for i, (a, b) in spans.items()}

    def prefill_one(self, req: RequestKV, token_ids: list[int], start: int) -> torch.Tensor:
        """Prefill one request's tokens (at positions start...) on its context, in one
        pass. -> logits [vocab] after the last token."""
        return self.prefill([req], [token_ids], [start])[0]

    def document_request(self, num_tokens: int, offload: bool | None = None) -> RequestKV:
        """KV state for indexing a document of num_tokens from its start: on the device, or
        in pinned host memory when config.prefill_offload says so (offload_prefill) or offload does."""
        if offload is None:
            offload = self.offload_prefill(num_tokens)
        return RequestKV(self.shape, self.config, None, num_tokens if offload else 0, capacity_tokens=num_tokens)

    def retries_offloaded(self, req: RequestKV | None) -> bool:
        """Whether a document's prefill that ran out of device memory starts again with its KV
        in host memory (offloaded_request): it ran on the device (None: its KV could not even
        be allocated there), prefill_offload "auto"."""
        return (req is None or not req.offload) and self.config.prefill_offload == "auto"

    def offloaded_request(self, num_tokens: int) -> RequestKV:
        """KV state in pinned host memory for a document whose prefill on the device ran out
        of memory; call it once the failed attempt's tensors are gone (outside the handler)."""
        torch.cuda.empty_cache()
        log.warning("out of device memory prefilling a document of %d tokens on the device: starting again with "
                    "its KV in host memory", num_tokens)
        return self.document_request(num_tokens, offload=True)

    def chunk_tokens(self, req: RequestKV) -> int:
        """Tokens per pass when prefilling a document: an offloaded prefill reads its past
        back from the host every pass, so it takes fewer, larger ones."""
        chunk = self.config.index_chunk_tokens
        return max(chunk, OFFLOAD_CHUNK_TOKENS) if req.offload else chunk

    def offload_prefill(self, num_tokens: int) -> bool:
        """Whether indexing a document of num_tokens keeps its KV in host memory meanwhile.
        Resident copies of other contexts (the least recently used first) give way to a
        prefill that fits without them: an offloaded prefill is several times slower (an 8B
        model at 128k tokens on an H100: 88 s against 11), an evicted copy costs its next
        question one read of the context from host memory (~0.3 s), which keeps it again."""
        mode = self.config.prefill_offload
        if mode != "auto":
            return mode == "host"
        if self.device.type != "cuda":
            return False  # the KV is in host memory either way
        need = self.prefill_device_bytes(num_tokens)
        fits = lambda free: need <= free * PREFILL_DEVICE_SHARE  # noqa: E731
        free = free_device_bytes(self.device)
        if fits(free) or self.resident is None or not fits(free + self.resident.used_bytes):
            return not fits(free)
        evicted = 0
        while not fits(free) and (size := self.resident.evict_oldest()):
            evicted += size
            free = free_device_bytes(self.device)
        log.info("evicted %.1f GiB of resident contexts to prefill a document of %d tokens on the device%s",
                 evicted / 2**30, num_tokens, "" if fits(free) else ": not enough, it is offloaded")
        return not fits(free)

    def prefill_device_bytes(self, num_tokens: int) -> int:
        """What prefilling and indexing a document of num_tokens on the device takes at most:
        its KV, and the paged copy the index builds beside it."""
        return 2 * num_tokens * self.shape.num_layers * self.shape.kv_bytes_per_token

    def build_context(self, req: RequestKV, token_ids: list[int], logits: torch.Tensor, prefill_started: float,
                      on_device: bool = False) -> Context:
        """Index a finished prefill of `token_ids` (req holds its KV) into a Context, with its
        timings. The trees and pages are built where the KV is (the GPU, unless offloaded);
        on_device keeps the pages there too (e.g. to write them straight into shared
        memory), else they move to (pinned) host memory."""
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        layer_kv = [(kv.k, kv.v) for kv in req.own]
        req.own = None  # build_context frees each layer's prefill KV as it goes
        ctx = build_context(self.model_id, token_ids, layer_kv, logits, self.config, self.device)
        if not on_device:
            built, ctx = ctx, ctx.to_host().with_index_on(self.device, boxes=self.config.reads_page_boxes)
            if not req.offload:  # built on the device: its first question need not read them back from the host
                self.make_resident(ctx, source=built)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        ctx.prefill_s, ctx.build_s = t1 - prefill_started, time.perf_counter() - t1
        return ctx
