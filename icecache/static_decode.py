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
* a request's own tokens that leave the window go to private pages in arrival order
  (page = n // page_size), which keeps shapes static; they are always candidates and are
  ranked by the same box bound as shared pages (each page's box grows as tokens arrive);
* on CUDA a sparse layer runs as ~10 Triton kernels (icecache/kernels/: push, tree walk over
  the children of kept nodes only, page ranking over the kept clusters' pages only,
  attention reading pages in place); the torch code here is their reference and the
  CPU path;
* the window is a ring buffer; dense layers (and every layer in mode="full") keep the
  context's KV on the device once, plus each slot's own tokens.

The model's own modules (norms, projections, rotary embedding, MLP, LM head) do the
rest, so any Llama-family architecture the engine supports runs here.
"""

from __future__ import annotations

import gc
import logging
import os
import sys

import torch

from icecache.attention import decode_attention
from icecache.config import IceCacheConfig
from icecache.context import Context
from icecache.index.select import rank_pages, rerank_pages, shared_part, tree_keep
from icecache.index.tree import TreeIndex, page_bounds
from icecache.selectors import oracle_pages, random_draw, random_pages, recent_tokens

log = logging.getLogger(__name__)

# eager steps of one batch size before its CUDA graph is recorded on the request path (a size
# that recurs); the sizes a burst only passes through are recorded when the scheduler is idle
CAPTURE_AFTER = 3
_FUSED_RERANK_FAILED: list[str] = []  # why kernels.rerank could not build or run in this process, if it could not


def uva_view(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CUDA tensor aliasing pinned/registered host memory (no copy): kernels read it over PCIe."""
    if device.type != "cuda":
        return host
    size = host.element_size()  # reinterpret as an int type the interface can name (bf16 has no typestr)
    raw = host.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[size])
    typestr = f"<i{size}"

    class _Iface:
        __cuda_array_interface__ = {"shape": tuple(raw.shape), "typestr": typestr, "data": (raw.data_ptr(), False),
                                    "version": 3, "strides": tuple(s * raw.element_size() for s in raw.stride())}

    return torch.as_tensor(_Iface(), device=device).view(host.dtype)


class _DenseState:
    """A dense layer: the context's whole KV on the device, once for every request (read
    once per step for the whole batch), plus each slot's own tokens [B, H, T, D]."""

    def __init__(self, ctx_k: torch.Tensor, ctx_v: torch.Tensor, slots: int, slot_tokens: int, dtype: torch.dtype,
                 device: torch.device, own: torch.Tensor, scratch: "_Scratch | None") -> None:
        H, n, D = ctx_k.shape
        self.ctx_k = ctx_k.to(device, dtype).contiguous()
        self.ctx_v = ctx_v.to(device, dtype).contiguous()
        self.own_k = torch.zeros(slots, H, slot_tokens, D, dtype=dtype, device=device)  # zeros: 0 * garbage = NaN
        self.own_v = torch.zeros_like(self.own_k)
        self.own = own  # [B] the slots' own tokens before this step (shared by the dense layers)
        self.scratch = scratch
        if scratch is not None:
            from icecache.kernels.attention import dense_scratch_sizes
            for name, numel in dense_scratch_sizes(slots, H, scratch.group, D, n).items():
                scratch.need(name, numel)

    def slot_tensors(self) -> list[torch.Tensor]:
        return [self.own_k, self.own_v]

    def load(self, slot: int, own_k: torch.Tensor, own_v: torch.Tensor) -> None:
        m = own_k.shape[1]
        self.own_k[slot, :, :m] = own_k.to(self.own_k.device, self.own_k.dtype)
        self.own_v[slot, :, :m] = own_v.to(self.own_v.device, self.own_v.dtype)

    def attend(self, q, k, v, scaling: float) -> torch.Tensor:
        """q: [B, H, g, D]; k, v: [B, H, D] this step's token, stored at own[b]."""
        B = q.shape[0]
        rows = torch.arange(B, device=q.device)
        at = self.own[:B]
        self.own_k[rows, :, at] = k.to(self.own_k.dtype)
        self.own_v[rows, :, at] = v.to(self.own_v.dtype)
        if self.scratch is not None:
            from icecache.kernels.attention import dense_attention
            S = self.scratch
            return dense_attention(q.contiguous(), self.ctx_k, self.ctx_v, self.own_k, self.own_v, at,
                                   scaling, S["dense_parts"], S["dense_acc"], torch.empty_like(q))
        H, n = self.ctx_k.shape[:2]
        T = self.own_k.shape[2]
        outs = []
        for b in range(B):
            keys = torch.cat([self.ctx_k, self.own_k[b]], dim=1)
            values = torch.cat([self.ctx_v, self.own_v[b]], dim=1)
            mask = torch.cat([torch.ones(n, dtype=torch.bool, device=q.device),
                              torch.arange(T, device=q.device) <= at[b]])
            outs.append(decode_attention(q[b], keys, values, mask.expand(H, -1), scaling))
        return torch.stack(outs)


class _Ring:
    """The counters every sparse layer shares (they push the same tokens), per slot:
    tokens ever put in the window ring, tokens moved on to private pages. Layers read
    them during a step; advance() moves the first B slots' once at its end."""

    def __init__(self, slots: int, window: int, device: torch.device) -> None:
        self.counts = torch.zeros(slots, 2, dtype=torch.long, device=device)  # [B, 2]
        self.window = window

    def advance(self, B: int) -> None:
        c = self.counts[:B]
        c[:, 1:] += (c[:, :1] >= self.window).long()
        c[:, :1] += 1


class _Scratch:
    """Work buffers of the Triton path, one set shared by the layers (they run in turn)."""

    def __init__(self, device: torch.device, group: int) -> None:
        self.device, self.group, self.sizes, self.buffers = device, group, {}, {}

    def need(self, name: str, numel: int) -> None:
        self.sizes[name] = max(self.sizes.get(name, 0), numel)

    def allocate(self) -> None:
        from icecache.kernels.common import SCRATCH_DTYPES
        self.buffers = {n: torch.empty(size, dtype=SCRATCH_DTYPES.get(n, torch.float32), device=self.device)
                        for n, size in self.sizes.items()}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.buffers[name]


class _SparseState:
    """A sparse layer: the context's shared tree, host pages and sinks, and per slot a
    window ring and private pages. Per-slot tensors lead with the slot: [B, H, ...]."""

    def __init__(self, ctx_layer, slots: int, private_pages: int, config: IceCacheConfig, dtype: torch.dtype,
                 device: torch.device, ring: _Ring, scratch: _Scratch | None,
                 leader: "_SparseState | None" = None, device_pages: bool = False, layer: int = 0) -> None:
        H, _, D = ctx_layer.sink_k.shape
        self.leader = leader  # IceCache-reuse: the cycle's first layer, whose page selection this one uses
        self.last_ids: torch.Tensor | None = None  # this step's page ids [B * H, R] (read by the cycle's followers)
        P, W = config.page_size, ring.window
        self.H, self.P, self.W, self.R = H, P, W, config.retrieved_pages
        self.search_width = config.search_width
        self.page_heads = config.page_heads
        self.rerank, question = config.candidates
        self.selector = config.selector
        self.draw = random_draw(config.seed, layer)  # selector "random": + the slot's step count
        self.ring, self.scratch = ring, scratch
        self.pages = pages = ctx_layer.pages
        self.tree: TreeIndex = ctx_layer.tree
        self.num_shared = pages.num_pages
        self.device_pages = device_pages
        if device_pages:  # a copy in device memory: page reads at memory speed instead of over PCIe
            self.shared_k, self.shared_v = pages.keys.to(device), pages.values.to(device)
        else:
            self.shared_k, self.shared_v = uva_view(pages.keys, device), uva_view(pages.values, device)
        self.shared_valid = pages.valid.to(device)
        self.sink_k = ctx_layer.sink_k.to(device, dtype).contiguous()  # [H, num_sink, D]
        self.sink_v = ctx_layer.sink_v.to(device, dtype).contiguous()
        self.tail_k = ctx_layer.tail_k.to(device, dtype)  # [H, num_tail, D]: where every slot's window starts
        self.tail_v = ctx_layer.tail_v.to(device, dtype)
        cap = private_pages
        self.priv_k = torch.zeros(slots, H, cap, P, D, dtype=dtype, device=device)  # token n at page n // P
        self.priv_v = torch.zeros_like(self.priv_k)
        self.priv_valid = torch.zeros(slots, H, cap, dtype=torch.long, device=device)
        self.priv_lo = torch.zeros(slots, H, cap, D, dtype=dtype, device=device)  # page boxes, kept as tokens arrive
        self.priv_hi = torch.zeros_like(self.priv_lo)
        self.win_k = torch.zeros(slots, H, W, D, dtype=dtype, device=device)
        self.win_v = torch.zeros_like(self.win_k)
        # the pages each slot's question picked (IceCacheConfig.question_pages), candidates at every step
        self.question = torch.full((slots, H, question), -1, dtype=torch.long, device=device)
        if scratch is not None and leader is None:
            self._plan_kernels(slots, H, D)

    def slot_tensors(self) -> list[torch.Tensor]:
        return [self.priv_k, self.priv_v, self.priv_valid, self.priv_lo, self.priv_hi, self.win_k, self.win_v,
                self.question]

    def load(self, slot: int, own_k: torch.Tensor, own_v: torch.Tensor, cut: int, before: int = 0,
             question: torch.Tensor | None = None) -> None:
        """A request's recent tokens (the last `before` tokens of the context's middle, its
        tail, then the request's own prompt) into slot: the oldest `cut` of them into private
        pages, the rest into the window ring. question: [H, K] the pages its question picked."""
        dev, dtype, P = self.win_k.device, self.win_k.dtype, self.P
        self.question[slot] = -1
        if question is not None:  # fewer columns where the context has fewer pages than asked for
            self.question[slot, :, :question.shape[1]] = question.to(dev)
        more_k, more_v = recent_tokens(self.pages, before)
        recent_k = torch.cat([more_k.to(dev, dtype), self.tail_k, own_k.to(dev, dtype)], dim=1)
        recent_v = torch.cat([more_v.to(dev, dtype), self.tail_v, own_v.to(dev, dtype)], dim=1)
        self.priv_valid[slot].zero_()
        if cut:
            n = torch.arange(cut, device=dev)
            self.priv_k[slot][:, n // P, n % P] = recent_k[:, :cut]
            self.priv_v[slot][:, n // P, n % P] = recent_v[:, :cut]
            self.priv_valid[slot].index_add_(1, n // P, torch.ones(self.H, cut, dtype=torch.long, device=dev))
        self.priv_lo[slot], self.priv_hi[slot] = page_bounds(self.priv_k[slot], self.priv_valid[slot])
        w = recent_k.shape[1] - cut
        self.win_k[slot, :, :w], self.win_v[slot, :, :w] = recent_k[:, cut:], recent_v[:, cut:]

    # ------------------------------------------------------------ the Triton path (CUDA)
    def _plan_kernels(self, slots: int, H: int, D: int) -> None:
        from icecache.kernels.common import scratch_sizes
        from icecache.kernels.walk import WalkPlan
        self.plan = WalkPlan(self.tree, self.search_width)
        self.root = torch.zeros(slots * H, dtype=torch.int32, device=self.win_k.device)  # the top level's parent
        for name, numel in scratch_sizes(slots * H, self.scratch.group, D, self.plan, self.priv_valid.shape[2],
                                         self.sink_k.shape[1], self.R, self.W, self.P).items():
            self.scratch.need(name, numel)

    def _select_kernels(self, q: torch.Tensor, scaling: float) -> torch.Tensor:
        from icecache.kernels import walk
        tree, S = self.tree, self.scratch
        B = q.shape[0] // self.H
        top = None  # kept level-1 clusters
        if self.plan.levels:
            top = walk.walk_tree(q, self.plan, self.root, scaling, S["raw"], S["cand"], S["parts"], S["tops"])
        ids = walk.rank_pages(q, top, self.plan, tree.page_lo, tree.page_hi, tree.page_valid,
                              self.priv_lo[:B].flatten(0, 1), self.priv_hi[:B].flatten(0, 1),
                              self.priv_valid[:B].flatten(0, 1), scaling, self.R * self.rerank, S["raw"], S["cand"],
                              S["parts"], self.page_heads)
        if self.question.shape[2]:
            ids = torch.cat([ids, self.question[:B].flatten(0, 1).to(ids.dtype)], dim=1)
        if ids.shape[1] <= self.R:  # no more candidates than pages to keep: nothing to re-rank
            return ids
        private = (self.priv_k[:B].flatten(0, 1), self.priv_valid[:B].flatten(0, 1))
        if not _FUSED_RERANK_FAILED:
            from triton.errors import TritonError

            from icecache.kernels import rerank
            try:
                return rerank.rerank_pages(q, ids, self.shared_k, self.shared_valid, *private, self.R, scaling)
            except (TritonError, RuntimeError) as e:  # built at the first (eager) step: torch ops from then on
                _FUSED_RERANK_FAILED.append(repr(e))
                log.warning("the fused re-ranking kernel cannot run here (%r); re-ranking in torch ops", e)
        return rerank_pages(q, ids, (self.shared_k, self.shared_valid), private, self.R, scaling)

    def _attend_kernels(self, q, k, v, scaling: float) -> torch.Tensor:
        from icecache.kernels.attention import sparse_attention
        from icecache.kernels.push import push
        B, H, G, D = q.shape
        rows = lambda t: t[:B].flatten(0, 1)  # noqa: E731  [B, H, ...] -> [B * H, ...]
        push(rows(k).contiguous(), rows(v).contiguous(), rows(self.win_k), rows(self.win_v),
                     self.ring.counts[:B], rows(self.priv_k), rows(self.priv_v), rows(self.priv_valid),
                     rows(self.priv_lo), rows(self.priv_hi))
        qf = q.reshape(B * H, G, D)  # the kernels read it in fp32
        page_ids = self.select(qf, scaling)
        S = self.scratch
        out = sparse_attention(qf, self.sink_k, self.sink_v, page_ids, self.shared_k, self.shared_v,
                               self.shared_valid, rows(self.priv_k), rows(self.priv_v), rows(self.priv_valid),
                               rows(self.win_k), rows(self.win_v), self.ring.counts[:B], scaling, S["att_parts"],
                               S["att_acc"], torch.empty(B * H, G, D, dtype=q.dtype, device=q.device))
        return out.view(B, H, G, D), page_ids

    # ------------------------------------------------------------ the torch path (reference, CPU)
    def _push(self, b: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Slot b's new token into its ring; the token it replaces (once full) into private
        pages. Indices stay 1-element tensors: a 0-d tensor index would be read back to the host."""
        H, D = k.shape
        counts = self.ring.counts[b]
        win_k, win_v = self.win_k[b], self.win_v[b]
        slot = counts[:1] % self.W
        full = counts[:1] >= self.W
        flat_k = self.priv_k[b].view(H, -1, D)  # [H, cap * P, D]: private slot n is token n
        flat_v = self.priv_v[b].view(H, -1, D)
        at = counts[1:]
        old_k, old_v = win_k.index_select(1, slot), win_v.index_select(1, slot)  # [H, 1, D]
        flat_k.index_copy_(1, at, torch.where(full, old_k, flat_k.index_select(1, at)))
        flat_v.index_copy_(1, at, torch.where(full, old_v, flat_v.index_select(1, at)))
        page = at // self.P
        first = self.priv_valid[b].index_select(1, page)[..., None] == 0  # [H, 1, 1]: the page's first token
        self.priv_valid[b].index_add_(1, page, full.long().expand(H, 1))
        for box, extreme in ((self.priv_lo[b], torch.minimum), (self.priv_hi[b], torch.maximum)):
            old = box.index_select(1, page)  # [H, 1, D]
            box.index_copy_(1, page, torch.where(full, torch.where(first, old_k, extreme(old, old_k)), old))
        win_k.index_copy_(1, slot, k[:, None])
        win_v.index_copy_(1, slot, v[:, None])

    def select(self, q: torch.Tensor, scaling: float) -> torch.Tensor:
        """Page ids [B * H, R] (private pages offset by num_shared), -1 where none.
        q: [B * H, G, D] fp32, slot-major."""
        if self.leader is not None:  # same page layout as the leader: its choice names the same tokens
            return self.leader.last_ids
        if self.scratch is not None and self.selector == "icecache":
            self.last_ids = self._select_kernels(q, scaling)
            return self.last_ids
        self.last_ids = torch.cat([self._select_slot(b, qb, scaling) for b, qb in enumerate(q.split(self.H))])
        return self.last_ids

    def _select_slot(self, b: int, q: torch.Tensor, scaling: float) -> torch.Tensor:
        """Slot b's pages (the torch path; the comparison selectors on CUDA too: torch ops
        with fixed shapes, recorded in the step's graph)."""
        tree, R, selector = self.tree, self.R, self.selector
        if selector == "streaming":  # sinks + a window as wide as the rest of the budget: no pages
            return torch.full((self.H, R), -1, dtype=torch.long, device=q.device)
        if selector == "oracle":
            return oracle_pages(q, (self.shared_k, self.shared_valid), (self.priv_k[b], self.priv_valid[b]), R, scaling)
        if selector == "random":
            valid = torch.cat([self.shared_valid, self.priv_valid[b]], dim=1)
            return random_pages(valid, R, self.draw + self.ring.counts[b, :1])
        quest = selector == "quest"  # Quest: every page ranked by the max bound over the query heads, no walk
        parts = []
        if tree.num_pages:
            parts.append(shared_part(tree, None if quest else tree_keep(tree, q, self.search_width, scaling)))
        parts.append((self.priv_lo[b], self.priv_hi[b], self.priv_valid[b] > 0))
        ids = rank_pages(q, scaling, parts, R * self.rerank, "max" if quest else self.page_heads)
        if self.question.shape[2]:
            ids = torch.cat([ids, self.question[b]], dim=1)
        if ids.shape[1] <= R:
            return ids
        return rerank_pages(q, ids, (self.shared_k, self.shared_valid), (self.priv_k[b], self.priv_valid[b]), R,
                            scaling)

    def fetch(self, b: int, page_ids: torch.Tensor):
        """-> keys, values [H, R, P, D], valid [H, R] of slot b's selected pages."""
        H, R = page_ids.shape
        h = torch.arange(H, device=page_ids.device)[:, None].expand(H, R)
        priv_k, priv_v, priv_valid = self.priv_k[b], self.priv_v[b], self.priv_valid[b]
        shared = page_ids < self.num_shared
        sid = page_ids.clamp(0, max(self.shared_k.shape[1] - 1, 0))  # a real host page, even for private ids
        pid = (page_ids - self.num_shared).clamp(0, priv_k.shape[1] - 1)
        pick = shared[..., None, None]
        if self.shared_k.shape[1]:
            k = torch.where(pick, self.shared_k[h, sid].to(priv_k.dtype), priv_k[h, pid])
            v = torch.where(pick, self.shared_v[h, sid].to(priv_v.dtype), priv_v[h, pid])
            valid = torch.where(shared, self.shared_valid[h, sid], priv_valid[h, pid])
        else:
            k, v, valid = priv_k[h, pid], priv_v[h, pid], priv_valid[h, pid]
        return k, v, valid.masked_fill(page_ids < 0, 0)

    def attend(self, q, k, v, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [B, H, G, D]; k, v: [B, H, D] for the first B slots. -> (out [B, H, G, D], page ids [B * H, R])."""
        if self.scratch is not None:
            return self._attend_kernels(q, k, v, scaling)
        B, H = q.shape[:2]
        for b in range(B):
            self._push(b, k[b], v[b])
        page_ids = self.select(q.float().flatten(0, 1), scaling)
        return torch.stack([self._attend_slot(b, q[b], ids, scaling)
                            for b, ids in enumerate(page_ids.split(H))]), page_ids

    def _attend_slot(self, b: int, q: torch.Tensor, page_ids: torch.Tensor, scaling: float) -> torch.Tensor:
        pk, pv, valid = self.fetch(b, page_ids)
        H, R, P, D = pk.shape
        slot_ok = (torch.arange(P, device=q.device) < valid[..., None]).reshape(H, R * P)
        filled = torch.arange(self.W, device=q.device) < (self.ring.counts[b, :1] + 1).clamp(max=self.W)
        keys = torch.cat([self.sink_k, pk.reshape(H, R * P, D), self.win_k[b]], dim=1)
        values = torch.cat([self.sink_v, pv.reshape(H, R * P, D), self.win_v[b]], dim=1)
        mask = torch.cat([torch.ones(H, self.sink_k.shape[1], dtype=torch.bool, device=q.device), slot_ok,
                          filled.expand(H, -1)], dim=1)
        return decode_attention(q, keys, values, mask, scaling)


def use_kernels(device: torch.device, config: IceCacheConfig, head_dim: int, group: int, widest_row: int) -> bool:
    """Whether sparse layers run as Triton kernels: on CUDA, for shapes they support and
    rows (a tree level, a layer's pages) they rank in registers; otherwise the torch path
    (ICECACHE_KERNELS=0 forces the torch path, =1 the kernels, e.g. interpreted on CPU)."""
    forced = os.environ.get("ICECACHE_KERNELS")
    if forced is not None:
        return forced == "1"
    if device.type != "cuda":
        return False
    from icecache.kernels.common import MAX_SELECT, supported
    return supported(head_dim, config.page_size, group) and widest_row <= MAX_SELECT


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
                 question_pages: dict[int, torch.Tensor] | None = None) -> None:
        """slot_tokens: the most own tokens (prompt + decoded) a slot holds; with own_kv,
        at least its prompt plus max_new_tokens. device_pages: copy the context's host
        pages into device memory (for a document many requests read at once: one copy
        serves them all, and page reads stop being bound by PCIe); by default they are
        read in place from host memory. question_pages: the one request's (RequestKV's)."""
        self.model, self.config, self.context = model, config, context
        inner = model.model
        self.embed, self.layers, self.norm, self.rotary = inner.embed_tokens, inner.layers, inner.norm, inner.rotary_emb
        attn0 = self.layers[0].self_attn
        self.apply_rope = sys.modules[type(attn0).__module__].apply_rotary_pos_emb
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.head_dim = attn0.head_dim
        self.num_kv_heads = model.config.num_key_value_heads
        self.group = model.config.num_attention_heads // self.num_kv_heads
        own_len = own_kv[0][0].shape[1] if own_kv else 0
        need = own_len + max_new_tokens + 1
        self.slots, self.slot_tokens = slots, max(slot_tokens or 0, need)
        num_layers = len(self.layers)
        sparse_layers = [i for i in range(num_layers) if i not in context.dense and config.mode != "full"]
        # the window ring; StreamingLLM (selector "streaming") widens it to the budget past the sinks
        window = config.token_budget - config.sink_tokens if config.selector == "streaming" else config.window_tokens
        self.ring = _Ring(slots, window, self.device) if sparse_layers else None
        self.own = torch.zeros(slots, dtype=torch.long, device=self.device)  # own tokens per slot (dense layers)
        # a slot's tokens that leave the window go to private pages: at most tail + own of them
        private_pages = (context.num_tail + self.slot_tokens) // config.page_size + 2
        widest = max([max((context.sparse[i].pages.num_pages for i in sparse_layers), default=0) + private_pages] +
                     [n for i in sparse_layers for n in context.sparse[i].tree.level_sizes()])
        # the model's norms and rotary embedding as fused kernels wherever the sparse kernels could run
        self.fused = use_kernels(self.device, config, self.head_dim, self.group, 0)
        self._merged = [self._merge(layer) if self.fused else (None, None) for layer in self.layers]
        kernel_layers = use_kernels(self.device, config, self.head_dim, self.group, widest)
        self.scratch = _Scratch(self.device, self.group) if kernel_layers else None
        self.states: list[_SparseState | _DenseState] = []
        for i in range(num_layers):
            if i in sparse_layers:
                leader = context.cycle_leader(i)
                self.states.append(_SparseState(context.sparse[i], slots, private_pages, config, self.dtype,
                                                self.device, self.ring, self.scratch,
                                                self.states[leader] if leader != i else None, device_pages, i))
            else:
                ck, cv = context.flat_kv(i)
                self.states.append(_DenseState(ck, cv, slots, self.slot_tokens, self.dtype, self.device, self.own,
                                               self.scratch))
        if self.scratch is not None:
            self.scratch.allocate()
        self._slot_tensors = [t for s in self.states for t in s.slot_tensors()] + [self.own] + (
            [self.ring.counts] if self.ring is not None else [])
        self.last_pages: list[torch.Tensor | None] = [None] * num_layers
        self._token = torch.zeros(slots, 1, dtype=torch.long, device=self.device)
        self._position = torch.zeros(slots, 1, dtype=torch.long, device=self.device)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}  # batch size -> graph, its logits
        self._pool = None  # one memory pool for every batch size's graph (they never run at once)
        self._eager: set[int] = set()  # batch sizes whose capture failed
        self._runs: dict[int, int] = {}  # eager steps per batch size not yet captured
        if own_kv is not None:
            self.load(0, own_kv, max_new_tokens, question_pages)

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
            if self.config.selector == "streaming":
                before = max(0, min(window - recent, ctx.num_tokens - ctx.num_sink - ctx.num_tail))
            recent += before
            cut = max(0, recent - window)  # the oldest of them start in private pages
            self.ring.counts[slot, 0], self.ring.counts[slot, 1] = recent - cut, cut
        for i, (state, (k, v)) in enumerate(zip(self.states, own_kv)):
            if isinstance(state, _SparseState):
                state.load(slot, k, v, cut, before, (question_pages or {}).get(i))
            else:
                state.load(slot, k, v)

    def move(self, src: int, dst: int) -> None:
        """Slot src's request into slot dst (e.g. the last slot into a freed one)."""
        if src != dst:
            for t in self._slot_tensors:
                t[dst].copy_(t[src])

    # ---------------------------------------------------------------- steps
    def _norm(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            from icecache.kernels.model import can_fuse_norm, rms_norm
            if can_fuse_norm(module, x):
                return rms_norm(x, module)
        return module(x)

    def _add_norm(self, h: torch.Tensor, delta: torch.Tensor | None,
                  module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(h + delta, module(h + delta)); one kernel where the norm can be fused (h is
        then updated in place)."""
        if delta is None:
            return h, self._norm(module, h)
        if self.fused:
            from icecache.kernels.model import add_rms_norm, can_fuse_norm
            if can_fuse_norm(module, h) and delta.dtype == h.dtype and delta.shape == h.shape:
                return h, add_rms_norm(h, delta.contiguous(), module)
        h = h + delta
        return h, self._norm(module, h)

    @staticmethod
    def _merge(layer: torch.nn.Module) -> tuple:
        """The layer's q/k/v and (for a SiLU-gated MLP) gate/up projections merged into one
        weight each (kernels.model.merge_linears), or None where they cannot be."""
        from icecache.kernels.model import merge_linears
        attn, mlp = layer.self_attn, layer.mlp
        qkv = merge_linears([attn.q_proj, attn.k_proj, attn.v_proj])
        gate_up = None
        if (all(hasattr(mlp, n) for n in ("gate_proj", "up_proj", "down_proj"))
                and type(getattr(mlp, "act_fn", None)).__name__ in ("SiLU", "SiLUActivation")):
            gate_up = merge_linears([mlp.gate_proj, mlp.up_proj])
        return qkv, gate_up

    def _mlp(self, i: int, x: torch.Tensor) -> torch.Tensor:
        gate_up = self._merged[i][1]
        if gate_up is None:
            return self.layers[i].mlp(x)
        from icecache.kernels.model import silu_mul
        return self.layers[i].mlp.down_proj(silu_mul(torch.nn.functional.linear(x, *gate_up)))

    @torch.inference_mode()
    def _forward(self, B: int) -> torch.Tensor:
        """The next token of slots 0..B-1 (in _token/_position). -> logits [B, vocab]."""
        h = self.embed(self._token[:B])  # [B, 1, hidden]
        cos, sin = self.rotary(h, self._position[:B])  # [B, 1, D]
        H, g, D = self.num_kv_heads, self.group, self.head_dim
        delta = None  # what the last block adds to h, folded into the next norm
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            h, x = self._add_norm(h, delta, layer.input_layernorm)
            qkv = self._merged[i][0]
            if qkv is not None:
                q, k, v = torch.nn.functional.linear(x, *qkv).split([H * g * D, H * D, H * D], dim=-1)
                q, k, v = q.view(B, 1, H * g, D), k.view(B, 1, H, D), v.reshape(B, H, D)
            else:
                q = attn.q_proj(x).view(B, 1, H * g, D)
                k = attn.k_proj(x).view(B, 1, H, D)
                v = attn.v_proj(x).view(B, H, D)
            if hasattr(attn, "q_norm"):  # Qwen3
                q, k = self._norm(attn.q_norm, q.contiguous()), self._norm(attn.k_norm, k.contiguous())
            if self.fused:
                from icecache.kernels.model import rope
                q, k = rope(q.view(B, H * g, D), k.view(B, H, D), cos.view(B, D), sin.view(B, D))
            else:
                q, k = self.apply_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # [B, heads, 1, D]
            out = self.states[i].attend(q.reshape(B, H, g, D), k.reshape(B, H, D), v, attn.scaling)
            if isinstance(out, tuple):
                out, self.last_pages[i] = out
            h, x = self._add_norm(h, attn.o_proj(out.reshape(B, 1, H * g * D)), layer.post_attention_layernorm)
            delta = self._mlp(i, x)
        self.own[:B] += 1
        if self.ring is not None:
            self.ring.advance(B)
        h, x = self._add_norm(h, delta, self.norm)
        return self.model.lm_head(x)[:, -1].float()

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
        B = len(tokens)
        if not 0 < B <= self.slots:
            raise ValueError(f"tokens: {B} for a decoder of {self.slots} slots")
        padded = self.padded_batch(B)
        self._token[:B, 0] = torch.tensor(tokens)
        self._position[:B, 0] = torch.tensor(positions)
        if padded > B:  # free slots: no own tokens, an empty window (their counters must not run past a slot)
            self._token[B:padded] = 0
            self._position[B:padded] = 0
            self.own[B:padded] = 0
            if self.ring is not None:
                self.ring.counts[B:padded] = 0
        if padded in self._graphs:
            self._graphs[padded][0].replay()
            return self._graphs[padded][1][:B]
        logits = self._forward(padded)
        self._runs[padded] = self._runs.get(padded, 0) + 1
        if graph and self._runs[padded] >= CAPTURE_AFTER:
            self._try_capture(padded)
        return logits[:B]

    @property
    def sparse_states(self) -> list[_SparseState]:
        """The sparse layers' per-layer state, in layer order (benchmarks time its parts)."""
        return [s for s in self.states if isinstance(s, _SparseState)]

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
        views are not counted; a device_pages copy is)."""
        tensors = {}  # by address: a reuse cycle's layers share one tree
        for s in self.states:
            for name, t in vars(s).items():
                uva = name in ("shared_k", "shared_v") and not getattr(s, "device_pages", False)
                if isinstance(t, torch.Tensor) and not uva:
                    tensors[t.data_ptr()] = t
            if isinstance(s, _SparseState):
                tensors.update((t.data_ptr(), t) for t in s.tree.tensors())
        if self.scratch is not None:
            tensors.update((t.data_ptr(), t) for t in self.scratch.buffers.values())
        return sum(t.numel() * t.element_size() for t in tensors.values() if t.device == self.device)

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
        graph = torch.cuda.CUDAGraph()
        # thread_local: other threads of the process (e.g. one page-locking a new segment) may make
        # calls a capture forbids without breaking this one. No garbage collection while recording:
        # a collected tensor's free can settle CUDA events, which a capture forbids (a suspect of
        # the rare failed captures seen on the H200; unconfirmed)
        collecting = gc.isenabled()
        gc.disable()
        try:
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                logits = self._forward(B)
        finally:
            if collecting:
                gc.enable()
        self._graphs[B] = (graph, logits)
