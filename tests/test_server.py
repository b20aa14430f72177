"""The server end to end: a real `python -m radixserve` on loopback, the official openai client, and raw
HTTP for what the client cannot do (malformed JSON, disconnects). Greedy decoding wherever outputs are
compared; max_tokens stays small so the file runs in a few minutes on a laptop CPU."""
from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import openai
import pytest
from conftest import Server, descendants, start_server, wait_healthy

from radixserve.bench.serving import BenchArgs, run_benchmark
from radixserve.server.detokenizer import stop_holdback

CHAT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]
MSG = [{"role": "user", "content": "hi"}]
PROMPT = "The quick brown fox"
API_KEY = "sk-radixserve-test"
LONG = {"prompt": "Tell me a very long story.", "max_tokens": 2000, "ignore_eos": True}


# ---- helpers -----------------------------------------------------------------------------------------
def connect(base_url: str, timeout: float = 120) -> http.client.HTTPConnection:
    u = urlparse(base_url)
    return http.client.HTTPConnection(u.hostname, u.port, timeout=timeout)


def request(base_url: str, method: str, path: str, body: bytes | dict | None = None,
            headers: dict | None = None) -> tuple[int, bytes]:
    conn = connect(base_url)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    try:
        conn.request(method, path, data, {"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def post_json(base_url: str, path: str, body: dict) -> dict | list:
    status, data = request(base_url, "POST", path, body)
    assert status == 200, data
    return json.loads(data)


def get_json(base_url: str, path: str, **kw) -> dict:
    status, data = request(base_url, "GET", path, **kw)
    assert status == 200, data
    return json.loads(data)


def live(base_url: str) -> dict:
    return get_json(base_url, "/get_server_info")["internal_states"][0]


def wait_idle(base_url: str, timeout: float = 30) -> dict:
    """Poll until nothing runs or waits; return the live figures."""
    deadline = time.monotonic() + timeout
    while True:
        info = live(base_url)
        if info["num_running_reqs"] == info["num_queue_reqs"] == 0 or time.monotonic() > deadline:
            return info
        time.sleep(0.2)


def sse_events(resp: http.client.HTTPResponse) -> Iterator[dict]:
    for raw in resp:
        line = raw.decode().strip()
        if line == "data: [DONE]":
            return
        if line.startswith("data: "):
            yield json.loads(line[6:])


def open_stream(base_url: str, path: str, body: dict, headers: dict | None = None):
    """Start a streamed request; return the connection and its events, the first one consumed."""
    conn = connect(base_url)
    conn.request("POST", path, json.dumps({**body, "stream": True}),
                 {"Content-Type": "application/json", **(headers or {})})
    events = sse_events(conn.getresponse())
    next(events)
    return conn, events


def drain_in_thread(events: Iterator[dict]) -> tuple[threading.Thread, list[dict]]:
    rest: list[dict] = []
    t = threading.Thread(target=lambda: rest.extend(events), daemon=True)
    t.start()
    return t, rest


def streamed_text(stream) -> str:
    return "".join(c.choices[0].text for c in stream if c.choices)


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url + "/v1", api_key="EMPTY", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def greedy_completion(client: openai.OpenAI, model: str):
    return client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0,
                                      extra_body={"ignore_eos": True})


def test_stop_holdback() -> None:
    """Streaming holds back exactly the tail that could still grow into a stop string."""
    assert stop_holdback("Hello wor", ["world"]) == 3
    assert stop_holdback("Hello w", ["world", "Hello"]) == 1
    assert stop_holdback("Hello", ["xyz"]) == 0
    assert stop_holdback("ab", ["abc", "b"]) == 2  # a whole stop ("b") is the scheduler's job, not held


# ---- start-up ----------------------------------------------------------------------------------------
def test_startup_prints_memory_line_then_ready(server: Server) -> None:
    log = server.log()
    mem = log.find("max_total_num_tokens=16384, chunked_prefill_size=")
    ready = log.find(f"API server is ready to serve on 127.0.0.1:{server.port}")
    assert 0 <= mem < ready, log[-3000:]


def test_models(client: openai.OpenAI, model: str) -> None:
    assert [m.id for m in client.models.list().data] == [model]


# ---- OpenAI API --------------------------------------------------------------------------------------
def test_default_model_alias(client: openai.OpenAI, model: str) -> None:
    """The README's examples say model="default": it names the one served model."""
    kw = dict(max_tokens=8, temperature=0, messages=[{"role": "user", "content": "Hi"}])
    aliased = client.chat.completions.create(model="default", **kw).choices[0].message.content
    assert aliased == client.chat.completions.create(model=model, **kw).choices[0].message.content


def test_chat_stream_equals_non_stream(client: openai.OpenAI, model: str) -> None:
    full = client.chat.completions.create(model=model, messages=CHAT, max_tokens=24, temperature=0,
                                          logprobs=True, top_logprobs=2)
    text, u, lp = full.choices[0].message.content, full.usage, full.choices[0].logprobs.content
    assert text and full.choices[0].finish_reason in ("stop", "length")
    assert u.completion_tokens == len(lp) <= 24 and all(len(t.top_logprobs) == 2 for t in lp)
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens

    parts, finish, usage = [], None, None
    for chunk in client.chat.completions.create(model=model, messages=CHAT, max_tokens=24, temperature=0,
                                                stream=True, stream_options={"include_usage": True}):
        usage = chunk.usage or usage
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
    assert "".join(parts) == text
    assert finish == full.choices[0].finish_reason
    assert (usage.prompt_tokens, usage.completion_tokens) == (u.prompt_tokens, u.completion_tokens)
    # The same prompt again is served from the radix cache (all but its last token).
    assert 0 < usage.prompt_tokens_details.cached_tokens < usage.prompt_tokens


def test_completion_stream_equals_non_stream(client: openai.OpenAI, model: str, greedy_completion) -> None:
    full = greedy_completion
    assert full.choices[0].finish_reason == "length" and full.usage.completion_tokens == 16
    chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=16, temperature=0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True}))
    assert streamed_text(chunks) == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == 16
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_completion_token_ids_and_echo(client: openai.OpenAI, model: str) -> None:
    ids = [504, 3575, 282, 4649, 314]  # "The capital of France is"
    r = client.completions.create(model=model, prompt=ids, max_tokens=4, temperature=0, echo=True)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens <= 4
    assert r.choices[0].text.startswith("The capital of France is")
    batch = client.completions.create(model=model, prompt=[ids, ids[:3]], max_tokens=3, temperature=0)
    assert [c.index for c in batch.choices] == [0, 1] and batch.usage.prompt_tokens == 8


