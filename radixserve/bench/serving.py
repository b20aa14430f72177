"""Online serving benchmark against any OpenAI-compatible server (SGLang's bench_serving, random dataset).

    python -m radixserve.bench.serving --base-url http://127.0.0.1:1919 --num-prompts 16 \
        --random-input-len 128 --random-output-len 32 [--request-rate 4] [--max-concurrency 8] \
        [--output r.json]

Each request streams /v1/completions (greedy, `ignore_eos` so every output reaches its length; pass
--disable-ignore-eos for servers that reject the field). Prompts are random token ids (lengths uniform in
[len*R, len], SGLang's --random-range-ratio, default 0) sent as a token-id list, so the server sees
exactly the intended input length; --prompt-format text decodes them to text first. Token counts
come from the server's `usage` (stream_options.include_usage). Arrivals are Poisson at --request-rate
(inf: all at once), at most --max-concurrency in flight. Library use: `run_benchmark(BenchArgs(...))`.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import openai


@dataclass
class BenchArgs:
    base_url: str = "http://127.0.0.1:1919"
    model: str | None = None
    api_key: str | None = None
    num_prompts: int = 100
    random_input_len: int = 1024
    random_output_len: int = 128
    random_range_ratio: float = 0.0
    request_rate: float = math.inf
    max_concurrency: int | None = None
    prompt_format: str = "ids"
    tokenizer: str | None = None
    seed: int = 1
    disable_ignore_eos: bool = False
    warmup_requests: int = 1
    output: str | None = None
    quiet: bool = False


@dataclass
class Result:
    success: bool = False
    prompt_len: int = 0
    output_len: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


def load_tokenizer(path: str | None) -> Any:
    """--tokenizer (an HF dir or a .gguf file), else the bundled model's."""
    if path and not path.endswith(".gguf"):
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(path)
    from radixserve.weights.loader import load_tokenizer as load
    from radixserve.weights.loader import resolve_model
    return load(resolve_model(path))


