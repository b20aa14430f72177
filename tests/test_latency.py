"""Online latency (issue 14): mixed prefill+decode batches, one stream chunk per token, --stream-interval,
per-hop timing in /metrics, piecewise graphs' split (CPU twin), and bench.serving's own client.

References: outputs with --enable-mixed-chunk equal the plain scheduler's (itself equal to HF in
test_engine_hf.py); chunk counts equal the server's own usage.completion_tokens read by the official
openai client; the piecewise split equals the eager model. No timing is asserted anywhere: streams are
checked by the order and count of events.
"""
from __future__ import annotations

import dataclasses
import logging
import re
import threading
import urllib.request
from collections.abc import Iterator
from types import SimpleNamespace

import msgspec
import openai
import pytest
from conftest import Server, launch_server

from radixserve.args import ServerArgs
from radixserve.bench.serving import BenchArgs, run_benchmark
from radixserve.core import Req, SamplingParams
from radixserve.engine.piecewise import PiecewiseRunner, piecewise_sizes
from radixserve.engine_unit import Engine
from radixserve.request_timing import HOP_NAMES
from radixserve.scheduler.scheduler import Scheduler
from radixserve.server import messages as m
from radixserve.server.scheduler_process import SchedulerLoop

LONG = " ".join(f"rule{i} is important." for i in range(60))  # ~350 tokens: 6 chunks of 64


@pytest.fixture(scope="module")
def engine() -> Engine:
    # float16 weights packed for FBGEMM: the scheduler tests below compare the engine with itself across batch
    # shapes (mixed vs plain), which needs one numeric path (auto's 4-bit path serves <= 4 rows only), and a
    # decode step costs a third of float32's
    return Engine(ServerArgs(device="cpu", max_total_tokens=4096, seed=0, cpu_weight_dtype="float16"))


@pytest.fixture(scope="module")
def engine_f32() -> Engine:
    # float32: test_piecewise_split_equals_eager traces this model, and torch.compile cannot trace packed fp16
    return Engine(ServerArgs(device="cpu", max_total_tokens=4096, seed=0, cpu_weight_dtype="float32"))


def sched(engine: Engine, **changes) -> Scheduler:
    return Scheduler(dataclasses.replace(engine.args, **changes), engine.runner, engine.tokenizer)


def stream_during_long_prefill(engine: Engine, **changes) -> tuple[int, Req, Req]:
    """A runs; B's long prompt arrives and is prefilled in chunks. Returns how many tokens A produced
    between B's arrival and B's first token."""
    s = sched(engine, chunked_prefill_size=64, **changes)
    a = Req(engine.tokenizer.encode("Count to ten: one, two,"), SamplingParams(temperature=0, max_new_tokens=40,
                                                                               ignore_eos=True))
    s.add_request(a)
    for _ in range(4):
        s.step()
    b = Req(engine.tokenizer.encode(LONG), SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True))
    s.add_request(b)
    during = 0
    while not b.output_ids:
        during += sum(r is a for r in s.step())
    while s.has_work:
        s.step()
    return during, a, b


