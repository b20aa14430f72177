"""ForwardBatch: everything one forward pass needs, built once per batch by the model runner.

The model passes it down explicitly to every attention layer; there is no global context.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class ForwardBatch:
    is_decode: bool
    input_ids: torch.Tensor  # [T] tokens computed in this step
    positions: torch.Tensor  # [T]
    out_slots: torch.Tensor  # [T] KV slots the new tokens are written to
    req_rows: torch.Tensor  # [B] rows of req_to_token
    seq_lens: torch.Tensor  # [B] KV length after this step
    prefix_lens: torch.Tensor  # [B] KV already in the pool before this step
    extend_lens: torch.Tensor  # [B] new tokens per request (1 for decode)
    logits_idx: torch.Tensor  # [B] index in T of each request's last token
    max_seq_len: int
    max_extend_len: int
    kv_pool: Any  # KVPool
    req_to_token: torch.Tensor
    attn: Any = None  # the attention backend
    attn_meta: Any = None  # backend-specific metadata
    kv_ready: list | None = None  # CUDA events, one per layer: a HiCache load this forward's attention waits for
    # a mixed batch (--enable-mixed-chunk): its last decode_tail requests are decode steps, one token each at
    # the end of T, which a backend may attend with its decode kernel
    decode_tail: int = 0
    # CPU: (cos, sin) of `positions` (kernels/fused.rope_tables), made by the first layer for all of them
    rope: tuple | None = None

    @property
    def batch_size(self) -> int:
        return self.req_rows.numel()