def lp_close(a: list, b: list, tol: float = 1e-3) -> bool:
    """Logprob lists equal up to float noise (None where the other has None)."""
    return len(a) == len(b) and all((x is None) == (y is None) and (x is None or abs(x - y) < tol)
                                    for x, y in zip(a, b))


def test_completion_echo_logprobs(client: openai.OpenAI, model: str, base_url: str) -> None:
    """echo with logprobs (prompt logprobs): the prompt's entries, null for its first token, then the output's,
    in OpenAI's layout; the same from the radix cache, streamed (prompt part in the first chunk), for n = 2 and
    two prompts, and as /generate's input_token_logprobs from logprob_start_len on."""
    ids = [504, 3575, 282, 4649, 314]  # "The capital of France is"
    kw = {"model": model, "prompt": ids, "max_tokens": 3, "temperature": 0, "echo": True, "logprobs": 2,
          "extra_body": {"ignore_eos": True}}
    r = client.completions.create(**kw)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5 + 3
    assert "".join(lp.tokens[:5]) == "The capital of France is" == r.choices[0].text[:24]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v <= 0 for v in lp.token_logprobs[1:]) and all(1 <= len(t) <= 2 for t in lp.top_logprobs[1:])
    assert all(max(t.values()) >= v - 1e-6 for t, v in zip(lp.top_logprobs[1:], lp.token_logprobs[1:]))
    assert lp.text_offset[:6] == [0, 3, 11, 14, 21, 24]
    # the prompt's last logprob is what the sampler reports for that token after the prompt one token shorter
    short = client.completions.create(model=model, prompt=ids[:4], max_tokens=1, temperature=0, logprobs=1)
    assert short.choices[0].logprobs.tokens == [lp.tokens[4]]
    assert lp_close(short.choices[0].logprobs.token_logprobs, lp.token_logprobs[4:5])
    again = client.completions.create(**kw)  # the prompt is in the radix cache now: recomputed, not skipped
    assert again.choices[0].logprobs.tokens == lp.tokens and lp_close(again.choices[0].logprobs.token_logprobs,
                                                                    lp.token_logprobs)
    chunks = list(client.completions.create(**kw, stream=True))
    first = chunks[0].choices[0]
    assert first.text == "The capital of France is" and first.logprobs.tokens == lp.tokens[:5]
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert [t for s in streamed for t in s.tokens] == lp.tokens
    assert lp_close([v for s in streamed for v in s.token_logprobs], lp.token_logprobs)
    assert [o for s in streamed for o in s.text_offset] == lp.text_offset
    batch = client.completions.create(model=model, prompt=[ids, ids[:3]], n=2, max_tokens=2, temperature=0,
                                      echo=True, logprobs=1)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    for c, k in zip(batch.choices, (5, 5, 3, 3)):
        assert c.logprobs.tokens[:k] == lp.tokens[:k] and lp_close(c.logprobs.token_logprobs[:k], lp.token_logprobs[:k])
    native = post_json(base_url, "/generate", {"input_ids": ids, "sampling_params": {"max_new_tokens": 1,
                       "temperature": 0}, "return_logprob": True, "logprob_start_len": 2, "top_logprobs_num": 2,
                       "return_text_in_logprobs": True})["meta_info"]
    entries = native["input_token_logprobs"]
    assert [e[1:] for e in entries] == [[t, s] for t, s in zip(ids[2:], lp.tokens[2:5])]
    assert lp_close([e[0] for e in entries], [None] + lp.token_logprobs[3:5])
    assert native["input_top_logprobs"][0] is None and [len(row) for row in native["input_top_logprobs"][1:]] == [2, 2]
    default = post_json(base_url, "/generate", {"input_ids": ids, "sampling_params": {"max_new_tokens": 1},
                                                "return_logprob": True})["meta_info"]
    assert default["input_token_logprobs"] == [[None, ids[-1], None]] and "input_top_logprobs" not in default


