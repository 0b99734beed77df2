"""Host page store: one layer's middle KV, laid out page by page.

Pages of one head are contiguous ([H, num_pages, page_size, D]), and the tokens of a
page are the similar keys the DCI-tree packed together, so one copy brings them in.
A store is built on the device the prefill ran on (a scatter of the KV there) and then
lives in host memory: pinned when CUDA is present (fast, async H2D), or a view of a
shared-memory segment that the cluster tier wrote it into.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from icecache.index.tree import PageLayout, page_means


def to_host(t: torch.Tensor) -> torch.Tensor:
    """t in host memory (pinned when CUDA is present); host tensors are returned as they are."""
    if t.device.type == "cpu":
        return t
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t)
    return out


@dataclass
class HostPageStore:
    keys: torch.Tensor  # [H, num_pages, page_size, D]
    values: torch.Tensor  # [H, num_pages, page_size, D]
    positions: torch.Tensor  # [H, num_pages, page_size] token position, -1 in empty slots
    valid: torch.Tensor  # [H, num_pages] valid slots per page
    # each page's valid keys' and values' means ([H, num_pages, D], 0 on empty pages): what a sparse
    # layer attends to of a page it does not retrieve (IceCacheConfig.unselected); 1/page_size of the KV
    key_mean: torch.Tensor
    value_mean: torch.Tensor

    @classmethod
    def from_layout(cls, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
                    layout: PageLayout, page_size: int) -> "HostPageStore":
        """Scatter tokens into pages, on the keys' device. keys/values: [H, n, D]; positions: [n]."""
        H, n, D = keys.shape
        dev = keys.device
        shape = (H, layout.num_pages, page_size, D)
        k_pages = torch.zeros(shape, dtype=keys.dtype, device=dev)
        v_pages = torch.zeros(shape, dtype=values.dtype, device=dev)
        pos_pages = torch.full(shape[:3], -1, dtype=torch.long, device=dev)
        page_of, slot_of = layout.page_of.to(dev), layout.slot_of.to(dev)
        h = torch.arange(H, device=dev)[:, None].expand(H, n)
        k_pages[h, page_of, slot_of] = keys
        v_pages[h, page_of, slot_of] = values
        pos_pages[h, page_of, slot_of] = positions.to(dev).expand(H, n)
        valid = torch.zeros(H, layout.num_pages, dtype=torch.long, device=dev).scatter_add_(
            1, page_of, torch.ones_like(page_of))
        return cls(k_pages, v_pages, pos_pages, valid, page_means(k_pages, valid), page_means(v_pages, valid))

    def to_host(self) -> "HostPageStore":
        """The same pages in host memory (pinned when CUDA is present)."""
        return HostPageStore(**{f.name: to_host(getattr(self, f.name)) for f in fields(self)})

    @property
    def num_pages(self) -> int:
        return self.keys.shape[1]

    @property
    def num_bytes(self) -> int:
        return sum(getattr(self, f.name).nbytes for f in fields(self))

    def flat(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every valid token's K and V, page order: ([H, n, D], [H, n, D]).
        Every head holds the same number of tokens, so the result is rectangular."""
        H, _, P, D = self.keys.shape
        ok = (torch.arange(P) < self.valid[..., None]).reshape(H, -1)  # [H, num_pages * P]
        n = int(ok[0].sum())
        k = self.keys.reshape(H, -1, D)[ok].reshape(H, n, D)
        v = self.values.reshape(H, -1, D)[ok].reshape(H, n, D)
        return k, v


def shared_rows(shared_k: torch.Tensor, shared_v: torch.Tensor, shared_valid: torch.Tensor,
                shared_at: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shared pages as the decode kernels read them: (keys, values) as token rows [HS, T, D]
    and each page's first row [HS, N]. Pages [HS, N, P, D] (shared_at None) are rows
    p * P...; rows already ([HS, T, D], e.g. a context's flat KV on the device) come with
    their shared_at (page_rows)."""
    if shared_at is not None:
        return shared_k, shared_v, shared_at
    HS, N, P, D = shared_k.shape
    return shared_k.view(HS, N * P, D), shared_v.view(HS, N * P, D), page_rows(shared_valid.new_full((HS, N), P))


def page_rows(valid: torch.Tensor, first: int = 0) -> torch.Tensor:
    """The first token row of each page [HS, N] when every head's pages lie one after the
    other from row `first`, page p holding valid[hs, p] rows (a context's flat KV: its
    sinks, then its pages' valid tokens in page order, as flat() lists them). -> int32 [HS, N]."""
    return (first + valid.cumsum(1) - valid).to(torch.int32).contiguous()
