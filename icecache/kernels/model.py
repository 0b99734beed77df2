"""Fused Triton kernels for the model's own small ops in a decode step: RMSNorm (alone
or after the residual add), rotary embedding and the MLP's silu(gate) * up, one kernel
each instead of the several that transformers' modules launch; and projections that share
an input merged into one weight (q/k/v, gate/up), so a step runs one GEMM for each group.
At batch 1 a decode step is hundreds of such tiny kernels, and inside a CUDA graph each
still costs a launch slot, so they are a visible share of a token's time.

Both round where transformers rounds (after each bf16 product), so they give the same
values as the modules they replace; tests/icecache/kernels/ checks that.
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
def _add_rms_norm(x_ptr, d_ptr, w_ptr, out_ptr, n, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    i = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * n + i, mask=i < n, other=0.0).to(tl.float32)
    x += tl.load(d_ptr + row * n + i, mask=i < n, other=0.0).to(tl.float32)
    x = x.to(x_ptr.dtype.element_ty, fp_downcast_rounding="rtne")  # the residual sum, as torch rounds it
    tl.store(x_ptr + row * n + i, x, mask=i < n)
    x = x.to(tl.float32)
    var = tl.sum(x * x, axis=0) / n
    y = (x * tl.rsqrt(var + eps)).to(out_ptr.dtype.element_ty)
    w = tl.load(w_ptr + i, mask=i < n, other=0.0)
    tl.store(out_ptr + row * n + i, (w * y).to(out_ptr.dtype.element_ty), mask=i < n)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    """x += delta (in place, rounded as torch rounds x + delta), then module(x) for an
    RMSNorm module; x and delta contiguous, of one shape and dtype."""
    assert x.is_contiguous() and delta.is_contiguous() and x.shape == delta.shape and x.dtype == delta.dtype
    n = x.shape[-1]
    out = torch.empty_like(x)
    _add_rms_norm[(x.numel() // n,)](x, delta, module.weight, out, n, module.variance_epsilon,
                                     BLOCK=triton.next_power_of_2(n), num_warps=4 if n <= 2048 else 8)
    return out


@triton.jit
def _silu_mul(x_ptr, out_ptr, inter, BLOCK: tl.constexpr, ROUND: tl.constexpr):
    """out[t] = silu(x[t, :inter]) * x[t, inter:], rounded after silu as torch's two ops are."""
    t, c = tl.program_id(0), tl.program_id(1)
    i = c * BLOCK + tl.arange(0, BLOCK)
    gate = tl.load(x_ptr + t * 2 * inter + i, mask=i < inter, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + t * 2 * inter + inter + i, mask=i < inter, other=0.0).to(tl.float32)
    act = gate / (1.0 + tl.exp(-gate))
    if ROUND:
        act = act.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne").to(tl.float32)
    tl.store(out_ptr + t * inter + i, (act * up).to(out_ptr.dtype.element_ty), mask=i < inter)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [..., 2 * inter] (gate first), contiguous. -> [..., inter]."""
    assert gate_up.is_contiguous()
    inter = gate_up.shape[-1] // 2
    rows = gate_up.numel() // (2 * inter)
    out = torch.empty(*gate_up.shape[:-1], inter, dtype=gate_up.dtype, device=gate_up.device)
    BLOCK = 1024
    _silu_mul[(rows, triton.cdiv(inter, BLOCK))](gate_up, out, inter, BLOCK=BLOCK, ROUND=gate_up.dtype != torch.float32)
    return out


def merge_linears(modules: list[torch.nn.Module]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """One weight (and bias) for Linear modules that read the same input: the modules'
    parameters become views into it, so the model's memory does not grow and the modules
    still work alone. -> (weight [sum of outputs, in], bias or None); None where the
    modules are not plain Linears of one dtype, device and input size (nothing changes)."""
    if not all(type(m) is torch.nn.Linear for m in modules):
        return None
    weights = [m.weight for m in modules]
    if len({(w.dtype, w.device, w.shape[1]) for w in weights}) != 1 or len({m.bias is None for m in modules}) != 1:
        return None
    merged = getattr(modules[0], "_icecache_merged", None)
    if merged is not None and merged[2] == len(modules) and _views_into(merged[0], weights):
        return merged[0], merged[1]
    with torch.no_grad():
        weight = torch.cat([w.detach() for w in weights])
        bias = None if modules[0].bias is None else torch.cat([m.bias.detach() for m in modules])
        at = 0
        for m in modules:
            rows = m.weight.shape[0]
            m.weight = torch.nn.Parameter(weight[at:at + rows], requires_grad=False)
            if bias is not None:
                m.bias = torch.nn.Parameter(bias[at:at + rows], requires_grad=False)
            at += rows
    modules[0]._icecache_merged = (weight, bias, len(modules))
    return weight, bias


def _views_into(merged: torch.Tensor, weights: list[torch.Tensor]) -> bool:
    """Whether the weights are still the rows of a merge made earlier: a model copied or
    cast since (copy.deepcopy, .to(dtype), .cuda()) has new weights and keeps the old merge
    as a stale attribute."""
    storage = merged.untyped_storage().data_ptr()
    return all(w.dtype == merged.dtype and w.device == merged.device
               and w.untyped_storage().data_ptr() == storage for w in weights)


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
def _rope(q_ptr, k_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr, num_q, num_k, q_stride, k_stride, D: tl.constexpr,
          ROUND: tl.constexpr):
    """x * cos + rotate_half(x) * sin for one head row of token t; rotate_half(x) = [-x2, x1].
    Token t's heads start at t * q_stride / t * k_stride of the inputs (dense outputs)."""
    t, r = tl.program_id(0), tl.program_id(1)
    d = tl.arange(0, D)
    partner = (d + D // 2) % D
    sign = tl.where(d < D // 2, -1.0, 1.0)
    cos = tl.load(cos_ptr + t * D + d).to(tl.float32)
    sin = tl.load(sin_ptr + t * D + d).to(tl.float32)
    dtype = q_out_ptr.dtype.element_ty
    if r < num_q:
        row = t * q_stride + r * D
        x = tl.load(q_ptr + row + d).to(tl.float32)
        x_rot = tl.load(q_ptr + row + partner).to(tl.float32) * sign
        tl.store(q_out_ptr + (t * num_q + r) * D + d, _rotate(x, x_rot, cos, sin, dtype, ROUND))
    else:
        row = t * k_stride + (r - num_q) * D
        x = tl.load(k_ptr + row + d).to(tl.float32)
        x_rot = tl.load(k_ptr + row + partner).to(tl.float32) * sign
        tl.store(k_out_ptr + (t * num_k + r - num_q) * D + d, _rotate(x, x_rot, cos, sin, dtype, ROUND))


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' apply_rotary_pos_emb for B tokens: q [B, Hq, D], k [B, Hk, D] (each
    token's heads contiguous, e.g. slices of one fused projection), cos/sin [B, D]
    (contiguous) in their dtype. -> (q, k) rotated, new contiguous tensors."""
    assert cos.is_contiguous() and sin.is_contiguous()
    assert q[0].is_contiguous() and k[0].is_contiguous(), "rope: each token's heads must be contiguous"
    assert cos.dtype == q.dtype == k.dtype, "rope: q, k and cos/sin must share a dtype"
    B, Hq, D = q.shape
    q_out = torch.empty(B, Hq, D, dtype=q.dtype, device=q.device)
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    _rope[(B, Hq + k.shape[1])](q, k, cos, sin, q_out, k_out, Hq, k.shape[1], q.stride(0), k.stride(0), D=D,
                                ROUND=q.dtype != torch.float32)
    return q_out, k_out
