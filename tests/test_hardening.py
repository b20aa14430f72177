"""Hardening (issue 11): what a reliability probe broke, each reproduced against a real server.

- a client-chosen rid can never reach another request's output;
- no input gets a 5xx: huge integers, NaN/infinity, lone surrogates, out-of-vocabulary ids are 400s;
- a 10 MB body does not stall the event loop; bodies over --max-request-body-mb get 413;
- the OpenAPI schema documents what the server answers (400, not FastAPI's 422; text/plain for
  /flush_cache; one operation id per operation);
- start-up mistakes name their cause and fix: unsupported architecture, missing tokenizer,
  --context-length above the model's maximum; the CPU KV pool is sized from the model.
"""
from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import SESSION_FLAGS, Server, launch_server, prestart, prestart_session_server, take_server, wait_healthy
from test_server import connect, get_json, open_stream, request, sse_events

API_VOCAB = 49152  # the bundled SmolLM2's vocabulary
KV_SIZED = ("--max-total-tokens", "0", "--context-length", "512")
SIGTERM = ("--shutdown-grace-period", "12", "--max-total-tokens", "8192")
TOO_LONG = ("--context-length", "1000000")


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory) -> dict[str, str]:
    """Model directories whose start-up must fail: an unsupported architecture, a Llama without tokenizer."""
    gpt2, untokenized = tmp_path_factory.mktemp("gpt2"), tmp_path_factory.mktemp("no-tokenizer")
    (gpt2 / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
                                                  "n_embd": 64, "n_layer": 2, "n_head": 2}))
    (untokenized / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 2, "vocab_size": 128, "max_position_embeddings": 256}))
    return {"gpt2": str(gpt2), "no_tokenizer": str(untokenized)}


@pytest.fixture(scope="module", autouse=True)
def all_servers_loading(bad_models: dict[str, str]) -> None:
    """Every server this file uses, started at once; each test takes its own. All are up (or, for the start-up
    errors, gone) before the first test: nothing loads while a test measures /health."""
    good = [KV_SIZED, SIGTERM, SIGTERM]
    bad = [("--model", bad_models["gpt2"]), ("--model", bad_models["no_tokenizer"]), TOO_LONG]
    prestart_session_server()  # `srv`
    for flags in good + bad:
        prestart(*flags)
    import conftest
    pending = [s for flags in {*good, SESSION_FLAGS} for s in conftest._PRESTARTED.get(flags, [])]
    failing = [s for flags in bad for s in conftest._PRESTARTED[flags]]
    for s in pending:
        wait_healthy(s)
    for s in failing:  # their exit code is the tests' to check; here only: not still loading
        try:
            s.proc.wait(120)
        except subprocess.TimeoutExpired:
            pass


@pytest.fixture(scope="module")
def srv(all_servers_loading, request) -> Server:
    """conftest's session server (--enable-metrics, so /metrics is in the schema checked below); asked for
    here, after the fixture above, so that it is the one loading beside the others."""
    return request.getfixturevalue("server")


def error_of(status: int, data: bytes) -> dict:
    body = json.loads(data)
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    return body["error"]


def in_flight(url: str) -> int:
    """Requests the scheduler still runs or queues (the probe saw this stay at 1 after the leak)."""
    info = get_json(url, "/get_server_info")["internal_states"][0]
    return info["num_running_reqs"] + info["num_queue_reqs"]


# ---- 1. request ids --------------------------------------------------------------------------------
def test_client_rid_cannot_collide_with_internal_ids(srv) -> None:
    """The probe's leak: /generate rid "col" with n = 2 ran as col-0 and col-1 inside, so a second client
    sending rid "col-0" got the first one's tokens (14 tokens against a limit of 4) and one of them hung."""
    url = srv.base_url
    first = {"text": "Count to twenty:", "rid": "col", "stream": True,
             "sampling_params": {"n": 2, "max_new_tokens": 4, "temperature": 0, "ignore_eos": True}}
    second = {"text": "Name the planets:", "rid": "col-0",
              "sampling_params": {"max_new_tokens": 10, "temperature": 0, "ignore_eos": True}}

    def run_first() -> list[dict]:
        conn = connect(url)
        conn.request("POST", "/generate", json.dumps(first), {"Content-Type": "application/json"})
        return list(sse_events(conn.getresponse()))

    with ThreadPoolExecutor(2) as pool:
        a = pool.submit(run_first)
        time.sleep(0.05)
        b = pool.submit(request, url, "POST", "/generate", second)
        events, (status, data) = a.result(120), b.result(120)
    assert status == 200, data
    alone = json.loads(data)
    assert len(alone["output_ids"]) == 10 and alone["meta_info"]["completion_tokens"] == 10
    finals = {e["index"]: e for e in events if e["meta_info"]["finish_reason"] is not None}
    assert sorted(finals) == [0, 1]
    for e in finals.values():
        assert len(e["output_ids"]) == 4 and e["meta_info"]["completion_tokens"] == 4
    # each answer is what the prompt alone gives
    solo = request(url, "POST", "/generate", {**second, "rid": "solo"})[1]
    assert json.loads(solo)["output_ids"] == alone["output_ids"]
    deadline = time.monotonic() + 10
    while in_flight(url) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert in_flight(url) == 0


