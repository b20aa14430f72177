"""Tool calls in model output: each format (llama3, hermes/qwen25, mistral, pythonic) says how calls are
written, how to find them in finished text, how to find them in a stream, and the grammar that forces
one (`tool_choice: "required"` or a named function), so that forced arguments always parse and match
their schema.

A parser works on text only. Streaming uses `partial`: given all text so far it returns the calls
begun so far, each with the name (once complete) and the raw argument text written so far, which only
ever grows, so the stream can send the name first and argument deltas after, as OpenAI does.
"""
from __future__ import annotations

import json
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text of an object

    def as_openai(self, call_id: str) -> dict[str, Any]:
        return {"id": call_id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class PartialCall:
    name: str | None  # None until the name is complete
    arguments: str  # argument text so far (a prefix of the final arguments)
    done: bool = False


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def json_value_end(text: str, start: int) -> int | None:
    """Index just past the JSON object or array that opens at text[start], or None if it is not closed
    yet. Scans brackets outside strings; the text is not validated here."""
    depth, in_str, esc = 0, False, False
    for i in range(start, len(text)):
        c = text[i]
        if in_str:
            if esc:
                esc = False
            elif c == "\\":
                esc = True
            elif c == '"':
                in_str = False
        elif c == '"':
            in_str = True
        elif c in "{[":
            depth += 1
        elif c in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def partial_json_call(text: str, args_key: str) -> PartialCall | None:
    """A call written as {"name": "...", "<args_key>": {...}} that may still be incomplete."""
    import re
    m = re.match(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"', text)
    if m is None:
        return None
    name = json.loads(f'"{m.group(1)}"')
    rest = re.match(r'\s*,\s*"' + args_key + r'"\s*:\s*', text[m.end():])
    if rest is None:
        return PartialCall(name, "")
    start = m.end() + rest.end()
    if start >= len(text):
        return PartialCall(name, "")
    end = json_value_end(text, start)
    return PartialCall(name, text[start:end] if end is not None else text[start:], end is not None)


def schema_of(tool: dict[str, Any]) -> dict[str, Any]:
    params = tool["function"].get("parameters")
    return params if params else {"type": "object", "properties": {}}


COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def call_schema(tools: list[dict[str, Any]], args_key: str) -> dict[str, Any]:
    """JSON schema of one {"name": ..., args_key: ...} call to any of `tools`."""
    options = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]}, args_key: schema_of(t)},
                "required": ["name", args_key], "additionalProperties": False} for t in tools]
    schema: dict[str, Any] = options[0] if len(options) == 1 else {"anyOf": options}
    return {**schema, "x-guidance": COMPACT}


def lark_json(schema: dict[str, Any]) -> str:
    return "%json " + json.dumps(schema)


class ToolParser(ABC):
    name: str = ""
    start: str = ""  # text that opens the tool-call section; content before it is plain content

    def instructions(self, tools: list[dict[str, Any]]) -> str:
        """The system prompt for a chat template that has no tools section of its own."""
        listing = "\n".join(json.dumps(t["function"]) for t in tools)
        return ("You can call functions. The available functions are listed below, one JSON object each:\n"
                f"{listing}\n\nTo call a function, reply with nothing but {self.example()}")

    @abstractmethod
    def render(self, calls: list[ToolCall]) -> str:
        """Calls written in this format: how an assistant turn with tool_calls is shown to a template
        that has no tools section."""

    @abstractmethod
    def example(self) -> str:
        """How one call is written, for the instructions."""

    def split(self, text: str) -> tuple[str, str | None]:
        """(content before the calls, the call section) — the section is None when there is none."""
        i = text.find(self.start) if self.start else -1
        return (text, None) if i < 0 else (text[:i], text[i:])

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """Content and complete calls of finished text. Calls that do not parse leave the text as content."""
        content, section = self.split(text)
        if section is None:
            return text, []
        calls = [PartialCall(p.name, p.arguments, p.done) for p in self.partial(section)]
        out = []
        for p in calls:
            if p.name is None or not p.done:
                return text, []
            try:
                args = json.loads(p.arguments)
            except json.JSONDecodeError:
                return text, []
            if not isinstance(args, dict):
                return text, []
            out.append(ToolCall(p.name, json.dumps(args, ensure_ascii=False)))
        return (content.strip() if out else text), out

    @abstractmethod
    def partial(self, section: str) -> list[PartialCall]:
        """The calls in the (possibly unfinished) call section, in order."""

    @abstractmethod
    def grammar(self, tools: list[dict[str, Any]], parallel: bool) -> str:
        """A Lark grammar (llguidance dialect, JSON schemas embedded with %json) of one call, or of
        one or more when `parallel`, to any of `tools`."""
