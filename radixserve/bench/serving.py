"""Online serving benchmark against any OpenAI-compatible server (SGLang's bench_serving, random dataset).

    python -m radixserve.bench.serving --base-url http://127.0.0.1:1919 --num-prompts 16 \
        --random-input-len 128 --random-output-len 32 [--request-rate 4] [--max-concurrency 8] \
        [--slo-ttft 200 --slo-tpot 20] [--compare-socket-client 8] [--output r.json]

Each request streams /v1/completions (greedy, `ignore_eos` so every output reaches its length; pass
--disable-ignore-eos for servers that reject the field). Prompts are random token ids (lengths uniform in
[len*R, len], SGLang's --random-range-ratio, default 0) sent as a token-id list, so the server sees
exactly the intended input length; --prompt-format text decodes them to text first. Token counts
come from the server's `usage` (stream_options.include_usage). Arrivals are Poisson at --request-rate
(inf: all at once), at most --max-concurrency in flight. Library use: `run_benchmark(BenchArgs(...))`.

The client measures the server, not itself: HTTP/1.1 over asyncio streams, parsed by hand (StreamParser:
chunked transfer framing, SSE events, msgspec JSON), one connection per request, timestamps taken as
bytes arrive. No openai library (its pydantic models cost ~40 ms of client time per request in the first
split of issue 14) and no aiohttp either: the parser is ~60 lines and its cost is measured, not assumed —
`client_us_per_chunk` in the JSON is the client's own CPU time per SSE chunk, and --compare-socket-client
N reruns N requests one at a time through the same parser on a plain blocking socket (no event loop) and
reports both clients' TTFT and ITL, so any overhead of asyncio shows as a difference.

With the server's --enable-metrics the JSON also holds the server's own TTFT/ITL means over the run, and
with --enable-request-time-stats-logging the first token's time per hop (HTTP receive, tokenize, queue,
forward, detokenize, SSE write; request_timing.py), from /metrics before and after the run. The server's
flags (/get_server_info) and the checkout's commit are recorded too, and for a server on the same host each
of its processes' CPU time per generated token (`server_cpu_us_per_token`: can the API server keep up).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import socket
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import msgspec
import numpy as np

READ_SIZE = 1 << 16


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
    # merged into every request body (SGLang's bench_serving flag): e.g. a logit_bias that keeps a server
    # without ignore_eos (llama.cpp's) from stopping early, so both servers generate the same tokens
    extra_request_body: dict[str, Any] | None = None
    warmup_requests: int = 1
    slo_ttft: float | None = None  # ms
    slo_tpot: float | None = None  # ms
    compare_socket_client: int = 0
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
    chunks: int = 0
    client_cpu: float = 0.0  # seconds the client spent parsing this request's response
    error: str = ""

    @property
    def tpot(self) -> float | None:
        return (self.latency - self.ttft) / (self.output_len - 1) if self.output_len > 1 else None


# ---- HTTP + SSE, parsed by hand ---------------------------------------------------------------------
class StreamParser:
    """Fed the raw bytes of one HTTP/1.1 response as they arrive, with their arrival time. Handles the
    status line and headers, chunked or length-delimited bodies and SSE framing, and records TTFT/ITL per
    completion chunk (a chunk with a choice; the usage-only chunk carries no token)."""

    def __init__(self, res: Result, start: float) -> None:
        self.res, self.start, self.last = res, start, start
        self.buf, self.body, self.events = b"", b"", b""
        self.status: int | None = None
        self.chunked, self.remaining = False, -1  # remaining: bytes of the current chunk / body left
        self.done = False
        self.decode = msgspec.json.decode

    def feed(self, data: bytes, now: float) -> None:
        t0 = time.perf_counter()
        self.buf += data
        if self.status is None:
            head, sep, rest = self.buf.partition(b"\r\n\r\n")
            if not sep:
                return
            lines = head.split(b"\r\n")
            self.status = int(lines[0].split()[1])
            headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(b":") for ln in lines[1:])}
            self.chunked = headers.get(b"transfer-encoding", b"").lower() == b"chunked"
            self.remaining = -1 if self.chunked else int(headers.get(b"content-length", b"-1"))
            self.buf = rest
        self._body()
        if self.status == 200:
            self._events(now)
        self.res.client_cpu += time.perf_counter() - t0

    def _body(self) -> None:
        if not self.chunked:
            self.body += self.buf
            self.buf = b""
            if self.remaining >= 0 and len(self.body) >= self.remaining:
                self.done = True
            return
        while True:
            if self.remaining < 0:  # expecting a chunk-size line
                line, sep, rest = self.buf.partition(b"\r\n")
                if not sep:
                    return
                self.remaining, self.buf = int(line.split(b";")[0], 16), rest
                if self.remaining == 0:
                    self.done = True
                    return
            if len(self.buf) < self.remaining + 2:
                return
            self.body += self.buf[:self.remaining]
            self.buf, self.remaining = self.buf[self.remaining + 2:], -1

    def _events(self, now: float) -> None:
        self.events += self.body
        self.body = b""
        while True:
            event, sep, rest = self.events.partition(b"\n\n")
            if not sep:
                return
            self.events = rest
            if not event.startswith(b"data: ") or event == b"data: [DONE]":
                continue
            obj = self.decode(event[6:])
            usage, res = obj.get("usage"), self.res
            if usage:
                res.prompt_len, res.output_len = usage["prompt_tokens"], usage["completion_tokens"]
            if obj.get("error"):
                res.error = str(obj["error"].get("message"))
            if obj.get("choices"):
                res.chunks += 1
                if res.chunks == 1:
                    res.ttft = now - self.start
                else:
                    res.itl.append(now - self.last)
                self.last = now

    def finish(self, end: float) -> Result:
        res = self.res
        res.latency = end - self.start
        if self.status != 200:
            res.error = res.error or f"HTTP {self.status}: {(self.body + self.buf)[:300].decode(errors='replace')}"
        elif not res.error:
            res.output_len = res.output_len or res.chunks
            res.success = res.chunks > 0
            res.error = "" if res.success else "no output"
        return res


@dataclass
class Target:
    host: str
    port: int
    path: str  # /v1/completions under the base URL's path
    headers: bytes

    @classmethod
    def of(cls, base_url: str, api_key: str | None) -> Target:
        u = urlsplit(base_url)
        if u.scheme != "http":
            raise ValueError(f"--base-url {base_url!r}: only http:// is supported (the client speaks plain HTTP/1.1)")
        auth = f"Authorization: Bearer {api_key}\r\n" if api_key else ""
        host = u.hostname or "127.0.0.1"
        return cls(host, u.port or 80, u.path.rstrip("/") + "/v1/completions",
                   f"Host: {host}\r\nContent-Type: application/json\r\nConnection: close\r\n{auth}".encode())

    def request(self, body: bytes) -> bytes:
        return (f"POST {self.path} HTTP/1.1\r\n".encode() + self.headers
                + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)


def completion_body(model: str, prompt: list[int] | str, output_len: int, ignore_eos: bool,
                    extra: dict[str, Any] | None = None) -> bytes:
    body: dict[str, Any] = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0,
                            "stream": True, "stream_options": {"include_usage": True}}
    if ignore_eos:
        body["ignore_eos"] = True
    return msgspec.json.encode({**body, **(extra or {})})


async def send(target: Target, body: bytes, prompt_len: int) -> Result:
    """One streamed request over its own asyncio connection; the clock starts before connecting."""
    res, start = Result(prompt_len=prompt_len), time.perf_counter()
    parser = StreamParser(res, start)
    writer = None
    try:
        reader, writer = await asyncio.open_connection(target.host, target.port)
        writer.write(target.request(body))
        while not parser.done:
            data = await reader.read(READ_SIZE)
            if not data:
                break
            parser.feed(data, time.perf_counter())
    except (OSError, ValueError, msgspec.DecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"
        return res
    finally:
        if writer is not None:
            writer.close()
    return parser.finish(time.perf_counter())


def send_blocking(target: Target, body: bytes, prompt_len: int) -> Result:
    """The reference: the same request and parser over a plain blocking socket, no event loop."""
    res, start = Result(prompt_len=prompt_len), time.perf_counter()
    parser = StreamParser(res, start)
    with socket.create_connection((target.host, target.port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(target.request(body))
        while not parser.done:
            data = sock.recv(READ_SIZE)
            if not data:
                break
            parser.feed(data, time.perf_counter())
    return parser.finish(time.perf_counter())


# ---- the server's side ------------------------------------------------------------------------------
def http_get(args: BenchArgs, path: str, timeout: float = 10.0) -> bytes | None:
    req = urllib.request.Request(args.base_url.rstrip("/") + path,
                                 headers={"Authorization": f"Bearer {args.api_key}"} if args.api_key else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.read()
    except (OSError, ValueError, urllib.error.URLError):
        return None


def server_vocab_size(args: BenchArgs) -> int | None:
    """radixserve reports its vocab in /get_model_info, which spares loading a tokenizer for id prompts."""
    raw = http_get(args, "/get_model_info")
    try:
        return json.loads(raw).get("vocab_size") if raw else None
    except ValueError:
        return None


def server_pids(args: BenchArgs) -> dict[str, int]:
    raw = http_get(args, "/get_server_info")
    try:
        pids = json.loads(raw).get("pids") if raw else None
    except ValueError:
        return {}
    return pids if isinstance(pids, dict) else {}


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """utime + stime of each server process, when the server runs on this host (/proc); else nothing."""
    out = {}
    tick = os.sysconf("SC_CLK_TCK")
    for role, pid in pids.items():
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[role] = (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return out


def server_flags(args: BenchArgs) -> dict[str, Any] | None:
    """The server's ServerArgs and memory plan (radixserve's /get_server_info), without the live state."""
    raw = http_get(args, "/get_server_info")
    try:
        info = json.loads(raw) if raw else None
    except ValueError:
        return None
    if isinstance(info, dict):
        for k in ("internal_states", "pids"):
            info.pop(k, None)
    return info


def scrape(args: BenchArgs) -> dict[str, float]:
    """`name{labels}` -> value for the sums and counts of radixserve's histograms in /metrics."""
    raw = http_get(args, "/metrics")
    out: dict[str, float] = {}
    for line in (raw or b"").decode(errors="replace").splitlines():
        if line.startswith("radixserve:") and ("_sum{" in line or "_count{" in line):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def label(key: str, name: str) -> str | None:
    i = key.find(f'{name}="')
    return key[i + len(name) + 2:key.index('"', i + len(name) + 2)] if i >= 0 else None


