"""KV pool and the request-to-token table."""
from __future__ import annotations

import torch

from radixserve.transfer import to_device

# --kv-cache-dtype -> storage dtype (auto: the model's dtype)
KV_CACHE_DTYPES: dict[str, torch.dtype | None] = {"auto": None, "fp8_e4m3": torch.float8_e4m3fn,
                                                  "fp8_e5m2": torch.float8_e5m2}


def kv_cache_dtype(name: str, model_dtype: torch.dtype) -> torch.dtype:
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"--kv-cache-dtype {name!r}: choose one of {', '.join(KV_CACHE_DTYPES)}")
    return KV_CACHE_DTYPES[name] or model_dtype


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in (torch.float8_e4m3fn, torch.float8_e5m2)


class KVPool:
    """Per-layer K and V buffers of shape [num_slots, kv_heads_per_rank, head_dim].

    Slot indices are what the attention backends read and write. In an FP8 pool a stored value is
    k / k_scale[layer] (saturated to the format's range) and reads multiply back; the scales are the
    checkpoint's `k_scale` / `v_scale` when it has them, else 1.0 (K and V of common models stay well
    inside e4m3's +-448). Pages keep their bytes wherever they move (radix cache, retraction, tiers):
    nothing outside the store and the attention reads knows the format.
    """

    def __init__(self, num_layers: int, num_slots: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str,
                 scales: dict[int, tuple[float, float]] | None = None) -> None:
        self.num_slots, self.dtype = num_slots, dtype
        scales = scales if is_fp8(dtype) and scales else {}
        self.k_scale = [float(scales.get(i, (1.0, 1.0))[0]) for i in range(num_layers)]
        self.v_scale = [float(scales.get(i, (1.0, 1.0))[1]) for i in range(num_layers)]
        shape = (num_slots, num_kv_heads, head_dim)
        self.k = [_buffer(shape, dtype, device) for _ in range(num_layers)]
        self.v = [_buffer(shape, dtype, device) for _ in range(num_layers)]
        # HiCache (CUDA): one event per layer of the latest host->device load that no forward has waited
        # for yet; the next forward waits for layer i's just before its attention reads layer i
        self.pending_load: list[torch.cuda.Event] | None = None

    def store(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k[layer][slots] = self.encode(k, self.k_scale[layer])
        self.v[layer][slots] = self.encode(v, self.v_scale[layer])

    def encode(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        """x in the pool's format: a plain cast, or for FP8 divided by the scale and saturated (torch's
        cast would turn out-of-range values into NaN / inf)."""
        if not is_fp8(self.dtype):
            return x.to(self.dtype)
        m = torch.finfo(self.dtype).max
        return (x.float() / scale).clamp(-m, m).to(self.dtype)

    def load(self, layer: int, slots: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) at `slots` in `dtype`, scales applied: the torch backend's read."""
        flat, shape = slots.reshape(-1), (*slots.shape, *self.k[layer].shape[1:])
        # index_select: a third of advanced indexing's cost for these row gathers on CPU
        return self._decoded(layer, self.k[layer].index_select(0, flat).view(shape),
                             self.v[layer].index_select(0, flat).view(shape), dtype)

    def load_range(self, layer: int, start: int, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(K, V) [1, n, KVH, D] of slots start .. start+n-1, as `load` gives them: views of the pool when no
        dtype or scale applies."""
        return self._decoded(layer, self.k[layer][start:start + n].unsqueeze(0),
                             self.v[layer][start:start + n].unsqueeze(0), dtype)

    def _decoded(self, layer: int, k: torch.Tensor, v: torch.Tensor,
                 dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V read from `layer`'s pages, in `dtype` with the layer's FP8 scales applied."""
        if k.dtype != dtype:
            k, v = k.to(dtype), v.to(dtype)
        if self.k_scale[layer] != 1.0:
            k = k * self.k_scale[layer]
        if self.v_scale[layer] != 1.0:
            v = v * self.v_scale[layer]
        return k, v

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()


def _buffer(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A KV buffer. On CPU it is left unwritten except slot 0 (the padding slot that padded batch entries
    read): attention only reads slots a step has written, and zero-filling gigabytes up front costs
    seconds of start-up and makes the whole pool resident at once instead of as it fills."""
    if torch.device(device).type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    buf = torch.empty(shape, dtype=dtype, device=device)
    buf[:1].zero_()
    return buf


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
