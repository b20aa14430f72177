"""Tool-call formats (--tool-call-parser): parsing finished and streamed output, and forcing calls."""
from radixserve.server.tool_parsers.base import ToolCall, ToolParser, new_call_id
from radixserve.server.tool_parsers.formats import PARSERS, get_parser
from radixserve.server.tool_parsers.stream import ToolStream

__all__ = ["PARSERS", "ToolCall", "ToolParser", "ToolStream", "get_parser", "new_call_id"]
