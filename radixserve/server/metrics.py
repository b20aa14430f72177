"""Prometheus metrics for `--enable-metrics` (`GET /metrics`): SGLang's names, `radixserve:` for `sglang:`.

Two sources, because each number is only known in one process:
  * gauges and token counters come from the scheduler's live snapshot (the same InfoOut query that
    /get_server_info uses), fetched once per scrape. The scheduler is the single owner of those counts, so
    there is nothing to keep in sync and nothing is sent per token just for metrics.
  * latency histograms (TTFT, inter-token, end-to-end) and the request counter are observed here in the API
    server process, where a request's outputs arrive (TokenizerManager.generate); the scheduler never sees
    the time a client waits on the pipeline.
A private CollectorRegistry keeps two servers in one process (tests) from colliding on global state.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from radixserve import request_timing as rt
from radixserve.scheduler.stats import QUEUE_TIME_BUCKETS
from radixserve.server.messages import StrOut

logger = logging.getLogger(__name__)
PREFIX = "radixserve:"
# (metric, key in the scheduler snapshot, help). Counters get `_total` appended by the exposition format.
GAUGES = [("num_running_reqs", "num_running_reqs", "Requests running (decoding or prefilling)."),
          ("num_queue_reqs", "num_queue_reqs", "The number of requests in the waiting queue."),
          ("num_used_tokens", "kv_used_tokens", "KV slots held by running requests."),
          ("token_usage", "token_usage", "KV pool utilization: used tokens / capacity."),
          ("gen_throughput", "last_gen_throughput", "Generation throughput (token/s), last log interval."),
          ("cache_hit_rate", "cache_hit_rate", "Prefix cache hit rate: cached / queried prompt tokens."),
          ("hicache_host_used_tokens", "hicache_host_used_tokens", "HiCache: host pool tokens holding KV."),
          ("hicache_host_capacity_tokens", "hicache_host_capacity_tokens", "HiCache: host pool size in tokens.")]
COUNTERS = [("num_retractions", "num_retractions", "Requests retracted because the KV pool was full."),
            ("prompt_tokens", "prompt_tokens_total", "Prompt tokens of all requests received."),
            ("generation_tokens", "generation_tokens_total", "Tokens generated."),
            ("cached_tokens", "cached_tokens_total", "Prompt tokens served from the prefix cache."),
            # HiCache: cached_tokens split by the tier the KV came from (they sum to cached_tokens)
            ("device_cached_tokens", "device_cached_tokens_total", "Cached prompt tokens found on the device."),
            ("host_cached_tokens", "host_cached_tokens_total", "Cached prompt tokens loaded from host memory."),
            ("storage_cached_tokens", "storage_cached_tokens_total", "Cached prompt tokens read from storage.")]
# SGLang's buckets: TTFT and e2e span interactive to long offline requests, ITL one decode step.
TTFT_BUCKETS = [0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 15, 20,
                25, 30, 40, 60, 80, 120, 160]
ITL_BUCKETS = [0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.025, 0.03, 0.035, 0.04, 0.06, 0.08, 0.1, 0.2,
               0.4, 0.6, 0.8, 1, 2, 4, 6, 8]
E2E_BUCKETS = [0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 150, 200, 250, 300, 350, 500,
               1000]
# One hop is tens of microseconds to a long queue wait.
HOP_BUCKETS = [0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.25, 0.5, 1, 2.5,
               5, 10, 30]


class _SchedulerCollector(Collector):
    """Yields the latest scheduler snapshot as gauges and counters. A custom collector rather than Gauge /
    Counter objects: the scheduler already holds monotonic totals, and a prometheus Counter cannot be set."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.snapshot: dict[str, Any] = {}  # set by Metrics.render just before each collection

    def collect(self) -> Iterator[Metric]:
        for families, cls in ((GAUGES, GaugeMetricFamily), (COUNTERS, CounterMetricFamily)):
            for name, key, doc in families:
                fam = cls(PREFIX + name, doc, labels=["model_name"])
                fam.add_metric([self.model], float(self.snapshot.get(key, 0)))
                yield fam
        # the scheduler's queue-time histogram (stats.py): arrival -> first admission to a prefill batch
        q = HistogramMetricFamily(PREFIX + "queue_time_seconds", "Time requests waited in the scheduler's "
                                  "queue before their first prefill.", labels=["model_name"])
        count = float(self.snapshot.get("queue_time_seconds_count", 0))
        buckets = [(f"{le:g}", float(self.snapshot.get(f"queue_time_le_{le:g}", 0))) for le in QUEUE_TIME_BUCKETS]
        q.add_metric([self.model], buckets + [("+Inf", count)], float(self.snapshot.get("queue_time_seconds_sum", 0)))
        yield q


