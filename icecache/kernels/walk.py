"""The tree walk and the page choice by key moments (index.select.tree_keep and rank_pages are
their torch references): per level, score the children of the nodes kept on the level
above and keep the best; then rank the pages of the kept level-1 clusters and the row's
private pages."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from icecache.kernels.common import (BLOCK, MAX_SELECT, ROW_PROGRAMS, VARIANTS, check_contiguous, kth_largest, launch,
                                     lse_of_parts, online_lse, powers, programs_per_row, row_tile, sort_key,
                                     store_selected, warps)

# ---------------------------------------------------------------------------- tree walk
class WalkPlan:
    """What the kernel tree walk reads besides the tree: every level's nodes listed by
    parent (CSR: order, start), so a level scores only the children of the nodes its
    parent level kept, and the pages' CSR over level-1 clusters (a cluster's pages are
    contiguous). Built once per tree; `widest_*` bound the candidates a row can have."""

    def __init__(self, tree, width: int) -> None:
        self.width = width
        # top first: (mean, var [HS, n, D], size [HS, n], order [HS, n], start [HS, parents + 1], parents, widest)
        self.levels = []
        self.widest_level = 1
        sizes = tree.level_sizes()
        top = tree.num_levels
        while top > 1 and sizes[top - 1] <= width:
            top -= 1  # a level of at most `width` nodes is kept whole: its children are the whole level below
        for j in range(top, 0, -1):
            mean, var, size = tree.node_mean[j - 1], tree.node_var[j - 1], tree.node_size[j - 1]
            HS, n = mean.shape[:2]
            if j == top:  # the top level walked: children of one virtual root
                parent = torch.zeros(HS, n, dtype=torch.long, device=mean.device)
            else:
                parent = tree.node_parent[j - 1]
            order, start, count = _csr(parent, 1 if j == top else sizes[j])
            widest = _most_children(count, 1 if j == top else width)  # under the parents a row keeps
            self.levels.append((mean, var, size.contiguous(), order, start, start.shape[1] - 1, widest))
            self.widest_level = max(self.widest_level, widest)
        self.widest_pages = 0
        if tree.num_levels:
            first, count = tree.cluster_pages()
            self.page_start = torch.cat([first, (first + count)[:, -1:]], dim=1).to(torch.int32).contiguous()
            self.widest_pages = _most_children(count, width)


def _csr(parent: torch.Tensor, num_parents: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Children listed by parent: (order [HS, n] child ids, start [HS, P + 1], count [HS, P])."""
    order = torch.argsort(parent, dim=1, stable=True).to(torch.int32).contiguous()
    count = torch.zeros(parent.shape[0], num_parents, dtype=torch.long, device=parent.device)
    count.scatter_add_(1, parent, torch.ones_like(parent))
    start = torch.cat([torch.zeros_like(count[:, :1]), count.cumsum(1)], dim=1).to(torch.int32).contiguous()
    return order, start, count


def _most_children(count: torch.Tensor, kept: int) -> int:
    """The most children `kept` parents of one head can have together."""
    return int(count.topk(min(kept, count.shape[1]), dim=1).values.sum(1).max()) if count.numel() else 0


@triton.jit
def _compact_slots(parents_ptr, start_ptr, h, hs, K, n_parents, pos, KP: tl.constexpr):
    """Row h's compact candidate list is the CSR children of its K kept parents (-1 =
    none), one parent after the other. For positions pos [BLOCK] of that list: their
    index into the CSR, and the list's length."""
    kk = tl.arange(0, KP)
    par = tl.load(parents_ptr + h * K + kk, mask=kk < K, other=-1)
    ok = par >= 0
    base = start_ptr + hs * (n_parents + 1)
    lo = tl.load(base + par, mask=ok, other=0)
    cnt = tl.load(base + par + 1, mask=ok, other=0) - lo
    upto = tl.cumsum(cnt, axis=0)
    slot = tl.sum((upto[None, :] <= pos[:, None]).to(tl.int32), axis=1)  # the parent each position is under
    pick = kk[None, :] == slot[:, None]
    first = tl.sum(tl.where(pick, lo[None, :], 0), axis=1)
    before = tl.sum(tl.where(pick, (upto - cnt)[None, :], 0), axis=1)
    return first + pos - before, tl.sum(cnt, axis=0)


