"""One static batch through the engine: prefill latency, decode inter-token latency, tokens/s,
and the fraction of the hardware limit they reach (same process, same device).

    python -m radixserve.bench.one_batch --model llama-3.1-8b --load-format dummy \
        --batch-size 1 --input-len 128 --output-len 256 --output out.json

With --tp N it spawns N ranks (distributed.bootstrap.run_spmd), each running this same batch on its own
Engine; rank 0 measures and records.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import time

import torch

from radixserve.args import ServerArgs, make_parser
from radixserve.bench.roofline import limits, model_costs, prefill_attention_flops, record, step_weight_bytes
from radixserve.core import Req, SamplingParams
from radixserve.distributed.bootstrap import run_spmd
from radixserve.distributed.group import TPGroup
from radixserve.engine_unit import Engine


def split_args(ns: argparse.Namespace, bench_keys: set[str]) -> tuple[ServerArgs, dict]:
    d = vars(ns)
    names = {f.name for f in dataclasses.fields(ServerArgs)}
    return ServerArgs(**{k: v for k, v in d.items() if k in names}), {k: d[k] for k in bench_keys if k in d}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_batch(engine: Engine, batch_size: int, input_len: int, output_len: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    vocab = engine.runner.cfg.vocab_size
    sp = SamplingParams(temperature=0, max_new_tokens=output_len, ignore_eos=True)
    reqs = [Req(torch.randint(10, vocab - 10, (input_len,), generator=gen).tolist(), sp) for _ in range(batch_size)]
    sched = engine.scheduler
    for r in reqs:
        sched.add_request(r)
    dev = engine.args.device
    sync(dev)
    t0 = time.perf_counter()
    while any(not r.output_ids for r in reqs):
        sched.step()
    sync(dev)
    prefill = time.perf_counter() - t0
    steps = []
    while sched.has_work:
        t = time.perf_counter()
        sched.step()
        steps.append(time.perf_counter() - t)
    return {"prefill_latency_s": prefill, "itl_s": statistics.median(steps) if steps else float("nan"),
            "decode_steps": len(steps)}


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser("python -m radixserve.bench.one_batch")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--output", default=None, help="Write the result JSON here.")
    parser.add_argument("--no-roofline", action="store_true", help="Skip measuring copy/matmul limits.")
    args, bench = split_args(parser.parse_args(argv), {"batch_size", "input_len", "output_len", "output",
                                                        "no_roofline"})
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s")
    return run_spmd(bench_rank, args, bench)


def bench_rank(args: ServerArgs, tp: TPGroup, bench: dict) -> dict:
    engine = Engine(args, tp)
    bs, il, ol = bench.get("batch_size", 1), bench.get("input_len", 128), bench.get("output_len", 256)
    run_batch(engine, bs, il, 4, seed=1)  # warm-up: kernels compiled for these shapes, graphs captured
    r = run_batch(engine, bs, il, ol, seed=0)
    if tp.rank:
        return {}
    tp = engine.runner.tp.size
    cost = model_costs(engine)  # this rank's share
    # Matmul FLOPs of the prompt: every token through the layers, the LM head only at each last position.
    prefill_flops = (2 * cost["body_params"] * bs * il + 2 * cost["head_params"] * bs
                     + prefill_attention_flops(cost["num_layers"], cost["num_heads"], cost["head_dim"], [(0, il)] * bs))
    fig = {"model": engine.src.name, "dtype": str(engine.runner.dtype), "tp_size": tp, "batch_size": bs,
           "input_len": il, "output_len": ol, **r,
           "prefill_tok_per_s": bs * il / r["prefill_latency_s"], "decode_tok_per_s": bs / r["itl_s"],
           "weight_bytes_read_per_rank": cost["weight_bytes_read"], "quantization": args.quantization,
           "kv_cache_dtype": str(engine.runner.kv_pool.k[0].dtype),
           "max_total_num_tokens": engine.runner.memory.max_total_num_tokens}
    if not bench.get("no_roofline"):
        lim = limits(args.device)
        # bytes a decode step must move: every weight but the (gathered) embedding table once (MoE: only the
        # experts the batch routes to) + the KV read at the mean context length
        fig["weight_bytes_read_per_step"] = step_weight_bytes(cost, bs)
        step_bytes = fig["weight_bytes_read_per_step"] + cost["kv_bytes_per_token"] * bs * (il + ol / 2)
        ideal_itl = step_bytes / (lim["copy_bandwidth_GBps"] * 1e9)
        tflops = prefill_flops / r["prefill_latency_s"] / 1e12
        fig.update(lim, ideal_itl_s=ideal_itl, decode_roofline_fraction=ideal_itl / r["itl_s"],
                   prefill_TFLOPs=tflops, prefill_matmul_fraction=tflops / lim["matmul_TFLOPs"])
    out = record(bench.get("output"), fig, args.device)
    for k, v in out.items():
        print(f"{k:>28}: {v:.4g}" if isinstance(v, float) else f"{k:>28}: {v}")
    return out


if __name__ == "__main__":
    main()
