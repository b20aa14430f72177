"""Scheduler log lines in SGLang's exact formats, and the counters behind them."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

logger = logging.getLogger("radixserve.scheduler")


@dataclass
class SchedulerStats:
    capacity: int
    decode_log_interval: int = 40
    decode_steps: int = 0
    num_retractions: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    cached_tokens_total: int = 0
    last_gen_throughput: float = 0.0
    _tokens_since_log: int = 0
    _last_log_time: float = field(default_factory=time.perf_counter)

    def token_usage(self, used: int) -> float:
        return used / self.capacity if self.capacity else 0.0

    def log_prefill(self, new_seq: int, new_token: int, cached: int, used: int, running: int, queued: int) -> None:
        logger.info(f"Prefill batch. #new-seq: {new_seq}, #new-token: {new_token}, #cached-token: {cached}, "
                    f"token usage: {self.token_usage(used):.2f}, #running-req: {running}, #queue-req: {queued}")

    def on_decode(self, batch_size: int, used: int, queued: int, cuda_graph: bool) -> None:
        self.decode_steps += 1
        self._tokens_since_log += batch_size
        if self.decode_steps % self.decode_log_interval:
            return
        now = time.perf_counter()
        self.last_gen_throughput = self._tokens_since_log / max(now - self._last_log_time, 1e-9)
        self._tokens_since_log, self._last_log_time = 0, now
        logger.info(f"Decode batch. #running-req: {batch_size}, #token: {used}, "
                    f"token usage: {self.token_usage(used):.2f}, cuda graph: {cuda_graph}, "
                    f"gen throughput (token/s): {self.last_gen_throughput:.2f}, #queue-req: {queued}")

    def log_retract(self, n: int, old_ratio: float, new_ratio: float) -> None:
        self.num_retractions += n
        logger.warning(f"KV cache pool is full. Retract requests. #retracted_reqs: {n}, "
                       f"#new_token_ratio: {old_ratio:.4f} -> {new_ratio:.4f}")
