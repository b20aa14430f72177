"""The multi-turn workload of bench.offline (`--workload multi-turn`): C conversations x T turns.

Every conversation starts with a `--random-input-len`-token context; each turn appends a
`--turn-input-len`-token user message to the conversation so far (previous turns' outputs included), and
all C conversations are revisited in turn: turn t of every conversation is submitted at once, turn t+1
after they finish. When the combined context outgrows the device pool, the radix cache has forgotten a
conversation by the time it comes back; HiCache brings it back from host memory instead of recomputing it.

With `--enable-hierarchical-cache` the same workload runs twice on the same model runner, first without
HiCache and then with it (same tokens: greedy, seeded), and the report compares them. On CUDA it also
measures the host->device load bandwidth of the transfer engine on scattered pages against a plain pinned
copy of one large buffer (the machine's pinned-copy bandwidth).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import random
import shlex
import statistics
import time
from datetime import datetime, timezone

import torch

from radixserve.args import ServerArgs
from radixserve.bench.roofline import device_name, git_commit
from radixserve.core import Req, SamplingParams
from radixserve.kvcache.kv_transfer import KVTransfer
from radixserve.scheduler.scheduler import Scheduler

DEFAULT_CONVERSATIONS, DEFAULT_TURNS, DEFAULT_TURN_LEN = 8, 4, 64


def make_messages(b: argparse.Namespace, vocab: list[int], seed: int) -> tuple[list[list[int]], list[list[list[int]]]]:
    """(first contexts, user messages [turn][conversation])."""
    rng = random.Random(seed)
    c = b.num_prompts or DEFAULT_CONVERSATIONS
    firsts = [rng.choices(vocab, k=b.random_input_len) for _ in range(c)]
    users = [[rng.choices(vocab, k=b.turn_input_len) for _ in range(c)] for _ in range(b.num_turns)]
    return firsts, users


def run_turns(sched: Scheduler, firsts: list[list[int]], users: list[list[list[int]]], out_len: int) -> dict:
    """TTFT counts from a turn's submission (all conversations at once) to the request's first token."""
    ctx = [list(f) for f in firsts]
    ttft, outputs, n_in, n_out = [], [], 0, 0
    sp = SamplingParams(max_new_tokens=out_len, temperature=0, ignore_eos=True)
    st = sched.stats
    cached0, host0, storage0 = st.cached_tokens_total, st.host_cached_tokens_total, st.storage_cached_tokens_total
    t0 = time.perf_counter()
    for turn in users:
        reqs = [Req(ctx[i] + msg, sp) for i, msg in enumerate(turn)]
        start = time.perf_counter()
        for r in reqs:
            sched.add_request(r)
        first: dict[str, float] = {}
        while any(not r.finished for r in reqs):
            for r in sched.step():
                if r.rid not in first and r.output_ids:
                    first[r.rid] = time.perf_counter()
        ttft += [first[r.rid] - start for r in reqs]
        n_in += sum(len(r.origin_input_ids) for r in reqs)
        n_out += sum(len(r.output_ids) for r in reqs)
        outputs.append([r.output_ids for r in reqs])
        ctx = [r.origin_input_ids + r.output_ids for r in reqs]
    dur = time.perf_counter() - t0
    return {"duration_s": dur, "requests": len(ttft), "input_tokens": n_in, "output_tokens": n_out,
            "output_throughput": n_out / dur, "total_throughput": (n_in + n_out) / dur,
            "mean_ttft_s": statistics.mean(ttft), "median_ttft_s": statistics.median(ttft),
            "cached_tokens": st.cached_tokens_total - cached0,
            "host_cached_tokens": st.host_cached_tokens_total - host0,
            "storage_cached_tokens": st.storage_cached_tokens_total - storage0,
            "retractions": st.num_retractions, "combined_context_tokens": sum(len(c) for c in ctx),
            "device_pool_tokens": sched.allocator.capacity_tokens, "outputs": outputs}


def pinned_copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, reps: int = 5) -> float:
    """GB/s of one large pinned host -> device copy: the ceiling for any host -> device load."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(device)
    return nbytes * reps / (time.perf_counter() - t0) / 1e9


