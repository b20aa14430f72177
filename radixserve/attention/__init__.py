"""Attention backends. `make_backend` picks one by name (`--attention-backend`)."""
from __future__ import annotations

from radixserve.attention.base import AttentionBackend


def make_backend(name: str) -> AttentionBackend:
    if name == "torch":
        from radixserve.attention.torch_backend import TorchAttentionBackend
        return TorchAttentionBackend()
    if name == "triton":
        from radixserve.attention.triton_backend import TritonAttentionBackend
        return TritonAttentionBackend()
    raise ValueError(f"unknown attention backend {name!r}: choose torch or triton")
