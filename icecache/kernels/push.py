"""The decode step's push: the new token into the window ring, the token it replaces into
the row's private pages (their boxes and moments kept up to date)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from icecache.kernels.common import check_contiguous

@triton.jit(do_not_specialize=['W', 'n_private'])
def _push(k_ptr, v_ptr, win_k_ptr, win_v_ptr, count_ptr, priv_k_ptr, priv_v_ptr, pvalid_ptr, plo_ptr, phi_ptr,
          pmean_ptr, pvar_ptr, W, n_private, HS, D: tl.constexpr, P: tl.constexpr):
    """Put the new token in the window ring; once the ring is full, the token it
    replaces moves to the next private page slot, whose box and moments it joins
    (index.tree.welford). Row h is
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
        key = old_k.to(tl.float32)
        mean = tl.load(pmean_ptr + row).to(tl.float32)
        var = tl.load(pvar_ptr + row).to(tl.float32)
        size = (before + 1).to(tl.float32)
        delta = key - mean
        mean += delta / size
        tl.store(pmean_ptr + row, mean.to(pmean_ptr.dtype.element_ty))
        tl.store(pvar_ptr + row, (var + (delta * (key - mean) - var) / size).to(pvar_ptr.dtype.element_ty))
    tl.store(win_k_ptr + (h * W + slot) * D + d, tl.load(k_ptr + h * D + d))
    tl.store(win_v_ptr + (h * W + slot) * D + d, tl.load(v_ptr + h * D + d))


def push(k: torch.Tensor, v: torch.Tensor, win_k: torch.Tensor, win_v: torch.Tensor, counts: torch.Tensor,
         priv_k: torch.Tensor, priv_v: torch.Tensor, priv_valid: torch.Tensor, priv_lo: torch.Tensor,
         priv_hi: torch.Tensor, priv_mean: torch.Tensor, priv_var: torch.Tensor) -> None:
    """k, v: [H, D], H = B * HS rows (B requests, HS KV heads); win_k/v: [H, W, D];
    counts: [B, 2] (per request: tokens ever in the ring, tokens in private pages), read
    here and advanced by the caller once per step; priv_k/v: [H, M, P, D]; priv_valid:
    [H, M]; priv_lo/hi, priv_mean/var: [H, M, D] the private pages' boxes and moments (model dtype)."""
    check_contiguous(k, v, win_k, win_v, counts, priv_k, priv_v, priv_valid, priv_lo, priv_hi, priv_mean, priv_var)
    H, W, D = win_k.shape
    _push[(H,)](k, v, win_k, win_v, counts, priv_k, priv_v, priv_valid, priv_lo, priv_hi, priv_mean, priv_var,
                W, priv_k.shape[1], H // (counts.numel() // 2), D=D, P=priv_k.shape[2])
