"""Fused Triton kernels for the model's own small ops in a decode step: RMSNorm and
rotary embedding, one kernel each instead of the 7 and 10 that transformers' modules
launch. At batch 1 a decode step is hundreds of such tiny kernels, and inside a CUDA
graph each still costs a launch slot, so they are a visible share of a token's time.

Both round where transformers rounds (after each bf16 product), so they give the same
values as the modules they replace; tests/icecache/test_kernels.py checks that.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm(x_ptr, w_ptr, out_ptr, n, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    i = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * n + i, mask=i < n, other=0.0).to(tl.float32)
    var = tl.sum(x * x, axis=0) / n
    y = (x * tl.rsqrt(var + eps)).to(out_ptr.dtype.element_ty)  # hidden.to(input_dtype)
    w = tl.load(w_ptr + i, mask=i < n, other=0.0)
    tl.store(out_ptr + row * n + i, (w * y).to(out_ptr.dtype.element_ty), mask=i < n)


def can_fuse_norm(module: torch.nn.Module, x: torch.Tensor) -> bool:
    """A transformers RMSNorm (weight * normalised x, no offset) in the input's dtype."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")
            and weight is not None and weight.dtype == x.dtype)


def rms_norm(x: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    """module(x) for an RMSNorm module, over the last dim of x (contiguous)."""
    n = x.shape[-1]
    out = torch.empty_like(x)
    _rms_norm[(x.numel() // n,)](x, module.weight, out, n, module.variance_epsilon,
                                 BLOCK=triton.next_power_of_2(n), num_warps=4 if n <= 2048 else 8)
    return out


@triton.jit
def _rotate(x, x_rot, cos, sin, dtype, ROUND: tl.constexpr):
    """x * cos + x_rot * sin, rounded to dtype after each product and the sum as torch
    rounds a bf16/fp16 expression (to nearest even)."""
    if ROUND:
        a = (x * cos).to(dtype, fp_downcast_rounding="rtne").to(tl.float32)
        b = (x_rot * sin).to(dtype, fp_downcast_rounding="rtne").to(tl.float32)
        out = (a + b).to(dtype, fp_downcast_rounding="rtne")
    else:
        out = (x * cos + x_rot * sin).to(dtype)
    return out


@triton.jit
def _rope(q_ptr, k_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr, num_q, num_k, D: tl.constexpr, ROUND: tl.constexpr):
    """x * cos + rotate_half(x) * sin for one head row of token t; rotate_half(x) = [-x2, x1]."""
    t, r = tl.program_id(0), tl.program_id(1)
    d = tl.arange(0, D)
    partner = (d + D // 2) % D
    sign = tl.where(d < D // 2, -1.0, 1.0)
    cos = tl.load(cos_ptr + t * D + d).to(tl.float32)
    sin = tl.load(sin_ptr + t * D + d).to(tl.float32)
    dtype = q_out_ptr.dtype.element_ty
    if r < num_q:
        row = (t * num_q + r) * D
        x = tl.load(q_ptr + row + d).to(tl.float32)
        x_rot = tl.load(q_ptr + row + partner).to(tl.float32) * sign
        tl.store(q_out_ptr + row + d, _rotate(x, x_rot, cos, sin, dtype, ROUND))
    else:
        row = (t * num_k + r - num_q) * D
        x = tl.load(k_ptr + row + d).to(tl.float32)
        x_rot = tl.load(k_ptr + row + partner).to(tl.float32) * sign
        tl.store(k_out_ptr + row + d, _rotate(x, x_rot, cos, sin, dtype, ROUND))


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' apply_rotary_pos_emb for B tokens: q [B, Hq, D], k [B, Hk, D]
    (contiguous), cos/sin [B, D] in their dtype. -> (q, k) rotated, new tensors."""
    assert q.is_contiguous() and k.is_contiguous() and cos.is_contiguous() and sin.is_contiguous()
    assert cos.dtype == q.dtype == k.dtype, "rope: q, k and cos/sin must share a dtype"
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    B, Hq, D = q.shape
    _rope[(B, Hq + k.shape[1])](q, k, cos, sin, q_out, k_out, Hq, k.shape[1], D=D, ROUND=q.dtype != torch.float32)
    return q_out, k_out
