"""Tile sweep for the W8A16 GEMV (kernels/fp8.py, M = 1) measured the way a decode step runs it: one CUDA
graph replays the product over `--layers` distinct weights of a shape (as 32 decoder layers do), so L2
holds none of them and launch gaps are gone; time per product -> bytes per second against the copy
bandwidth measured in the same process, next to what the kernel's autotuner picks ("autotuned"). What
kernels.fp8's GEMV candidate list follows.

    python benchmarks/fp8_gemv_sweep.py --output benchmarks/results/fp8_gemv_sweep_h200.json
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from radixserve.bench.roofline import limits, record  # noqa: E402
from radixserve.kernels import fp8 as F8  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}


def candidates() -> list[dict]:
    out = []
    for bn, bk, warps, stages in itertools.product([4, 8, 16, 32], [256, 512, 1024], [4, 8], [2, 3, 4]):
        if bn * bk // (32 * warps) > 128:  # accumulator registers a thread: spills beyond
            continue
        out.append({"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps, "num_stages": stages, "gemv": True})
    return out


def graph_time(fn, reps: int = 5) -> float:
    """Median seconds of one replay of a graph that runs fn once."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        g.replay()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--output", default=None)
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--shapes", default=",".join(SHAPES))
    a = p.parse_args()
    lim = limits("cuda")
    bw = lim["copy_bandwidth_GBps"] * 1e9
    rows, best = [], {}
    for name in a.shapes.split(","):
        n, k = SHAPES[name]
        layers = a.layers if name != "lm_head" else 4
        q, s = F8.quantize_rows(torch.randn(n, k, device="cuda"))
        ws = [q] + [q.clone() for _ in range(layers - 1)]
        for m in [1]:
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            ref = torch.nn.functional.linear(x, F8.dequantize(q, s, torch.bfloat16))
            results = []
            for c in candidates() + [None]:  # None: the autotuner's choice (tuned in graph_time's warm-up)
                try:
                    out = F8.w8a16_gemm(x, q, s, config=c)
                    assert (out.float() - ref.float()).norm() / ref.float().norm() < 2e-2
                    t = graph_time(lambda c=c, x=x, s=s, ws=ws: [F8.w8a16_gemm(x, w, s, config=c) for w in ws]) / layers
                except Exception as e:  # noqa: BLE001 (a config that does not compile is skipped, and said so)
                    print(f"{name} M={m} {c}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                    continue
                row = {"layer": name, "N": n, "K": k, "M": m, "config": c or {}, "autotuned": c is None, "us": t * 1e6,
                       "TBps": n * k / t / 1e12, "fraction_of_copy": n * k / t / bw}
                results.append(row)
            results.sort(key=lambda r: r["us"])
            rows += results
            shipped = next((r for r in results if r["autotuned"]), None)
            best[f"{name}/M{m}"] = {"best": results[0], "autotuned": shipped}
            print(f"{name:>8} M={m}: best {results[0]['us']:7.2f} us {results[0]['fraction_of_copy']:.1%} "
                  f"{ {k2: v for k2, v in results[0]['config'].items() if k2 != 'gemv'} }; autotuned "
                  f"{shipped['us'] if shipped else float('nan'):7.2f} us "
                  f"{shipped['fraction_of_copy'] if shipped else float('nan'):.1%}", flush=True)
        ws = q = s = None
        torch.cuda.empty_cache()
    record(a.output, {"limits": lim, "best": best, "rows": rows}, "cuda")


if __name__ == "__main__":
    main()