@pytest.mark.parametrize("overlap", [False, True])
def test_mixed_chunk_keeps_streams_decoding(engine, overlap):
    chunks = -(-len(engine.tokenizer.encode(LONG)) // 64)
    plain, a0, b0 = stream_during_long_prefill(engine, enable_overlap_schedule=overlap)
    mixed, a1, b1 = stream_during_long_prefill(engine, enable_overlap_schedule=overlap, enable_mixed_chunk=True)
    assert plain <= 1  # decode waits for every chunk of the long prompt
    assert mixed >= chunks  # one token per chunk step
    assert (a1.output_ids, b1.output_ids) == (a0.output_ids, b0.output_ids)


def test_mixed_chunk_same_outputs_and_log_line(engine, caplog):
    """Many requests of different lengths, chunked, seeded sampling and greedy, a small pool (retraction):
    exactly the plain scheduler's outputs, with and without overlap; the prefill line marks mixed batches."""
    ps = [engine.tokenizer.encode(f"{LONG[:40 * (i + 1)]} Question {i}?") for i in range(6)]

    def run(**kw) -> list[list[int]]:
        s = sched(engine, chunked_prefill_size=48, max_total_tokens=1200, **kw)
        reqs = [Req(p, SamplingParams(temperature=0 if i % 2 else 0.7, seed=i, max_new_tokens=6 + 4 * i,
                                      ignore_eos=True)) for i, p in enumerate(ps)]
        for r in reqs:
            s.add_request(r)
            s.step()  # arrivals while others run: the adder mixes them with decode steps
        while s.has_work:
            s.step()
        return [r.output_ids for r in reqs]

    ref = run()
    with caplog.at_level(logging.INFO, logger="radixserve.scheduler"):
        assert run(enable_mixed_chunk=True) == ref
    assert any(re.fullmatch(r"Prefill batch\. .*#queue-req: \d+, #mixed-decode-req: [1-9]\d*", msg)
               for msg in caplog.messages)
    assert run(enable_mixed_chunk=True, enable_overlap_schedule=True) == ref


class _Capture:
    def __init__(self) -> None:
        self.outs: list[m.TokenOut] = []
        self.decode = m.decoder(m.DetokenizerIn).decode

    def send(self, raw: bytes) -> None:
        self.outs += self.decode(raw).outs


@pytest.mark.parametrize("interval", [1, 4])
def test_stream_interval(engine, interval):
    """The scheduler sends a request's tokens every `interval` of them, the first and the last at once."""
    s = sched(engine, stream_interval=interval, enable_overlap_schedule=True)
    sock = _Capture()
    loop = SchedulerLoop(SimpleNamespace(scheduler=s, args=s.args), None, sock, None)  # type: ignore[arg-type]
    loop.handle(m.GenerateReq("r", engine.tokenizer.encode("Hello there"),
                              SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True)))
    while loop.sched.has_work:
        loop.emit(loop.sched.step())
    sizes = [len(o.new_ids) for o in sock.outs]
    assert sum(sizes) == 10 and sock.outs[-1].finish_reason == "length"
    assert sizes == ([1] * 10 if interval == 1 else [1, 4, 4, 1])


def test_piecewise_split_equals_eager(engine_f32):
    """The CPU twin of --enable-piecewise-cuda-graph: the model traced once, cut at every attention op,
    run padded to a token bucket; logits equal the eager model's for a batch with a cached prefix."""
    engine = engine_f32
    r = engine.runner
    pw = PiecewiseRunner(r.model, r.attn_layers, r.device, 64)
    assert pw.sizes == piecewise_sizes(64) == [16, 32, 64]
    s = sched(engine, chunked_prefill_size=24)
    reqs = [Req(engine.tokenizer.encode(t), SamplingParams(temperature=0, max_new_tokens=4))
            for t in ("The capital of France is", LONG[:150])]
    for q in reqs:
        s.add_request(q)
    try:
        for _ in range(2):  # first chunk (24 tokens), then the rest with a prefix in the pool
            batch = s._schedule_prefill()
            r.piecewise = None
            eager = r.forward(batch, is_decode=False).clone()
            r.piecewise = pw
            split = r.forward(batch, is_decode=False).clone()
            assert sum(q.extend_len for q in batch) not in pw.sizes  # padded
            assert len(pw.pieces) == len(r.attn_layers) + 1
            assert (split - eager).abs().max().item() <= 1e-4 * eager.abs().max().item()
            for q in batch:
                q.kv_len += q.extend_len
    finally:
        r.piecewise = None


# ---- a server: overlap on (as on GPU), mixed chunks, hop timing ---------------------------------------
@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with launch_server("--enable-overlap-schedule", "--enable-mixed-chunk", "--chunked-prefill-size", "64",
                       "--enable-metrics", "--enable-request-time-stats-logging", "--max-total-tokens",
                       "4096") as s:
        yield s


