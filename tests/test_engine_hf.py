"""The engine against HF transformers on the same bundled GGUF weights (float32 on CPU).

Greedy tokens must be equal whatever the batching, chunking and page size; last-position logits
must be close (max |diff| < 2e-3 on logits of magnitude ~10-30: float32 summation order only). HF's greedy
tokens come from full-sequence forwards that verify a draft (hf_greedy_tokens): the same tokens as
generate(), measured equal on these prompts, in one forward per prompt instead of 32 decode steps.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from radixserve.args import ServerArgs
from radixserve.core import Req, SamplingParams
from radixserve.engine_unit import Engine
from radixserve.scheduler.scheduler import Scheduler

NEW_TOKENS = 32
PLAIN = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village,",
         "1, 2, 3, 4, 5,"]
CHAT = ["What is the capital of France?", "Write a haiku about the sea.", "Explain what a GPU is in one sentence.",
        "List three primary colors."]


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(ServerArgs(device="cpu", max_total_tokens=8192, seed=0, cpu_weight_dtype="float32"))


@pytest.fixture(scope="module")
def prompts(engine: Engine) -> list[list[int]]:
    tok = engine.tokenizer
    return [tok.encode(p) for p in PLAIN] + [engine.apply_chat_template([{"role": "user", "content": c}])
                                             for c in CHAT]


@pytest.fixture(scope="module")
def hf_model(hf_gguf_model):
    return hf_gguf_model  # conftest's session fixture: transformers loads the GGUF once for the suite


def hf_greedy_tokens(hf_model, ids: list[int], n: int, draft: list[int]) -> list[int]:
    """HF's greedy continuation of `ids` (n tokens), from full-sequence forwards: each forward takes the longest
    prefix of `draft` that equals HF's argmax at every position, plus HF's own argmax token after it. Every
    returned token is HF's argmax given the tokens before it, so the result does not depend on the draft; a
    draft that is already HF's greedy output costs one forward instead of n decode steps of generate()."""
    out, guess = [], list(draft[:n])
    while len(out) < n:
        with torch.no_grad():
            logits = hf_model(torch.tensor([ids + out + guess])).logits[0, len(ids) + len(out) - 1:]
        pred = logits.argmax(-1).tolist()  # HF's next token after each prefix: len(guess) + 1 of them
        k = next((i for i, (g, p) in enumerate(zip(guess, pred)) if g != p), len(guess))
        out += pred[:k + 1]  # the agreeing draft tokens (== HF's) and HF's token at the first disagreement
        guess = []  # past a disagreement the draft is conditioned on a wrong token: one token per forward
    return out[:n]


@pytest.fixture(scope="module")
def batched(engine, prompts) -> list[list[int]]:
    """The engine's greedy tokens for the whole batch (mode "batched"), computed once: the test of that mode
    checks them, and hf_greedy verifies them as its draft."""
    return run(engine, prompts)


@pytest.fixture(scope="module")
def hf_greedy(hf_model, prompts, batched) -> list[list[int]]:
    # the engine's tokens are only a draft to verify: a wrong one costs more forwards, not a wrong reference
    return [hf_greedy_tokens(hf_model, ids, NEW_TOKENS, d) for ids, d in zip(prompts, batched)]


def run(engine: Engine, prompts: list[list[int]], one_at_a_time: bool = False, new_tokens: int = NEW_TOKENS,
        **changes) -> list[list[int]]:
    args = dataclasses.replace(engine.args, **changes)
    sched = Scheduler(args, engine.runner, engine.tokenizer)
    sp = SamplingParams(temperature=0, max_new_tokens=new_tokens, ignore_eos=True)
    reqs = [Req(list(p), sp) for p in prompts]
    for r in reqs:
        sched.add_request(r)
        while one_at_a_time and not r.finished:
            sched.step()
    while sched.has_work:
        sched.step()
    assert sched.allocator.free_tokens + sched.cache.total_size == sched.allocator.capacity_tokens
    sched.cache.evict(1 << 30)
    assert sched.allocator.free_tokens == sched.allocator.capacity_tokens, "KV pages leaked"
    return [r.output_ids for r in reqs]