def test_rid_in_flight_is_refused(srv) -> None:
    url = srv.base_url
    body = {"text": "Tell me a long story.", "rid": "dup", "sampling_params": {"max_new_tokens": 2000,
                                                                              "ignore_eos": True}}
    conn, events = open_stream(url, "/generate", body)
    try:
        status, data = request(url, "POST", "/generate", {**body, "stream": False})
        err = error_of(status, data)
        assert status == 400 and err["code"] == "duplicate_rid" and err["param"] == "rid"
    finally:
        assert request(url, "POST", "/abort_request", {"rid": "dup"})[0] == 200
        assert list(events)[-1]["meta_info"]["finish_reason"]["type"] == "abort"
        conn.close()
    # free again once it ended
    status, data = request(url, "POST", "/generate", {**body, "sampling_params": {"max_new_tokens": 1}})
    assert status == 200, data


# ---- 2. no 5xx for any input ---------------------------------------------------------------------
BIG = 2**70
BAD_BODIES = [
    ("/v1/completions", {"prompt": "hi", "seed": BIG}, "seed"),
    ("/v1/completions", {"prompt": "hi", "top_k": BIG}, "top_k"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": BIG},
     "max_completion_tokens"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [BIG]}, "stop_token_ids"),
    ("/v1/completions", {"prompt": "hi", "stop_token_ids": [API_VOCAB + 5]}, "stop_token_ids"),
    ("/v1/completions", {"prompt": [BIG]}, "prompt"),
    ("/v1/completions", {"prompt": [API_VOCAB]}, "prompt"),
    ("/generate", {"input_ids": [1, BIG]}, "input_ids"),
    ("/generate", {"text": "hi", "sampling_params": {"seed": -BIG}}, "sampling_params"),
    ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": BIG}}, "sampling_params"),
]


@pytest.mark.parametrize("path,body,param", BAD_BODIES, ids=[f"{p}:{k}" for p, _, k in BAD_BODIES])
def test_out_of_range_numbers_are_400(srv, path: str, body: dict, param: str) -> None:
    status, data = request(srv.base_url, "POST", path, body)
    err = error_of(status, data)
    assert status == 400 and err["param"] == param, err


RAW_BAD = [
    ("/v1/completions", b'{"prompt": "a\\ud800b", "max_tokens": 2}', "prompt"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a\\udc00"}], "max_tokens": 2}',
     "messages"),
    ("/generate", b'{"text": "\\ud83d", "sampling_params": {"max_new_tokens": 2}}', "text"),
    ("/v1/completions", b'{"prompt": "hi", "stop": ["\\ud800"], "max_tokens": 2}', "stop"),
    ("/v1/completions", b'{"prompt": "hi", "repetition_penalty": NaN, "max_tokens": 2}', "repetition_penalty"),
    ("/v1/completions", b'{"prompt": "hi", "temperature": Infinity, "max_tokens": 2}', "temperature"),
    ("/generate", b'{"text": "hi", "sampling_params": {"top_p": NaN}}', "sampling_params"),
]


@pytest.mark.parametrize("path,raw,param", RAW_BAD, ids=[f"{p}:{k}" for p, _, k in RAW_BAD])
def test_invalid_text_and_non_finite_floats_are_400(srv, path: str, raw: bytes, param: str) -> None:
    status, data = request(srv.base_url, "POST", path, raw)
    err = error_of(status, data)
    assert status == 400 and err["param"] == param, err


def test_server_still_serves_after_bad_inputs(srv) -> None:
    status, data = request(srv.base_url, "POST", "/v1/completions",
                           {"prompt": "The capital of France is", "max_tokens": 3, "temperature": 0})
    assert status == 200 and json.loads(data)["choices"][0]["finish_reason"] == "length"


