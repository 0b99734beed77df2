"""An indexed document: its KV split into sinks, indexed middle (host pages) and tail,
per layer; immutable once built and shared by every request that reuses it."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import torch

from icecache.config import IceCacheConfig
from icecache.index.tree import TreeIndex, build_tree
from icecache.store import HostPageStore, to_host

_UIDS = itertools.count(1)


@dataclass
class SparseLayer:
    """One sparse layer of a context."""

    sink_k: torch.Tensor  # [H, num_sink, D] first tokens
    sink_v: torch.Tensor
    tail_k: torch.Tensor  # [H, num_tail, D] last tokens: the window when the context ends
    tail_v: torch.Tensor
    tree: TreeIndex  # index over the middle keys (on the index device)
    pages: HostPageStore  # middle KV in host pages


@dataclass
class Context:
    """Handle returned by Engine.index(); pass it as `context=` to reuse the prefill."""

    model_id: str
    token_ids: tuple[int, ...]
    layout: Layout
    dense: dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> full (K, V) [H, n, D]
    sparse: dict[int, SparseLayer]
    last_logits: torch.Tensor  # [vocab] logits after the last token
    prefill_s: float = 0.0
    build_s: float = 0.0
    # unique in this process, never reused: what device state built from this context is keyed by
    uid: int = field(default_factory=lambda: next(_UIDS), compare=False)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_sink(self) -> int:
        return next(iter(self.sparse.values())).sink_k.shape[1] if self.sparse else 0

    @property
    def num_tail(self) -> int:
        return next(iter(self.sparse.values())).tail_k.shape[1] if self.sparse else 0

    @property
    def host_bytes(self) -> int:
        total = sum(k.numel() * k.element_size() * 2 for k, _ in self.dense.values())
        for layer in self.sparse.values():
            total += layer.pages.num_bytes
            total += sum(t.numel() * t.element_size() for t in (layer.sink_k, layer.sink_v, layer.tail_k,
                                                                  layer.tail_v))
            total += sum(t.numel() * t.element_size() for t in layer.tree.tensors())
        return total

    @property
    def index_device(self) -> torch.device | None:
        return next(iter(self.sparse.values())).tree.scale.device if self.sparse else None

    @property
    def box_device(self) -> torch.device | None:
        """Where the trees' page boxes lie (with_index_on)."""
        return next(iter(self.sparse.values())).tree.box_device if self.sparse else None

    def with_index_on(self, device: torch.device, boxes: bool = False) -> "Context":
        """The same context with its trees (what page selection reads every step) on `device`;
        the trees' page boxes there too only if `boxes` (the quest selector reads them), else
        in host memory; pages, sinks and dense KV stay where they are (host). Returns self if
        already so placed."""
        index_device = self.index_device
        box_device = device if boxes else torch.device("cpu")
        if index_device is None or (index_device == device and self.box_device == box_device):
            return self
        moved: dict[int, TreeIndex] = {}  # a tree shared by a reuse cycle moves once
        for s in self.sparse.values():
            if id(s.tree) not in moved:
                moved[id(s.tree)] = s.tree.to(device, box_device)
        sparse = {l: replace(s, tree=moved[id(s.tree)]) for l, s in self.sparse.items()}
        return replace(self, sparse=sparse)

    def to_host(self) -> "Context":
        """The same context with its KV (pages, sinks, tails, dense layers) in host memory,
        pinned when CUDA is present; the trees stay where they are (page selection reads
        them every step)."""
        def host(s: SparseLayer) -> SparseLayer:
            return replace(s, sink_k=to_host(s.sink_k), sink_v=to_host(s.sink_v), tail_k=to_host(s.tail_k),
                           tail_v=to_host(s.tail_v), pages=s.pages.to_host())
        dense = {l: (to_host(k), to_host(v)) for l, (k, v) in self.dense.items()}
        return replace(self, dense=dense, sparse={l: host(s) for l, s in self.sparse.items()})

    def with_index_from(self, other: "Context", boxes: bool = False) -> "Context":
        """This context (e.g. unpacked from shared memory) with `other`'s trees, where they
        already lie on the device: the same index, not copied again; but for the page boxes
        (with_index_on), which stay this context's own (host) unless `boxes`."""
        assert other.token_ids == self.token_ids and other.layout == self.layout, "not the same document"
        trees: dict[int, TreeIndex] = {}  # a tree shared by a reuse cycle stays one
        for l, s in self.sparse.items():
            tree = other.sparse[l].tree
            if id(tree) not in trees:
                trees[id(tree)] = tree if boxes else replace(tree, page_lo=s.tree.page_lo, page_hi=s.tree.page_hi)
        return replace(self, sparse={l: replace(s, tree=trees[id(other.sparse[l].tree)])
                                     for l, s in self.sparse.items()})

    def cycle_leader(self, layer: int) -> int:
        """The sparse layer whose page selection `layer` uses (itself unless IceCache-reuse)."""
        reuse, dense = self.layout.reuse_layers, self.layout.dense_layers
        return layer - (layer - dense) % reuse

    def flat_kv(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every token's (K, V) of a layer, [H, n, D] each; token order is irrelevant to attention."""
        if layer in self.dense:
            return self.dense[layer]
        s = self.sparse[layer]
        mid_k, mid_v = s.pages.flat()
        return torch.cat([s.sink_k, mid_k, s.tail_k], dim=1), torch.cat([s.sink_v, mid_v, s.tail_v], dim=1)


class Layout(NamedTuple):
    """The config fields a context's stored layout depends on: a context serves a config
    only if they agree."""
    page_size: int
    sink_tokens: int
    window_tokens: int
    dense_layers: int
    promotion_ratio: tuple[float, ...]
    top_level_max: int
    seed: int
    reuse_layers: int

    @classmethod
    def from_list(cls, values: list) -> "Layout":
        """From its JSON form (a list; the promotion ratios a list within it)."""
        return cls(*(tuple(v) if isinstance(v, list) else v for v in values))


def layout_of(config: IceCacheConfig) -> Layout:
    return Layout(*(getattr(config, name) for name in Layout._fields))


def build_context(model_id: str, token_ids, layer_kv: list[tuple[torch.Tensor, torch.Tensor] | None],
                  last_logits: torch.Tensor, config: IceCacheConfig, index_device: torch.device) -> Context:
    """Split each layer's prefilled KV ([H, n, D]) and index the middle of sparse layers.
    Trees and pages are built on `index_device`; each layer's KV stays where it was given
    (an offloaded prefill's host KV goes back to the host as pages). layer_kv's entries are
    dropped as they are used, so a layer's prefill KV is freed once it is paged."""
    n = len(token_ids)
    num_sink = min(config.sink_tokens, n)
    num_tail = min(config.window_tokens, n - num_sink)
    mid = slice(num_sink, n - num_tail)
    positions = torch.arange(n)[mid]
    dense, sparse = {}, {}
    for layer in range(len(layer_kv)):
        k, v = layer_kv[layer]
        layer_kv[layer] = None
        if layer < config.dense_layers:
            dense[layer] = (k.contiguous(), v.contiguous())
            continue
        home = k.device
        if (layer - config.dense_layers) % config.reuse_layers == 0:  # a cycle's first layer: its own index
            tree, page_layout = build_tree(k[:, mid].to(index_device), config.page_size, config.promotion_ratio,
                                           config.top_level_max, seed=config.seed + layer)
        # else IceCache-reuse: the cycle's later layers store their KV in the first one's page
        # layout, so its page selection names the same tokens in them (and they need no tree)
        pages = HostPageStore.from_layout(k[:, mid].to(index_device), v[:, mid].to(index_device), positions,
                                          page_layout, config.page_size)
        if home.type == "cpu":
            pages = pages.to_host()
        sparse[layer] = SparseLayer(k[:, :num_sink].clone(), v[:, :num_sink].clone(), k[:, n - num_tail:].clone(),
                                    v[:, n - num_tail:].clone(), tree, pages)
    return Context(model_id, tuple(token_ids), layout_of(config), dense, sparse, last_logits.cpu())
