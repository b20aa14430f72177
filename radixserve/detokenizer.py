"""Incremental detokenization that never emits half a UTF-8 character.

Decoding token by token breaks multi-byte characters and merges (a space-prefixed token decodes
differently alone). We re-decode a short window of recent ids and only release text once it no
longer ends in the replacement character.
"""
from __future__ import annotations

from typing import Any


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix_offset = self.read_offset = 0
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip)

    def add(self, new_ids: list[int], final: bool = False) -> str:
        """Append ids; return the newly stable text (everything left when `final`)."""
        self.ids.extend(new_ids)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if full.endswith("\ufffd") and not final:
            return ""
        delta = full[len(prefix):] if full.startswith(prefix) else full
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += delta
        return delta


def find_stop(text: str, stops: list[str], new_chars: int) -> int | None:
    """Index where the earliest stop string starts in `text`, looking only where the last
    `new_chars` characters could complete one; None if none does."""
    if not stops:
        return None
    start = max(0, len(text) - new_chars - max(len(s) for s in stops) + 1)
    hits = [i for s in stops if (i := text.find(s, start)) >= 0]
    return min(hits) if hits else None
