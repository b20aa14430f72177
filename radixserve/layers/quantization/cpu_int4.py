"""4-bit weights for CPU decoding: GGUF's Q4_0 / Q4_1 matrices kept at 4 bits, torch's int4 CPU kernel.

Why: a CPU decode step is bound by the weight bytes it streams. The bundled SmolLM2 GGUF stores its linear
layers as Q4_1 (4-bit values, a scale and a minimum per 32 weights); dequantized to float16 they are 3.6x the
bytes. `torch.ops.aten._weight_int4pack_mm_for_cpu` multiplies by such a matrix directly: measured on the
2-core AVX2 test machine (benchmarks/README.md), one 3072x576 GEMV takes ~70 us against ~140 us for FBGEMM's
float16, and a decode step of the bundled model runs ~1.5x faster.

What it costs: the kernel takes bfloat16 activations and bfloat16 scales, so each matmul's input and output
are rounded to bfloat16 (8 bits of mantissa) while everything between the matmuls (norms, rotary, attention,
the residual stream) stays float32. llama.cpp itself rounds the activations of a Q4_1 matmul to 8-bit
integers. tests/test_cpu_int4.py states the tolerance against the float32 engine on the same weights.

How the 4-bit values are found: the GGUF loader hands every tensor over dequantized to float32, as it does
for every other format, and `int4_grid` recovers the 4-bit values, scales and zero points from them:
in a Q4_1 group of 32 the smallest weight is the minimum and the largest is minimum + 15 x scale (the encoder
puts both ends of the range on the grid); in a Q4_0 group the weight of largest magnitude is -8 x scale. The
recovery is checked: every weight must come back to within float32 rounding, otherwise the matrix is not a
4-bit grid (a float16 checkpoint, a Q8_0 or K-quant tensor) and keeps the float16 path. So a matrix is either
exactly the checkpoint's 4-bit values, or not touched.

Batches: the int4 kernel's cost grows with the rows it multiplies (it dequantizes per row), FBGEMM's float16
GEMM does not, so a layer keeps both and takes int4 for at most `INT4_MAX_ROWS` rows (measured crossover,
benchmarks/README.md); prefill and large decode batches take float16. The int4 copy is ~0.6 bytes a weight
on top of the float16 one.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from radixserve.layers.quantization.base import LinearMethod, QuantConfig
from radixserve.layers.quantization.cpu_fp16 import CpuFp16LinearMethod

if TYPE_CHECKING:
    from radixserve.layers.linear import LinearBase

GROUP = 32  # GGUF Q4_0 / Q4_1 block: one scale (and minimum) per 32 weights along the input dim
INT4_MAX_ROWS = 4  # rows (tokens) up to which the int4 kernel beats float16 FBGEMM on the test machine
_RTOL = 1e-5  # float32 rounding of d * q + m, relative to the group's largest magnitude


def cpu_int4_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


def int4_grid(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(q [N, K] int32 in 0..15, scale [N, K/32], zero [N, K/32]) with w == (q - 8) * scale + zero per group
    of 32 along K, recovered from float32 `w` [N, K]; None when w is not such a grid (module docstring)."""
    n, k = w.shape
    if k % GROUP:
        return None
    if int4_grid_rows(w[:8]) is None:  # most non-grid matrices fail on their first rows: skip the rest
        return None
    return int4_grid_rows(w)


def int4_grid_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    n, k = w.shape
    g = w.float().reshape(n, k // GROUP, GROUP)
    tol = _RTOL * g.abs().amax(-1, keepdim=True) + 1e-30
    # Q4_1: w = d * q + lo, q in 0..15, with q = 0 at the smallest weight and q = 15 at the largest
    lo, hi = g.amin(-1, keepdim=True), g.amax(-1, keepdim=True)
    d = (hi - lo) / 15
    safe = torch.where(d > 0, d, torch.ones_like(d))
    q = ((g - lo) / safe).round().clamp(0, 15)
    ok1 = ((q * d + lo - g).abs() <= tol).all(-1, keepdim=True)
    # Q4_0: w = d * (q - 8), q = 0 at the weight of largest magnitude
    big = g.gather(-1, g.abs().argmax(-1, keepdim=True))
    d0 = -big / 8
    safe0 = torch.where(d0 != 0, d0, torch.ones_like(d0))
    q0 = ((g / safe0).round() + 8).clamp(0, 15)
    ok0 = (((q0 - 8) * d0 - g).abs() <= tol).all(-1, keepdim=True)
    if not bool((ok1 | ok0).all()):
        return None
    q = torch.where(ok1, q, q0)
    scale = torch.where(ok1, d, d0)
    zero = torch.where(ok1, lo + 8 * d, torch.zeros_like(d))
    return q.reshape(n, k).to(torch.int32), scale[..., 0], zero[..., 0]


class CpuInt4LinearMethod(CpuFp16LinearMethod):
    """A layer whose loaded weight is a 4-bit grid gets the int4 copy (buffers `int4_weight`,
    `int4_scale_zero`) beside FBGEMM's float16 one; any other layer is exactly the float16 method."""

    description = "4-bit GGUF weights (int4 kernel) for decode, float16 (FBGEMM) for prefill"

    def process_weights_after_loading(self, layer: LinearBase) -> None:
        grid = int4_grid(layer.weight.data)
        if grid is not None:
            q, scale, zero = grid
            layer.register_buffer("int4_weight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1),
                                  persistent=False)
            # the kernel's layout: [K / 32, N, (scale, zero)], in the activation dtype (bfloat16)
            sz = torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous()
            layer.register_buffer("int4_scale_zero", sz, persistent=False)
        super().process_weights_after_loading(layer)
        if grid is not None:
            layer.int4_nbytes = layer.int4_weight.numel() + sz.numel() * sz.element_size()

    def apply(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        w = getattr(layer, "int4_weight", None)
        if w is None or x.numel() > INT4_MAX_ROWS * x.shape[-1]:
            return super().apply(layer, x, bias)
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16), w, GROUP, layer.int4_scale_zero)
        y = y.to(x.dtype)
        if bias is not None:
            y = y + bias
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], y.shape[-1])


class CpuInt4Config(QuantConfig):
    """Chosen by `--cpu-weight-dtype` (auto on an x86 CPU with a float32 model), never by a checkpoint."""

    name = "cpu_int4"

    def linear_method(self) -> LinearMethod:
        return CpuInt4LinearMethod()

    def lm_head_method(self, tied: bool) -> LinearMethod:
        return CpuInt4LinearMethod(keep_weight=tied)