def test_one_chunk_per_token_with_overlap(server):
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x")
    stream = client.completions.create(model="default", prompt="Once upon a time", max_tokens=24, temperature=0,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    chunks, usage = 0, None
    for c in stream:
        chunks += bool(c.choices)
        usage = c.usage or usage
    assert usage is not None and usage.completion_tokens == 24 and chunks == 24


def test_stream_keeps_receiving_during_long_prefill(server):
    """Stream A runs; B's long prompt (6 chunks) is sent after A's 3rd chunk. A's chunks keep arriving
    between B's request and B's first chunk (events counted in arrival order, no clock)."""
    client = openai.OpenAI(base_url=server.base_url + "/v1", api_key="x")
    events: list[str] = []
    started = threading.Event()

    def run_a() -> None:
        s = client.completions.create(model="default", prompt="Count: one, two,", max_tokens=400, temperature=0,
                                      stream=True, extra_body={"ignore_eos": True})
        for _ in s:
            events.append("a")
            if events.count("a") == 3:
                started.set()
            if "b" in events:
                s.close()
                return

    t = threading.Thread(target=run_a)
    t.start()
    assert started.wait(300)
    events.append("b-sent")
    b = client.completions.create(model="default", prompt=LONG, max_tokens=1, temperature=0, stream=True)
    next(iter(b))
    events.append("b")
    t.join(120)
    between = events[events.index("b-sent"):events.index("b")].count("a")
    assert between >= 4, events


def test_hop_histograms_in_metrics(server):
    run_benchmark(BenchArgs(base_url=server.base_url, num_prompts=3, random_input_len=32, random_output_len=6,
                            random_range_ratio=1.0, quiet=True))
    with urllib.request.urlopen(server.base_url + "/metrics") as r:
        text = r.read().decode()
    for hop in HOP_NAMES:
        count = re.search(rf'radixserve:request_hop_seconds_count\{{[^}}]*hop="{hop}"[^}}]*\}} (\S+)', text)
        assert count and float(count.group(1)) >= 3, hop


def test_bench_client_counts_what_the_server_sent(server, tmp_path):
    out = tmp_path / "b.json"
    res = run_benchmark(BenchArgs(base_url=server.base_url, num_prompts=4, random_input_len=24, random_output_len=8,
                                  random_range_ratio=1.0, slo_ttft=1e9, slo_tpot=1e9, compare_socket_client=2,
                                  output=str(out), quiet=True))
    saved = msgspec.json.decode(out.read_bytes())
    assert res["completed"] == 4 and res["total_output_tokens"] == 32 and res["tokens_per_chunk"] == 1.0
    assert res["good_requests"] == 4 and res["request_goodput"] > 0
    assert set(res["server_hops_mean_ms"]) == set(HOP_NAMES)
    assert saved["server_args"]["enable_mixed_chunk"] is True and saved["commit"]
    check = saved["client_check"]
    assert check["asyncio_client"]["completed"] == check["socket_client"]["completed"] == 2


def test_stream_parser_any_fragmentation():
    """bench.serving's parser: chunked framing and SSE events split anywhere, arrival times per chunk."""
    from radixserve.bench.serving import Result, StreamParser
    events = [b'data: {"choices":[{"text":"a"}]}\n\n', b'data: {"choices":[{"text":""}]}\n\n',
              b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2}}\n\n', b"data: [DONE]\n\n"]
    raw = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n" + b"".join(
        b"%x\r\n%s\r\n" % (len(e), e) for e in events) + b"0\r\n\r\n"
    for step in (1, 5, len(raw)):
        p = StreamParser(Result(), 0.0)
        for i in range(0, len(raw), step):
            p.feed(raw[i:i + step], float(i))
        res = p.finish(1e6)
        assert p.done and res.success and res.chunks == 2 and (res.prompt_len, res.output_len) == (3, 2)
        # the first chunk counts once its HTTP chunk is complete (its CRLF arrived), the second after it
        first = raw.index(events[0]) + len(events[0]) + 2
        assert first - step <= res.ttft < first and len(res.itl) == 1 and res.itl[0] >= 0
