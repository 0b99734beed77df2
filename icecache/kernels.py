"""Triton kernels for one sparse layer's decode step: push the new token, walk the tree,
rank pages, attend over sinks + selected pages + window.

Why: written in torch ops, a sparse layer's step is ~400 tiny kernels, and on an H100 a
CUDA graph of them costs more than reading the 8B model's weights. Here a layer is about
20 kernels whose cost does not grow with the context: only the children of kept tree
nodes are ranked, and pages are read where they lie (host memory, through a UVA view).

The torch code in static_decode.py is the reference these kernels are tested against.
Without CUDA they can run in Triton's interpreter (slow, exact), which is how CPU CI
checks them: TRITON_INTERPRET=1 must be set before torch is imported (torch imports
triton, and the flag is read then); tests/conftest.py does that.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_BLOCK = 32  # candidates (tree nodes, pages) per program of a score kernel (tl.dot needs >= 16)
# Triton compiles a kernel per distinct set of constexprs and (unless told not to) per
# divisibility of each int argument. Sizes that change with the context or the batch are
# therefore not specialized on (do_not_specialize below), and the constexprs that do vary
# with them (a ranking's row width NB, its parts CP; dense attention's row tile RP) are
# compiled for every value up front by precompile(), after a warm-up step has recorded a
# launch of each kernel: otherwise the first question on a document of a new shape waits
# seconds for the compiler (5.5 s at 32k tokens and 7.8 s at 128k on an H200).
MAX_SELECT = 32768  # widest row a single program ranks in registers (a tree level, a layer's pages)


def supported(head_dim: int, page_size: int, group: int) -> bool:
    """Shapes the kernels handle (tl.dot tiles are powers of two >= 16)."""
    pow2 = lambda x: x >= 16 and x & (x - 1) == 0  # noqa: E731
    return pow2(head_dim) and pow2(page_size) and group <= 64


def _rows(group: int) -> int:
    return max(16, triton.next_power_of_2(group))


def _warps(n: int) -> int:
    """Warps for a program that holds a row of n fp32 values in registers."""
    return 4 if n <= 2048 else 8 if n <= 8192 else 16


def _check_contiguous(*tensors: torch.Tensor) -> None:
    """The kernels index with row-major offsets computed from shapes."""
    for t in tensors:
        assert t.is_contiguous(), f"kernel input of shape {tuple(t.shape)} is not contiguous"


SCRATCH_DTYPES = {"cand": torch.int32, "tops": torch.int32}  # the rest are fp32


def scratch_sizes(rows: int, G: int, D: int, plan: "WalkPlan", num_private: int, num_sink: int, retrieved: int,
                  window: int, page_size: int) -> dict[str, int]:
    """Elements of each work buffer one sparse layer's step needs for `rows` (request, KV
    head) rows (see the wrappers); "tops" holds two levels' kept-node lists (one read
    while the next is written)."""
    GP = _rows(G)
    widest = max(plan.widest_level, plan.widest_pages + num_private)
    blocks = triton.cdiv(num_sink, page_size) + retrieved + triton.cdiv(window, page_size)
    return {"raw": rows * G * widest, "cand": rows * widest, "parts": rows * triton.cdiv(widest, _BLOCK) * GP * 2,
            "tops": 2 * rows * plan.width, "att_parts": rows * blocks * GP * 2, "att_acc": rows * blocks * GP * D}


# ---------------------------------------------------------------------------- top-k by threshold
@triton.jit
def _kth_largest(x, k):
    """The k-th largest of x (fp32, any shape) as an order-preserving int key, found by
    bisecting the 32-bit key range: 32 passes over registers instead of a sort. Keep
    `_key(x) >= result`: exactly the top k unless values tie at the threshold."""
    key = _key(x)
    lo = tl.full((), -2147483648, tl.int64)
    hi = tl.full((), 2147483647, tl.int64)
    for _ in tl.static_range(32):
        mid = lo + (hi - lo + 1) // 2
        enough = tl.sum((key >= mid).to(tl.int32)) >= k
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid - 1)
    return lo


@triton.jit
def _key(x):
    """fp32 -> int64 with the same order (IEEE bits, negatives' magnitude bits flipped)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)


@triton.jit
def _store_selected(out_ptr, selected, index, k, KW: tl.constexpr):
    """out[r] = index of the r-th selected element (ascending) for the first min(k,
    selected) slots of out's k, -1 in the rest (KW >= k, a power of two)."""
    pos = tl.cumsum(selected.to(tl.int32), axis=0) - 1
    tl.store(out_ptr + pos, index, mask=selected & (pos < k))
    slot = tl.arange(0, KW)
    chosen = tl.sum(selected.to(tl.int32), axis=0)
    tl.store(out_ptr + slot, tl.full((KW,), -1, tl.int32), mask=(slot >= chosen) & (slot < k))


@triton.jit
def _lse_of_parts(part_ptr, h, num_parts, g, GP: tl.constexpr, CP: tl.constexpr):
    """log sum exp of query head g over a KV head's rows, from the (max, sum exp) pairs
    that num_parts programs wrote to part[h, :, g]; +inf when no row was a candidate
    (so row - lse stays -inf)."""
    c = tl.arange(0, CP)
    pm = tl.load(part_ptr + ((h * num_parts + c) * GP + g) * 2, mask=c < num_parts, other=-float("inf"))
    pl = tl.load(part_ptr + ((h * num_parts + c) * GP + g) * 2 + 1, mask=c < num_parts, other=0.0)
    big = tl.max(pm, axis=0)
    safe = tl.where(big > -float("inf"), big, 0.0)
    total = tl.sum(tl.where(pm > -float("inf"), pl * tl.exp(pm - safe), 0.0), axis=0)
    return tl.where(big > -float("inf"), safe + tl.log(total), float("inf"))


@triton.jit
def _online_lse(m_run, l_run, est, ok):
    """Fold a [GP, BLOCK] tile of scores (valid where ok) into running (max, sum exp) per row."""
    m_new = tl.maximum(m_run, tl.max(est, axis=1))
    safe = tl.where(m_new > -float("inf"), m_new, 0.0)
    l_new = l_run * tl.exp(m_run - safe) + tl.sum(tl.where(ok, tl.exp(est - safe[:, None]), 0.0), axis=1)
    return m_new, l_new


# ---------------------------------------------------------------------------- tree walk
class WalkPlan:
    """What the kernel tree walk reads besides the tree: every level's nodes listed by
    parent (CSR: order, start), so a level scores only the children of the nodes its
    parent level kept, and the pages' CSR over level-1 clusters (a cluster's pages are
    contiguous). Built once per tree; `widest_*` bound the candidates a row can have."""

    def __init__(self, tree, width: int) -> None:
        self.width = width
        # top first: (box lo, hi [HS, n, D], order [HS, n], start [HS, parents + 1], parents, widest)
        self.levels = []
        self.widest_level = 1
        sizes = tree.level_sizes()
        top = tree.num_levels
        while top > 1 and sizes[top - 1] <= width:
            top -= 1  # a level of at most `width` nodes is kept whole: its children are the whole level below
        for j in range(top, 0, -1):
            lo, hi = tree.node_lo[j - 1], tree.node_hi[j - 1]
            HS, n = lo.shape[:2]
            if j == top:  # the top level walked: children of one virtual root
                parent = torch.zeros(HS, n, dtype=torch.long, device=lo.device)
            else:
                parent = tree.node_parent[j - 1]
            order, start, count = _csr(parent, 1 if j == top else sizes[j])
            widest = _most_children(count, 1 if j == top else width)  # under the parents a row keeps
            self.levels.append((lo, hi, order, start, start.shape[1] - 1, widest))
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
def _box_scores(q, scaling, lo, hi):
    """scaling * max over each box of q.k (index.tree.box_bound): q [GP, D] fp32 holding
    values of the boxes' dtype, lo and hi [BLOCK, D] -> [GP, BLOCK]. 16-bit boxes (a bf16
    model's) go through the tensor cores in their own dtype: q's values are exact in it and
    a product of two is exact in the fp32 accumulator, so nothing is lost; fp32 boxes take
    the exact fp32 dot."""
    if lo.dtype == tl.float32:
        up = tl.dot(tl.maximum(q, 0.0), tl.trans(hi), input_precision="ieee")
        return (up + tl.dot(tl.minimum(q, 0.0), tl.trans(lo), input_precision="ieee")) * scaling
    up = tl.dot(tl.maximum(q, 0.0).to(hi.dtype), tl.trans(hi))
    return (up + tl.dot(tl.minimum(q, 0.0).to(lo.dtype), tl.trans(lo))) * scaling


@triton.jit(do_not_specialize=['n', 'n_parents', 'K', 'stride'])
def _child_scores(q_ptr, lo_ptr, hi_ptr, order_ptr, start_ptr, parents_ptr, raw_ptr, cand_ptr, part_ptr, n,
                  n_parents, K, stride, scaling, HS, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                  BLOCK: tl.constexpr, KP: tl.constexpr):
    """Row h (request h // HS, KV head h % HS), program c: chunks c, c + P, ... (P programs
    per row) of BLOCK positions of the row's compact list of candidates (the children of
    its kept parents), scored per query head by their boxes into raw[h, g, pos],
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
        lo = tl.load(lo_ptr + row, mask=inside[:, None], other=0.0)
        sc = _box_scores(q, scaling, lo, tl.load(hi_ptr + row, mask=inside[:, None], other=0.0))  # [GP, BLOCK]
        ok = (g[:, None] < G) & inside[None, :]
        sc = tl.where(ok, sc, -float("inf"))
        tl.store(raw_ptr + (h * G + g[:, None]) * stride + pos[None, :], sc, mask=ok)
        tl.store(cand_ptr + h * stride + pos, node, mask=inside)
        m_run, l_run = _online_lse(m_run, l_run, sc, ok)
    base = part_ptr + ((h * tl.num_programs(1) + c0) * GP + g) * 2
    tl.store(base, m_run)
    tl.store(base + 1, l_run)


RANK_LEVEL, RANK_SUM, RANK_MAX = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)  # _select_compact's rankings
RANK_OF_HEADS = {"sum": RANK_SUM, "max": RANK_MAX}  # IceCacheConfig.page_heads -> its page ranking


@triton.jit(do_not_specialize=['K', 'n_parents', 'stride', 'num_parts', 'extra', 'width'])
def _select_compact(raw_ptr, cand_ptr, part_ptr, parents_ptr, start_ptr, out_ptr, K, n_parents, stride, num_parts,
                    extra, width, HS, G: tl.constexpr, GP: tl.constexpr, CP: tl.constexpr, NB: tl.constexpr,
                    KP: tl.constexpr, KW: tl.constexpr, RANK: tl.constexpr):
    """Per row, over its compact candidates (children of its kept parents, plus `extra`
    private pages), the `width` best into out[h, :] as ids from cand, ranked by RANK:
    RANK_LEVEL (a tree level): the best log-share (raw - the head's log-sum-exp) over the
    query heads; RANK_SUM (pages): the softmax shares summed over the query heads;
    RANK_MAX (pages): the largest raw score over the query heads (index.tree._combine_heads)."""
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
            lse = _lse_of_parts(part_ptr, h, num_parts, g, GP, CP)
            score += tl.where(raw > -float("inf"), tl.exp(raw - lse), 0.0)
        elif RANK == RANK_MAX:
            score = tl.maximum(score, raw)
        else:
            lse = _lse_of_parts(part_ptr, h, num_parts, g, GP, CP)
            score = tl.maximum(score, raw - lse)
        candidate = candidate | (raw > -float("inf"))
    if RANK == RANK_SUM:
        score = tl.where(candidate, score, -1.0)
    selected = (_key(score) >= _kth_largest(score, width)) & candidate
    ids = tl.load(cand_ptr + h * stride + i, mask=inside, other=-1)
    _store_selected(out_ptr + h * width, selected, ids, width, KW)


_ROW_PROGRAMS = 2048  # candidate-scoring programs a batch is spread over (before the worst row's chunks are)


_LAUNCHED: dict[tuple, tuple[tuple, dict]] = {}  # a launch of each kernel and fixed constexprs, for precompile()


def _launch(kernel, grid: tuple, args: tuple, constexprs: dict) -> None:
    """Launch, remembering the argument types of the first launch of each variant family
    (pointers by dtype, so no tensor is kept alive)."""
    varying = ("KP", "NB", "CP", "RP", "num_warps")
    family = (kernel, tuple(sorted((k, v) for k, v in constexprs.items() if k not in varying)),
              tuple(a.dtype if isinstance(a, torch.Tensor) else type(a) for a in args))
    if family not in _LAUNCHED:
        _LAUNCHED[family] = (tuple(a.dtype if isinstance(a, torch.Tensor) else a for a in args), constexprs)
    kernel[grid](*args, **constexprs)


def _powers(low: int, high: int) -> list[int]:
    return [1 << i for i in range(low.bit_length() - 1, max(low, high).bit_length())]


def precompile(width: int, widest: int = 8192) -> int:
    """Compile now every variant the launches seen so far can take on other contexts and
    batch sizes: a tree walk of beam `width` (its first level keeps one parent, the next
    ones `width`: KP), rankings of rows up to `widest` candidates (NB) over any number of
    parts (CP), dense attention over any row tile (RP). Call it after one decode step of
    each kind has run (a warm-up question); variants already built load from Triton's
    cache. -> the number of variants."""
    kps = sorted({16, max(16, triton.next_power_of_2(width))})
    jobs = []
    for (kernel, _, _), (args, constexprs) in list(_LAUNCHED.items()):
        if kernel is _select_compact:
            hs = args[-1]
            for kp, nb in ((kp, nb) for kp in kps for nb in _powers(16, min(widest, MAX_SELECT))):
                most_parts = min(triton.cdiv(nb, _BLOCK), triton.cdiv(_ROW_PROGRAMS, max(1, hs)))
                for cp in _powers(16, triton.next_power_of_2(most_parts)):
                    jobs.append((kernel, args, {**constexprs, "KP": kp, "NB": nb, "CP": cp, "num_warps": _warps(nb)}))
        elif kernel is _child_scores:
            jobs += [(kernel, args, {**constexprs, "KP": kp}) for kp in kps]
        elif kernel is _prefix_attention:
            jobs += [(kernel, args, {**constexprs, "RP": rp}) for rp in _powers(16, 64)]
    for kernel, args, constexprs in jobs:
        kernel.warmup(*args, grid=(1,), **constexprs)
    return len(jobs)


def _programs_per_row(rows: int, widest: int) -> int:
    """Programs per row of the candidate scorers: every chunk of the widest row its own
    program while the batch is small, fewer (each looping over several) when it is big."""
    return max(1, min(triton.cdiv(widest, _BLOCK), triton.cdiv(_ROW_PROGRAMS, rows)))


def walk_tree(q: torch.Tensor, plan: WalkPlan, root: torch.Tensor, scaling: float, raw: torch.Tensor,
              cand: torch.Tensor, parts: torch.Tensor, tops: torch.Tensor) -> torch.Tensor:
    """The tree walk (index.tree.tree_keep) for every row: per level, score the children of
    the nodes kept on the level above, keep the `plan.width` best per row.

    q: [H, G, D] (any float dtype; scored in fp32), H = B * HS rows (B requests sharing the tree of HS KV heads); root:
    int32 zeros [>= H] (the top level's virtual parent); raw, parts fp32 and cand, tops
    int32 scratch (scratch_sizes). -> the kept level-1 clusters [H, width] int32 (-1 = none)."""
    _check_contiguous(q)
    H, G, D = q.shape
    GP, width = _rows(G), plan.width
    stride = raw.numel() // (H * G)
    parents, K = root[:H], 1
    for depth, (lo, hi, order, start, n_parents, widest) in enumerate(plan.levels):
        out = tops.view(2, -1)[depth % 2, :H * width].view(H, width)
        chunks = _programs_per_row(H, widest)
        _launch(_child_scores, (H, chunks), (q, lo, hi, order, start, parents, raw, cand, parts, lo.shape[1], n_parents,
                                             K, stride, scaling, lo.shape[0]),
                dict(G=G, GP=GP, D=D, BLOCK=_BLOCK, KP=max(16, triton.next_power_of_2(K))))
        NB = max(16, triton.next_power_of_2(widest))
        _launch(_select_compact, (H,), (raw, cand, parts, parents, start, out, K, n_parents, stride, chunks, 0, width,
                                         lo.shape[0]),
                dict(G=G, GP=GP, CP=max(16, triton.next_power_of_2(chunks)), NB=NB, KP=max(16, triton.next_power_of_2(K)),
                     KW=triton.next_power_of_2(width), RANK=RANK_LEVEL, num_warps=_warps(NB)))
        parents, K = out, width
    return parents


# ---------------------------------------------------------------------------- page ranking
@triton.jit(do_not_specialize=['K', 'n_clusters', 'n_shared', 'n_private', 'stride'])
def _page_scores(q_ptr, top_ptr, start_ptr, lo_ptr, hi_ptr, valid_ptr, plo_ptr, phi_ptr, pvalid_ptr, raw_ptr,
                 cand_ptr, part_ptr, K, n_clusters, n_shared, n_private, stride, scaling, HS, G: tl.constexpr,
                 GP: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, KP: tl.constexpr):
    """Row h, program c: chunks c, c + P, ... (P programs per row, as in _child_scores) of
    BLOCK positions of the row's compact list of candidate pages: the pages of its kept
    level-1 clusters (contiguous per cluster), then its private pages (ids n_shared + p).
    Page box scores into raw[h, g, pos] (-inf for empty pages), ids into cand; per program
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
        lo = tl.load(lo_ptr + at, mask=shared[:, None], other=0.0)  # one of the two loads is 0: exact
        lo += tl.load(plo_ptr + mine, mask=private[:, None], other=0.0)
        hi = tl.load(hi_ptr + at, mask=shared[:, None], other=0.0)
        hi += tl.load(phi_ptr + mine, mask=private[:, None], other=0.0)
        est = _box_scores(q, scaling, lo, hi)
        inside = shared | private
        ok = (g[:, None] < G) & (inside & (n_tok > 0))[None, :]
        est = tl.where(ok, est, -float("inf"))
        tl.store(raw_ptr + (h * G + g[:, None]) * stride + pos[None, :], est, mask=(g[:, None] < G) & inside[None, :])
        tl.store(cand_ptr + h * stride + pos, tl.where(shared, page, n_shared + own), mask=inside)
        m_run, l_run = _online_lse(m_run, l_run, est, ok)
    base = part_ptr + ((h * tl.num_programs(1) + c0) * GP + g) * 2
    tl.store(base, m_run)
    tl.store(base + 1, l_run)


def select_pages(q: torch.Tensor, top: torch.Tensor | None, plan: WalkPlan, page_lo: torch.Tensor,
                 page_hi: torch.Tensor, page_valid: torch.Tensor, priv_lo: torch.Tensor, priv_hi: torch.Tensor,
                 priv_valid: torch.Tensor, scaling: float, num_pages: int, raw: torch.Tensor, cand: torch.Tensor,
                 parts: torch.Tensor, heads: str = "max") -> torch.Tensor:
    """The `num_pages` best pages per row (index.tree.select_pages),
    -1 where fewer qualify; ids >= N are private pages (id - N). Candidates: the pages of
    the row's kept level-1 clusters and its private pages.

    q: [H, G, D] (any float dtype), H = B * HS rows; top: [H, K] int32 kept clusters (walk_tree; None
    for a tree without levels, hence without pages); page_lo/hi: [HS, N, D] page boxes,
    page_valid: [HS, N]; priv_lo/hi: [H, M, D] the boxes of the rows' private pages,
    priv_valid: [H, M]. raw/parts fp32, cand int32 scratch. -> [H, num_pages] long."""
    _check_contiguous(q, page_lo, page_hi, page_valid, priv_lo, priv_hi, priv_valid)
    H, G, D = q.shape
    GP = _rows(G)
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
    chunks = _programs_per_row(H, n)
    _page_scores[(H, chunks)](q, top, start, page_lo, page_hi, page_valid, priv_lo, priv_hi, priv_valid, raw,
                              cand, parts, K, start.shape[1] - 1, n_shared, n_private, stride, scaling,
                              page_valid.shape[0], G=G, GP=GP, D=D, BLOCK=_BLOCK, KP=KP)
    ids = torch.empty(H, num_pages, dtype=torch.long, device=q.device)
    NB = max(16, triton.next_power_of_2(n))
    _launch(_select_compact, (H,), (raw, cand, parts, top, start, ids, K, start.shape[1] - 1, stride, chunks,
                                     n_private, num_pages, page_valid.shape[0]),
            dict(G=G, GP=GP, CP=max(16, triton.next_power_of_2(chunks)), NB=NB, KP=KP,
                 KW=triton.next_power_of_2(num_pages), RANK=RANK_OF_HEADS[heads], num_warps=_warps(NB)))
    return ids


# ---------------------------------------------------------------------------- window push
@triton.jit(do_not_specialize=['W', 'n_private'])
def _push(k_ptr, v_ptr, win_k_ptr, win_v_ptr, count_ptr, priv_k_ptr, priv_v_ptr, pvalid_ptr, plo_ptr, phi_ptr,
          W, n_private, HS, D: tl.constexpr, P: tl.constexpr):
    """Put the new token in the window ring; once the ring is full, the token it
    replaces moves to the next private page slot, whose box it joins. Row h is
    KV head h % HS of request h // HS, whose counters are count[h // HS]."""
    h = tl.program_id(0)
    d = tl.arange(0, D)
    win_count = tl.load(count_ptr + (h // HS) * 2)
    priv_count = tl.load(count_ptr + (h // HS) * 2 + 1)
    slot = win_count % W
    if win_count >= W:
        old_k = tl.load(win_k_ptr + (h * W + slot) * D + d)
        old_v = tl.load(win_v_ptr + (h * W + slot) * D + d)
        page = priv_count // P
        tl.store(priv_k_ptr + ((h * n_private + page) * P + priv_count % P) * D + d, old_k)
        tl.store(priv_v_ptr + ((h * n_private + page) * P + priv_count % P) * D + d, old_v)
        before = tl.load(pvalid_ptr + h * n_private + page)
        tl.store(pvalid_ptr + h * n_private + page, before + 1)
        row = (h * n_private + page) * D + d
        first = before == 0  # the page's first token sets its box
        tl.store(plo_ptr + row, tl.where(first, old_k, tl.minimum(tl.load(plo_ptr + row), old_k)))
        tl.store(phi_ptr + row, tl.where(first, old_k, tl.maximum(tl.load(phi_ptr + row), old_k)))
    tl.store(win_k_ptr + (h * W + slot) * D + d, tl.load(k_ptr + h * D + d))
    tl.store(win_v_ptr + (h * W + slot) * D + d, tl.load(v_ptr + h * D + d))


def push(k: torch.Tensor, v: torch.Tensor, win_k: torch.Tensor, win_v: torch.Tensor, counts: torch.Tensor,
         priv_k: torch.Tensor, priv_v: torch.Tensor, priv_valid: torch.Tensor, priv_lo: torch.Tensor,
         priv_hi: torch.Tensor) -> None:
    """k, v: [H, D], H = B * HS rows (B requests, HS KV heads); win_k/v: [H, W, D];
    counts: [B, 2] (per request: tokens ever in the ring, tokens in private pages), read
    here and advanced by the caller once per step; priv_k/v: [H, M, P, D]; priv_valid:
    [H, M]; priv_lo/hi: [H, M, D] the private pages' boxes (model dtype)."""
    _check_contiguous(k, v, win_k, win_v, counts, priv_k, priv_v, priv_valid, priv_lo, priv_hi)
    H, W, D = win_k.shape
    _push[(H,)](k, v, win_k, win_v, counts, priv_k, priv_v, priv_valid, priv_lo, priv_hi, W, priv_k.shape[1],
                H // (counts.numel() // 2), D=D, P=priv_k.shape[2])


# ---------------------------------------------------------------------------- attention
@triton.jit(do_not_specialize=['num_sink', 'R', 'n_shared', 'n_private', 'W'])
def _sparse_attention(q_ptr, sink_k_ptr, sink_v_ptr, ids_ptr, shared_k_ptr, shared_v_ptr, shared_valid_ptr,
                      priv_k_ptr, priv_v_ptr, pvalid_ptr, win_k_ptr, win_v_ptr, count_ptr, part_ptr, acc_ptr,
                      num_sink, R, n_shared, n_private, W, scaling, HS, G: tl.constexpr, GP: tl.constexpr,
                      D: tl.constexpr, P: tl.constexpr, SINK_BLOCKS: tl.constexpr):
    """One block of P keys per program (a sink block, a selected page, or a window
    block): partial softmax (max, sum) and weighted values for flash-decoding's merge.
    Shared pages are read where they lie (a UVA view of host memory on CUDA). Row h:
    sinks and shared pages of KV head h % HS, the rest of request h // HS's row."""
    h, b = tl.program_id(0), tl.program_id(1)
    hs = h % HS
    blocks = tl.num_programs(1)
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    t = tl.arange(0, P)
    q = tl.load(q_ptr + (h * G + g[:, None]) * D + d[None, :], mask=g[:, None] < G, other=0.0).to(tl.float32)
    if b < SINK_BLOCKS:
        tok = b * P + t
        ok = tok < num_sink
        rows = (hs * num_sink + tok[:, None]) * D + d[None, :]
        k = tl.load(sink_k_ptr + rows, mask=ok[:, None], other=0.0).to(tl.float32)
        v = tl.load(sink_v_ptr + rows, mask=ok[:, None], other=0.0).to(tl.float32)
    elif b < SINK_BLOCKS + R:
        page = tl.load(ids_ptr + h * R + b - SINK_BLOCKS)
        if page < 0:
            ok = t < 0
            k = tl.zeros((P, D), tl.float32)
            v = tl.zeros((P, D), tl.float32)
        elif page < n_shared:
            ok = t < tl.load(shared_valid_ptr + hs * n_shared + page)
            rows = ((hs * n_shared + page) * P + t[:, None]) * D + d[None, :]
            k = tl.load(shared_k_ptr + rows, mask=ok[:, None], other=0.0).to(tl.float32)
            v = tl.load(shared_v_ptr + rows, mask=ok[:, None], other=0.0).to(tl.float32)
        else:
            own = page - n_shared
            ok = t < tl.load(pvalid_ptr + h * n_private + own)
            rows = ((h * n_private + own) * P + t[:, None]) * D + d[None, :]
            k = tl.load(priv_k_ptr + rows, mask=ok[:, None], other=0.0).to(tl.float32)
            v = tl.load(priv_v_ptr + rows, mask=ok[:, None], other=0.0).to(tl.float32)
    else:
        tok = (b - SINK_BLOCKS - R) * P + t
        filled = tl.minimum(tl.load(count_ptr + (h // HS) * 2) + 1, W)  # the ring after this step's push
        ok = tok < filled
        rows = (h * W + tok[:, None]) * D + d[None, :]
        k = tl.load(win_k_ptr + rows, mask=ok[:, None], other=0.0).to(tl.float32)
        v = tl.load(win_v_ptr + rows, mask=ok[:, None], other=0.0).to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * scaling  # [GP, P]
    s = tl.where(ok[None, :], s, -float("inf"))
    m = tl.max(s, axis=1)
    safe = tl.where(m > -float("inf"), m, 0.0)
    p = tl.where(ok[None, :], tl.exp(s - safe[:, None]), 0.0)
    acc = tl.dot(p, v, input_precision="ieee")  # [GP, D]
    base = (h * blocks + b) * GP + g
    tl.store(part_ptr + base * 2, m)
    tl.store(part_ptr + base * 2 + 1, tl.sum(p, axis=1))
    tl.store(acc_ptr + base[:, None] * D + d[None, :], acc)


@triton.jit(do_not_specialize=['blocks'])
def _merge_attention(part_ptr, acc_ptr, out_ptr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                     BP: tl.constexpr, blocks):
    """out[h, g] = sum_b e^(m_b - M) acc_b / sum_b e^(m_b - M) l_b (one program per KV head)."""
    h = tl.program_id(0)
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    b = tl.arange(0, BP)
    base = (h * blocks + b[:, None]) * GP + g[None, :]  # [BP, GP]
    m = tl.load(part_ptr + base * 2, mask=b[:, None] < blocks, other=-float("inf"))
    l = tl.load(part_ptr + base * 2 + 1, mask=b[:, None] < blocks, other=0.0)
    big = tl.max(m, axis=0)
    scale = tl.where(m > -float("inf"), tl.exp(m - tl.where(big > -float("inf"), big, 0.0)[None, :]), 0.0)  # [BP, GP]
    total = tl.sum(scale * l, axis=0)  # [GP]
    out = tl.zeros((GP, D), tl.float32)
    for i in range(0, blocks):
        w = tl.load(part_ptr + ((h * blocks + i) * GP + g) * 2)
        w = tl.where(w > -float("inf"), tl.exp(w - tl.where(big > -float("inf"), big, 0.0)), 0.0)
        out += w[:, None] * tl.load(acc_ptr + ((h * blocks + i) * GP + g[:, None]) * D + d[None, :])
    out = out / tl.where(total > 0, total, 1.0)[:, None]
    tl.store(out_ptr + (h * G + g[:, None]) * D + d[None, :], out.to(out_ptr.dtype.element_ty), mask=g[:, None] < G)


def sparse_attention(q: torch.Tensor, sink_k: torch.Tensor, sink_v: torch.Tensor, page_ids: torch.Tensor,
                     shared_k: torch.Tensor, shared_v: torch.Tensor, shared_valid: torch.Tensor,
                     priv_k: torch.Tensor, priv_v: torch.Tensor, priv_valid: torch.Tensor, win_k: torch.Tensor,
                     win_v: torch.Tensor, counts: torch.Tensor, scaling: float, parts: torch.Tensor,
                     acc: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Decode attention of q [H, G, D] (any float dtype; H = B * HS rows: B requests, HS KV heads)
    over the shared sinks [HS, S, D], the pages page_ids [H, R] (< N: shared
    [HS, N, P, D], else the row's private [H, M, P, D]; -1 = none) and the row's window
    ring [H, W, D] holding min(counts[b, 0] + 1, W) tokens. -> out [H, G, D]."""
    _check_contiguous(q, sink_k, sink_v, page_ids, shared_k, shared_v, shared_valid, priv_k, priv_v, priv_valid,
                      win_k, win_v)
    H, G, D = q.shape
    P = priv_k.shape[2]
    R = page_ids.shape[1]
    W = win_k.shape[1]
    GP = _rows(G)
    sink_blocks = triton.cdiv(sink_k.shape[1], P)
    blocks = sink_blocks + R + triton.cdiv(W, P)
    _sparse_attention[(H, blocks)](q, sink_k, sink_v, page_ids, shared_k, shared_v, shared_valid, priv_k, priv_v,
                                   priv_valid, win_k, win_v, counts, parts, acc, sink_k.shape[1], R,
                                   shared_k.shape[1], priv_k.shape[1], W, scaling, sink_k.shape[0], G=G, GP=GP,
                                   D=D, P=P,
                                   SINK_BLOCKS=sink_blocks)
    _merge_attention[(H,)](parts, acc, out, G=G, GP=GP, D=D, BP=triton.next_power_of_2(blocks), blocks=blocks)
    return out


# ---------------------------------------------------------------------------- dense layers
_BLOCK_KEYS = 64  # context keys per inner step of the shared-context attention
_PREFIX_PROGRAMS = 1024  # programs to spread a context's keys over (several waves on a big GPU)


def dense_plan(batch: int, HS: int, G: int, n: int) -> tuple[int, int, int, int]:
    """(rows per program, row tiles, splits, keys per split) of dense_attention's grid."""
    rows = batch * G
    RP = min(64, max(16, triton.next_power_of_2(rows)))
    tiles = triton.cdiv(rows, RP)
    splits = max(1, min(triton.cdiv(n, _BLOCK_KEYS), triton.cdiv(_PREFIX_PROGRAMS, HS * tiles)))
    span = triton.cdiv(triton.cdiv(max(n, 1), splits), _BLOCK_KEYS) * _BLOCK_KEYS
    return RP, tiles, triton.cdiv(max(n, 1), span), span


def dense_scratch_sizes(max_batch: int, HS: int, G: int, D: int, n: int) -> dict[str, int]:
    """Work buffers of dense_attention for any batch up to max_batch."""
    cells = max(HS * s * t * rp for rp, t, s, _ in (dense_plan(b, HS, G, n) for b in range(1, max_batch + 1)))
    return {"dense_parts": cells * 2, "dense_acc": cells * D}


@triton.jit(do_not_specialize=['n', 'rows', 'span'])
def _prefix_attention(q_ptr, k_ptr, v_ptr, part_ptr, acc_ptr, n, rows, span, scaling, HS, G: tl.constexpr,
                      D: tl.constexpr, RP: tl.constexpr, BLOCK: tl.constexpr, LOW: tl.constexpr):
    """Flash-decoding over a context's keys [HS, n, D] that every request shares: program
    (row tile t, split s, KV head h) takes the query rows r = b * G + g of all requests b
    in tile t and the keys of split s, so a key block is read once for the whole batch.
    -> per row (max, sum exp) into part and the weighted values into acc. LOW: a bf16/fp16
    context is multiplied on tensor cores in its own dtype (fp32 sums), as flash attention does."""
    t, s, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    r = t * RP + tl.arange(0, RP)
    d = tl.arange(0, D)
    b, g = r // G, r % G
    q = tl.load(q_ptr + ((b * HS + h) * G + g)[:, None] * D + d[None, :], mask=(r < rows)[:, None],
                other=0.0).to(tl.float32)
    m_run = tl.full((RP,), -float("inf"), tl.float32)
    l_run = tl.zeros((RP,), tl.float32)
    acc = tl.zeros((RP, D), tl.float32)
    end = tl.minimum(s * span + span, n)
    for k0 in range(s * span, end, BLOCK):
        tok = k0 + tl.arange(0, BLOCK)
        ok = tok < end
        at = (h * n + tok[:, None]) * D + d[None, :]
        k = tl.load(k_ptr + at, mask=ok[:, None], other=0.0)
        v = tl.load(v_ptr + at, mask=ok[:, None], other=0.0)
        if LOW:
            sc = tl.dot(q.to(k.dtype), tl.trans(k)) * scaling
        else:
            sc = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee") * scaling
        m_run, l_run, acc = _online_softmax(m_run, l_run, acc, tl.where(ok[None, :], sc, -float("inf")), ok, v, LOW)
    base = (h * tl.num_programs(1) + s) * tl.num_programs(0) * RP + r
    tl.store(part_ptr + base * 2, m_run)
    tl.store(part_ptr + base * 2 + 1, l_run)
    tl.store(acc_ptr + base[:, None] * D + d[None, :], acc)


@triton.jit
def _online_softmax(m_run, l_run, acc, sc, ok, v, LOW: tl.constexpr):
    """Fold a tile of scores sc [rows, BLOCK] (keys valid where ok) and their values
    v [BLOCK, D] into the running (max, sum exp, weighted values) of each row (LOW: the
    weights times v in v's dtype, on tensor cores)."""
    m_new = tl.maximum(m_run, tl.max(sc, axis=1))
    safe = tl.where(m_new > -float("inf"), m_new, 0.0)
    alpha = tl.where(m_run > -float("inf"), tl.exp(m_run - safe), 0.0)
    p = tl.where(ok[None, :], tl.exp(sc - safe[:, None]), 0.0)
    if LOW:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    else:
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
    return m_new, l_run * alpha + tl.sum(p, axis=1), acc


@triton.jit(do_not_specialize=['splits', 'rows_pad', 'T'])
def _dense_merge(q_ptr, part_ptr, acc_ptr, own_k_ptr, own_v_ptr, count_ptr, out_ptr, splits, rows_pad, T, scaling,
                 HS, G: tl.constexpr, D: tl.constexpr, SC: tl.constexpr, BLOCK: tl.constexpr):
    """Query row g of request b, KV head h (one program each, so a lone request still
    spreads over B * HS * G programs): the shared context's partials merged, SC splits at a
    time, then the request's own tokens own[b, h, :count[b] + 1] (this step's included)
    folded in. -> out[b, h, g]."""
    x, g = tl.program_id(0), tl.program_id(1)
    b, h = x // HS, x % HS
    d = tl.arange(0, D)
    m_run = tl.full([], -float("inf"), tl.float32)
    l_run = tl.full([], 0.0, tl.float32)
    acc = tl.zeros((D,), tl.float32)
    for s0 in range(0, splits, SC):
        sc = s0 + tl.arange(0, SC)
        cell = (h * splits + sc) * rows_pad + b * G + g
        m = tl.load(part_ptr + cell * 2, mask=sc < splits, other=-float("inf"))
        l = tl.load(part_ptr + cell * 2 + 1, mask=sc < splits, other=0.0)
        part = tl.load(acc_ptr + cell[:, None] * D + d[None, :], mask=(sc < splits)[:, None], other=0.0)
        m_run, l_run, acc = _fold_partials(m_run, l_run, acc, m, l, part)
    q = tl.load(q_ptr + ((b * HS + h) * G + g) * D + d).to(tl.float32)
    filled = tl.load(count_ptr + b) + 1
    for k0 in range(0, filled, BLOCK):
        tok = k0 + tl.arange(0, BLOCK)
        ok = tok < filled
        own = ((b * HS + h) * T + tok[:, None]) * D + d[None, :]
        k = tl.load(own_k_ptr + own, mask=ok[:, None], other=0.0).to(tl.float32)
        v = tl.load(own_v_ptr + own, mask=ok[:, None], other=0.0).to(tl.float32)
        sc = tl.where(ok, tl.sum(q[None, :] * k, axis=1) * scaling, -float("inf"))
        m_run, l_run, acc = _fold_partials(m_run, l_run, acc, sc, ok.to(tl.float32), v)
    out = acc / tl.where(l_run > 0, l_run, 1.0)
    tl.store(out_ptr + ((b * HS + h) * G + g) * D + d, out.to(out_ptr.dtype.element_ty))


@triton.jit
def _fold_partials(m_run, l_run, acc, m, l, part):
    """Fold parts (max m, sum exp l, weighted values part [n, D]) into one row's running
    (max, sum exp, weighted values); a key is the part with l = 1 and part = its value."""
    m_new = tl.maximum(m_run, tl.max(m, axis=0))
    safe = tl.where(m_new > -float("inf"), m_new, 0.0)
    alpha = tl.where(m_run > -float("inf"), tl.exp(m_run - safe), 0.0)
    w = tl.where(m > -float("inf"), tl.exp(m - safe), 0.0)
    return m_new, l_run * alpha + tl.sum(w * l, axis=0), acc * alpha + tl.sum(w[:, None] * part, axis=0)


def dense_attention(q: torch.Tensor, ctx_k: torch.Tensor, ctx_v: torch.Tensor, own_k: torch.Tensor,
                    own_v: torch.Tensor, counts: torch.Tensor, scaling: float, parts: torch.Tensor,
                    acc: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Exact decode attention of B requests over a context they share plus their own tokens.

    q: [B, HS, G, D] (any float dtype); ctx_k/v: [HS, n, D], read once for the whole batch; own_k/v:
    [>= B, HS, T, D] the requests' own tokens, of which counts[b] + 1 are filled (this
    step's token at counts[b]); parts/acc: fp32 scratch (dense_scratch_sizes). -> out
    [B, HS, G, D]."""
    _check_contiguous(q, ctx_k, ctx_v, own_k, own_v, counts)
    B, HS, G, D = q.shape
    n, T = ctx_k.shape[1], own_k.shape[2]
    RP, tiles, splits, span = dense_plan(B, HS, G, n)
    _launch(_prefix_attention, (tiles, splits, HS), (q, ctx_k, ctx_v, parts, acc, n, B * G, span, scaling, HS),
            dict(G=G, D=D, RP=RP, BLOCK=_BLOCK_KEYS, LOW=ctx_k.dtype != torch.float32))
    _dense_merge[(B * HS, G)](q, parts, acc, own_k, own_v, counts, out, splits, tiles * RP, T, scaling, HS, G=G, D=D,
                              SC=32, BLOCK=_BLOCK_KEYS)
    return out