def server_vocab_size(args: BenchArgs) -> int | None:
    """radixserve reports its vocab in /get_model_info, which spares loading a tokenizer for id prompts."""
    req = urllib.request.Request(args.base_url.rstrip("/") + "/get_model_info",
                                 headers={"Authorization": f"Bearer {args.api_key}"} if args.api_key else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.load(r).get("vocab_size")
    except (OSError, ValueError):
        return None


def make_workload(args: BenchArgs) -> list[tuple[list[int] | str, int, int]]:
    """(prompt, its token count, output length) per request, seeded. Ids come from the tokenizer's vocab
    minus its special tokens; without a tokenizer (id prompts to a radixserve server), from [0, vocab)."""
    rng = random.Random(args.seed)
    vocab_size = None if args.tokenizer or args.prompt_format == "text" else server_vocab_size(args)
    tokenizer = None if vocab_size else load_tokenizer(args.tokenizer)
    if tokenizer is not None:
        special = set(tokenizer.all_special_ids)
        vocab = [i for i in range(len(tokenizer)) if i not in special]
    else:
        vocab = list(range(vocab_size))

    def length(n: int) -> int:
        return rng.randint(max(int(n * args.random_range_ratio), 1), n)

    work = []
    for _ in range(args.num_prompts):
        ids = rng.choices(vocab, k=length(args.random_input_len))
        prompt = tokenizer.decode(ids) if args.prompt_format == "text" else ids
        work.append((prompt, len(ids), length(args.random_output_len)))
    return work


async def send(client: openai.AsyncOpenAI, args: BenchArgs, model: str, prompt: list[int] | str,
               prompt_len: int, output_len: int) -> Result:
    res, start = Result(prompt_len=prompt_len), time.perf_counter()
    last, chunks = start, 0
    try:
        stream = await client.completions.create(
            model=model, prompt=prompt, max_tokens=output_len, temperature=0.0, stream=True,
            stream_options={"include_usage": True},
            extra_body=None if args.disable_ignore_eos else {"ignore_eos": True})
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.usage is not None:
                res.prompt_len, res.output_len = chunk.usage.prompt_tokens, chunk.usage.completion_tokens
            if chunk.choices and chunk.choices[0].text:
                chunks += 1
                if chunks == 1:
                    res.ttft = now - start
                else:
                    res.itl.append(now - last)
                last = now
        res.latency = time.perf_counter() - start
        res.output_len = res.output_len or chunks
        res.success = chunks > 0
        res.error = "" if res.success else "no output"
    except openai.OpenAIError as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


async def benchmark(args: BenchArgs) -> dict[str, Any]:
    client = openai.AsyncOpenAI(base_url=args.base_url.rstrip("/") + "/v1", api_key=args.api_key or "EMPTY",
                                max_retries=0, timeout=3600.0)
    try:
        model = args.model or (await client.models.list()).data[0].id
        work = make_workload(args)
        for prompt, plen, olen in work[:args.warmup_requests]:
            warm = await send(client, args, model, prompt, plen, min(olen, 16))
            if not warm.success:
                raise RuntimeError(f"warm-up request failed: {warm.error}")
        sem = asyncio.Semaphore(args.max_concurrency or len(work) or 1)
        rng = np.random.default_rng(args.seed)

        async def limited(item: tuple) -> Result:
            async with sem:
                return await send(client, args, model, *item)

        tasks = []
        start = time.perf_counter()
        for item in work:
            tasks.append(asyncio.create_task(limited(item)))
            if math.isfinite(args.request_rate):
                await asyncio.sleep(rng.exponential(1.0 / args.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    finally:
        await client.close()
    return summarize(results, duration, args, model)


def summarize(results: list[Result], duration: float, args: BenchArgs, model: str) -> dict[str, Any]:
    ok = [r for r in results if r.success]

    def ms(xs: list[float]) -> list[float]:
        return [1000 * x for x in xs] or [0.0]

    ttft, e2e = ms([r.ttft for r in ok]), ms([r.latency for r in ok])
    itl = ms([x for r in ok for x in r.itl])
    tpot = ms([(r.latency - r.ttft) / (r.output_len - 1) for r in ok if r.output_len > 1])
    inp, out = sum(r.prompt_len for r in ok), sum(r.output_len for r in ok)
    out_stats: dict[str, Any] = {
        "backend": "openai-completions", "dataset_name": "random", "base_url": args.base_url, "model": model,
        "request_rate": args.request_rate if math.isfinite(args.request_rate) else "inf",
        "max_concurrency": args.max_concurrency, "num_prompts": args.num_prompts,
        "random_input_len": args.random_input_len, "random_output_len": args.random_output_len,
        "random_range_ratio": args.random_range_ratio, "prompt_format": args.prompt_format,
        "duration": duration, "completed": len(ok), "failed": len(results) - len(ok),
        "total_input_tokens": inp, "total_output_tokens": out,
        "request_throughput": len(ok) / duration, "input_throughput": inp / duration,
        "output_throughput": out / duration, "total_throughput": (inp + out) / duration,
        "concurrency": sum(r.latency for r in ok) / duration,
    }
    for name, xs in (("e2e_latency", e2e), ("ttft", ttft), ("tpot", tpot), ("itl", itl)):
        a = np.asarray(xs)
        out_stats.update({f"mean_{name}_ms": float(a.mean()), f"median_{name}_ms": float(np.median(a)),
                          f"std_{name}_ms": float(a.std()), f"p95_{name}_ms": float(np.percentile(a, 95)),
                          f"p99_{name}_ms": float(np.percentile(a, 99)), f"max_{name}_ms": float(a.max())})
    out_stats["errors"] = sorted({r.error for r in results if r.error})[:10]
    return out_stats


def print_report(m: dict[str, Any]) -> None:
    """The layout of SGLang's bench_serving report."""
    def row(label: str, value: Any, fmt: str = "<10.2f") -> None:
        print(f"{label:<40} {value:{fmt}}" if isinstance(value, (int, float)) else f"{label:<40} {value}")

    print("\n{s:{c}^50}".format(s=" Serving Benchmark Result ", c="="))
    row("Backend:", m["backend"])
    row("Traffic request rate:", m["request_rate"])
    row("Max request concurrency:", m["max_concurrency"] or "not set")
    row("Successful requests:", m["completed"], "<10")
    row("Benchmark duration (s):", m["duration"])
    row("Total input tokens:", m["total_input_tokens"], "<10")
    row("Total generated tokens:", m["total_output_tokens"], "<10")
    row("Request throughput (req/s):", m["request_throughput"])
    row("Input token throughput (tok/s):", m["input_throughput"])
    row("Output token throughput (tok/s):", m["output_throughput"])
    row("Total token throughput (tok/s):", m["total_throughput"])
    row("Concurrency:", m["concurrency"])
    sections = (("End-to-End Latency", "e2e_latency", ("99",)), ("Time to First Token", "ttft", ("99",)),
                ("Time per Output Token (excl. 1st token)", "tpot", ("99",)),
                ("Inter-Token Latency", "itl", ("95", "99")))
    for title, key, pcts in sections:
        print("{s:{c}^50}".format(s=title, c="-"))
        abbr = {"e2e_latency": "E2E Latency"}.get(key, key.upper())
        row(f"Mean {abbr} (ms):", m[f"mean_{key}_ms"])
        row(f"Median {abbr} (ms):", m[f"median_{key}_ms"])
        for p in pcts:
            row(f"P{p} {abbr} (ms):", m[f"p{p}_{key}_ms"])
        if key == "itl":
            row(f"Max {abbr} (ms):", m["max_itl_ms"])
    print("=" * 50)
    if m["errors"]:
        print("errors:", *m["errors"], sep="\n  ", file=sys.stderr)


def run_benchmark(args: BenchArgs) -> dict[str, Any]:
    """Run, print SGLang's report (unless quiet) and write the JSON (if --output); returns the metrics."""
    metrics = asyncio.run(benchmark(args))
    if not args.quiet:
        print_report(metrics)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(metrics, f, indent=2)
    return metrics


def parse_args(argv: list[str] | None = None) -> BenchArgs:
    d = BenchArgs()
    p = argparse.ArgumentParser(prog="python -m radixserve.bench.serving",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default=None, help=f"Server URL (default {d.base_url}, or --host/--port).")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=1919)
    p.add_argument("--model", help="Model name for requests (default: the first of /v1/models).")
    p.add_argument("--api-key", help="Bearer token, if the server wants one.")
    p.add_argument("--dataset-name", choices=["random"], default="random")
    p.add_argument("--num-prompts", type=int, default=d.num_prompts)
    p.add_argument("--random-input-len", type=int, default=d.random_input_len)
    p.add_argument("--random-output-len", type=int, default=d.random_output_len)
    p.add_argument("--random-range-ratio", type=float, default=d.random_range_ratio,
                   help="Lengths uniform in [len*R, len] (SGLang's meaning; default 0).")
    p.add_argument("--request-rate", type=float, default=d.request_rate, help="Poisson arrivals per second "
                   "(default inf: all at once).")
    p.add_argument("--max-concurrency", type=int, default=None, help="At most this many requests in flight.")
    p.add_argument("--prompt-format", choices=["ids", "text"], default=d.prompt_format,
                   help="Send prompts as token-id lists (exact lengths) or as decoded text.")
    p.add_argument("--tokenizer", help="HF tokenizer dir or .gguf for the vocab and text prompts (default: "
                   "radixserve's /get_model_info vocab size, else the bundled model's tokenizer).")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--disable-ignore-eos", action="store_true",
                   help="Do not send ignore_eos (for servers that reject it).")
    p.add_argument("--warmup-requests", type=int, default=d.warmup_requests)
    p.add_argument("--output", "--output-file", dest="output", help="Write the metrics as JSON here.")
    ns = vars(p.parse_args(argv))
    host, port = ns.pop("host"), ns.pop("port")
    ns.pop("dataset_name")
    ns["base_url"] = ns["base_url"] or f"http://{host}:{port}"
    return BenchArgs(**ns)


def main(argv: list[str] | None = None) -> None:
    run_benchmark(parse_args(argv))


if __name__ == "__main__":
    main()

