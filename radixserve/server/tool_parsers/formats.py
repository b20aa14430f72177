"""The tool-call formats SGLang names with --tool-call-parser."""
from __future__ import annotations

import ast
import json
import re
from typing import Any

from radixserve.server.tool_parsers.base import (
    COMPACT,
    PartialCall,
    ToolCall,
    ToolParser,
    call_schema,
    json_value_end,
    lark_json,
    partial_json_call,
    schema_of,
)


class HermesParser(ToolParser):
    """Qwen 2.5 / Qwen 3 / Hermes: each call is <tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>."""
    name, start = "hermes", "<tool_call>"
    open_tag, close_tag = "<tool_call>", "</tool_call>"

    def render(self, calls: list[ToolCall]) -> str:
        return "\n".join(f'<tool_call>\n{{"name": {json.dumps(c.name)}, "arguments": {c.arguments}}}\n</tool_call>'
                         for c in calls)

    def example(self) -> str:
        return ('<tool_call>\n{"name": "<function name>", "arguments": <arguments as a JSON object>}\n</tool_call>'
                " (one such block per call).")

    def partial(self, section: str) -> list[PartialCall]:
        calls = []
        for chunk in section.split(self.open_tag)[1:]:
            body = chunk.split(self.close_tag, 1)[0]
            p = partial_json_call(body, "arguments")
            if p is None:
                break
            calls.append(p)
        return calls

    def grammar(self, tools: list[dict[str, Any]], parallel: bool) -> str:
        call = f'call: "<tool_call>\\n" {lark_json(call_schema(tools, "arguments"))} "\\n</tool_call>"'
        return ('start: call ("\\n" call)*\n' if parallel else "start: call\n") + call + "\n"


class Llama3Parser(ToolParser):
    """Llama 3.1+ JSON tool calls: {"name": ..., "parameters": {...}}, optionally after <|python_tag|>,
    several separated by ';'. Without the tag, only output that starts with '{' is read as a call."""
    name, start = "llama3", "<|python_tag|>"

    def render(self, calls: list[ToolCall]) -> str:
        return "; ".join(f'{{"name": {json.dumps(c.name)}, "parameters": {c.arguments}}}' for c in calls)

    def example(self) -> str:
        return '{"name": "<function name>", "parameters": <arguments as a JSON object>}'

    def split(self, text: str) -> tuple[str, str | None]:
        i = text.find(self.start)
        if i >= 0:
            return text[:i], text[i + len(self.start):]
        return ("", text) if text.lstrip().startswith("{") else (text, None)

    def partial(self, section: str) -> list[PartialCall]:
        calls, pos = [], 0
        while True:
            p = partial_json_call(section[pos:], "parameters")
            if p is None:
                return calls
            calls.append(p)
            start = section.index("{", pos)
            end = json_value_end(section, start)
            if end is None:
                return calls
            m = re.match(r"\s*;\s*", section[end:])
            if m is None:
                return calls
            pos = end + m.end()

    def grammar(self, tools: list[dict[str, Any]], parallel: bool) -> str:
        call = f"call: {lark_json(call_schema(tools, 'parameters'))}"
        return ('start: call ("; " call)*\n' if parallel else "start: call\n") + call + "\n"


class MistralParser(ToolParser):
    """Mistral: [TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...] (the marker is a special token, so
    requests with tools keep special tokens in the text)."""
    name, start = "mistral", "[TOOL_CALLS]"

    def render(self, calls: list[ToolCall]) -> str:
        items = ", ".join(f'{{"name": {json.dumps(c.name)}, "arguments": {c.arguments}}}' for c in calls)
        return f"[TOOL_CALLS] [{items}]"

    def example(self) -> str:
        return '[TOOL_CALLS] [{"name": "<function name>", "arguments": <arguments as a JSON object>}]'

    def partial(self, section: str) -> list[PartialCall]:
        body = section[len(self.start):]
        m = re.match(r"\s*\[", body)
        if m is None:
            return []
        calls, pos = [], m.end()
        while True:
            p = partial_json_call(body[pos:], "arguments")
            if p is None:
                return calls
            calls.append(p)
            start = body.index("{", pos)
            end = json_value_end(body, start)
            if end is None:
                return calls
            sep = re.match(r"\s*,\s*", body[end:])
            if sep is None:
                return calls
            pos = end + sep.end()

    def grammar(self, tools: list[dict[str, Any]], parallel: bool) -> str:
        items: dict[str, Any] = {"type": "array", "items": call_schema(tools, "arguments"), "minItems": 1,
                                 "x-guidance": COMPACT}
        if not parallel:
            items["maxItems"] = 1
        return f'start: "[TOOL_CALLS] " {lark_json(items)}\n'


