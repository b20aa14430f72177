"""Splitting a reasoning model's output into reasoning_content and content.

qwen3: the model opens `<think>` itself (unless the template closed an empty block because
`enable_thinking` is false), so only output that starts with it is reasoning. deepseek-r1: the template
ends the prompt inside `<think>`, so everything up to `</think>` is reasoning even without the opening
tag. Output that never closes the block is all reasoning (it was cut by max_tokens).
"""
from __future__ import annotations

from dataclasses import dataclass

from radixserve.server.tool_parsers.stream import marker_holdback

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass(frozen=True)
class ReasoningParser:
    name: str
    starts_in_reasoning: bool  # the prompt already opened the block

    def split(self, text: str, final: bool = True) -> tuple[str, str]:
        """(reasoning, content) of `text`. Not `final`: text that may still become a tag is left out of
        both, so that each only grows as more text arrives."""
        body = text.lstrip()
        if body.startswith(THINK_OPEN):
            body = body[len(THINK_OPEN):]
        elif not self.starts_in_reasoning:
            if not final and THINK_OPEN.startswith(body):
                return "", ""  # may still be the opening tag
            return "", text
        end = body.find(THINK_CLOSE)
        if end < 0:
            hold = 0 if final else marker_holdback(body, THINK_CLOSE)
            return body[:len(body) - hold].lstrip(), ""
        return body[:end].lstrip(), body[end + len(THINK_CLOSE):].lstrip()


REASONING_PARSERS = {"qwen3": ReasoningParser("qwen3", False),
                     "deepseek-r1": ReasoningParser("deepseek-r1", True)}


class ReasoningStream:
    """Deltas of reasoning and content for a streamed choice: they concatenate to split()'s strings."""

    def __init__(self, parser: ReasoningParser) -> None:
        self.parser, self.text = parser, ""
        self.sent_reasoning = self.sent_content = 0

    def feed(self, delta: str, final: bool = False) -> tuple[str, str]:
        self.text += delta
        reasoning, content = self.parser.split(self.text, final)
        r = reasoning[self.sent_reasoning:] if len(reasoning) > self.sent_reasoning else ""
        c = content[self.sent_content:] if len(content) > self.sent_content else ""
        self.sent_reasoning = max(self.sent_reasoning, len(reasoning))
        self.sent_content = max(self.sent_content, len(content))
        return r, c
