"""Loading the tokenizer the scheduler saves for the API server and the detokenizer, without transformers'
Auto classes where the result is the same.

The first AutoTokenizer call in a process scans every model package transformers ships and imports torch:
~4 s of CPU on the 2-core test machine (4.3 s against 1.7 s to a loaded tokenizer, measured), paid while the
scheduler loads its weights on the same cores (the detokenizer) or between the scheduler's Ready and the
server's first answer (the API server). `PreTrainedTokenizerFast` (transformers' `TokenizersBackend`)
over the saved tokenizer.json needs neither.
  * For decoding, a fast tokenizer always loads that way: the subclasses of the models served here change
    how text is encoded, not how ids are decoded.
  * For encoding and chat templates, only when the saved tokenizer_config.json names that class, i.e. when
    AutoTokenizer would build exactly this object; any other class still goes through AutoTokenizer.
"""
from __future__ import annotations

import json
import os
from typing import Any

BASE_CLASSES = ("PreTrainedTokenizerFast", "TokenizersBackend")


def _saved_class(tokenizer_dir: str) -> str | None:
    try:
        with open(os.path.join(tokenizer_dir, "tokenizer_config.json")) as f:
            return json.load(f).get("tokenizer_class")
    except (OSError, ValueError):
        return None


def load_saved_tokenizer(tokenizer_dir: str, decode_only: bool = False) -> Any:
    """The tokenizer in `tokenizer_dir` (as save_pretrained wrote it); see the module docstring for when it
    skips AutoTokenizer."""
    fast = os.path.isfile(os.path.join(tokenizer_dir, "tokenizer.json"))
    if fast and (decode_only or _saved_class(tokenizer_dir) in BASE_CLASSES):
        from transformers import PreTrainedTokenizerFast
        return PreTrainedTokenizerFast.from_pretrained(tokenizer_dir, local_files_only=True)
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)


def preload() -> None:
    """Import transformers' tokenizer class now: the API server and the detokenizer call this while the
    scheduler loads the model, so that load_saved_tokenizer, once the scheduler is ready, does not spend
    ~1.2 s importing it on the way to /health. Not on a thread: transformers' lazy module is not safe to
    import from two threads at once (a concurrent `from transformers import AutoConfig` failed)."""
    from transformers import PreTrainedTokenizerFast  # noqa: F401
