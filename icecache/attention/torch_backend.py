"""Attention in plain torch: runs on any device, and is the reference the GPU kernels
are checked against."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def prefill_attention(q: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor, k: torch.Tensor,
                      v: torch.Tensor, scaling: float) -> torch.Tensor:
    """Exact attention of a chunk over everything before it plus itself (causal).

    q: [Hq, T, D]; past_k/v: [H, N, D]; k/v: [H, T, D] -> [T, Hq, D].
    The score matrix is [Hq, T, N + T]: bounded by the chunk, not the document.
    """
    T, N = q.shape[1], past_k.shape[1]
    keys = torch.cat([past_k, k], dim=1)[None]  # [1, H, N + T, D]
    values = torch.cat([past_v, v], dim=1)[None]
    causal = torch.ones(T, N + T, dtype=torch.bool, device=q.device).tril(diagonal=N)
    out = F.scaled_dot_product_attention(q[None], keys, values, attn_mask=causal, scale=scaling,
                                         enable_gqa=True)  # [1, Hq, T, D]
    return out[0].transpose(0, 1)


def _attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                   scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Flash attention with its log-sum-exp: q [1, H, T, D], k/v [1, H, S, D] (as many
    heads) -> (out [1, H, T, D], lse [1, H, T] fp32). causal: top-left (S == T)."""
    if q.device.type == "cuda":
        if q.dtype in (torch.float16, torch.bfloat16):
            out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scaling)
        else:
            out = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal,
                                                                          scale=scaling)
        return out[0], out[1][..., :q.shape[2]]  # the efficient kernel pads lse to a block of rows
    out = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scaling)
    return out[0], out[1]


def prefill_attention_parts(q: torch.Tensor, past_k: torch.Tensor, past_v: torch.Tensor, k: torch.Tensor,
                            v: torch.Tensor, scaling: float) -> torch.Tensor:
    """prefill_attention without joining past and chunk or building a [T, N + T] mask: the
    chunk's causal attention over itself and its attention over the past, merged by their
    log-sum-exps. A KV head's g query heads attend to the past as g * T query rows, so the
    past is never repeated per query head (only the chunk's own T keys are).

    q: [Hq, T, D]; past_k/v: [H, N, D] (on q's device); k/v: [H, T, D] -> [T, Hq, D]."""
    Hq, T, D = q.shape
    H = k.shape[0]
    g = Hq // H
    own, own_lse = _attention_lse(q[None], k.repeat_interleave(g, 0)[None], v.repeat_interleave(g, 0)[None], True,
                                  scaling)
    if past_k.shape[1] == 0:
        return own[0].transpose(0, 1)
    past, past_lse = _attention_lse(q.reshape(H, g * T, D)[None], past_k[None], past_v[None], False, scaling)
    past, past_lse = past[0].reshape(Hq, T, D), past_lse[0].reshape(Hq, T)
    top = torch.maximum(own_lse[0], past_lse)
    w_own, w_past = torch.exp(own_lse[0] - top), torch.exp(past_lse - top)
    out = (own[0].float() * w_own[..., None] + past.float() * w_past[..., None]) / (w_own + w_past)[..., None]
    return out.to(q.dtype).transpose(0, 1)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                     scaling: float) -> torch.Tensor:
    """One query token per head over a gathered key set.

    q: [H, g, D] (g query heads share KV head h); keys/values: [H, N, D]; mask: [H, N]
    (True = attend) -> [H, g, D].
    """
    s = torch.einsum("hgd,hnd->hgn", q.float(), keys.float()) * scaling  # [H, g, N]
    if mask is not None:
        s = s.masked_fill(~mask[:, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.einsum("hgn,hnd->hgd", p, values.float()).to(q.dtype)