class Metrics:
    def __init__(self, model_name: str, hop_stats: bool = False) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.scheduler = _SchedulerCollector(model_name)
        self.registry.register(self.scheduler)
        kw: dict[str, Any] = {"labelnames": ["model_name"], "registry": self.registry}
        self.num_requests = Counter(PREFIX + "num_requests", "Requests finished (one per choice).", **kw
                                    ).labels(model_name)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Time to first token.",
                              buckets=TTFT_BUCKETS, **kw).labels(model_name)
        self.itl = Histogram(PREFIX + "inter_token_latency_seconds", "Time between consecutive tokens.",
                             buckets=ITL_BUCKETS, **kw).labels(model_name)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "End-to-end request latency.",
                             buckets=E2E_BUCKETS, **kw).labels(model_name)
        # --enable-request-time-stats-logging: the first token's time per hop (request_timing.py), and each
        # later output's delivery (scheduler send -> SSE write)
        self.hops = None
        if hop_stats:
            hist = Histogram(PREFIX + "request_hop_seconds", "Time a request spends in each hop of the pipeline "
                             "(first token; token_delivery: every later output).", buckets=HOP_BUCKETS,
                             labelnames=["model_name", "hop"], registry=self.registry)
            self.hops = {h: hist.labels(model_name, h) for h in rt.HOP_NAMES}

    def render(self, snapshot: dict[str, Any]) -> bytes:
        self.scheduler.snapshot = snapshot
        return generate_latest(self.registry)

    def timer(self, n: int) -> RequestTimer:
        return RequestTimer(self, n)


class RequestTimer:
    """Timing of the n internal requests (choices) of one submission, fed every output as it arrives.

    Token counts come from `completion_tokens`, not `new_ids`, so a step's tokens are counted even when the
    detokenizer holds text back; several tokens in one output (overlap, a slow consumer) each get an equal
    share of the interval, as SGLang's observe_inter_token_latency does."""

    def __init__(self, metrics: Metrics, n: int) -> None:
        self.m, self.start = metrics, time.perf_counter()
        self.last: list[float | None] = [None] * n
        self.tokens = [0] * n
        self.http_recv = rt.HTTP_RECEIVED.get()
        self.written = [False] * n

    def on_output(self, i: int, out: StrOut) -> None:
        now, last = time.perf_counter(), self.last[i]
        new = out.completion_tokens - self.tokens[i]
        if last is None:
            self.m.ttft.observe(now - self.start)
        elif new > 0:
            for _ in range(new):
                self.m.itl.observe((now - last) / new)
        if last is None or new > 0:
            self.last[i], self.tokens[i] = now, out.completion_tokens
        if out.finish_reason is not None:
            self.m.e2e.observe(now - self.start)
            self.m.num_requests.inc()

    def on_written(self, i: int, out: StrOut) -> None:
        """Called once the output's chunk has been handed to the HTTP server: the last hop's end."""
        hops = self.m.hops
        if hops is None or out.hops is None:
            return
        now = time.perf_counter()
        if self.written[i]:
            hops[rt.TOKEN_DELIVERY].observe(max(now - out.hops[0], 0.0))
            return
        self.written[i] = True
        split = rt.first_token_hops(self.http_recv, self.start, out.hops, now)
        for name, secs in split or []:
            hops[name].observe(secs)
        if split and logger.isEnabledFor(logging.DEBUG):
            logger.debug("Request time stats. rid: %s, %s", out.rid,
                         ", ".join(f"{name}: {1000 * secs:.2f} ms" for name, secs in split))