# ---- 3. the event loop and the body limit ----------------------------------------------------------
def test_ten_megabyte_body_does_not_stall_health(srv) -> None:
    """The probe: a 10 MB chat body stalled /health for 6-10 s (tokenized on the event loop). The prompt is
    tokenized on a worker thread now (and refused: it is far over the context)."""
    url = srv.base_url
    body = json.dumps({"messages": [{"role": "user", "content": "hello world " * 900_000}],
                       "max_tokens": 1}).encode()
    assert len(body) > 10_000_000
    result: list[tuple[int, bytes]] = []
    t = threading.Thread(target=lambda: result.append(request(url, "POST", "/v1/chat/completions", body)))
    t.start()
    worst, probes = 0.0, 0
    while probes == 0 or (t.is_alive() and probes < 400):  # the first probe goes out with the big body
        start = time.perf_counter()
        assert request(url, "GET", "/health")[0] == 200
        worst = max(worst, time.perf_counter() - start)
        probes += 1
        time.sleep(0.01)
    t.join(120)
    status, data = result[0]
    assert status == 400 and error_of(status, data)["code"] == "context_length_exceeded"
    assert worst < 0.1, f"/health took {worst * 1000:.0f} ms while a 10 MB body was processed"


def test_body_over_limit_is_413(srv) -> None:
    body = b'{"prompt": "' + b"x" * 33_000_000 + b'"}'
    status, data = request(srv.base_url, "POST", "/v1/completions", body)
    assert status == 413 and error_of(status, data)["code"] == "request_too_large"
    assert request(srv.base_url, "GET", "/health")[0] == 200


# ---- the published schema ---------------------------------------------------------------------------
def test_openapi_documents_400_and_text_flush(srv) -> None:
    schema = get_json(srv.base_url, "/openapi.json")
    ops = [(path, method, op) for path, item in schema["paths"].items() for method, op in item.items()]
    ids = [op["operationId"] for _, _, op in ops]
    assert len(ids) == len(set(ids)), "duplicate operation ids"
    for path, method, op in ops:
        assert "422" not in op["responses"], (path, method)
        if method == "post" and path in ("/v1/completions", "/v1/chat/completions", "/generate"):
            assert {"400", "404", "413", "503"} <= set(op["responses"]), (path, op["responses"])
    flush = schema["paths"]["/flush_cache"]
    assert set(flush) == {"get", "post"}
    assert "text/plain" in flush["get"]["responses"]["200"]["content"]
    status, data = request(srv.base_url, "POST", "/v1/completions", {"prompt": 5})
    assert status == 400  # what the schema says, not 422


# ---- 5 and 6. start-up: sizing and errors that name the fix -----------------------------------------
def test_cpu_kv_pool_sized_from_the_model(srv) -> None:
    """Without --max-total-tokens the CPU pool holds 8 whole contexts, capped at 5 % of RAM, and the log
    says which bound applied. Checked on the formula's inputs: the model's context and KV bytes per token."""
    with launch_server(*KV_SIZED) as s:
        info = get_json(s.base_url, "/get_server_info")
        log = s.log()
    assert info["max_total_num_tokens"] == 8 * 512
    assert "KV cache on CPU: 4096 tokens" in log and "sized by 8 requests x context 512" in log


def exits_with(flags: list[str], timeout: float = 120) -> str:
    s = take_server(*flags)
    assert s.proc.wait(timeout) == 1
    return s.log()


def test_unsupported_architecture_lists_supported(bad_models) -> None:
    log = exits_with(["--model", bad_models["gpt2"]])
    assert "architecture GPT2LMHeadModel is not supported" in log and "LlamaForCausalLM" in log
    assert "Traceback" not in log


def test_missing_tokenizer_names_the_flag(bad_models) -> None:
    log = exits_with(["--model", bad_models["no_tokenizer"]])
    assert "--tokenizer-path" in log and "no tokenizer files" in log and "Traceback" not in log


def test_context_length_above_model_maximum_is_refused() -> None:
    log = exits_with(list(TOO_LONG))
    assert "--context-length 1000000 is above the model's maximum" in log
    assert "--allow-overwrite-longer-context-len" in log and "Traceback" not in log


def test_context_length_override_is_explicit() -> None:
    from radixserve.args import ServerArgs
    from radixserve.models.config import context_length
    from radixserve.weights.loader import load_config, resolve_model
    cfg = load_config(resolve_model(None))
    with pytest.raises(ValueError, match="above the model's maximum"):
        context_length(ServerArgs(device="cpu", context_length=cfg.max_position_embeddings + 1), cfg)
    args = ServerArgs(device="cpu", context_length=cfg.max_position_embeddings + 1,
                      allow_overwrite_longer_context_len=True)
    assert context_length(args, cfg) == cfg.max_position_embeddings + 1


