"""Rotary position embedding (HF rotate-half layout) with Llama-3.1 and linear scaling: the cos/sin
table; the rotation itself is fused with the KV store (kernels/fused.py rotary_and_store_kv)."""
from __future__ import annotations

import math

import torch
from torch import nn


def rope_inv_freq(head_dim: int, rope: dict) -> torch.Tensor:
    base = rope.get("rope_theta", 10000.0)
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    kind = rope.get("rope_type", "default")
    if kind == "linear":
        inv = inv / rope["factor"]
    elif kind == "llama3":
        factor, lo, hi = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        old = rope["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = ((old / wavelen) - lo) / (hi - lo)
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        mid = (wavelen <= old / lo) & (wavelen >= old / hi)
        inv = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    elif kind != "default":
        raise ValueError(f"rope_type {kind!r} is not supported (supported: default, linear, llama3)")
    return inv.float()


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_positions: int, rope: dict) -> None:
        super().__init__()
        self.head_dim = head_dim
        inv = rope_inv_freq(head_dim, rope)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv)
        self.register_buffer("cos_sin", torch.cat([freqs.cos(), freqs.sin()], dim=-1), persistent=False)