@triton.jit
def _scorer_start(q_ptr, parents_ptr, start_ptr, h, HS, K, n_parents, G: tl.constexpr, GP: tl.constexpr,
                  D: tl.constexpr, BLOCK: tl.constexpr, KP: tl.constexpr):
    """What a candidate scorer of row h starts from: (KV head, query-head and dim ranges,
    the row's queries [GP, D] in fp32, its compact list's length, empty (max, sum exp))."""
    hs = h % HS
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    q = tl.load(q_ptr + (h * G + g[:, None]) * D + d[None, :], mask=g[:, None] < G, other=0.0).to(tl.float32)
    total = _compact_slots(parents_ptr, start_ptr, h, hs, K, n_parents, tl.arange(0, BLOCK), KP)[1]
    return hs, g, d, q, total, tl.full((GP,), -float("inf"), tl.float32), tl.zeros((GP,), tl.float32)


@triton.jit
def _moment_scores(q, scaling, mean, var):
    """index.tree.moment_score without its log-size term: scaling q.mean + scaling^2 / 2
    (q*q).var. q [GP, D] fp32 holding values of the moments' dtype, mean and var [BLOCK, D]
    -> [GP, BLOCK]. 16-bit moments (a bf16 model's) go through the tensor cores in their
    own dtype: q is exact in it, q*q is rounded to it as the torch reference rounds it, and
    a product of two is exact in the fp32 accumulator; fp32 moments take the exact fp32 dot."""
    if mean.dtype == tl.float32:
        first = tl.dot(q, tl.trans(mean), input_precision="ieee")
        second = tl.dot(q * q, tl.trans(var), input_precision="ieee")
    else:
        first = tl.dot(q.to(mean.dtype), tl.trans(mean))
        second = tl.dot((q * q).to(var.dtype), tl.trans(var))
    return first * scaling + second * (scaling * scaling * 0.5)


@triton.jit(do_not_specialize=['n', 'n_parents', 'K', 'stride'])
def _child_scores(q_ptr, mean_ptr, var_ptr, size_ptr, order_ptr, start_ptr, parents_ptr, raw_ptr, cand_ptr, part_ptr, n,
                  n_parents, K, stride, scaling, HS, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                  BLOCK: tl.constexpr, KP: tl.constexpr):
    """Row h (request h // HS, KV head h % HS), program c: chunks c, c + P, ... (P programs
    per row) of BLOCK positions of the row's compact list of candidates (the children of
    its kept parents), scored per query head by their moments into raw[h, g, pos],
    node ids into cand[h, pos]; (max, sum exp) per query head into part[h, c]. The tree is
    shared by the requests. A row's chunks past its own list cost nothing, and P stays
    small for big batches (_programs_per_row), so the grid does not grow with the worst row."""
    h, c0 = tl.program_id(0), tl.program_id(1)
    hs, g, d, q, total, m_run, l_run = _scorer_start(q_ptr, parents_ptr, start_ptr, h, HS, K, n_parents, G, GP, D,
                                                     BLOCK, KP)
    for c in range(c0, (total + BLOCK - 1) // BLOCK, tl.num_programs(1)):  # a row's chunks, round robin
        pos = c * BLOCK + tl.arange(0, BLOCK)
        at = _compact_slots(parents_ptr, start_ptr, h, hs, K, n_parents, pos, KP)[0]
        inside = pos < total
        node = tl.load(order_ptr + hs * n + at, mask=inside, other=0)
        row = (hs * n + node[:, None]) * D + d[None, :]
        mean = tl.load(mean_ptr + row, mask=inside[:, None], other=0.0)
        sc = _moment_scores(q, scaling, mean, tl.load(var_ptr + row, mask=inside[:, None], other=0.0))  # [GP, BLOCK]
        sc += tl.log(tl.load(size_ptr + hs * n + node, mask=inside, other=1.0))[None, :]
        ok = (g[:, None] < G) & inside[None, :]
        sc = tl.where(ok, sc, -float("inf"))
        tl.store(raw_ptr + (h * G + g[:, None]) * stride + pos[None, :], sc, mask=ok)
        tl.store(cand_ptr + h * stride + pos, node, mask=inside)
        m_run, l_run = online_lse(m_run, l_run, sc, ok)
    base = part_ptr + ((h * tl.num_programs(1) + c0) * GP + g) * 2
    tl.store(base, m_run)
    tl.store(base + 1, l_run)


RANK_LEVEL, RANK_SUM, RANK_MAX = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)  # _select_compact's rankings
RANK_OF_HEADS = {"sum": RANK_SUM, "max": RANK_MAX}  # IceCacheConfig.page_heads -> its page ranking


