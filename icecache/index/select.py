"""Page choice over a DCI-tree: the walk (tree_keep), the ranking of candidate pages by
their key moments (rank_pages) or by their keys (rerank_pages), the pages a question points
to (question_pages), and select_pages, the whole query of one decode step. The torch
reference of the GPU kernels in icecache/kernels/; the CPU path runs it as is.

Every tensor here is [H, ...] with H = number of KV heads; fixed shapes, no host sync.
"""

from __future__ import annotations

import torch

from icecache.index.tree import PrivatePages, TreeIndex, box_bound, moment_score

_NEG_INF = float("-inf")


def combine_heads(scores: torch.Tensor, candidate: torch.Tensor, heads: str = "max") -> torch.Tensor:
    """Union over the query heads of a KV head, as a weight for top_pages: "sum" = each
    head's softmax share, summed; "max" = the largest score over the heads.
    scores: [H, g, N], candidate: [H, N] -> [H, N] (-inf where not a candidate)."""
    scores = scores.masked_fill(~candidate[:, None, :], _NEG_INF)
    if heads == "max":
        return scores.amax(dim=1)
    share = torch.softmax(scores, dim=-1).nan_to_num(0.0).sum(dim=1)
    return share.masked_fill(~candidate, _NEG_INF)


def top_pages(weight: torch.Tensor, num_pages: int, least: float = _NEG_INF) -> torch.Tensor:
    """The best pages by weight [H, N], best first; -1 where the weight is `least` or below
    (-inf: not a candidate) or fewer pages exist. -> [H, min(num_pages, N)]."""
    best = weight.topk(min(num_pages, weight.shape[1]), dim=1)
    return torch.where(best.values > least, best.indices, -1)


def tree_keep(tree: TreeIndex, q: torch.Tensor, search_width: int, scaling: float) -> torch.Tensor | None:
    """Walk the tree top-down, keeping the best `search_width` nodes per level (per KV head,
    union over its query heads). q: [H, g, D] float -> level-1 nodes kept [H, n_1], or
    None for a tree without levels. Fixed shapes: no host sync."""
    keep = None  # [H, n_j] nodes kept on the level just scored
    for j in range(tree.num_levels, 0, -1):
        s = moment_score(q, tree.node_mean[j - 1], tree.node_var[j - 1], tree.node_size[j - 1], scaling)  # [H, g, n_j]
        if keep is not None:
            candidate = keep.gather(1, tree.node_parent[j - 1])  # children of kept parents
            s = s.masked_fill(~candidate[:, None, :], _NEG_INF)
        combined = torch.log_softmax(s, dim=-1).amax(dim=1)  # [H, n_j]
        top = combined.topk(min(search_width, combined.shape[1]), dim=1).indices
        keep = torch.zeros_like(combined, dtype=torch.bool).scatter_(1, top, True) & (combined > _NEG_INF)
    return keep


# a rank_pages part: (mean [H, N, D], var [H, N, D], valid [H, N], candidate [H, N]) of N pages
Part = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def shared_part(tree: TreeIndex, keep: torch.Tensor | None) -> Part:
    """The tree's pages as a rank_pages part: the valid pages of the kept level-1 clusters
    are the candidates. keep: [H, n_1] (tree_keep), or None: every valid page (no walk)."""
    cand = tree.page_valid > 0
    if keep is not None:
        cand = cand & keep.gather(1, tree.page_parent.clamp_min(0))
    return tree.page_mean, tree.page_var, tree.page_valid, cand


def private_part(mean: torch.Tensor, var: torch.Tensor, valid: torch.Tensor) -> Part:
    """A request's own pages as a rank_pages part: every valid one is a candidate."""
    return mean, var, valid, valid > 0


def candidate_parts(tree: TreeIndex, private: PrivatePages | None, keep: torch.Tensor | None) -> list[Part]:
    """rank_pages parts of a request's candidate pages: the tree's (shared_part), then all
    its private pages (ids after the tree's). keep: [H, n_1] (tree_keep), or None: every
    valid page."""
    parts = [shared_part(tree, keep)] if tree.num_pages else []
    if private is not None and private.num_tokens:
        used = private.used_pages
        parts.append(private_part(private.mean[:, :used], private.var[:, :used], private.valid[:, :used]))
    return parts


