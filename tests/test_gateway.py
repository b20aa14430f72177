"""radixserve behind SGLang's Model Gateway (the real `sglang-router` binary), and PD disaggregation.

Two CPU workers serve the whole module: A in `--disaggregation-mode prefill`, B in `--disaggregation-mode decode`
(both serve plain requests like any server). One gateway routes plain requests over A and B with the
cache-aware policy; a second runs `--pd-disaggregation` with A as prefill and B as decode. References: the
same request sent straight to a worker without PD (greedy: token for token), and the official openai client
reading streams. The tests that break things (a silent and a dying prefill peer, a worker killed mid-run)
come last.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
import torch

from tests.conftest import Server, free_port, start_server, wait_healthy

pytest.importorskip("sglang_router")

from radixserve.disaggregation.bootstrap import BootstrapServer, register  # noqa: E402
from radixserve.disaggregation.tcp import TCPKVSender, payload_header, recv_frame, send_frame, tensor_bytes  # noqa: E402
from radixserve.disaggregation.types import KVPayload  # noqa: E402

WAITING_TIMEOUT_S = 12  # B's --disaggregation-waiting-timeout: the silent-prefill test waits this long
POOL = ["--max-total-tokens", "4096"]
PREFIX_A = "You are a careful assistant for a bakery. Answer in one short sentence. " * 6
PREFIX_B = "You are a terse assistant for a railway timetable office. Reply briefly. " * 6


@dataclass
class Gateway:
    proc: subprocess.Popen
    port: int
    log_path: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()


@contextlib.contextmanager
def gateway(*flags: str, workers: int = 2) -> Iterator[Gateway]:
    port = free_port()
    log_path = f"/tmp/sglang-router-{port}.log"
    cmd = [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port),
           "--prometheus-port", str(free_port()), "--log-level", "warn", *flags]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    gw = Gateway(proc, port, log_path)
    try:
        deadline = time.monotonic() + 60
        while True:  # every worker registered and healthy: no request before (its failure would open a breaker)
            assert proc.poll() is None, f"gateway exited:\n{gw.log()[-3000:]}"
            try:
                ready = httpx.get(gw.url + "/readiness", timeout=5).json()
                if ready.get("healthy_workers", 0) >= workers or ready.get("status") == "ready" and "healthy_workers" \
                        not in ready:
                    break
            except (httpx.HTTPError, ValueError):
                pass
            assert time.monotonic() < deadline, f"gateway not ready:\n{gw.log()[-3000:]}"
            time.sleep(0.3)
        while True:  # and it forwards a request
            try:
                r = httpx.post(gw.url + "/generate", json={"text": "Hi", "sampling_params": {"max_new_tokens": 1}},
                               timeout=60)
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, f"gateway not ready:\n{gw.log()[-3000:]}"
            time.sleep(0.5)
        yield gw
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def workers() -> Iterator[tuple[Server, Server, int]]:
    boot = free_port()
    a = start_server(*POOL, "--disaggregation-mode", "prefill", "--disaggregation-bootstrap-port", str(boot))
    b = start_server(*POOL, "--disaggregation-mode", "decode", "--disaggregation-waiting-timeout",
                     str(WAITING_TIMEOUT_S))
    try:
        wait_healthy(a)
        wait_healthy(b)
        yield a, b, boot
    finally:
        for s in (a, b):
            if s.proc.poll() is None:
                assert s.stop() == 0, s.log()[-3000:]


@pytest.fixture(scope="module")
def cache_gw(workers) -> Iterator[Gateway]:
    a, b, _ = workers
    with gateway("--worker-urls", a.base_url, b.base_url, "--policy", "cache_aware", "--cb-failure-threshold", "1",
                 "--health-check-interval-secs", "1", "--health-failure-threshold", "1",
                 "--retry-max-retries", "6") as gw:
        yield gw


@pytest.fixture(scope="module")
def pd_gw(workers) -> Iterator[Gateway]:
    a, b, boot = workers
    with gateway("--pd-disaggregation", "--prefill", a.base_url, str(boot), "--decode", b.base_url,
                 "--policy", "round_robin") as gw:
        yield gw


def info(server: Server) -> dict:
    return httpx.get(server.base_url + "/server_info", timeout=30).json()["internal_states"][0]


def generate(url: str, text: str, max_new_tokens: int = 12, **extra) -> dict:
    r = httpx.post(url + "/generate", json={"text": text, "sampling_params": {
        "max_new_tokens": max_new_tokens, "temperature": 0}, **extra}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


# ---- radixserve as a gateway worker ------------------------------------------------------------------------
def test_every_forwarded_request_is_served(cache_gw: Gateway, workers) -> None:
    """The fields the gateway adds to every body (no_stop_trim, model, return_hidden_states, ...) are accepted,
    and no_stop_trim keeps the matched stop string: the text is then the tokenizer's decode of all ids."""
    from openai import OpenAI
    client = OpenAI(base_url=cache_gw.url + "/v1", api_key="none")
    chat = client.chat.completions.create(model="default", max_tokens=8, temperature=0,
                                          messages=[{"role": "user", "content": "What is the capital of France?"}])
    assert chat.choices[0].message.content
    plain = client.completions.create(model="default", prompt="1, 2, 3,", max_tokens=12, temperature=0, stop=[" 6"])
    kept = client.completions.create(model="default", prompt="1, 2, 3,", max_tokens=12, temperature=0, stop=[" 6"],
                                     extra_body={"no_stop_trim": True})
    assert plain.choices[0].finish_reason == kept.choices[0].finish_reason == "stop"
    assert kept.choices[0].text == plain.choices[0].text + " 6"
    body = {"text": "1, 2, 3,", "sampling_params": {"max_new_tokens": 12, "temperature": 0, "stop": [" 6"],
                                                     "no_stop_trim": True}}
    res = httpx.post(cache_gw.url + "/generate", json=body, timeout=120).json()
    from transformers import AutoTokenizer
    a, _, _ = workers
    tok = AutoTokenizer.from_pretrained(httpx.get(a.base_url + "/model_info", timeout=30).json()["tokenizer_path"])
    assert res["meta_info"]["finish_reason"]["matched"] == " 6"
    assert res["text"] == tok.decode(res["output_ids"], skip_special_tokens=True) and res["text"].endswith(" 6")
    # a flag whose feature is missing is refused by name, not ignored
    r = httpx.post(a.base_url + "/generate", json={"text": "Hi", "return_hidden_states": True}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "return_hidden_states"
    loads = httpx.get(a.base_url + "/get_load", timeout=30).json()
    assert loads[0].keys() >= {"dp_rank", "num_reqs", "num_waiting_reqs", "num_tokens"}


def test_streaming_through_gateway(cache_gw: Gateway) -> None:
    from openai import OpenAI
    client = OpenAI(base_url=cache_gw.url + "/v1", api_key="none")
    msgs = [{"role": "user", "content": "Name three colours."}]
    full = client.chat.completions.create(model="default", max_tokens=16, temperature=0, messages=msgs)
    chunks = list(client.chat.completions.create(model="default", max_tokens=16, temperature=0, messages=msgs,
                                                 stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 3 and text == full.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_cache_aware_keeps_a_prefix_group_on_one_worker(cache_gw: Gateway, workers) -> None:
    """Interleaved requests of two prefix groups: each group lands on one worker (seen in the workers' own
    prompt counters), and every request after a group's first is a prefix-cache hit there."""
    a, b, _ = workers
    where: dict[str, set[int]] = {"A": set(), "B": set()}
    for i in range(3):
        for name, prefix in (("A", PREFIX_A), ("B", PREFIX_B)):
            seen = {s.port: info(s)["prompt_tokens_total"] for s in (a, b)}
            out = generate(cache_gw.url, prefix + f"Question {i}: what now?", max_new_tokens=1)
            grew = [s.port for s in (a, b) if info(s)["prompt_tokens_total"] > seen[s.port]]
            assert len(grew) == 1
            where[name].add(grew[0])
            if i:
                assert out["meta_info"]["cached_tokens"] >= 0.8 * out["meta_info"]["prompt_tokens"], out
    assert len(where["A"]) == 1 and len(where["B"]) == 1, where


# ---- PD disaggregation through the gateway -----------------------------------------------------------------
def test_pd_outputs_equal_plain_serving(pd_gw: Gateway, workers) -> None:
    """Greedy PD (prefill on A, KV over TCP, decode on B) equals the same request served whole by one server."""
    _, b, _ = workers
    for text in ("1, 2, 3,", PREFIX_A + "What do you sell?"):
        pd = generate(pd_gw.url, text, max_new_tokens=10)
        plain = generate(b.base_url, text, max_new_tokens=10)
        assert pd["output_ids"] == plain["output_ids"] and pd["text"] == plain["text"]
    from openai import OpenAI
    client = OpenAI(base_url=pd_gw.url + "/v1", api_key="none")
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    pd_chat = client.chat.completions.create(model="default", max_tokens=8, temperature=0, messages=msgs)
    plain_chat = OpenAI(base_url=b.base_url + "/v1", api_key="none").chat.completions.create(
        model="default", max_tokens=8, temperature=0, messages=msgs)
    assert pd_chat.choices[0].message.content == plain_chat.choices[0].message.content
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="default", max_tokens=8, temperature=0, messages=msgs, stream=True) if c.choices)
    assert streamed == plain_chat.choices[0].message.content


def test_pd_decode_computes_no_prompt(pd_gw: Gateway, workers) -> None:
    """The decode server's prompt KV really comes from the prefill server: B runs no prefill for a PD request."""
    a, b, _ = workers
    marker = f"Unique PD prompt {time.time_ns()}: count to five."
    a_before, b_before = a.log().count("Prefill batch"), b.log().count("Prefill batch")
    generate(pd_gw.url, marker, max_new_tokens=8)
    time.sleep(0.5)
    assert a.log().count("Prefill batch") > a_before
    assert b.log().count("Prefill batch") == b_before


def test_pd_prompt_logprobs(pd_gw: Gateway, workers) -> None:
    """/generate's prompt logprobs under PD come from the prefill server: the decode server's input_token_logprobs
    is empty (SGLang's contract) and the gateway merges the prefill's in, so they equal plain serving. What the
    gateway does not merge (input top logprobs; echo with logprobs on /v1/completions) is a 400 on both sides."""
    a, b, boot = workers
    text, extra = PREFIX_B + "When is the next train?", {"return_logprob": True, "logprob_start_len": 0}
    pd = generate(pd_gw.url, text, max_new_tokens=4, **extra)["meta_info"]["input_token_logprobs"]
    plain = generate(b.base_url, text, max_new_tokens=4, **extra)["meta_info"]["input_token_logprobs"]
    assert [e[1] for e in pd] == [e[1] for e in plain] and pd[0][0] is None and plain[0][0] is None
    assert max(abs(x[0] - y[0]) for x, y in zip(pd[1:], plain[1:])) < 1e-3
    default = generate(pd_gw.url, text, max_new_tokens=2, return_logprob=True, top_logprobs_num=1)["meta_info"]
    assert default["input_token_logprobs"] == [[None, plain[-1][1], None]] and default["input_top_logprobs"] == [None]
    room = {"bootstrap_host": "127.0.0.1", "bootstrap_port": boot, "bootstrap_room": 12345}
    refused = [("/generate", {"text": text, **extra, "top_logprobs_num": 2, **room}, "logprob_start_len"),
               ("/v1/completions", {"prompt": text, "max_tokens": 2, "echo": True, "logprobs": 1, **room}, "echo")]
    for path, body, param in refused:
        for server in (a, b):
            r = httpx.post(server.base_url + path, json=body, timeout=30)
            assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
            assert "PD" in r.json()["error"]["message"]


# ---- PD failures: nothing is lost -------------------------------------------------------------------------
def _pd_body(boot_port: int, room: int, text: str = "1, 2, 3, 4, 5, 6, 7, 8,") -> dict:
    return {"text": text, "sampling_params": {"max_new_tokens": 4, "temperature": 0},
            "bootstrap_host": "127.0.0.1", "bootstrap_port": boot_port, "bootstrap_room": room}


def test_decode_without_kv_fails_after_timeout(workers) -> None:
    """A prefill peer that registers but never sends: the decode server fails the request with a clear error
    after --disaggregation-waiting-timeout, and frees the slots it reserved."""
    _, b, _ = workers
    boot = BootstrapServer("127.0.0.1", free_port())
    sender = TCPKVSender("127.0.0.1", timeout_s=60)  # never offered anything: silent
    register("127.0.0.1", boot.port, 0, "127.0.0.1", sender.port)
    try:
        start = time.monotonic()
        r = httpx.post(b.base_url + "/generate", json=_pd_body(boot.port, 7), timeout=120)
        waited = time.monotonic() - start
        assert r.status_code == 504, r.text
        assert "did not arrive" in r.json()["error"]["message"]
        assert waited >= WAITING_TIMEOUT_S * 0.9
        assert info(b)["kv_used_tokens"] == 0
    finally:
        sender.close()
        boot.close()


def test_prefill_dying_mid_transfer_frees_decode_slots(workers) -> None:
    """A prefill peer that sends the header and half the KV, then dies: while it sends, the decode server holds
    the request's slots; once the connection drops, the request fails with the reason and the slots are free."""
    _, b, _ = workers
    boot = BootstrapServer("127.0.0.1", free_port())
    lsock = socket.create_server(("127.0.0.1", 0))
    register("127.0.0.1", boot.port, 0, "127.0.0.1", lsock.getsockname()[1])
    text = "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,"
    n = httpx.post(b.base_url + "/generate", json={"text": text, "sampling_params": {"max_new_tokens": 0}},
                   timeout=60).json()["meta_info"]["prompt_tokens"]
    held: list[int] = []

    def fake_prefill() -> None:
        conn, _ = lsock.accept()
        ask = recv_frame(conn)
        assert ask["room"] == 11 and ask["num_tokens"] == n
        layers, heads, dim = 30, 3, 64  # SmolLM2-135M, float32 on CPU
        payload = KVPayload(torch.zeros(layers, 2, n, heads, dim), first_token=28, seed=0)
        send_frame(conn, payload_header(payload, payload.kv))
        data = tensor_bytes(payload.kv)
        conn.sendall(data[:len(data) // 2])
        held.append(info(b)["kv_used_tokens"])  # mid-transfer: the reservation is in place
        conn.close()  # "dies"

    t = threading.Thread(target=fake_prefill, daemon=True)
    t.start()
    try:
        r = httpx.post(b.base_url + "/generate", json=_pd_body(boot.port, 11, text), timeout=120)
        t.join(10)
        assert r.status_code == 502, r.text
        assert "closed the connection" in r.json()["error"]["message"]
        assert held and held[0] >= n
        assert info(b)["kv_used_tokens"] == 0
    finally:
        lsock.close()
        boot.close()


def test_worker_killed_mid_run_costs_no_request(cache_gw: Gateway, workers) -> None:
    """Requests in flight on a worker that is SIGKILLed are retried on the other by the gateway: all succeed.
    Runs last: it kills B."""
    a, b, _ = workers
    animals = ["cat", "owl", "horse", "whale", "ant", "fox", "crow", "bear"]
    prompts = [f"{i * 7919} is the number of a {a} who" for i, a in enumerate(animals)]

    def one(p: str) -> int:
        r = httpx.post(cache_gw.url + "/generate", json={"text": p, "sampling_params": {
            "max_new_tokens": 24, "temperature": 0, "ignore_eos": True}}, timeout=300)
        return r.status_code

    with concurrent.futures.ThreadPoolExecutor(len(prompts)) as pool:
        futs = [pool.submit(one, p) for p in prompts]
        deadline = time.monotonic() + 60
        while info(b)["num_running_reqs"] + info(b)["num_queue_reqs"] == 0:  # B has work in flight
            assert time.monotonic() < deadline, "the gateway sent nothing to B"
            time.sleep(0.05)
        os.kill(b.proc.pid, signal.SIGKILL)
        codes = [f.result() for f in futs]
    assert codes == [200] * len(prompts), codes
    b.proc.wait(10)
