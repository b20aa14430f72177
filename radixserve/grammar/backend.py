"""What the scheduler needs from a grammar engine, whichever one is installed.

A grammar is a `(kind, text)` pair that travels in SamplingParams.grammar from the API server to the
scheduler: kind is "json_schema" (a JSON Schema as JSON text), "regex", "ebnf" (GBNF, SGLang's and
llama.cpp's `root ::= ...` notation) or "lark" (used internally for tool-call formats, which embed
JSON schemas). The API server only *validates* a grammar (a 400 with the parser's message); the
scheduler compiles it into one Matcher per request and asks the backend for each step's token bitmask.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

GRAMMAR_KINDS = ("json_schema", "regex", "ebnf", "lark")


class GrammarError(ValueError):
    """The grammar does not compile; the message is the parser's (an HTTP 400 upstream)."""


class Matcher(ABC):
    """The grammar state of one request: which tokens it has consumed, and whether it is complete."""

    accepted: int = 0  # tokens consumed so far; the scheduler rolls back when a request's output shrinks

    @abstractmethod
    def accept(self, token: int) -> bool:
        """Consume `token`; False if the grammar does not allow it (the matcher is then in error)."""

    @abstractmethod
    def rollback(self, num_tokens: int) -> None:
        """Forget the last `num_tokens` consumed tokens."""

    @property
    @abstractmethod
    def terminated(self) -> bool:
        """The grammar is complete and allows no further token but EOS: the request is done."""

    @property
    @abstractmethod
    def failed(self) -> bool:
        """The matcher is in an error state (a token it did not allow was forced on it)."""


class GrammarBackend(ABC):
    """Compiles grammars (with a cache: a repeated schema is compiled once) and fills token bitmasks.

    Bitmask layout (xgrammar's and llguidance's): int32 [rows, ceil(vocab / 32)], bit j of word w set
    when token 32 * w + j is allowed."""

    @abstractmethod
    def validate(self, kind: str, text: str) -> None:
        """Raise GrammarError with the parser's message if `text` is not a valid grammar of `kind`."""

    @abstractmethod
    def matcher(self, kind: str, text: str) -> Matcher:
        """A fresh matcher for a new request (from the compiled-grammar cache when possible)."""

    @abstractmethod
    def fill_bitmask(self, matchers: list[tuple[Matcher, int]], bitmask: torch.Tensor) -> None:
        """Write each matcher's allowed tokens into row `i` of the CPU int32 `bitmask`."""

    def warm_up(self) -> object:
        """Start building whatever the first request would otherwise wait for (in the background)."""
        return None


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def create_backend(name: str, tokenizer: object, vocab_size: int, eos_ids: list[int],
                   parallel: bool = False) -> GrammarBackend:
    """The backend named by --grammar-backend (only llguidance is built; see grammar/__init__.py)."""
    if name != "llguidance":
        raise ValueError(f"--grammar-backend {name!r}: radixserve implements llguidance only")
    from radixserve.grammar.llguidance_backend import LLGuidanceBackend
    return LLGuidanceBackend(tokenizer, vocab_size, eos_ids, parallel=parallel)