@pytest.mark.parametrize("mode", ["one_at_a_time", "batched", "chunked16", "page16", "page16_chunked16_naive"])
def test_greedy_matches_hf(engine, prompts, hf_greedy, batched, mode):
    # batched is the module's fixture (HF's greedy draft, 32 tokens); every other mode runs the batch again, one
    # float32 decode step a token (one_at_a_time: 8 of them), so it compares the first NEW_TOKENS // 2 of HF's
    # tokens: every prompt (5-40 tokens) + 16 still crosses a 16-token page, chunking acts on the prompts
    half = NEW_TOKENS // 2
    changes = {"one_at_a_time": dict(one_at_a_time=True, new_tokens=half), "batched": {},
               "chunked16": dict(chunked_prefill_size=16, new_tokens=half),
               "page16": dict(page_size=16, new_tokens=half),
               "page16_chunked16_naive": dict(page_size=16, chunked_prefill_size=16, cache="naive",
                                              new_tokens=half)}[mode]
    n = changes.get("new_tokens", NEW_TOKENS)
    assert (batched if mode == "batched" else run(engine, prompts, **changes)) == [h[:n] for h in hf_greedy]


def test_prefix_cache_reuse_keeps_output(engine, prompts, hf_greedy):
    """Run the batch twice on one scheduler: the second pass hits the radix cache and must not change.
    (NEW_TOKENS // 2 tokens a pass: the cache hit is on the prompt, the first tokens after it tell.)"""
    args = dataclasses.replace(engine.args, page_size=4)
    sched = Scheduler(args, engine.runner, engine.tokenizer)
    sp = SamplingParams(temperature=0, max_new_tokens=NEW_TOKENS // 2, ignore_eos=True)
    for _ in range(2):
        reqs = [Req(list(p), sp) for p in prompts]
        for r in reqs:
            sched.add_request(r)
        while sched.has_work:
            sched.step()
        assert [r.output_ids for r in reqs] == [h[:NEW_TOKENS // 2] for h in hf_greedy]
    assert all(r.cached_tokens >= len(p) - 4 for r, p in zip(reqs, prompts))


def test_logits_close_to_hf(engine, prompts, hf_model):
    sched = Scheduler(engine.args, engine.runner, engine.tokenizer)
    for ids in prompts[:3]:
        req = Req(list(ids), SamplingParams(temperature=0, max_new_tokens=1))
        sched.add_request(req)
        batch = sched._schedule_prefill()
        ours = engine.runner.forward(batch, is_decode=False)[0]
        req.kv_len += req.extend_len
        sched.running.append(req)
        sched.abort(req.rid)
        with torch.no_grad():
            ref = hf_model(torch.tensor([ids])).logits[0, -1].float()
        assert (ours - ref).abs().max().item() < 2e-3
        assert ours.argmax() == ref.argmax()
    sched.cache.evict(1 << 30)
    assert sched.allocator.free_tokens == sched.allocator.capacity_tokens


def test_offline_api_chat(engine):
    from radixserve import LLM
    llm = LLM.__new__(LLM)  # reuse the loaded engine: LLM() itself is exercised by the docs command
    llm.args, llm.engine, llm.tokenizer, llm.ranks = engine.args, engine, engine.tokenizer, None
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(temperature=0, max_new_tokens=24))[0]
    assert "Paris" in out.text and out.finish_reason == "stop" and out.prompt_tokens > 10
    outs = llm.generate(["1, 2, 3,", [1, 2, 3]], [SamplingParams(temperature=0, max_new_tokens=4),
                                                   SamplingParams(temperature=0, max_new_tokens=3)])
    assert [len(o.token_ids) for o in outs] == [4, 3] and outs[0].finish_reason == "length"


# ---- prompt logprobs (SamplingParams.logprob_start_len) ------------------------------------------------------
PROMPT_LP_TOL = 1e-3  # abs, on log_softmax values of magnitude ~1-20 (float32; measured ~3e-5)


@pytest.fixture(scope="module")
def hf_prompt_logprobs(hf_model, prompts) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per prompt: HF's logprob of token p + 1 at every position p, and its top-3 token ids there."""
    out = []
    for ids in prompts:
        with torch.no_grad():
            lp = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0, :-1].float(), dim=-1)
        out.append((lp.gather(1, torch.tensor(ids[1:])[:, None]).squeeze(1), lp.topk(3, dim=-1).indices))
    return out


