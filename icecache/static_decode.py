"""Static-shape decode: one token of each of up to N requests on one context through the
model, with every buffer allocated before the first step, so a step is a fixed sequence
of GPU kernels with no host round-trip, and on CUDA it is captured once per batch size as
a CUDA graph.

Batching: the requests of one context (a document, many questions) sit in slots of one
StaticDecoder. A step reads the weights once for all of them; sparse layers rank pages
for every (request, KV head) row in the same kernels, over the tree they share; dense
layers read the context's KV once for the whole batch (kernels.dense_attention).

What differs from the dynamic path (cache.py), by design:
* shared host pages are read where they are: on CUDA through a UVA view of the pinned
  (or CUDA-registered) host store, so a page gather is a kernel that reads host memory
  over PCIe (graph-capturable, no staging copy, no sync); device_pages=True copies them
  to the GPU once instead, for a document many requests read at the same time;
* the selected pages are gathered every step (12 pages x heads, < 1 MB a layer) rather
  than diffed against resident slots, which would need a data-dependent copy;
* a request's private pages (its own tokens that leave the window, in arrival order: page
  = n // page_size, as on the dynamic path) live in fixed-capacity slot buffers, filled in
  place as tokens arrive, where the dynamic path grows its PrivatePages by doubling;
* on CUDA a sparse layer runs as ~10 Triton kernels (icecache/kernels/: push, tree walk over
  the children of kept nodes only, page ranking over the kept clusters' pages only,
  attention reading pages in place); the torch code of decode_layers.py (a layer's
  state for every slot) is their reference and the CPU path;
* the window is a ring buffer; dense layers (and every layer in mode="full") keep the
  context's KV on the device once, plus each slot's own tokens.

The model's own modules (norms, projections, rotary embedding, MLP, LM head) do the
rest, so any Llama-family architecture the engine supports runs here.
"""

from __future__ import annotations

import gc
import itertools
import logging
from collections import OrderedDict
from collections.abc import Callable

import torch

from icecache.config import IceCacheConfig
from icecache.context import Context
from icecache.decode_layers import DenseSlots, Ring, Scratch, SlotStack, SparseSlots, use_kernels
from icecache.model_pass import ModelPass
from icecache.selectors import SELECTORS, recent_tokens

log = logging.getLogger(__name__)

# eager steps of one batch size before its CUDA graph is recorded on the request path (a size
# that recurs); the sizes a burst only passes through are recorded when the scheduler is idle
CAPTURE_AFTER = 3

_SERIALS = itertools.count()


