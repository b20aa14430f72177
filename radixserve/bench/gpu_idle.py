"""GPU idle time between decode steps: the share of wall time in steady decode when no kernel runs.

Method: torch.profiler (CUPTI) records every kernel's device interval over N decode steps of a
full batch; idle = 1 - |union of kernel intervals| / (last kernel end - first kernel start). Host
work that is not hidden by overlap scheduling shows up as gaps between the steps' kernels.

    python -m radixserve.bench.gpu_idle --model qwen3-0.6b --load-format dummy --batch-size 64
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


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser("python -m radixserve.bench.gpu_idle")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--output")
    parser.add_argument("--kernel-table", type=int, default=0, help="Also print the N kernels taking most time.")
    args, b = split_args(parser.parse_args(argv), {"batch_size", "input_len", "steps", "output", "kernel_table"})
    engine = Engine(args)
    bs, steps = b.get("batch_size", 64), b.get("steps", 100)
    gen = torch.Generator().manual_seed(0)
    sp = SamplingParams(temperature=0, max_new_tokens=steps + 64, ignore_eos=True)
    reqs = [Req(torch.randint(10, 1000, (b.get("input_len", 256),), generator=gen).tolist(), sp) for _ in range(bs)]
    for r in reqs:
        engine.scheduler.add_request(r)
    while len(engine.scheduler.running) < bs or min(len(r.output_ids) for r in reqs) < 8:
        engine.scheduler.step()  # prefill everything, then a few decode steps (warm, steady state)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine.scheduler.step()
        torch.cuda.synchronize()
    kernels = [(e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == DeviceType.CUDA]
    busy, span = busy_fraction(kernels)
    fig = {"model": engine.src.name, "batch_size": bs, "decode_steps": steps, "overlap": args.overlap_schedule,
           "cuda_graph": not args.disable_cuda_graph, "gpu_busy_us": busy, "span_us": span,
           "gpu_idle_fraction": 1 - busy / span, "step_ms": span / steps / 1e3,
           "kernels_per_step": len(kernels) / steps}
    if b.get("kernel_table"):
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=b["kernel_table"],
                                        max_name_column_width=60))
    out = record(b.get("output"), fig, args.device)
    print({k: out[k] for k in ("overlap", "gpu_idle_fraction", "step_ms")})
    return out


if __name__ == "__main__":
    main()
