"""Host page store: one layer's middle KV, laid out page by page in host memory.

Pages of one head are contiguous ([H, num_pages, page_size, D]), and the tokens of a
page are the similar keys the DCI-tree packed together, so one copy brings them in.
Buffers are pinned when CUDA is present (fast, async H2D). An allocator can be
passed so a caller (e.g. the cluster tier) can place them in shared memory.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from icecache.index.tree import PageLayout

# (shape, dtype) -> a zeroed host tensor; the default is process memory, pinned if CUDA is present
Allocator = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]


def default_allocator(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    pin = torch.cuda.is_available()
    return torch.zeros(shape, dtype=dtype, pin_memory=pin)


@dataclass
class HostPageStore:
    keys: torch.Tensor  # [H, num_pages, page_size, D]
    values: torch.Tensor  # [H, num_pages, page_size, D]
    positions: torch.Tensor  # [H, num_pages, page_size] token position, -1 in empty slots
    valid: torch.Tensor  # [H, num_pages] valid slots per page

    @classmethod
    def from_layout(cls, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                    layout: PageLayout, page_size: int, allocator: Allocator = default_allocator
                    ) -> "HostPageStore":
        """Scatter tokens into pages. keys/values: [H, n, D] (any device); positions: [n]."""
        H, n, D = keys.shape
        shape = (H, layout.num_pages, page_size, D)
        k_pages, v_pages = allocator(shape, keys.dtype), allocator(shape, values.dtype)
        pos_pages = allocator(shape[:3], torch.long)
        pos_pages.fill_(-1)
        page_of, slot_of = layout.page_of.cpu(), layout.slot_of.cpu()
        h = torch.arange(H)[:, None].expand(H, n)
        k_pages[h, page_of, slot_of] = keys.cpu()
        v_pages[h, page_of, slot_of] = values.cpu()
        pos_pages[h, page_of, slot_of] = positions.cpu().expand(H, n)
        valid = torch.zeros(H, layout.num_pages, dtype=torch.long).scatter_add_(1, page_of, torch.ones_like(page_of))
        return cls(k_pages, v_pages, pos_pages, valid)

    @property
    def num_pages(self) -> int:
        return self.keys.shape[1]

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.positions, self.valid))

    def flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every valid token's K and V, page order: ([H, n, D], [H, n, D]).
        Every head holds the same number of tokens, so the result is rectangular."""
        H, _, P, D = self.keys.shape
        ok = (torch.arange(P) < self.valid[..., None]).reshape(H, -1)  # [H, num_pages * P]
        n = int(ok[0].sum())
        k = self.keys.reshape(H, -1, D)[ok].reshape(H, n, D)
        v = self.values.reshape(H, -1, D)[ok].reshape(H, n, D)
        return k, v
