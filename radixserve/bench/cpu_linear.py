"""Where a CPU decode step goes: the matmul kernels torch offers for its weights, and the step's op profile.

    python -m radixserve.bench.cpu_linear [--model PATH] [--batch-size 1 8] [--output r.json]

Part 1 times the decoder's matmuls for one decode step (every layer's qkv, o, gate_up and down, and the
LM head) with distinct weights per layer, so they stream from memory as in the model and not from cache,
once per weight format torch has a CPU kernel for:
    float32      F.linear (MKL)
    fp16_fbgemm  quantized::linear_dynamic_fp16: fp16 weights, fp32 activations (--cpu-weight-dtype float16)
    int8_fbgemm  quantized::linear_dynamic: int8 per-channel weights, activations quantized per tensor
    int8pack     aten::_weight_int8pack_mm with bf16 activations (its fp32 path is scalar here)
next to the step's memory floor: the format's weight bytes over the read bandwidth measured in the same
process (a large tensor sum). Part 2 runs the engine (`--cpu-weight-dtype` as given, default auto) on
one request and records the median step time and torch.profiler's per-op table of ten decode steps.
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from radixserve.args import CPU_WEIGHT_DTYPES, ServerArgs
from radixserve.bench.roofline import record
from radixserve.core import Req, SamplingParams
from radixserve.engine_unit import Engine
from radixserve.layers.quantization.cpu_fp16 import cpu_fp16_available, pack_fp16


def read_bandwidth(nbytes: int = 1 << 30) -> float:
    """Bytes/s of reading a large float32 tensor once (sum), best of 5."""
    x = torch.ones(nbytes // 4)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return nbytes / best


def _formats() -> dict[str, tuple[Callable[[torch.Tensor], object], Callable[[torch.Tensor, object], torch.Tensor],
                                  float, torch.dtype]]:
    """name -> (prepare weight, multiply, bytes per weight, activation dtype)."""
    def q8(w: torch.Tensor) -> object:
        s = (w.abs().amax(1) / 127).clamp_min(1e-8)
        q = torch.quantize_per_channel(w, s.double(), torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8)
        return torch.ops.quantized.linear_prepack(q, None)

    def int8pack(w: torch.Tensor) -> object:
        s = (w.abs().amax(1) / 127).clamp_min(1e-8)
        return (w / s[:, None]).round().to(torch.int8), s.bfloat16()

    out = {"float32": (lambda w: w, lambda x, w: F.linear(x, w), 4.0, torch.float32),
           "int8pack": (int8pack, lambda x, w: torch._weight_int8pack_mm(x, w[0], w[1]), 1.0, torch.bfloat16)}
    if cpu_fp16_available():
        out["fp16_fbgemm"] = (pack_fp16,
                              lambda x, w: torch.ops.quantized.linear_dynamic_fp16(x, w), 2.0, torch.float32)
        out["int8_fbgemm"] = (q8, lambda x, w: torch.ops.quantized.linear_dynamic(x, w, True), 1.0, torch.float32)
    return out


def matmul_step(shapes: list[tuple[int, int]], layers: int, head: tuple[int, int], batch: int,
                bandwidth: float, repeats: int = 10) -> dict:
    """Median seconds of one decode step's matmuls per weight format, and its memory floor."""
    g = torch.Generator().manual_seed(0)
    results = {}
    for name, (prep, mul, width, act) in _formats().items():
        weights = [[prep(torch.randn(n, k, generator=g) * 0.05) for n, k in shapes] for _ in range(layers)]
        head_w = prep(torch.randn(*head, generator=g) * 0.05)
        xs = {k: torch.randn(batch, k, generator=g).to(act) for _, k in [*shapes, head]}

        seconds = _time_step(mul, weights, head_w, xs, shapes, head, repeats)
        nbytes = (layers * sum(n * k for n, k in shapes) + head[0] * head[1]) * width
        results[name] = {"step_s": seconds, "weight_bytes": nbytes, "floor_s": nbytes / bandwidth,
                         "fraction_of_floor": nbytes / bandwidth / seconds}
    return results


def _time_step(mul: Callable, weights: list[list[object]], head_w: object, xs: dict[int, torch.Tensor],
               shapes: list[tuple[int, int]], head: tuple[int, int], repeats: int) -> float:
    def step() -> None:
        for layer in weights:
            for w, (_, k) in zip(layer, shapes):
                mul(xs[k], w)
        mul(xs[head[1]], head_w)

    for _ in range(2):
        step()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def decode_profile(args: ServerArgs, context: int = 128, steps: int = 40) -> dict:
    """The engine's median decode step for one request, and the top ops of ten steps by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    engine = Engine(args)
    sp = SamplingParams(temperature=0, max_new_tokens=steps + 40, ignore_eos=True)
    engine.scheduler.add_request(Req(list(range(100, 100 + context)), sp))
    sched = engine.scheduler
    for _ in range(10):
        sched.step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        sched.step()
        times.append(time.perf_counter() - t)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            sched.step()
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    return {"step_s": statistics.median(times), "linear_layers": engine.runner.cfg.quant.describe()
            if engine.runner.cfg.quant else "float32",
            "weight_bytes": engine.runner.weight_bytes,
            "top_ops_per_step": [{"op": e.key, "self_ms": e.self_cpu_time_total / 10 / 1e3,
                                  "calls": e.count // 10} for e in ops]}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="Model (default: the bundled SmolLM2-135M GGUF).")
    p.add_argument("--cpu-weight-dtype", default="auto", choices=CPU_WEIGHT_DTYPES)
    p.add_argument("--batch-size", type=int, nargs="+", default=[1, 8])
    p.add_argument("--skip-engine", action="store_true", help="Only the matmul table (no engine profile).")
    p.add_argument("--output", help="Write the figures as JSON here.")
    a = p.parse_args(argv)
    sargs = ServerArgs(model=a.model, device="cpu", max_total_tokens=4096, cpu_weight_dtype=a.cpu_weight_dtype)
    from radixserve.weights.loader import load_config, resolve_model
    cfg = load_config(resolve_model(sargs.model))
    h, d = cfg.hidden_size, cfg.head_dim
    shapes = [((cfg.num_heads + 2 * cfg.num_kv_heads) * d, h), (h, cfg.num_heads * d),
              (2 * cfg.intermediate_size, h), (h, cfg.intermediate_size)]
    bw = read_bandwidth()
    figures: dict = {"read_bandwidth_GBps": bw / 1e9, "threads": torch.get_num_threads(),
                     "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                     "matmul_step": {f"batch_{b}": matmul_step(shapes, cfg.num_layers, (cfg.vocab_size, h), b, bw)
                                     for b in a.batch_size}}
    if not a.skip_engine:
        figures["engine_decode"] = decode_profile(sargs)
    out = record(a.output, figures, "cpu")
    for b, table in figures["matmul_step"].items():
        for name, r in table.items():
            print(f"{b:>8} {name:>12}: {r['step_s'] * 1e3:7.2f} ms  (floor {r['floor_s'] * 1e3:6.2f} ms, "
                  f"{r['fraction_of_floor']:.0%})")
    if "engine_decode" in figures:
        e = figures["engine_decode"]
        print(f"engine decode step ({e['linear_layers']}): {e['step_s'] * 1e3:.1f} ms")
        for op in e["top_ops_per_step"]:
            print(f"  {op['op']:<55} {op['self_ms']:7.2f} ms {op['calls']:5d} calls")
    return out


if __name__ == "__main__":
    main()
