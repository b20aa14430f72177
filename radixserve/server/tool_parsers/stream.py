"""Streaming tool calls the way OpenAI streams them: content deltas until the call section opens, then
for each call one delta with its id, type and name (arguments "") followed by argument deltas."""
from __future__ import annotations

from typing import Any

from radixserve.server.tool_parsers.base import ToolParser, new_call_id


def marker_holdback(text: str, marker: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `marker` (it may become it)."""
    for k in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


class ToolStream:
    def __init__(self, parser: ToolParser) -> None:
        self.parser = parser
        self.text = ""
        self.content_sent = 0
        self.calls: list[list[Any]] = []  # [id, argument characters sent]

    def feed(self, delta: str) -> tuple[str, list[dict[str, Any]]]:
        """(content delta, tool_calls deltas) for the next piece of text."""
        self.text += delta
        content, section = self.parser.split(self.text)
        if section is None:
            end = len(self.text) - self._holdback()
            out = self.text[self.content_sent:end] if end > self.content_sent else ""
            self.content_sent = max(self.content_sent, end)
            return out, []
        out = content[self.content_sent:] if len(content) > self.content_sent else ""
        self.content_sent = max(self.content_sent, len(content))
        deltas = []
        for j, p in enumerate(self.parser.partial(section)):
            if j == len(self.calls):
                if p.name is None:
                    break
                self.calls.append([new_call_id(), 0])
                deltas.append({"index": j, "id": self.calls[j][0], "type": "function",
                               "function": {"name": p.name, "arguments": ""}})
            sent = self.calls[j][1]
            if len(p.arguments) > sent:
                deltas.append({"index": j, "function": {"arguments": p.arguments[sent:]}})
                self.calls[j][1] = len(p.arguments)
        return out, deltas

    def _holdback(self) -> int:
        if self.parser.name in ("llama3", "pythonic") and not self.text.strip():
            return len(self.text)  # the call may open with the first non-blank character
        return marker_holdback(self.text, self.parser.start)

    def finish(self) -> str:
        """Text held back because it might have opened a call, and never did."""
        if self.calls:
            return ""
        rest = self.text[self.content_sent:]
        self.content_sent = len(self.text)
        return rest

    @property
    def called(self) -> bool:
        return bool(self.calls)
