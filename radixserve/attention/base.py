"""The attention backend interface: one metadata build per batch, one call per layer."""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from radixserve.forward_batch import ForwardBatch
    from radixserve.layers.attention import Attention


class AttentionBackend(Protocol):
    def init_forward_metadata(self, fb: ForwardBatch) -> None:
        """Build per-batch index tensors once, shared by every layer (set fb.attn_meta)."""

    def forward(self, q: torch.Tensor, layer: Attention, fb: ForwardBatch) -> torch.Tensor:
        """q: [T, heads, head_dim] for this step's tokens; K/V already stored in the pool.
        Returns [T, heads, head_dim]."""
