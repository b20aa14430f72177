"""Accuracy of FP8 weights / FP8 KV cache against the unquantized engine on the same weights.

Three numbers per configuration, each against the reference engine (same model, same dtype, no
quantization):
    first_token_agreement   share of prompts whose first greedy token is the reference's
    mean_common_prefix      mean length of the common prefix of the greedy outputs (max: --output-len)
    mean_kl                 mean KL(ref || quantized) of the next-token distributions, teacher-forced on
                            the reference's own prompt + output, over every position

    python -m radixserve.bench.quant_accuracy --device cpu --output-len 32 --output acc.json
    python -m radixserve.bench.quant_accuracy --model llama-3.1-8b --load-format dummy --output acc.json
"""
from __future__ import annotations

import dataclasses
import gc
import logging

import torch

from radixserve.args import ServerArgs, make_parser
from radixserve.core import Req, SamplingParams
from radixserve.engine.model_runner import ModelRunner
from radixserve.engine_unit import Engine

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village,",
           "1, 2, 3, 4, 5,", "The three primary colors are", "Water boils at a temperature of",
           "import numpy as np\n\nx = np.", "The quick brown fox"]
CONFIGS = {"fp8_weights": dict(quantization="fp8"), "fp8_kv": dict(kv_cache_dtype="fp8_e4m3"),
           "fp8_both": dict(quantization="fp8", kv_cache_dtype="fp8_e4m3")}


@torch.inference_mode()
def teacher_forced_logits(runner: ModelRunner, ids: list[int]) -> torch.Tensor:
    """float32 logits [len(ids), vocab] of one prefill over `ids` (the next-token distribution at every
    position), through the engine's own forward: its attention backend and KV pool, FP8 reads included."""
    pool = runner.req_to_token_pool
    row = pool.alloc()
    try:
        pool.write(row, 0, torch.arange(1, len(ids) + 1))  # slots 1..n (slot 0 is the padding slot)
        req = Req(list(ids), SamplingParams(temperature=0, max_new_tokens=1))
        req.req_pool_idx, req.kv_len, req.extend_len = row, 0, len(ids)
        fb = runner.prepare([req], is_decode=False)
        fb.logits_idx = torch.arange(len(ids), device=runner.device)
        return runner.run_model(fb).float()
    finally:
        pool.free(row)


def greedy(engine: Engine, prompts: list[list[int]], output_len: int) -> list[list[int]]:
    sp = SamplingParams(temperature=0, max_new_tokens=output_len, ignore_eos=True)
    return [r.output_ids for r in engine.run_to_completion([Req(list(p), sp) for p in prompts])]


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def mean_kl(ref_logits: list[torch.Tensor], logits: list[torch.Tensor]) -> float:
    ref = torch.cat(ref_logits).log_softmax(-1)
    out = torch.cat(logits).log_softmax(-1)
    return float((ref.exp() * (ref - out)).sum(-1).mean())


def compare(ref: dict, other: dict) -> dict:
    """Metrics of one configuration's outputs against the reference's; both from `collect`."""
    n = len(ref["outputs"])
    return {"first_token_agreement": sum(a[:1] == b[:1] for a, b in zip(ref["outputs"], other["outputs"])) / n,
            "mean_common_prefix": sum(common_prefix(a, b) for a, b in zip(ref["outputs"], other["outputs"])) / n,
            "mean_kl": mean_kl(ref["logits"], other["logits"]),
            "positions": sum(t.shape[0] for t in ref["logits"])}


def collect(engine: Engine, prompts: list[list[int]], output_len: int, forced: list[list[int]] | None = None) -> dict:
    """Greedy outputs, and the teacher-forced logits over `forced` (default: prompt + own outputs)."""
    outputs = greedy(engine, prompts, output_len)
    forced = forced or [p + o for p, o in zip(prompts, outputs)]
    return {"outputs": outputs, "forced": forced,
            "logits": [teacher_forced_logits(engine.runner, ids).cpu() for ids in forced]}


def prompt_ids(engine: Engine, n: int, seed: int = 0) -> list[list[int]]:
    """Text prompts through the tokenizer; random token ids when there is none worth using (presets)."""
    if engine.tokenizer is not None and engine.src.kind != "preset":
        return [engine.tokenizer.encode(p) for p in PROMPTS[:n]]
    gen = torch.Generator().manual_seed(seed)
    vocab = engine.runner.cfg.vocab_size
    return [torch.randint(10, vocab - 10, (16,), generator=gen).tolist() for _ in range(n)]


def run(args: ServerArgs, configs: dict[str, dict], num_prompts: int, output_len: int) -> dict:
    """Reference first, then each configuration in turn (one engine alive at a time: GPU memory)."""
    engine = Engine(args)
    prompts = prompt_ids(engine, num_prompts)
    ref = collect(engine, prompts, output_len)
    del engine
    results = {}
    for name, changes in configs.items():
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()
        engine = Engine(dataclasses.replace(args, **changes))
        results[name] = compare(ref, collect(engine, prompts, output_len, ref["forced"]))
        del engine
    return results


def main(argv: list[str] | None = None) -> dict:
    from radixserve.bench.one_batch import split_args
    from radixserve.bench.roofline import record
    parser = make_parser("python -m radixserve.bench.quant_accuracy")
    parser.add_argument("--num-prompts", type=int, default=8)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--output", default=None, help="Write the result JSON here.")
    ns = parser.parse_args(argv)
    if not hasattr(ns, "max_total_tokens"):
        ns.max_total_tokens = 8192
    args, bench = split_args(ns, {"num_prompts", "output_len", "output"})
    logging.basicConfig(level=logging.WARNING)
    res = run(args, CONFIGS, bench["num_prompts"], bench["output_len"])
    fig = {"model": args.model or "bundled SmolLM2-135M", "dtype": str(args.torch_dtype),
           "load_format": args.load_format,
           "num_prompts": bench["num_prompts"], "output_len": bench["output_len"],
           **{f"{c}_{k}": v for c, r in res.items() for k, v in r.items()}}
    out = record(bench.get("output"), fig, args.device)
    for k, v in out.items():
        print(f"{k:>36}: {v:.4g}" if isinstance(v, float) else f"{k:>36}: {v}")
    return out


if __name__ == "__main__":
    main()
