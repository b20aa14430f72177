"""--enable-torch-compile: decode batches up to --torch-compile-max-bs run a torch.compile'd forward.

At small batch a decode step is hundreds of short kernels; Inductor fuses the elementwise work between
the matmuls (residual add + RMSNorm, SiLU-and-mul, q/k norm, the final norm and the logits cast) into
fewer. That is where the tuning guide says compile pays: small models at small batch sizes. Larger
batches run the eager model, as in SGLang.

The traced function takes only tensors, and attention is one opaque op (layers/attention.py), so no
int or object attribute of a batch becomes a guard: one graph serves every step of a batch size. With
CUDA graphs each padded batch size gets its own static-shape graph, which the CUDA graph runner
captures; without them (CPU, --disable-cuda-graph) batch sizes are not padded, and one shape-generic
graph serves them all.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from radixserve.engine.cuda_graph import capture_sizes

# Inductor's default mode: matmuls stay cuBLAS. "max-autotune-no-cudagraphs" (SGLang's) picked Triton
# matmul templates that ran slower than cuBLAS inside our graphs for Qwen3-0.6B at batch 1 and 8 on an
# H100 (1.70 vs 1.30 ms per step; benchmarks/README.md). Graphs stay ours (the CUDA graph runner).
CUDA_MODE: str | None = None


def compile_decode(model: torch.nn.Module, device: torch.device, max_bs: int, cuda_graphs: bool) -> Callable:
    """(input_ids [B], positions [B]) -> logits [B, vocab] float32, for a decode batch bound to
    layers.attention.FORWARD_CONTEXT."""
    def decode(input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return model.logits(model.model(input_ids, positions, None))

    import torch._dynamo  # here, not at module import: it costs 2 s of start-up for every server without the flag

    # one graph per captured batch size; torch's default allows 8 before falling back to eager
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, len(capture_sizes(max_bs)) + 2)
    return torch.compile(decode, fullgraph=True, dynamic=not cuda_graphs,
                         mode=CUDA_MODE if device.type == "cuda" else None)
