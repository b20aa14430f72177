"""GGUF weight loading with vectorized torch dequantization.

gguf's numpy dequantizers work in small row groups and are slow on big tensors; the hot types
(float, Q8_0, Q4_0/1, Q4_K, Q6_K) are decoded here in a handful of whole-tensor torch ops instead.
Results are bit-identical to ``gguf.quants.dequantize`` (same float32 op order, no fused ops).
"""

from __future__ import annotations

import re
import struct
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from tqdm import tqdm

__all__ = ["dequantize", "load_gguf_weights"]

QK_K = 256  # super-block size of the k-quants


def _as_bytes(data: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Flat uint8 view of ``data`` without copying (GGUFReader hands out read-only memmaps)."""
    if isinstance(data, torch.Tensor):
        return data.contiguous().reshape(-1).view(torch.uint8)
    arr = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    with warnings.catch_warnings():  # torch warns about non-writable arrays; we never write into them
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(arr)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Bytes ``[n, 2]`` -> float32 ``[n, 1]`` (fp16 block scales)."""
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """``[..., k]`` bytes -> ``[..., 2k]``: all low nibbles first, then all high ones (ggml order)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _q8_0(b: torch.Tensor) -> torch.Tensor:  # [d:f16][qs:32 x i8]
    return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b[:, :2])


def _q4_0(b: torch.Tensor) -> torch.Tensor:  # [d:f16][qs:16 bytes], value = d * (q - 8)
    return _f16(b[:, :2]) * (_nibbles(b[:, 2:]).to(torch.int8) - 8).float()


def _q4_1(b: torch.Tensor) -> torch.Tensor:  # [d:f16][m:f16][qs:16 bytes], value = d * q + m
    return _f16(b[:, :2]) * _nibbles(b[:, 4:]).float() + _f16(b[:, 2:4])


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    """[d:f16][dmin:f16][12 bytes: 8 x (6-bit scale, 6-bit min)][qs:128 bytes]; 8 sub-blocks of 32."""
    n = b.shape[0]
    s = b[:, 4:16].reshape(n, 3, 4)
    lo, hi, mix = s[:, 0], s[:, 1], s[:, 2]
    # sub-blocks 0-3 keep 6 bits in bytes 0-7; 4-7 take 4 bits from bytes 8-11 and 2 from the top of 0-7.
    sc = torch.cat([lo & 0x3F, (mix & 0x0F) | ((lo >> 2) & 0x30)], dim=-1).float()
    mn = torch.cat([hi & 0x3F, (mix >> 4) | ((hi >> 2) & 0x30)], dim=-1).float()
    d = (_f16(b[:, :2]) * sc).unsqueeze(-1)
    dm = (_f16(b[:, 2:4]) * mn).unsqueeze(-1)
    q = _nibbles(b[:, 16:].reshape(n, 4, 32)).reshape(n, 8, 32).float()
    return (d * q - dm).reshape(n, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    """[ql:128 (low 4 bits)][qh:64 (high 2 bits)][scales:16 x i8][d:f16]; 16 sub-blocks of 16."""
    n = b.shape[0]
    ql = _nibbles(b[:, :128].reshape(n, 2, 64)).reshape(n, 8, 32)
    qh = b[:, 128:192].reshape(n, 2, 1, 32) >> torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)
    q = ((ql | ((qh & 0x03).reshape(n, 8, 32) << 4)).to(torch.int8) - 32).reshape(n, 16, 16).float()
    d = (_f16(b[:, 208:210]) * b[:, 192:208].contiguous().view(torch.int8).float()).unsqueeze(-1)
    return (d * q).reshape(n, QK_K)


_BLOCK_DEQUANT: dict[QT, Callable[[torch.Tensor], torch.Tensor]] = {
    QT.Q8_0: _q8_0, QT.Q4_0: _q4_0, QT.Q4_1: _q4_1, QT.Q4_K: _q4_k, QT.Q6_K: _q6_k,
}
_FLOAT_DTYPES = {QT.F32: torch.float32, QT.F16: torch.float16, QT.BF16: torch.bfloat16}


def dequantize(data: np.ndarray | torch.Tensor, qtype: QT, shape: tuple[int, ...]) -> torch.Tensor:
    """Decode raw GGUF tensor bytes into a float32 tensor of torch-order ``shape`` (GGUF ``ne`` reversed).

    ``data`` is whatever ``GGUFReader`` exposes as ``tensor.data`` (typed for F16/F32, uint8 bytes for the
    rest); only its bytes matter. Unlisted quant types fall back to gguf's numpy implementation.
    """
    shape = tuple(int(s) for s in shape)
    raw = _as_bytes(data)
    if qtype in _FLOAT_DTYPES:  # always copy: F32 would otherwise alias the read-only file mapping
        return raw.view(_FLOAT_DTYPES[qtype]).to(torch.float32, copy=True).reshape(shape)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if (fn := _BLOCK_DEQUANT.get(qtype)) is not None:
        return fn(raw.reshape(-1, type_size)).reshape(shape)
    rows = raw.numpy().reshape(-1, shape[-1] // block_size * type_size)
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(rows, qtype))).reshape(shape)


# GGUF tensor name (with "blk.{i}." stripped) -> HF name (with "model.layers.{i}." stripped).
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# llama.cpp permutes Q/K rows for its interleaved (GPT-J style) rotary only for these architectures.
_PERMUTED_ARCHS = {"llama", "mistral"}


def _hf_name(name: str) -> str | None:
    """Map a GGUF tensor name to its HF parameter name, or None for tensors HF models don't hold."""
    if m := _LAYER_RE.fullmatch(name):
        hf = _LAYER_NAMES.get(m[2])
        return f"model.layers.{m[1]}.{hf}.{m[3]}" if hf else None
    base, _, kind = name.rpartition(".")
    return f"{_GLOBAL_NAMES[base]}.{kind}" if base in _GLOBAL_NAMES else None


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's ``permute``: per head, rows were reordered from [half0, half1] to interleaved pairs."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class _GGUFFile:
    """Minimal little-endian GGUF v2/v3 parser: scalar metadata plus memory-mapped tensor bytes.

    Why not ``gguf.GGUFReader``: it turns every metadata array element (a 49k-token vocab plus merges) into a
    numpy memmap slice, which alone costs ~2.5 s; we skip arrays with plain ``struct`` offsets instead.
    """

    def __init__(self, path: str):
        self.mm = np.memmap(path, dtype=np.uint8, mode="r")
        self.buf, self.pos = memoryview(self.mm), 0
        magic, version, n_tensors, n_kv = self._take("<4sIQQ")
        if magic != b"GGUF" or version not in (2, 3):
            raise ValueError(f"{path}: not a little-endian GGUF v2/v3 file (magic={magic!r}, version={version})")
        self.meta: dict[str, object] = {}
        for _ in range(n_kv):
            key = self._str()
            self.meta[key] = self._value(self._take("<I")[0])
        infos = []
        for _ in range(n_tensors):
            name, n_dims = self._str(), self._take("<I")[0]
            dims = self._take(f"<{n_dims}Q")
            qtype, offset = self._take("<IQ")
            infos.append((name, QT(qtype), tuple(reversed(dims)), offset))  # ne order -> torch order
        align = int(self.meta.get("general.alignment", 32))
        start = -(-self.pos // align) * align
        self.tensors: list[tuple[str, QT, tuple[int, ...], np.ndarray]] = []
        for name, qtype, shape, offset in infos:
            block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
            n_bytes = int(np.prod(shape)) // block_size * type_size
            self.tensors.append((name, qtype, shape, self.mm[start + offset : start + offset + n_bytes]))

    def _take(self, fmt: str) -> tuple:
        out = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return out

    def _str(self) -> str:
        (n,) = self._take("<Q")
        self.pos += n
        return bytes(self.buf[self.pos - n : self.pos]).decode("utf-8", errors="replace")

    def _value(self, vtype: int) -> object:
        """Scalars and strings are returned; arrays are skipped (returned as None) -- we never need them."""
        if vtype == _STRING:
            return self._str()
        if vtype != _ARRAY:
            return self._take("<" + _SCALARS[vtype])[0]
        etype, count = self._take("<IQ")
        if etype in _SCALARS:
            self.pos += count * struct.calcsize(_SCALARS[etype])
        elif etype == _STRING:
            for _ in range(count):
                self.pos += 8 + struct.unpack_from("<Q", self.buf, self.pos)[0]
        else:
            for _ in range(count):
                self._value(etype)
        return None


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Temporarily cap torch's intra-op threads (restored before control returns to the caller).

    Why: dequantization is hundreds of small memory-bound ops; with OpenMP workers spin-waiting at every op
    boundary, a busy 2-core box took 8-20 s instead of <1 s single-threaded, for at best 2x when idle.
    """
    prev = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def load_gguf_weights(path: str, progress: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, float32 tensor)`` in HF layout for every GGUF tensor an HF decoder model uses.

    Tensors are memory-mapped and decoded one at a time, so peak memory stays at about one fp32 tensor.
    """
    f = _GGUFFile(path)
    arch = str(f.meta.get("general.architecture"))
    n_head = f.meta.get(f"{arch}.attention.head_count")
    n_head_kv = f.meta.get(f"{arch}.attention.head_count_kv") or n_head
    permuted = arch in _PERMUTED_ARCHS and isinstance(n_head, int)
    for gguf_name, qtype, shape, data in tqdm(
        f.tensors, desc="Loading GGUF weights", unit="tensor", disable=not progress
    ):
        name = _hf_name(gguf_name)
        if name is None:
            continue  # e.g. llama3's rope_freqs: recomputed from the config by the model
        with _torch_threads(1):
            w = dequantize(data, qtype, shape)
            if permuted and ".self_attn.q_proj." in name:
                w = _unpermute(w, int(n_head))
            elif permuted and ".self_attn.k_proj." in name:
                w = _unpermute(w, int(n_head_kv))
        yield name, w