class PythonicParser(ToolParser):
    """Llama 3.2 / 4 pythonic calls: [get_weather(city="Paris"), add(a=1, b=2)]. JSON literals true,
    false and null are read as Python's True, False and None."""
    name, start = "pythonic", "["

    def render(self, calls: list[ToolCall]) -> str:
        def call(c: ToolCall) -> str:
            try:
                args = json.loads(c.arguments or "{}")
            except ValueError:
                args = None
            if not isinstance(args, dict):  # a history may carry anything: show it as it came
                return f"{c.name}({c.arguments})"
            return f"{c.name}(" + ", ".join(f"{k}={json.dumps(v)}" for k, v in args.items()) + ")"
        return "[" + ", ".join(call(c) for c in calls) + "]"

    def example(self) -> str:
        return '[function_name(argument_name=value, ...)] (a Python list of calls, values as JSON)'

    def split(self, text: str) -> tuple[str, str | None]:
        stripped = text.lstrip()
        return ("", stripped) if stripped.startswith("[") else (text, None)

    def partial(self, section: str) -> list[PartialCall]:
        """Pythonic calls are only read once the list is closed: no argument text is streamed early."""
        end = section.rfind("]")
        if end < 0:
            m = re.match(r"\[\s*([A-Za-z_][\w.]*)\(", section)
            return [PartialCall(m.group(1), "")] if m else []
        try:
            tree = ast.parse(section[:end + 1].strip(), mode="eval").body
        except SyntaxError:
            return []
        if not isinstance(tree, ast.List) or not all(isinstance(c, ast.Call) for c in tree.elts):
            return []
        calls = []
        for c in tree.elts:
            try:
                args = {kw.arg: _literal(kw.value) for kw in c.keywords}
            except ValueError:
                return []
            calls.append(PartialCall(ast.unparse(c.func), json.dumps(args, ensure_ascii=False), True))
        return calls

    def grammar(self, tools: list[dict[str, Any]], parallel: bool) -> str:
        rules, names = [], []
        for i, t in enumerate(tools):
            schema = schema_of(t)
            props = schema.get("properties", {})
            kwargs = ' ", " '.join(f'"{k}=" {lark_json({**v, "x-guidance": COMPACT})}' for k, v in props.items())
            rules.append(f'call{i}: "{t["function"]["name"]}(" {kwargs} ")"' if kwargs
                         else f'call{i}: "{t["function"]["name"]}()"')
            names.append(f"call{i}")
        head = 'start: "[" call (", " call)* "]"' if parallel else 'start: "[" call "]"'
        return "\n".join([head, "call: " + " | ".join(names), *rules]) + "\n"


def _literal(node: ast.AST) -> Any:
    if isinstance(node, ast.Name) and node.id in ("true", "false", "null"):
        return {"true": True, "false": False, "null": None}[node.id]
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values)}
    return ast.literal_eval(node)


PARSERS: dict[str, type[ToolParser]] = {"hermes": HermesParser, "qwen25": HermesParser, "llama3": Llama3Parser,
                                        "mistral": MistralParser, "pythonic": PythonicParser}


def get_parser(name: str | None) -> ToolParser:
    """The parser for --tool-call-parser (hermes when unset: the format the default tools prompt asks for)."""
    return PARSERS[name or "hermes"]()
