"""Re-ranking candidate pages by their keys (IceCacheConfig.rerank > 1) in one Triton
program per (request, KV head) row, for the decode step's CUDA graph.

The box bounds pick rerank x R candidate pages; this keeps the R of them that hold the
most attention mass of the step's query: per candidate, every query head's log-sum-exp
of scores over the page's valid keys (read where they lie: host pages through their UVA
view, private pages on the device), each head's softmax share over the candidates,
summed over the KV head's query heads, top R. index.tree.rerank_pages is the torch
reference (and the CPU path); in torch ops the step took about 5 ms more at 128k.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from icecache.kernels import supported


@triton.jit(do_not_specialize=['C', 'n_shared', 'n_private'])
def _rerank(q_ptr, cand_ptr, shared_k_ptr, shared_valid_ptr, priv_k_ptr, pvalid_ptr, out_ptr, C, n_shared,
            n_private, scaling, HS, R: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
            P: tl.constexpr, CP: tl.constexpr):
    """Row h: candidates cand[h, :C] (< n_shared: shared pages of KV head h % HS, else the
    row's private pages; -1 = none) -> out[h, :R] best first, -1 where fewer qualify."""
    h = tl.program_id(0)
    hs = h % HS
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    t = tl.arange(0, P)
    c = tl.arange(0, CP)
    q = tl.load(q_ptr + (h * G + g[:, None]) * D + d[None, :], mask=g[:, None] < G, other=0.0).to(tl.float32)
    lse = tl.full((GP, CP), -float("inf"), tl.float32)  # [query head, candidate]
    for i in range(0, C):
        page = tl.load(cand_ptr + h * C + i + t * 0)  # [P], all the same id (masks stay vectors)
        shared = (page >= 0) & (page < n_shared)
        private = page >= n_shared
        sid = tl.maximum(tl.minimum(page, n_shared - 1), 0)
        pid = tl.maximum(tl.minimum(page - n_shared, n_private - 1), 0)
        first = t == 0
        count = tl.sum(tl.load(shared_valid_ptr + hs * n_shared + sid, mask=first & shared, other=0), axis=0)
        count += tl.sum(tl.load(pvalid_ptr + h * n_private + pid, mask=first & private, other=0), axis=0)
        ok = t < count
        k = tl.load(shared_k_ptr + ((hs * n_shared + sid[:, None]) * P + t[:, None]) * D + d[None, :],
                    mask=(ok & shared)[:, None], other=0.0).to(tl.float32)
        k += tl.load(priv_k_ptr + ((h * n_private + pid[:, None]) * P + t[:, None]) * D + d[None, :],
                     mask=(ok & private)[:, None], other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scaling  # [GP, P]
        s = tl.where(ok[None, :], s, -float("inf"))
        m = tl.max(s, axis=1)
        safe = tl.where(m > -float("inf"), m, 0.0)
        total = tl.sum(tl.where(ok[None, :], tl.exp(s - safe[:, None]), 0.0), axis=1)
        page_lse = tl.where(m > -float("inf"), safe + tl.log(total), -float("inf"))
        lse = tl.where(c[None, :] == i, page_lse[:, None], lse)
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


def rerank_pages(q: torch.Tensor, candidates: torch.Tensor, shared_k: torch.Tensor, shared_valid: torch.Tensor,
                 priv_k: torch.Tensor, priv_valid: torch.Tensor, num_pages: int, scaling: float) -> torch.Tensor:
    """index.tree.rerank_pages in one kernel launch. q: [rows, G, D]; candidates [rows, C]
    (best bounds first, -1 = none, ids >= N private); shared_k [HS, N, P, D] and
    shared_valid [HS, N], read by row r as KV head r % HS; priv_k [rows, M, P, D],
    priv_valid [rows, M]. -> [rows, min(num_pages, C)] ids (candidates' dtype), best first."""
    for t in (q, candidates, shared_k, shared_valid, priv_k, priv_valid):
        assert t.is_contiguous(), f"kernel input of shape {tuple(t.shape)} is not contiguous"
    rows, C = candidates.shape
    _, G, D = q.shape
    P = priv_k.shape[2]
    assert supported(D, P, G), f"no kernel for head dim {D}, page size {P}, {G} query heads per KV head"
    R = min(num_pages, C)
    out = torch.empty(rows, R, dtype=candidates.dtype, device=candidates.device)
    _rerank[(rows,)](q, candidates, shared_k, shared_valid, priv_k, priv_valid, out, C, shared_k.shape[1],
                     priv_k.shape[1], scaling, max(shared_k.shape[0], 1), R=R, G=G,
                     GP=max(16, triton.next_power_of_2(G)), D=D, P=P, CP=max(16, triton.next_power_of_2(C)))
    return out
