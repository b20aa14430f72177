"""Offline throughput: the in-process Engine runs a synthetic workload to completion, no HTTP.

    python -m radixserve.bench.offline [server flags...] --num-prompts N --random-input-len L \
        --random-output-len O --random-range-ratio R [--workload random|minisgl|nanovllm|shared-prefix|multi-turn] \
        [--output out.json] [--seed S] [--tp N]

Workloads (token ids drawn from the vocab minus special ids, seeded by --seed; greedy; ignore_eos so
every output reaches its length):
  random         N requests, lengths uniform in [L*R, L] and [O*R, O] (SGLang's --random-range-ratio).
  minisgl        256 requests, input and output lengths uniform in [100, 1024] (Mini-SGLang's bench).
  nanovllm       nano-vllm's and Mini-SGLang's bench.py exactly: Python's random seeded with 0 (not --seed),
                 256 prompts of ids in [0, 10000] with lengths in [100, 1024], then max_tokens in
                 [100, 1024] (133,966 output tokens), temperature 0.6, ignore_eos.
  shared-prefix  8 groups x N/8 requests (default 128): a group's requests share an L-token system prompt
                 and add a 32-token unique suffix; compare with `--cache naive` to see the radix cache.
  multi-turn     N conversations (default 8) x --num-turns turns: an L-token first context, each turn appends
                 a --turn-input-len user message and O output tokens; with --enable-hierarchical-cache the
                 same run also runs without HiCache and compares (bench/multi_turn.py).
"""
from __future__ import annotations

import argparse
import bisect
import dataclasses
import json
import logging
import random
import shlex
import sys
import time
from datetime import datetime, timezone

import torch

from radixserve.args import ServerArgs, make_parser
from radixserve.bench import multi_turn
from radixserve.bench.roofline import (
    device_name,
    git_commit,
    limits,
    model_costs,
    prefill_attention_flops,
    step_weight_bytes,
)
from radixserve.core import Req, SamplingParams
from radixserve.distributed.bootstrap import run_spmd
from radixserve.distributed.group import TPGroup
from radixserve.engine_unit import Engine

BENCH_FLAGS = ("workload", "num_prompts", "random_input_len", "random_output_len", "random_range_ratio",
               "output", "save_output_ids", "num_turns", "turn_input_len")
SHARED_GROUPS, SHARED_SUFFIX = 8, 32


def parse(argv: list[str]) -> tuple[ServerArgs, argparse.Namespace]:
    parser = make_parser("python -m radixserve.bench.offline")
    parser.description = "radixserve offline throughput benchmark (server flags + the ones below)."
    g = parser.add_argument_group("benchmark")
    g.add_argument("--workload", choices=["random", "minisgl", "nanovllm", "shared-prefix", "multi-turn"],
                   default="random")
    g.add_argument("--num-prompts", type=int, default=None, help="Requests (default: 32; minisgl 256; "
                   "shared-prefix 128).")
    g.add_argument("--random-input-len", type=int, default=256,
                   help="Prompt length (shared-prefix: the shared prefix's).")
    g.add_argument("--random-output-len", type=int, default=64)
    g.add_argument("--random-range-ratio", type=float, default=1.0, help="Lengths uniform in [len*R, len].")
    g.add_argument("--num-turns", type=int, default=multi_turn.DEFAULT_TURNS, help="multi-turn: turns per "
                   "conversation (--num-prompts: conversations, default 8; --random-input-len: first context).")
    g.add_argument("--turn-input-len", type=int, default=multi_turn.DEFAULT_TURN_LEN,
                   help="multi-turn: tokens of the user message each turn appends.")
    g.add_argument("--output", default=None, help="Write the results as JSON here.")
    g.add_argument("--save-output-ids", default=None, help="Write every request's output token ids as JSON "
                   "here (greedy: compare runs, e.g. --tp 1 against --tp 4).")
    ns = vars(parser.parse_args(argv))
    bench = argparse.Namespace(**{k: ns.pop(k) for k in BENCH_FLAGS})
    ns.setdefault("log_level", "warning")  # per-batch scheduler lines only when asked for
    try:
        return ServerArgs(**ns), bench
    except ValueError as e:
        parser.error(str(e))