# ---- 7. soak (the bounded CPU version) --------------------------------------------------------------
def test_soak_loses_nothing(srv, tmp_path) -> None:
    """96 mixed requests (chat/completions, streamed or not, n = 1-4, 10 % cancelled mid-stream, 5 % invalid;
    with seed 0 that is 4 planned cancels and 4 invalid ones): no 5xx, none lost, every invalid one a 4xx, the
    KV pool back to capacity minus the cache and full after /flush_cache. RSS growth is measured and recorded
    but not asserted here: a hundred requests on CPU are too few for a stable second half."""
    from radixserve.bench.soak import main
    out = tmp_path / "soak.json"
    code = main(["--base-url", srv.base_url, "--num-requests", "96", "--concurrency", "16", "--max-tokens", "6",
                 "--max-prompt-words", "60", "--max-rss-growth", "10", "--output", str(out), "--quiet"])
    record = json.loads(out.read_text())
    checks, tally = record["results"]["checks"], record["results"]["tally"]
    assert code == 0, (checks, tally["problems"])
    assert tally["sent"] == 96 and tally["ok"] + tally["cancelled"] + tally["invalid_ok"] == 96
    assert tally["cancelled"] > 0 and tally["invalid_ok"] > 0


# ---- 4. graceful shutdown -------------------------------------------------------------------------
def read_stream(conn, path: str, body: dict, started: threading.Event | None = None) -> dict:
    """Run one stream to its end; what came: the events, whether [DONE] closed it, the final state.
    `started` is set once the first event arrived (or the stream ended without one)."""
    out: dict = {"events": [], "done": False}
    try:
        conn.request("POST", path, json.dumps({**body, "stream": True}), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        out["status"] = resp.status
        for raw in resp:
            line = raw.decode().strip()
            if line == "data: [DONE]":
                out["done"] = True
                break
            if line.startswith("data: "):
                out["events"].append(json.loads(line[6:]))
                if started is not None:
                    started.set()
    except OSError as e:
        out["error"] = repr(e)
    finally:
        if started is not None:
            started.set()
    return out


@pytest.fixture(scope="module")
def sigterm_servers() -> Iterator[list[Server]]:
    """One server per round of the test below (started with the file's others); each round waits for its own."""
    servers = [take_server(*SIGTERM) for _ in range(2)]
    try:
        yield servers
    finally:
        for s in servers:
            if s.proc.poll() is None:
                s.proc.kill()
                s.proc.wait()


@pytest.mark.parametrize("round_", [1, 2])
def test_sigterm_drains_then_ends_the_rest(round_: int, sigterm_servers: list[Server]) -> None:
    """SIGTERM with 8 live streams (the probe cut every stream with no final event in one of two runs and
    logged ZMQErrors): new requests get 503 at once, short streams finish normally within the grace
    period, long ones end with an error event and [DONE], no traceback, exit code 0, no child left.
    Run twice: the failure was intermittent."""
    import signal as sig

    from conftest import descendants
    s = sigterm_servers[round_ - 1]
    try:
        wait_healthy(s)
        short = {"prompt": "Say hi.", "max_tokens": 8, "ignore_eos": True}
        # 4 x 1500 tokens fit the 8192-token pool at once (4000 each did not: the later ones queued and sent
        # nothing before SIGTERM), and at CPU speed they outlast the 12 s grace period
        long = {"prompt": "Tell me a very long story.", "max_tokens": 1500, "ignore_eos": True}
        conns = [connect(s.base_url, timeout=60) for _ in range(8)]
        started = [threading.Event() for _ in conns]
        with ThreadPoolExecutor(8) as pool:
            futs = [pool.submit(read_stream, c, "/v1/completions", short if i % 2 else long, started[i])
                    for i, c in enumerate(conns)]
            for ev in started:  # every stream has its first event: all eight were admitted before SIGTERM
                assert ev.wait(120), "a stream got no first event within 120 s"
            s.children = descendants(s.proc.pid)
            s.proc.send_signal(sig.SIGTERM)
            time.sleep(0.3)
            status, data = request(s.base_url, "POST", "/v1/completions", short)
            assert status == 503 and error_of(status, data)["code"] == "server_shutting_down"
            assert request(s.base_url, "GET", "/health")[0] == 503
            results = [f.result(60) for f in futs]
        assert s.proc.wait(30) == 0
        s.wait_children_gone()
    finally:
        if s.proc.poll() is None:
            s.proc.kill()
    log = s.log()
    for i, r in enumerate(results):
        assert r.get("status") == 200 and r["done"], (i, r)
        last = r["events"][-1]
        if i % 2:  # short: finished within the grace period
            assert last["choices"][0]["finish_reason"] == "length", last
        else:  # long: ended by the server with an error event before [DONE]
            assert "shut down before this request finished" in last["error"]["message"], last
    assert "Traceback" not in log and "ZMQError" not in log, log[-3000:]
    assert "requests still running after --shutdown-grace-period 12 s" in log
