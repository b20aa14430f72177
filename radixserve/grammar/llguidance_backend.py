"""The llguidance backend: JSON schema, regex, GBNF/EBNF and Lark grammars, masks filled in the scheduler's thread
(llguidance's thread pool is there, off by default: measured slower, see LLGuidanceBackend).

Compiling builds an LLMatcher once per distinct (kind, text) and keeps it, unconsumed, in an LRU
cache; every request gets a deep copy of it (microseconds), so a repeated schema costs nothing.
Building the tokenizer's token trie takes about a second for a 50k vocabulary (and the first mask fills
more lazily built tables): on a GPU server `warm_up` does both in a background thread at start-up (the
library releases the GIL), on CPU the first constrained request pays it.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

import torch

from radixserve.grammar.backend import GrammarBackend, GrammarError, Matcher

CACHE_SIZE = 512
PARALLEL_MIN_ROWS = 4  # fewer constrained rows than this are filled in the calling thread
# Compact JSON with OpenAI's separators. The library default lets whitespace run anywhere, and a small
# model can then spend its whole budget on newlines inside a valid document.
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def grammar_source(kind: str, text: str) -> str:
    """The llguidance grammar for a (kind, text) pair; GrammarError for text that is not even parseable."""
    import llguidance
    try:
        if kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(text, defaults=JSON_OPTIONS)
        if kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(text)
        if kind == "ebnf":
            return llguidance.grammar_from("ebnf", text)
        if kind == "lark":
            return llguidance.LLMatcher.grammar_from_lark(text)
    except ValueError as e:
        raise GrammarError(str(e)) from None
    raise GrammarError(f"unknown grammar kind {kind!r}")


class LLGuidanceMatcher(Matcher):
    def __init__(self, m: Any) -> None:
        self.m, self.accepted = m, 0

    def accept(self, token: int) -> bool:
        ok = self.m.consume_token(token)
        self.accepted += ok
        return ok

    def rollback(self, num_tokens: int) -> None:
        if num_tokens > 0:
            self.m.rollback(num_tokens)
            self.accepted -= num_tokens

    @property
    def terminated(self) -> bool:
        return self.m.is_stopped()

    @property
    def failed(self) -> bool:
        return self.m.is_error()


class LLGuidanceBackend(GrammarBackend):
    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: list[int], threads: int | None = None,
                 parallel: bool = False) -> None:
        """`vocab_size`: the model's (logits width), which may exceed the tokenizer's; `eos_ids`: every
        id that ends a request, so a complete grammar lets the model stop with any of them. `parallel`:
        fill a batch's masks on llguidance's thread pool of `threads`; off (the default), they are filled
        one after the other in the calling thread. Serial is faster on both machines measured: on the
        2-core CPU host the pool waits for the cores torch's threads hold, and on the H200's 16-core host
        (8B preset, batch 64, a JSON schema per request) the decode step cost +1.8 % serial against +4.7 %
        with 4 pool threads and +27.6 % with 16, whose fills took 5.2 ms a step against 0.7 ms serial
        (benchmarks/results/grammar_overhead_h200_llama8b_bs64.json). The serial fill runs while the
        device computes the step's forward, so it is hidden as long as it is shorter."""
        self.tokenizer, self.vocab_size, self.eos_ids, self.threads = tokenizer, vocab_size, eos_ids, threads
        self.parallel = parallel
        self._lltok: Any = None
        self._executor: Any = None
        self._init_lock = threading.Lock()
        self.cache: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self.compiled = 0  # cache misses, for tests and stats

    @property
    def lltok(self) -> Any:
        with self._init_lock:  # warm_up may be building it in its thread
            if self._lltok is None:
                import llguidance
                import llguidance.hf
                if self.tokenizer is None:
                    raise GrammarError("constrained decoding needs the model's tokenizer; this model has none")
                if self.parallel:  # its threads exist only when used
                    self._executor = llguidance.LLExecutor(self.threads)
                # a tokenizer smaller than the model's vocabulary (a dummy-weight preset served with another
                # model's tokenizer) cannot name the model's stop ids: its own end-of-text id stands in
                known = [e for e in self.eos_ids if e < len(self.tokenizer)]
                if not known and getattr(self.tokenizer, "eos_token_id", None) is not None:
                    known = [self.tokenizer.eos_token_id]
                self._lltok = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=self.vocab_size,
                                                           eos_token=known or None)
        return self._lltok

    def warm_up(self) -> threading.Thread:
        """Build the token trie and fill one mask in a daemon thread (a no-op without a tokenizer)."""
        def work() -> None:
            if self.tokenizer is None:
                return
            m = self.matcher("json_schema", '{"type": "object"}')
            self.fill_bitmask([(m, 0)], torch.full((1, (self.vocab_size + 31) // 32), -1, dtype=torch.int32))
        t = threading.Thread(target=work, name="grammar-warm-up", daemon=True)
        t.start()
        return t

    def validate(self, kind: str, text: str) -> None:
        import llguidance
        is_error, msgs = llguidance.LLMatcher.validate_grammar_with_warnings(grammar_source(kind, text))
        if is_error:
            raise GrammarError(msgs[0] if msgs else "invalid grammar")

    def matcher(self, kind: str, text: str) -> Matcher:
        import llguidance
        key = (kind, text)
        base = self.cache.get(key)
        if base is None:
            base = llguidance.LLMatcher(self.lltok, grammar_source(kind, text), log_level=0)
            if base.is_error():
                raise GrammarError(base.get_error())
            self.compiled += 1
            self.cache[key] = base
            if len(self.cache) > CACHE_SIZE:
                self.cache.popitem(last=False)
        else:
            self.cache.move_to_end(key)
        return LLGuidanceMatcher(base.deep_copy())

    def fill_bitmask(self, matchers: list[tuple[Matcher, int]], bitmask: torch.Tensor) -> None:
        """Through llguidance's raw-pointer calls: its torch helpers module runs torch.compile at import,
        which costs seconds (and the compile stack's memory) in the scheduler process."""
        _ = self.lltok  # the executor is built with it
        assert bitmask.dtype == torch.int32 and bitmask.is_contiguous() and not bitmask.is_cuda
        pairs = [(m.m, row) for m, row in matchers if isinstance(m, LLGuidanceMatcher)]
        row_bytes = bitmask.shape[1] * 4
        if self.parallel and len(pairs) >= PARALLEL_MIN_ROWS:
            self._executor.unsafe_compute_mask_ptr(pairs, bitmask.data_ptr(), row_bytes, bitmask.shape[0])
            return
        for m, row in pairs:
            m.unsafe_compute_mask_ptr(bitmask[row].data_ptr(), row_bytes)
