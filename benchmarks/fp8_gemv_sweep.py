"""Tile sweep for the W8A16 GEMV (kernels/fp8.py, M = 1) measured the way a decode step runs it: one CUDA
graph replays the product over `--layers` distinct weights of a shape (as 32 decoder layers do), so L2
holds none of them and launch gaps are gone; time per product -> bytes per second against the copy
bandwidth measured in the same process, next to what the kernel's autotuner picks ("autotuned"). What
kernels.fp8's GEMV candidate list follows.

`--chain` runs each GEMV behind an RMSNorm over its input row, as in a decode step, with programmatic
dependent launch on (sm_90+): the RMSNorm lets the GEMV become resident and prefetch its weight rows
while it runs. The time is then per (RMSNorm + GEMV) pair, and the best tile per shape is what
kernels.fp8.GEMV_TABLE holds; candidates also vary how much of each row is prefetched (PREFETCH_K).

    python benchmarks/fp8_gemv_sweep.py --output benchmarks/results/fp8_gemv_sweep_h200.json
    python benchmarks/fp8_gemv_sweep.py --chain --output benchmarks/results/fp8_gemv_chain_sweep_h200.json
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
from radixserve.kernels import fused, pdl  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
          "lm_head": (128256, 4096)}


def candidates(chain: bool) -> list[dict]:
    """Without --chain the full tile grid; with it the tiles that led the plain sweep
    (fp8_gemv_sweep_h200.json) times three prefetch depths (each new combination is a Triton compile)."""
    if chain:
        return [{"BLOCK_N": bn, "BLOCK_K": bk, "num_warps": 4, "num_stages": stages, "PREFETCH_K": prefetch,
                 "gemv": True}
                for (bn, bk), stages, prefetch in itertools.product(
                    [(4, 1024), (8, 512), (8, 1024), (16, 256), (16, 512), (32, 256)], [2, 3, 4], [1024, 2048, 4096])]
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
    p.add_argument("--chain", action="store_true", help="each GEMV behind an RMSNorm that PDL-triggers it")
    a = p.parse_args()
    lim = limits("cuda")
    pdl_on = pdl.configure(a.chain, torch.device("cuda"))
    bw = lim["copy_bandwidth_GBps"] * 1e9
    rows, best = [], {}
    for name in a.shapes.split(","):
        n, k = SHAPES[name]
        layers = a.layers if name != "lm_head" else 4
        q, s = F8.quantize_rows(torch.randn(n, k, device="cuda"))
        ws = [q] + [q.clone() for _ in range(layers - 1)]
        for m in [1]:
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            norm_w = torch.ones(k, device="cuda", dtype=torch.bfloat16)
            ref = torch.nn.functional.linear(fused.rmsnorm(x, norm_w, 1e-6) if a.chain else x,
                                             F8.dequantize(q, s, torch.bfloat16))
            results = []

            def step(c, ws=ws, s=s, x=x, norm_w=norm_w):
                if not a.chain:
                    return [F8.w8a16_gemm(x, w, s, config=c) for w in ws]
                return [F8.w8a16_gemm(fused.rmsnorm(x, norm_w, 1e-6), w, s, config=c) for w in ws]

            for c in candidates(a.chain) + [None]:  # None: the autotuner's choice (tuned in graph_time's warm-up)
                try:
                    out = step(c)[0]
                    assert (out.float() - ref.float()).norm() / ref.float().norm() < 2e-2
                    t = graph_time(lambda c=c: step(c)) / layers
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
    record(a.output, {"limits": lim, "chain": a.chain, "pdl": pdl_on, "best": best, "rows": rows,
                      "table": {f"{r['best']['N']}x{r['best']['K']}": {k2: v for k2, v in r["best"]["config"].items()
                                                                     if k2 != "gemv"} for r in best.values()}},
           "cuda")


if __name__ == "__main__":
    main()
