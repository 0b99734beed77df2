"""One layer's decode state on the static path, for every slot of a StaticDecoder:
DenseSlots (a dense layer: the context's KV on the device, each slot's own tokens) and
SparseSlots (a sparse layer: the shared tree and pages read in place, each slot's window
ring and private pages), with the window Ring and kernel Scratch the layers share.
A sparse layer selects its pages and attends either through the Triton kernels
(icecache/kernels/, on CUDA) or through torch ops (the kernels' reference, and the CPU path).
"""

from __future__ import annotations

import logging
import os

import torch

from icecache.attention import attend_parts, decode_attention, unselected_part
from icecache.config import IceCacheConfig
from icecache.index.select import (box_parts, fixed_log_mass, private_part, rank_pages, rerank_pages, shared_part,
                                   tree_keep)
from icecache.index.tree import TreeIndex, page_bounds, page_moments, welford
from icecache.selectors import SELECTORS, PageView, random_draw
from icecache.store import page_rows, shared_rows

log = logging.getLogger(__name__)

# why a kernels.rerank kernel could not build or run in this process, by kernel ("flat", or "split"
# for the share split's): a failure switches only that one to torch ops
FUSED_RERANK_FAILED: dict[str, str] = {}


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


class DenseSlots:
    """A dense layer: the context's whole KV on the device, once for every request (read
    once per step for the whole batch), plus each slot's own tokens [B, H, T, D]."""

    def __init__(self, ctx_k: torch.Tensor, ctx_v: torch.Tensor, slots: int, slot_tokens: int, dtype: torch.dtype,
                 device: torch.device, own: torch.Tensor, scratch: "Scratch | None") -> None:
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


class Ring:
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


class Scratch:
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


