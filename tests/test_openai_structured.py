"""Structured outputs and tool calling through a real server, with the official openai client and LangChain.

The reference is the request itself: every constrained output must parse and validate against the schema
it was given (pydantic), at temperature 0 and 1, for n > 1 and streamed; tool calls must arrive in OpenAI's
shape (streamed: id and name first, argument deltas after) and validate against the tool's parameters.
"""
from __future__ import annotations

import json

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from tests.conftest import Server


class City(BaseModel):
    model_config = {"extra": "forbid"}  # additionalProperties false: the grammar closes the object
    name: str = Field(max_length=20)
    country: str = Field(max_length=20)
    population_millions: int = Field(ge=0, le=50)


class WeatherArgs(BaseModel):
    model_config = {"extra": "forbid"}
    city: str = Field(max_length=16)
    unit: str = Field(json_schema_extra={"enum": ["celsius", "fahrenheit"]})


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 16},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]
CITY_FORMAT = {"type": "json_schema", "json_schema": {"name": "city", "schema": City.model_json_schema(),
                                                      "strict": True}}


# `server`: conftest's session server (default flags + --enable-metrics), shared with the other files that need one
@pytest.fixture(scope="module")
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", timeout=900)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_response_format_json_schema_validates(client: openai.OpenAI, temperature: float) -> None:
    r = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Describe Paris."}],
                                       response_format=CITY_FORMAT, temperature=temperature, seed=3, n=2,
                                       max_tokens=80)
    for c in r.choices:
        assert c.finish_reason == "stop"
        City.model_validate_json(c.message.content)


def test_json_object_and_stream_with_grammar(client: openai.OpenAI) -> None:
    kw = dict(model="default", messages=[{"role": "user", "content": "Give me a JSON object about a cat."}],
              response_format={"type": "json_object"}, temperature=0, max_tokens=60)
    whole = client.chat.completions.create(**kw).choices[0]
    if whole.finish_reason == "stop":
        assert isinstance(json.loads(whole.message.content), dict)
    streamed = "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(**kw, stream=True)
                       if ch.choices)
    assert streamed == whole.message.content


def test_sglang_fields_on_v1_and_generate(client: openai.OpenAI, server: Server) -> None:
    r = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "Yes or no?"}],
                                       max_tokens=8, temperature=1, n=3, extra_body={"regex": "(yes|no)!"})
    assert all(c.message.content in ("yes!", "no!") for c in r.choices)
    r = client.completions.create(model="default", prompt="The sky is", max_tokens=8,
                                  extra_body={"ebnf": 'root ::= " blue" | " grey"'})
    assert r.choices[0].text in (" blue", " grey")
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["n"], "additionalProperties": False}
    out = httpx.post(server.base_url + "/generate", timeout=900, json={
        "text": "A number:", "sampling_params": {"max_new_tokens": 16, "temperature": 0,
                                                 "json_schema": json.dumps(schema)}}).json()
    assert isinstance(json.loads(out["text"])["n"], int)


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_call(client: openai.OpenAI, choice) -> None:
    r = client.chat.completions.create(model="default", messages=ASK, tools=[WEATHER], tool_choice=choice,
                                       parallel_tool_calls=False, temperature=0, max_tokens=60)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    (call,) = c.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name == "get_weather"
    WeatherArgs.model_validate_json(call.function.arguments)


def test_tool_call_streams_in_openai_shape(client: openai.OpenAI) -> None:
    kw = dict(model="default", messages=ASK, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False,
              temperature=0, max_tokens=60)
    whole = client.chat.completions.create(**kw).choices[0].message.tool_calls[0]
    deltas, reasons = [], []
    for ch in client.chat.completions.create(**kw, stream=True):
        if ch.choices:
            deltas += ch.choices[0].delta.tool_calls or []
            reasons.append(ch.choices[0].finish_reason)
    first, rest = deltas[0], deltas[1:]
    assert first.id and first.type == "function" and first.function.name == "get_weather"
    assert first.function.arguments == "" and rest and all(d.id is None and d.function.name is None for d in rest)
    args = "".join(d.function.arguments for d in rest)
    assert json.loads(args) == json.loads(whole.function.arguments)
    assert reasons[-1] == "tool_calls"


def test_tool_history_is_accepted(client: openai.OpenAI) -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                            "arguments": '{"city": "Paris", "unit": "celsius"}'}}
    msgs = ASK + [{"role": "assistant", "content": None, "tool_calls": [call]},
                  {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees and sunny"}]
    r = client.chat.completions.create(model="default", messages=msgs, tools=[WEATHER], tool_choice="none",
                                       temperature=0, max_tokens=8)
    assert r.choices[0].message.tool_calls is None and r.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("body,param,needle", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "integr"}}}},
     "response_format.json_schema.schema", "not a valid JSON schema"),
    ({"regex": "[a-"}, "regex", "not a valid regex"),
    ({"ebnf": "root ::= missing"}, "ebnf", "not a valid EBNF"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                              "properties": {"a": {"type": 5}}}}}]},
     "tools", "not a valid JSON schema"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "not in tools"),
    ({"functions": [{"name": "f"}]}, "functions", "send `tools`"),
    ({"regex": "a", "json_schema": "{}"}, "json_schema", "one constraint"),
    ({"logit_bias": {"x": 1}}, "logit_bias", "token id"),
    ({"tool_choic": "auto"}, "tool_choic", "not supported"),
])
def test_bad_structured_input_is_a_400(server: Server, body: dict, param: str, needle: str) -> None:
    r = httpx.post(server.base_url + "/v1/chat/completions", timeout=60,
                   json={"messages": ASK, "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and needle in err["message"], err


def test_logit_bias_and_model_route(server: Server) -> None:
    """Banning the greedy token with logit_bias -100 makes the runner-up of the unbiased step the choice."""
    body = {"text": "The capital of France is", "return_logprob": True, "top_logprobs_num": 2,
            "sampling_params": {"max_new_tokens": 1, "temperature": 0}}
    out = httpx.post(server.base_url + "/generate", timeout=900, json=body).json()
    (best, second), = [[row[1] for row in step] for step in out["meta_info"]["output_top_logprobs"]]
    assert out["output_ids"] == [best]
    body["sampling_params"]["logit_bias"] = {str(best): -100.0}
    assert httpx.post(server.base_url + "/generate", timeout=900, json=body).json()["output_ids"] == [second]
    assert httpx.get(server.base_url + "/v1/models/default").json()["object"] == "model"
    assert httpx.get(server.base_url + "/v1/models/no-such-model").status_code == 404


def test_langchain_structured_output_and_tools(server: Server) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    llm = langchain_openai.ChatOpenAI(base_url=server.base_url + "/v1", api_key="none", model="default",
                                      temperature=0, max_tokens=80, timeout=900)
    for method in ("json_schema", "function_calling"):
        city = llm.with_structured_output(City, method=method).invoke("Describe Paris.")
        assert isinstance(city, City), method
    hot = langchain_openai.ChatOpenAI(base_url=server.base_url + "/v1", api_key="none", model="default",
                                      temperature=1, max_tokens=80, timeout=900, seed=5)
    assert isinstance(hot.with_structured_output(City, method="json_schema").invoke("Describe Rome."), City)
    obj = llm.with_structured_output(None, method="json_mode").invoke("Describe Paris as JSON.")
    assert isinstance(obj, dict)
    msg = llm.bind_tools([WEATHER], tool_choice="get_weather").invoke("Weather in Paris?")
    (call,) = msg.tool_calls
    assert call["name"] == "get_weather"
    WeatherArgs.model_validate(call["args"])
