"""What constrained decoding costs a full decode batch: the same engine steps B requests without a grammar
and B requests each holding a JSON schema, alternately, and compares the time per output token.

    python -m radixserve.bench.grammar_overhead [server flags...] --batch-size 64 --steps 64 \
        [--input-len 256] [--rounds 2] [--output FILE]

Each round submits B requests (random prompt ids, greedy, ignore_eos), steps until every one has its
first token (prefill and the matchers' first masks are behind us), then times `--steps` scheduler steps
of the steady decode batch and counts the tokens they produced; the rest of the round runs untimed to
its end. Plain and constrained rounds alternate, so a slow drift of the machine hits both. The schema is
bench.grammar's (nested object, array, enum, email format); its strings are unbounded, so a request stays
in the batch for the timed steps. The figure is the one issue 15 sets a target for: the constrained
per-token time over the plain one, minus 1.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone

from radixserve.args import ServerArgs, make_parser
from radixserve.bench.grammar import SCHEMA
from radixserve.bench.offline import workload_vocab
from radixserve.bench.roofline import device_name, git_commit
from radixserve.core import Req, SamplingParams
from radixserve.engine_unit import Engine

BENCH_FLAGS = ("batch_size", "steps", "input_len", "rounds", "fill_threads", "output")


def parse(argv: list[str]) -> tuple[ServerArgs, argparse.Namespace]:
    parser = make_parser("python -m radixserve.bench.grammar_overhead")
    parser.description = "Constrained vs plain decode on one engine (server flags + the ones below)."
    g = parser.add_argument_group("benchmark")
    g.add_argument("--batch-size", type=int, default=64, help="Requests decoding together.")
    g.add_argument("--steps", type=int, default=64, help="Timed decode steps per round.")
    g.add_argument("--input-len", type=int, default=256, help="Prompt tokens per request.")
    g.add_argument("--rounds", type=int, default=2, help="Plain + constrained round pairs.")
    g.add_argument("--fill-threads", default="", help="Comma list of mask-fill settings for the constrained "
                   "rounds: N a pool of N threads, 0 the scheduler's thread, empty the engine's own choice "
                   "(e.g. ',2,16': the default, then pools of 2 and 16). Default: the engine's choice only.")
    g.add_argument("--output", default=None, help="Write the results as JSON here.")
    ns = vars(parser.parse_args(argv))
    bench = argparse.Namespace(**{k: ns.pop(k) for k in BENCH_FLAGS})
    ns.setdefault("log_level", "warning")
    try:
        return ServerArgs(**ns), bench
    except ValueError as e:
        parser.error(str(e))


def timed_round(engine: Engine, prompts: list[list[int]], steps: int, grammar: tuple[str, str] | None
                ) -> dict[str, float]:
    """One batch through: untimed until every request has a token, `steps` timed steps, untimed to the end."""
    sched = engine.scheduler
    reqs = [Req(p, SamplingParams(max_new_tokens=steps + 8, temperature=0, ignore_eos=True, grammar=grammar))
            for p in prompts]
    for r in reqs:
        sched.add_request(r)
    while any(not r.output_ids for r in reqs):
        sched.step()
    before = sum(len(r.output_ids) for r in reqs)
    masks = sched.grammar
    mask0 = masks.mask_s
    t0, cpu0, proc0 = time.perf_counter(), time.thread_time(), time.process_time()
    for _ in range(steps):
        sched.step()
    dur = time.perf_counter() - t0
    cpu, proc = time.thread_time() - cpu0, time.process_time() - proc0
    tokens = sum(len(r.output_ids) for r in reqs) - before
    while any(not r.finished for r in reqs):
        sched.step()
    # where a step's host time goes: the scheduler thread's CPU time (a step whose CPU time nears its wall
    # time leaves the device waiting), every thread's (the grammar's fill pool too), the mask fill's wall time
    text = engine.tokenizer.decode(reqs[0].output_ids[:48]) if engine.tokenizer else None
    return {"sample_output": text, "step_ms": dur / steps * 1e3, "tokens": tokens,
            "us_per_token": dur / max(tokens, 1) * 1e6,
            "scheduler_cpu_ms_per_step": cpu / steps * 1e3, "process_cpu_ms_per_step": proc / steps * 1e3,
            "mask_ms_per_step": (masks.mask_s - mask0) / steps * 1e3,
            "finished_early": sum(len(r.output_ids) < steps + 8 for r in reqs)}


def run(args: ServerArgs, b: argparse.Namespace, argv: list[str]) -> dict:
    engine = Engine(args)
    if engine.scheduler.grammar is None:
        raise SystemExit("constrained decoding is off (--grammar-backend none, or llguidance is not installed)")
    rng = random.Random(args.seed)
    vocab = workload_vocab(engine)
    grammar = ("json_schema", json.dumps(SCHEMA))
    timed_round(engine, [rng.choices(vocab, k=16) for _ in range(4)], 2, None)  # warm-up: kernels, graphs
    timed_round(engine, [rng.choices(vocab, k=16) for _ in range(4)], 2, grammar)  # and the compiled schema
    rounds: dict[str, list[dict]] = {"plain": [], "constrained": []}
    backend = engine.scheduler.grammar.backend
    settings = [int(t) if t.strip() else None for t in b.fill_threads.split(",")] if b.fill_threads else [None]
    for threads in settings:  # None: as the engine runs it (before any pool is swapped in)
        kind = "constrained" if threads is None else f"constrained_threads{threads}"
        if threads is not None:  # the pool is llguidance's; a bench-only swap, before the timed rounds
            import llguidance
            backend.parallel = threads > 0
            backend._executor = llguidance.LLExecutor(max(threads, 1))
        rounds.setdefault(kind, [])
        for _ in range(b.rounds):
            for k, g in (("plain", None), (kind, grammar)):
                engine.scheduler.cache.reset()
                prompts = [rng.choices(vocab, k=b.input_len) for _ in range(b.batch_size)]
                rounds[k].append(timed_round(engine, prompts, b.steps, g))
    rounds = {k: v for k, v in rounds.items() if v}
    per_tok = {k: statistics.mean(r["us_per_token"] for r in v) for k, v in rounds.items()}
    constrained = min((k for k in per_tok if k != "plain"), key=per_tok.get)  # the best setting measured
    res = {"plain_us_per_token": per_tok["plain"], "constrained_us_per_token": per_tok[constrained],
           "best_setting": constrained,
           "plain_step_ms": statistics.mean(r["step_ms"] for r in rounds["plain"]),
           "constrained_step_ms": statistics.mean(r["step_ms"] for r in rounds[constrained]),
           "overhead": per_tok[constrained] / per_tok["plain"] - 1,
           "overhead_by_setting": {k: v / per_tok["plain"] - 1 for k, v in per_tok.items() if k != "plain"},
           "mask_ms_per_step": statistics.mean(r["mask_ms_per_step"] for r in rounds[constrained]),
           "scheduler_cpu_ms_per_step": {k: statistics.mean(r["scheduler_cpu_ms_per_step"] for r in v)
                                         for k, v in rounds.items()}, "rounds": rounds}
    for k in per_tok:
        if k != "plain":
            print(f"{k}: {statistics.mean(r['step_ms'] for r in rounds[k]):.3f} ms/step vs plain "
                  f"{res['plain_step_ms']:.3f}, overhead {res['overhead_by_setting'][k]:+.1%}; mask fill "
                  f"{statistics.mean(r['mask_ms_per_step'] for r in rounds[k]):.3f} ms/step, CPU of all threads "
                  f"{statistics.mean(r['process_cpu_ms_per_step'] for r in rounds[k]):.1f} ms/step")
    report = {"timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "device": device_name(str(engine.runner.device)), "git_commit": git_commit(),
              "command": shlex.join(["python", "-m", "radixserve.bench.grammar_overhead", *argv]),
              "model": engine.model_name, "server_args": dataclasses.asdict(args), "bench": vars(b),
              "schema": SCHEMA, "results": res}
    if b.output:
        with open(b.output, "w") as f:
            json.dump(report, f, indent=2)
    return report


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args, b = parse(argv)
    logging.basicConfig(level=args.log_level.upper(), format="[%(asctime)s] %(message)s")
    return run(args, b, argv)


if __name__ == "__main__":
    main()
