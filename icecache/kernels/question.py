"""A question's attention mass on its context's tokens, for the pages it points to
(IceCacheConfig.question_pages; index.select.question_mass is the torch reference).

In torch ops every (row, token) score is written out in fp32 and read back three times:
for 16 questions on a 128k-token document that is 4 GB a layer, ~130 ms a prefill pass on
an H200. Here one program per (KV head, block of tokens) reads the block's keys once and
folds every request's rows over it in registers; only the [requests, H, n] sums are written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from icecache.kernels.common import check_contiguous

_TOKENS = 64  # context tokens per program
_ROWS = 64  # question rows per tile (16 rows x 4 query heads a KV head, typically)


@triton.jit(do_not_specialize=['n', 'rows', 'num_requests', 'k_stride'])
def _question_mass(q_ptr, lse_ptr, start_ptr, k_ptr, out_ptr, n, rows, num_requests, k_stride, scaling, H,
                   D: tl.constexpr, RB: tl.constexpr, BN: tl.constexpr, LOW: tl.constexpr):
    """Program (h, c): tokens c * BN ... of KV head h. For each request r, its rows
    start[r] .. start[r + 1] of q [H, rows, D] (and their log-sum-exps lse [H, rows]) in tiles
    of RB: sum over the rows of exp(scaling * q.k - lse) -> out[r, h, tokens]."""
    h, c = tl.program_id(0), tl.program_id(1)
    tok = c * BN + tl.arange(0, BN)
    ok = tok < n
    d = tl.arange(0, D)
    k = tl.load(k_ptr + h * k_stride + tok[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)  # [BN, D]
    if not LOW:
        k = k.to(tl.float32)
    for r in range(0, num_requests):
        lo = tl.load(start_ptr + r)
        hi = tl.load(start_ptr + r + 1)
        acc = tl.zeros((BN,), tl.float32)
        for r0 in range(lo, hi, RB):
            row = r0 + tl.arange(0, RB)
            inside = row < hi
            q = tl.load(q_ptr + (h * rows + row[:, None]) * D + d[None, :], mask=inside[:, None], other=0.0)
            lse = tl.load(lse_ptr + h * rows + row, mask=inside, other=float("inf"))
            if LOW:  # a bf16/fp16 model's keys: tensor cores in their dtype, fp32 sums
                s = tl.dot(q.to(k.dtype), tl.trans(k))
            else:
                s = tl.dot(q.to(tl.float32), tl.trans(k), input_precision="ieee")
            p = tl.exp(s * scaling - lse[:, None])  # [RB, BN]
            acc += tl.sum(tl.where(inside[:, None] & ok[None, :], p, 0.0), axis=0)
        tl.store(out_ptr + (r * H + h) * n + tok, acc, mask=ok)


def question_mass(q: torch.Tensor, row_lse: torch.Tensor, owner: torch.Tensor, num_requests: int,
                  keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """index.select.question_mass in one launch. q: [Hq, W, D]; row_lse: [Hq, W]; owner: [W]
    each row's request, ascending (a request's rows together); keys: [H, n, D], each head's
    tokens contiguous (a slice of the context's tokens is). No host sync.
    -> [num_requests, H, n] fp32."""
    H, n, D = keys.shape
    Hq, W, _ = q.shape
    g = Hq // H
    assert keys.stride(2) == 1 and keys.stride(1) == D, "each head's keys must be contiguous rows"
    # a request's rows together: [H, W * g, D], row w * g + j = query head j of the KV head's group, row w
    rows = q.view(H, g, W, D).transpose(1, 2).reshape(H, W * g, D).contiguous()
    lse = row_lse.view(H, g, W).transpose(1, 2).reshape(H, W * g).float().contiguous()
    count = torch.zeros(num_requests, dtype=torch.int32, device=q.device).scatter_add_(
        0, owner.to(torch.int64), torch.ones_like(owner, dtype=torch.int32))
    start = torch.cat([count.new_zeros(1), count.cumsum(0, dtype=torch.int32) * g])
    check_contiguous(rows, lse, start)
    out = torch.empty(num_requests, H, n, dtype=torch.float32, device=q.device)
    _question_mass[(H, triton.cdiv(n, _TOKENS))](rows, lse, start, keys, out, n, W * g, num_requests, keys.stride(0),
                                                 scaling, H, D=D, RB=_ROWS, BN=_TOKENS,
                                                 LOW=keys.dtype != torch.float32)
    return out
