"""The transformers integration: a registered attention function that routes every
attention call of a forward pass to the per-request KV state below.

The model computes q, k, v (with RoPE) as usual; our function receives them, keeps the
new k/v in the request's own state, and computes exact (prefill) or sparse (decode)
attention. All per-request state lives in `RequestKV` objects passed through the
forward call's kwargs, never in the model or module globals.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface

from icecache.attention import attend_parts, unselected_part
from icecache.config import IceCacheConfig
from icecache.context import Context
from icecache.gpu_pool import PagePool
from icecache.index.select import all_pages, box_parts, fixed_log_mass, rerank_pages, select_pages
from icecache.index.tree import PrivatePages
from icecache.selectors import SELECTORS, PageView, random_draw, recent_tokens

ATTN_IMPLEMENTATION = "icecache"
BATCH_KWARG = "icecache_batch"


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    num_heads: int  # query heads
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V bytes one token takes in one layer."""
        return 2 * self.num_kv_heads * self.head_dim * self.dtype.itemsize

    @classmethod
    def of(cls, model: torch.nn.Module) -> "ModelShape":
        c = model.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        p = next(model.parameters())
        return cls(c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, head_dim, p.dtype, p.device)


class KVBuffer:
    """A growing [H, n, D] pair of K and V, doubling its capacity."""

    def __init__(self, num_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 capacity: int = 64, pin: bool = False) -> None:
        self._k = torch.empty(num_heads, capacity, head_dim, dtype=dtype, device=device, pin_memory=pin)
        self._v = torch.empty(num_heads, capacity, head_dim, dtype=dtype, device=device, pin_memory=pin)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> None:
        t = k.shape[1]
        if self.length + t > self._k.shape[1]:
            cap = max(2 * self._k.shape[1], self.length + t)
            for name in ("_k", "_v"):
                old = getattr(self, name)
                new = torch.empty(old.shape[0], cap, old.shape[2], dtype=old.dtype, device=old.device)
                new[:, :self.length] = old[:, :self.length]
                setattr(self, name, new)
        pinned = self._k.is_pinned()  # a device -> pinned host copy runs async, in stream order
        self._k[:, self.length:self.length + t].copy_(k, non_blocking=pinned)
        self._v[:, self.length:self.length + t].copy_(v, non_blocking=pinned)
        self.length += t

    @property
    def k(self) -> torch.Tensor:
        return self._k[:, :self.length]

    @property
    def v(self) -> torch.Tensor:
        return self._v[:, :self.length]


