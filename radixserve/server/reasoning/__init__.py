"""Reasoning parsers (--reasoning-parser): <think> text of reasoning models into reasoning_content."""
from radixserve.server.reasoning.parser import REASONING_PARSERS, ReasoningParser, ReasoningStream

__all__ = ["REASONING_PARSERS", "ReasoningParser", "ReasoningStream"]
