"""KV pool and the request-to-token table."""
from __future__ import annotations

import torch

from radixserve.transfer import to_device


class KVPool:
    """Per-layer K and V buffers of shape [num_slots, kv_heads_per_rank, head_dim].

    Slot indices are what the attention backends read and write.
    """

    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        self.num_slots = num_slots
        shape = (num_slots, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    def store(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer][slots] = k.to(self.k[layer].dtype)
        self.v[layer][slots] = v.to(self.v[layer].dtype)

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()


class ReqToTokenPool:
    """`req_to_token[row, pos]` = slot holding position `pos` of the request in `row`.

    Row 0 is never handed out: it stays all zeros (the padding page), the row that padded batch
    entries (CUDA graphs) point to."""

    def __init__(self, max_requests: int, context_len: int, device: torch.device | str) -> None:
        self.req_to_token = torch.zeros((max_requests + 1, context_len), dtype=torch.int64, device=device)
        self.free_rows: list[int] = list(range(max_requests, 0, -1))

    def alloc(self) -> int:
        if not self.free_rows:
            raise RuntimeError("no free request rows: raise --max-running-requests")
        return self.free_rows.pop()

    def free(self, row: int) -> None:
        self.free_rows.append(row)

    def write(self, row: int, start: int, slots: torch.Tensor) -> None:
        self.req_to_token[row, start:start + slots.numel()] = to_device(slots, self.req_to_token.device)
