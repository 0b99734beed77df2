"""Static-shape decode: one token of one request through the model, with every buffer
allocated before the first step, so a step is a fixed sequence of GPU kernels with no
host round-trip, and on CUDA the whole step is captured once as a CUDA graph.

What differs from the dynamic path (cache.py), by design:
* shared host pages are read where they are: on CUDA through a UVA view of the pinned
  (or CUDA-registered) host store, so a page gather is a kernel that reads host memory
  over PCIe (graph-capturable, no staging copy, no sync);
* the selected pages are gathered every step (12 pages x heads, < 1 MB a layer) rather
  than diffed against resident slots, which would need a data-dependent copy;
* a request's own tokens that leave the window go to private pages in arrival order
  (page = n // page_size), which keeps shapes static; they are always candidates and are
  ranked by the same page estimate as shared pages;
* the window is a ring buffer; dense layers (and every layer in mode="full") attend over
  a preallocated on-device buffer of the whole context plus the request's own tokens.

The model's own modules (norms, projections, rotary embedding, MLP, LM head) do the
rest, so any Llama-family architecture the engine supports runs here.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace

import torch
import torch.nn.functional as F

from icecache.attention import decode_attention
from icecache.config import IceCacheConfig
from icecache.context import Context
from icecache.index.tree import TreeIndex, _combine_heads, _page_estimate, page_summaries, top_pages, tree_keep


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
    """Whole context plus own tokens on the device: [H, capacity, D]."""

    def __init__(self, ctx_k: torch.Tensor, ctx_v: torch.Tensor, own_k: torch.Tensor, own_v: torch.Tensor,
                 capacity: int, dtype: torch.dtype, device: torch.device) -> None:
        H, n, D = ctx_k.shape
        m = own_k.shape[1]
        self.k = torch.zeros(H, n + m + capacity, D, dtype=dtype, device=device)  # zeros: 0 * garbage may be NaN
        self.v = torch.zeros_like(self.k)
        self.k[:, :n], self.v[:, :n] = ctx_k.to(device, dtype), ctx_v.to(device, dtype)
        self.k[:, n:n + m], self.v[:, n:n + m] = own_k.to(device, dtype), own_v.to(device, dtype)
        self.base = n + m  # slot of the first decoded token

    def attend(self, q, k, v, step: torch.Tensor, scaling: float) -> torch.Tensor:
        idx = self.base + step  # 0-d tensor
        self.k.index_copy_(1, idx[None], k[:, None])
        self.v.index_copy_(1, idx[None], v[:, None])
        H, g, D = q.shape
        mask = torch.arange(self.k.shape[1], device=self.k.device) <= idx  # [n]
        # [1, H*g, 1, D] over [1, H, n, D] in the model dtype: no float copy of the whole context
        out = F.scaled_dot_product_attention(q.reshape(1, H * g, 1, D).to(self.k.dtype), self.k[None], self.v[None],
                                             attn_mask=mask[None, None, None], scale=scaling, enable_gqa=True)
        return out.view(H, g, D)


def _pad_pages(tree: TreeIndex, num_pages: int) -> TreeIndex:
    """The tree with its page tables padded to num_pages invalid pages (no parent, no tokens)."""
    extra = num_pages - tree.num_pages
    if extra <= 0:
        return tree
    return replace(tree, page_parent=F.pad(tree.page_parent, (0, extra), value=-1),
                   page_mean=F.pad(tree.page_mean, (0, 0, 0, extra)), page_var=F.pad(tree.page_var, (0, 0, 0, extra)),
                   page_radius=F.pad(tree.page_radius, (0, extra)), page_valid=F.pad(tree.page_valid, (0, extra)))


class _SparseState:
    """Sinks, window ring, private pages and the shared tree/pages of one sparse layer."""

    def __init__(self, ctx_layer, own_k: torch.Tensor, own_v: torch.Tensor, max_new: int,
                 config: IceCacheConfig, dtype: torch.dtype, device: torch.device, pad_pages_to: int = 0) -> None:
        H, _, D = own_k.shape
        P, W = config.page_size, config.window_tokens
        self.P, self.W, self.R = P, W, config.retrieved_pages
        self.search_width, self.radius_weight = config.search_width, config.page_score_radius
        pages = ctx_layer.pages
        # every layer gets the same page count (padding pages are never candidates), so one
        # compiled step serves all layers
        self.num_shared = max(pages.num_pages, pad_pages_to)
        self.tree: TreeIndex = _pad_pages(ctx_layer.tree, self.num_shared)
        self.shared_k, self.shared_v = uva_view(pages.keys, device), uva_view(pages.values, device)
        self.shared_valid = F.pad(pages.valid.to(device), (0, self.num_shared - pages.num_pages))
        self.sink_k, self.sink_v = ctx_layer.sink_k.to(device, dtype), ctx_layer.sink_v.to(device, dtype)

        recent_k = torch.cat([ctx_layer.tail_k.to(device, dtype), own_k.to(device, dtype)], dim=1)
        recent_v = torch.cat([ctx_layer.tail_v.to(device, dtype), own_v.to(device, dtype)], dim=1)
        cut = max(0, recent_k.shape[1] - W)  # older recent tokens start in private pages
        cap = (cut + max_new) // P + 2
        self.priv_k = torch.zeros(H, cap, P, D, dtype=dtype, device=device)
        self.priv_v = torch.zeros_like(self.priv_k)
        self.priv_valid = torch.zeros(H, cap, dtype=torch.long, device=device)
        self.priv_mean = torch.zeros(H, cap, D, dtype=torch.float32, device=device)
        self.priv_var = torch.zeros_like(self.priv_mean)
        self.priv_radius = torch.zeros(H, cap, dtype=torch.float32, device=device)
        if cut:
            n = torch.arange(cut, device=device)
            self.priv_k[:, n // P, n % P] = recent_k[:, :cut]
            self.priv_v[:, n // P, n % P] = recent_v[:, :cut]
            self.priv_valid[:, :(cut + P - 1) // P] = torch.bincount(n // P).to(device)
            self._summarise(torch.arange((cut + P - 1) // P, device=device))
        self.priv_count = torch.tensor(cut, device=device)
        w = recent_k.shape[1] - cut
        self.win_k = torch.zeros(H, W, D, dtype=dtype, device=device)
        self.win_v = torch.zeros_like(self.win_k)
        self.win_k[:, :w], self.win_v[:, :w] = recent_k[:, cut:], recent_v[:, cut:]
        self.win_filled = torch.arange(W, device=device) < w
        self.win_count = torch.tensor(w, device=device)  # tokens ever put in the ring

    def _summarise(self, page_ids: torch.Tensor) -> None:
        """Recompute mean/var/radius of private pages page_ids [m] from their valid slots."""
        mean, radius, var = page_summaries(self.priv_k[:, page_ids], self.priv_valid[:, page_ids])
        self.priv_mean[:, page_ids], self.priv_radius[:, page_ids], self.priv_var[:, page_ids] = mean, radius, var

    def _push(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """New token into the ring; the token it replaces (once full) into private pages.
        Indices stay 1-element tensors: a 0-d tensor index would be read back to the host."""
        H, D = k.shape
        slot = (self.win_count % self.W).view(1)
        full = self.win_count >= self.W
        flat_k = self.priv_k.view(H, -1, D)  # [H, cap * P, D]: private slot n is token n
        flat_v = self.priv_v.view(H, -1, D)
        at = self.priv_count.view(1)
        old_k, old_v = self.win_k.index_select(1, slot), self.win_v.index_select(1, slot)  # [H, 1, D]
        flat_k.index_copy_(1, at, torch.where(full, old_k, flat_k.index_select(1, at)))
        flat_v.index_copy_(1, at, torch.where(full, old_v, flat_v.index_select(1, at)))
        page = at // self.P
        self.priv_valid.index_add_(1, page, full.long().expand(H, 1))
        self.priv_count += full.long()
        self._summarise(page)
        self.win_k.index_copy_(1, slot, k[:, None])
        self.win_v.index_copy_(1, slot, v[:, None])
        self.win_filled |= torch.arange(self.W, device=k.device) == slot
        self.win_count += 1

    def select(self, q: torch.Tensor, scaling: float) -> torch.Tensor:
        """Page ids [H, R] (private pages offset by num_shared), -1 where none."""
        tree = self.tree
        estimates, candidates = [], []
        if tree.num_pages:
            keep = tree_keep(tree, q, self.search_width, scaling)
            cand = tree.page_valid > 0
            if keep is not None:
                cand = cand & keep.gather(1, tree.page_parent.clamp_min(0))
            estimates.append(_page_estimate(q, tree.page_mean, tree.page_radius, tree.page_var, tree.page_valid,
                                            scaling, self.radius_weight))
            candidates.append(cand)
        estimates.append(_page_estimate(q, self.priv_mean, self.priv_radius, self.priv_var, self.priv_valid,
                                        scaling, self.radius_weight))
        candidates.append(self.priv_valid > 0)
        weight = _combine_heads(torch.cat(estimates, dim=-1), torch.cat(candidates, dim=-1))  # [H, N]
        return top_pages(weight, self.R)

    def fetch(self, page_ids: torch.Tensor):
        """-> keys, values [H, R, P, D], valid [H, R] of the selected pages."""
        H, R = page_ids.shape
        h = torch.arange(H, device=page_ids.device)[:, None].expand(H, R)
        shared = page_ids < self.num_shared
        sid = page_ids.clamp(0, max(self.shared_k.shape[1] - 1, 0))  # a real host page, even for private ids
        pid = (page_ids - self.num_shared).clamp(0, self.priv_k.shape[1] - 1)
        pick = shared[..., None, None]
        if self.shared_k.shape[1]:
            k = torch.where(pick, self.shared_k[h, sid].to(self.priv_k.dtype), self.priv_k[h, pid])
            v = torch.where(pick, self.shared_v[h, sid].to(self.priv_v.dtype), self.priv_v[h, pid])
            valid = torch.where(shared, self.shared_valid[h, sid], self.priv_valid[h, pid])
        else:
            k, v, valid = self.priv_k[h, pid], self.priv_v[h, pid], self.priv_valid[h, pid]
        return k, v, valid.masked_fill(page_ids < 0, 0)

    def attend(self, q, k, v, step, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        if q.is_cuda and _COMPILE:
            return _compiled_attend(self, q, k, v, scaling)
        return self._attend(q, k, v, scaling)

    def _attend(self, q, k, v, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        self._push(k, v)
        page_ids = self.select(q.float(), scaling)
        pk, pv, valid = self.fetch(page_ids)
        H, R, P, D = pk.shape
        slot_ok = (torch.arange(P, device=q.device) < valid[..., None]).reshape(H, R * P)
        keys = torch.cat([self.sink_k, pk.reshape(H, R * P, D), self.win_k], dim=1)
        values = torch.cat([self.sink_v, pv.reshape(H, R * P, D), self.win_v], dim=1)
        mask = torch.cat([torch.ones(H, self.sink_k.shape[1], dtype=torch.bool, device=q.device), slot_ok,
                          self.win_filled.expand(H, -1)], dim=1)
        return decode_attention(q, keys, values, mask, scaling), page_ids


# On CUDA a sparse layer's step (push, tree walk, page estimate, gather, attention) is
# hundreds of tiny kernels; torch.compile fuses them. Layers are padded to one shape, so one
# compile serves every layer of a context. Opt-in (ICECACHE_COMPILE=1): in isolation it took
# a 32k step from 22.6 to 14.5 ms on an H100, but inside the engine's loop it ran at
# 1.4-2.6 s a token (it seems to recompile every step), which is not understood yet.
_COMPILE = os.environ.get("ICECACHE_COMPILE", "0") == "1"
_compiled_attend = torch.compile(_SparseState._attend, dynamic=False) if _COMPILE else None
torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)


class StaticDecoder:
    """Decode steps for one request after its prefill. step(token, position) -> logits."""

    def __init__(self, model: torch.nn.Module, config: IceCacheConfig, context: Context, own_kv: list,
                 max_new_tokens: int) -> None:
        self.model, self.config = model, config
        inner = model.model
        self.embed, self.layers, self.norm, self.rotary = inner.embed_tokens, inner.layers, inner.norm, inner.rotary_emb
        attn0 = self.layers[0].self_attn
        self.apply_rope = sys.modules[type(attn0).__module__].apply_rotary_pos_emb
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.head_dim = attn0.head_dim
        self.num_kv_heads = model.config.num_key_value_heads
        self.group = model.config.num_attention_heads // self.num_kv_heads
        self.states = []
        max_pages = max((layer.pages.num_pages for layer in context.sparse.values()), default=0)
        for i, (own_k, own_v) in enumerate(own_kv):
            if i in context.dense or config.mode == "full":
                ck, cv = context.flat_kv(i)
                self.states.append(_DenseState(ck, cv, own_k, own_v, max_new_tokens + 1, self.dtype, self.device))
            else:
                self.states.append(_SparseState(context.sparse[i], own_k, own_v, max_new_tokens + 1, config,
                                                self.dtype, self.device, pad_pages_to=max_pages))
        self.step_index = torch.zeros((), dtype=torch.long, device=self.device)  # decoded tokens so far
        self.last_pages: list[torch.Tensor | None] = [None] * len(self.states)
        self._token = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self._position = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self._logits = None
        self._graph = None
        self.steps_run = 0

    @torch.inference_mode()
    def _forward(self) -> torch.Tensor:
        h = self.embed(self._token)  # [1, 1, hidden]
        cos, sin = self.rotary(h, self._position)
        H, g, D = self.num_kv_heads, self.group, self.head_dim
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(h)
            q = attn.q_proj(x).view(1, 1, H * g, D)
            k = attn.k_proj(x).view(1, 1, H, D)
            v = attn.v_proj(x).view(1, 1, H, D)
            if hasattr(attn, "q_norm"):  # Qwen3
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = self.apply_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # [1, heads, 1, D]
            out = self.states[i].attend(q[0, :, 0].view(H, g, D), k[0, :, 0], v[0, 0], self.step_index,
                                        attn.scaling)
            if isinstance(out, tuple):
                out, self.last_pages[i] = out
            h = h + attn.o_proj(out.reshape(1, 1, H * g * D))
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        self.step_index += 1
        return self.model.lm_head(self.norm(h))[0, -1].float()

    def step(self, token: int, position: int) -> torch.Tensor:
        """Run one token; returns logits [vocab] (a static buffer when graphed: copy to keep)."""
        self._token.fill_(token)
        self._position.fill_(position)
        self.steps_run += 1
        if self._graph is not None:
            self._graph.replay()
            return self._logits
        return self._forward()

    def pages_per_step(self) -> int:
        """Pages the last step selected, summed over sparse layers and KV heads (one sync)."""
        return int(sum(int((p >= 0).sum()) for p in self.last_pages if p is not None))

    def capture(self) -> None:
        """Record a step as a CUDA graph; later steps replay it. Recording runs nothing, so
        the state is untouched; call it after at least one eager step (the warm-up that
        initialises cuBLAS and friends)."""
        assert self.device.type == "cuda", "CUDA graphs need a CUDA device"
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._logits = self._forward()
        self._graph = graph
