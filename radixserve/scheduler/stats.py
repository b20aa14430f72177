"""Scheduler log lines in SGLang's exact formats, and the counters behind them.

The counters are the single source of the server's token totals: /get_server_info and the Prometheus
/metrics endpoint (server/metrics.py) both read them through the scheduler's live snapshot."""
from __future__ import annotations

import bisect
import logging
import time
import weakref
from dataclasses import dataclass, field

logger = logging.getLogger("radixserve.scheduler")
# Upper bounds (seconds) of the queue-time histogram: a few ms in an idle server to minutes in an offline batch
QUEUE_TIME_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


@dataclass
class SchedulerStats:
    capacity: int
    decode_log_interval: int = 40
    cache_report: bool = False  # --enable-cache-report: a hit-rate line after every decode log line
    decode_steps: int = 0
    num_retractions: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    cached_tokens_total: int = 0
    queried_tokens_total: int = 0  # prompt tokens looked up in the prefix cache (first admission only)
    hicache: bool = False  # --enable-hierarchical-cache: the lines below split hits by tier
    host_cached_tokens_total: int = 0  # of cached_tokens_total: loaded back from the host tier (HiCache)
    storage_cached_tokens_total: int = 0  # of those: read from the file tier first
    last_gen_throughput: float = 0.0
    last_decode_used: int = 0  # KV tokens in use and requests waiting at the last decode step (its log line's)
    last_decode_queued: int = 0
    # arrival at the scheduler -> first admission to a prefill batch, for /metrics queue_time_seconds; the
    # arrival times are keyed weakly by request, so an aborted request leaves nothing behind
    queue_time_counts: list[int] = field(default_factory=lambda: [0] * len(QUEUE_TIME_BUCKETS))
    queue_time_count: int = 0
    queue_time_sum: float = 0.0
    _enqueued: weakref.WeakKeyDictionary = field(default_factory=weakref.WeakKeyDictionary)
    _tokens_since_log: int = 0
    _last_log_time: float = field(default_factory=time.perf_counter)

    def token_usage(self, used: int) -> float:
        return used / self.capacity if self.capacity else 0.0

    def on_enqueue(self, req: object) -> None:
        self._enqueued[req] = time.perf_counter()

    def on_admit(self, req: object) -> None:
        """First admission only: a retracted request's later waits are not queue time a client saw."""
        t0 = self._enqueued.pop(req, None)
        if t0 is None:
            return
        wait = time.perf_counter() - t0
        i = bisect.bisect_left(QUEUE_TIME_BUCKETS, wait)
        if i < len(QUEUE_TIME_BUCKETS):
            self.queue_time_counts[i] += 1
        self.queue_time_count += 1
        self.queue_time_sum += wait

    def queue_time_snapshot(self) -> dict[str, float]:
        """Cumulative bucket counts as flat numbers, so that --dp-size replicas' snapshots sum."""
        out: dict[str, float] = {"queue_time_seconds_sum": self.queue_time_sum,
                                 "queue_time_seconds_count": self.queue_time_count}
        total = 0
        for le, n in zip(QUEUE_TIME_BUCKETS, self.queue_time_counts):
            total += n
            out[f"queue_time_le_{le:g}"] = total
        return out

    def record_hit(self, cached: int, queried: int, host: int = 0, storage: int = 0) -> None:
        """Counted once per request, at its first admission: a retracted request re-matching its own KV
        is not a hit a client would see, and `usage.cached_tokens` reports the first match only. `cached`
        counts every tier; `host` is the part HiCache loaded from host memory, `storage` the part of that
        read from files."""
        self.cached_tokens_total += cached
        self.queried_tokens_total += queried
        self.host_cached_tokens_total += host
        self.storage_cached_tokens_total += storage

    def hit_tiers(self) -> dict[str, int]:
        """Cached prompt tokens by the tier they came from (the live snapshot behind /metrics)."""
        return {"device_cached_tokens_total": self.cached_tokens_total - self.host_cached_tokens_total,
                "host_cached_tokens_total": self.host_cached_tokens_total - self.storage_cached_tokens_total,
                "storage_cached_tokens_total": self.storage_cached_tokens_total}

    def _tier_text(self) -> str:
        t = self.hit_tiers()
        return (f", #device-cached-token: {t['device_cached_tokens_total']}, #host-cached-token: "
                f"{t['host_cached_tokens_total']}, #storage-cached-token: {t['storage_cached_tokens_total']}")

    @property
    def cache_hit_rate(self) -> float:
        return self.cached_tokens_total / self.queried_tokens_total if self.queried_tokens_total else 0.0

    def log_prefill(self, new_seq: int, new_token: int, cached: int, used: int, running: int,
                    queued: int, mixed: int = 0) -> None:
        """`mixed`: running requests decoding in the same forward (--enable-mixed-chunk); the line then
        ends with `#mixed-decode-req: N`, and #new-token counts the prompt tokens only."""
        logger.info(f"Prefill batch. #new-seq: {new_seq}, #new-token: {new_token}, #cached-token: {cached}, "
                    f"token usage: {self.token_usage(used):.2f}, #running-req: {running}, "
                    f"#queue-req: {queued}" + (f", #mixed-decode-req: {mixed}" if mixed else ""))

    def on_decode(self, batch_size: int, used: int, queued: int, cuda_graph: bool) -> None:
        self.decode_steps += 1
        self.last_decode_used, self.last_decode_queued = used, queued
        self._tokens_since_log += batch_size
        if self.decode_steps % self.decode_log_interval:
            return
        now = time.perf_counter()
        self.last_gen_throughput = self._tokens_since_log / max(now - self._last_log_time, 1e-9)
        self._tokens_since_log, self._last_log_time = 0, now
        logger.info(f"Decode batch. #running-req: {batch_size}, #token: {used}, "
                    f"token usage: {self.token_usage(used):.2f}, cuda graph: {cuda_graph}, "
                    f"gen throughput (token/s): {self.last_gen_throughput:.2f}, #queue-req: {queued}"
                    + (self._tier_text() if self.hicache else ""))
        if self.cache_report:  # cumulative, like the cache_hit_rate gauge, so the two can be compared
            logger.info(f"Cache report. #cached-token: {self.cached_tokens_total}, #queried-token: "
                        f"{self.queried_tokens_total}, cache hit rate: {self.cache_hit_rate:.2f}"
                        + (self._tier_text() if self.hicache else ""))

    def log_retract(self, n: int, old_ratio: float, new_ratio: float) -> None:
        self.num_retractions += n
        logger.warning(f"KV cache pool is full. Retract requests. #retracted_reqs: {n}, "
                       f"#new_token_ratio: {old_ratio:.4f} -> {new_ratio:.4f}")