def server_breakdown(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """Means over the run (ms) of the server's own TTFT and ITL histograms and of each hop."""
    def mean(sum_key: str) -> float | None:
        n = after.get(sum_key.replace("_sum{", "_count{"), 0) - before.get(sum_key.replace("_sum{", "_count{"), 0)
        return 1000 * (after[sum_key] - before.get(sum_key, 0)) / n if n > 0 else None

    out: dict[str, Any] = {}
    for key in after:
        if "_sum{" not in key:
            continue
        name = key.split("{", 1)[0].removeprefix("radixserve:")
        if name == "time_to_first_token_seconds_sum":
            out["server_mean_ttft_ms"] = mean(key)
        elif name == "inter_token_latency_seconds_sum":
            out["server_mean_itl_ms"] = mean(key)
        elif name == "request_hop_seconds_sum" and (hop := label(key, "hop")) and mean(key) is not None:
            out.setdefault("server_hops_mean_ms", {})[hop] = mean(key)
    return out


# ---- workload ---------------------------------------------------------------------------------------
def load_tokenizer(path: str | None) -> Any:
    """--tokenizer (an HF dir or a .gguf file), else the bundled model's."""
    if path and not path.endswith(".gguf"):
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(path)
    from radixserve.weights.loader import load_tokenizer as load
    from radixserve.weights.loader import resolve_model
    return load(resolve_model(path))


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


def served_model(args: BenchArgs) -> str:
    raw = http_get(args, "/v1/models")
    if raw is None:
        raise RuntimeError(f"no server answers at {args.base_url} (GET /v1/models failed)")
    return json.loads(raw)["data"][0]["id"]


# ---- the run ----------------------------------------------------------------------------------------
async def benchmark(args: BenchArgs) -> dict[str, Any]:
    target = Target.of(args.base_url, args.api_key)
    model = args.model or served_model(args)
    work = make_workload(args)
    ignore_eos = not args.disable_ignore_eos
    extra = args.extra_request_body
    bodies = [(completion_body(model, p, olen, ignore_eos, extra), plen) for p, plen, olen in work]
    for prompt, plen, olen in work[:args.warmup_requests]:
        warm = await send(target, completion_body(model, prompt, min(olen, 16), ignore_eos, extra), plen)
        if not warm.success:
            raise RuntimeError(f"warm-up request failed: {warm.error}")
    before = scrape(args)
    pids = server_pids(args)
    cpu_before = cpu_seconds(pids)
    sem = asyncio.Semaphore(args.max_concurrency or len(work) or 1)
    rng = np.random.default_rng(args.seed)

    async def limited(body: bytes, plen: int) -> Result:
        async with sem:
            return await send(target, body, plen)

    tasks = []
    start = time.perf_counter()
    for body, plen in bodies:
        tasks.append(asyncio.create_task(limited(body, plen)))
        if math.isfinite(args.request_rate):
            await asyncio.sleep(rng.exponential(1.0 / args.request_rate))
    results = await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    metrics = summarize(results, duration, args, model)
    metrics.update(server_breakdown(before, scrape(args)))
    cpu_after, tokens = cpu_seconds(pids), metrics["total_output_tokens"]
    if cpu_before and tokens:  # a server on this host: each process's CPU time per generated token
        metrics["server_cpu_us_per_token"] = {role: 1e6 * (cpu_after[role] - t) / tokens
                                              for role, t in cpu_before.items() if role in cpu_after}
    if args.compare_socket_client:
        metrics["client_check"] = await compare_clients(target, bodies[:args.compare_socket_client])
    return metrics


async def compare_clients(target: Target, bodies: list[tuple[bytes, int]]) -> dict[str, Any]:
    """The same requests one at a time through this client and through the blocking-socket reference
    (in a thread, so the event loop is idle meanwhile), alternating, so both see the same server state
    (the prompts are in its prefix cache after the run): TTFT and ITL per client, and the difference."""
    ours, ref = [], []
    for b, n in bodies:
        ours.append(await send(target, b, n))
        ref.append(await asyncio.to_thread(send_blocking, target, b, n))

    def stats(rs: list[Result]) -> dict[str, float]:
        ok = [r for r in rs if r.success]
        itl = [x for r in ok for x in r.itl] or [0.0]
        return {"mean_ttft_ms": 1000 * float(np.mean([r.ttft for r in ok] or [0.0])),
                "median_itl_ms": 1000 * float(np.median(itl)), "mean_itl_ms": 1000 * float(np.mean(itl)),
                "completed": len(ok)}
    a, b = stats(ours), stats(ref)
    return {"requests": len(bodies), "asyncio_client": a, "socket_client": b,
            "ttft_diff_ms": a["mean_ttft_ms"] - b["mean_ttft_ms"],
            "itl_median_diff_ms": a["median_itl_ms"] - b["median_itl_ms"]}


def summarize(results: list[Result], duration: float, args: BenchArgs, model: str) -> dict[str, Any]:
    ok = [r for r in results if r.success]

    def ms(xs: list[float]) -> list[float]:
        return [1000 * x for x in xs] or [0.0]

    ttft, e2e = ms([r.ttft for r in ok]), ms([r.latency for r in ok])
    itl = ms([x for r in ok for x in r.itl])
    tpot = ms([t for r in ok if (t := r.tpot) is not None])
    inp, out = sum(r.prompt_len for r in ok), sum(r.output_len for r in ok)
    chunks = sum(r.chunks for r in ok)
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
        "total_chunks": chunks, "tokens_per_chunk": out / chunks if chunks else 0.0,
        "client_us_per_chunk": 1e6 * sum(r.client_cpu for r in ok) / chunks if chunks else 0.0,
    }
    for name, xs in (("e2e_latency", e2e), ("ttft", ttft), ("tpot", tpot), ("itl", itl)):
        a = np.asarray(xs)
        out_stats.update({f"mean_{name}_ms": float(a.mean()), f"median_{name}_ms": float(np.median(a)),
                          f"std_{name}_ms": float(a.std()), f"p95_{name}_ms": float(np.percentile(a, 95)),
                          f"p99_{name}_ms": float(np.percentile(a, 99)), f"max_{name}_ms": float(a.max())})
    if args.slo_ttft is not None or args.slo_tpot is not None:
        good = [r for r in ok if (args.slo_ttft is None or 1000 * r.ttft <= args.slo_ttft)
                and (args.slo_tpot is None or r.tpot is None or 1000 * r.tpot <= args.slo_tpot)]
        out_stats.update({"slo_ttft_ms": args.slo_ttft, "slo_tpot_ms": args.slo_tpot, "good_requests": len(good),
                          "request_goodput": len(good) / duration,
                          "goodput_fraction": len(good) / len(results) if results else 0.0})
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
    if "request_goodput" in m:
        row("Request goodput (req/s):", m["request_goodput"])
    row("Input token throughput (tok/s):", m["input_throughput"])
    row("Output token throughput (tok/s):", m["output_throughput"])
    row("Total token throughput (tok/s):", m["total_throughput"])
    row("Concurrency:", m["concurrency"])
    row("Tokens per SSE chunk:", m["tokens_per_chunk"])
    row("Client CPU per chunk (us):", m["client_us_per_chunk"])
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
    if m.get("server_hops_mean_ms"):
        print("{s:{c}^50}".format(s="Server: first token per hop (mean)", c="-"))
        for hop, v in m["server_hops_mean_ms"].items():
            row(f"{hop} (ms):", v, "<10.3f")
    print("=" * 50)
    if m["errors"]:
        print("errors:", *m["errors"], sep="\n  ", file=sys.stderr)


