"""Page selectors other than the DCI-tree, at the same budget, sinks and window, so that an
accuracy comparison differs only in which pages a decode step attends to:

* `oracle`: the pages holding the most true attention mass (exact scores of every key: a ceiling);
* `quest`: Quest's bound from per-page channel-wise key min/max (Tang et al., 2024);
* `random`: uniformly random valid pages;
* `streaming` (sinks + the most recent tokens) needs no selector: the engine widens the
  window to the budget instead (StreamingLLM).

Each takes the shared host pages and the request's private pages and returns page ids
[H, R] in the engine's numbering (private ids offset by the shared page count), -1 = none.
These run on the dynamic path and read every key (oracle) or every page summary; they are
for measurement, not for speed.
"""

from __future__ import annotations

import torch

from icecache.index.tree import PrivatePages, _combine_heads, top_pages
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
    return top_pages(_combine_heads(log_mass, valid > 0), num_pages)


def quest_pages(q: torch.Tensor, shared: HostPageStore, private: PrivatePages | None, num_pages: int,
                cache: dict) -> torch.Tensor:
    """Quest: upper bound of q.k over a page from its channel-wise min and max keys; the
    bound of a KV group is the max over its query heads. `cache` keeps the shared pages'
    min/max between steps."""
    if "shared" not in cache:
        cache["shared"] = _min_max(shared.keys.to(q.device), shared.valid.to(q.device))
    lo, hi = cache["shared"]
    valid = shared.valid.to(q.device)
    if private is not None and private.num_tokens:
        used = private.used_pages
        plo, phi = _min_max(private.keys[:, :used], private.valid[:, :used])
        lo, hi = torch.cat([lo, plo.to(lo.device)], 1), torch.cat([hi, phi.to(hi.device)], 1)
        valid = torch.cat([valid, private.valid[:, :used].to(valid.device)], 1)
    qf = q.float()[:, :, None, :]  # [H, g, 1, D]
    bound = torch.maximum(qf * lo[:, None], qf * hi[:, None]).sum(-1).amax(1)  # [H, N]
    # top_pages wants weights >= 0 for candidates: shift the bounds up, keep invalid pages at -1
    weight = torch.where(valid > 0, bound - bound.amin() + 1.0, torch.full_like(bound, -1.0))
    return top_pages(weight, num_pages)


def _min_max(keys: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """keys [H, N, P, D], valid [H, N] -> channel-wise min and max over valid slots [H, N, D]."""
    P = keys.shape[2]
    ok = (torch.arange(P, device=keys.device) < valid[..., None])[..., None]  # [H, N, P, 1]
    k = keys.float()
    lo = k.masked_fill(~ok, float("inf")).amin(2)
    hi = k.masked_fill(~ok, float("-inf")).amax(2)
    empty = valid == 0
    return lo.masked_fill(empty[..., None], 0.0), hi.masked_fill(empty[..., None], 0.0)


def random_pages(shared: HostPageStore, private: PrivatePages | None, num_pages: int,
                 generator: torch.Generator) -> torch.Tensor:
    """Uniformly random valid pages."""
    valid = shared.valid
    if private is not None and private.num_tokens:
        valid = torch.cat([valid, private.valid[:, :private.used_pages].cpu()], 1)
    noise = torch.rand(valid.shape, generator=generator)
    return top_pages(torch.where(valid > 0, noise, torch.full_like(noise, -1.0)), num_pages)
