"""GPU idle time between decode steps: the share of wall time in steady decode when no kernel runs.

Method: torch.profiler (CUPTI) records every kernel's device interval over N decode steps of a
full batch; idle = 1 - |union of kernel intervals| / (last kernel end - first kernel start). Host
work that is not hidden by overlap scheduling shows up as gaps between the steps' kernels.

    python -m radixserve.bench.gpu_idle --model qwen3-0.6b --load-format dummy --batch-size 64
    python -m radixserve.bench.gpu_idle ... --phase prefill --batch-size 8 --input-len 2048 --kernel-table 25
"""
from __future__ import annotations

import torch
from torch.autograd import DeviceType

from radixserve.args import make_parser
from radixserve.bench.one_batch import split_args
from radixserve.bench.roofline import record
from radixserve.core import Req, SamplingParams
from radixserve.engine_unit import Engine


def busy_fraction(intervals: list[tuple[float, float]]) -> tuple[float, float]:
    """(busy time, span) of the union of [start, end) intervals."""
    intervals.sort()
    busy, cur_s, cur_e = 0.0, *intervals[0]
    for s, e in intervals[1:]:
        if s > cur_e:
            busy, cur_s, cur_e = busy + cur_e - cur_s, s, e
        else:
            cur_e = max(cur_e, e)
    busy += cur_e - cur_s
    return busy, intervals[-1][1] - intervals[0][0]


def kernel_table(prof, steps: int, n: int) -> list[dict]:
    """The n kernels with the most device time: microseconds and launches per step, by kernel name."""
    total: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            t = total.setdefault(e.name, [0.0, 0])
            t[0] += e.time_range.end - e.time_range.start
            t[1] += 1
    rows = sorted(total.items(), key=lambda kv: -kv[1][0])[:n]
    return [{"name": k, "us_per_step": v[0] / steps, "calls_per_step": v[1] / steps} for k, v in rows]


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser("python -m radixserve.bench.gpu_idle")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--output")
    parser.add_argument("--kernel-table", type=int, default=0, help="Also print the N kernels taking most time.")
    parser.add_argument("--phase", choices=("decode", "prefill"), default="decode",
                        help="decode: profile `--steps` steady decode steps of a full batch; prefill: profile the "
                             "scheduler steps that prefill the batch (steps then counts those).")
    args, b = split_args(parser.parse_args(argv), {"batch_size", "input_len", "steps", "output", "kernel_table",
                                                   "phase"})
    engine = Engine(args)
    bs, steps = b.get("batch_size", 64), b.get("steps", 100)
    gen = torch.Generator().manual_seed(0)
    sp = SamplingParams(temperature=0, max_new_tokens=steps + 64, ignore_eos=True)
    reqs = [Req(torch.randint(10, 1000, (b.get("input_len", 256),), generator=gen).tolist(), sp) for _ in range(bs)]
    prefill = b.get("phase") == "prefill"
    if prefill:  # a warm-up round of the same shapes first (Triton autotuning, allocator), then a fresh batch
        warm = [Req(list(r.origin_input_ids), SamplingParams(temperature=0, max_new_tokens=1)) for r in reqs]
        for r in warm:
            engine.scheduler.add_request(r)
        while not all(r.finished for r in warm):
            engine.scheduler.step()
        reqs = [Req([t + 1 for t in r.origin_input_ids], sp) for r in reqs]
    for r in reqs:
        engine.scheduler.add_request(r)
    if not prefill:
        while len(engine.scheduler.running) < bs or min(len(r.output_ids) for r in reqs) < 8:
            engine.scheduler.step()  # prefill everything, then a few decode steps (warm, steady state)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        if prefill:
            steps = 0
            while min(len(r.output_ids) for r in reqs) < 1:
                engine.scheduler.step()
                steps += 1
        else:
            for _ in range(steps):
                engine.scheduler.step()
        torch.cuda.synchronize()
    kernels = [(e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA]
    busy, span = busy_fraction(kernels)
    fig = {"model": engine.src.name, "phase": b.get("phase", "decode"), "batch_size": bs,
           "input_len": b.get("input_len", 256),
           "steps": steps, "overlap": args.overlap_schedule,
           "cuda_graph": not args.disable_cuda_graph, "gpu_busy_us": busy, "span_us": span,
           "gpu_idle_fraction": 1 - busy / span, "step_ms": span / steps / 1e3,
           "kernels_per_step": len(kernels) / steps}
    if b.get("kernel_table"):
        fig["kernels"] = kernel_table(prof, steps, b["kernel_table"])
        for row in fig["kernels"]:
            print(f"{row['us_per_step']:9.1f} us/step {row['calls_per_step']:6.1f}x  {row['name'][:110]}")
    out = record(b.get("output"), fig, args.device)
    print({k: out[k] for k in ("overlap", "gpu_idle_fraction", "step_ms")})
    return out


if __name__ == "__main__":
    main()
