"""The MIPS -> nearest-neighbour transform (Bachrach et al.; used by IceCache).

With c >= max ||k||, T(k) = [k / c, sqrt(1 - ||k||^2 / c^2)] lies on the unit sphere
and T(q) = [q / ||q||, 0]; the largest q.k are then the nearest T(k) to T(q).
Since every T(k) has unit norm, "nearest" is "largest dot product" in T-space.
"""

from __future__ import annotations

import torch


def key_scale(keys: torch.Tensor) -> torch.Tensor:
    """c per head: the largest key norm. keys: [H, n, D] -> [H]."""
    if keys.shape[1] == 0:
        return torch.ones(keys.shape[0], dtype=torch.float32, device=keys.device)
    return keys.float().norm(dim=-1).amax(dim=1).clamp_min(1e-6)


def transform_keys(keys: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """T(k). keys: [H, n, D], scale: [H] -> [H, n, D + 1] (unit rows).

    A key longer than c (inserted after the build) is clamped onto the sphere."""
    k = keys.float() / scale[:, None, None]  # [H, n, D]
    sq = k.square().sum(-1, keepdim=True)  # [H, n, 1]
    k = torch.where(sq > 1.0, k / sq.sqrt(), k)
    tail = (1.0 - sq.clamp(max=1.0)).sqrt()
    return torch.cat([k, tail], dim=-1)


def transform_queries(queries: torch.Tensor) -> torch.Tensor:
    """T(q). queries: [..., D] -> [..., D + 1]."""
    q = queries.float()
    q = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return torch.cat([q, torch.zeros_like(q[..., :1])], dim=-1)