def check_prompt_logprobs(req: Req, ref: tuple[torch.Tensor, torch.Tensor]) -> None:
    s = req.sampling_params.logprob_start_len
    vals, top = ref
    assert len(req.input_logprobs) == len(req.origin_input_ids) - 1 - s
    assert (torch.tensor(req.input_logprobs) - vals[s:]).abs().max().item() < PROMPT_LP_TOL
    assert [[t for t, _ in row] for row in req.input_top_logprobs] == top[s:].tolist()
    assert all(row[0][1] >= lp - 1e-6 for row, lp in zip(req.input_top_logprobs, req.input_logprobs))


@pytest.mark.parametrize("mode", ["batched", "page4_chunked16_overlap", "chunked16_mixed"])
def test_prompt_logprobs_match_hf(engine, prompts, hf_greedy, hf_prompt_logprobs, mode):
    """Prompt logprobs equal HF's log_softmax at the asked positions (start 0 and > 0, top-3 ids equal), in a
    batch where other requests ask for none; the same prompts again hit the radix cache, which must be capped
    so the positions are recomputed; every request's greedy tokens stay HF's."""
    changes = {"batched": {},  # the chat prompts (30-40 tokens) span two or three 16-token chunks:
               "page4_chunked16_overlap": dict(page_size=4, chunked_prefill_size=16, enable_overlap_schedule=True),
               "chunked16_mixed": dict(chunked_prefill_size=16, enable_mixed_chunk=True)}[mode]
    sched = Scheduler(dataclasses.replace(engine.args, **changes), engine.runner, engine.tokenizer)
    # the chunked modes take two plain and two chat prompts (16-token chunks make many CPU steps)
    chosen = range(len(prompts)) if mode == "batched" else [0, 1, len(PLAIN), len(PLAIN) + 1]
    for rnd in range(2):  # the second round finds every prompt in the radix cache
        reqs, refs = [], []
        for i, ids in ((i, prompts[i]) for i in chosen):
            for start in (-1, 0, 3)[i % 2:]:  # -1: a request that asks for none, beside ones that do
                sp = SamplingParams(temperature=0, max_new_tokens=2, ignore_eos=True, logprobs=start >= 0,
                                    top_logprobs=3 if start >= 0 else 0, logprob_start_len=start)
                reqs.append(Req(list(ids), sp))
                refs.append(i)
        for r in reqs:
            sched.add_request(r)
        while sched.has_work:
            sched.step()
        for r, i in zip(reqs, refs):
            assert r.output_ids == hf_greedy[i][:2], (mode, rnd, i)
            if r.sampling_params.logprob_start_len < 0:
                assert r.input_logprobs == [] and (rnd == 0 or r.cached_tokens >= len(prompts[i]) - 8)
            else:
                check_prompt_logprobs(r, hf_prompt_logprobs[i])
                assert r.cached_tokens <= r.sampling_params.logprob_start_len
    sched.cache.evict(1 << 30)
    assert sched.allocator.free_tokens == sched.allocator.capacity_tokens, "KV pages leaked"


def test_prompt_logprobs_without_output(engine, prompts, hf_prompt_logprobs):
    """max_new_tokens 0 with prompt logprobs (scoring a text): a prefill that keeps no token."""
    sched = Scheduler(engine.args, engine.runner, engine.tokenizer)
    req = Req(list(prompts[2]), SamplingParams(max_new_tokens=0, top_logprobs=3, logprob_start_len=0))
    sched.add_request(req)
    while sched.has_work:
        sched.step()
    assert req.finish_reason.value == "length" and req.output_ids == [] and req.output_logprobs == []
    check_prompt_logprobs(req, hf_prompt_logprobs[2])
    with pytest.raises(ValueError, match="logprob_start_len"):
        sched.add_request(Req(list(prompts[2]), SamplingParams(logprob_start_len=len(prompts[2]))))
    with pytest.raises(ValueError, match="logprob_start_len"):
        SamplingParams(logprob_start_len=-2)
    sched.cache.evict(1 << 30)
    assert sched.allocator.free_tokens == sched.allocator.capacity_tokens
