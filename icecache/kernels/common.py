"""What every kernel file shares: the shapes the kernels take, launch bookkeeping for
precompile(), and the Triton helpers for top-k by threshold and running log-sum-exps."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

if TYPE_CHECKING:
    from icecache.kernels.walk import WalkPlan

BLOCK = 32  # candidates (tree nodes, pages) per program of a score kernel (tl.dot needs >= 16)
# Triton compiles a kernel per distinct set of constexprs and (unless told not to) per
# divisibility of each int argument. Sizes that change with the context or the batch are
# therefore not specialized on (do_not_specialize below), and the constexprs that do vary
# with them (a ranking's row width NB, its parts CP; dense attention's row tile RP) are
# compiled for every value up front by precompile(), after a warm-up step has recorded a
# launch of each kernel: otherwise the first question on a document of a new shape waits
# seconds for the compiler (5.5 s at 32k tokens and 7.8 s at 128k on an H200).
MAX_SELECT = 32768  # widest row a single program ranks in registers (a tree level, a layer's pages)


def is_tile(x: int) -> bool:
    """A size tl.dot tiles: a power of two >= 16."""
    return x >= 16 and x & (x - 1) == 0


def supported(head_dim: int, page_size: int, group: int) -> bool:
    """Shapes the kernels handle."""
    return is_tile(head_dim) and is_tile(page_size) and group <= 64


def row_tile(group: int) -> int:
    return max(16, triton.next_power_of_2(group))


def warps(n: int) -> int:
    """Warps for a program that holds a row of n fp32 values in registers."""
    return 4 if n <= 2048 else 8 if n <= 8192 else 16


def check_contiguous(*tensors: torch.Tensor) -> None:
    """The kernels index with row-major offsets computed from shapes."""
    for t in tensors:
        assert t.is_contiguous(), f"kernel input of shape {tuple(t.shape)} is not contiguous"


SCRATCH_DTYPES = {"cand": torch.int32, "tops": torch.int32}  # the rest are fp32


def scratch_sizes(rows: int, G: int, D: int, plan: WalkPlan, num_private: int, num_sink: int, retrieved: int,
                  window: int, page_size: int) -> dict[str, int]:
    """Elements of each work buffer one sparse layer's step needs for `rows` (request, KV
    head) rows (see the wrappers); "tops" holds two levels' kept-node lists (one read
    while the next is written). The pages left out, where they join the attention, need
    attention.rest_scratch_sizes as well."""
    GP = row_tile(G)
    widest = max(plan.widest_level, plan.widest_pages + num_private)
    blocks = triton.cdiv(num_sink, page_size) + retrieved + triton.cdiv(window, page_size)
    return {"raw": rows * G * widest, "cand": rows * widest, "parts": rows * triton.cdiv(widest, BLOCK) * GP * 2,
            "tops": 2 * rows * plan.width, "att_parts": rows * blocks * GP * 2, "att_acc": rows * blocks * GP * D}


# ---------------------------------------------------------------------------- top-k by threshold
@triton.jit
def kth_largest(x, k):
    """The k-th largest of x (fp32, any shape) as an order-preserving int key, found by
    bisecting the 32-bit key range: 32 passes over registers instead of a sort. Keep
    `sort_key(x) >= result`: exactly the top k unless values tie at the threshold."""
    key = sort_key(x)
    lo = tl.full((), -2147483648, tl.int64)
    hi = tl.full((), 2147483647, tl.int64)
    for _ in tl.static_range(32):
        mid = lo + (hi - lo + 1) // 2
        enough = tl.sum((key >= mid).to(tl.int32)) >= k
        lo = tl.where(enough, mid, lo)
        hi = tl.where(enough, hi, mid - 1)
    return lo


@triton.jit
def sort_key(x):
    """fp32 -> int64 with the same order (IEEE bits, negatives' magnitude bits flipped)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)


@triton.jit
def store_selected(out_ptr, selected, index, k, KW: tl.constexpr):
    """out[r] = index of the r-th selected element (ascending) for the first min(k,
    selected) slots of out's k, -1 in the rest (KW >= k, a power of two)."""
    pos = tl.cumsum(selected.to(tl.int32), axis=0) - 1
    tl.store(out_ptr + pos, index, mask=selected & (pos < k))
    slot = tl.arange(0, KW)
    chosen = tl.sum(selected.to(tl.int32), axis=0)
    tl.store(out_ptr + slot, tl.full((KW,), -1, tl.int32), mask=(slot >= chosen) & (slot < k))


@triton.jit
def lse_of_parts(part_ptr, h, num_parts, g, GP: tl.constexpr, CP: tl.constexpr):
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
def online_lse(m_run, l_run, est, ok):
    """Fold a [GP, BLOCK] tile of scores (valid where ok) into running (max, sum exp) per row."""
    m_new = tl.maximum(m_run, tl.max(est, axis=1))
    safe = tl.where(m_new > -float("inf"), m_new, 0.0)
    l_new = l_run * tl.exp(m_run - safe) + tl.sum(tl.where(ok, tl.exp(est - safe[:, None]), 0.0), axis=1)
    return m_new, l_new


@triton.jit
def head_scores(q_ptr, h, k, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr):
    """Scores [GP, n] (fp32, rows >= G zero) of row h's G query heads (q [rows, G, D]) against
    keys k [n, D] (fp32): per query head, a product and a sum over D. Not tl.dot: its exact
    fp32 path (input_precision="ieee") pads the G heads of a KV group to 16 rows and, on an
    H200, made the re-ranking's page scores 5-7x slower (17.8 -> 4.7 us a layer for 8 rows
    of 96 pages, 251 -> 39 us for 128 rows); the sums are exact fp32 as well."""
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    s = tl.zeros((GP, k.shape[0]), dtype=tl.float32)
    for head in tl.static_range(G):
        qh = tl.load(q_ptr + (h * G + head) * D + d).to(tl.float32)
        s = tl.where(g[:, None] == head, tl.sum(k * qh[None, :], axis=1)[None, :], s)
    return s


@triton.jit
def head_weighted_sums(p, v, G: tl.constexpr, GP: tl.constexpr):
    """[GP, D] (rows >= G zero): for each of the G query heads, its weights p[head] [n] times
    values v [n, D] (fp32), summed over n; head_scores' reason for not using tl.dot."""
    g = tl.arange(0, GP)
    acc = tl.zeros((GP, v.shape[1]), dtype=tl.float32)
    for head in tl.static_range(G):
        ph = tl.sum(tl.where(g[:, None] == head, p, 0.0), axis=0)
        acc = tl.where(g[:, None] == head, tl.sum(ph[:, None] * v, axis=0)[None, :], acc)
    return acc


ROW_PROGRAMS = 2048  # candidate-scoring programs a batch is spread over (before the worst row's chunks are)


_LAUNCHED: dict[tuple, tuple[tuple, dict]] = {}  # a launch of each kernel and fixed constexprs, for precompile()


def launch(kernel, grid: tuple, args: tuple, constexprs: dict) -> None:
    """Launch, remembering the argument types of the first launch of each variant family
    (pointers by dtype, so no tensor is kept alive)."""
    varying = ("KP", "NB", "CP", "RP", "OTHERS", "OWN", "num_warps")
    family = (kernel, tuple(sorted((k, v) for k, v in constexprs.items() if k not in varying)),
              tuple(a.dtype if isinstance(a, torch.Tensor) else type(a) for a in args))
    if family not in _LAUNCHED:
        _LAUNCHED[family] = (tuple(a.dtype if isinstance(a, torch.Tensor) else a for a in args), constexprs)
    kernel[grid](*args, **constexprs)


def powers(low: int, high: int) -> list[int]:
    return [1 << i for i in range(low.bit_length() - 1, max(low, high).bit_length())]


VARIANTS: dict[object, Callable[[tuple, dict, list[int], int], list[dict]]] = {}
"""kernel -> (its first launch's args, constexprs, the walk's KP values, widest row) -> the
constexprs of every variant other contexts and batch sizes can launch (set by the kernel's file)."""


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
        if kernel in VARIANTS:
            jobs += [(kernel, args, c) for c in VARIANTS[kernel](args, constexprs, kps, widest)]
    for kernel, args, constexprs in jobs:
        kernel.warmup(*args, grid=(1,), **constexprs)
    return len(jobs)


def programs_per_row(rows: int, widest: int) -> int:
    """Programs per row of the candidate scorers: every chunk of the widest row its own
    program while the batch is small, fewer (each looping over several) when it is big."""
    return max(1, min(triton.cdiv(widest, BLOCK), triton.cdiv(ROW_PROGRAMS, rows)))