def test_stop_string_cuts_exactly(client: openai.OpenAI, model: str, greedy_completion) -> None:
    full = greedy_completion.choices[0].text
    k = len(full) // 2
    stop = full[k:k + 3]  # usually spans a token boundary
    expected = full[:full.index(stop)]
    kw = {"model": model, "prompt": PROMPT, "max_tokens": 16, "temperature": 0,
          "stop": [stop, "never-matches"], "extra_body": {"ignore_eos": True}}
    r = client.completions.create(**kw)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (expected, "stop")
    assert streamed_text(client.completions.create(**kw, stream=True)) == expected
    # A stop string that starts like the text but never completes: held-back text is released in the end.
    kw["stop"] = [stop + "\u2603"]
    r = client.completions.create(**kw)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (full, "length")
    assert streamed_text(client.completions.create(**kw, stream=True)) == full


def test_stop_token_ids_and_sglang_extras(client: openai.OpenAI, model: str) -> None:
    """Every documented field is accepted; a stop token ends the answer and is not part of its text."""
    paris = 7042  # " Paris" in SmolLM2's vocab; the greedy answer is "The capital of France is Paris."
    r = client.chat.completions.create(
        model=model, messages=CHAT, max_completion_tokens=16, temperature=0, top_p=0.9, seed=1,
        presence_penalty=0.1, frequency_penalty=0.1, user="test", stop=["never"],
        extra_body={"top_k": 20, "min_p": 0.01, "repetition_penalty": 1.0, "ignore_eos": False,
                    "stop_token_ids": [paris], "skip_special_tokens": True})
    c = r.choices[0]
    assert (c.message.content, c.finish_reason) == ("The capital of France is", "stop")
    assert c.model_extra["matched_stop"] == paris and r.usage.completion_tokens == 6


def test_n2_with_seed_is_reproducible(client: openai.OpenAI, model: str) -> None:
    kw = {"model": model, "messages": [{"role": "user", "content": "Write a one-line poem about the sea."}],
          "n": 2, "max_tokens": 8, "temperature": 1.0, "seed": 1234}
    a, b = client.chat.completions.create(**kw), client.chat.completions.create(**kw)
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1]
    assert texts == [c.message.content for c in b.choices]
    assert texts[0] != texts[1]
    assert 2 <= a.usage.completion_tokens <= 16


