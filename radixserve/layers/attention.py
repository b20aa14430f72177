"""Attention layer: writes this step's K/V into the pool, then lets the backend attend."""
from __future__ import annotations

import torch
from torch import nn

from radixserve.engine.forward_batch import ForwardBatch


class Attention(nn.Module):
    def __init__(self, layer_id: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 sliding_window: int | None = None) -> None:
        super().__init__()
        self.layer_id, self.num_heads, self.num_kv_heads, self.head_dim = layer_id, num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        self.sliding_window = sliding_window

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fb: ForwardBatch) -> torch.Tensor:
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        fb.kv_pool.store(self.layer_id, fb.out_slots, k, v)
        return fb.attn.forward(q, self, fb).reshape(q.shape[0], -1)