@triton.jit(do_not_specialize=['K', 'n_parents', 'stride', 'num_parts', 'extra', 'width', 'out_stride'])
def _select_compact(raw_ptr, cand_ptr, part_ptr, parents_ptr, start_ptr, out_ptr, K, n_parents, stride, num_parts,
                    extra, width, out_stride, HS, G: tl.constexpr, GP: tl.constexpr, CP: tl.constexpr, NB: tl.constexpr,
                    KP: tl.constexpr, KW: tl.constexpr, RANK: tl.constexpr):
    """Per row, over its compact candidates (children of its kept parents, plus `extra`
    private pages), the `width` best into out[h * out_stride:][:width] as ids from cand, ranked by RANK:
    RANK_LEVEL (a tree level): the best log-share (raw - the head's log-sum-exp) over the
    query heads; RANK_SUM (pages): the softmax shares summed over the query heads;
    RANK_MAX (pages): the largest raw score over the query heads (index.select.combine_heads)."""
    h = tl.program_id(0)
    i = tl.arange(0, NB)
    _, total = _compact_slots(parents_ptr, start_ptr, h, h % HS, K, n_parents, i, KP)
    inside = i < total + extra
    score = tl.full((NB,), -float("inf"), tl.float32)
    if RANK == RANK_SUM:
        score = tl.zeros((NB,), tl.float32)
    candidate = i < 0
    for g in tl.static_range(G):
        raw = tl.load(raw_ptr + (h * G + g) * stride + i, mask=inside, other=-float("inf"))
        if RANK == RANK_SUM:
            lse = lse_of_parts(part_ptr, h, num_parts, g, GP, CP)
            score += tl.where(raw > -float("inf"), tl.exp(raw - lse), 0.0)
        elif RANK == RANK_MAX:
            score = tl.maximum(score, raw)
        else:
            lse = lse_of_parts(part_ptr, h, num_parts, g, GP, CP)
            score = tl.maximum(score, raw - lse)
        candidate = candidate | (raw > -float("inf"))
    if RANK == RANK_SUM:
        score = tl.where(candidate, score, -1.0)
    selected = (sort_key(score) >= kth_largest(score, width)) & candidate
    ids = tl.load(cand_ptr + h * stride + i, mask=inside, other=-1)
    store_selected(out_ptr + h * out_stride, selected, ids, width, KW)



def walk_tree(q: torch.Tensor, plan: WalkPlan, root: torch.Tensor, scaling: float, raw: torch.Tensor,
              cand: torch.Tensor, parts: torch.Tensor, tops: torch.Tensor) -> torch.Tensor:
    """The tree walk (index.select.tree_keep) for every row: per level, score the children of
    the nodes kept on the level above, keep the `plan.width` best per row.

    q: [H, G, D] (any float dtype; scored in fp32), H = B * HS rows (B requests sharing the tree of HS KV heads); root:
    int32 zeros [>= H] (the top level's virtual parent); raw, parts fp32 and cand, tops
    int32 scratch (scratch_sizes). -> the kept level-1 clusters [H, width] int32 (-1 = none)."""
    check_contiguous(q)
    H, G, D = q.shape
    GP, width = row_tile(G), plan.width
    stride = raw.numel() // (H * G)
    parents, K = root[:H], 1
    for depth, (mean, var, size, order, start, n_parents, widest) in enumerate(plan.levels):
        out = tops.view(2, -1)[depth % 2, :H * width].view(H, width)
        chunks = programs_per_row(H, widest)
        launch(_child_scores, (H, chunks), (q, mean, var, size, order, start, parents, raw, cand, parts, mean.shape[1],
                                             n_parents, K, stride, scaling, mean.shape[0]),
                dict(G=G, GP=GP, D=D, BLOCK=BLOCK, KP=max(16, triton.next_power_of_2(K))))
        NB = max(16, triton.next_power_of_2(widest))
        launch(_select_compact, (H,), (raw, cand, parts, parents, start, out, K, n_parents, stride, chunks, 0, width,
                                         width, mean.shape[0]),
                dict(G=G, GP=GP, CP=max(16, triton.next_power_of_2(chunks)), NB=NB, KP=max(16, triton.next_power_of_2(K)),
                     KW=triton.next_power_of_2(width), RANK=RANK_LEVEL, num_warps=warps(NB)))
        parents, K = out, width
    return parents


