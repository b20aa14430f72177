"""Read a live server into `Evidence`: /get_server_info once for its settings and memory line, then its
load sampled every `interval` seconds for `duration` seconds from /metrics (when --enable-metrics is on)
or from /get_server_info's internal_states (always there).

A scrape is the live twin of a `Decode batch.` line; scrapes of an idle server (nothing running) are not
load samples and are dropped, as an idle server prints no decode lines. Retractions are counted from the
retraction counter's increases between scrapes."""
from __future__ import annotations

import json
import re
import time
import urllib.error
import urllib.request
from typing import Any

from radixserve.doctor.evidence import DecodeSample, Evidence, PrefillSample, Retraction

PREFIXES = ("radixserve:", "sglang:")
DEFAULT_CUDA_GRAPH_MAX_BS = 256  # radixserve's default capture limit (before max_running_requests caps it)


def get(url: str, timeout: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.read()


SAMPLE = re.compile(r"^([^\s{]+)(?:\{.*\})?\s+(\S+)")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format -> {name without prefix or labels: value} (first sample of each name; the
    server reports one model). Enough for gauges, counters and histogram _sum/_count."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if not m or line.startswith("#"):
            continue
        for p in PREFIXES:
            if m.group(1).startswith(p):
                out.setdefault(m.group(1)[len(p):], float(m.group(2)))
    return out


class LiveReader:
    def __init__(self, base_url: str, timeout: float = 10.0) -> None:
        self.base, self.timeout = base_url.rstrip("/"), timeout

    def server_info(self) -> dict[str, Any]:
        return json.loads(get(self.base + "/get_server_info", self.timeout))

    def metrics(self) -> dict[str, float] | None:
        try:
            return parse_metrics(get(self.base + "/metrics", self.timeout).decode())
        except urllib.error.HTTPError:
            return None  # served without --enable-metrics

    def load(self) -> dict[str, float]:
        """One scrape of the load figures, under /metrics' names."""
        m = self.metrics()
        if m is not None and "token_usage" in m:
            return m
        states = self.server_info().get("internal_states") or [{}]
        num = lambda v: float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0.0  # noqa: E731
        s = {k: sum(num(st.get(k)) for st in states) for k in states[0]}
        s["token_usage"] = max(num(st.get("token_usage")) for st in states)
        return {"num_running_reqs": s.get("num_running_reqs", 0), "num_queue_reqs": s.get("num_queue_reqs", 0),
                "num_used_tokens": s.get("kv_used_tokens", 0), "token_usage": s["token_usage"],
                "gen_throughput": s.get("last_gen_throughput", 0), "num_retractions_total": s.get("num_retractions", 0),
                "prompt_tokens_total": s.get("prompt_tokens_total", 0),
                "cached_tokens_total": s.get("cached_tokens_total", 0),
                "queue_time_seconds_sum": s.get("queue_time_seconds_sum", 0),
                "queue_time_seconds_count": s.get("queue_time_seconds_count", 0)}

    def read(self, duration: float, interval: float) -> Evidence:
        info = self.server_info()
        ev = Evidence(source=self.base)
        ev.settings = {k: v for k, v in info.items() if not isinstance(v, (dict, list))}
        ev.memory = {k: float(info[k]) for k in ("max_total_num_tokens", "chunked_prefill_size", "max_prefill_tokens",
                                                 "max_running_requests", "context_len", "available_gpu_mem")
                     if isinstance(info.get(k), (int, float))}
        graph_bs = None
        if ev.settings.get("device") == "cuda" and not ev.settings.get("disable_cuda_graph"):
            graph_bs = min(ev.settings.get("cuda_graph_max_bs") or DEFAULT_CUDA_GRAPH_MAX_BS,
                           int(ev.memory.get("max_running_requests", 1 << 30)))
        start = time.monotonic()
        last = self.load()
        while True:
            t = time.monotonic() - start
            running = int(last.get("num_running_reqs", 0))
            if running > 0:
                ev.decode.append(DecodeSample(
                    t, running=running, tokens=int(last.get("num_used_tokens", 0)), usage=last.get("token_usage", 0.0),
                    queue=int(last.get("num_queue_reqs", 0)), throughput=last.get("gen_throughput"),
                    cuda_graph=None if graph_bs is None else running <= graph_bs))
            if t >= duration:
                break
            time.sleep(interval)
            now = self.load()
            grew = now.get("num_retractions_total", 0) - last.get("num_retractions_total", 0)
            if grew > 0:
                ev.retractions.append(Retraction(time.monotonic() - start, int(grew)))
            last = now
        ev.span_s = time.monotonic() - start
        prompt = last.get("prompt_tokens_total", 0)
        cached = last.get("cached_tokens_total", 0)
        if prompt:  # the cache's record since start-up, as one prefill "line"
            ev.prefill.append(PrefillSample(None, 0, int(prompt - cached), int(cached), 0))
        if last.get("queue_time_seconds_count"):
            ev.settings["mean_queue_time_s"] = last["queue_time_seconds_sum"] / last["queue_time_seconds_count"]
        ev.settings["retractions_since_start"] = last.get("num_retractions_total", 0)
        return ev
