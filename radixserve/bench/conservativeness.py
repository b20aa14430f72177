"""`--schedule-conservativeness auto` against a fixed value on the tuning guide's "common cause" workload:
requests with a large max_new_tokens that stop early at EOS (short-answer chat questions, greedy).

    python -m radixserve.bench.conservativeness [server flags...] [--num-prompts N] [--max-new-tokens M]
        [--compare 1.0] [--eos-every N] [--output out.json]

Both runs share one in-process Engine (same weights, same KV pool size) and run back to back in the same
process, each with a fresh scheduler and prefix cache; all requests are submitted at once (an offline
batch, as in the guide's throughput section). Reported per run: output tokens/s, mean token usage over
the decode steps on which requests were waiting, retraction warnings (and per minute), and, for auto,
each conservativeness change. Throughput is given per wall second and per CPU second of this process (the
latter is steadier when other work shares the machine).

Weights without meaning (`--load-format dummy`, the GPU host has no checkpoint) have no EOS behaviour:
`--eos-every N` then replaces the model's EOS set with a fixed random 1/N of the vocabulary and samples at
temperature 1 (seeded per request), so each request ends at "EOS" after about N tokens (geometrically
distributed) — to the scheduler exactly the guide's early-stopping workload, which it cannot foresee."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import sys
import time
from datetime import datetime, timezone
from statistics import mean

import torch

from radixserve.args import ServerArgs, make_parser
from radixserve.bench.roofline import device_name, git_commit
from radixserve.core import FinishReason, Req, SamplingParams
from radixserve.engine_unit import Engine
from radixserve.scheduler.scheduler import Scheduler

TOPICS = ["France", "Japan", "Brazil", "Canada", "Egypt", "Italy", "Kenya", "Spain", "India", "Peru", "Chile",
          "Norway", "Greece", "Mexico", "Ghana", "Poland", "Turkey", "Vietnam", "Sweden", "Cuba"]
QUESTIONS = ["What is the capital of {}? Answer in one short sentence.",
             "Name the official language of {} in a few words.",
             "Which continent is {} on? One sentence.",
             "What currency does {} use? Answer briefly."]
BENCH_FLAGS = ("num_prompts", "max_new_tokens", "compare", "eos_every", "output")


def workload(engine: Engine, n: int, max_new_tokens: int, eos_every: int = 0
             ) -> list[tuple[list[int], SamplingParams]]:
    """n chat prompts whose answers end at EOS after a few dozen tokens (greedy on a real model; with
    `eos_every`, sampled and seeded per request); max_new_tokens is the client's generous limit, far above
    what they use."""
    out = []
    for i in range(n):
        q = QUESTIONS[i % len(QUESTIONS)].format(TOPICS[(i // len(QUESTIONS)) % len(TOPICS)])
        ids = engine.apply_chat_template([{"role": "user", "content": q}])
        sp = SamplingParams(temperature=1.0, seed=i, max_new_tokens=max_new_tokens) if eos_every else \
            SamplingParams(temperature=0, max_new_tokens=max_new_tokens)
        out.append((ids, sp))
    return out


def random_eos_set(vocab_size: int, eos_every: int, seed: int = 0) -> frozenset[int]:
    """A fixed random 1/eos_every of the vocabulary: on near-flat logits a sampled token falls in it with
    probability ~1/eos_every at every step, whatever the logits look like (a random subset holds, on
    average, its share of any distribution)."""
    g = torch.Generator().manual_seed(seed)
    k = max(vocab_size // eos_every, 1)
    return frozenset(torch.randperm(vocab_size, generator=g)[:k].tolist())


@dataclasses.dataclass
class RunResult:
    conservativeness: str
    seconds: float
    cpu_seconds: float  # this process's CPU time: steadier than wall time on a shared machine
    output_tokens: int
    output_tok_s: float
    output_tok_per_cpu_s: float
    decode_steps: int
    token_usage_queued_mean: float  # decode steps with #queue-req > 0
    token_usage_queued_late: float  # the same over the second half of those steps (after the ramp-up)
    # the same from one controller window after auto's last change (the value it settled at, once the pool
    # has filled to it; fixed: all of them)
    token_usage_settled: float
    token_usage_mean: float
    running_mean: float
    retraction_events: int
    retracted_reqs: int
    retractions_per_min: float
    stopped_early: int  # requests that finished at EOS (not at max_new_tokens)
    # output tokens per request at the 50th / 90th / 99th percentile and the max: how far the workload's
    # lifetimes are from a geometric law (median 69, p99 459 for a mean of 100), which the model assumes
    output_len_quantiles: list[int]
    changes: list[str]
    final_conservativeness: float
    # one row per decode log interval: [seconds, decode step, token usage, #running-req, #queue-req,
    # new_token_ratio, conservativeness, retractions so far] -- the trajectory behind the figures above
    windows: list[list[float]] = dataclasses.field(repr=False, default_factory=list)
    outputs: list[list[int]] = dataclasses.field(repr=False, default_factory=list)


class _Changes(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self.retractions = 0

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg.startswith("schedule_conservativeness auto:"):
            self.lines.append(msg)
        elif "Retract requests." in msg:
            self.retractions += 1


def run(engine: Engine, value: str | float, reqs: list[tuple[list[int], SamplingParams]],
        eos_ids: frozenset[int] | None = None) -> RunResult:
    s = Scheduler(dataclasses.replace(engine.args, schedule_conservativeness=value), engine.runner, engine.tokenizer)
    if eos_ids is not None:
        s.eos_ids = eos_ids  # every request added from here on ends at these ids (see --eos-every)
    handler = _Changes()
    log = logging.getLogger("radixserve.scheduler")
    log.addHandler(handler)
    old_level = log.level
    log.setLevel(logging.INFO)
    batch = [Req(list(ids), sp) for ids, sp in reqs]
    usage_q, usage_all, running, windows = [], [], [], []
    settled_from = 0  # index into usage_q where the last conservativeness change took effect
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        for r in batch:
            s.add_request(r)
        while s.has_work:
            steps = s.stats.decode_steps
            changes = len(handler.lines)
            s.step()
            if len(handler.lines) > changes:
                settled_from = len(usage_q) + s.args.decode_log_interval
            if s.stats.decode_steps > steps:
                # a decode step ran: sample what its log line would show, taken at the decode as the
                # controller reads it; after the step the requests that finished in it are freed already,
                # which on the CPU test's 1,536-token pool read 0.88 against the line's 0.94
                u = s.stats.token_usage(s.stats.last_decode_used)
                usage_all.append(u)
                running.append(len(s.running))
                if s.stats.last_decode_queued:
                    usage_q.append(u)
                if s.stats.decode_steps % s.args.decode_log_interval == 0:
                    windows.append([round(time.perf_counter() - t0, 2), s.stats.decode_steps, round(u, 3),
                                    len(s.running), s.stats.last_decode_queued, round(s.new_token_ratio, 5),
                                    round(s.conservativeness, 5), handler.retractions])
    finally:
        log.removeHandler(handler)
        log.setLevel(old_level)
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    tokens = sum(len(r.output_ids) for r in batch)
    return RunResult(
        conservativeness=str(value), seconds=round(dt, 2), cpu_seconds=round(cpu, 2), output_tokens=tokens,
        output_tok_s=round(tokens / dt, 2), output_tok_per_cpu_s=round(tokens / cpu, 2),
        decode_steps=s.stats.decode_steps, token_usage_queued_mean=round(mean(usage_q), 3) if usage_q else 0.0,
        token_usage_queued_late=round(mean(usage_q[len(usage_q) // 2:]), 3) if usage_q else 0.0,
        token_usage_settled=round(mean(usage_q[settled_from:]), 3) if usage_q[settled_from:] else 0.0,
        token_usage_mean=round(mean(usage_all), 3) if usage_all else 0.0,
        running_mean=round(mean(running), 1) if running else 0.0,
        retraction_events=handler.retractions, retracted_reqs=s.stats.num_retractions,
        retractions_per_min=0.0, stopped_early=sum(r.finish_reason == FinishReason.STOP for r in batch),
        output_len_quantiles=_quantiles(sorted(len(r.output_ids) for r in batch)),
        changes=handler.lines, final_conservativeness=round(s.conservativeness, 3), windows=windows,
        outputs=[r.output_ids for r in batch])


def _quantiles(lens: list[int]) -> list[int]:
    return [lens[min(int(q * len(lens)), len(lens) - 1)] for q in (0.5, 0.9, 0.99)] + [lens[-1]] if lens else []


def parse(argv: list[str]) -> tuple[ServerArgs, argparse.Namespace]:
    parser = make_parser("python -m radixserve.bench.conservativeness")
    parser.description = "--schedule-conservativeness auto vs a fixed value on an early-stopping workload."
    g = parser.add_argument_group("benchmark")
    g.add_argument("--num-prompts", type=int, default=64)
    g.add_argument("--max-new-tokens", type=int, default=1024)
    g.add_argument("--compare", type=float, default=1.0, help="the fixed conservativeness to compare with")
    g.add_argument("--eos-every", type=int, default=0, metavar="N",
                   help="for --load-format dummy: end requests at a random 1/N of the vocabulary, sampled at "
                        "temperature 1, so they stop after ~N tokens (0: the model's EOS, greedy)")
    g.add_argument("--output", default=None, help="write the results as JSON here")
    ns = vars(parser.parse_args(argv))
    bench = argparse.Namespace(**{k: ns.pop(k) for k in BENCH_FLAGS})
    ns.setdefault("log_level", "warning")
    ns.pop("schedule_conservativeness", None)  # the benchmark sets it per run
    try:
        return ServerArgs(**ns), bench
    except ValueError as e:
        parser.error(str(e))


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args, bench = parse(argv)
    logging.basicConfig(level=args.log_level.upper(), format="[%(asctime)s] %(message)s")
    engine = Engine(args)
    reqs = workload(engine, bench.num_prompts, bench.max_new_tokens, bench.eos_every)
    eos_ids = random_eos_set(engine.runner.cfg.vocab_size, bench.eos_every) if bench.eos_every else None
    results = [run(engine, v, reqs, eos_ids) for v in (bench.compare, "auto")]
    fixed, auto = results
    for r in results:
        r.retractions_per_min = round(r.retraction_events / max(r.seconds, 60.0) * 60, 2)
    report = {
        "benchmark": "conservativeness", "device": device_name(str(engine.runner.device)), "commit": git_commit(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m radixserve.bench.conservativeness " + shlex.join(argv),
        "kv_pool_tokens": s_cap(engine), "num_prompts": bench.num_prompts, "max_new_tokens": bench.max_new_tokens,
        "eos_every": bench.eos_every,
        "mean_output_tokens": {r.conservativeness: round(r.output_tokens / bench.num_prompts, 1) for r in results},
        "runs": [{k: v for k, v in dataclasses.asdict(r).items() if k != "outputs"} for r in results],
        "throughput_ratio_auto_vs_fixed": round(auto.output_tok_s / fixed.output_tok_s, 3),
        "cpu_throughput_ratio_auto_vs_fixed": round(auto.output_tok_per_cpu_s / fixed.output_tok_per_cpu_s, 3),
        "same_outputs": fixed.outputs == auto.outputs,
    }
    print(json.dumps(report, indent=2))
    if bench.output:
        with open(bench.output, "w") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    return report


def s_cap(engine: Engine) -> int:
    return min(engine.runner.kv_pool.num_slots, (engine.args.max_total_tokens or 1 << 62) + engine.args.page_size)


if __name__ == "__main__":
    main()
