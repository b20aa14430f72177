"""Constrained decoding, tool-call and reasoning parsing without a server.

References: a constrained output must parse and validate against its schema (pydantic) or fully match
its regex, for greedy and sampled requests, with and without overlap scheduling and through
retraction; the bitmask the sampler applies must equal the bits llguidance wrote; streamed tool-call
deltas must concatenate to what the non-streamed parser reads.
"""
from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from pydantic import BaseModel, Field

from radixserve.args import ServerArgs
from radixserve.core import Req, SamplingParams
from radixserve.engine.sampler import apply_logit_bias, apply_token_bitmask
from radixserve.engine_unit import Engine
from radixserve.scheduler.scheduler import Scheduler
from radixserve.server.reasoning import REASONING_PARSERS, ReasoningStream
from radixserve.server.tool_parsers import PARSERS, ToolStream, get_parser


class Person(BaseModel):
    name: str = Field(max_length=16)
    age: int = Field(ge=0, le=120)
    role: str = Field(json_schema_extra={"enum": ["admin", "user"]})


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                             "parameters": {"type": "object", "properties": {
                                                 "city": {"type": "string", "maxLength": 12},
                                                 "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                                                 "required": ["city", "days"], "additionalProperties": False}}}


class WeatherArgs(BaseModel):
    model_config = {"extra": "forbid"}
    city: str = Field(max_length=12)
    days: int = Field(ge=1, le=7)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(ServerArgs(device="cpu", max_total_tokens=4096, seed=0))


def run(engine: Engine, reqs: list[Req], **changes) -> Scheduler:
    s = Scheduler(dataclasses.replace(engine.args, **changes), engine.runner, engine.tokenizer)
    for r in reqs:
        s.add_request(r)
    while s.has_work:
        s.step()
    return s


def chat(engine: Engine, text: str) -> list[int]:
    return engine.apply_chat_template([{"role": "user", "content": text}])


@pytest.mark.parametrize("overlap", [False, True])
def test_json_schema_outputs_validate(engine: Engine, overlap: bool) -> None:
    grammar = ("json_schema", json.dumps(Person.model_json_schema()))
    prompt = chat(engine, "Describe a person as JSON.")
    reqs = [Req(prompt, SamplingParams(max_new_tokens=64, temperature=t, seed=i, grammar=grammar))
            for i, t in enumerate([0, 1, 1])]
    reqs.append(Req(prompt, SamplingParams(max_new_tokens=16, temperature=1, seed=7, grammar=("regex", r"(yes|no)\."))))
    s = run(engine, reqs, enable_overlap_schedule=overlap)
    for r in reqs[:3]:
        assert r.finish_reason.value == "stop", engine.output_text(r)  # the grammar ended it, not max_tokens
        Person.model_validate_json(engine.output_text(r))
    assert re.fullmatch(r"(yes|no)\.", engine.output_text(reqs[3]))
    assert s.grammar.backend.compiled == 2  # the three requests with one schema compiled it once


def test_model_stop_ids_beyond_the_tokenizer(engine: Engine) -> None:
    """A dummy-weight preset served with a smaller tokenizer (the GPU benchmarks' 8B preset with the bundled
    SmolLM2 tokenizer): the model's stop ids lie outside the tokenizer, which then ends the grammar with its
    own end-of-text id instead of failing to build."""
    from radixserve.grammar.llguidance_backend import LLGuidanceBackend
    tok = engine.tokenizer
    backend = LLGuidanceBackend(tok, 128256, [128001, 128009])
    m = backend.matcher("regex", r"(yes|no)\.")
    mask = torch.zeros((1, (128256 + 31) // 32), dtype=torch.int32)
    for t in tok.encode("yes.", add_special_tokens=False):
        assert m.accept(t)
    backend.fill_bitmask([(m, 0)], mask)
    allowed = [i for i in range(128256) if mask[0, i // 32] >> (i % 32) & 1]
    assert allowed == [tok.eos_token_id]


def test_grammar_survives_retraction(engine: Engine) -> None:
    """Requests retracted mid-generation (as _ensure_decode_memory does when the pool runs out, with a token
    in flight under overlap scheduling) re-prefill and resume their matcher: outputs still validate."""
    grammar = ("json_schema", json.dumps(Person.model_json_schema()))
    prompt = chat(engine, "Describe a person as JSON.")
    reqs = [Req(prompt, SamplingParams(max_new_tokens=48, temperature=1, seed=i, grammar=grammar)) for i in range(3)]
    s = Scheduler(dataclasses.replace(engine.args, enable_overlap_schedule=True), engine.runner, engine.tokenizer)
    for r in reqs:
        s.add_request(r)
    while s.has_work and not all(len(r.output_ids) >= 4 for r in reqs):
        s.step()
    victims = [r for r in s.running if not r.finished][:2]
    assert victims
    for r in victims:
        s.running.remove(r)
        s._retract(r)
    while s.has_work:
        s.step()
    assert all(r.retracted == 1 for r in victims)
    for r in reqs:
        Person.model_validate_json(engine.output_text(r))


@pytest.mark.parametrize("name", sorted(set(PARSERS) - {"qwen25"}))
def test_forced_tool_call_parses_and_validates(engine: Engine, name: str) -> None:
    parser = get_parser(name)
    grammar = ("lark", parser.grammar([WEATHER], parallel=False))
    prompt = chat(engine, parser.instructions([WEATHER]) + "\nWhat is the weather in Paris for 3 days?")
    req = Req(prompt, SamplingParams(max_new_tokens=48, temperature=0, grammar=grammar, skip_special_tokens=False))
    run(engine, [req])
    text = engine.output_text(req)
    content, calls = parser.parse(text)
    assert [c.name for c in calls] == ["get_weather"], text
    WeatherArgs.model_validate_json(calls[0].arguments)
    streamed = ToolStream(parser)
    deltas = [d for ch in text for d in streamed.feed(ch)[1]]
    assert deltas[0]["id"].startswith("call_") and deltas[0]["function"] == {"name": "get_weather", "arguments": ""}
    args = "".join(d["function"].get("arguments", "") for d in deltas)
    assert json.loads(args) == json.loads(calls[0].arguments)


def test_bitmask_and_logit_bias_in_the_sampler(engine: Engine) -> None:
    backend = engine.scheduler.grammar.backend
    m = backend.matcher("regex", "(yes|no)")
    vocab = engine.runner.cfg.vocab_size
    mask = torch.zeros(1, (vocab + 31) // 32, dtype=torch.int32)
    backend.fill_bitmask([(m, 0)], mask)
    allowed = {t for t in range(vocab) if (int(mask[0, t // 32]) >> (t % 32)) & 1}
    words = {engine.tokenizer.decode([t]) for t in allowed}
    assert words and all("yes".startswith(w) or "no".startswith(w) for w in words)
    logits = torch.randn(1, vocab)
    out = apply_token_bitmask(logits, mask)
    assert set(torch.isfinite(out[0]).nonzero().flatten().tolist()) == allowed
    req = Req([1], SamplingParams(logit_bias={5: 100.0, 6: -100.0}))
    biased = apply_logit_bias(logits, [req])
    assert biased[0, 5] == logits[0, 5] + 100 and biased[0, 6] == logits[0, 6] - 100
    assert torch.equal(biased[0, 7:], logits[0, 7:])


@pytest.mark.parametrize("name,text,calls", [
    ("hermes", 'Sure.<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n<tool_call>\n'
               '{"name": "g", "arguments": {"b": "x}"}}\n</tool_call>', [("f", {"a": 1}), ("g", {"b": "x}"})]),
    ("llama3", '{"name": "f", "parameters": {"a": [1, 2]}}; {"name": "g", "parameters": {}}',
     [("f", {"a": [1, 2]}), ("g", {})]),
    ("mistral", '[TOOL_CALLS] [{"name": "f", "arguments": {"a": true}}]', [("f", {"a": True})]),
    ("pythonic", '[f(a=1, b="two"), g(c=true)]', [("f", {"a": 1, "b": "two"}), ("g", {"c": True})]),
])
def test_parsers_finished_and_streamed(name: str, text: str, calls: list) -> None:
    parser = get_parser(name)
    content, parsed = parser.parse(text)
    assert [(c.name, json.loads(c.arguments)) for c in parsed] == calls
    stream = ToolStream(parser)
    pieces = [stream.feed(text[i:i + 3]) for i in range(0, len(text), 3)]
    streamed_content = "".join(p[0] for p in pieces) + stream.finish()
    deltas = [d for p in pieces for d in p[1]]
    names = [d["function"]["name"] for d in deltas if "id" in d]
    args = ["".join(d["function"].get("arguments", "") for d in deltas if d["index"] == j) for j in range(len(names))]
    assert [(n, json.loads(a)) for n, a in zip(names, args)] == calls
    assert streamed_content.strip() == content


def test_plain_text_is_not_a_tool_call() -> None:
    for name in ("hermes", "llama3", "pythonic"):
        parser = get_parser(name)
        assert parser.parse("The weather is fine.") == ("The weather is fine.", [])
        stream = ToolStream(parser)
        out = "".join(stream.feed(c)[0] for c in "No <tool call here") + stream.finish()
        assert out == "No <tool call here" and not stream.called


@pytest.mark.parametrize("name,text,reasoning,content", [
    ("qwen3", "<think>\nLet me see.\n</think>\n\nIt is 4.", "Let me see.\n", "It is 4."),
    ("qwen3", "It is 4.", "", "It is 4."),
    ("deepseek-r1", "Let me see.</think>It is 4.", "Let me see.", "It is 4."),
    ("deepseek-r1", "Still thinking", "Still thinking", ""),
])
def test_reasoning_split_and_stream(name: str, text: str, reasoning: str, content: str) -> None:
    parser = REASONING_PARSERS[name]
    assert parser.split(text) == (reasoning, content)
    stream = ReasoningStream(parser)
    parts = [stream.feed(text[i:i + 2], final=i + 2 >= len(text)) for i in range(0, len(text), 2)]
    assert "".join(r for r, _ in parts) == reasoning and "".join(c for _, c in parts) == content


def test_chat_plan_tools_prompt_and_refusals() -> None:
    from radixserve.server.protocol import ChatCompletionRequest
    from radixserve.server.structured import Structured
    from radixserve.server.tokenizer_manager import RequestError
    from radixserve.weights.loader import load_tokenizer, resolve_model
    tok = load_tokenizer(resolve_model(None))
    s = Structured(ServerArgs(device="cpu", chat_template="chatml"), tok, len(tok))
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    data = {"messages": [
        {"role": "user", "content": "Weather?"}, {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "cold"}], "tools": [WEATHER], "tool_choice": "required"}
    body = ChatCompletionRequest.model_validate(data)
    plan = s.chat_plan(body)
    assert plan.messages[0]["role"] == "system" and "get_weather" in plan.messages[0]["content"]  # default prompt
    assert '"city": "Oslo"' in plan.messages[2]["content"] and "<tool_call>" in plan.messages[2]["content"]
    assert plan.grammar[0] == "lark" and plan.template_kwargs["chat_template"].startswith("{% for m in messages")
    ids = tok.apply_chat_template(plan.messages, add_generation_prompt=True, tokenize=True,
                                  **plan.template_kwargs)
    assert "<|im_start|>tool\ncold<|im_end|>" in tok.decode(ids["input_ids"] if hasattr(ids, "keys") else ids)
    named = ChatCompletionRequest.model_validate(
        {**data, "tool_choice": {"type": "function", "function": {"name": "absent"}}})
    with pytest.raises(RequestError, match="not in tools"):
        s.chat_plan(named)
    plain = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}],
                                                  "guided_choice": ["a", "b"], "logit_bias": {"5": -100}})
    plan = s.chat_plan(plain)
    assert plan.grammar == ("lark", 'start: "a" | "b"') and plan.logit_bias == {5: -100.0}


def test_grammar_overhead_round(engine: Engine) -> None:
    """bench.grammar_overhead's timed round on the CPU engine: the constrained batch's tokens are counted, its
    mask fill is timed, and what the requests wrote follows the benchmark's schema so far."""
    from radixserve.bench.grammar import SCHEMA
    from radixserve.bench.grammar_overhead import timed_round
    prompt = chat(engine, "Describe a user as JSON.")
    r = timed_round(engine, [prompt, prompt[1:]], 4, ("json_schema", json.dumps(SCHEMA)))
    assert r["tokens"] >= 4 and r["mask_ms_per_step"] > 0 and r["us_per_token"] > 0
    assert r["sample_output"].startswith('{"')
