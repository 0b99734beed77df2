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
