"""Where a concurrency-1 prefill's host time goes (issue 14: the "prefill launch" hop of a 128-token prompt took
17 ms on the H200 while its kernels took ~5 ms, and piecewise CUDA graphs did not shorten it).

    python benchmarks/prefill_host_profile.py --model llama-3.1-8b --load-format dummy [--enable-piecewise-cuda-graph]
        [--lens 16,128,512] [--rounds 12] [--top 30] [--output out.json]

For each prompt length: a warm-up round, then `rounds` single-request prefills (max_new_tokens 1, fresh random
prompts so nothing is cached), each timed from add_request to the scheduler step that launched its forward
returning (host time) and to the device finishing it (synchronize); then cProfile over `rounds` more, whose top
functions by own time and by cumulative time say which Python the host time is spent in.
"""
from __future__ import annotations

import cProfile
import pstats
import time
from statistics import median

import torch

from radixserve.args import make_parser
from radixserve.bench.one_batch import split_args, sync
from radixserve.bench.roofline import record
from radixserve.core import Req, SamplingParams
from radixserve.engine_unit import Engine


def one_prefill(engine: Engine, ids: list[int]) -> tuple[float, float]:
    """(host seconds until the forward is launched, seconds until the device has finished it)."""
    sched, dev = engine.scheduler, engine.args.device
    req = Req(ids, SamplingParams(temperature=0, max_new_tokens=1))
    sync(dev)
    t0 = time.perf_counter()
    sched.add_request(req)
    while not sched.running and not req.finished and sched.waiting:
        sched.step()
    launched = time.perf_counter() - t0
    sync(dev)
    done = time.perf_counter() - t0
    while sched.has_work:
        sched.step()
    return launched, done


def top_functions(prof: cProfile.Profile, key: str, n: int, rounds: int) -> list[dict]:
    st = pstats.Stats(prof)
    st.sort_stats(key)
    rows = []
    for func in st.fcn_list[:n]:
        cc, nc, tt, ct, _ = st.stats[func]
        rows.append({"function": f"{func[0].split('site-packages/')[-1].split('radixserve/')[-1]}:{func[1]}({func[2]})",
                     "calls_per_prefill": round(nc / rounds, 1), "own_ms_per_prefill": round(tt * 1e3 / rounds, 3),
                     "cum_ms_per_prefill": round(ct * 1e3 / rounds, 3)})
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser("python benchmarks/prefill_host_profile.py")
    parser.add_argument("--lens", default="16,128,512")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--output")
    args, b = split_args(parser.parse_args(argv), {"lens", "rounds", "top", "output"})
    engine = Engine(args)
    vocab, rounds = engine.runner.cfg.vocab_size, b["rounds"]
    gen = torch.Generator().manual_seed(0)
    fresh = lambda n: torch.randint(10, vocab - 10, (n,), generator=gen).tolist()  # noqa: E731
    results = []
    for n in [int(x) for x in b["lens"].split(",")]:
        for _ in range(3):
            one_prefill(engine, fresh(n))
        timed = [one_prefill(engine, fresh(n)) for _ in range(rounds)]
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(rounds):
            one_prefill(engine, fresh(n))
        prof.disable()
        row = {"prompt_tokens": n, "host_launch_ms_median": round(median(t[0] for t in timed) * 1e3, 2),
               "device_done_ms_median": round(median(t[1] for t in timed) * 1e3, 2),
               "by_own_time": top_functions(prof, "tottime", b["top"], rounds),
               "by_cumulative_time": top_functions(prof, "cumulative", b["top"], rounds)}
        results.append(row)
        print(f"--- {n} tokens: host launch {row['host_launch_ms_median']} ms, device done "
              f"{row['device_done_ms_median']} ms (medians of {rounds}; profiled rounds run slower)")
        for r in row["by_own_time"][:18]:
            print(f"  own {r['own_ms_per_prefill']:8.3f} ms  cum {r['cum_ms_per_prefill']:8.3f} ms  "
                  f"x{r['calls_per_prefill']:<7} {r['function']}")
        print("  by cumulative:")
        for r in row["by_cumulative_time"][:22]:
            print(f"  cum {r['cum_ms_per_prefill']:8.3f} ms  x{r['calls_per_prefill']:<7} {r['function']}")
    report = {"benchmark": "prefill_host_profile", "results": results,
              "piecewise": bool(args.enable_piecewise_cuda_graph)}
    return record(b.get("output"), report, str(engine.runner.device))


if __name__ == "__main__":
    main()
