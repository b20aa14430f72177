"""FP8 vs bf16 linear layers at the Llama-3.1-8B shapes and the token counts of a shrinking decode batch
(8-128), timed the way the engine runs them: inside a CUDA graph that replays the product over `--layers`
distinct weights (so L2 does not serve a later layer's weight), the W8A16 Triton tile autotuned eagerly
before capture, W8A8 as `_scaled_mm` on an activation already quantized per token (what the RMSNorm /
SiLU kernels hand it; o_proj's input is quantized by its own kernel, which is timed with it). Says from
which token count W8A8 beats the W8A16 tile on each shape: what layers/quantization/fp8.py's
w8a8_min_tokens follows.

    python benchmarks/fp8_gemm_graph_bench.py --output benchmarks/results/fp8_gemm_graph_h200.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fp8_gemv_sweep import graph_time  # noqa: E402

from radixserve.bench.roofline import record  # noqa: E402
from radixserve.kernels import fp8 as F8  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
TOKENS = [8, 16, 24, 32, 40, 48, 56, 63, 64, 96, 128]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--output", default=None)
    p.add_argument("--layers", type=int, default=8)
    a = p.parse_args()
    rows, crossover = [], {}
    for name, (n, k) in SHAPES.items():
        wb = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(a.layers)]
        qs = [F8.quantize_rows(w) for w in wb]
        for m in TOKENS:
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            xq, xs = F8.quantize_rows_fused(x)
            for q, s in qs[:1]:
                F8.w8a16_gemm(x, q, s)  # autotune this (M bucket, N, K) outside the graph
            t_bf16 = graph_time(lambda: [F.linear(x, w) for w in wb]) / a.layers
            t_w8a16 = graph_time(lambda: [F8.w8a16_gemm(x, q, s) for q, s in qs]) / a.layers

            def w8a8():
                for q, s in qs:
                    aq, as_ = F8.quantize_rows_fused(x) if name == "o" else (xq, xs)
                    torch._scaled_mm(aq, q.t(), scale_a=as_, scale_b=s.reshape(1, -1), out_dtype=torch.bfloat16,
                                     use_fast_accum=True)
            t_w8a8 = graph_time(w8a8) / a.layers
            rows.append({"layer": name, "N": n, "K": k, "M": m, "bf16_us": t_bf16 * 1e6, "w8a16_us": t_w8a16 * 1e6,
                         "w8a8_us": t_w8a8 * 1e6})
            if name not in crossover and t_w8a8 < t_w8a16:
                crossover[name] = m
            print(f"{name:>8} M={m:>4}: bf16 {t_bf16 * 1e6:7.1f} us  w8a16 {t_w8a16 * 1e6:7.1f} us  "
                  f"w8a8 {t_w8a8 * 1e6:7.1f} us", flush=True)
        del wb, qs
        torch.cuda.empty_cache()
    out = record(a.output, {"rows": rows, "layers_per_graph": a.layers, "w8a8_first_faster_M": crossover}, "cuda")
    print("W8A8 first faster at M =", out["w8a8_first_faster_M"])


if __name__ == "__main__":
    main()
