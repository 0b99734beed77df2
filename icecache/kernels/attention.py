"""Decode attention: a sparse layer's (sinks + selected pages + window, flash-decoding over
blocks of a page) and a dense layer's (a shared context read once for the whole batch, then
each request's own tokens)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import triton
import triton.language as tl

from icecache.kernels.common import (VARIANTS, check_contiguous, head_scores, head_weighted_sums, launch, powers,
                                     row_tile)
from icecache.store import shared_rows

@triton.jit(do_not_specialize=['num_sink', 'R', 'n_shared', 'head_tokens', 'n_private', 'W', 'blocks'])
def _sparse_attention(q_ptr, sink_k_ptr, sink_v_ptr, ids_ptr, shared_k_ptr, shared_v_ptr, shared_valid_ptr,
                      shared_at_ptr, priv_k_ptr, priv_v_ptr, pvalid_ptr, win_k_ptr, win_v_ptr, count_ptr, mean_k_ptr,
                      mean_v_ptr, part_ptr, acc_ptr, num_sink, R, n_shared, head_tokens, n_private, W, blocks, scaling,
                      HS, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, P: tl.constexpr,
                      SINK_BLOCKS: tl.constexpr, REST: tl.constexpr):
    """One block of P keys per program (a sink block, a selected page, or a window
    block): partial softmax (max, sum) and weighted values for flash-decoding's merge.
    Shared pages are read where they lie (a UVA view of host memory on CUDA, or a device
    copy): page p of KV head hs is the shared_valid[hs, p] token rows from shared_at[hs, p]
    of that head's head_tokens rows. Row h: sinks and shared pages of KV head h % HS, the
    rest of request h // HS's row. Its partials are blocks 0.. of the row's `blocks`.
    REST: every shared page also counts once by its means (_rest_partials, for the whole
    batch), so a retrieved page takes its own mean key's term out of its partial: its
    tokens stand in for it. The term is scored as the rest's is (q in the means' dtype,
    exact products), so the two cancel to fp32 rounding."""
    h, b = tl.program_id(0), tl.program_id(1)
    hs = h % HS
    g = tl.arange(0, GP)
    d = tl.arange(0, D)
    t = tl.arange(0, P)
    absent = False  # a page slot the row leaves empty (-1): its partial is empty, nothing to score
    if b < SINK_BLOCKS:
        tok = b * P + t
        ok = tok < num_sink
        rows = (hs * num_sink + tok[:, None]) * D + d[None, :]
        k = tl.load(sink_k_ptr + rows, mask=ok[:, None], other=0.0).to(tl.float32)
        v = tl.load(sink_v_ptr + rows, mask=ok[:, None], other=0.0).to(tl.float32)
    elif b < SINK_BLOCKS + R:
        page = tl.load(ids_ptr + h * R + b - SINK_BLOCKS)
        absent = page < 0
        if absent:
            ok = t < 0
            k = tl.zeros((P, D), tl.float32)
            v = tl.zeros((P, D), tl.float32)
        elif page < n_shared:
            ok = t < tl.load(shared_valid_ptr + hs * n_shared + page)
            first = (hs * head_tokens + tl.load(shared_at_ptr + hs * n_shared + page)).to(tl.int64)
            rows = (first + t[:, None]) * D + d[None, :]
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
    if absent:  # (with the share split half a row's slots may be: scoring zeros cost as much as a page)
        m = tl.full((GP,), -float("inf"), tl.float32)
        l = tl.zeros((GP,), tl.float32)
        acc = tl.zeros((GP, D), tl.float32)
    else:
        s = head_scores(q_ptr, h, k, G, GP, D) * scaling  # [GP, P]
        s = tl.where(ok[None, :], s, -float("inf"))
        m = tl.max(s, axis=1)
        safe = tl.where(m > -float("inf"), m, 0.0)
        p = tl.where(ok[None, :], tl.exp(s - safe[:, None]), 0.0)
        acc = head_weighted_sums(p, v, G, GP)  # [GP, D]
        l = tl.sum(p, axis=1)
    if REST:
        if (b >= SINK_BLOCKS) & (b < SINK_BLOCKS + R):
            retrieved = tl.load(ids_ptr + h * R + b - SINK_BLOCKS)
            if (retrieved >= 0) & (retrieved < n_shared):
                n = tl.load(shared_valid_ptr + hs * n_shared + retrieved)
                if n > 0:  # tokens, so m is finite; an empty page has no mean term to take out
                    at = (hs * n_shared + retrieved).to(tl.int64) * D + d
                    mean_k = tl.load(mean_k_ptr + at)
                    q = tl.load(q_ptr + (h * G + g[:, None]) * D + d[None, :], mask=g[:, None] < G, other=0.0)
                    q = q.to(mean_k.dtype).to(tl.float32)
                    term = tl.sum(q * mean_k.to(tl.float32)[None, :], axis=1) * scaling + tl.log(n.to(tl.float32))
                    top = tl.maximum(m, term)
                    keep, drop = tl.exp(m - top), tl.exp(term - top)
                    mean_v = tl.load(mean_v_ptr + at).to(tl.float32)
                    acc = acc * keep[:, None] - drop[:, None] * mean_v[None, :]
                    l = l * keep - drop  # >= 0 but for rounding: a page's mass is at least its mean term's (Jensen)
                    m = top
    base = (h * blocks + b) * GP + g
    tl.store(part_ptr + base * 2, m)
    tl.store(part_ptr + base * 2 + 1, l)
    tl.store(acc_ptr + base[:, None] * D + d[None, :], acc)


MERGE_PARTS = 32  # partials a merge (sparse or dense) reads at once (64 spill registers on sm_90)


@triton.jit(do_not_specialize=['blocks', 'splits', 'rows_pad'])
def _merge_attention(part_ptr, acc_ptr, rest_part_ptr, rest_acc_ptr, out_ptr, blocks, splits, rows_pad, HS,
                     G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, SC: tl.constexpr, REST: tl.constexpr):
    """out[h, g] = sum_b e^(m_b - M) acc_b / sum_b e^(m_b - M) l_b over row h's `blocks`
    partials (_sparse_attention's) and, with REST, the rest's `splits` partials of its
    query row (_rest_partials' layout: _prefix_attention's). One program per query row, its
    partials read SC at a time (not one after another: a row's 16-50 partials walked in
    turn cost ~0.8 us each on an H200)."""
    h, g = tl.program_id(0), tl.program_id(1)
    d = tl.arange(0, D)
    m_run = tl.full([], -float("inf"), tl.float32)
    l_run = tl.full([], 0.0, tl.float32)
    acc = tl.zeros((D,), tl.float32)
    for s0 in range(0, blocks, SC):
        sc = s0 + tl.arange(0, SC)
        m_run, l_run, acc = _fold_cells(m_run, l_run, acc, part_ptr, acc_ptr, (h * blocks + sc) * GP + g,
                                        sc < blocks, D)
    if REST:
        for s0 in range(0, splits, SC):
            sc = s0 + tl.arange(0, SC)
            cell = ((h % HS) * splits + sc) * rows_pad + (h // HS) * G + g
            m_run, l_run, acc = _fold_cells(m_run, l_run, acc, rest_part_ptr, rest_acc_ptr, cell, sc < splits, D)
    out = acc / tl.where(l_run > 0, l_run, 1.0)
    tl.store(out_ptr + (h * G + g) * D + d, out.to(out_ptr.dtype.element_ty))


def sparse_attention(q: torch.Tensor, sink_k: torch.Tensor, sink_v: torch.Tensor, page_ids: torch.Tensor,
                     shared_k: torch.Tensor, shared_v: torch.Tensor, shared_valid: torch.Tensor,
                     priv_k: torch.Tensor, priv_v: torch.Tensor, priv_valid: torch.Tensor, win_k: torch.Tensor,
                     win_v: torch.Tensor, counts: torch.Tensor, scaling: float, scratch: Mapping[str, torch.Tensor],
                     out: torch.Tensor, shared_at: torch.Tensor | None = None,
                     rest: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Decode attention of q [H, G, D] (any float dtype; H = B * HS rows: B requests, HS KV heads)
    over the shared sinks [HS, S, D], the pages page_ids [H, R] (< N: shared, else the
    row's private [H, M, P, D]; -1 = none) and the row's window ring [H, W, D] holding
    min(counts[b, 0] + 1, W) tokens. -> out [H, G, D]. Shared pages: shared_k/v [HS, N, P, D]
    (shared_at None), or token rows [HS, T, D] where page p of head hs starts at row
    shared_at[hs, p] (store.page_rows), with shared_valid [HS, N] tokens. rest: the shared
    pages' (key means, value means) [HS, N, D]: the pages a row does not retrieve join its
    softmax each as one key (IceCacheConfig.unselected). scratch: fp32 work buffers
    "att_parts", "att_acc" (common.scratch_sizes) and, with rest, "rest_parts", "rest_acc"
    (rest_scratch_sizes)."""
    shared_k, shared_v, shared_at = shared_rows(shared_k, shared_v, shared_valid, shared_at)
    check_contiguous(q, sink_k, sink_v, page_ids, shared_k, shared_v, shared_valid, shared_at, priv_k, priv_v,
                     priv_valid, win_k, win_v, *(rest or ()))
    H, G, D = q.shape
    P = priv_k.shape[2]
    R = page_ids.shape[1]
    W = win_k.shape[1]
    HS, N = shared_valid.shape
    GP = row_tile(G)
    sink_blocks = triton.cdiv(sink_k.shape[1], P)
    blocks = sink_blocks + R + triton.cdiv(W, P)
    parts, acc = scratch["att_parts"], scratch["att_acc"]
    mean_k, mean_v = rest if rest is not None else (parts, parts)  # not read without REST
    _sparse_attention[(H, blocks)](q, sink_k, sink_v, page_ids, shared_k, shared_v, shared_valid, shared_at, priv_k,
                                   priv_v, priv_valid, win_k, win_v, counts, mean_k, mean_v, parts, acc,
                                   sink_k.shape[1], R, N, shared_k.shape[1], priv_k.shape[1], W, blocks, scaling, HS,
                                   G=G, GP=GP, D=D, P=P, SINK_BLOCKS=sink_blocks, REST=rest is not None)
    splits, rows_pad = 0, 0
    rest_parts, rest_acc = parts, acc  # not read without REST
    if rest is not None:
        rest_parts, rest_acc = scratch["rest_parts"], scratch["rest_acc"]
        splits, rows_pad = _rest_partials(q.view(H // HS, HS, G, D), mean_k, mean_v, shared_valid, scaling,
                                          rest_parts, rest_acc)
    _merge_attention[(H, G)](parts, acc, rest_parts, rest_acc, out, blocks, splits, rows_pad, HS, G=G, GP=GP, D=D,
                             SC=MERGE_PARTS, REST=rest is not None)
    return out


REST_PROGRAMS = 256  # programs a layer's page means are spread over (each a few tiles: the merge reads each partial)


def _rest_partials(q: torch.Tensor, mean_k: torch.Tensor, mean_v: torch.Tensor, valid: torch.Tensor, scaling: float,
                   parts: torch.Tensor, acc: torch.Tensor) -> tuple[int, int]:
    """Every shared page as one key for all B requests at once (q [B, HS, G, D]): its keys'
    mean [HS, N, D], scored + log(its tokens), carrying its values' mean; the context the
    whole batch shares, so each KV head's means are read once a step, as a dense layer's
    context is (_prefix_attention). -> (splits, padded rows) of the partials' layout."""
    B, HS, G, D = q.shape
    RP, tiles, splits, span = dense_plan(B, HS, G, valid.shape[1], REST_PROGRAMS)
    launch(_prefix_attention, (tiles, splits, HS),
           (q, mean_k, mean_v, parts, acc, valid.shape[1], B * G, span, scaling, HS, valid, HS * G * D, D),
           dict(G=G, D=D, RP=RP, BLOCK=BLOCK_KEYS, LOW=mean_k.dtype != torch.float32, COUNTS=True))
    return splits, tiles * RP


def rest_scratch_sizes(max_batch: int, HS: int, G: int, D: int, shared_pages: int) -> dict[str, int]:
    """Work buffers of the rest's partials (sparse_attention with rest) for any batch up to max_batch."""
    return _plan_cells(max_batch, HS, G, D, shared_pages, REST_PROGRAMS, "rest")


# ---------------------------------------------------------------------------- dense layers
BLOCK_KEYS = 64  # context keys per inner step of the shared-context attention
_PREFIX_PROGRAMS = 1024  # programs to spread a context's keys over (several waves on a big GPU)


def dense_plan(batch: int, HS: int, G: int, n: int, programs: int = _PREFIX_PROGRAMS) -> tuple[int, int, int, int]:
    """(rows per program, row tiles, splits, keys per split) of _prefix_attention's grid over
    n keys shared by `batch` requests, spread over about `programs` programs."""
    rows = batch * G
    RP = min(64, max(16, triton.next_power_of_2(rows)))
    tiles = triton.cdiv(rows, RP)
    splits = max(1, min(triton.cdiv(n, BLOCK_KEYS), triton.cdiv(programs, HS * tiles)))
    span = triton.cdiv(triton.cdiv(max(n, 1), splits), BLOCK_KEYS) * BLOCK_KEYS
    return RP, tiles, triton.cdiv(max(n, 1), span), span


def _plan_cells(max_batch: int, HS: int, G: int, D: int, n: int, programs: int, name: str) -> dict[str, int]:
    cells = max(HS * s * t * rp for rp, t, s, _ in (dense_plan(b, HS, G, n, programs) for b in range(1, max_batch + 1)))
    return {f"{name}_parts": cells * 2, f"{name}_acc": cells * D}


def dense_scratch_sizes(max_batch: int, HS: int, G: int, D: int, n: int) -> dict[str, int]:
    """Work buffers of dense_attention for any batch up to max_batch."""
    return _plan_cells(max_batch, HS, G, D, n, _PREFIX_PROGRAMS, "dense")


@triton.jit(do_not_specialize=['n', 'rows', 'span'])
def _prefix_attention(q_ptr, k_ptr, v_ptr, part_ptr, acc_ptr, n, rows, span, scaling, HS, count_ptr, q_sb, q_sr,
                      G: tl.constexpr, D: tl.constexpr, RP: tl.constexpr, BLOCK: tl.constexpr, LOW: tl.constexpr,
                      COUNTS: tl.constexpr = False):
    """Flash-decoding over a context's keys [HS, n, D] that every request shares: program
    (row tile t, split s, KV head h) takes the query rows r = b * G + g of all requests b
    in tile t and the keys of split s, so a key block is read once for the whole batch.
    Request b's query head h * G + g is at q + b * q_sb + (h * G + g) * q_sr (a decode step's
    [B, HS, G, D], or a prefill's [Hq, T, D] rows as they lie: T requests of one token).
    -> per row (max, sum exp) into part and the weighted values into acc. LOW: a bf16/fp16
    context is multiplied on tensor cores in its own dtype (fp32 sums), as flash attention does.
    COUNTS: key j of head h stands for count[h, j] tokens (log of it added to its score; none
    when 0): the keys are pages' means (sparse_attention's rest)."""
    t, s, h = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    r = t * RP + tl.arange(0, RP)
    d = tl.arange(0, D)
    b, g = r // G, r % G
    q = tl.load(q_ptr + (b * q_sb + (h * G + g) * q_sr)[:, None] + d[None, :], mask=(r < rows)[:, None], other=0.0)
    q = q.to(k_ptr.dtype.element_ty) if LOW else q.to(tl.float32)  # once, not at every key block
    m_run = tl.full((RP,), -float("inf"), tl.float32)
    l_run = tl.zeros((RP,), tl.float32)
    acc = tl.zeros((RP, D), tl.float32)
    end = tl.minimum(s * span + span, n)
    for k0 in range(s * span, end, BLOCK):
        tok = k0 + tl.arange(0, BLOCK)
        ok = tok < end
        if COUNTS:
            count = tl.load(count_ptr + h * n + tok, mask=ok, other=0)
            ok = count > 0
        at = (h * n + tok[:, None]) * D + d[None, :]
        k = tl.load(k_ptr + at, mask=ok[:, None], other=0.0)
        v = tl.load(v_ptr + at, mask=ok[:, None], other=0.0)
        if LOW:
            sc = tl.dot(q, tl.trans(k)) * scaling
        else:
            sc = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee") * scaling
        if COUNTS:
            sc = sc + tl.log(tl.maximum(count, 1).to(tl.float32))[None, :]
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
        m_run, l_run, acc = _fold_cells(m_run, l_run, acc, part_ptr, acc_ptr, (h * splits + sc) * rows_pad + b * G + g,
                                        sc < splits, D)
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


@triton.jit
def _fold_cells(m_run, l_run, acc, part_ptr, acc_ptr, cell, ok, D: tl.constexpr):
    """Fold the partials at `cell` (where ok) of a (max, sum exp) part / weighted values acc
    layout into one row's running (max, sum exp, weighted values)."""
    d = tl.arange(0, D)
    m = tl.load(part_ptr + cell * 2, mask=ok, other=-float("inf"))
    l = tl.load(part_ptr + cell * 2 + 1, mask=ok, other=0.0)
    part = tl.load(acc_ptr + cell[:, None] * D + d[None, :], mask=ok[:, None], other=0.0)
    return _fold_partials(m_run, l_run, acc, m, l, part)


def dense_attention(q: torch.Tensor, ctx_k: torch.Tensor, ctx_v: torch.Tensor, own_k: torch.Tensor,
                    own_v: torch.Tensor, counts: torch.Tensor, scaling: float, parts: torch.Tensor,
                    acc: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Exact decode attention of B requests over a context they share plus their own tokens.

    q: [B, HS, G, D] (any float dtype); ctx_k/v: [HS, n, D], read once for the whole batch; own_k/v:
    [>= B, HS, T, D] the requests' own tokens, of which counts[b] + 1 are filled (this
    step's token at counts[b]); parts/acc: fp32 scratch (dense_scratch_sizes). -> out
    [B, HS, G, D]."""
    check_contiguous(q, ctx_k, ctx_v, own_k, own_v, counts)
    B, HS, G, D = q.shape
    n, T = ctx_k.shape[1], own_k.shape[2]
    RP, tiles, splits, span = dense_plan(B, HS, G, n)
    launch(_prefix_attention, (tiles, splits, HS),
           (q, ctx_k, ctx_v, parts, acc, n, B * G, span, scaling, HS, counts, HS * G * D, D),
           dict(G=G, D=D, RP=RP, BLOCK=BLOCK_KEYS, LOW=ctx_k.dtype != torch.float32))
    _dense_merge[(B * HS, G)](q, parts, acc, own_k, own_v, counts, out, splits, tiles * RP, T, scaling, HS, G=G, D=D,
                              SC=MERGE_PARTS, BLOCK=BLOCK_KEYS)
    return out


def prefix_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling: float,
                         others: Sequence[tuple[torch.Tensor, torch.Tensor]] = (),
                         own: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """A prefill's few rows over a context's keys, with their log-sum-exp (the non-causal
    case of attention.attention_lse), as flash-decoding: q [Hq, T, D], k/v [HS, n, D], n > 0
    -> (out [Hq, T, D] in q's dtype, lse [Hq, T] fp32). The T tokens are _prefix_attention's
    requests and a KV head's query heads its G rows, so nothing is compiled or planned per
    question length or context length (cuDNN's fused attention builds a plan for every new
    shape, ~36 ms on an H200: every question of a length not seen before paid it), and the
    keys are split over the whole GPU however few the rows (a flash kernel's grid is row
    blocks x heads: 16 programs for a 20-token question).

    others: up to two parts of the same rows over other keys, (out [Hq, T, D], lse [Hq, T])
    as attention_lse gives them (any strides, the last dim's 1): `out` is then the attention
    over the context and them together (attention.merge_attention of them all), while `lse`
    stays the context's alone (what a question's pages are picked by). The split-key partials
    are merged, and the other parts folded in, by one more kernel (two launches in all, where
    the torch merge took ~25 a layer: a question's prefill is bound by its launches). `out`
    is a view of a [T, Hq, D] tensor, the layout the model's output projection reads.

    own: (own_k, own_v [HS, T, D], any strides, the last dim's 1; start [T] int32): the rows'
    own keys, row t attending causally to start[t] .. t of them (its question's tokens so
    far), folded in by the same merge kernel: the causal part of a pack of questions without
    a flash call of its own (and the copies that repeat its keys for every query head)."""
    Hq, T, D = q.shape
    HS, n = k.shape[:2]
    G = Hq // HS
    if len(others) > 2:
        raise ValueError(f"prefix_attention_lse folds in at most two other parts, got {len(others)}")
    if q.stride(2) != 1:
        q = q.contiguous()
    k, v = k.contiguous(), v.contiguous()
    RP, tiles, splits, span = dense_plan(T, HS, G, n)
    parts = torch.empty(HS, splits, tiles * RP, 2, dtype=torch.float32, device=q.device)
    acc = torch.empty(HS, splits, tiles * RP, D, dtype=torch.float32, device=q.device)
    launch(_prefix_attention, (tiles, splits, HS),
           (q, k, v, parts, acc, n, T * G, span, scaling, HS, parts, q.stride(1), q.stride(0)),
           dict(G=G, D=D, RP=RP, BLOCK=BLOCK_KEYS, LOW=k.dtype != torch.float32))
    out = torch.empty(T, Hq, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(Hq, T, dtype=torch.float32, device=q.device)
    folded = []
    for part_out, part_lse in others:
        if part_out.shape != q.shape or part_lse.shape != (Hq, T):
            raise ValueError(f"a part to fold in must be out {tuple(q.shape)} and lse {(Hq, T)}, "
                             f"got {tuple(part_out.shape)} and {tuple(part_lse.shape)}")
        part_out = part_out if part_out.stride(2) == 1 else part_out.contiguous()
        part_lse = part_lse.float() if part_lse.stride(1) == 1 else part_lse.float().contiguous()
        folded.append((part_out, part_lse))
    while len(folded) < 2:  # unread (OTHERS), any tensors
        folded.append((out, lse))
    (o1, l1), (o2, l2) = folded
    own_k, own_v, start = own if own is not None else (k, v, _no_rows(q.device))  # unread without own (OWN)
    if own is not None:
        if own_k.shape != (HS, T, D) or own_v.shape != (HS, T, D) or start.shape != (T,):
            raise ValueError(f"own keys must be [{HS}, {T}, {D}] with a start [{T}] a row, got "
                             f"{tuple(own_k.shape)}, {tuple(own_v.shape)}, {tuple(start.shape)}")
        own_k = own_k if own_k.stride(2) == 1 else own_k.contiguous()
        own_v = own_v if own_v.stride(2) == 1 else own_v.contiguous()
    launch(_prefix_merge, (T, HS, G),
           (parts, acc, o1, l1, o2, l2, out, lse, q, own_k, own_v, start, splits, tiles * RP, T, o1.stride(0),
            o1.stride(1), l1.stride(0), o2.stride(0), o2.stride(1), l2.stride(0), q.stride(0), q.stride(1),
            own_k.stride(0), own_k.stride(1), own_v.stride(0), own_v.stride(1), scaling, HS),
           dict(G=G, D=D, SC=MERGE_PARTS, OTHERS=len(others), OWN=own is not None, BLOCK=OWN_KEYS))
    return out.transpose(0, 1), lse


_NO_ROWS: dict[torch.device, torch.Tensor] = {}


def _no_rows(device: torch.device) -> torch.Tensor:
    """An int32 tensor standing for the own keys' row starts where there are none: the same
    argument types with and without, so precompile()'s variants are the ones launched."""
    if device not in _NO_ROWS:
        _NO_ROWS[device] = torch.zeros(1, dtype=torch.int32, device=device)
    return _NO_ROWS[device]


OWN_KEYS = 32  # a row's own keys per step of _prefix_merge (at 64 it spills 48 bytes a thread on sm_90)


@triton.jit(do_not_specialize=['splits', 'rows_pad', 'T', 'l1_sh', 'l2_sh'])  # l*_sh: T too
def _prefix_merge(part_ptr, acc_ptr, o1_ptr, l1_ptr, o2_ptr, l2_ptr, out_ptr, lse_ptr, q_ptr, own_k_ptr, own_v_ptr,
                  start_ptr, splits, rows_pad, T, o1_sh, o1_st, l1_sh, o2_sh, o2_st, l2_sh, q_sh, q_st, k_sh, k_st,
                  v_sh, v_st, scaling, HS, G: tl.constexpr, D: tl.constexpr, SC: tl.constexpr, OTHERS: tl.constexpr,
                  OWN: tl.constexpr, BLOCK: tl.constexpr):
    """Program (token t, KV head h, query head j of the group): row t * G + j of the context's
    split partials (_prefix_attention's) merged, SC at a time; its log-sum-exp over the
    context -> lse[h * G + j, t]; then OTHERS parts over other keys, each an (out, lse) of
    the row, folded in as one key of weight e^lse carrying out; with OWN, the row's own keys
    start[t] .. t (own_k / own_v of KV head h, causal), BLOCK at a time. -> out[t, h * G + j]."""
    t, h, j = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    d = tl.arange(0, D)
    head = h * G + j
    m_run = tl.full([], -float("inf"), tl.float32)
    l_run = tl.full([], 0.0, tl.float32)
    acc = tl.zeros((D,), tl.float32)
    for s0 in range(0, splits, SC):
        sc = s0 + tl.arange(0, SC)
        m_run, l_run, acc = _fold_cells(m_run, l_run, acc, part_ptr, acc_ptr, (h * splits + sc) * rows_pad + t * G + j,
                                        sc < splits, D)
    tl.store(lse_ptr + head * T + t, m_run + tl.log(l_run))  # every split holds keys: finite
    if OTHERS >= 1:
        m_run, l_run, acc = _fold_row(m_run, l_run, acc, tl.load(l1_ptr + head * l1_sh + t),
                                      tl.load(o1_ptr + head * o1_sh + t * o1_st + d).to(tl.float32))
    if OTHERS >= 2:
        m_run, l_run, acc = _fold_row(m_run, l_run, acc, tl.load(l2_ptr + head * l2_sh + t),
                                      tl.load(o2_ptr + head * o2_sh + t * o2_st + d).to(tl.float32))
    if OWN:
        q = tl.load(q_ptr + head * q_sh + t * q_st + d).to(tl.float32)
        for k0 in range(tl.load(start_ptr + t), t + 1, BLOCK):
            tok = k0 + tl.arange(0, BLOCK)
            ok = tok <= t
            k = tl.load(own_k_ptr + h * k_sh + tok[:, None] * k_st + d[None, :], mask=ok[:, None], other=0.0)
            v = tl.load(own_v_ptr + h * v_sh + tok[:, None] * v_st + d[None, :], mask=ok[:, None], other=0.0)
            sc = tl.where(ok, tl.sum(q[None, :] * k.to(tl.float32), axis=1) * scaling, -float("inf"))
            m_run, l_run, acc = _fold_partials(m_run, l_run, acc, sc, ok.to(tl.float32), v.to(tl.float32))
    out = acc / tl.where(l_run > 0, l_run, 1.0)
    tl.store(out_ptr + (t * HS * G + head) * D + d, out.to(out_ptr.dtype.element_ty))


@triton.jit
def _fold_row(m_run, l_run, acc, lse, out):
    """Fold a part's (lse, out [D]) of one row, a key of weight e^lse carrying out, into
    the row's running (max, sum exp, weighted values); lse -inf: a part with no keys."""
    m_new = tl.maximum(m_run, lse)
    safe = tl.where(m_new > -float("inf"), m_new, 0.0)
    alpha = tl.where(m_run > -float("inf"), tl.exp(m_run - safe), 0.0)
    w = tl.where(lse > -float("inf"), tl.exp(lse - safe), 0.0)
    return m_new, l_run * alpha + w, acc * alpha + w * out


VARIANTS[_prefix_attention] = lambda args, constexprs, kps, widest: [{**constexprs, "RP": rp} for rp in powers(16, 64)]
# a pack with and without an earlier chunk's part (a long question's last chunk), on one document or several
VARIANTS[_prefix_merge] = lambda args, constexprs, kps, widest: [{**constexprs, "OTHERS": o, "OWN": own}
                                                                 for o in (0, 1, 2) for own in (False, True)]
