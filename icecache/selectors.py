"""Page selectors other than the DCI-tree, at the same budget, sinks and window, so that an
accuracy comparison differs only in which pages a decode step attends to:

* `oracle`: the pages holding the most true attention mass (exact scores of every key: a ceiling);
* `quest`: Quest's bound from per-page channel-wise key min/max (Tang et al., 2024);
* `random`: uniformly random valid pages;
* `streaming` (sinks + the most recent tokens) needs no selector: the engine widens the
  window to the budget instead (StreamingLLM).

Each takes the shared pages (host pages, or the tree's page boxes) and the request's
private pages and returns page ids
[H, R] in the engine's numbering (private ids offset by the shared page count), -1 = none.
These run on the dynamic path and read every key (oracle) or every page summary; they are
for measurement, not for speed.
"""

from __future__ import annotations

import torch

from icecache.index.tree import PrivatePages, TreeIndex, _combine_heads, candidate_parts, rank_pages, top_pages
from icecache.store import HostPageStore


def _pages(shared: HostPageStore, private: PrivatePages | None, device: torch.device):
    """All pages' keys [H, N, P, D] and valid counts [H, N], shared first."""
    keys, valid = [shared.keys.to(device)], [shared.valid.to(device)]
    if private is not None and private.num_tokens:
        used = private.used_pages
        keys.append(private.keys[:, :used].to(device, shared.keys.dtype))
        valid.append(private.valid[:, :used].to(device))
    return torch.cat(keys, dim=1), torch.cat(valid, dim=1)


def oracle_pages(q: torch.Tensor, shared: HostPageStore, private: PrivatePages | None, num_pages: int,
                 scaling: float) -> torch.Tensor:
    """Exact: each page's share of every query head's attention over all pages, summed over
    the heads of a KV group. q: [H, g, D]."""
    keys, valid = _pages(shared, private, q.device)
    P = keys.shape[2]
    s = torch.einsum("hgd,hnpd->hgnp", q.float(), keys.float()) * scaling  # [H, g, N, P]
    ok = torch.arange(P, device=q.device) < valid[..., None]  # [H, N, P]
    s = s.masked_fill(~ok[:, None], float("-inf"))
    log_mass = torch.logsumexp(s, dim=-1)  # [H, g, N]
    return top_pages(_combine_heads(log_mass, valid > 0, "sum"), num_pages)


def quest_pages(q: torch.Tensor, tree: TreeIndex, private: PrivatePages | None, num_pages: int) -> torch.Tensor:
    """Quest: upper bound of q.k over a page from its channel-wise min and max keys; the
    bound of a KV group is the max over its query heads. The shared pages' min and max are
    the tree's page boxes (the same pages, the same numbering): IceCache's page ranking
    with page_heads="max" over every page, without the walk."""
    return rank_pages(q.float(), 1.0, candidate_parts(tree, private, None), num_pages, "max")


def random_pages(shared: HostPageStore, private: PrivatePages | None, num_pages: int,
                 generator: torch.Generator) -> torch.Tensor:
    """Uniformly random valid pages."""
    valid = shared.valid
    if private is not None and private.num_tokens:
        valid = torch.cat([valid, private.valid[:, :private.used_pages].cpu()], 1)
    noise = torch.rand(valid.shape, generator=generator)
    return top_pages(noise.masked_fill(valid == 0, float("-inf")), num_pages)