class StaticDecoder:
    """Decode steps for up to `slots` requests on one context, batched: a step runs the
    first B slots' next tokens through the model at once (the weights are read once, the
    shared context's tree, pages and dense KV serve every slot). A request is load()ed
    into a slot after its prefill; when one leaves, move() the last slot into its place,
    so the active requests always hold slots 0..B-1.

    StaticDecoder(model, config, context, own_kv, max_new_tokens) is the one-request case:
    one slot, loaded, stepped with step(token, position)."""

    def __init__(self, model: torch.nn.Module, config: IceCacheConfig, context: Context,
                 own_kv: list | None = None, max_new_tokens: int = 0, *, slots: int = 1,
                 slot_tokens: int | None = None, device_pages: bool = False,
                 question_pages: dict[int, torch.Tensor] | None = None, resident=None) -> None:
        """slot_tokens: the most own tokens (prompt + decoded) a slot holds; with own_kv,
        at least its prompt plus max_new_tokens. device_pages: copy the context's host
        pages into device memory (for a document many requests read at once: one copy
        serves them all, and page reads stop being bound by PCIe); by default they are
        read in place from host memory. question_pages: the one request's (RequestKV's).
        resident: the runner's ResidentContexts; where the context's KV is kept on the
        device there (for its questions' prefills), the kernels read its pages from that
        copy instead of host memory, until it is evicted (read_resident)."""
        self.model, self.config, self.context = model, config, context
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.layers = model.model.layers
        self.head_dim = self.layers[0].self_attn.head_dim
        self.num_kv_heads = model.config.num_key_value_heads
        self.group = model.config.num_attention_heads // self.num_kv_heads
        own_len = own_kv[0][0].shape[1] if own_kv else 0
        need = own_len + max_new_tokens + 1
        self.slots, self.slot_tokens = slots, max(slot_tokens or 0, need)
        num_layers = len(self.layers)
        sparse_layers = [i for i in range(num_layers) if i not in context.dense and config.mode != "full"]
        # the window ring; StreamingLLM (selector "streaming") widens it to the budget past the sinks
        wide = SELECTORS[config.selector].window_fills_budget
        window = config.token_budget - config.sink_tokens if wide else config.window_tokens
        self.ring = Ring(slots, window, self.device) if sparse_layers else None
        self.own = torch.zeros(slots, dtype=torch.long, device=self.device)  # own tokens per slot (dense layers)
        # a slot's tokens that leave the window go to private pages: at most tail + own of them
        private_pages = (context.num_tail + self.slot_tokens) // config.page_size + 2
        widest = max([max((context.sparse[i].pages.num_pages for i in sparse_layers), default=0) + private_pages] +
                     [n for i in sparse_layers for n in context.sparse[i].tree.level_sizes()])
        # the model's norms and rotary embedding as fused kernels wherever the sparse kernels could run
        self.passes = ModelPass(model, use_kernels(self.device, config, self.head_dim, self.group, 0))
        kernel_layers = use_kernels(self.device, config, self.head_dim, self.group, widest)
        self.scratch = Scratch(self.device, self.group) if kernel_layers else None
        self.sparse_layers = sparse_layers
        self.stack = None  # every sparse layer's per-slot state, loaded for all of them at once
        if sparse_layers:
            self.stack = SlotStack([(context.sparse[i].tail_k, context.sparse[i].tail_v) for i in sparse_layers],
                                   slots, private_pages, config.page_size, window, config.candidates[1], self.dtype,
                                   self.device, config.ranked_pages)
        self.states: list[SparseSlots | DenseSlots] = []
        for i in range(num_layers):
            if i in sparse_layers:
                leader = context.cycle_leader(i)
                self.states.append(SparseSlots(context.sparse[i], self.stack, sparse_layers.index(i), config,
                                                self.dtype, self.device, self.ring, self.scratch,
                                                self.states[leader] if leader != i else None, device_pages, i))
            else:
                ck, cv = context.flat_kv(i)
                self.states.append(DenseSlots(ck, cv, slots, self.slot_tokens, self.dtype, self.device, self.own,
                                               self.scratch))
        if self.scratch is not None:
            self.scratch.allocate()
        self._slot_tensors = [self.own] + ([self.ring.counts] if self.ring is not None else [])  # the slot first
        self._stacked = self.stack.slot_tensors() if self.stack is not None else []  # the slot second
        self.last_pages: list[torch.Tensor | None] = [None] * num_layers
        self._token = torch.zeros(slots, 1, dtype=torch.long, device=self.device)
        self._position = torch.zeros(slots, 1, dtype=torch.long, device=self.device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # batch size -> graph, its logits
        self._pool = None  # one memory pool for every batch size's graph (they never run at once)
        self._eager: set[int] = set()  # batch sizes whose capture failed
        self._runs: dict[int, int] = {}  # eager steps per batch size not yet captured
        self.resident_rows = False  # whether the kernels read the pages from a resident copy of the context
        self.serial = next(_SERIALS)  # names this decoder in a JointStep's graphs (an id() can be reused)
        self.epoch = 0  # counts the times its recorded graphs went stale (a JointStep's go with them)
        self._held: int | None = None  # device_bytes(), until what the layers hold changes
        if resident is not None and not device_pages:
            self.read_resident(resident)
        if own_kv is not None:
            self.load(0, own_kv, max_new_tokens, question_pages)

    def read_resident(self, resident) -> None:
        """Read the shared pages from the context's device copy in `resident` (a
        runner.ResidentContexts) if it holds one: at device memory speed instead of over
        PCIe, no copy of ours (the copy is the one the context's question prefills read).
        resident calls drop_resident() before it lets the copy go. Idempotent; nothing on
        the torch path, which reads the pages where they lie."""
        if self.resident_rows or self.scratch is None:
            return
        kept = resident.get(self.context)
        if kept is None:
            return
        for i in self.sparse_layers:
            self.states[i].read_shared_from(kept.kv[i])
        resident.watch(self.context, self)
        self._graphs.clear()  # recorded with the host pages' addresses
        self.epoch += 1
        self.resident_rows = True
        self._held = None  # the questions' keys went

    def drop_resident(self) -> None:
        """The context's device copy is going away: read its pages from where they lie again
        (the graphs recorded with the copy's addresses go, and are recorded again)."""
        for state in self.sparse_states:
            state.read_shared_from(None)
        self._graphs.clear()
        self._runs.clear()
        self.epoch += 1
        self.resident_rows = False
        self._held = None  # the questions' keys are back

    # ---------------------------------------------------------------- slots
    def load(self, slot: int, own_kv: list, max_new_tokens: int,
             question_pages: dict[int, torch.Tensor] | None = None) -> None:
        """Put a prefilled request (its prompt's KV per layer, [H, m, D] each) in `slot`;
        question_pages: layer -> [H, K] the pages its question picked (RequestKV's)."""
        m = own_kv[0][0].shape[1]
        if not 0 <= slot < self.slots:
            raise ValueError(f"slot: {slot} outside this decoder's {self.slots} slots")
        if m + max_new_tokens + 1 > self.slot_tokens:
            raise ValueError(f"request: {m} prompt + {max_new_tokens} new tokens exceed a slot's "
                             f"{self.slot_tokens - 1} tokens")
        self.own[slot] = m
        if self.ring is not None:
            ctx, window = self.context, self.ring.window
            recent = ctx.num_tail + m  # tokens that start in the window or behind it
            before = 0  # StreamingLLM's wide window starts with the context middle's last tokens
            if SELECTORS[self.config.selector].window_fills_budget:
                before = max(0, min(window - recent, ctx.num_tokens - ctx.num_sink - ctx.num_tail))
            recent += before
            cut = max(0, recent - window)  # the oldest of them start in private pages
            self.ring.counts[slot, 0], self.ring.counts[slot, 1] = recent - cut, cut
            sparse = self.sparse_layers
            more = None
            if before:
                recent_of = [recent_tokens(self.states[i].pages, before) for i in sparse]
                more = torch.stack([k for k, _ in recent_of]), torch.stack([v for _, v in recent_of])
            self.stack.load(slot, torch.stack([own_kv[i][0] for i in sparse]),
                            torch.stack([own_kv[i][1] for i in sparse]), cut, more,
                            self._questions(question_pages or {}, sparse))
            for i in sparse:
                self.states[i].copy_question_keys(slot)
        for state, (k, v) in zip(self.states, own_kv):
            if isinstance(state, DenseSlots):
                state.load(slot, k, v)

    def _questions(self, question_pages: dict[int, torch.Tensor], sparse: list[int]) -> torch.Tensor | None:
        """The sparse layers' question pages as one [L, H, K] tensor (-1 = none), or None."""
        if not question_pages:
            return None
        picked = [question_pages.get(i) for i in sparse]
        widths = {p.shape[1] for p in picked if p is not None}
        if None not in picked and len(widths) == 1:  # the usual case: one stack, no copy per layer
            return torch.stack(picked)
        out = torch.full((len(sparse), self.num_kv_heads, max(widths, default=0)), -1, dtype=torch.long)
        for j, p in enumerate(picked):
            if p is not None:
                out[j, :, :p.shape[1]] = p.cpu()
        return out

    def move(self, src: int, dst: int) -> None:
        """Slot src's request into slot dst (e.g. the last slot into a freed one)."""
        if src != dst:
            for t in [*self._slot_tensors, *(t for s in self.states for t in s.slot_tensors())]:
                t[dst].copy_(t[src])
            for t in self._stacked:
                t[:, dst].copy_(t[:, src])

    # ---------------------------------------------------------------- steps
    def _forward(self, B: int) -> torch.Tensor:
        """The next token of slots 0..B-1 (in _token/_position). -> logits [B, vocab]."""
        return _decode_pass([(self, B)])

    def padded_batch(self, B: int) -> int:
        """The batch size a step of B requests runs at: the next power of two (at most
        `slots`), so a decoder captures a handful of CUDA graphs, not one per batch size."""
        return min(self.slots, 1 << (B - 1).bit_length())

    def step_batch(self, tokens: list[int], positions: list[int], graph: bool = False) -> torch.Tensor:
        """One token for each of slots 0..len(tokens)-1; returns logits [B, vocab] (a view
        of a static buffer when graphed: read before the next step). The step runs at
        padded_batch(B): the free slots past B decode a dummy token from an empty state,
        which the next load() of a slot overwrites. graph: on CUDA, replay a CUDA graph of
        that size, recorded once that size has run CAPTURE_AFTER eager steps (a burst of
        arrivals passes through sizes it never keeps: recording each would stall the batch)
        or by capture_pending() when the decoder is idle."""
        B, padded = len(tokens), self._stage(tokens, positions)
        if padded in self._graphs:
            self._graphs[padded][0].replay()
            return self._graphs[padded][1][:B]
        logits = self._forward(padded)
        self._runs[padded] = self._runs.get(padded, 0) + 1
        if graph and self._runs[padded] >= CAPTURE_AFTER:
            self._try_capture(padded)
        return logits[:B]

    def _stage(self, tokens: list[int], positions: list[int]) -> int:
        """Slots 0..B-1's next tokens and positions into the step's inputs, the free slots up to
        padded_batch(B) emptied. -> the padded batch size."""
        B = len(tokens)
        if not 0 < B <= self.slots:
            raise ValueError(f"tokens: {B} for a decoder of {self.slots} slots")
        if len(positions) != B:
            raise ValueError(f"positions: {len(positions)} for {B} tokens")
        padded = self.padded_batch(B)
        self._token[:B, 0] = torch.tensor(tokens)
        self._position[:B, 0] = torch.tensor(positions)
        if padded > B:  # free slots: no own tokens, an empty window (their counters must not run past a slot)
            self._token[B:padded] = 0
            self._position[B:padded] = 0
            self.own[B:padded] = 0
            if self.ring is not None:
                self.ring.counts[B:padded] = 0
        return padded

    @property
    def sparse_states(self) -> list[SparseSlots]:
        """The sparse layers' per-layer state, in layer order (benchmarks time its parts)."""
        return [s for s in self.states if isinstance(s, SparseSlots)]

    @property
    def graphed(self) -> set[int]:
        """Batch sizes whose steps replay a recorded CUDA graph."""
        return set(self._graphs)

    def capture_pending(self) -> bool:
        """Record the graph of one batch size that has run eagerly but is not captured yet
        (for a scheduler's idle moments: the next burst of that size replays it). Recording
        runs nothing, so any moment between steps will do. -> whether there was one to record."""
        pending = [B for B in self._runs if B not in self._graphs and B not in self._eager]
        if not pending or self.device.type != "cuda":
            return False
        self._try_capture(min(pending))
        return True

    def _try_capture(self, B: int) -> None:
        if self.device.type != "cuda" or B in self._eager:
            return
        try:
            self.capture(B)
        except RuntimeError as e:  # recording runs nothing: the state is intact, this size stays eager
            self._eager.add(B)
            log.warning("CUDA graph capture of batch size %d failed (%r); it runs eagerly", B, e)

    def step(self, token: int, position: int) -> torch.Tensor:
        """Run one token of slot 0; returns logits [vocab] (a static buffer when graphed: copy to keep)."""
        return self.step_batch([token], [position])[0]

    def device_bytes(self) -> int:
        """Device bytes this decoder holds for KV-side state, all its slots: dense KV, trees,
        page tables, windows, private pages, work buffers (host pages read through UVA
        views are not counted; a device_pages copy is). Kept until a resident copy comes or
        goes (a scheduler reads it for every idle group at every admission)."""
        if self._held is not None:
            return self._held
        tensors = {}  # by address: a reuse cycle's layers share one tree
        for s in self.states:
            for name, value in vars(s).items():
                # host pages through UVA, or a resident copy of the context (ResidentContexts counts it)
                uva = name in ("shared_k", "shared_v", "rows_k", "rows_v") and not getattr(s, "device_pages", False)
                for t in value if isinstance(value, tuple) else (value,):  # tuples: e.g. SparseSlots.rest
                    if isinstance(t, torch.Tensor) and not uva:
                        tensors[t.data_ptr()] = t
            if isinstance(s, SparseSlots):
                tensors.update((t.data_ptr(), t) for t in s.tree.tensors())
        if self.scratch is not None:
            tensors.update((t.data_ptr(), t) for t in self.scratch.buffers.values())
        if self.stack is not None:  # its per-slot tensors are the sparse layers' (counted above); the tails
            tensors.update((t.data_ptr(), t) for t in (self.stack.tail_k, self.stack.tail_v))
        self._held = sum(t.numel() * t.element_size() for t in tensors.values() if t.device == self.device)
        return self._held

    def pages_per_step(self, slot: int = 0) -> int:
        """Pages the last step selected for `slot`, summed over sparse layers and KV heads (one sync)."""
        H = self.num_kv_heads
        return int(sum(int((p[slot * H:(slot + 1) * H] >= 0).sum()) for p in self.last_pages if p is not None))

    def capture(self, B: int = 1) -> None:
        """Record a step of slots 0..B-1 as a CUDA graph; later steps of B slots replay it.
        Recording runs nothing, so the state is untouched; call it after at least one
        eager step (the warm-up that initialises cuBLAS and friends)."""
        assert self.device.type == "cuda", "CUDA graphs need a CUDA device"
        torch.cuda.synchronize(self.device)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        self._graphs[B] = _record(self._pool, lambda: self._forward(B))


def _record(pool, forward: Callable[[], torch.Tensor]) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """Record forward() as a CUDA graph in memory pool `pool`. -> the graph, its output."""
    graph = torch.cuda.CUDAGraph()
    # thread_local: other threads of the process (e.g. one page-locking a new segment) may make
    # calls a capture forbids without breaking this one. No garbage collection while recording:
    # a collected tensor's free can settle CUDA events, which a capture forbids (a suspect of
    # the rare failed captures seen on the H200; unconfirmed)
    collecting = gc.isenabled()
    gc.disable()
    try:
        with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
            logits = forward()
    finally:
        if collecting:
            gc.enable()
    return graph, logits


@torch.inference_mode()
def _decode_pass(parts: list[tuple[StaticDecoder, int]]) -> torch.Tensor:
    """The next token of slots 0..B-1 of each (decoder, B) in parts, decoders of one model, in
    one pass through it: the weights are read once for every row; each decoder's layers
    attend over its own context for its rows. -> logits [sum of B, vocab], parts in order."""
    lead = parts[0][0]
    N = sum(B for _, B in parts)
    if len(parts) == 1:
        tokens, positions = lead._token[:N], lead._position[:N]
    else:
        tokens = torch.cat([d._token[:B] for d, B in parts])
        positions = torch.cat([d._position[:B] for d, B in parts])
    H, g, D = lead.num_kv_heads, lead.group, lead.head_dim

    def attend(i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float) -> torch.Tensor:
        q, k, v = q.reshape(N, H, g, D), k.reshape(N, H, D), v.reshape(N, H, D)
        outs, at = [], 0
        for d, B in parts:  # each decoder's rows attend over its own context
            out = d.states[i].attend(q[at:at + B], k[at:at + B], v[at:at + B], scaling)
            if isinstance(out, tuple):
                out, d.last_pages[i] = out
            outs.append(out.reshape(B, 1, H * g * D))
            at += B
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    x = lead.passes.run(tokens, positions, attend)
    for d, B in parts:
        d.own[:B] += 1
        if d.ring is not None:
            d.ring.advance(B)
    return lead.model.lm_head(x)[:, -1].float()


class JointStep:
    """Decode steps for requests on several contexts at once: one pass through the model
    for the slots of several StaticDecoders (of one model), so a step over k documents
    reads the weights once, not k times; each decoder's layers attend over its own context
    and pages. Eagerly (graph=False, e.g. on a CPU) that pass is always taken. On CUDA a
    combination of (decoder, padded batch size) runs in turns, each decoder replaying its
    own graph (a burst's combinations change from step to step, and an eager pass of
    several contexts' kernels costs more than their graphs in turns), until it recurs:
    its CAPTURE_AFTER-th step records it as one graph, replayed from then on; the
    `max_graphs` most recently used are kept. A combination's graph goes stale when one
    of its decoders' graphs do (a resident copy came or went: its epoch moved) and is
    recorded again; forget() a decoder before letting it go."""

    def __init__(self, max_graphs: int = 8) -> None:
        self.max_graphs = max_graphs
        self._graphs: OrderedDict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, tuple]] = OrderedDict()
        self._runs: dict[tuple, int] = {}  # steps in turns per combination not yet recorded (CUDA)
        self._eager: set[tuple] = set()  # combinations whose capture failed (they run in turns)
        self._pool = None

    def step(self, parts: list[tuple[StaticDecoder, list[int], list[int]]], graph: bool = False
             ) -> list[torch.Tensor]:
        """One token for each of slots 0..len(tokens)-1 of every (decoder, tokens, positions)
        in parts (decoders distinct, of one model; one part is that decoder's own step_batch).
        -> each part's logits [B, vocab] (views of a static buffer when graphed: read them
        before the next step)."""
        decoders = [d for d, _, _ in parts]
        if len({d.serial for d in decoders}) != len(decoders):
            raise ValueError("parts: a decoder appears twice in one step")
        if any(d.model is not decoders[0].model for d in decoders):
            raise ValueError("parts: decoders of different models cannot share a pass")
        if len(parts) == 1:
            d, tokens, positions = parts[0]
            return [d.step_batch(tokens, positions, graph=graph)]
        sizes = [d._stage(tokens, positions) for d, tokens, positions in parts]
        key = tuple((d.serial, n) for d, n in zip(decoders, sizes))
        epochs = tuple(d.epoch for d in decoders)
        kept = self._graphs.get(key)
        if kept is not None and kept[2] != epochs:  # recorded with pages that have moved since
            del self._graphs[key]
            kept = None
        graph = graph and decoders[0].device.type == "cuda"
        if kept is not None:
            self._graphs.move_to_end(key)
            kept[0].replay()
            logits = kept[1]
        elif graph:  # not recorded (yet): in turns, each decoder's own graph where it has one
            out = [d.step_batch(tokens, positions, graph=True) for d, tokens, positions in parts]
            self._runs[key] = self._runs.get(key, 0) + 1
            if self._runs[key] >= CAPTURE_AFTER:  # it recurs: recorded (which runs nothing) for the next steps
                self._capture(key, list(zip(decoders, sizes)), epochs)
            return out
        else:
            logits = _decode_pass(list(zip(decoders, sizes)))
        out, at = [], 0
        for (_, tokens, _), n in zip(parts, sizes):
            out.append(logits[at:at + len(tokens)])
            at += n
        return out

    def _capture(self, key: tuple, parts: list[tuple[StaticDecoder, int]], epochs: tuple) -> None:
        del self._runs[key]
        if key in self._eager:
            return
        torch.cuda.synchronize(parts[0][0].device)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        try:
            graph, logits = _record(self._pool, lambda: _decode_pass(parts))
        except RuntimeError as e:  # recording runs nothing: the state is intact, this combination stays in turns
            self._eager.add(key)
            log.warning("CUDA graph capture of a joint step %s failed (%r); its decoders run in turns", key, e)
            return
        self._graphs[key] = (graph, logits, epochs)
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)

    @property
    def graphed(self) -> set[tuple]:
        """Combinations ((decoder serial, padded batch), ...) whose steps replay a graph."""
        return set(self._graphs)

    def forget(self, decoder: StaticDecoder) -> None:
        """Drop every recorded combination (and count) that holds `decoder` (it is going away:
        its graphs must not keep its buffers, nor replay into them)."""
        for table in (self._graphs, self._runs):
            for key in [k for k in table if any(serial == decoder.serial for serial, _ in k)]:
                del table[key]
        self._eager = {k for k in self._eager if all(serial != decoder.serial for serial, _ in k)}
