"""Half-size weights for CPU decoding: float16 weights packed for FBGEMM, float32 activations and sums.

Why: a CPU decode step is bound by the bytes of weight it streams from memory, and the float32 GEMV
behind `F.linear` reaches a third of the memory bandwidth (8 GB/s of 27 on the 2-core AVX2 test
machine). A CPU without AVX512-BF16 or AMX has no fast bfloat16 matmul (`--dtype bfloat16` runs 10x
slower per matmul there), but FBGEMM's fp16 GEMM (`quantized::linear_dynamic_fp16`) converts fp16 to
fp32 in registers: half the bytes read, and 3x faster than float32 per decode step
(`python -m radixserve.bench.cpu_linear`, benchmarks/results/cpu_linear_*.json). Rounding the weights
to float16 costs ~5e-4 relative error per weight; logits moved by up to 0.034 on the bundled model
(tests/test_cpu_fp16.py states the tolerance). `--cpu-weight-dtype float32` keeps the exact float32
path (what the HF-parity tests run).

Under --enable-torch-compile the GEMM is the opaque op `radixserve::linear_fp16` (below), so the packed
weights and Inductor's fused elementwise code run together: bundled model, batch 1, 2 cores, decode
28-29 vs 32 ms per token eager (`bench.one_batch --device cpu`, benchmarks/README.md).

The packed weight is an opaque FBGEMM object, not a parameter: `packed_numel` / `packed_nbytes` on the
layer say how many weights it holds and their fp16 bytes, what a step reads (`model_weight_bytes`,
rooflines). FBGEMM's allocation is larger than that: 1.8x the fp16 bytes, measured, so this saves time,
not memory.
"""
from __future__ import annotations

import itertools
import weakref
from typing import TYPE_CHECKING

import torch

from radixserve.layers.quantization.base import LinearMethod, QuantConfig
from radixserve.layers.quantization.unquantized import UnquantizedLinearMethod

if TYPE_CHECKING:
    from torch import nn

    from radixserve.layers.linear import LinearBase


def cpu_fp16_available() -> bool:
    """FBGEMM (x86 builds of torch) carries the fp16 GEMM; ARM builds (QNNPACK only) do not."""
    return "fbgemm" in torch.backends.quantized.supported_engines


def pack_fp16(weight: torch.Tensor) -> torch.ScriptObject:
    return torch.ops.quantized.linear_prepack_fp16(weight.detach().float().contiguous(), None)


class PackedFp16:
    """One layer's packed weight, owned by the layer. torch.compile cannot trace FBGEMM's packed-weight
    objects, so a traced forward (--enable-torch-compile) calls the GEMM through an op that names the
    weight by its key in PACKED: Inductor fuses everything between the matmuls, the op stays one opaque
    call into FBGEMM. PACKED holds the entries weakly, so an engine's weights go when its layers do."""

    _keys = itertools.count()

    def __init__(self, weight: torch.Tensor) -> None:
        self.obj = pack_fp16(weight)
        self.out_features = weight.shape[0]
        self.key = next(self._keys)
        PACKED[self.key] = self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, in] float32 -> [T, out] float32."""
        if torch.compiler.is_compiling():
            return torch.ops.radixserve.linear_fp16(x, self.key, self.out_features)
        return torch.ops.quantized.linear_dynamic_fp16(x, self.obj)


PACKED: weakref.WeakValueDictionary[int, PackedFp16] = weakref.WeakValueDictionary()


@torch.library.custom_op("radixserve::linear_fp16", mutates_args=())
def linear_fp16_op(x: torch.Tensor, key: int, out_features: int) -> torch.Tensor:
    return torch.ops.quantized.linear_dynamic_fp16(x, PACKED[key].obj)


@linear_fp16_op.register_fake
def _(x: torch.Tensor, key: int, out_features: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], out_features)


class CpuFp16LinearMethod(UnquantizedLinearMethod):
    """Loads like the plain matrix (the same parameter, sliced the same way), then packs it and drops the
    float32 copy. `keep_weight`: the packed copy sits beside the parameter (a tied LM head, whose weight
    is also the embedding table the first layer looks rows up in); an untied head drops it like any layer."""

    description = "float16 weights (FBGEMM), float32 activations"
    parallel_processing = True

    def __init__(self, keep_weight: bool = False) -> None:
        self.keep_weight = keep_weight

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        w = layer.weight
        layer.packed_weight = PackedFp16(w.data)
        layer.packed_numel = w.numel()
        layer.packed_nbytes = w.numel() * 2
        if not self.keep_weight:
            del layer.weight
            layer.register_parameter("weight", None)

    def apply(self, layer: LinearBase, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
        y = layer.packed_weight(x2 if x2.dtype == torch.float32 else x2.float())
        if bias is not None:
            y = y + bias
        if x.dim() != 2:
            y = y.reshape(*x.shape[:-1], y.shape[-1])
        return y if y.dtype == x.dtype else y.to(x.dtype)


class CpuFp16Config(QuantConfig):
    """Chosen by `--cpu-weight-dtype` (auto on an x86 CPU with a float32 model), never by a checkpoint."""

    name = "cpu_fp16"

    def linear_method(self) -> LinearMethod:
        return CpuFp16LinearMethod()

    def lm_head_method(self, tied: bool) -> LinearMethod:
        return CpuFp16LinearMethod(keep_weight=tied)


def model_weight_bytes(model: nn.Module) -> int:
    """Bytes of every weight the model holds: its parameters plus packed copies that are not parameters
    (float16 for FBGEMM, and the 4-bit ones of cpu_int4)."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return params + sum(getattr(m, "packed_nbytes", 0) + getattr(m, "int4_nbytes", 0) for m in model.modules())