# ---------------------------------------------------------------------------- page ranking
@triton.jit(do_not_specialize=['K', 'n_clusters', 'n_shared', 'n_private', 'stride'])
def _page_scores(q_ptr, top_ptr, start_ptr, mean_ptr, var_ptr, valid_ptr, pmean_ptr, pvar_ptr, pvalid_ptr, raw_ptr,
                 cand_ptr, part_ptr, K, n_clusters, n_shared, n_private, stride, scaling, HS, G: tl.constexpr,
                 GP: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, KP: tl.constexpr):
    """Row h, program c: chunks c, c + P, ... (P programs per row, as in _child_scores) of
    BLOCK positions of the row's compact list of candidate pages: the pages of its kept
    level-1 clusters (contiguous per cluster), then its private pages (ids n_shared + p).
    Page moment scores into raw[h, g, pos] (-inf for empty pages), ids into cand; per program
    (max, sum exp) per query head into part[h, c]."""
    h, c0 = tl.program_id(0), tl.program_id(1)
    hs, g, d, q, total, m_run, l_run = _scorer_start(q_ptr, top_ptr, start_ptr, h, HS, K, n_clusters, G, GP, D,
                                                     BLOCK, KP)
    for c in range(c0, (total + n_private + BLOCK - 1) // BLOCK, tl.num_programs(1)):  # round robin
        pos = c * BLOCK + tl.arange(0, BLOCK)
        page = _compact_slots(top_ptr, start_ptr, h, hs, K, n_clusters, pos, KP)[0]
        shared = pos < total
        own = pos - total
        private = (pos >= total) & (own < n_private)
        at = (hs * n_shared + page[:, None]) * D + d[None, :]
        mine = (h * n_private + own[:, None]) * D + d[None, :]
        n_tok = tl.load(valid_ptr + hs * n_shared + page, mask=shared, other=0)
        n_tok += tl.load(pvalid_ptr + h * n_private + own, mask=private, other=0)
        mean = tl.load(mean_ptr + at, mask=shared[:, None], other=0.0)  # one of the two loads is 0: exact
        mean += tl.load(pmean_ptr + mine, mask=private[:, None], other=0.0)
        var = tl.load(var_ptr + at, mask=shared[:, None], other=0.0)
        var += tl.load(pvar_ptr + mine, mask=private[:, None], other=0.0)
        est = _moment_scores(q, scaling, mean, var) + tl.log(tl.maximum(n_tok, 1).to(tl.float32))[None, :]
        inside = shared | private
        ok = (g[:, None] < G) & (inside & (n_tok > 0))[None, :]
        est = tl.where(ok, est, -float("inf"))
        tl.store(raw_ptr + (h * G + g[:, None]) * stride + pos[None, :], est, mask=(g[:, None] < G) & inside[None, :])
        tl.store(cand_ptr + h * stride + pos, tl.where(shared, page, n_shared + own), mask=inside)
        m_run, l_run = online_lse(m_run, l_run, est, ok)
    base = part_ptr + ((h * tl.num_programs(1) + c0) * GP + g) * 2
    tl.store(base, m_run)
    tl.store(base + 1, l_run)


def rank_pages(q: torch.Tensor, top: torch.Tensor | None, plan: WalkPlan, page_mean: torch.Tensor,
                 page_var: torch.Tensor, page_valid: torch.Tensor, priv_mean: torch.Tensor, priv_var: torch.Tensor,
                 priv_valid: torch.Tensor, scaling: float, num_pages: int, raw: torch.Tensor, cand: torch.Tensor,
                 parts: torch.Tensor, heads: str = "max", out: torch.Tensor | None = None) -> torch.Tensor:
    """The `num_pages` best pages per row by their moments (index.select.rank_pages),
    -1 where fewer qualify; ids >= N are private pages (id - N). Candidates: the pages of
    the row's kept level-1 clusters and its private pages.

    q: [H, G, D] (any float dtype), H = B * HS rows; top: [H, K] int32 kept clusters (walk_tree; None
    for a tree without levels, hence without pages); page_mean/var: [HS, N, D] page moments,
    page_valid: [HS, N]; priv_mean/var: [H, M, D] the moments of the rows' private pages,
    priv_valid: [H, M]. raw/parts fp32, cand int32 scratch. out: where to write the ids, [H,
    num_pages] long with unit column stride (e.g. the columns after a row's question pages
    in a wider buffer); a new tensor when None. -> out."""
    check_contiguous(q, page_mean, page_var, page_valid, priv_mean, priv_var, priv_valid)
    H, G, D = q.shape
    GP = row_tile(G)
    n_shared, n_private = page_valid.shape[1], priv_valid.shape[1]
    if top is None:
        assert n_shared == 0, "a tree with pages has levels"
        top = torch.full((H, 1), -1, dtype=torch.int32, device=q.device)
        start = torch.zeros(page_valid.shape[0], 2, dtype=torch.int32, device=q.device)
    else:
        start = plan.page_start
    K = top.shape[1]
    n = plan.widest_pages + n_private
    assert n <= MAX_SELECT, f"{n} candidate pages per row are over the kernels' {MAX_SELECT}"
    stride = raw.numel() // (H * G)
    KP = max(16, triton.next_power_of_2(K))
    chunks = programs_per_row(H, n)
    _page_scores[(H, chunks)](q, top, start, page_mean, page_var, page_valid, priv_mean, priv_var, priv_valid, raw,
                              cand, parts, K, start.shape[1] - 1, n_shared, n_private, stride, scaling,
                              page_valid.shape[0], G=G, GP=GP, D=D, BLOCK=BLOCK, KP=KP)
    ids = torch.empty(H, num_pages, dtype=torch.long, device=q.device) if out is None else out
    assert ids.shape == (H, num_pages) and ids.dtype == torch.long and ids.stride(1) == 1, "out: [H, num_pages] long"
    NB = max(16, triton.next_power_of_2(n))
    launch(_select_compact, (H,), (raw, cand, parts, top, start, ids, K, start.shape[1] - 1, stride, chunks,
                                     n_private, num_pages, ids.stride(0), page_valid.shape[0]),
            dict(G=G, GP=GP, CP=max(16, triton.next_power_of_2(chunks)), NB=NB, KP=KP,
                 KW=triton.next_power_of_2(num_pages), RANK=RANK_OF_HEADS[heads], num_warps=warps(NB)))
    return ids


def _select_variants(args: tuple, constexprs: dict, kps: list[int], widest: int) -> list[dict]:
    hs = args[-1]
    out = []
    for kp, nb in ((kp, nb) for kp in kps for nb in powers(16, min(widest, MAX_SELECT))):
        most_parts = min(triton.cdiv(nb, BLOCK), triton.cdiv(ROW_PROGRAMS, max(1, hs)))
        out += [{**constexprs, "KP": kp, "NB": nb, "CP": cp, "num_warps": warps(nb)}
                for cp in powers(16, triton.next_power_of_2(most_parts))]
    return out


VARIANTS[_select_compact] = _select_variants
VARIANTS[_child_scores] = lambda args, constexprs, kps, widest: [{**constexprs, "KP": kp} for kp in kps]
