"""The page selectors, in one table (SELECTORS) that config validation and both decode
paths read: IceCache's DCI-tree query, and the others at the same budget, sinks and window,
so that an accuracy comparison differs only in which pages a decode step attends to:

* `oracle`: the pages holding the most true attention mass (exact scores of every key: a ceiling);
* `quest`: Quest's bound from per-page channel-wise key min/max (Tang et al., 2024);
* `random`: uniformly random valid pages;
* `streaming` (sinks + the most recent tokens) needs no selector: a decode path widens
  the window to the budget instead (StreamingLLM) and fills it with `recent_tokens`.

They return page ids [H, R] in the engine's numbering (a request's private pages after
the shared ones), -1 = none, and are used by both decode paths: fixed shapes and no host
sync, so the static path records them in its CUDA graph. They read every key (oracle) or
every page summary: they are for measurement, not for speed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from icecache.index.select import rank_by_bounds, rerank_pages, top_pages
from icecache.store import HostPageStore

Parts = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # index.select.box_parts' (lo, hi, candidate)


@dataclass
class PageView:
    """One request's pages of one sparse layer at one step, as a selector reads them."""
    shared: tuple[torch.Tensor, torch.Tensor]  # (keys [H, N, P, D], valid [H, N]) of the context's pages
    private: tuple[torch.Tensor, torch.Tensor]  # the request's own pages, numbered after the shared ones
    bounds: Callable[[], Parts]  # every page's box, shared then private (made only if asked for)
    draw: int | torch.Tensor  # this step's random draw (random_pages)


@dataclass(frozen=True)
class Selector:
    """How a sparse layer's page budget is filled."""
    name: str
    # (q [H, g, D], the request's pages, how many, scaling) -> page ids [H, num_pages], -1 = none;
    # None: no function of its own (the DCI-tree query, which each decode path runs its own way)
    pages: Callable[[torch.Tensor, PageView, int, float], torch.Tensor] | None = None
    window_fills_budget: bool = False  # no pages: the window widens to the budget past the sinks
    reads_boxes: bool = False  # ranks by the pages' boxes: the index keeps them on its device

    @property
    def walks_tree(self) -> bool:
        """IceCache's own query: the one that re-ranks, takes question pages and reuses layers."""
        return self.pages is None and not self.window_fills_budget


_HASH_MUL = 0x45D9F3B  # a 32-bit integer hash's multiplier (x ^ x >> 16) * m, twice
_GOLDEN = 0x9E3779B9
_MASK32 = 0xFFFFFFFF


def oracle_pages(q: torch.Tensor, shared: tuple[torch.Tensor, torch.Tensor], private: tuple[torch.Tensor, torch.Tensor],
                 num_pages: int, scaling: float) -> torch.Tensor:
    """Exact: the pages holding the most attention mass of q over every page, summed over
    the query heads of a KV group: rerank_pages with every page (shared, then private) a
    candidate; its arguments."""
    every = torch.arange(shared[1].shape[1] + private[1].shape[1], device=q.device)
    return rerank_pages(q, every.expand(q.shape[0], -1), shared, private, num_pages, scaling)


def quest_pages(q: torch.Tensor, bounds: Parts, num_pages: int) -> torch.Tensor:
    """Quest: upper bound of q.k over a page from its channel-wise min and max keys; the
    bound of a KV group is the max over its query heads. The shared pages' min and max are
    the tree's page boxes (the same pages, the same numbering)."""
    return rank_by_bounds(q.float(), bounds, num_pages)


def random_pages(valid: torch.Tensor, num_pages: int, draw: torch.Tensor | int) -> torch.Tensor:
    """Uniformly random valid pages of valid [H, N]: an integer hash of (page, head, draw),
    so a draw (a layer and step) picks the same pages on any device, and the static path
    can record it in a CUDA graph (draw: an int, or a 1-element device tensor)."""
    H, N = valid.shape
    x = (torch.arange(H * N, device=valid.device).view(H, N) + ((draw * _GOLDEN) & _MASK32)) & _MASK32
    for _ in range(2):
        x = ((x ^ (x >> 16)) * _HASH_MUL) & _MASK32
    x = (x ^ (x >> 16)) >> 8  # 24 bits: exact in float32
    return top_pages(x.float().masked_fill(valid == 0, float("-inf")), num_pages)


def random_draw(seed: int, layer: int) -> int:
    """The part of random_pages' draw fixed for a layer (a step's count is added to it)."""
    return (seed * 1_000_003 + layer) * 65_537


def recent_tokens(pages: HostPageStore, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The last `count` tokens (by position) held in the host pages, in position order:
    ([H, m, D], [H, m, D]), m = min(count, tokens held)."""
    H, _, _, D = pages.keys.shape
    pos = pages.positions.reshape(H, -1)  # [H, N * P], -1 in empty slots
    if count <= 0 or pos.numel() == 0:
        empty = pages.keys.new_zeros(H, 0, D)
        return empty, empty
    end = int(pos.max()) + 1
    take = (pos >= end - count) & (pos >= 0)
    m = int(take[0].sum())
    order = torch.where(take, pos, torch.iinfo(pos.dtype).max).argsort(dim=1)[:, :m]  # [H, m] by position
    k = pages.keys.reshape(H, -1, D).gather(1, order[..., None].expand(H, m, D))
    v = pages.values.reshape(H, -1, D).gather(1, order[..., None].expand(H, m, D))
    return k, v


SELECTORS: dict[str, Selector] = {s.name: s for s in (
    Selector("icecache"),
    Selector("oracle", lambda q, view, n, scaling: oracle_pages(q, view.shared, view.private, n, scaling)),
    Selector("quest", lambda q, view, n, scaling: quest_pages(q, view.bounds(), n), reads_boxes=True),
    Selector("streaming", window_fills_budget=True),
    Selector("random", lambda q, view, n, scaling: random_pages(
        torch.cat([view.shared[1].to(q.device), view.private[1]], dim=1), n, view.draw)),
)}
