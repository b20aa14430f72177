"""Property-based fuzzing of the whole HTTP API from its own OpenAPI schema (schemathesis + hypothesis).

Every operation the server publishes gets generated requests, valid and invalid; each answer must not be
a 5xx, must use a status code the schema documents for that operation, and must have the documented
content type. The server must still generate text afterwards. Output lengths are capped (a valid
max_tokens above 4 becomes 4, a missing one is set to 4, and the context is 64 tokens) so that the run
stays within CI's budget on two cores; out-of-range values are left as generated, so the bounds
themselves are still fuzzed.
"""
from __future__ import annotations

import json

import pytest
import schemathesis
from conftest import launch_server
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import content_type_conformance, not_a_server_error, status_code_conformance
from test_server import request

CAP = 4
MAX_EXAMPLES = 12
LENGTH_FIELDS = ("max_tokens", "max_completion_tokens", "max_new_tokens")


@pytest.fixture(scope="module")
def fuzz_server():
    with launch_server("--context-length", "64", "--max-total-tokens", "2048", "--enable-metrics") as s:
        yield s


def cap_lengths(body: object) -> None:
    """Shorten generation, never validity: a valid length above CAP becomes CAP (nested ones too)."""
    if isinstance(body, dict):
        for key, value in body.items():
            if key in LENGTH_FIELDS and type(value) is int and CAP < value < 2**31:
                body[key] = CAP
            else:
                cap_lengths(value)
    elif isinstance(body, list):
        for v in body:
            cap_lengths(v)


def add_default_cap(body: object, path: str) -> None:
    """A request that leaves its length out would run to the end of the context: give it CAP instead."""
    if not isinstance(body, dict):
        return
    if path in ("/v1/chat/completions", "/v1/completions") and not any(k in body for k in LENGTH_FIELDS):
        body["max_tokens"] = CAP
    elif path == "/generate":
        sp = body.setdefault("sampling_params", {})
        if isinstance(sp, dict):
            sp.setdefault("max_new_tokens", CAP)


def operations(url: str) -> list:
    return [op.ok() for op in schemathesis.openapi.from_url(url + "/openapi.json").get_all_operations()]


def test_no_server_error_for_any_input(fuzz_server) -> None:
    """Each published operation, fuzzed in turn (schemathesis' pytest plugin does not run on pytest 9, so the
    operations' hypothesis strategies are driven here directly)."""
    ops = operations(fuzz_server.base_url)
    assert {op.path for op in ops} >= {"/v1/completions", "/v1/chat/completions", "/generate", "/health"}
    for op in ops:
        @given(case=op.as_strategy())
        @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case) -> None:
            if isinstance(case.body, (dict, list)):
                cap_lengths(case.body)
                add_default_cap(case.body, case.operation.path)
            response = case.call(timeout=120)
            case.validate_response(response, checks=[not_a_server_error, status_code_conformance,
                                                      content_type_conformance])
        fuzz()


def test_still_serving_after_the_fuzz(fuzz_server) -> None:
    status, data = request(fuzz_server.base_url, "POST", "/v1/completions",
                           {"prompt": "Hello", "max_tokens": 2, "temperature": 0})
    assert status == 200 and json.loads(data)["usage"]["completion_tokens"] == 2
    assert request(fuzz_server.base_url, "GET", "/health")[0] == 200
