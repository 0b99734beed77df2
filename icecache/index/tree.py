"""DCI-tree: build, top-down page query and private insertion, batched over KV heads.

Level 0 holds every middle key. Level j+1 is a random fraction of level j
(`promotion_ratio`), and every point's parent is its nearest point on the level
above in the MIPS-transformed space. The children of one level-1 node are similar
keys; they are packed, most similar first, into pages of `page_size` tokens, so one
page transfer brings related tokens together.

Every node and every page is summed up by the moments of the keys below it: their
count n, channel-wise mean mu and variance var. For a query q the node's attention mass
sum_k exp(s q.k) is estimated as log n + s q.mu + s^2/2 (q*q).var (moment_score: the
log-sum-exp of keys spread as a Gaussian around mu), s the attention scaling. A query
walks top-down: it scores a level by these estimates, keeps the best `search_width`
nodes (per KV head, union over its query heads), and descends to their children; the
pages of the kept level-1 clusters are then ranked by their own estimates.

Why moments: a level-1 node is one random key, and its score q.node says little about
the ~30 keys it stands for; a box (the channel-wise min and max, Quest's bound, used
here until 2026-12) bounds them but ranks wide, loose boxes first. On real text at
7.5k tokens, 24 pages ranked by boxes held a third of the attention mass that the best
12 pages hold; ranked by moments, as much as those 12 (benchmarks/RESULTS.md). Pages
keep their boxes too, for the `quest` selector.

Every tensor here is [H, ...] with H = number of KV heads; there is no Python loop
over tokens or heads, so the same code runs on CPU and GPU.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from icecache.index.transform import key_scale, transform_keys

_NEG_INF = float("-inf")
_MAX_SCORE_ELEMENTS = 1 << 24  # bounds the [H, rows, centers] block of a nearest-parent search


BOX_FIELDS = ("page_lo", "page_hi")  # what only the quest selector reads


@dataclass
class TreeIndex:
    """The immutable index of one layer's middle keys."""

    scale: torch.Tensor  # [H] c = max key norm at build time
    node_mean: list[torch.Tensor]  # level j = 1..L: [H, n_j, D] channel-wise mean of the keys under each node
    node_var: list[torch.Tensor]  # level j = 1..L: [H, n_j, D] channel-wise variance of those keys
    node_size: list[torch.Tensor]  # level j = 1..L: [H, n_j] fp32 number of keys under each node
    node_parent: list[torch.Tensor]  # level j = 1..L-1: [H, n_j] index of the parent on level j+1
    page_parent: torch.Tensor  # [H, num_pages] level-1 cluster of each page; -1 on padding pages
    page_mean: torch.Tensor  # [H, num_pages, D] channel-wise mean of the page's valid keys (0 on padding pages)
    page_var: torch.Tensor  # [H, num_pages, D] channel-wise variance of the page's valid keys
    page_lo: torch.Tensor  # [H, num_pages, D] channel-wise min of the page's valid keys (the quest selector's)
    page_hi: torch.Tensor  # [H, num_pages, D] channel-wise max of the page's valid keys
    page_valid: torch.Tensor  # [H, num_pages] valid slots; 0 on padding pages

    @property
    def num_levels(self) -> int:
        return len(self.node_mean)

    @property
    def num_pages(self) -> int:
        return self.page_valid.shape[1]

    @property
    def num_clusters(self) -> int:
        return self.node_mean[0].shape[1] if self.node_mean else 0

    def level_sizes(self) -> list[int]:
        """Nodes per level, level 1 first."""
        return [m.shape[1] for m in self.node_mean]

    def cluster_pages(self) -> tuple[torch.Tensor, torch.Tensor]:
        """First page and page count of every level-1 cluster ([H, n_1] each): build_tree
        packs a cluster's pages contiguously, in cluster order."""
        parent = self.page_parent
        count = torch.zeros(parent.shape[0], self.num_clusters, dtype=torch.long, device=parent.device)
        count.scatter_add_(1, parent.clamp_min(0), (parent >= 0).long())
        return count.cumsum(1) - count, count

    def to(self, device: torch.device, box_device: torch.device | None = None) -> "TreeIndex":
        """The tree on `device`, its page boxes (read only by the quest selector) on
        `box_device` (default: `device` as well)."""
        def move(name, x):
            target = box_device if box_device is not None and name in BOX_FIELDS else device
            return [t.to(target) for t in x] if isinstance(x, list) else x.to(target)
        return TreeIndex(**{f.name: move(f.name, getattr(self, f.name)) for f in fields(self)})

    @property
    def box_device(self) -> torch.device:
        return self.page_lo.device

    def tensors(self) -> list[torch.Tensor]:
        out = []
        for f in fields(self):
            value = getattr(self, f.name)
            out.extend(value if isinstance(value, list) else [value])
        return out


