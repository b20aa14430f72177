"""saved_tokenizer.load_saved_tokenizer (what the API server and the detokenizer load the scheduler's saved
tokenizer with) against transformers' AutoTokenizer on the same directory: identical decode of random ids
(special tokens included, skipped or not) and identical incremental text for multi-byte output; for the API
server's path also identical encoding and chat template, and AutoTokenizer's own class whenever the saved
class is not the base one. Tokenizers: the bundled SmolLM2 one, and the same with Llama-3-style special
tokens and a non-special added token."""
from __future__ import annotations

import json
import os
import random

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from radixserve.detokenizer import IncrementalDetokenizer
from radixserve.saved_tokenizer import load_saved_tokenizer


@pytest.fixture(scope="module")
def bundled_dir(tmp_path_factory):
    from radixserve.weights.loader import load_tokenizer, resolve_model
    d = tmp_path_factory.mktemp("bundled_tok")
    load_tokenizer(resolve_model(None)).save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def special_dir(tmp_path_factory, bundled_dir):
    tok = AutoTokenizer.from_pretrained(bundled_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|eot_id|>", "<|start_header_id|>"]})
    tok.add_tokens(["<tool_call>"])  # an added token that is not special
    d = tmp_path_factory.mktemp("special_tok")
    tok.save_pretrained(d)
    return str(d)


@pytest.mark.parametrize("which", ["bundled_dir", "special_dir"])
@pytest.mark.parametrize("decode_only", [True, False])
def test_saved_tokenizer_behaves_as_auto_tokenizer(which, decode_only, request):
    d = request.getfixturevalue(which)
    ours, auto = load_saved_tokenizer(d, decode_only=decode_only), AutoTokenizer.from_pretrained(d)
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
    if not decode_only:
        assert ours.encode(text) == auto.encode(text) and ours.encode(text, add_special_tokens=False) == ids
        chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
        assert ours.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == \
            auto.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)


def test_other_saved_classes_still_go_through_auto_tokenizer(tmp_path, bundled_dir):
    """A saved class that is not the base one (a model-specific tokenizer) is built by AutoTokenizer for the
    API server; the detokenizer still decodes with the base class."""
    for f in os.listdir(bundled_dir):
        with open(os.path.join(bundled_dir, f), "rb") as src, open(tmp_path / f, "wb") as dst:
            dst.write(src.read())
    cfg_path = tmp_path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "GPT2Tokenizer"
    cfg_path.write_text(json.dumps(cfg))
    assert type(load_saved_tokenizer(str(tmp_path))) is type(AutoTokenizer.from_pretrained(str(tmp_path)))
    assert type(load_saved_tokenizer(str(tmp_path))) is not PreTrainedTokenizerFast
    assert type(load_saved_tokenizer(str(tmp_path), decode_only=True)) is PreTrainedTokenizerFast