class SlotStack:
    """Every sparse layer's per-slot state, one tensor per kind with the sparse layers first:
    [L, slots, H, ...] (SparseSlots of sparse layer j holds the views [slots, H, ...] at j).
    A request is loaded into its slot for all L layers at once: a few dozen ops, where a
    load per layer took ~30 each (on an H200 ~26 ms a request for an 8B model: a burst of 16
    questions waited 0.4 s between its first and second tokens)."""

    def __init__(self, tails: list[tuple[torch.Tensor, torch.Tensor]], slots: int, private_pages: int,
                 page_size: int, window: int, question: int, dtype: torch.dtype, device: torch.device,
                 ranked: int = 0) -> None:
        """tails: each sparse layer's context tail (K, V) [H, num_tail, D], where every slot's
        window starts. question: columns for the pages each slot's question picked; ranked:
        columns after them for the pages a step ranks (the kernels' candidates, written in place)."""
        L, (H, _, D), cap, P = len(tails), tails[0][0].shape, private_pages, page_size
        self.page_size = P
        self.tail_k = torch.stack([k for k, _ in tails]).to(device, dtype)  # [L, H, num_tail, D]
        self.tail_v = torch.stack([v for _, v in tails]).to(device, dtype)
        self.priv_k = torch.zeros(L, slots, H, cap, P, D, dtype=dtype, device=device)  # token n at page n // P
        self.priv_v = torch.zeros_like(self.priv_k)
        self.priv_valid = torch.zeros(L, slots, H, cap, dtype=torch.long, device=device)
        self.priv_lo = torch.zeros(L, slots, H, cap, D, dtype=dtype, device=device)  # page boxes, kept as tokens arrive
        self.priv_hi = torch.zeros_like(self.priv_lo)
        self.priv_mean = torch.zeros_like(self.priv_lo)  # page moments, kept as tokens arrive
        self.priv_var = torch.zeros_like(self.priv_lo)
        self.win_k = torch.zeros(L, slots, H, window, D, dtype=dtype, device=device)
        self.win_v = torch.zeros_like(self.win_k)
        # a step's candidates: the pages each slot's question picked (IceCacheConfig.question_pages),
        # loaded with the request, then those the step ranks (written by the kernels each step)
        ranked = ranked if question else 0  # without question pages the kernels rank into a buffer of their own
        self.candidates = torch.full((L, slots, H, question + ranked), -1, dtype=torch.long, device=device)
        self.question = self.candidates[..., :question]

    def slot_tensors(self) -> list[torch.Tensor]:
        """The per-slot tensors ([L, slots, ...]: the slot is dimension 1)."""
        return [self.priv_k, self.priv_v, self.priv_valid, self.priv_lo, self.priv_hi, self.priv_mean, self.priv_var,
                self.win_k, self.win_v, self.question]

    def load(self, slot: int, own_k: torch.Tensor, own_v: torch.Tensor, cut: int,
             more: tuple[torch.Tensor, torch.Tensor] | None = None, question: torch.Tensor | None = None) -> None:
        """A request's recent tokens in every sparse layer (the last tokens of the context's
        middle `more` [L, H, b, D] if any, its tail, then the request's own prompt own_k/v
        [L, H, m, D]) into slot: the oldest `cut` of them into private pages, the rest into
        the window ring. question: [L, H, K] the pages its question picked (-1 = none)."""
        dev, dtype, P = self.win_k.device, self.win_k.dtype, self.page_size
        L, _, H = self.priv_valid.shape[:3]
        self.question[:, slot] = -1
        if question is not None:  # fewer columns where the context has fewer pages than asked for
            self.question[:, slot, :, :question.shape[2]] = question.to(dev)
        parts_k, parts_v = [self.tail_k, own_k.to(dev, dtype)], [self.tail_v, own_v.to(dev, dtype)]
        if more is not None:
            parts_k.insert(0, more[0].to(dev, dtype))
            parts_v.insert(0, more[1].to(dev, dtype))
        recent_k, recent_v = torch.cat(parts_k, dim=2), torch.cat(parts_v, dim=2)  # [L, H, r, D]
        valid = self.priv_valid[:, slot]  # [L, H, cap]
        valid.zero_()
        for box in (self.priv_lo, self.priv_hi, self.priv_mean, self.priv_var):
            box[:, slot].zero_()  # an empty page's boxes and moments are 0
        if cut:
            n = torch.arange(cut, device=dev)
            self.priv_k[:, slot][:, :, n // P, n % P] = recent_k[:, :, :cut]
            self.priv_v[:, slot][:, :, n // P, n % P] = recent_v[:, :, :cut]
            valid.index_add_(2, n // P, torch.ones(L, H, cut, dtype=torch.long, device=dev))
            used = -(-cut // P)  # the pages holding tokens
            keys = self.priv_k[:, slot, :, :used].reshape(L * H, used, P, -1)
            counts = valid[..., :used].reshape(L * H, used)
            for (lo, hi), (a, b) in (((self.priv_lo, self.priv_hi), page_bounds(keys, counts)),
                                     ((self.priv_mean, self.priv_var), page_moments(keys, counts))):
                lo[:, slot, :, :used] = a.view(L, H, used, -1)
                hi[:, slot, :, :used] = b.view(L, H, used, -1)
        w = recent_k.shape[2] - cut
        self.win_k[:, slot, :, :w], self.win_v[:, slot, :, :w] = recent_k[:, :, cut:], recent_v[:, :, cut:]


class SparseSlots:
    """A sparse layer: the context's shared tree, host pages and sinks, and per slot a
    window ring and private pages. Per-slot tensors lead with the slot: [B, H, ...]."""

    def __init__(self, ctx_layer, stack: SlotStack, index: int, config: IceCacheConfig, dtype: torch.dtype,
                 device: torch.device, ring: Ring, scratch: Scratch | None,
                 leader: "SparseSlots | None" = None, device_pages: bool = False, layer: int = 0) -> None:
        """stack: the per-slot state of every sparse layer, this one's at `index`."""
        H, _, D = ctx_layer.sink_k.shape
        slots, cap = stack.priv_valid.shape[1], stack.priv_valid.shape[3]
        self.leader = leader  # IceCache-reuse: the cycle's first layer, whose page selection this one uses
        # this step's page ids [B * H, page_slots] (read by the cycle's followers)
        self.last_ids: torch.Tensor | None = None
        P, W = config.page_size, ring.window
        self.H, self.P, self.W, self.R = H, P, W, config.retrieved_pages
        self.splits_heads = config.splits_heads  # a layer's pages split among its KV heads by share
        self.page_slots = config.page_slots  # page ids a row holds: R, or 2R when split
        self.search_width = config.search_width
        self.page_heads = config.page_heads
        self.ranked, question = config.ranked_pages, config.candidates[1]  # moment-ranked pages, question pages
        self.selector = SELECTORS[config.selector]
        self.draw = random_draw(config.seed, layer)  # selector "random": + the slot's step count
        self.ring, self.scratch = ring, scratch
        self.pages = pages = ctx_layer.pages
        self.tree: TreeIndex = ctx_layer.tree
        self.num_shared = pages.num_pages
        self.pages_from = ctx_layer.sink_k.shape[1]  # a flat copy's first page row: after the sinks
        self.device_pages = device_pages
        if device_pages:  # a copy in device memory: page reads at memory speed instead of over PCIe
            self.shared_k, self.shared_v = pages.keys.to(device), pages.values.to(device)
        else:
            self.shared_k, self.shared_v = uva_view(pages.keys, device), uva_view(pages.values, device)
        self.shared_valid = pages.valid.to(device)
        self.sink_k = ctx_layer.sink_k.to(device, dtype).contiguous()  # [H, num_sink, D]
        self.sink_v = ctx_layer.sink_v.to(device, dtype).contiguous()
        # per slot (views of the stack): private pages (token n at page n // P), their boxes and
        # moments (kept as tokens arrive), the window ring, the pages the question picked
        self.priv_k, self.priv_v, self.priv_valid = stack.priv_k[index], stack.priv_v[index], stack.priv_valid[index]
        self.priv_lo, self.priv_hi = stack.priv_lo[index], stack.priv_hi[index]
        self.priv_mean, self.priv_var = stack.priv_mean[index], stack.priv_var[index]
        self.win_k, self.win_v, self.question = stack.win_k[index], stack.win_v[index], stack.question[index]
        self.candidates = stack.candidates[index]  # [slots, H, question + ranked]: the question's, then a step's
        # the budget holds every page the slots can have (a short context): no search, all of
        # them every step, as the dynamic path does; -1 for empty shared pages
        self.everything = None
        if self.num_shared + cap <= self.R and not self.selector.window_fills_budget:
            shared = torch.where(self.shared_valid > 0, torch.arange(self.num_shared, device=device), -1)  # [H, N]
            private = torch.arange(cap, device=device).expand(H, cap) + self.num_shared
            ids = torch.cat([shared, private, shared.new_full((H, self.R - self.num_shared - cap), -1)], dim=1)
            self.everything = ids.repeat(slots, 1)  # [slots * H, R]
        # IceCacheConfig.unselected: every shared page's key and value means, read each step from the
        # device (not where every page is retrieved anyway); a layer with its own tree has the key
        # means there already (IceCache-reuse's followers copy theirs)
        self.rest = None
        if config.estimates_rest and self.num_shared and self.everything is None:
            key_mean = pages.key_mean if leader is not None else self.tree.page_mean
            self.rest = (key_mean.to(device, dtype).contiguous(), pages.value_mean.to(device, dtype).contiguous())
        # the question's pages' keys, copied to the device once: the re-ranking kernel reads them
        # every step, 3x the PCIe traffic of the pages it keeps otherwise (the kernel path; nothing
        # to copy where the pages lie on the device already, or where no step searches)
        searches = scratch is not None and leader is None and self.everything is None
        self.copies = question if searches and not device_pages and pages.num_pages else 0
        self.question_k = torch.zeros(slots, H, self.copies, P, D, dtype=dtype, device=device)
        self.read_shared_from(None)
        if scratch is not None and leader is None:
            self._plan_kernels(slots, H, D)

    def read_shared_from(self, rows: tuple[torch.Tensor, torch.Tensor] | None) -> None:
        """Where the kernels read the shared pages: rows = the context's flat (K, V) [H, T, D]
        on the device (its sinks, then its pages' valid tokens in page order, as
        runner.ContextReader lays them out: a resident context), or None for the pages
        themselves (shared_k/v: host memory through UVA, or a device_pages copy). The torch
        path always reads shared_k/v."""
        slots, H, _, P, D = self.question_k.shape
        if rows is None:
            self.rows_k, self.rows_v, self.rows_at = shared_rows(self.shared_k, self.shared_v, self.shared_valid,
                                                                 None)
            if self.question_k.shape[2] != self.copies:  # back from a device copy: every slot's questions' keys
                self.question_k = self._question_keys(self.question).to(self.question_k.dtype)
            return
        k, v = rows
        if k.shape[0] != H or k.shape[2] != D or k.device != self.shared_valid.device:
            raise ValueError(f"rows: a [{H}, tokens, {D}] copy on {self.shared_valid.device} for this layer, "
                             f"got {tuple(k.shape)} on {k.device}")
        self.rows_k, self.rows_v = k.contiguous(), v.contiguous()
        self.rows_at = page_rows(self.shared_valid, self.pages_from)
        # the re-ranking reads the questions' pages from the copy as well: no keys of ours to keep
        self.question_k = self.question_k.new_zeros(slots, H, 0, P, D)

    def slot_tensors(self) -> list[torch.Tensor]:
        """This layer's own per-slot tensors (the rest are its stack's)."""
        return [self.question_k]

    def copy_question_keys(self, slot: int) -> None:
        """The keys of the pages slot's question picked (self.question, loaded by the stack),
        copied to the device once for the re-ranking: one read of them, not one a step
        (nothing while the pages are read from a device copy of the context)."""
        if self.question_k.shape[2]:
            self.question_k[slot] = self._question_keys(self.question[slot])

    def _question_keys(self, question: torch.Tensor) -> torch.Tensor:
        """The keys of question pages [..., H, K] (-1 = none: page 0's, never read) -> [..., H, K, P, D]."""
        heads = torch.arange(self.H, device=question.device)[:, None]
        return self.shared_k[heads, question.clamp_min(0)]

    # ------------------------------------------------------------ the Triton path (CUDA)
    def _plan_kernels(self, slots: int, H: int, D: int) -> None:
        from icecache.kernels.common import scratch_sizes
        from icecache.kernels.walk import WalkPlan
        self.plan = WalkPlan(self.tree, self.search_width)
        self.root = torch.zeros(slots * H, dtype=torch.int32, device=self.win_k.device)  # the top level's parent
        needs = scratch_sizes(slots * H, self.scratch.group, D, self.plan, self.priv_valid.shape[2],
                              self.sink_k.shape[1], self.page_slots, self.W, self.P)
        if self.rest is not None:
            from icecache.kernels.attention import rest_scratch_sizes
            needs.update(rest_scratch_sizes(slots, H, self.scratch.group, D, self.num_shared))
        for name, numel in needs.items():
            self.scratch.need(name, numel)

    def _select_kernels(self, q: torch.Tensor, scaling: float) -> torch.Tensor:
        from icecache.kernels import walk
        tree, S = self.tree, self.scratch
        B = q.shape[0] // self.H
        top = None  # kept level-1 clusters
        if self.plan.levels:
            top = walk.walk_tree(q, self.plan, self.root, scaling, S["raw"], S["cand"], S["parts"], S["tops"])
        Q = self.question.shape[2]
        # the question's pages first (where a page is named twice, its device copy is the one
        # read), the ranked ones written after them in place: no copy of the question's per step
        every = self.candidates[:B].flatten(0, 1)
        ids = walk.rank_pages(q, top, self.plan, tree.page_mean, tree.page_var, tree.page_valid,
                              self.priv_mean[:B].flatten(0, 1), self.priv_var[:B].flatten(0, 1),
                              self.priv_valid[:B].flatten(0, 1), scaling, self.ranked, S["raw"], S["cand"],
                              S["parts"], self.page_heads, every[:, Q:] if Q else None)
        if Q:
            ids = every
        if ids.shape[1] <= self.R:  # no more candidates than pages to keep: nothing to re-rank
            return ids
        private = (self.priv_k[:B].flatten(0, 1), self.priv_valid[:B].flatten(0, 1))
        kernel = "split" if self.splits_heads else "flat"
        if kernel not in FUSED_RERANK_FAILED:
            from triton.errors import TritonError

            from icecache.kernels import rerank
            fixed = (self.sink_k, self.win_k[:B].flatten(0, 1), self.ring.counts[:B]) if self.splits_heads else None
            try:
                return rerank.rerank_pages(q, ids, self.rows_k, self.shared_valid, *private, self.R, scaling,
                                           self.question_k[:B].flatten(0, 1), self.rows_at, fixed=fixed)
            except (TritonError, RuntimeError) as e:  # built at the first (eager) step: torch ops from then on
                FUSED_RERANK_FAILED[kernel] = repr(e)
                log.warning("the fused re-ranking kernel (%s) cannot run here (%r); re-ranking in torch ops",
                            kernel, e)
        fixed = self._fixed_log_mass(q, slice(0, B), scaling) if self.splits_heads else None
        return rerank_pages(q, ids, (self.shared_k, self.shared_valid), private, self.R, scaling, fixed)

    def _attend_kernels(self, q, k, v, scaling: float) -> torch.Tensor:
        from icecache.kernels.attention import sparse_attention
        from icecache.kernels.push import push
        B, H, G, D = q.shape
        rows = lambda t: t[:B].flatten(0, 1)  # noqa: E731  [B, H, ...] -> [B * H, ...]
        push(rows(k).contiguous(), rows(v).contiguous(), rows(self.win_k), rows(self.win_v), self.ring.counts[:B],
             rows(self.priv_k), rows(self.priv_v), rows(self.priv_valid), rows(self.priv_lo), rows(self.priv_hi),
             rows(self.priv_mean), rows(self.priv_var))
        qf = q.reshape(B * H, G, D)  # the kernels read it in fp32
        page_ids = self.select(qf, scaling)
        S = self.scratch
        out = sparse_attention(qf, self.sink_k, self.sink_v, page_ids, self.rows_k, self.rows_v,
                               self.shared_valid, rows(self.priv_k), rows(self.priv_v), rows(self.priv_valid),
                               rows(self.win_k), rows(self.win_v), self.ring.counts[:B], scaling, S,
                               torch.empty(B * H, G, D, dtype=q.dtype, device=q.device), self.rows_at, self.rest)
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
        mean, var = self.priv_mean[b], self.priv_var[b]
        old_mean, old_var = mean.index_select(1, page).float(), var.index_select(1, page).float()
        size = self.priv_valid[b].index_select(1, page)[..., None]  # [H, 1, 1], the new key counted
        new_mean, new_var = welford(old_mean, old_var, old_k.float(), size)
        mean.index_copy_(1, page, torch.where(full, new_mean.to(mean.dtype), mean.index_select(1, page)))
        var.index_copy_(1, page, torch.where(full, new_var.to(var.dtype), var.index_select(1, page)))
        win_k.index_copy_(1, slot, k[:, None])
        win_v.index_copy_(1, slot, v[:, None])

    def select(self, q: torch.Tensor, scaling: float) -> torch.Tensor:
        """Page ids [B * H, <= page_slots] (private pages offset by num_shared), -1 where none.
        q: [B * H, G, D] fp32, slot-major."""
        if self.leader is not None:  # same page layout as the leader: its choice names the same tokens
            return self.leader.last_ids
        if self.everything is not None:  # every page, the private ones while they hold tokens
            ids, N, M = self.everything[:q.shape[0]], self.num_shared, self.priv_valid.shape[2]
            own = torch.where(self.priv_valid[:q.shape[0] // self.H].flatten(0, 1) > 0, ids[:, N:N + M], -1)
            self.last_ids = torch.cat([ids[:, :N], own, ids[:, N + M:]], dim=1)
            return self.last_ids
        if self.scratch is not None and self.selector.walks_tree:
            self.last_ids = self._select_kernels(q, scaling)
            return self.last_ids
        self.last_ids = torch.cat([self._select_slot(b, qb, scaling) for b, qb in enumerate(q.split(self.H))])
        return self.last_ids

    def _select_slot(self, b: int, q: torch.Tensor, scaling: float) -> torch.Tensor:
        """Slot b's pages (the torch path; the comparison selectors on CUDA too: torch ops
        with fixed shapes, recorded in the step's graph)."""
        tree, R = self.tree, self.R
        if self.selector.window_fills_budget:  # sinks + a window as wide as the rest of the budget: no pages
            return torch.full((self.H, R), -1, dtype=torch.long, device=q.device)
        if self.selector.pages is not None:
            bounds = lambda: box_parts(tree, (self.priv_lo[b], self.priv_hi[b], self.priv_valid[b]))  # noqa: E731
            view = PageView((self.shared_k, self.shared_valid), (self.priv_k[b], self.priv_valid[b]), bounds,
                            self.draw + self.ring.counts[b, :1])
            return self.selector.pages(q, view, R, scaling)
        parts = [shared_part(tree, tree_keep(tree, q, self.search_width, scaling))] if tree.num_pages else []
        parts.append(private_part(self.priv_mean[b], self.priv_var[b], self.priv_valid[b]))
        ids = rank_pages(q, scaling, parts, self.ranked, self.page_heads)
        if self.question.shape[2]:  # first, as on the kernel path
            ids = torch.cat([self.question[b], ids], dim=1)
        if ids.shape[1] <= R:
            return ids
        fixed = self._fixed_log_mass(q, slice(b, b + 1), scaling) if self.splits_heads else None
        return rerank_pages(q, ids, (self.shared_k, self.shared_valid), (self.priv_k[b], self.priv_valid[b]), R,
                            scaling, fixed)

    def _window_filled(self, slots: int | slice) -> torch.Tensor:
        """Which window ring slots hold a token this step (the new one pushed): [W] for a
        slot, [n, W] for a slice of n."""
        return torch.arange(self.W, device=self.win_k.device) < (self.ring.counts[slots, :1] + 1).clamp(max=self.W)

    def _fixed_log_mass(self, q: torch.Tensor, slots: slice, scaling: float) -> torch.Tensor:
        """The slots' log-mass over their sinks and filled window, per query head (the share
        split's denominator). q: [n * H, G, D] (n slots). -> [n * H, G]."""
        filled = self._window_filled(slots)  # [n, W]
        n, S = filled.shape[0], self.sink_k.shape[1]
        keys = torch.cat([self.sink_k.repeat(n, 1, 1), self.win_k[slots].flatten(0, 1)], dim=1)
        filled = torch.cat([filled.new_ones(n, S), filled], dim=1).repeat_interleave(self.H, dim=0)
        return fixed_log_mass(q, keys, filled, scaling)

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
        """q: [B, H, G, D]; k, v: [B, H, D] for the first B slots. -> (out [B, H, G, D], page ids
        [B * H, <= page_slots])."""
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
        filled = self._window_filled(b)
        parts = [(self.sink_k, self.sink_v, None), (pk.reshape(H, R * P, D), pv.reshape(H, R * P, D), slot_ok),
                 (self.win_k[b], self.win_v[b], filled.expand(H, -1))]
        if self.rest is not None:  # the pages left out, each by its means (IceCacheConfig.unselected)
            parts.append(unselected_part(*self.rest, self.shared_valid, page_ids))
        return attend_parts(q, parts, scaling)


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