@dataclass
class PageLayout:
    """Where build_tree put every middle token."""

    page_of: torch.Tensor  # [H, n] page index of each token
    slot_of: torch.Tensor  # [H, n] slot within that page
    num_pages: int  # pages per head, padded to the largest head


def _nearest(points: torch.Tensor, centers: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest center (largest dot product of unit vectors) per point.
    points: [H, m, E], centers: [H, c, E] -> (index [H, m], similarity [H, m])."""
    H, m, _ = points.shape
    rows = max(1, _MAX_SCORE_ELEMENTS // max(1, H * centers.shape[1]))
    index, sim = [], []
    for start in range(0, m, rows):
        s = torch.einsum("hme,hce->hmc", points[:, start:start + rows], centers)  # [H, rows, c]
        best = s.max(dim=-1)
        index.append(best.indices)
        sim.append(best.values)
    return torch.cat(index, dim=1), torch.cat(sim, dim=1)


def level_sizes(num: int, ratios: tuple[float, ...], top_level_max: int) -> list[int]:
    """Points on levels 1..L of a tree over `num` level-0 points (random promotion: each
    level a fraction of the one below, until one has at most top_level_max points)."""
    sizes, size, level = [], num, 0
    while True:
        ratio = ratios[min(level, len(ratios) - 1)]
        next_size = max(1, min(size - 1, round(size * ratio))) if size > 1 else 1
        sizes.append(next_size)
        level += 1
        if next_size <= top_level_max or next_size == size:
            return sizes
        size = next_size


def max_pages(num: int, page_size: int, ratios: tuple[float, ...], top_level_max: int) -> int:
    """An upper bound of build_tree's pages per head for `num` keys: every level-1 cluster
    fills whole pages but its last, so at most num // page_size full pages plus one
    partial page per cluster."""
    return num // page_size + (level_sizes(num, ratios, top_level_max)[0] if num else 0)


def _promote(num: int, ratios: tuple[float, ...], top_level_max: int, H: int,
             generator: torch.Generator, device: torch.device) -> list[torch.Tensor]:
    """Random promotion: members[j-1] = [H, n_j] level-0 indices of the level-j points."""
    members, prev = [], torch.arange(num, device=device).expand(H, num)
    for next_size in level_sizes(num, ratios, top_level_max):
        noise = torch.rand(H, prev.shape[1], generator=generator).to(device)
        pick = noise.argsort(dim=1)[:, :next_size].sort(dim=1).values  # [H, next_size]
        prev = prev.gather(1, pick)
        members.append(prev)
    return members


def _sub_parents(tkeys: torch.Tensor, parent: torch.Tensor, page_size: int,
                 generator: torch.Generator) -> torch.Tensor:
    """A key per token naming its nearest sub-parent within its own cluster ([H, n]; equal
    keys = same sub-parent, -1 where the cluster drew none). Sub-parents are a random
    1/page_size sample of the tokens.

    Only a token's own cluster's sub-parents are candidates, so with tokens and sub-parents
    both sorted by cluster, a block of tokens compares against the window of sub-parents
    its clusters span: about block / page_size of them, not all n / page_size (the search
    is linear in n, not quadratic)."""
    H, n, E = tkeys.shape
    count = max(1, n // page_size)
    pick = torch.rand(H, n, generator=generator).to(tkeys.device).argsort(dim=1)[:, :count]  # [H, count]
    center_cluster, by_cluster = parent.gather(1, pick).sort(dim=1, stable=True)
    centers = tkeys.gather(1, pick.gather(1, by_cluster)[..., None].expand(H, count, E))  # sorted by cluster
    token_order = parent.argsort(dim=1, stable=True)
    token_cluster = parent.gather(1, token_order)
    block = max(page_size, math.isqrt(_MAX_SCORE_ELEMENTS * page_size // H))  # a window holds ~block / page_size
    found = torch.empty(H, n, dtype=torch.long, device=tkeys.device)
    offsets = torch.arange(count, device=tkeys.device)
    for start in range(0, n, block):
        rows = token_cluster[:, start:start + block]  # [H, r], ascending
        lo = torch.searchsorted(center_cluster, rows[:, :1].contiguous())  # [H, 1]
        hi = torch.searchsorted(center_cluster, rows[:, -1:].contiguous(), right=True)
        width = int((hi - lo).max())
        if width == 0:
            found[:, start:start + block] = -1
            continue
        window = (lo + offsets[:width]).clamp_max(count - 1)  # [H, w]
        in_window = offsets[:width] < (hi - lo)
        points = tkeys.gather(1, token_order[:, start:start + block, None].expand(-1, -1, E))
        s = torch.einsum("hme,hce->hmc", points, centers.gather(1, window[..., None].expand(H, width, E)))
        same = (rows[..., None] == center_cluster.gather(1, window)[:, None, :]) & in_window[:, None, :]
        best = s.masked_fill_(~same, float("-inf")).max(dim=-1)
        found[:, start:start + block] = torch.where(best.values.isneginf(), -1, window.gather(1, best.indices))
    return torch.empty_like(found).scatter_(1, token_order, found)


def page_bounds(keys: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel-wise min and max of each page's valid slots, 0 on empty pages.
    keys: [H, N, P, D] paged keys; valid: [H, N] -> ([H, N, D], [H, N, D]) in the keys' dtype."""
    P = keys.shape[2]
    slot_ok = (torch.arange(P, device=keys.device) < valid[..., None])[..., None]  # [H, N, P, 1]
    lo = keys.masked_fill(~slot_ok, float("inf")).amin(2)
    hi = keys.masked_fill(~slot_ok, float("-inf")).amax(2)
    empty = (valid == 0)[..., None]
    return lo.masked_fill(empty, 0.0), hi.masked_fill(empty, 0.0)


def page_means(pages: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The mean of each page's valid slots, summed in fp32: pages [H, N, P, D], valid [H, N]
    -> [H, N, D] in the pages' dtype, 0 on empty pages."""
    return _page_sums(pages, valid)[0].to(pages.dtype)


def _page_sums(pages: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fp32 means [H, N, D], fp32 pages with empty slots zeroed [H, N, P, D], slot mask [H, N, P, 1])."""
    P = pages.shape[2]
    slot_ok = (torch.arange(P, device=pages.device) < valid[..., None])[..., None]  # [H, N, P, 1]
    zeroed = pages.float().masked_fill(~slot_ok, 0.0)
    return zeroed.sum(2) / valid.clamp_min(1).float()[..., None], zeroed, slot_ok


def page_moments(keys: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel-wise mean and variance of each page's valid slots, 0 on empty pages.
    keys: [H, N, P, D] paged keys; valid: [H, N] -> ([H, N, D], [H, N, D]) in the keys' dtype."""
    mean, k, slot_ok = _page_sums(keys, valid)
    size = valid.clamp_min(1).float()[..., None]
    var = ((k - mean[:, :, None]).masked_fill(~slot_ok, 0.0) ** 2).sum(2) / size
    return mean.to(keys.dtype), var.to(keys.dtype)


def _moments_up(size: torch.Tensor, mean: torch.Tensor, var: torch.Tensor | float, parent: torch.Tensor,
                num_parents: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The moments of the parents from their children's: size [H, m], mean and var [H, m, D]
    (fp32; var 0.0 for single keys), parent [H, m] -> size [H, num_parents], mean and var
    [H, num_parents, D] (fp32, 0 for a childless parent)."""
    H, _, D = mean.shape
    index = parent[..., None].expand(-1, -1, D)
    up_size = torch.zeros(H, num_parents, dtype=torch.float32, device=mean.device).scatter_add_(1, parent, size)
    total = torch.zeros(H, num_parents, D, dtype=torch.float32, device=mean.device)
    squares = torch.zeros_like(total)
    total.scatter_add_(1, index, mean * size[..., None])
    squares.scatter_add_(1, index, (var + mean * mean) * size[..., None])
    n = up_size.clamp_min(1)[..., None]
    up_mean = total / n
    return up_size, up_mean, (squares / n - up_mean * up_mean).clamp_min(0.0)


def welford(mean: torch.Tensor, var: torch.Tensor, key: torch.Tensor, size) -> tuple[torch.Tensor, torch.Tensor]:
    """A page's (mean, var) once `key` joins it as its size-th key (size >= 1; var is the
    population variance): Welford's update, as the push kernel makes it."""
    delta = key - mean
    mean = mean + delta / size
    return mean, var + (delta * (key - mean) - var) / size


def moment_score(q: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, size: torch.Tensor,
                 scaling: float) -> torch.Tensor:
    """The estimated log attention mass of q over the keys summed up by (size, mean, var):
    log size + s q.mean + s^2 / 2 (q*q).var, s = scaling (-inf where size is 0).
    q: [H, g, D] float; mean, var: [H, n, D]; size: [H, n] -> [H, g, n]."""
    square = (q * q).to(var.dtype).to(q.dtype)  # rounded to 16-bit moments, as the GPU kernel's tensor cores take it
    est = (torch.einsum("hgd,hnd->hgn", q, mean.to(q.dtype)) * scaling
           + torch.einsum("hgd,hnd->hgn", square, var.to(q.dtype)) * (scaling * scaling / 2))
    return est + torch.log(size.to(q.dtype))[:, None, :]


def box_bound(q: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """max over the box of q.k = sum_d max(q_d lo_d, q_d hi_d). q: [H, g, D] float;
    lo, hi: [H, n, D] -> [H, g, n]."""
    return (torch.einsum("hgd,hnd->hgn", q.clamp_min(0), hi.to(q.dtype))
            + torch.einsum("hgd,hnd->hgn", q.clamp_max(0), lo.to(q.dtype)))


@contextlib.contextmanager
def _tensor_core_fp32(device: torch.device):
    """fp32 products on TF32 tensor cores (CUDA) while a tree is built: its nearest-parent
    searches are [n, n / page_size] similarity products, 8x faster so, and a parent picked
    at TF32 precision is as good a cluster. Restored after: the setting is process-wide."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def build_tree(keys: torch.Tensor, page_size: int, ratios: tuple[float, ...], top_level_max: int,
               seed: int = 0) -> tuple[TreeIndex, PageLayout]:
    """Index one layer's middle keys. keys: [H, n, D] (post-RoPE)."""
    with _tensor_core_fp32(keys.device):
        return _build_tree(keys, page_size, ratios, top_level_max, seed)


def _build_tree(keys: torch.Tensor, page_size: int, ratios: tuple[float, ...], top_level_max: int,
                seed: int) -> tuple[TreeIndex, PageLayout]:
    H, n, D = keys.shape
    device = keys.device
    generator = torch.Generator().manual_seed(seed)
    scale = key_scale(keys)
    if n == 0:
        empty = torch.zeros(H, 0, dtype=torch.long, device=device)
        none = torch.zeros(H, 0, D, dtype=keys.dtype, device=device)
        tree = TreeIndex(scale=scale, node_mean=[], node_var=[], node_size=[], node_parent=[], page_parent=empty,
                         page_mean=none, page_var=none.clone(), page_lo=none.clone(), page_hi=none.clone(),
                         page_valid=empty.clone())
        return tree, PageLayout(empty, empty.clone(), 0)

    tkeys = transform_keys(keys, scale)  # [H, n, D + 1]
    tkeys = F.pad(tkeys, (0, -tkeys.shape[-1] % 8))  # zero columns: the same products on aligned (fast) GEMMs
    members = _promote(n, ratios, top_level_max, H, generator, device)

    def gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return x.gather(1, idx[..., None].expand(*idx.shape, x.shape[-1]))

    level_t = [gather_rows(tkeys, m) for m in members]  # T-space vectors per level
    node_parent = [_nearest(level_t[j], level_t[j + 1])[0] for j in range(len(members) - 1)]
    parent, sim = _nearest(tkeys, level_t[0])  # [H, n] level-1 cluster of every token

    # Pack each cluster's tokens into whole pages. Inside a cluster, tokens are grouped by
    # their nearest sub-parent (a random 1/page_size sample, same cluster only), so a run of
    # page_size tokens is a tight group rather than a ring around the cluster's parent.
    n1 = members[0].shape[1]
    sub = _sub_parents(tkeys, parent, page_size, generator)  # [H, n]
    order = sim.argsort(dim=1, descending=True, stable=True)
    for key in (sub, parent):  # stable sorts: by cluster, then sub-parent, then similarity
        order = order.gather(1, key.gather(1, order).argsort(dim=1, stable=True))
    counts = torch.zeros(H, n1, dtype=torch.long, device=device).scatter_add_(1, parent, torch.ones_like(parent))
    pages_per = (counts + page_size - 1) // page_size  # [H, n1]
    page_start = pages_per.cumsum(1) - pages_per
    cluster_start = counts.cumsum(1) - counts
    sorted_parent = parent.gather(1, order)
    rank = torch.arange(n, device=device) - cluster_start.gather(1, sorted_parent)  # [H, n]
    page_sorted = page_start.gather(1, sorted_parent) + rank // page_size
    page_of = torch.empty_like(order).scatter_(1, order, page_sorted)
    slot_of = torch.empty_like(order).scatter_(1, order, rank % page_size)
    num_pages = int(pages_per.sum(1).max())

    page_parent = torch.full((H, num_pages), -1, dtype=torch.long, device=device)
    page_parent.scatter_(1, page_sorted, sorted_parent)
    valid = torch.zeros(H, num_pages, dtype=torch.long, device=device)
    valid.scatter_add_(1, page_of, torch.ones_like(page_of))
    paged = torch.zeros(H, num_pages, page_size, D, dtype=keys.dtype, device=device)
    paged[torch.arange(H, device=device)[:, None], page_of, slot_of] = keys
    page_lo, page_hi = page_bounds(paged, valid)
    page_mean, page_var = page_moments(paged, valid)
    del paged

    # node moments summed up from the tokens, in fp32; stored in the keys' dtype (bf16 on a bf16 model)
    node_mean, node_var, node_size = [], [], []
    ones = torch.ones(H, n, dtype=torch.float32, device=device)
    size, mean, var = _moments_up(ones, keys.float(), 0.0, parent, n1)
    for j in range(len(members)):
        if j:
            size, mean, var = _moments_up(size, mean, var, node_parent[j - 1], members[j].shape[1])
        node_mean.append(mean.to(keys.dtype))
        node_var.append(var.to(keys.dtype))
        node_size.append(size)
    tree = TreeIndex(scale, node_mean, node_var, node_size, node_parent, page_parent, page_mean, page_var,
                     page_lo, page_hi, valid)
    return tree, PageLayout(page_of, slot_of, num_pages)


class PrivatePages:
    """A request's own pages: tokens that left its recent window after the shared
    context was indexed (question and generated tokens), in arrival order: private
    token n is slot n % page_size of page n // page_size on every head, as the static
    decode path keeps them. Every private page is a candidate at every step (the tree's
    walk covers the shared pages only); the shared tree and its pages stay immutable.
    Pages are grown in place, doubling capacity."""

    def __init__(self, num_heads: int, page_size: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 capacity: int = 8) -> None:
        self.page_size = page_size
        H, P, D = num_heads, page_size, head_dim
        self.keys = torch.zeros(H, capacity, P, D, dtype=dtype, device=device)  # [H, cap, P, D]
        self.values = torch.zeros_like(self.keys)
        self.valid = torch.zeros(H, capacity, dtype=torch.long, device=device)
        self.lo = torch.zeros(H, capacity, D, dtype=dtype, device=device)  # page boxes (page_bounds)
        self.hi = torch.zeros(H, capacity, D, dtype=dtype, device=device)
        self.mean = torch.zeros(H, capacity, D, dtype=dtype, device=device)  # page moments (page_moments)
        self.var = torch.zeros(H, capacity, D, dtype=dtype, device=device)
        self.num_tokens = 0
        self.last_written = torch.zeros(H, 0, dtype=torch.long, device=device)  # pages the last insert changed

    @property
    def capacity(self) -> int:
        return self.keys.shape[1]

    @property
    def used_pages(self) -> int:
        return -(-self.num_tokens // self.page_size)

    def _grow(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        extra = max(needed, 2 * self.capacity) - self.capacity
        for name, fill in (("keys", 0), ("values", 0), ("valid", 0), ("lo", 0), ("hi", 0), ("mean", 0), ("var", 0)):
            old = getattr(self, name)
            pad = torch.full((old.shape[0], extra, *old.shape[2:]), fill, dtype=old.dtype, device=old.device)
            setattr(self, name, torch.cat([old, pad], dim=1))

    def insert(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Add tokens after those already held. keys, values: [H, m, D]."""
        H, m, _ = keys.shape
        if m == 0:
            return
        P, device = self.page_size, keys.device
        first, last = self.num_tokens // P, (self.num_tokens + m - 1) // P  # the pages it writes
        n = torch.arange(self.num_tokens, self.num_tokens + m, device=device)
        page, slot = n // P, n % P
        self._grow(last + 1)
        self.keys[:, page, slot] = keys.to(self.keys.dtype)
        self.values[:, page, slot] = values.to(self.values.dtype)
        self.valid.index_add_(1, page, torch.ones(H, m, dtype=torch.long, device=device))
        self.num_tokens += m
        # only the pages this insert wrote change their summaries
        written = torch.arange(first, last + 1, device=device)
        self.lo[:, written], self.hi[:, written] = page_bounds(self.keys[:, written], self.valid[:, written])
        self.mean[:, written], self.var[:, written] = page_moments(self.keys[:, written], self.valid[:, written])
        self.last_written = written.expand(H, -1)
