"""The pages a question points to (IceCacheConfig.question_pages): its attention mass on
its context's tokens, and that mass moved to the positions after each token, summed by
page (index.select.question_mass and question_pages are the torch reference).

In torch ops every (row, token) score is written out in fp32 and read back three times:
for 16 questions on a 128k-token document that is 4 GB a layer, ~130 ms a prefill pass on
an H200. Here one program per (KV head, block of tokens) reads the block's keys once and
folds every request's rows over it in registers; only the sums are written, at each
token's position. Moving them along and summing them by page was ~20 torch launches a
layer, and a question's prefill is bound by its launches: it is one more kernel here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from icecache.index.select import top_pages

_TOKENS = 64  # context tokens per program
_ROWS = 64  # question rows per tile (16 rows x 4 query heads a KV head, typically)
_PAGE_TOKENS = 256  # context tokens per program of the page sums


@triton.jit(do_not_specialize=['n', 'num_requests', 'k_stride', 'q_sh', 'q_st', 'l_sh', 'width', 'follow'])
def _question_mass(q_ptr, lse_ptr, rows_ptr, start_ptr, k_ptr, pos_ptr, out_ptr, n, num_requests, k_stride, q_sh, q_st,
                   l_sh, width, follow, scaling, H, G: tl.constexpr, D: tl.constexpr, RB: tl.constexpr,
                   BN: tl.constexpr, LOW: tl.constexpr):
    """Program (h, c): tokens c * BN ... of KV head h. Request r's question rows are
    rows[start[r]] .. rows[start[r + 1] - 1] of the pack, each once per query head j of the
    group: q[h * G + j, row] (strides q_sh, q_st), its log-sum-exp over the context
    lse[h * G + j, row]. Their sum over the rows of exp(scaling * q.k - lse) goes to
    out[r * H + h, follow + the token's position pos[h, token]] (rows of `width`)."""
    h, c = tl.program_id(0), tl.program_id(1)
    tok = c * BN + tl.arange(0, BN)
    ok = tok < n
    d = tl.arange(0, D)
    k = tl.load(k_ptr + h * k_stride + tok[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)  # [BN, D]
    if not LOW:
        k = k.to(tl.float32)
    at = follow + tl.load(pos_ptr + h * n + tok, mask=ok, other=0)
    for r in range(0, num_requests):
        lo = tl.load(start_ptr + r) * G
        hi = tl.load(start_ptr + r + 1) * G
        acc = tl.zeros((BN,), tl.float32)
        for x0 in range(lo, hi, RB):
            x = x0 + tl.arange(0, RB)  # row x // G of the request's, query head x % G
            inside = x < hi
            row = tl.load(rows_ptr + x // G, mask=inside, other=0)
            head = h * G + x % G
            q = tl.load(q_ptr + (head * q_sh + row * q_st)[:, None] + d[None, :], mask=inside[:, None], other=0.0)
            lse = tl.load(lse_ptr + head * l_sh + row, mask=inside, other=float("inf"))
            if LOW:  # a bf16/fp16 model's keys: tensor cores in their dtype, fp32 sums
                s = tl.dot(q.to(k.dtype), tl.trans(k))
            else:
                s = tl.dot(q.to(tl.float32), tl.trans(k), input_precision="ieee")
            p = tl.exp(s * scaling - lse[:, None])  # [RB, BN]
            acc += tl.sum(tl.where(inside[:, None] & ok[None, :], p, 0.0), axis=0)
        tl.store(out_ptr + (r * H + h) * width + at, acc, mask=ok)


@triton.jit(do_not_specialize=['n', 'num_pages', 'width', 'follow'])
def _page_weights(by_ptr, pos_ptr, page_ptr, out_ptr, n, num_pages, width, follow, H, BN: tl.constexpr):
    """Program (r * H + h, c): tokens c * BN ... of KV head h, for request r. A token's
    weight is its mass plus the mass at the `follow` positions before it, the nearest the
    most ((follow + 1 - d) / follow at distance d): by[r * H + h, follow + position] holds
    each position's mass (a row of `width`, zeros before the first). Summed into its page:
    out[r * H + h, page[h, token]]."""
    x, c = tl.program_id(0), tl.program_id(1)
    h = x % H
    tok = c * BN + tl.arange(0, BN)
    ok = tok < n
    at = x * width + follow + tl.load(pos_ptr + h * n + tok, mask=ok, other=0)
    weight = tl.load(by_ptr + at, mask=ok, other=0.0)
    for dist in range(1, follow + 1):
        weight += tl.load(by_ptr + at - dist, mask=ok, other=0.0) * ((follow + 1 - dist) / follow)
    page = tl.load(page_ptr + h * n + tok, mask=ok, other=0)
    tl.atomic_add(out_ptr + x * num_pages + page, weight, mask=ok & (weight > 0))


def question_pages(q: torch.Tensor, lse: torch.Tensor, rows: torch.Tensor, start: torch.Tensor, keys: torch.Tensor,
                   page_of: torch.Tensor, position: torch.Tensor, num_tokens: int, num_pages: int, count: int,
                   follow: int, scaling: float) -> torch.Tensor:
    """index.select.question_pages of index.select.question_mass, in two kernels and a top-k,
    read from the prefill's own tensors: q [Hq, T, D] a pack's rows (any strides, the last
    dim's 1), lse [Hq, T] their log-sum-exps over the context; request r's question rows are
    rows[start[r]:start[r + 1]] (int64 [W], start int32 [requests + 1], on the device: a pass
    makes them once); keys [H, n, D] the context's paged tokens, page_of / position [H, n]
    each one's page and position (< num_tokens). Fixed shapes, no host sync.
    -> [requests, H, count] page ids, best first, -1 where fewer pages have mass."""
    H, n, D = keys.shape
    G = q.shape[0] // H
    num_requests, width = start.shape[0] - 1, num_tokens + follow
    assert keys.stride(2) == 1 and keys.stride(1) == D, "each head's keys must be contiguous rows"
    q = q if q.stride(2) == 1 else q.contiguous()
    lse = lse.float()
    lse = lse if lse.stride(1) == 1 else lse.contiguous()
    rows, start, position, page_of = (t.contiguous() for t in (rows, start, position, page_of))
    by_position = torch.zeros(num_requests * H, width, dtype=torch.float32, device=q.device)
    _question_mass[(H, triton.cdiv(n, _TOKENS))](
        q, lse, rows, start, keys, position, by_position, n, num_requests, keys.stride(0), q.stride(0), q.stride(1),
        lse.stride(0), width, follow, scaling, H, G=G, D=D, RB=_ROWS, BN=_TOKENS, LOW=keys.dtype != torch.float32)
    weight = torch.zeros(num_requests * H, num_pages, dtype=torch.float32, device=q.device)
    _page_weights[(num_requests * H, triton.cdiv(n, _PAGE_TOKENS))](
        by_position, position, page_of, weight, n, num_pages, width, follow, H, BN=_PAGE_TOKENS)
    return top_pages(weight, count, least=0.0).view(num_requests, H, -1)