def box_parts(tree: TreeIndex, private: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
              ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Every valid page's box as (lo, hi, candidate), the tree's then the private pages'
    (private: (lo, hi, valid) or None): what the quest selector ranks."""
    parts = [(tree.page_lo, tree.page_hi, tree.page_valid > 0)] if tree.num_pages else []
    if private is not None:
        lo, hi, valid = private
        parts.append((lo, hi, valid > 0))
    return parts


def rank_pages(q: torch.Tensor, scaling: float, parts: list[Part], num_pages: int, heads: str = "max") -> torch.Tensor:
    """The `num_pages` best pages by their moments (tree.moment_score), over parts of
    (mean, var, valid, candidate) pages numbered one part after the other, the KV head's
    query heads combined by `heads` (combine_heads)."""
    if not parts:
        return torch.full((q.shape[0], 0), -1, dtype=torch.long, device=q.device)
    est = torch.cat([moment_score(q, mean, var, valid, scaling) for mean, var, valid, _ in parts], dim=-1)
    weight = combine_heads(est, torch.cat([cand for *_, cand in parts], dim=-1), heads)
    return top_pages(weight, num_pages)


def rank_by_bounds(q: torch.Tensor, parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                   num_pages: int) -> torch.Tensor:
    """The `num_pages` best pages by their box bounds (box_parts; the largest over the
    KV head's query heads): Quest's ranking."""
    if not parts:
        return torch.full((q.shape[0], 0), -1, dtype=torch.long, device=q.device)
    bounds = torch.cat([box_bound(q, lo, hi) for lo, hi, _ in parts], dim=-1)
    return top_pages(combine_heads(bounds, torch.cat([cand for *_, cand in parts], dim=-1), "max"), num_pages)


def page_log_mass(q: torch.Tensor, keys: torch.Tensor, valid: torch.Tensor, scaling: float) -> torch.Tensor:
    """log sum exp of every query head's scores over each page's valid keys.
    q: [H, g, D]; keys: [H, N, P, D]; valid: [H, N] -> [H, g, N] (-inf on empty pages)."""
    P = keys.shape[2]
    s = torch.einsum("hgd,hnpd->hgnp", q.float(), keys.float()) * scaling  # [H, g, N, P]
    ok = torch.arange(P, device=q.device) < valid[..., None]  # [H, N, P]
    return torch.logsumexp(s.masked_fill(~ok[:, None], _NEG_INF), dim=-1)


def question_mass(q: torch.Tensor, row_lse: torch.Tensor, owner: torch.Tensor, num_requests: int,
                  keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """Each request's question rows' attention over the context's paged tokens: every row's
    softmax over the whole context (from the row's log-sum-exp there), summed over the
    request's rows and query heads (on CUDA kernels.question does this and question_pages).
    q: [Hq, W, D] the questions' last rows; row_lse: [Hq, W]; owner: [W] each row's request
    (< num_requests, ascending); keys: [H, n, D] the context's paged tokens.
    Fixed shapes, no host sync. -> [num_requests, H, n] fp32."""
    H, n, D = keys.shape
    Hq, W, _ = q.shape
    g = Hq // H
    rows = q.reshape(H, g * W, D).float()  # a KV head's query heads' rows together, head-major; scores
    # in fp32 from the bf16/fp16 values, as kernels.question has them (rounded to bf16, a score of 20
    # is off by up to 0.06, its exp by 6%: page choices then flip on near-ties)
    lse = row_lse.reshape(H, g * W, 1).float()
    weights = torch.nn.functional.one_hot(owner.repeat(g), num_requests).float()  # [g * W, requests]
    mass = torch.zeros(num_requests, H, n, dtype=torch.float32, device=q.device)
    # at most ~256 MB of scores and ~128 MB of fp32 keys (a copy where they are 16-bit) at once
    chunk = max(1024, min((1 << 26) // (H * g * W), (1 << 25) // (H * D)))
    for c in range(0, n, chunk):
        p = torch.exp(torch.einsum("hrd,hnd->hrn", rows, keys[:, c:c + chunk].float()) * scaling - lse)
        mass[:, :, c:c + chunk] = torch.einsum("hrn,rq->qhn", p, weights)
    return mass


def question_pages(mass: torch.Tensor, page_of: torch.Tensor, position: torch.Tensor, num_tokens: int,
                   num_pages: int, count: int, follow: int) -> torch.Tensor:
    """The `count` pages per KV head that each request's question points to: its rows'
    attention mass on the context's tokens (question_mass), plus the same mass moved to the
    `follow` positions after each token, the nearest the most (weights 1, (follow - 1) /
    follow, ..., 1 / follow: an answer follows the passage a question matches, and a page
    holds tokens of similar keys, not neighbours; where several passages match, the tokens
    right after each of them come before the far ends of their spans), summed by page.
    mass: [requests, H, n]; page_of, position: [H, n] each token's page and position
    (< num_tokens). Fixed shapes, no host sync.
    -> [requests, H, count] page ids, best first, -1 where fewer pages have mass."""
    num_requests, H, n = mass.shape
    at = position.expand(num_requests, H, n)
    moved = mass.new_zeros(num_requests, H, n)
    if follow:  # moved[i] = sum over d in 1..follow of weight(d) * mass at position i - d
        by_position = torch.zeros(num_requests * H, 1, num_tokens + follow, dtype=torch.float32, device=mass.device)
        by_position[:, 0, follow:].view(num_requests, H, num_tokens).scatter_add_(2, at, mass)
        weights = torch.arange(1, follow + 1, dtype=torch.float32, device=mass.device) / follow  # nearest last
        spread = torch.nn.functional.conv1d(by_position, weights.view(1, 1, follow))  # [.., num_tokens + 1]
        moved = spread.view(num_requests, H, num_tokens + 1).gather(2, at)
    weight = torch.zeros(num_requests, H, num_pages, dtype=torch.float32, device=mass.device)
    weight.scatter_add_(2, page_of.expand(num_requests, H, n), mass + moved)
    return top_pages(weight.flatten(0, 1), count, least=0.0).view(num_requests, H, -1)  # no mass: no page


def fixed_log_mass(q: torch.Tensor, keys: torch.Tensor, filled: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """log sum exp of every query head's scores over the tokens every step attends to (the
    sinks and the window). q: [rows, g, D]; keys [rows, T, D]; filled [rows, T] or None
    (all). -> [rows, g]."""
    s = torch.einsum("hgd,htd->hgt", q.float(), keys.float()) * scaling
    if filled is not None:
        s = s.masked_fill(~filled[:, None], _NEG_INF)
    return torch.logsumexp(s, dim=-1)


# The pages every KV head keeps when a layer's pages are split by share (head_pages="share"):
# its best one. 2 gave the same at budget 256 (4k, 32 cases: nll gap -0.0001 [-0.0003, +0.0001])
# and left the split nothing to move at budget 64 (2 pages a head), where 1 gains.
LEAST_HEAD_PAGES = 1


def least_head_pages(num_pages: int) -> int:
    """What every KV head keeps of its layer's num_pages a head under the share split."""
    return min(LEAST_HEAD_PAGES, num_pages)


def split_by_share(share: torch.Tensor, candidates: torch.Tensor, group: int, num_pages: int) -> torch.Tensor:
    """A layer's pages shared among its KV heads (IceCacheConfig.head_pages "share"): each
    request's group x num_pages pages go to its rows' candidates of the largest share, each
    row between least_head_pages(num_pages) and 2 x num_pages of them.
    share: [rows, C] each candidate's share of its row's softmax (< 0 = not a page), rows
    request-major (group rows a request). -> [rows, min(2 x num_pages, C)] ids, best first,
    -1 = none."""
    rows, C = share.shape
    cap, least = min(2 * num_pages, C), least_head_pages(num_pages)
    best, order = share.topk(cap, dim=1)  # [rows, cap], by share, best first
    weight = torch.where(best >= 0, best, -2.0)
    weight[:, :least] += torch.where(best[:, :least] >= 0, 10.0, 0.0)  # every row's first page(s) first
    flat = weight.view(rows // group, group * cap)
    keep = torch.zeros_like(flat, dtype=torch.bool).scatter_(1, flat.topk(min(group * num_pages, group * cap),
                                                                        dim=1).indices, True)
    keep = keep.view(rows, cap) & (best >= 0)
    return torch.where(keep, candidates.gather(1, order), -1)


def rerank_pages(q: torch.Tensor, candidates: torch.Tensor, shared: tuple[torch.Tensor, torch.Tensor],
                 private: tuple[torch.Tensor, torch.Tensor], num_pages: int, scaling: float,
                 fixed: torch.Tensor | None = None) -> torch.Tensor:
    """The `num_pages` of the candidate pages that hold the most attention mass of q, from
    their keys (the oracle's measure, over the candidates only): each page's log-sum-exp
    of scores per query head, the KV head's query heads combined by summed softmax shares.

    q: [rows, g, D]; candidates: [rows, C] page ids (best bounds first, -1 = none, a
    repeated id counts once), ids >= N private; shared: (keys [Hs, N, P, D], valid [Hs, N]),
    read by row r as KV head r % Hs (rows = requests x Hs); private: (keys [rows, M, P, D],
    valid [rows, M]).
    fixed: [rows, g] the log-mass of the tokens every step attends to (fixed_log_mass): then
    the pages go to each request's Hs rows by each candidate's share of its row's softmax over
    those tokens and the candidates, query heads summed (split_by_share), not num_pages a row.
    Fixed shapes, no host sync. -> [rows, min(num_pages, C)] ids (with fixed:
    min(2 x num_pages, C)), best first, -1 = none."""
    rows, _ = candidates.shape
    (sk, sv), (pk, pv) = shared, private
    N, M = sk.shape[1], pk.shape[1]
    r = torch.arange(rows, device=candidates.device)[:, None]
    hs = (r % max(sk.shape[0], 1)).to(sk.device)

    def read(store: torch.Tensor, row: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return store[row.to(store.device), ids.to(store.device)].to(q.device)

    sid, pid = candidates.clamp(0, max(N - 1, 0)), (candidates - N).clamp(0, max(M - 1, 0))
    if N and M:
        is_shared = candidates < N
        keys = torch.where(is_shared[..., None, None], read(sk, hs, sid).to(pk.dtype), read(pk, r, pid))
        valid = torch.where(is_shared, read(sv, hs, sid), read(pv, r, pid))
    elif N:
        keys, valid = read(sk, hs, sid), read(sv, hs, sid)
    else:
        keys, valid = read(pk, r, pid), read(pv, r, pid)
    earlier = (candidates[:, :, None] == candidates[:, None, :]).tril(-1).any(2)  # a page already a candidate
    valid = valid.masked_fill((candidates < 0) | earlier, 0)
    mass = page_log_mass(q, keys, valid, scaling)
    if fixed is not None:
        mass = mass.masked_fill((valid <= 0)[:, None], _NEG_INF)
        total = torch.logsumexp(torch.cat([fixed.float()[..., None], mass], dim=-1), dim=-1)  # [rows, g]
        share = torch.exp(mass - total[..., None]).sum(1).masked_fill(valid <= 0, -1.0)
        return split_by_share(share, candidates, sk.shape[0] or rows, num_pages)  # a request: Hs rows
    best = top_pages(combine_heads(mass, valid > 0, "sum"), num_pages)
    return torch.where(best >= 0, candidates.gather(1, best.clamp_min(0)), -1)


def select_pages(tree: TreeIndex, private: PrivatePages | None, q: torch.Tensor, num_pages: int,
                 search_width: int, scaling: float, heads: str = "max") -> torch.Tensor:
    """The best pages for one decode query, best first.

    q: [H, g, D] (g query heads per KV head). Returns page ids [H, num_pages], -1 where
    fewer pages qualify; ids >= tree.num_pages are private pages (id - tree.num_pages).
    heads: how the query heads combine on pages (IceCacheConfig.page_heads).
    """
    q = q.float()
    parts = candidate_parts(tree, private, tree_keep(tree, q, search_width, scaling))
    return rank_pages(q, scaling, parts, num_pages, heads)


def all_pages(tree: TreeIndex, private: PrivatePages | None) -> torch.Tensor:
    """Every valid page (full attention through the same path). -> [H, N] ids, -1 padding."""
    parts = [torch.where(tree.page_valid > 0, torch.arange(tree.num_pages, device=tree.page_valid.device), -1)]
    if private is not None and private.num_tokens:
        used = private.used_pages
        ids = torch.arange(used, device=private.valid.device) + tree.num_pages
        parts.append(torch.where(private.valid[:, :used] > 0, ids, -1))
    return torch.cat(parts, dim=1)
