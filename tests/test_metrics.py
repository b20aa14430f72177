"""--enable-metrics and --enable-cache-report end to end: a real server, the official openai client, and the
Prometheus text format parsed back with prometheus_client's own parser. The scheduler's counters must agree
exactly with the `usage` the clients were told, and the API server's histograms must count every request
once; greedy, small max_tokens, sequential requests so the prefix hits are deterministic."""
from __future__ import annotations

import logging
import re
import urllib.request
from collections.abc import Iterator

import openai
import pytest
from conftest import Server, launch_server
from prometheus_client.parser import text_string_to_metric_families

from radixserve.scheduler.stats import SchedulerStats

SYSTEM = " ".join(f"Rule {i}: answer briefly, cite nothing, and never repeat rule {i}." for i in range(24))
MAX_TOKENS = 8
GAUGES = ["num_running_reqs", "num_queue_reqs", "num_used_tokens", "token_usage", "gen_throughput",
          "cache_hit_rate"]
COUNTERS = ["num_retractions", "prompt_tokens", "generation_tokens", "cached_tokens", "num_requests"]
HISTOGRAMS = ["time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds"]


@pytest.fixture(scope="module")
def metrics_server() -> Iterator[Server]:
    with launch_server("--enable-metrics", "--enable-cache-report", "--decode-log-interval", "4") as s:
        yield s


def scrape(base_url: str) -> tuple[str, dict]:
    with urllib.request.urlopen(base_url + "/metrics", timeout=30) as r:
        ctype, text = r.headers["Content-Type"], r.read().decode()
    return ctype, {f.name: f for f in text_string_to_metric_families(text)}


def value(fams: dict, family: str, sample: str | None = None) -> float:
    """The one sample named `sample` (default: the family name) of `radixserve:<family>`."""
    name = "radixserve:" + family
    (s,) = [s for s in fams[name].samples if s.name == (name if sample is None else name + sample)]
    return s.value


def run_requests(client: openai.OpenAI, model: str) -> list:
    """Two completions and two chats, each pair sharing SYSTEM as a long prefix; one of each streamed
    (usage from the final chunk) so both response paths feed the histograms."""
    common = {"model": model, "max_tokens": MAX_TOKENS, "temperature": 0, "extra_body": {"ignore_eos": True}}
    stream = {"stream": True, "stream_options": {"include_usage": True}}
    usages = [client.completions.create(prompt=SYSTEM + "\nQ: one?", **common).usage]
    usages += [c.usage for c in client.completions.create(prompt=SYSTEM + "\nQ: two?", **common, **stream)
               if c.usage]
    chat = lambda q: [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}]
    usages.append(client.chat.completions.create(messages=chat("one?"), **common).usage)
    usages += [c.usage for c in client.chat.completions.create(messages=chat("two?"), **common, **stream)
               if c.usage]
    assert len(usages) == 4
    return usages


def test_metrics_match_usage(metrics_server: Server) -> None:
    client = openai.OpenAI(base_url=metrics_server.base_url + "/v1", api_key="EMPTY", max_retries=0,
                           timeout=120)
    usages = run_requests(client, client.models.list().data[0].id)
    prompt = sum(u.prompt_tokens for u in usages)
    completion = sum(u.completion_tokens for u in usages)
    cached = [u.prompt_tokens_details.cached_tokens for u in usages]
    assert cached[0] == cached[2] == 0 and min(cached[1], cached[3]) > 100, cached  # each 2nd one hits

    ctype, fams = scrape(metrics_server.base_url)
    assert ctype.startswith("text/plain")
    names = [*GAUGES, *COUNTERS, *HISTOGRAMS]
    assert {"radixserve:" + n for n in names} <= set(fams), sorted(fams)
    assert all(f.startswith("radixserve:") for f in fams)
    types = [fams["radixserve:" + n].type for n in names]
    assert types == ["gauge"] * len(GAUGES) + ["counter"] * len(COUNTERS) + ["histogram"] * len(HISTOGRAMS)
    assert value(fams, "prompt_tokens", "_total") == prompt
    assert value(fams, "generation_tokens", "_total") == completion == 4 * MAX_TOKENS
    assert value(fams, "cached_tokens", "_total") == sum(cached) > 0
    assert value(fams, "num_requests", "_total") == 4 and value(fams, "num_retractions", "_total") == 0
    assert value(fams, "cache_hit_rate") == pytest.approx(sum(cached) / prompt)
    assert value(fams, "num_running_reqs") == value(fams, "num_queue_reqs") == 0
    assert 0 <= value(fams, "token_usage") <= 1 and value(fams, "gen_throughput") > 0
    for h in ("time_to_first_token_seconds", "e2e_request_latency_seconds"):
        assert value(fams, h, "_count") == 4 and value(fams, h, "_sum") > 0
    # the first token of each request is its TTFT; every later one is an inter-token gap
    assert value(fams, "inter_token_latency_seconds", "_count") == completion - 4
    e2e_sum = value(fams, "e2e_request_latency_seconds", "_sum")
    assert e2e_sum > value(fams, "time_to_first_token_seconds", "_sum")

    line = r"Cache report\. #cached-token: (\d+), #queried-token: (\d+), cache hit rate: (\d\.\d\d)"
    reports = re.findall(line, metrics_server.log())
    assert reports, metrics_server.log()[-3000:]
    hit, queried, rate = reports[-1]
    assert 0 < int(hit) <= sum(cached) and int(queried) <= prompt
    assert float(rate) == round(int(hit) / int(queried), 2)


def test_cache_report_line(caplog: pytest.LogCaptureFixture) -> None:
    """The log line's exact format, next to each decode line and only with the flag."""
    for report in (False, True):
        stats = SchedulerStats(capacity=1000, decode_log_interval=2, cache_report=report)
        stats.record_hit(96, 128)
        stats.record_hit(0, 128)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="radixserve.scheduler"):
            for _ in range(4):
                stats.on_decode(batch_size=2, used=300, queued=0, cuda_graph=False)
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == (4 if report else 2) and lines[0].startswith("Decode batch.")
        if report:
            assert lines[1] == "Cache report. #cached-token: 96, #queried-token: 256, cache hit rate: 0.38"
