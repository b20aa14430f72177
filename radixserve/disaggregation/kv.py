"""Moving one request's KV between the pool and a CPU tensor, on the scheduler's thread (the only one that
touches the pool). The bytes stay in the pool's storage dtype, so an FP8 pool ships FP8."""
from __future__ import annotations

import torch

from radixserve.kvcache.pool import KVPool


def kv_layout(pool: KVPool) -> tuple[int, int, int, torch.dtype]:
    """(layers, kv_heads, head_dim, dtype): what a payload must match to be written into this pool."""
    return len(pool.k), pool.k[0].shape[1], pool.k[0].shape[2], pool.k[0].dtype


def export_kv(pool: KVPool, slots: torch.Tensor) -> torch.Tensor:
    """[layers, 2, len(slots), kv_heads, head_dim] on the CPU, a copy (the slots may be reused at once)."""
    idx = slots.to(pool.k[0].device)
    return torch.stack([torch.stack((k[idx], v[idx])) for k, v in zip(pool.k, pool.v)]).cpu()


def import_kv(pool: KVPool, slots: torch.Tensor, kv: torch.Tensor) -> None:
    idx = slots.to(pool.k[0].device)
    for layer, (k, v) in enumerate(zip(pool.k, pool.v)):
        k[idx] = kv[layer, 0].to(k.device)
        v[idx] = kv[layer, 1].to(v.device)
