"""The host tier of HiCache: a KV pool in CPU memory that mirrors the device pool's layout and dtype.

Pages evicted from the device pool keep their KV here, so a prefix that comes back costs a copy instead
of a prefill. The buffers have the device pool's exact per-slot shape and dtype (whatever it is: fp32,
bf16, an FP8 type): transfers move raw bytes and never convert. On CUDA they are pinned, which is what
lets copies run asynchronously on a side stream (and lets a kernel read them directly over PCIe).
"""
from __future__ import annotations

import torch

from radixserve.kvcache.allocator import PageAllocator


class HostKVPool:
    def __init__(self, num_layers: int, num_tokens: int, page_size: int, slot_shape: tuple[int, ...],
                 dtype: torch.dtype, pin_memory: bool) -> None:
        # +1 page: the allocator reserves page 0 (the device pool's padding page), unused here
        num_pages = max(num_tokens // page_size, 1) + 1
        self.page_size = page_size
        self.num_slots = num_pages * page_size
        self.dtype = dtype
        shape = (self.num_slots, *slot_shape)
        self.k = [torch.empty(shape, dtype=dtype, pin_memory=pin_memory) for _ in range(num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, pin_memory=pin_memory) for _ in range(num_layers)]
        self.allocator = PageAllocator(num_pages, page_size, "cpu")

    @property
    def capacity_tokens(self) -> int:
        return self.allocator.capacity_tokens

    @property
    def free_tokens(self) -> int:
        return self.allocator.free_tokens

    def alloc(self, num_tokens: int) -> torch.Tensor | None:
        """Slots for `num_tokens` (a page multiple), or None when the host pool is full."""
        pages = num_tokens // self.page_size
        if pages > len(self.allocator.free_pages):
            return None
        p = self.allocator.alloc_pages(pages)
        return (p[:, None] * self.page_size + torch.arange(self.page_size)).flatten()

    def free(self, slots: torch.Tensor) -> None:
        self.allocator.free(slots)

    def page_bytes(self, slots: torch.Tensor) -> bytes:
        """The raw KV of `slots` (one page) over every layer, K then V per layer: the file tier's page format."""
        parts = [buf.view(torch.uint8)[slots].flatten() for layer in zip(self.k, self.v) for buf in layer]
        return torch.cat(parts).numpy().tobytes()

    def page_nbytes(self) -> int:
        per_slot = self.k[0][0].numel() * self.k[0].element_size()
        return 2 * len(self.k) * self.page_size * per_slot

    def set_page(self, slots: torch.Tensor, data: bytes) -> None:
        """Inverse of page_bytes."""
        flat = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        n = flat.numel() // (2 * len(self.k))
        for i, buf in enumerate(b for layer in zip(self.k, self.v) for b in layer):
            view = buf.view(torch.uint8)
            view[slots] = flat[i * n:(i + 1) * n].view(slots.numel(), *view.shape[1:])
