"""The detokenizer process's tokenizer (detokenizer.load_decoding_tokenizer) against transformers'
AutoTokenizer on the same saved directory, the way the scheduler saves it for the other processes:
identical decode of random ids (special tokens included, skipped or not) and identical incremental text
for multi-byte output, for the bundled SmolLM2 tokenizer and a Llama-3-style one built with added special
tokens."""
from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from radixserve.detokenizer import IncrementalDetokenizer, load_decoding_tokenizer


@pytest.fixture(scope="module")
def bundled_dir(tmp_path_factory):
    from radixserve.weights.loader import load_tokenizer, resolve_model
    d = tmp_path_factory.mktemp("bundled_tok")
    load_tokenizer(resolve_model(None)).save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def special_dir(tmp_path_factory, bundled_dir):
    """The bundled tokenizer with Llama-3-style special tokens added and a tokenizer_class of its own."""
    tok = AutoTokenizer.from_pretrained(bundled_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|eot_id|>", "<|start_header_id|>"]})
    tok.add_tokens(["<tool_call>"])  # an added token that is not special
    d = tmp_path_factory.mktemp("special_tok")
    tok.save_pretrained(d)
    return str(d)


@pytest.mark.parametrize("which", ["bundled_dir", "special_dir"])
def test_decoding_tokenizer_decodes_as_auto_tokenizer(which, request):
    d = request.getfixturevalue(which)
    ours, auto = load_decoding_tokenizer(d), AutoTokenizer.from_pretrained(d)
    from transformers import PreTrainedTokenizerFast
    assert type(ours) is PreTrainedTokenizerFast
    rng = random.Random(0)
    n = len(auto)
    specials = auto.all_special_ids + [n - 1]
    for _ in range(200):
        ids = [rng.randrange(n) for _ in range(rng.randrange(1, 24))] + rng.sample(specials, 2)
        rng.shuffle(ids)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == auto.decode(ids, skip_special_tokens=skip), ids
    text = "Grüße, 東京 — naïve café ☕ <|eot_id|> <tool_call> ok"
    ids = auto.encode(text, add_special_tokens=False)
    for skip in (True, False):
        a, b = IncrementalDetokenizer(ours, skip), IncrementalDetokenizer(auto, skip)
        assert [a.add([i]) for i in ids] == [b.add([i]) for i in ids]
        assert a.text == b.text and a.text
