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
* on CUDA a sparse layer runs as ~20 Triton kernels (kernels.py: push, tree walk, page
  ranking over the kept clusters' pages only, attention reading pages in place); the
  torch code here is their reference and the CPU path;
* the window is a ring buffer; dense layers (and every layer in mode="full") attend over
  a preallocated on-device buffer of the whole context plus the request's own tokens.

The model's own modules (norms, projections, rotary embedding, MLP, LM head) do the
rest, so any Llama-family architecture the engine supports runs here.
"""

from __future__ import annotations

import os
import sys
import torch
import torch.nn.functional as F

from icecache.attention import decode_attention
from icecache.config import IceCacheConfig
from icecache.context import Context
from icecache.index.tree import TreeIndex, _combine_heads, _page_estimate, top_pages, tree_keep


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


class _Ring:
    """The counters every sparse layer of a request shares (they push the same tokens):
    tokens ever put in the window ring, tokens moved on to private pages. Layers read
    them during a step; advance() moves them once at its end."""

    def __init__(self, in_window: int, in_private: int, window: int, device: torch.device) -> None:
        self.counts = torch.tensor([in_window, in_private], dtype=torch.long, device=device)  # [2]
        self.window = window

    def advance(self) -> None:
        self.counts[1:] += (self.counts[:1] >= self.window).long()
        self.counts[:1] += 1


class _Scratch:
    """Work buffers of the Triton path, one set shared by the layers (they run in turn)."""

    def __init__(self, device: torch.device, group: int) -> None:
        self.device, self.group, self.sizes, self.buffers = device, group, {}, {}

    def need(self, name: str, numel: int) -> None:
        self.sizes[name] = max(self.sizes.get(name, 0), numel)

    def allocate(self) -> None:
        from icecache.kernels import SCRATCH_DTYPES
        self.buffers = {n: torch.empty(size, dtype=SCRATCH_DTYPES.get(n, torch.float32), device=self.device)
                        for n, size in self.sizes.items()}

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.buffers[name]


class _SparseState:
    """Sinks, window ring, private pages and the shared tree/pages of one sparse layer."""

    def __init__(self, ctx_layer, own_k: torch.Tensor, own_v: torch.Tensor, max_new: int, ring_cut: int,
                 config: IceCacheConfig, dtype: torch.dtype, device: torch.device, ring: _Ring,
                 scratch: _Scratch | None, leader: "_SparseState | None" = None) -> None:
        H, _, D = own_k.shape
        self.leader = leader  # IceCache-reuse: the cycle's first layer, whose page selection this one uses
        self.last_ids: torch.Tensor | None = None  # this step's page ids (read by the cycle's followers)
        P, W = config.page_size, config.window_tokens
        self.P, self.W, self.R = P, W, config.retrieved_pages
        self.search_width = config.search_width
        self.ring, self.scratch = ring, scratch
        pages = ctx_layer.pages
        self.tree: TreeIndex = ctx_layer.tree
        self.num_shared = pages.num_pages
        self.shared_k, self.shared_v = uva_view(pages.keys, device), uva_view(pages.values, device)
        self.shared_valid = pages.valid.to(device)
        self.sink_k = ctx_layer.sink_k.to(device, dtype).contiguous()  # [H, num_sink, D]
        self.sink_v = ctx_layer.sink_v.to(device, dtype).contiguous()

        recent_k = torch.cat([ctx_layer.tail_k.to(device, dtype), own_k.to(device, dtype)], dim=1)
        recent_v = torch.cat([ctx_layer.tail_v.to(device, dtype), own_v.to(device, dtype)], dim=1)
        cut = ring_cut  # older recent tokens start in private pages
        cap = (cut + max_new) // P + 2
        self.priv_k = torch.zeros(H, cap, P, D, dtype=dtype, device=device)  # [H, cap, P, D] token n at n // P
        self.priv_v = torch.zeros_like(self.priv_k)
        self.priv_valid = torch.zeros(H, cap, dtype=torch.long, device=device)  # [H, cap]
        self.priv_sum = torch.zeros(H, cap, D, dtype=torch.float32, device=device)  # running sums: mean, var
        self.priv_sumsq = torch.zeros_like(self.priv_sum)
        if cut:
            n = torch.arange(cut, device=device)
            self.priv_k[:, n // P, n % P] = recent_k[:, :cut]
            self.priv_v[:, n // P, n % P] = recent_v[:, :cut]
            self.priv_valid.index_add_(1, n // P, torch.ones(H, cut, dtype=torch.long, device=device))
            x = recent_k[:, :cut].float()
            self.priv_sum.index_add_(1, n // P, x)
            self.priv_sumsq.index_add_(1, n // P, x.square())
        w = recent_k.shape[1] - cut
        self.win_k = torch.zeros(H, W, D, dtype=dtype, device=device)
        self.win_v = torch.zeros_like(self.win_k)
        self.win_k[:, :w], self.win_v[:, :w] = recent_k[:, cut:], recent_v[:, cut:]
        if scratch is not None and leader is None:
            self._plan_kernels(H, D)

    # ------------------------------------------------------------ the Triton path (CUDA)
    def _plan_kernels(self, H: int, D: int) -> None:
        from icecache.kernels import scratch_sizes
        self.cluster_start, self.cluster_count = self.tree.cluster_pages()
        group = self.scratch.group
        for name, numel in scratch_sizes(H, group, D, [k.shape[1] for k in self.tree.node_keys],
                                         self.search_width,
                                         self.num_shared + self.priv_valid.shape[1], self.sink_k.shape[1],
                                         self.R, self.W, self.P).items():
            self.scratch.need(name, numel)

    def _select_kernels(self, q: torch.Tensor, scaling: float) -> torch.Tensor:
        from icecache import kernels
        tree, S = self.tree, self.scratch
        top = torch.full((q.shape[0], self.search_width), -1, dtype=torch.long, device=q.device)  # kept clusters
        keep, masks = None, S["keep"].view(2, -1)
        for depth, j in enumerate(range(tree.num_levels, 0, -1)):
            parent = tree.node_parent[j - 1] if j < tree.num_levels else None
            keep = kernels.level_scores(q, tree.node_keys[j - 1], parent, keep, scaling, self.search_width, S["raw"],
                                        S["parts"], masks[depth % 2], top if j == 1 else None)
        return kernels.select_pages(q, top, self.cluster_start, self.cluster_count, tree.page_mean, tree.page_var,
                                    tree.page_valid, self.priv_sum, self.priv_sumsq, self.priv_valid, scaling, self.R,
                                    S["raw"], S["parts"])

    def _attend_kernels(self, q, k, v, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        from icecache import kernels
        kernels.push(k.contiguous(), v.contiguous(), self.win_k, self.win_v, self.ring.counts, self.priv_k,
                     self.priv_v, self.priv_valid, self.priv_sum, self.priv_sumsq)
        qf = q.float().contiguous()
        page_ids = self.select(qf, scaling)
        S = self.scratch
        H, G, D = q.shape
        out = kernels.sparse_attention(qf, self.sink_k, self.sink_v, page_ids, self.shared_k, self.shared_v,
                                       self.shared_valid, self.priv_k, self.priv_v, self.priv_valid, self.win_k,
                                       self.win_v, self.ring.counts, scaling, S["att_parts"], S["att_acc"],
                                       torch.empty(H, G, D, dtype=q.dtype, device=q.device))
        return out, page_ids

    # ------------------------------------------------------------ the torch path (reference, CPU)
    def _push(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """New token into the ring; the token it replaces (once full) into private pages.
        Indices stay 1-element tensors: a 0-d tensor index would be read back to the host."""
        H, D = k.shape
        slot = self.ring.counts[:1] % self.W
        full = self.ring.counts[:1] >= self.W
        flat_k = self.priv_k.view(H, -1, D)  # [H, cap * P, D]: private slot n is token n
        flat_v = self.priv_v.view(H, -1, D)
        at = self.ring.counts[1:]
        old_k, old_v = self.win_k.index_select(1, slot), self.win_v.index_select(1, slot)  # [H, 1, D]
        flat_k.index_copy_(1, at, torch.where(full, old_k, flat_k.index_select(1, at)))
        flat_v.index_copy_(1, at, torch.where(full, old_v, flat_v.index_select(1, at)))
        page = at // self.P
        self.priv_valid.index_add_(1, page, full.long().expand(H, 1))
        x = old_k.float() * full
        self.priv_sum.index_add_(1, page, x)
        self.priv_sumsq.index_add_(1, page, x.square())
        self.win_k.index_copy_(1, slot, k[:, None])
        self.win_v.index_copy_(1, slot, v[:, None])

    def _private_summaries(self) -> tuple[torch.Tensor, torch.Tensor]:
        count = self.priv_valid.clamp_min(1)[..., None].float()
        mean = self.priv_sum / count
        return mean, (self.priv_sumsq / count - mean.square()).clamp_min(0)

    def select(self, q: torch.Tensor, scaling: float) -> torch.Tensor:
        """Page ids [H, R] (private pages offset by num_shared), -1 where none. q: [H, G, D] fp32."""
        if self.leader is not None:  # same page layout as the leader: its choice names the same tokens
            return self.leader.last_ids
        if self.scratch is not None:
            self.last_ids = self._select_kernels(q, scaling)
            return self.last_ids
        tree = self.tree
        estimates, candidates = [], []
        if tree.num_pages:
            keep = tree_keep(tree, q, self.search_width, scaling)
            cand = tree.page_valid > 0
            if keep is not None:
                cand = cand & keep.gather(1, tree.page_parent.clamp_min(0))
            estimates.append(_page_estimate(q, tree.page_mean, tree.page_radius, tree.page_var, tree.page_valid,
                                            scaling, 0.0))
            candidates.append(cand)
        mean, var = self._private_summaries()
        estimates.append(_page_estimate(q, mean, None, var, self.priv_valid, scaling, 0.0))  # no radius
        candidates.append(self.priv_valid > 0)
        weight = _combine_heads(torch.cat(estimates, dim=-1), torch.cat(candidates, dim=-1))  # [H, N]
        self.last_ids = top_pages(weight, self.R)
        return self.last_ids

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
        if self.scratch is not None:
            return self._attend_kernels(q, k, v, scaling)
        self._push(k, v)
        page_ids = self.select(q.float(), scaling)
        pk, pv, valid = self.fetch(page_ids)
        H, R, P, D = pk.shape
        slot_ok = (torch.arange(P, device=q.device) < valid[..., None]).reshape(H, R * P)
        filled = torch.arange(self.W, device=q.device) < (self.ring.counts[:1] + 1).clamp(max=self.W)
        keys = torch.cat([self.sink_k, pk.reshape(H, R * P, D), self.win_k], dim=1)
        values = torch.cat([self.sink_v, pv.reshape(H, R * P, D), self.win_v], dim=1)
        mask = torch.cat([torch.ones(H, self.sink_k.shape[1], dtype=torch.bool, device=q.device), slot_ok,
                          filled.expand(H, -1)], dim=1)
        return decode_attention(q, keys, values, mask, scaling), page_ids


def use_kernels(device: torch.device, config: IceCacheConfig, head_dim: int, group: int, widest_row: int) -> bool:
    """Whether sparse layers run as Triton kernels: on CUDA, for shapes they support and
    rows (a tree level, a layer's pages) they rank in registers; otherwise the torch path
    (ICECACHE_KERNELS=0 forces the torch path, =1 the kernels, e.g. interpreted on CPU)."""
    forced = os.environ.get("ICECACHE_KERNELS")
    if forced is not None:
        return forced == "1"
    if device.type != "cuda":
        return False
    from icecache.kernels import MAX_SELECT, supported
    return supported(head_dim, config.page_size, group) and widest_row <= MAX_SELECT


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
        sparse_layers = [i for i in range(len(own_kv)) if i not in context.dense and config.mode != "full"]
        self.ring = self.scratch = None
        if sparse_layers:
            recent = context.num_tail + own_kv[0][0].shape[1]  # tokens that start in the window or behind it
            cut = max(0, recent - config.window_tokens)  # the oldest of them start in private pages
            self.ring = _Ring(recent - cut, cut, config.window_tokens, self.device)
            layers = [context.sparse[i] for i in sparse_layers]
            widest = max(max(l.pages.num_pages for l in layers) + (cut + max_new_tokens + 1) // config.page_size + 2,
                         max((k.shape[1] for l in layers for k in l.tree.node_keys), default=0))
            if use_kernels(self.device, config, self.head_dim, self.group, widest):
                self.scratch = _Scratch(self.device, self.group)
        for i, (own_k, own_v) in enumerate(own_kv):
            if i in sparse_layers:
                leader = context.cycle_leader(i)
                self.states.append(_SparseState(context.sparse[i], own_k, own_v, max_new_tokens + 1, cut, config,
                                                self.dtype, self.device, self.ring, self.scratch,
                                                self.states[leader] if leader != i else None))
            else:
                ck, cv = context.flat_kv(i)
                self.states.append(_DenseState(ck, cv, own_k, own_v, max_new_tokens + 1, self.dtype, self.device))
        if self.scratch is not None:
            self.scratch.allocate()
        # the model's norms and rotary embedding as fused kernels wherever the sparse kernels could run
        self.fused = use_kernels(self.device, config, self.head_dim, self.group, 0)
        self.step_index = torch.zeros((), dtype=torch.long, device=self.device)  # decoded tokens so far
        self.last_pages: list[torch.Tensor | None] = [None] * len(self.states)
        self._token = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self._position = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        self._logits = None
        self._graph = None
        self.steps_run = 0

    def _norm(self, module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            from icecache.model_kernels import can_fuse_norm, rms_norm
            if can_fuse_norm(module, x):
                return rms_norm(x, module)
        return module(x)

    @torch.inference_mode()
    def _forward(self) -> torch.Tensor:
        h = self.embed(self._token)  # [1, 1, hidden]
        cos, sin = self.rotary(h, self._position)  # [1, 1, D]
        H, g, D = self.num_kv_heads, self.group, self.head_dim
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            x = self._norm(layer.input_layernorm, h)
            q = attn.q_proj(x).view(1, 1, H * g, D)
            k = attn.k_proj(x).view(1, 1, H, D)
            v = attn.v_proj(x).view(1, 1, H, D)
            if hasattr(attn, "q_norm"):  # Qwen3
                q, k = self._norm(attn.q_norm, q), self._norm(attn.k_norm, k)
            if self.fused:
                from icecache.model_kernels import rope
                q, k = rope(q.view(H * g, D), k.view(H, D), cos.view(D), sin.view(D))  # [H * g, D], [H, D]
            else:
                q, k = self.apply_rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # [1, heads, 1, D]
                q, k = q[0, :, 0], k[0, :, 0]
            out = self.states[i].attend(q.view(H, g, D), k, v[0, 0], self.step_index, attn.scaling)
            if isinstance(out, tuple):
                out, self.last_pages[i] = out
            h = h + attn.o_proj(out.reshape(1, 1, H * g * D))
            h = h + layer.mlp(self._norm(layer.post_attention_layernorm, h))
        self.step_index += 1
        if self.ring is not None:
            self.ring.advance()
        return self.model.lm_head(self._norm(self.norm, h))[0, -1].float()

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
