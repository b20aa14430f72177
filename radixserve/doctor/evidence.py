"""What the doctor knows about a server, whichever way it learnt it (a log file or a live URL).

Both readers fill the same `Evidence`, so the rules are written once. A sample's time `t` is seconds since
the first timestamp seen, or None when the source had no timestamps (the guide's own example lines)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class DecodeSample:
    """One `Decode batch.` line, or one /metrics scrape."""

    t: float | None
    running: int
    tokens: int
    usage: float
    queue: int
    throughput: float | None = None
    cuda_graph: bool | None = None  # None: not reported (a /metrics scrape)


@dataclass
class PrefillSample:
    t: float | None
    new_seq: int
    new_token: int
    cached_token: int
    queue: int


@dataclass
class Retraction:
    t: float | None
    reqs: int
    old_ratio: float | None = None
    new_ratio: float | None = None


@dataclass
class Evidence:
    source: str
    decode: list[DecodeSample] = field(default_factory=list)
    prefill: list[PrefillSample] = field(default_factory=list)
    retractions: list[Retraction] = field(default_factory=list)
    ooms: list[str] = field(default_factory=list)  # the offending lines, as printed
    # The start-up memory line: max_total_num_tokens, chunked_prefill_size, max_prefill_tokens,
    # max_running_requests, context_len, available_gpu_mem (GB).
    memory: dict[str, float] = field(default_factory=dict)
    # Server settings where the source states them (SGLang's `server_args=ServerArgs(...)` line, or
    # /get_server_info): mem_fraction_static, schedule_conservativeness, cuda_graph_max_bs, device, ...
    settings: dict[str, Any] = field(default_factory=dict)
    total_mem_gb: float | None = None  # the accelerator's memory, when the source or the user says
    span_s: float | None = None  # first to last timestamp; None without timestamps
    conservativeness_changes: list[str] = field(default_factory=list)  # `auto` controller log lines

    @property
    def timed(self) -> bool:
        return self.span_s is not None