def workload_vocab(engine: Engine) -> list[int]:
    """Token ids a synthetic prompt may use: the model's vocabulary that the tokenizer knows, minus special and
    stop ids (a random stop id would end a request early)."""
    tok, cfg = engine.tokenizer, engine.runner.cfg
    special = set(tok.all_special_ids if tok else []) | set(cfg.eos_token_ids)
    size = cfg.vocab_size if tok is None else min(cfg.vocab_size, len(tok))
    return [i for i in range(size) if i not in special]


def make_workload(b: argparse.Namespace, vocab: list[int], seed: int) -> list[tuple[list[int], int]]:
    """(prompt ids, output length) per request."""
    rng = random.Random(seed)
    ids = lambda n: rng.choices(vocab, k=n)
    span = lambda n: rng.randint(max(int(n * b.random_range_ratio), 1), n)
    if b.workload == "nanovllm":  # their order: every prompt, then every length; randint is inclusive
        nano = random.Random(0)
        prompts = [[nano.randint(0, 10000) for _ in range(nano.randint(100, 1024))] for _ in range(256)]
        return [(p, nano.randint(100, 1024)) for p in prompts]
    if b.workload == "minisgl":
        return [(ids(rng.randint(100, 1024)), rng.randint(100, 1024)) for _ in range(b.num_prompts or 256)]
    if b.workload == "shared-prefix":
        per_group = max((b.num_prompts or SHARED_GROUPS * 16) // SHARED_GROUPS, 1)
        prefixes = [ids(b.random_input_len) for _ in range(SHARED_GROUPS)]
        return [(p + ids(SHARED_SUFFIX), span(b.random_output_len))
                for p in prefixes for _ in range(per_group)]
    return [(ids(span(b.random_input_len)), span(b.random_output_len)) for _ in range(b.num_prompts or 32)]


def workload_bound(work: list[tuple[list[int], int]], cost: dict[str, int], copy_GBps: float,
                   matmul_TFLOPs: float) -> dict[str, float]:
    """Least time this workload needs on this device if prefill (compute-bound: FLOPs / matmul rate) and decode
    (memory-bound: bytes / copy bandwidth) do not overlap; launch overheads and activations are ignored.

    Prefill must run every prompt token through the matmuls (a prefix shared by several prompts once: the radix
    cache's best case) plus causal attention; logits (the LM head) are needed once per request. That logit gives
    the first output token, so decode is max(output) - 1 sequential steps, each reading every weight but the
    embedding table (only gathered) once, however large the batch (MoE: the experts that step's batch touches,
    the batch being every request still decoding, as if all ran at once); and step t of a request with an
    I-token prompt reads I + t KV tokens, whatever the batching. Copy bandwidth counts bytes moved, as in
    one_batch."""
    prompts = sorted(p for p, _ in work)
    spans = [(_common_prefix(a, b), len(b)) for a, b in zip([[]] + prompts, prompts)]
    flops = (2 * cost["body_params"] * sum(e - s for s, e in spans) + 2 * cost["head_params"] * len(work)
             + prefill_attention_flops(cost["num_layers"], cost["num_heads"], cost["head_dim"], spans))
    kv_reads = sum((o - 1) * len(p) + (o - 1) * o // 2 for p, o in work)
    steps = max((o for _, o in work), default=1) - 1
    outs = sorted(o for _, o in work)
    weight_reads = (steps * cost["weight_bytes_read"] if not cost.get("moe_layers") else
                    sum(step_weight_bytes(cost, len(outs) - bisect.bisect_right(outs, t)) for t in range(1, steps + 1)))
    prefill_s = flops / (matmul_TFLOPs * 1e12)
    decode_s = (weight_reads + kv_reads * cost["kv_bytes_per_token"]) / (copy_GBps * 1e9)
    return {"prefill_flops": flops, "decode_steps": steps, "kv_token_reads": kv_reads, "prefill_bound_s": prefill_s,
            "decode_bound_s": decode_s, "bound_s": prefill_s + decode_s}


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def run(engine: Engine, work: list[tuple[list[int], int]], temperature: float = 0.0) -> list[Req]:
    return engine.run_to_completion([Req(p, SamplingParams(max_new_tokens=o, temperature=temperature,
                                                           ignore_eos=True)) for p, o in work])


def workload_temperature(workload: str) -> float:
    """Greedy everywhere but nanovllm, whose bench.py samples at 0.6 (so its sampler cost is in the figure)."""
    return 0.6 if workload == "nanovllm" else 0.0


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args, b = parse(argv)
    logging.basicConfig(level=args.log_level.upper(), format="[%(asctime)s] %(message)s")
    return run_spmd(bench_rank, args, b, argv)


def bench_rank(args: ServerArgs, tp: TPGroup, b: argparse.Namespace, argv: list[str]) -> dict:
    """One rank's run (all of it at tp 1): every rank steps the same seeded workload in lock-step; rank 0
    reports."""
    lim = limits(args.device) if tp.rank == 0 else {}  # before the engine takes the device's memory
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()  # the KV pool is sized from free memory
    engine = Engine(args, tp)
    sched = engine.scheduler
    vocab = workload_vocab(engine)
    if b.workload == "multi-turn":  # its own loop and report (bench/multi_turn.py)
        return multi_turn.bench_rank(engine, args, b, argv, vocab)
    work = make_workload(b, vocab, args.seed)

    run(engine, [(vocab[:16], 4), (vocab[16:40], 4)])  # warm-up: allocator, kernels, first-call overheads
    sched.cache.reset()
    cached0 = sched.stats.cached_tokens_total
    t0 = time.perf_counter()
    reqs = run(engine, work, workload_temperature(b.workload))
    dur = time.perf_counter() - t0
    if tp.rank:
        return {}
    n_in, n_out = sum(len(r.origin_input_ids) for r in reqs), sum(len(r.output_ids) for r in reqs)
    res = {"num_requests": len(reqs), "input_tokens": n_in, "output_tokens": n_out,
           "cached_tokens": sched.stats.cached_tokens_total - cached0, "duration_s": dur,
           "request_throughput": len(reqs) / dur, "input_throughput": n_in / dur,
           "output_throughput": n_out / dur, "total_throughput": (n_in + n_out) / dur}
    cost = model_costs(engine)
    bound = workload_bound(work, cost, lim["copy_bandwidth_GBps"], lim["matmul_TFLOPs"])
    res["roofline"] = {**lim, **cost, **bound, "bound_output_throughput": n_out / bound["bound_s"],
                       "fraction_of_bound": bound["bound_s"] / dur}
    print("\n====== Offline Throughput Benchmark Result =======")
    for label, key in [("Workload", None), ("Successful requests", "num_requests"),
                       ("Benchmark duration (s)", "duration_s"), ("Total input tokens", "input_tokens"),
                       ("Total generated tokens", "output_tokens"), ("Cached prompt tokens", "cached_tokens"),
                       ("Request throughput (req/s)", "request_throughput"),
                       ("Input token throughput (tok/s)", "input_throughput"),
                       ("Output token throughput (tok/s)", "output_throughput"),
                       ("Total token throughput (tok/s)", "total_throughput")]:
        val = b.workload if key is None else res[key]
        print(f"{label + ':':<41}{val:.2f}" if isinstance(val, float) else f"{label + ':':<41}{val}")
    rl = res["roofline"]
    print(f"{'Roofline bound (s) / fraction:':<41}{rl['bound_s']:.2f} / {rl['fraction_of_bound']:.3f}")
    print("=" * 50)

    report = {"timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "device": device_name(str(engine.runner.device)), "git_commit": git_commit(),
              "command": shlex.join(["python", "-m", "radixserve.bench.offline", *argv]),
              "model": engine.model_name, "server_args": dataclasses.asdict(args),
              "workload": dict(vars(b), num_requests=len(work), seed=args.seed), "results": res}
    if b.output:
        with open(b.output, "w") as f:
            json.dump(report, f, indent=2)
    if b.save_output_ids:
        with open(b.save_output_ids, "w") as f:
            json.dump([r.output_ids for r in reqs], f)
    return report


if __name__ == "__main__":
    main()