def provenance(args: BenchArgs) -> dict[str, Any]:
    """The server's flags and the checkout's commit (the bench runs from the server's checkout)."""
    from radixserve.bench.roofline import device_name, git_commit
    flags = server_flags(args)
    device = device_name(flags["device"]) if flags and isinstance(flags.get("device"), str) else None
    return {"commit": git_commit(), "device": device, "server_args": flags, "command": " ".join(sys.argv)}


def run_benchmark(args: BenchArgs) -> dict[str, Any]:
    """Run, print SGLang's report (unless quiet) and write the JSON (if --output); returns the metrics."""
    metrics = asyncio.run(benchmark(args))
    metrics.update(provenance(args))
    if not args.quiet:
        print_report(metrics)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(metrics, f, indent=2)
    return metrics


def json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e}); pass an object such as '{{\"top_k\": 1}}'") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object such as '{\"top_k\": 1}'")
    return value


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
    p.add_argument("--extra-request-body", type=json_object, default=None, metavar="JSON",
                   help='A JSON object merged into every request body, e.g. \'{"logit_bias": {"2": -100}}\'.')
    p.add_argument("--warmup-requests", type=int, default=d.warmup_requests)
    p.add_argument("--slo-ttft", type=float, help="TTFT SLO in ms: goodput counts requests within every SLO.")
    p.add_argument("--slo-tpot", type=float, help="TPOT SLO in ms (time per output token after the first).")
    p.add_argument("--compare-socket-client", type=int, default=0, metavar="N",
                   help="After the run, send N requests one at a time through this client and through a "
                   "blocking-socket reference client, and report both (the client's own overhead).")
    p.add_argument("--output", "--output-file", dest="output", help="Write the metrics as JSON here.")
    p.add_argument("--quiet", action="store_true", help="Do not print the report.")
    ns = vars(p.parse_args(argv))
    host, port = ns.pop("host"), ns.pop("port")
    ns.pop("dataset_name")
    ns["base_url"] = ns["base_url"] or f"http://{host}:{port}"
    return BenchArgs(**ns)


def main(argv: list[str] | None = None) -> None:
    run_benchmark(parse_args(argv))


if __name__ == "__main__":
    main()
