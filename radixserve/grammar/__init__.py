"""Constrained decoding: grammars compiled per request, token bitmasks built on the CPU each step.

Backend choice: llguidance. It installs as one 3 MB abi3 wheel with no dependencies and covers JSON
schema, regex, GBNF/EBNF and Lark (whose %json embeds a schema inside a larger format, which is how
forced tool calls are written). xgrammar, the other engine made for this, pulls triton and
apache-tvm-ffi on x86 Linux (hundreds of MB, on CPU-only machines too). Both fill the same int32
bitmask, so a second backend only has to implement GrammarBackend (backend.py).
"""
from radixserve.grammar.backend import GRAMMAR_KINDS, GrammarBackend, GrammarError, Matcher, create_backend

__all__ = ["GRAMMAR_KINDS", "GrammarBackend", "GrammarError", "Matcher", "create_backend"]
