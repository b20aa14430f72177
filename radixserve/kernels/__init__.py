"""GPU kernels (Triton) with torch twins.

`fused` (RMSNorm + residual, SiLU-and-mul, rotary, rotary + KV store) imports everywhere and falls
back to torch when Triton cannot run; `attention` (decode / extend over the paged KV pool) needs
triton and is imported by the Triton attention backend only.
"""
from radixserve.kernels.fused import HAS_TRITON, rmsnorm, rotary_and_store_kv, silu_and_mul

__all__ = ["HAS_TRITON", "rmsnorm", "rotary_and_store_kv", "silu_and_mul"]