def load_bandwidth(sched: Scheduler, tokens: int, reps: int = 5) -> dict:
    """Host -> device GB/s of the transfer engine on `tokens` scattered slots (pages shuffled on both sides),
    for each io backend, on the HiCache scheduler's own pools (flushed first: every slot is free)."""
    cache, runner = sched.cache, sched.runner
    cache.reset()
    ps = sched.page_size
    n_pages = min(tokens, sched.allocator.capacity_tokens, cache.host.capacity_tokens) // ps
    dev_pages = sched.allocator.alloc_pages(n_pages)
    host_slots = cache.host.alloc(n_pages * ps)
    try:
        perm = torch.randperm(n_pages)
        dev = (dev_pages[perm][:, None] * ps + torch.arange(ps)).flatten()
        host = host_slots.view(-1, ps)[torch.randperm(n_pages)].flatten()
        out = {"tokens": n_pages * ps, "pinned_copy_GBps": pinned_copy_bandwidth(runner.device)}
        dev_d = dev.to(runner.device)
        for backend in ("kernel", "direct"):
            tr = KVTransfer(runner.kv_pool.k, runner.kv_pool.v, cache.host, runner.device, backend)
            # correctness on random bytes, both directions, first and last layer buffers
            for i in (0, len(tr.dev) - 1):
                tr.dev[i][dev_d] = torch.randint(0, 256, (dev.numel(), tr.row_bytes), dtype=torch.uint8,
                                                 device=runner.device)
            tr.wait(tr.backup(dev, host))
            backup_ok = all(torch.equal(tr.dev[i][dev_d].cpu(), tr.host[i][host]) for i in (0, len(tr.dev) - 1))
            for i in (0, len(tr.dev) - 1):
                tr.host[i][host] = torch.randint(0, 256, (host.numel(), tr.row_bytes), dtype=torch.uint8)
            tr.load(host, dev)
            torch.cuda.synchronize(runner.device)
            load_ok = all(torch.equal(tr.dev[i][dev_d].cpu(), tr.host[i][host]) for i in (0, len(tr.dev) - 1))
            per_load = dev.numel() * tr.row_bytes * len(tr.dev)
            t0 = time.perf_counter()
            for _ in range(reps):
                tr.load(host, dev)
            torch.cuda.synchronize(runner.device)
            gbps = per_load * reps / (time.perf_counter() - t0) / 1e9
            out[backend] = {"used_backend": tr.io_backend, "load_GBps": gbps, "backup_correct": backup_ok,
                            "load_correct": load_ok, "fraction_of_pinned_copy": gbps / out["pinned_copy_GBps"]}
        return out
    finally:
        sched.allocator.free(dev_pages * ps)
        cache.host.free(host_slots)


def bench(engine, args: ServerArgs, b: argparse.Namespace, vocab: list[int]) -> dict:
    firsts, users = make_messages(b, vocab, args.seed)
    runs = {}
    scheds = []
    if args.enable_hierarchical_cache:
        scheds.append(("without_hicache", Scheduler(dataclasses.replace(args, enable_hierarchical_cache=False,
                                                                        hicache_storage_backend=None),
                                                    engine.runner, engine.tokenizer)))
    scheds.append(("with_hicache" if args.enable_hierarchical_cache else "without_hicache", engine.scheduler))
    for name, sched in scheds:
        run_turns(sched, [vocab[:8]], [[vocab[8:12]], [vocab[12:16]]], 2)  # allocator, kernels, first calls
        sched.cache.reset()
        runs[name] = run_turns(sched, firsts, users, b.random_output_len)
    res: dict = {name: {k: v for k, v in r.items() if k != "outputs"} for name, r in runs.items()}
    if len(runs) == 2:
        a, h = runs["without_hicache"], runs["with_hicache"]
        res["outputs_identical"] = a["outputs"] == h["outputs"]
        res["throughput_speedup"] = h["total_throughput"] / a["total_throughput"]
        res["ttft_ratio"] = h["mean_ttft_s"] / a["mean_ttft_s"]
        res["context_over_pool"] = h["combined_context_tokens"] / h["device_pool_tokens"]
        cache = engine.scheduler.cache
        res["bytes_loaded_host_to_device"] = cache.transfer.bytes_loaded
        res["bytes_backed_up_device_to_host"] = cache.transfer.bytes_backed_up
        res["io_backend"] = cache.transfer.io_backend
        if engine.runner.device.type == "cuda":
            res["load_bandwidth"] = load_bandwidth(engine.scheduler, b.random_input_len * 4)
    return res


def print_report(res: dict) -> None:
    print("\n====== Multi-turn Benchmark Result =======")
    for name in ("without_hicache", "with_hicache"):
        if name in res:
            r = res[name]
            print(f"{name}: {r['duration_s']:.2f} s, total {r['total_throughput']:.1f} tok/s, output "
                  f"{r['output_throughput']:.1f} tok/s, mean TTFT {r['mean_ttft_s'] * 1000:.1f} ms, cached "
                  f"{r['cached_tokens']} (host {r['host_cached_tokens']}), context/pool "
                  f"{r['combined_context_tokens'] / r['device_pool_tokens']:.2f}")
    for key in ("throughput_speedup", "ttft_ratio", "outputs_identical", "io_backend"):
        if key in res:
            print(f"{key}: {res[key]}")
    if "load_bandwidth" in res:
        lb = res["load_bandwidth"]
        print(f"pinned copy {lb['pinned_copy_GBps']:.1f} GB/s; " + "; ".join(
            f"{k} load {lb[k]['load_GBps']:.1f} GB/s ({lb[k]['fraction_of_pinned_copy']:.0%}, ran "
            f"{lb[k]['used_backend']})" for k in ("kernel", "direct")))
    print("=" * 42)


def bench_rank(engine, args: ServerArgs, b: argparse.Namespace, argv: list[str], vocab: list[int]) -> dict:
    """bench.offline's entry for this workload: run, print, and write the JSON report (--output)."""
    res = bench(engine, args, b, vocab)
    print_report(res)
    report = {"timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "device": device_name(str(engine.runner.device)), "git_commit": git_commit(),
              "command": shlex.join(["python", "-m", "radixserve.bench.offline", *argv]),
              "model": engine.model_name, "server_args": dataclasses.asdict(args),
              "workload": dict(vars(b), conversations=b.num_prompts or DEFAULT_CONVERSATIONS, seed=args.seed),
              "results": res}
    if b.output:
        with open(b.output, "w") as f:
            json.dump(report, f, indent=2)
    return report
