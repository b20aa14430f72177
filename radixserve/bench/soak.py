"""Soak test of a running server: many mixed requests, then checks that nothing was lost or leaked.

    python -m radixserve.bench.soak --base-url http://127.0.0.1:1919 --num-requests 10000 \
        --concurrency 128 [--max-tokens 64] [--output soak.json]

The mix: chat and completions, streamed or not, n = 1-4, random prompt and output lengths; a share of the
streams is cancelled mid-way (the client closes the connection after a few chunks) and a share of the
requests is invalid on purpose (each must get a 4xx in OpenAI's error shape). Afterwards:

- zero 5xx and zero lost requests (a valid request must end with a complete answer: every choice with a
  finish_reason, a stream with `data: [DONE]`);
- the KV pool back to capacity minus what the radix cache keeps, and back to full after /flush_cache;
- the RSS of every server process (read from /proc for a server on this host; its pids come from
  /get_server_info) flat: at most --max-rss-growth over the second half of the run.

Exit code 0 when every check passes; the figures go to --output as JSON with device, commit and command.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx

WORDS = ("the quick brown fox jumps over a lazy dog while seven bright stars watch from far away and "
         "nobody knows why rivers sing at night").split()
INVALID: list[tuple[str, Any]] = [
    ("/v1/completions", {"prompt": "hi", "temperature": -1}),
    ("/v1/completions", {"prompt": "hi", "top_p": 2}),
    ("/v1/completions", {"prompt": "hi", "max_tokenz": 3}),
    ("/v1/completions", {"prompt": "hi", "n": 0}),
    ("/v1/completions", {"prompt": "hi", "seed": 2**70}),
    ("/v1/chat/completions", {"messages": []}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}),
    ("/v1/completions", b'{"prompt": "a\\ud800", "max_tokens": 2}'),
    ("/v1/completions", b'{"prompt": "hi", "repetition_penalty": NaN}'),
    ("/v1/completions", b'{"prompt": '),
]


@dataclass
class SoakArgs:
    base_url: str = "http://127.0.0.1:1919"
    num_requests: int = 10000
    concurrency: int = 128
    max_tokens: int = 64
    max_prompt_words: int = 200
    max_n: int = 4
    cancel_fraction: float = 0.10
    invalid_fraction: float = 0.05
    seed: int = 0
    timeout: float = 600.0
    max_rss_growth: float = 0.05
    api_key: str | None = None
    output: str | None = None
    quiet: bool = False


@dataclass
class Tally:
    sent: int = 0
    ok: int = 0
    cancelled: int = 0
    invalid_ok: int = 0  # invalid requests answered with a 4xx error body
    server_errors: int = 0  # 5xx on a valid request
    lost: int = 0  # no complete answer and no error status
    wrong_invalid: int = 0  # an invalid request that got anything but a 4xx error body
    output_tokens: int = 0
    problems: list[str] = field(default_factory=list)

    def problem(self, what: str) -> None:
        if len(self.problems) < 20:
            self.problems.append(what)


def make_request(rng: random.Random, a: SoakArgs) -> tuple[str, Any, bool, int]:
    """(path, body, stream, n) of one valid request."""
    words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, a.max_prompt_words)))
    n, stream = rng.randint(1, a.max_n), rng.random() < 0.5
    common = {"max_tokens": rng.randint(1, a.max_tokens), "n": n, "stream": stream,
              "temperature": rng.choice([0.0, 0.7, 1.0]), "ignore_eos": rng.random() < 0.5}
    if stream and rng.random() < 0.5:
        common["stream_options"] = {"include_usage": True}
    if rng.random() < 0.5:
        return "/v1/chat/completions", {"messages": [{"role": "user", "content": words}], **common}, stream, n
    return "/v1/completions", {"prompt": words, **common}, stream, n


def refused(status: int, body: bytes, path: str, t: Tally) -> bool:
    """A valid request that did not get a 200: a 5xx counts as a server error, anything else as lost."""
    if status == 200:
        return False
    if status >= 500:
        t.server_errors += 1
    else:
        t.lost += 1
    t.problem(f"{status} on a valid request {path}: {body[:200]!r}")
    return True


async def one_valid(client: httpx.AsyncClient, path: str, body: dict, stream: bool, n: int, cancel_after: int | None,
                    t: Tally) -> None:
    content = json.dumps(body)
    try:
        if not stream:
            r = await client.post(path, content=content)
            if refused(r.status_code, r.content, path, t):
                return
            data = r.json()
            if len(data["choices"]) != n or any(c["finish_reason"] is None for c in data["choices"]):
                t.lost += 1
                t.problem(f"incomplete answer: {str(data)[:200]}")
                return
            t.ok += 1
            t.output_tokens += data["usage"]["completion_tokens"]
            return
        async with client.stream("POST", path, content=content) as r:
            if r.status_code != 200 and refused(r.status_code, await r.aread(), path + " (stream)", t):
                return
            finished, chunks, done = set(), 0, False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                event = json.loads(line[6:])
                if "error" in event:
                    t.server_errors += 1
                    t.problem(f"error event: {event['error']}")
                    return
                for c in event.get("choices", []):
                    if c.get("finish_reason"):
                        finished.add(c["index"])
                if event.get("usage"):
                    t.output_tokens += event["usage"]["completion_tokens"]
                chunks += 1
                if cancel_after is not None and chunks >= cancel_after:
                    t.cancelled += 1
                    return  # leaving the block closes the connection mid-stream
            if cancel_after is not None and not done:
                t.cancelled += 1  # ended before the cut: counts as cancelled, not lost
            elif not done or len(finished) != n:
                t.lost += 1
                t.problem(f"stream ended without [DONE] or finish_reason for all {n} choices: {sorted(finished)}")
            else:
                t.ok += 1
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as e:
        t.lost += 1
        t.problem(f"{type(e).__name__} on {path}: {e}")


async def one_invalid(client: httpx.AsyncClient, path: str, body: Any, t: Tally) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body)
    try:
        r = await client.post(path, content=content)
        ok = 400 <= r.status_code < 500 and set(r.json().get("error", {})) >= {"message", "type", "code"}
    except (httpx.HTTPError, json.JSONDecodeError, AttributeError) as e:
        ok = False
        r = None
        t.problem(f"{type(e).__name__} on invalid {path}: {e}")
    if ok:
        t.invalid_ok += 1
    else:
        t.wrong_invalid += 1
        if r is not None:
            t.problem(f"invalid request to {path} answered {r.status_code}: {r.text[:200]}")
            if r.status_code >= 500:
                t.server_errors += 1


def rss_of(pids: dict[str, int]) -> dict[str, int]:
    out = {}
    for name, pid in pids.items():
        try:
            with open(f"/proc/{pid}/status") as f:
                out[name] = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass
    return out


async def live(client: httpx.AsyncClient) -> dict:
    return (await client.get("/get_server_info")).json()


async def wait_idle(client: httpx.AsyncClient, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        info = (await live(client))["internal_states"][0]
        if info["num_running_reqs"] == info["num_queue_reqs"] == 0 or time.monotonic() > deadline:
            return info
        await asyncio.sleep(0.2)


async def soak(a: SoakArgs) -> dict[str, Any]:
    rng = random.Random(a.seed)
    headers = {"Content-Type": "application/json",
               **({"Authorization": f"Bearer {a.api_key}"} if a.api_key else {})}
    limits = httpx.Limits(max_connections=a.concurrency + 4, max_keepalive_connections=a.concurrency + 4)
    t = Tally()
    async with httpx.AsyncClient(base_url=a.base_url, headers=headers, timeout=a.timeout, limits=limits) as client:
        info = await live(client)
        pids = info.get("pids", {})
        local = all(os.path.exists(f"/proc/{p}") for p in pids.values())
        rss_samples: list[tuple[int, dict[str, int]]] = []
        queue: asyncio.Queue = asyncio.Queue()
        for _ in range(a.num_requests):
            if rng.random() < a.invalid_fraction:
                queue.put_nowait(("invalid", *rng.choice(INVALID)))
            else:
                path, body, stream, n = make_request(rng, a)
                cancel = rng.randint(1, 4) if stream and rng.random() < a.cancel_fraction else None
                queue.put_nowait(("valid", path, body, stream, n, cancel))

        async def worker() -> None:
            while not queue.empty():
                job = queue.get_nowait()
                t.sent += 1
                if job[0] == "invalid":
                    await one_invalid(client, job[1], job[2], t)
                else:
                    await one_valid(client, *job[1:], t)
                if local and t.sent % max(a.num_requests // 20, 1) == 0:
                    rss_samples.append((t.sent, rss_of(pids)))

        start = time.perf_counter()
        workers = [asyncio.ensure_future(worker()) for _ in range(a.concurrency)]
        last_log = start
        while not all(w.done() for w in workers):
            await asyncio.sleep(1.0)
            if not a.quiet and time.perf_counter() - last_log > 10:
                last_log = time.perf_counter()
                print(f"[soak] {t.sent}/{a.num_requests} sent, {t.ok} ok, {t.server_errors} 5xx, {t.lost} lost",
                      file=sys.stderr)
        await asyncio.gather(*workers)
        duration = time.perf_counter() - start
        if local:
            rss_samples.append((t.sent, rss_of(pids)))
        after = await wait_idle(client)
        kv_idle_ok = after["kv_used_tokens"] == 0 and \
            after["kv_free_tokens"] + after["kv_cached_tokens"] == after["kv_capacity_tokens"]
        flush = await client.post("/flush_cache")
        flushed = (await live(client))["internal_states"][0]
        kv_flush_ok = flush.status_code == 200 and flushed["kv_free_tokens"] == flushed["kv_capacity_tokens"]

    growth = {}
    if len(rss_samples) >= 2:
        mid = rss_samples[len(rss_samples) // 2][1]
        end = rss_samples[-1][1]
        growth = {k: (end[k] - mid[k]) / mid[k] for k in mid if k in end and mid[k]}
    checks = {
        "no_5xx": t.server_errors == 0,
        "none_lost": t.lost == 0,
        "invalid_get_4xx": t.wrong_invalid == 0,
        "kv_back_to_capacity_minus_cache": kv_idle_ok,
        "kv_full_after_flush": kv_flush_ok,
        "rss_flat": all(g <= a.max_rss_growth for g in growth.values()) if growth else None,
    }
    return {
        "tally": asdict(t), "duration_s": duration, "requests_per_s": t.sent / duration,
        "output_tokens_per_s": t.output_tokens / duration, "kv_after": after, "kv_after_flush": flushed,
        "rss_bytes_first_mid_last": [rss_samples[0][1], rss_samples[len(rss_samples) // 2][1], rss_samples[-1][1]]
        if rss_samples else None, "rss_growth_second_half": growth, "checks": checks,
        "passed": all(v is not False for v in checks.values()), "model_path": info.get("model_path"),
        "server_device": info.get("device", "cpu"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m radixserve.bench.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in SoakArgs.__dataclass_fields__.values():
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            p.add_argument(flag, action="store_true")
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            p.add_argument(flag, type=kind, default=f.default)
    a = SoakArgs(**vars(p.parse_args(argv)))
    result = asyncio.run(soak(a))
    from radixserve.bench.roofline import device_name, git_commit
    record = {"bench": "soak", "device": device_name(result["server_device"]), "commit": git_commit(),
              "command": "python -m radixserve.bench.soak " + " ".join(argv if argv is not None else sys.argv[1:]),
              "args": asdict(a), "results": result}
    text = json.dumps(record, indent=2)
    if a.output:
        with open(a.output, "w") as f:
            f.write(text + "\n")
    print(json.dumps({"checks": result["checks"], "tally": {k: v for k, v in result["tally"].items()
                                                            if k != "problems"},
                      "problems": result["tally"]["problems"][:5]}, indent=1))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
