"""Per-request timestamps at every hop of the pipeline (--enable-request-time-stats-logging).

A request's first token crosses three processes; each stamps it with `time.perf_counter()` and passes the
stamps along with the request's first output, so the API server can split the client's TTFT into hops:

```
API server   http_recv ── tokenized ───────────────────────────────────────────────── written
scheduler                    recv ── admitted ── launched ── ready ── emitted
detokenizer                                                             detok_out
```
perf_counter is CLOCK_MONOTONIC on Linux, one clock for every process of the host, so stamps taken in
different processes subtract (all of a server's processes run on node 0). The stamps ride in `Req.hops`
and `TokenOut.hops` / `StrOut.hops`, which stay None (nothing sent, nothing timed) without the flag.
Later outputs carry only [emitted, detok_out]: their delivery time (scheduler send → SSE write) is the
pipeline's share of each inter-token latency.
"""
from __future__ import annotations

import time
from contextvars import ContextVar
from typing import Any

# Indices into Req.hops, stamped by the scheduler process (the loop appends `emitted`, the detokenizer
# `detok_out`).
RECV, ADMITTED, LAUNCHED, READY = range(4)
SCHEDULER_STAMPS = 4

# (hop, what it holds), in pipeline order: each is the time between consecutive stamps of the first token.
FIRST_TOKEN_HOPS = (
    ("tokenize", "HTTP request received -> prompt tokenized (body parsing, validation, chat template)"),
    ("to_scheduler", "tokenized -> the scheduler read it (ZMQ, plus the scheduler's step in progress)"),
    ("queue", "scheduler received -> admitted to a prefill batch (waiting queue)"),
    ("launch", "admitted -> the forward that samples its first token was launched (on CPU: computed)"),
    ("forward", "launched -> first token on the host (device time; with overlap, the next launch too)"),
    ("scheduler_out", "token on the host -> sent to the detokenizer (result processing)"),
    ("detokenize", "scheduler sent -> detokenizer sent the text"),
    ("to_client", "detokenizer sent -> SSE chunk written (ZMQ, routing, event loop, response encoding)"),
)
TOKEN_DELIVERY = "token_delivery"  # every later output: scheduler sent -> SSE chunk written
HOP_NAMES = [h for h, _ in FIRST_TOKEN_HOPS] + [TOKEN_DELIVERY]

# Set by RequestClockMiddleware when the HTTP request arrives; read where the request is submitted.
HTTP_RECEIVED: ContextVar[float | None] = ContextVar("radixserve_http_received", default=None)


def stamp(req: Any, index: int) -> None:
    """Append now to `req.hops` if it is the stamp expected next; a no-op without the flag, and for a
    retracted or chunked request's later passes (the first pass through a hop is the one that counts)."""
    hops = req.hops
    if hops is not None and len(hops) == index:
        hops.append(time.perf_counter())


def first_token_hops(http_recv: float | None, tokenized: float, hops: list[float], written: float
                     ) -> list[tuple[str, float]] | None:
    """The first token's hop durations (seconds), or None if a stamp is missing (a request that finished
    without running, e.g. max_new_tokens 0)."""
    if len(hops) != SCHEDULER_STAMPS + 2:
        return None
    stamps = [http_recv if http_recv is not None else tokenized, tokenized, *hops, written]
    return [(name, max(b - a, 0.0)) for (name, _), a, b in zip(FIRST_TOKEN_HOPS, stamps, stamps[1:])]


class RequestClockMiddleware:
    """Pure ASGI (streams and disconnects pass through untouched): stamps the arrival of each HTTP request
    in HTTP_RECEIVED, before the body is read or parsed."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            HTTP_RECEIVED.set(time.perf_counter())
        await self.app(scope, receive, send)