class RequestSparseLayer:
    """A request's view of one sparse layer: device sinks, recent window, private pages, slots."""

    def __init__(self, ctx_layer, own_k: torch.Tensor, own_v: torch.Tensor, first_own_pos: int,
                 config: IceCacheConfig, shape: ModelShape, layer: int) -> None:
        dev, dtype = shape.device, shape.dtype
        self.ctx = ctx_layer
        self.sink_k, self.sink_v = ctx_layer.sink_k.to(dev, dtype), ctx_layer.sink_v.to(dev, dtype)
        recent_k = torch.cat([ctx_layer.tail_k.to(dev, dtype), own_k], dim=1)  # [H, tail + own, D]
        recent_v = torch.cat([ctx_layer.tail_v.to(dev, dtype), own_v], dim=1)
        first = first_own_pos - ctx_layer.tail_k.shape[1]
        self.window = config.window_tokens
        self.selector = SELECTORS[config.selector]
        if self.selector.window_fills_budget:  # StreamingLLM: the whole budget past the sinks is recent tokens
            self.window = config.token_budget - config.sink_tokens
            more_k, more_v = recent_tokens(ctx_layer.pages, self.window - recent_k.shape[1])
            recent_k = torch.cat([more_k.to(dev, dtype), recent_k], dim=1)
            recent_v = torch.cat([more_v.to(dev, dtype), recent_v], dim=1)
            first -= more_k.shape[1]
        self.draw = random_draw(config.seed, layer)  # selector "random": + the step's position
        self.private = PrivatePages(shape.num_kv_heads, config.page_size, shape.head_dim, dtype, dev)
        cut = max(0, recent_k.shape[1] - self.window)
        self.private.insert(recent_k[:, :cut], recent_v[:, :cut])
        self.win_k, self.win_v = recent_k[:, cut:], recent_v[:, cut:]
        self.win_first_pos = first + cut  # position of the oldest window token
        num_slots = config.retrieved_pages if config.mode == "icecache" else ctx_layer.tree.num_pages
        if self.selector.window_fills_budget:
            num_slots = 0
        self.pool = PagePool(shape.num_kv_heads, num_slots, config.page_size, shape.head_dim, dtype, dev)
        pages = ctx_layer.pages
        self.rest = None  # IceCacheConfig.unselected: every shared page's means and size, on the device
        if config.estimates_rest and pages.num_pages:  # (the dynamic path has no IceCache-reuse: its own tree)
            self.rest = (ctx_layer.tree.page_mean.to(dev, dtype), pages.value_mean.to(dev, dtype),
                         pages.valid.to(dev))

    def push(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Add the new token ([H, D]) to the window; the oldest token beyond it joins the index."""
        self.win_k = torch.cat([self.win_k, k[:, None]], dim=1)
        self.win_v = torch.cat([self.win_v, v[:, None]], dim=1)
        if self.win_k.shape[1] > self.window:
            self.private.insert(self.win_k[:, :1], self.win_v[:, :1])
            self.pool.invalidate(self.private.last_written + self.ctx.pages.num_pages)
            self.win_k, self.win_v = self.win_k[:, 1:], self.win_v[:, 1:]
            self.win_first_pos += 1

    def fetch(self, head_idx: torch.Tensor, page_ids: torch.Tensor):
        """Read pages from the shared host store or the private pages. -> (k, v, valid) per page."""
        shared = self.ctx.pages
        num_shared = shared.num_pages
        is_shared = page_ids < num_shared
        P, D = self.pool.keys.shape[2:]
        dev = self.pool.keys.device
        k = torch.empty(len(page_ids), P, D, dtype=self.pool.keys.dtype, device=dev)
        v = torch.empty_like(k)
        valid = torch.empty(len(page_ids), dtype=torch.long, device=dev)
        if bool(is_shared.any()):
            h, p = head_idx[is_shared].cpu(), page_ids[is_shared].cpu()
            k[is_shared] = shared.keys[h, p].to(dev, k.dtype, non_blocking=True)
            v[is_shared] = shared.values[h, p].to(dev, v.dtype, non_blocking=True)
            valid[is_shared] = shared.valid[h, p].to(dev)
        if not bool(is_shared.all()):
            own = ~is_shared
            h, p = head_idx[own], page_ids[own] - num_shared
            k[own], v[own], valid[own] = self.private.keys[h, p], self.private.values[h, p], self.private.valid[h, p]
        return k, v, valid


class RequestKV:
    """Everything attention needs for one request: its context, its own tokens, its slots."""

    def __init__(self, shape: ModelShape, config: IceCacheConfig, context: Context | None,
                 offload_tokens: int = 0, capacity_tokens: int = 0) -> None:
        """offload_tokens > 0: a document of that many tokens is prefilled with its KV in
        host memory (pinned on CUDA), read back to the device one layer at a time.
        capacity_tokens: own tokens to allocate room for up front (a document's length)."""
        self.shape, self.config, self.context = shape, config, context
        self.offload = offload_tokens > 0
        assert not (self.offload and context is not None), "offloaded prefill indexes a document from its start"
        where = torch.device("cpu") if self.offload else shape.device
        pin = self.offload and shape.device.type == "cuda"
        self.own = [KVBuffer(shape.num_kv_heads, shape.head_dim, shape.dtype, where,
                             capacity_tokens or offload_tokens or 64, pin)
                    for _ in range(shape.num_layers)]
        self.first_own_pos = context.num_tokens if context is not None else 0
        self.decoding = False
        self.dense_ctx: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.sparse: dict[int, RequestSparseLayer] = {}
        self.pages_loaded = 0
        self.pages_selected = 0
        self.question_pages: dict[int, torch.Tensor] = {}  # sparse layer -> [H, K] pages the question picked

    # prefill: runner.PrefillPack attends for the request and appends its tokens to `own`

    def start_decode(self) -> None:
        """Move from prefill to decode: the window takes the newest tokens, older ones of
        this request join its private pages, dense layers keep everything."""
        assert self.context is not None, "decode needs an indexed context"
        dev, dtype = self.shape.device, self.shape.dtype
        for layer in range(self.shape.num_layers):
            if layer in self.context.dense:
                k, v = self.context.dense[layer]
                self.dense_ctx[layer] = (k.to(dev, dtype), v.to(dev, dtype))
            else:
                own = self.own[layer]
                self.sparse[layer] = RequestSparseLayer(self.context.sparse[layer], own.k, own.v,
                                                      self.first_own_pos, self.config, self.shape, layer)
                self.own[layer] = None  # its tokens now live in the window and private pages
        self.decoding = True

    # -- decode: one token
    def decode_attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      scaling: float) -> torch.Tensor:
        """q: [Hq, D], k/v: [H, D] -> [Hq, D]."""
        H, g = self.shape.num_kv_heads, self.shape.group
        qg = q.view(H, g, -1)
        if layer in self.dense_ctx:
            own = self.own[layer]
            own.append(k[:, None], v[:, None])
            ctx_k, ctx_v = self.dense_ctx[layer]
            return attend_parts(qg, [(ctx_k, ctx_v, None), (own.k, own.v, None)], scaling).reshape(H * g, -1)
        state = self.sparse[layer]
        state.push(k, v)
        tree = state.ctx.tree
        used = state.private.used_pages
        num_pages = tree.num_pages + used
        R = self.config.retrieved_pages
        shared = (state.ctx.pages.keys, state.ctx.pages.valid)  # (keys, valid) of every page: shared, then private
        private = (state.private.keys[:, :used], state.private.valid[:, :used])
        if state.selector.window_fills_budget and self.config.mode == "icecache":
            page_ids = torch.full((H, 0), -1, dtype=torch.long, device=qg.device)  # sinks + window only
        elif self.config.mode == "full" or num_pages <= R:
            page_ids = all_pages(tree, state.private)  # the budget covers everything: no search
        elif state.selector.pages is not None:
            own = state.private
            view = PageView(shared, private, lambda: box_parts(tree, (own.lo[:, :used], own.hi[:, :used],
                                                                       own.valid[:, :used])),
                            state.draw + state.win_first_pos + state.win_k.shape[1])
            page_ids = state.selector.pages(qg, view, R, scaling)
        else:
            C = self.config.ranked_pages
            page_ids = select_pages(tree, state.private, qg, C, self.config.search_width, scaling,
                                    self.config.page_heads)
            if layer in self.question_pages:  # the question's own pages are candidates at every step
                page_ids = torch.cat([self.question_pages[layer].to(page_ids.device), page_ids], dim=1)
            if page_ids.shape[1] > R:  # the candidates' keys pick R of them (R a head on average)
                fixed = None
                if self.config.splits_heads:
                    fixed = fixed_log_mass(qg, torch.cat([state.sink_k, state.win_k], dim=1), None, scaling)
                page_ids = rerank_pages(qg, page_ids, shared, private, R, scaling, fixed)
        self.pages_loaded += state.pool.update(page_ids, state.fetch)
        self.pages_selected += int((page_ids >= 0).sum())
        pool = state.pool
        P = pool.keys.shape[2]
        slot_mask = pool.active[..., None] & (torch.arange(P, device=pool.valid.device) < pool.valid[..., None])
        parts = [(state.sink_k, state.sink_v, None),
                 (pool.keys.flatten(1, 2), pool.values.flatten(1, 2), slot_mask.flatten(1, 2)),
                 (state.win_k, state.win_v, None)]
        if state.rest is not None:  # the pages left out, each by its means (IceCacheConfig.unselected)
            parts.append(unselected_part(*state.rest, page_ids))
        return attend_parts(qg, parts, scaling).reshape(H * g, -1)


class StepBatch:
    """The requests of one forward pass, in batch order: RequestKV for decode, or one
    runner.PrefillPack for a packed prefill."""

    def __init__(self, requests: list[RequestKV]) -> None:
        self.requests = requests

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               scaling: float) -> torch.Tensor:
        """query: [B, Hq, T, D]; key/value: [B, H, T, D] -> [B, T, Hq, D]."""
        outs = []
        for b, req in enumerate(self.requests):
            if req.decoding:
                assert query.shape[2] == 1, "decode runs one token per request"
                outs.append(req.decode_attend(layer, query[b, :, 0], key[b, :, 0], value[b, :, 0], scaling)[None])
            else:
                outs.append(req.prefill_attend(layer, query[b], key[b], value[b], scaling))
        return torch.stack(outs) if len(outs) > 1 else outs[0][None]  # a prefill's pack: no copy


def icecache_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention interface: (attn_output [B, T, Hq, D], None)."""
    batch = kwargs.get(BATCH_KWARG)
    if batch is None:
        raise RuntimeError("icecache attention called without request state; use icecache.Engine")
    return batch.attend(module.layer_idx, query, key, value, scaling or module.scaling), None


AttentionInterface.register(ATTN_IMPLEMENTATION, icecache_attention)
