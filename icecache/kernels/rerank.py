"""Re-ranking candidate pages by their keys (IceCacheConfig.rerank > 1) in two Triton
kernels, for the decode step's CUDA graph: one program per (row, PAGES_PER_PROGRAM candidate
pages) for the pages' log-sum-exps, then one per (request, KV head) row for the choice
(head_pages="share": two, each row's bids, then each row's cut against its request's).

The box bounds pick rerank x R candidate pages; this keeps the R of them that hold the
most attention mass of the step's query: per candidate, every query head's log-sum-exp
of scores over the page's valid keys (read where they lie: host pages through their UVA
view, private pages on the device, the question's pages from their device copy when given),
each head's softmax share over the candidates,
summed over the KV head's query heads, top R. index.select.rerank_pages is the torch
reference (and the CPU path). On an H200 at 128k, one program per row looping over its
candidates made the index query 4x slower (2.0 -> 8.2 ms a token at rerank=4): the page
reads from host memory ran one after another.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from icecache.index.select import least_head_pages
from icecache.kernels.common import check_contiguous, head_scores, supported
from icecache.store import shared_rows

PAGES_PER_PROGRAM = 2  # candidates _page_lse scores together (1-8 were within 10% of each other on an H200)
if os.environ.get("TRITON_INTERPRET") == "1":  # CPU runs of the kernels (tests): a program costs Python time
    PAGES_PER_PROGRAM = 8
COUNT_BLOCK = 8192  # key comparisons the share split's kernels make at once (64 a thread at 4 warps)


@triton.jit(do_not_specialize=['C', 'n_shared', 'head_tokens', 'n_private', 'n_copied'])
def _page_lse(q_ptr, cand_ptr, shared_k_ptr, shared_valid_ptr, shared_at_ptr, priv_k_ptr, pvalid_ptr, copy_k_ptr,
              lse_ptr, C, n_shared, head_tokens, n_private, n_copied, scaling, HS, G: tl.constexpr, GP: tl.constexpr,
              D: tl.constexpr, P: tl.constexpr, CP: tl.constexpr, CB: tl.constexpr):
    """Program (h, b): candidates i = b·CB ... b·CB + CB-1 of row h, each cand[h, i] (< n_shared:
    a shared page of KV head h % HS, else the row's private page; -1 = none) -> lse[h, i, :G],
    each query head's log-sum-exp of scores over the page's valid keys (-inf for an absent or
    empty page, or one that an earlier candidate of the row names already). A shared page
    among the row's first n_copied candidates has its keys read from copy_k[h, i] (a device
    copy) instead of shared_k (token rows: page p of KV head hs is rows shared_at[hs, p]...
    of that head's head_tokens). The CB pages' keys are one [CB·P, D] gather, so their reads
    (host memory over PCIe, or the device) are in flight together."""
    h = tl.program_id(0)
    i = tl.program_id(1) * CB + tl.arange(0, CB)  # [CB] candidate columns
    hs = h % HS
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    t = tl.arange(0, P)
    page = tl.load(cand_ptr + h * C + i, mask=i < C, other=-1)
    shared = (page >= 0) & (page < n_shared)
    copied = shared & (i < n_copied)
    uncopied = shared & (i >= n_copied)
    private = page >= n_shared
    sid = tl.maximum(tl.minimum(page, n_shared - 1), 0)
    pid = tl.maximum(tl.minimum(page - n_shared, n_private - 1), 0)
    count = tl.load(shared_valid_ptr + hs * n_shared + sid, mask=shared, other=0)
    count += tl.load(pvalid_ptr + h * n_private + pid, mask=private, other=0)
    c = tl.arange(0, CP)
    row = tl.load(cand_ptr + h * C + c, mask=c < C, other=-2)
    repeated = tl.max(tl.where((row[None, :] == page[:, None]) & (c[None, :] < i[:, None]), 1, 0), axis=1)
    ok = t[None, :] < (count * (1 - repeated))[:, None]  # [CB, P]
    first_row = (hs * head_tokens + tl.load(shared_at_ptr + hs * n_shared + sid, mask=shared, other=0)).to(tl.int64)
    at = (first_row[:, None] + t[None, :])[:, :, None] * D + d[None, None, :]  # [CB, P, D]
    k = tl.load(shared_k_ptr + at, mask=(ok & uncopied[:, None])[:, :, None], other=0.0).to(tl.float32)
    at = ((h * n_copied + i[:, None]) * P + t[None, :])[:, :, None] * D + d[None, None, :]
    k += tl.load(copy_k_ptr + at, mask=(ok & copied[:, None])[:, :, None], other=0.0).to(tl.float32)
    at = ((h * n_private + pid[:, None]) * P + t[None, :])[:, :, None] * D + d[None, None, :]
    k += tl.load(priv_k_ptr + at, mask=(ok & private[:, None])[:, :, None], other=0.0).to(tl.float32)
    s = head_scores(q_ptr, h, tl.reshape(k, (CB * P, D)), G, GP, D) * scaling  # [GP, CB·P]
    s = tl.where(ok[None, :, :], tl.reshape(s, (GP, CB, P)), -float("inf"))
    m = tl.max(s, axis=2)  # [GP, CB]
    safe = tl.where(m > -float("inf"), m, 0.0)
    total = tl.sum(tl.where(ok[None, :, :], tl.exp(s - safe[:, :, None]), 0.0), axis=2)
    page_lse = tl.where(m > -float("inf"), safe + tl.log(total), -float("inf"))
    tl.store(lse_ptr + (h * C + i[None, :]) * G + g[:, None], page_lse, mask=(g[:, None] < G) & (i[None, :] < C))


@triton.jit(do_not_specialize=['C'])
def _top_by_share(lse_ptr, cand_ptr, out_ptr, C, R: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
                  CP: tl.constexpr):
    """Row h: each query head's softmax share over the candidates' lse[h, :C, :G], summed
    over the KV head's query heads -> out[h, :R], the candidates of most weight, best first,
    -1 where fewer non-empty pages qualify."""
    h = tl.program_id(0)
    g = tl.arange(0, GP)
    c = tl.arange(0, CP)
    lse = tl.load(lse_ptr + (h * C + c[None, :]) * G + g[:, None], mask=(g[:, None] < G) & (c[None, :] < C),
                  other=-float("inf"))  # [query head, candidate]
    candidate = tl.max(tl.where(g[:, None] == 0, lse, -float("inf")), axis=0) > -float("inf")  # a non-empty page
    top = tl.max(lse, axis=1)
    e = tl.where(lse > -float("inf"), tl.exp(lse - tl.where(top > -float("inf"), top, 0.0)[:, None]), 0.0)
    total = tl.sum(e, axis=1)
    share = tl.where(g[:, None] < G, e / tl.where(total > 0, total, 1.0)[:, None], 0.0)
    weight = tl.where(candidate, tl.sum(share, axis=0), -float("inf"))  # [CP]
    ids = tl.load(cand_ptr + h * C + c, mask=c < C, other=-1)
    for r in tl.static_range(R):
        best = tl.max(weight, axis=0)
        at = tl.argmax(weight, axis=0)
        chosen = tl.sum(tl.where(c == at, ids, 0), axis=0)
        tl.store(out_ptr + h * R + r, tl.where(best > -float("inf"), chosen, -1))
        weight = tl.where(c == at, -float("inf"), weight)


@triton.jit
def _fixed_log_mass(q_ptr, sink_ptr, win_ptr, counts_ptr, h, scaling, S, W, HS, G: tl.constexpr, GP: tl.constexpr,
                    D: tl.constexpr, SP: tl.constexpr, WP: tl.constexpr):
    """Row h (request h // HS, KV head h % HS) -> [GP]: each query head's log-sum-exp of
    scores over the tokens every step attends to (-inf for g >= G): the head's S sinks (sink
    [HS, S, D]) and the row's window ring (win [rows, W, D]) holding min(counts[b, 0] + 1, W)
    tokens."""
    d = tl.arange(0, D)
    g = tl.arange(0, GP)
    i = tl.arange(0, SP)
    k = tl.load(sink_ptr + ((h % HS) * S + i[:, None]) * D + d[None, :], mask=i[:, None] < S, other=0.0)
    sink = tl.where(i[None, :] < S, head_scores(q_ptr, h, k.to(tl.float32), G, GP, D) * scaling, -float("inf"))
    j = tl.arange(0, WP)
    filled = tl.minimum(tl.load(counts_ptr + (h // HS) * 2) + 1, W)  # at least the step's own token
    k = tl.load(win_ptr + (h * W + j[:, None]) * D + d[None, :], mask=j[:, None] < filled, other=0.0)
    win = tl.where(j[None, :] < filled, head_scores(q_ptr, h, k.to(tl.float32), G, GP, D) * scaling, -float("inf"))
    top = tl.maximum(tl.max(sink, axis=1), tl.max(win, axis=1))  # finite: the window holds a token
    total = tl.sum(tl.exp(sink - top[:, None]), axis=1) + tl.sum(tl.exp(win - top[:, None]), axis=1)
    return tl.where(g < G, top + tl.log(total), -float("inf"))


@triton.jit(do_not_specialize=['C', 'S', 'W'])
def _row_bids(q_ptr, lse_ptr, sink_ptr, win_ptr, counts_ptr, keys_ptr, bids_ptr, C, scaling, S, W, HS,
              LEAST: tl.constexpr, CAP: tl.constexpr, CAPP: tl.constexpr, G: tl.constexpr, GP: tl.constexpr,
              D: tl.constexpr, SP: tl.constexpr, WP: tl.constexpr, CP: tl.constexpr, CH: tl.constexpr):
    """Row h's side of index.select.split_by_share -> bids[h, :CAP], its CAP best candidates'
    keys, best first (-1: not a page). A candidate's share is of its row's softmax over the
    always-attended tokens (_fixed_log_mass) and the candidates (lse [rows, C, G]), query
    heads summed; its key, an int64, the share's float bits (monotone for shares >= 0) above
    its place in the request (ties: the lower place first), so keys are distinct and a
    key's rank is a count of the row's keys above it (CH at a time). The row's first LEAST
    get bit 62: ahead of every other row's (a share <= 1.0 keeps a key below 2^62)."""
    h = tl.program_id(0)
    g = tl.arange(0, GP)
    c = tl.arange(0, CP)
    fixed = _fixed_log_mass(q_ptr, sink_ptr, win_ptr, counts_ptr, h, scaling, S, W, HS, G, GP, D, SP, WP)
    lse = tl.load(lse_ptr + (h * C + c[None, :]) * G + g[:, None], mask=(g[:, None] < G) & (c[None, :] < C),
                  other=-float("inf"))  # [query head, candidate]
    top = tl.maximum(fixed, tl.max(lse, axis=1))
    safe = tl.where(top > -float("inf"), top, 0.0)
    total = tl.exp(fixed - safe) + tl.sum(tl.exp(lse - safe[:, None]), axis=1)
    share = tl.sum(tl.where(g[:, None] < G, tl.exp(lse - (safe + tl.log(total))[:, None]), 0.0), axis=0)
    candidate = tl.max(tl.where(g[:, None] == 0, lse, -float("inf")), axis=0) > -float("inf")
    tie = (HS * CP - 1 - (h % HS) * CP - c).to(tl.int64)
    key = tl.where(candidate, (share.to(tl.int32, bitcast=True).to(tl.int64) << 32) | tie, -1 - tie)
    tl.store(keys_ptr + h * CP + c, key)
    tl.debug_barrier()
    rank = tl.zeros((CP,), dtype=tl.int32)  # its place in the row, best first: a permutation of 0 ... CP-1
    j = tl.arange(0, CH)
    for start in range(0, CP, CH):
        other = tl.load(keys_ptr + h * CP + start + j)
        rank += tl.sum((other[None, :] > key[:, None]).to(tl.int32), axis=1)
    bid = tl.where(key >= 0, tl.where(rank < LEAST, key | (1 << 62), key), -1)
    tl.store(bids_ptr + h * CAPP + rank, bid, mask=rank < CAP)


@triton.jit(do_not_specialize=['C'])
def _cut_bids(bids_ptr, cand_ptr, out_ptr, C, HS: tl.constexpr, KEEP: tl.constexpr, CAP: tl.constexpr,
              CAPP: tl.constexpr, CP: tl.constexpr, BH: tl.constexpr):
    """Row h -> out[h, :CAP]: of its bids (_row_bids), those among its request's KEEP best
    (a bid's rank: a count of the request's bids above it, BH at a time), as candidate ids,
    best first, -1 after."""
    h = tl.program_id(0)
    first = (h // HS) * HS * CAPP  # the request's bids
    p = tl.arange(0, CAPP)
    mine = tl.load(bids_ptr + h * CAPP + p, mask=p < CAP, other=-1)
    above = tl.zeros((CAPP,), dtype=tl.int32)
    m = tl.arange(0, BH)
    for start in range(0, HS * CAPP, BH):
        n = start + m
        other = tl.load(bids_ptr + first + n, mask=(n % CAPP < CAP) & (n < HS * CAPP), other=-1)
        above += tl.sum((other[None, :] > mine[:, None]).to(tl.int32), axis=1)
    kept = (mine >= 0) & (above < KEEP)
    at = HS * CP - 1 - (mine & 0xFFFFFFFF) - (h % HS) * CP  # the candidate behind each kept bid
    ids = tl.load(cand_ptr + h * C + at, mask=kept, other=-1)
    tl.store(out_ptr + h * CAP + p, ids, mask=p < CAP)


def rerank_pages(q: torch.Tensor, candidates: torch.Tensor, shared_k: torch.Tensor, shared_valid: torch.Tensor,
                 priv_k: torch.Tensor, priv_valid: torch.Tensor, num_pages: int, scaling: float,
                 copied_k: torch.Tensor | None = None, shared_at: torch.Tensor | None = None,
                 block: int = PAGES_PER_PROGRAM,
                 fixed: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """index.select.rerank_pages in two kernel launches. q: [rows, G, D]; candidates [rows, C]
    (-1 = none, ids >= N private, a repeated id counts once: its first place); shared_k
    [HS, N, P, D] and shared_valid [HS, N], read by row r as KV head r % HS; priv_k
    [rows, M, P, D], priv_valid [rows, M]; copied_k [rows, Q, P, D]: the keys of the shared
    pages of each row's first Q candidates (their valid counts still shared_valid's), read
    there rather than from shared_k. shared_at: shared_k as token rows [HS, T, D] instead of pages,
    page p of head hs from row shared_at[hs, p] (store.shared_rows). block: candidates a
    program scores (a power of two). fixed: (sinks [HS, S, D], window rings [rows, W, D],
    counts [requests, 2]) the tokens every step attends to: then a request's HS x num_pages
    pages are split among its rows by share (index.select.split_by_share).
    -> [rows, min(num_pages, C)] ids (candidates' dtype; with fixed min(2 x num_pages, C)),
    best first."""
    if copied_k is None:
        copied_k = priv_k[:, :0]
    shared_k, _, shared_at = shared_rows(shared_k, shared_k, shared_valid, shared_at)
    check_contiguous(q, candidates, shared_k, shared_valid, shared_at, priv_k, priv_valid, copied_k)
    rows, C = candidates.shape
    _, G, D = q.shape
    P = priv_k.shape[2]
    assert supported(D, P, G), f"no kernel for head dim {D}, page size {P}, {G} query heads per KV head"
    R = min(num_pages, C)
    GP, CP = max(16, triton.next_power_of_2(G)), max(16, triton.next_power_of_2(C))
    lse = torch.empty(rows, C, G, dtype=torch.float32, device=candidates.device)
    _page_lse[(rows, triton.cdiv(C, block))](q, candidates, shared_k, shared_valid, shared_at, priv_k, priv_valid,
                                             copied_k, lse, C, shared_valid.shape[1], shared_k.shape[1],
                                             priv_k.shape[1], copied_k.shape[1], scaling, max(shared_k.shape[0], 1),
                                             G=G, GP=GP, D=D, P=P, CP=CP, CB=block)
    if fixed is not None:
        return _split(q, lse, candidates, fixed, num_pages, scaling)
    out = torch.empty(rows, R, dtype=candidates.dtype, device=candidates.device)
    _top_by_share[(rows,)](lse, candidates, out, C, R=R, G=G, GP=GP, CP=CP)
    return out


def _split(q: torch.Tensor, lse: torch.Tensor, candidates: torch.Tensor,
           fixed: tuple[torch.Tensor, torch.Tensor, torch.Tensor], num_pages: int, scaling: float) -> torch.Tensor:
    """rerank_pages' choice split among each request's rows by share (its `fixed` argument):
    each row's bids, then each row's cut against its request's, one program a row in each
    (one program a request, sorting its keys, took ~60 us a layer on an H100)."""
    sink_k, win_k, counts = fixed
    check_contiguous(sink_k, win_k, counts)
    rows, C = candidates.shape
    _, G, D = q.shape
    HS, S, _ = sink_k.shape
    W = win_k.shape[1]
    GP, CP = max(16, triton.next_power_of_2(G)), max(16, triton.next_power_of_2(C))
    cap, least = min(2 * num_pages, C), least_head_pages(num_pages)
    CAPP = triton.next_power_of_2(cap)
    keys = torch.empty(rows, CP, dtype=torch.int64, device=q.device)
    bids = torch.empty(rows, CAPP, dtype=torch.int64, device=q.device)
    _row_bids[(rows,)](q, lse, sink_k, win_k, counts, keys, bids, C, scaling, S, W, HS, LEAST=least, CAP=cap,
                       CAPP=CAPP, G=G, GP=GP, D=D, SP=max(16, triton.next_power_of_2(S)),
                       WP=max(16, triton.next_power_of_2(W)), CP=CP, CH=max(1, min(CP, COUNT_BLOCK // CP)))
    out = torch.empty(rows, cap, dtype=candidates.dtype, device=candidates.device)
    _cut_bids[(rows,)](bids, candidates, out, C, HS=HS, KEEP=HS * num_pages, CAP=cap, CAPP=CAPP, CP=CP,
                       BH=max(1, min(triton.next_power_of_2(HS * CAPP), COUNT_BLOCK // CAPP)))
    return out
