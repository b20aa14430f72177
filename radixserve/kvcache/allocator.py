"""Page allocator over the KV pool's slots.

Slots are `page * page_size + offset`. Requests own whole pages; a request's positions fill its
pages in order, so a page is shared by at most one request until it enters the radix cache.
With `page_size == 1` this is a token allocator. Slot 0's page is reserved as the padding target
(CUDA-graph dummy writes land there), so real pages start at 1.
"""
from __future__ import annotations

import torch

from radixserve.transfer import int64_tensor


class OutOfSlots(RuntimeError):
    """Raised when an allocation cannot be served; the scheduler evicts or retracts and retries."""


class PageAllocator:
    def __init__(self, num_pages: int, page_size: int, device: torch.device | str = "cpu") -> None:
        if num_pages < 2:
            raise ValueError(f"KV pool too small: {num_pages} pages of {page_size} tokens")
        self.page_size = page_size
        self.num_pages = num_pages
        self.device = torch.device(device)
        self.free_pages: list[int] = list(range(num_pages - 1, 0, -1))  # pop() from the end: page 1 first

    @property
    def capacity_tokens(self) -> int:
        """Usable tokens (the reserved padding page excluded)."""
        return (self.num_pages - 1) * self.page_size

    @property
    def free_tokens(self) -> int:
        return len(self.free_pages) * self.page_size

    def alloc_pages(self, n: int) -> torch.Tensor:
        if n > len(self.free_pages):
            raise OutOfSlots(f"need {n} pages, {len(self.free_pages)} free")
        # the list ends with the lowest pages (free() keeps it so): reversed, a request's pages ascend, which
        # lets a lone request's KV be read as one slice of the pool (attention/torch_backend._span)
        pages = self.free_pages[len(self.free_pages) - n:][::-1]
        del self.free_pages[len(self.free_pages) - n:]
        return int64_tensor(pages)

    def pages_needed(self, cur_len: int, new_len: int) -> int:
        """Pages a request holding `cur_len` positions needs to grow to `new_len`."""
        ps = self.page_size
        return (new_len + ps - 1) // ps - (cur_len + ps - 1) // ps

    def alloc_extend(self, cur_len: int, new_len: int, last_slot: int) -> torch.Tensor:
        """Slots for positions [cur_len, new_len) of one request whose position cur_len-1 is in
        `last_slot` (ignored when cur_len is page aligned). Fills the partly used last page first."""
        ps = self.page_size
        n = new_len - cur_len
        if n <= 0:
            return torch.empty(0, dtype=torch.int64)
        in_last = 0 if cur_len % ps == 0 else min(ps - cur_len % ps, n)
        head = torch.arange(last_slot + 1, last_slot + 1 + in_last, dtype=torch.int64)
        pages = self.alloc_pages(self.pages_needed(cur_len, new_len))
        tail = (pages[:, None] * ps + torch.arange(ps)).flatten()[: n - in_last]
        return torch.cat([head, tail])

    def free(self, slots: torch.Tensor) -> None:
        """Free the pages that `slots` cover. Callers pass whole pages' worth of a request's slots:
        a page is returned once even if several of its slots are listed."""
        if slots.numel() == 0:
            return
        pages = torch.unique(slots.cpu() // self.page_size).tolist()
        self.free_pages.extend(reversed(pages))

    def alloc_decode(self, kv_lens: torch.Tensor, last_slots: torch.Tensor) -> torch.Tensor:
        """One new slot per request, vectorised: the next slot of the last page, or a fresh page."""
        if self.page_size == 1:  # token-granular: every new token is a fresh page
            return self.alloc_pages(kv_lens.numel())
        need_page = kv_lens % self.page_size == 0
        slots = last_slots + 1
        n = int(need_page.sum())
        if n:
            slots[need_page] = self.alloc_pages(n) * self.page_size
        return slots