def test_concurrent_requests_equal_alone(client: openai.OpenAI, model: str, base_url: str) -> None:
    prompts = [f"Question {i}: name a color and a number." for i in range(4)]

    def run(p: str) -> str:
        return client.completions.create(model=model, prompt=p, max_tokens=6, temperature=0).choices[0].text

    alone = {p: run(p) for p in prompts}
    assert request(base_url, "POST", "/flush_cache")[0] == 200  # the batch computes from scratch as well
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(run, prompts * 4))
    assert together == [alone[p] for p in prompts * 4]


# ---- bad input ---------------------------------------------------------------------------------------
CHAT_URL, CMPL_URL = "/v1/chat/completions", "/v1/completions"
BAD = [  # id, path, body, status, param, code (None: any)
    ("malformed-json", CHAT_URL, b'{"messages": [', 400, None, "invalid_json"),
    ("no-body", CHAT_URL, b"", 400, None, None),
    ("missing-messages", CHAT_URL, {"max_tokens": 4}, 400, "messages", "missing_required_parameter"),
    ("empty-messages", CHAT_URL, {"messages": []}, 400, "messages", None),
    ("messages-wrong-type", CHAT_URL, {"messages": "hi"}, 400, "messages", "invalid_type"),
    ("bad-role", CHAT_URL, {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages", None),
    ("max-tokens-zero", CHAT_URL, {"messages": MSG, "max_tokens": 0}, 400, "max_tokens", None),
    ("max-tokens-negative", CMPL_URL, {"prompt": "x", "max_tokens": -5}, 400, "max_tokens", None),
    ("max-tokens-string", CHAT_URL, {"messages": MSG, "max_tokens": "ten"}, 400, "max_tokens",
     "invalid_type"),
    ("n-too-large", CHAT_URL, {"messages": MSG, "n": 1000}, 400, "n", None),
    ("temperature-negative", CHAT_URL, {"messages": MSG, "temperature": -1}, 400, "temperature", None),
    ("top-k-zero", CMPL_URL, {"prompt": "x", "top_k": 0}, 400, "top_k", None),
    ("beyond-context", CHAT_URL, {"messages": MSG, "max_tokens": 9000}, 400, "messages",
     "context_length_exceeded"),
    ("beyond-context-stream", CMPL_URL, {"prompt": "x", "max_tokens": 9000, "stream": True}, 400, "prompt",
     "context_length_exceeded"),
    ("unknown-model", CHAT_URL, {"messages": MSG, "model": "gpt-4o"}, 404, "model", "model_not_found"),
    ("unsupported-field", CHAT_URL, {"messages": MSG, "toolz": []}, 400, "toolz", "unsupported_parameter"),
    ("unserved-field", CHAT_URL, {"messages": MSG, "functions": []}, 400, "functions", "unsupported_parameter"),
    ("unsupported-suffix", CMPL_URL, {"prompt": "x", "suffix": "y"}, 400, "suffix", "unsupported_parameter"),
    ("empty-prompt", CMPL_URL, {"prompt": []}, 400, "prompt", None),
    ("token-out-of-range", CMPL_URL, {"prompt": [1, 10 ** 9]}, 400, "prompt", None),
    ("empty-stop", CMPL_URL, {"prompt": "x", "stop": [""]}, 400, "stop", None),
    ("top-logprobs-alone", CHAT_URL, {"messages": MSG, "top_logprobs": 2}, 400, "top_logprobs", None),
    ("generate-no-input", "/generate", {"sampling_params": {"max_new_tokens": 2}}, 400, "text", None),
    ("logprob-start-past-prompt", "/generate", {"input_ids": [1, 2, 3], "return_logprob": True,
                                                "logprob_start_len": 3}, 400, "logprob_start_len", None),
    ("logprob-start-negative", "/generate", {"text": "x", "logprob_start_len": -2}, 400, "logprob_start_len", None),
    ("vllm-prompt-logprobs", CMPL_URL, {"prompt": "x", "prompt_logprobs": 1}, 400, "prompt_logprobs",
     "unsupported_parameter"),
    ("unknown-path", "/v1/nope", {}, 404, None, None),
]


@pytest.mark.parametrize("path,body,status,param,code", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input(base_url: str, path: str, body, status: int, param: str | None, code: str | None) -> None:
    got, data = request(base_url, "POST", path, body)
    assert got == status, data
    err = json.loads(data)["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["param"] == param
    if code:
        assert err["code"] == code
    if code == "context_length_exceeded":  # the message names the numbers
        assert "8192" in err["message"] and "9000" in err["message"]


def test_serves_after_bad_input(client: openai.OpenAI, model: str, base_url: str) -> None:
    r = client.chat.completions.create(model=model, messages=MSG, max_tokens=2, temperature=0)
    assert r.usage.completion_tokens >= 1
    assert wait_idle(base_url)["kv_used_tokens"] == 0


# ---- disconnects and aborts --------------------------------------------------------------------------
def test_disconnect_aborts_and_frees_kv(base_url: str) -> None:
    before = live(base_url)["generation_tokens_total"]
    conn, events = open_stream(base_url, CMPL_URL, LONG)
    next(events)
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()

    # A non-streamed request whose client gives up is aborted too.
    conn = connect(base_url, timeout=1.5)
    conn.request("POST", CMPL_URL, json.dumps(LONG), {"Content-Type": "application/json"})
    with pytest.raises(TimeoutError):
        conn.getresponse()
    conn.close()

    info = wait_idle(base_url)
    assert info["num_running_reqs"] == info["num_queue_reqs"] == info["kv_used_tokens"] == 0
    assert info["generation_tokens_total"] - before < 1000  # neither ran to its 2000 tokens
    assert request(base_url, "POST", "/flush_cache")[0] == 200
    info = live(base_url)
    assert info["kv_free_tokens"] == info["kv_capacity_tokens"]  # the KV pool is empty again


def test_abort_request_ends_stream(base_url: str) -> None:
    body = {"text": "Tell me a story.", "rid": "abort-me",
            "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True}}
    conn, events = open_stream(base_url, "/generate", body)
    assert post_json(base_url, "/abort_request", {"rid": "abort-me"}) == {"aborted": 1}
    last = list(events)[-1]
    conn.close()
    assert last["meta_info"]["finish_reason"]["type"] == "abort"
    assert last["meta_info"]["completion_tokens"] < 2000


# ---- native API --------------------------------------------------------------------------------------
def test_native_generate(base_url: str) -> None:
    sp = {"max_new_tokens": 4, "temperature": 0}
    out = post_json(base_url, "/generate", {"text": PROMPT, "sampling_params": sp, "return_logprob": True,
                                            "top_logprobs_num": 2})
    meta = out["meta_info"]
    assert {"prompt_tokens", "cached_tokens", "finish_reason", "e2e_latency"} <= set(meta)
    assert meta["completion_tokens"] == len(out["output_ids"]) == len(meta["output_token_logprobs"]) == 4
    assert meta["finish_reason"] == {"type": "length", "length": 4}
    assert all(len(row) == 2 for row in meta["output_top_logprobs"])

    by_ids = post_json(base_url, "/generate", {"input_ids": [504, 3575, 282], "sampling_params": sp})
    assert by_ids["meta_info"]["prompt_tokens"] == 3

    conn, events = open_stream(base_url, "/generate", {"text": PROMPT, "sampling_params": sp})
    last = list(events)[-1]
    conn.close()
    assert (last["text"], last["output_ids"]) == (out["text"], out["output_ids"])

    batch = post_json(base_url, "/generate", {"text": [PROMPT, "Hello"], "sampling_params": sp})
    assert isinstance(batch, list) and batch[0]["text"] == out["text"]


def test_health_and_info(base_url: str) -> None:
    assert request(base_url, "GET", "/health")[0] == 200
    assert request(base_url, "GET", "/health_generate")[0] == 200
    info = get_json(base_url, "/get_model_info")
    assert info["is_generation"] and info["model_path"].endswith(".gguf")
    server = get_json(base_url, "/get_server_info")
    assert server["max_total_tokens"] == 16384 and server["max_total_num_tokens"] == 16384
    assert server["context_len"] == 8192 and "available_gpu_mem" in server
    state = server["internal_states"][0]
    assert {"kv_free_tokens", "kv_cached_tokens", "num_running_reqs", "num_queue_reqs"} <= set(state)
    assert state["kv_capacity_tokens"] == 16384


def test_bench_serving(base_url: str, tmp_path) -> None:
    out = tmp_path / "bench.json"
    m = run_benchmark(BenchArgs(base_url=base_url, num_prompts=4, random_input_len=16, random_output_len=4,
                                random_range_ratio=1.0, output=str(out), quiet=True))
    assert m["completed"] == 4 and m["total_output_tokens"] == 16 and m["total_input_tokens"] == 64
    saved = json.loads(out.read_text())
    for key in ("duration", "request_throughput", "input_throughput", "output_throughput"):
        assert isinstance(saved[key], float), key
    for metric in ("ttft", "itl", "tpot", "e2e_latency"):
        for stat in ("mean", "median", "p99"):
            assert isinstance(saved[f"{stat}_{metric}_ms"], float), (stat, metric)


# ---- --api-key, shutdown, a dying child --------------------------------------------------------------
@pytest.fixture(scope="module")
def extra_servers() -> Iterator[dict[str, Server]]:
    """Two more servers, loaded side by side: one with --api-key (stopped by SIGTERM in the end) and one
    whose scheduler gets killed."""
    servers = {"secured": start_server("--api-key", API_KEY), "victim": start_server()}
    try:
        for s in servers.values():
            wait_healthy(s)
        yield servers
    finally:
        for s in servers.values():
            if s.proc.poll() is None:
                s.stop(signal.SIGKILL)


def test_api_key(extra_servers: dict[str, Server]) -> None:
    url, auth = extra_servers["secured"].base_url, {"Authorization": f"Bearer {API_KEY}"}
    status, data = request(url, "GET", "/v1/models")
    assert status == 401 and json.loads(data)["error"]["code"] == "invalid_api_key"
    assert request(url, "GET", "/get_server_info", headers={"Authorization": "Bearer wrong"})[0] == 401
    assert request(url, "GET", "/health")[0] == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
    ok = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=300)
    name = ok.models.list().data[0].id
    r = ok.chat.completions.create(model=name, messages=MSG, max_tokens=2, temperature=0)
    assert r.choices[0].message.content is not None
    assert request(url, "GET", "/get_server_info", headers=auth)[0] == 200


def test_metrics_absent_without_flag(extra_servers: dict[str, Server]) -> None:
    """(The session server runs with --enable-metrics; "victim" has the default flags.)"""
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(extra_servers["victim"].base_url + "/metrics", timeout=30)
    assert e.value.code == 404


def test_sigint_stops_every_child(extra_servers: dict[str, Server]) -> None:
    """SIGINT (Ctrl-C) with a stream open: the stream ends as aborted at once, the server exits 0 within
    seconds, no child is left. (SIGTERM drains first: test_hardening.py.)"""
    server = extra_servers["secured"]
    conn, events = open_stream(server.base_url, CMPL_URL, LONG, {"Authorization": f"Bearer {API_KEY}"})
    t, rest = drain_in_thread(events)
    children = descendants(server.proc.pid)
    assert len(children) >= 2  # scheduler and detokenizer (and multiprocessing's resource tracker)
    start = time.monotonic()
    assert server.stop(signal.SIGINT) == 0  # stop() also waits until every child is gone
    assert time.monotonic() - start < 10
    t.join(10)
    conn.close()
    assert not t.is_alive() and rest[-1]["choices"][0]["finish_reason"] == "abort"
    assert server.children == children
    assert "Received SIGINT; shutting down" in server.log()


def test_dead_scheduler_stops_server_with_clear_error(extra_servers: dict[str, Server]) -> None:
    """Kill the scheduler mid-stream: the client gets an error event and the end of its stream (no hang),
    the server exits with code 1 naming the scheduler, and no child is left behind."""
    server = extra_servers["victim"]
    conn, events = open_stream(server.base_url, CMPL_URL, LONG)
    server.children = descendants(server.proc.pid)
    t, rest = drain_in_thread(events)
    os.kill(get_json(server.base_url, "/get_server_info")["pids"]["scheduler"], signal.SIGKILL)
    t.join(15)
    conn.close()
    assert rest and rest[-1]["error"]["message"] == "the scheduler process died; the server is shutting down"
    assert server.proc.wait(15) == 1
    server.wait_children_gone()
    assert "The scheduler process" in server.log() and "died unexpectedly (exit code -9)" in server.log()


def test_missing_model_fails_fast() -> None:
    server = start_server("--model", "/nonexistent/model.gguf")
    assert server.proc.wait(60) == 1
    assert "/nonexistent/model.gguf" in server.log() and "neither" in server.log()
