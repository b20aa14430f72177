"""Property-based fuzzing of the whole HTTP API from its own OpenAPI schema (schemathesis + hypothesis).

Every operation the server publishes gets generated requests, valid and invalid; each answer must not be
a 5xx, must use a status code the schema documents for that operation, and must have the documented
content type. The server must still generate text afterwards. Output lengths are capped (a valid
max_tokens above 4 becomes 4, and the context is 64 tokens) so that the run stays within CI's budget
on two cores; out-of-range values are left as generated, so the bounds themselves are still fuzzed.
"""
from __future__ import annotations

import json

import pytest
import schemathesis
from conftest import launch_server
from hypothesis import HealthCheck, settings
from schemathesis.checks import content_type_conformance, not_a_server_error, status_code_conformance
from test_server import request

CAP = 4
LENGTH_FIELDS = ("max_tokens", "max_completion_tokens", "max_new_tokens")


@pytest.fixture(scope="module")
def fuzz_server():
    with launch_server("--context-length", "64", "--max-total-tokens", "2048", "--enable-metrics") as s:
        yield s


@pytest.fixture(scope="module")
def api_schema(fuzz_server):
    return schemathesis.openapi.from_url(fuzz_server.base_url + "/openapi.json")


schema = schemathesis.pytest.from_fixture("api_schema")


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


@schema.parametrize()
@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_no_server_error_for_any_input(case) -> None:
    if isinstance(case.body, (dict, list)):
        cap_lengths(case.body)
    response = case.call(timeout=120)
    case.validate_response(response, checks=[not_a_server_error, status_code_conformance,
                                              content_type_conformance])


def test_still_serving_after_the_fuzz(fuzz_server) -> None:
    status, data = request(fuzz_server.base_url, "POST", "/v1/completions",
                           {"prompt": "Hello", "max_tokens": 2, "temperature": 0})
    assert status == 200 and json.loads(data)["usage"]["completion_tokens"] == 2
    assert request(fuzz_server.base_url, "GET", "/health")[0] == 200
