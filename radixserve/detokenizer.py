"""Incremental detokenization that never emits half a UTF-8 character.

Decoding token by token breaks multi-byte characters and merges (a space-prefixed token decodes
differently alone). We re-decode a short window of recent ids and only release text once it no
longer ends in the replacement character.
"""
from __future__ import annotations

import os
from typing import Any


def load_decoding_tokenizer(tokenizer_dir: str) -> Any:
    """The tokenizer the scheduler saved, for decoding only. A fast one (tokenizer.json) loads as
    PreTrainedTokenizerFast: decoding is that base class's for the fast tokenizers of the models served here
    (their subclasses change how text is encoded, not how ids are decoded), and importing it does not import
    torch, which AutoTokenizer's scan of transformers' model packages does: ~4 s of CPU in the detokenizer
    at start-up, while the scheduler loads its weights on the same cores. A slow-only tokenizer (no
    tokenizer.json) still goes through AutoTokenizer."""
    if os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json")):
        from transformers import PreTrainedTokenizerFast
        return PreTrainedTokenizerFast.from_pretrained(tokenizer_dir, local_files_only=True)
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)


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
