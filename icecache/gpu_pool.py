"""Per-request device page slots: which host page each slot holds, and the diff that
fetches only the pages a step selects and the slots do not hold yet."""

from __future__ import annotations

import torch


class PagePool:
    """Device-resident copies of selected pages for one request and one layer."""

    def __init__(self, num_heads: int, num_slots: int, page_size: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        H, S, P, D = num_heads, num_slots, page_size, head_dim
        self.keys = torch.zeros(H, S, P, D, dtype=dtype, device=device)  # [H, S, P, D]
        self.values = torch.zeros_like(self.keys)
        self.resident = torch.full((H, S), -1, dtype=torch.long, device=device)  # page id per slot
        self.valid = torch.zeros(H, S, dtype=torch.long, device=device)  # valid tokens of the slot's page
        self.active = torch.zeros(H, S, dtype=torch.bool, device=device)  # slot selected this step

    @property
    def num_slots(self) -> int:
        return self.resident.shape[1]

    @property
    def num_bytes(self) -> int:
        return 2 * self.keys.numel() * self.keys.element_size()

    def _grow(self, num_slots: int) -> None:
        extra = num_slots - self.num_slots
        def pad(t, fill):
            return torch.cat([t, torch.full((t.shape[0], extra, *t.shape[2:]), fill, dtype=t.dtype,
                                            device=t.device)], dim=1)
        self.keys, self.values = pad(self.keys, 0), pad(self.values, 0)
        self.resident, self.valid, self.active = pad(self.resident, -1), pad(self.valid, 0), pad(self.active, False)

    def invalidate(self, page_ids: torch.Tensor) -> None:
        """Forget resident copies of pages whose content changed. page_ids: [H, m]."""
        stale = (self.resident[:, :, None] == page_ids[:, None, :]).any(dim=2)  # [H, S]
        self.resident.masked_fill_(stale, -1)

    def update(self, page_ids: torch.Tensor, fetch) -> int:
        """Make the selected pages resident and active; return how many were copied.

        page_ids: [H, R] selected page ids (-1 = none). fetch(head_idx [M], page_ids [M]) ->
        (keys [M, P, D], values [M, P, D], valid [M]) reads pages from their host store.
        """
        if page_ids.shape[1] > self.num_slots:
            self._grow(page_ids.shape[1])
        selected = page_ids >= 0
        match = (page_ids[:, :, None] == self.resident[:, None, :]) & selected[:, :, None]  # [H, R, S]
        hit = match.any(dim=2)  # [H, R]
        keep = match.any(dim=1)  # [H, S]
        need = selected & ~hit
        free_order = keep.to(torch.int8).argsort(dim=1, stable=True)  # slots not kept first
        target = free_order.gather(1, (need.cumsum(1) - 1).clamp_min(0))  # [H, R]
        h_idx, r_idx = need.nonzero(as_tuple=True)
        count = h_idx.numel()
        if count:
            slots, pids = target[h_idx, r_idx], page_ids[h_idx, r_idx]
            k, v, valid = fetch(h_idx, pids)
            self.keys[h_idx, slots] = k.to(self.keys.device, non_blocking=True)
            self.values[h_idx, slots] = v.to(self.values.device, non_blocking=True)
            self.valid[h_idx, slots] = valid.to(self.valid.device)
            self.resident[h_idx, slots] = pids
            keep[h_idx, slots] = True
        self.active = keep
        return count
