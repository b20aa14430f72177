"""Parity with transformers for every architecture we serve: Llama (llama3 rope scaling), Qwen2 (QKV bias),
Qwen3 (q/k norm, tied embeddings) and Mistral (sliding window shorter than the prompts).

Each case saves a tiny random HF model (float32, safetensors, no tokenizer) and loads it through our own
stack (resolve_model -> ModelRunner -> Scheduler). The logits of every step (prefill chunks and decode) are
checked against one no-cache HF forward over the final sequence, and the greedy tokens, several prompts of
different lengths in one batch, against HF `generate(do_sample=False)` one prompt at a time.
"""
from __future__ import annotations

import os

import pytest
import torch
import transformers

from radixserve.args import ServerArgs
from radixserve.core import Req, SamplingParams
from radixserve.engine.model_runner import ModelRunner
from radixserve.scheduler.scheduler import Scheduler
from radixserve.weights.loader import resolve_model

VOCAB, NEW_TOKENS = 256, 16
PROMPT_LENS = (3, 11, 24, 37)  # 24 and 37 exceed Mistral's window (8) and the chunk size (8) of the paged run
COMMON = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 512,
          "rms_norm_eps": 1e-6, "initializer_range": 0.1, "bos_token_id": None, "eos_token_id": None,
          "pad_token_id": None}
CASES = {
    # original_max_position_embeddings 64 puts the 8 rotary frequencies of head_dim 16 in all three llama3
    # bands (kept, smoothed, divided by factor), so every branch of rope_inv_freq is compared.
    "llama": ("LlamaConfig", {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    "qwen2": ("Qwen2Config", {"rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0}}),
    "qwen3": ("Qwen3Config", {"tie_word_embeddings": True}),
    "mistral": ("MistralConfig", {"sliding_window": 8}),
}
TOL = 2e-5  # max |ours - HF| over logits, relative to the logits' max magnitude (float32 both sides)


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENS]


def _save_hf(name: str, path: str, **save_kwargs) -> torch.nn.Module:
    cls_name, extra = CASES[name]
    cfg = getattr(transformers, cls_name)(**COMMON, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # HF initialises biases to 0 and norms to 1: randomise them so loading them counts
        for pname, p in model.named_parameters():
            if pname.endswith("bias"):
                p.normal_(0.0, 0.2)
            elif "norm" in pname:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    model.save_pretrained(path, **save_kwargs)
    return model


def _hf_greedy(model: torch.nn.Module, prompt: list[int]) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, eos_token_id=None,
                             max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _hf_logits(model: torch.nn.Module, seq: list[int]) -> torch.Tensor:
    with torch.no_grad():  # no KV cache: an independent path from generate's
        return model(torch.tensor([seq]), use_cache=False).logits[0].float()


def _run_ours(path: str, prompts: list[list[int]], rounds: int = 1,
              **args) -> tuple[list[list[list[int]]], list, list[int]]:
    """Greedy tokens of `prompts` in one batch per round (a later round hits the radix cache), every
    step's logits as (round, prompt index, position, logits row), and each round's cached prompt tokens."""
    sargs = ServerArgs(model=path, device="cpu", dtype="float32", max_total_tokens=4096, cpu_weight_dtype="float32",
                       **args)
    runner = ModelRunner(sargs, resolve_model(path))
    sched = Scheduler(sargs, runner, tokenizer=None)
    steps: list = []
    forward = runner.forward

    def recording_forward(reqs: list[Req], is_decode: bool, **kw) -> torch.Tensor:  # kw: decode_tail
        logits = forward(reqs, is_decode, **kw)
        for row, r in enumerate(reqs):
            steps.append((cur_round, index[id(r)], r.kv_len + r.extend_len - 1, logits[row].clone()))
        return logits

    runner.forward = recording_forward
    outs, cached = [], []
    for cur_round in range(rounds):  # noqa: B007 (read by recording_forward)
        reqs = [Req(list(p), SamplingParams(temperature=0, max_new_tokens=NEW_TOKENS, ignore_eos=True))
                for p in prompts]
        index = {id(r): i for i, r in enumerate(reqs)}
        for r in reqs:
            sched.add_request(r)
        while any(not r.finished for r in reqs):
            sched.step()
        assert all(r.finish_reason.value == "length" and len(r.output_ids) == NEW_TOKENS for r in reqs)
        outs.append([list(r.output_ids) for r in reqs])
        cached.append(sum(r.cached_tokens for r in reqs))
    assert not sched.has_work and sched.allocator.free_tokens + sched.cache.evictable_size == \
        sched.allocator.capacity_tokens, "KV slots leaked"
    return outs, steps, cached


def _check_logits(hf_model: torch.nn.Module, prompts: list[list[int]], outs: list[list[int]],
                  steps: list) -> None:
    ref = [_hf_logits(hf_model, p + o) for p, o in zip(prompts, outs)]
    scale = max(float(r.abs().max()) for r in ref)
    assert scale > 1.0, "logits too flat to tell anything apart"
    worst = 0.0
    for _, i, pos, row in steps:
        worst = max(worst, float((row - ref[i][pos]).abs().max()))
    assert worst < TOL * scale, f"max |logit diff| {worst:.3g} (logit scale {scale:.3g})"
    assert len(steps) >= len(prompts) * NEW_TOKENS  # a row per sampled token at least (+ chunk ends)


@pytest.mark.parametrize("arch", list(CASES))
def test_matches_transformers(arch: str, tmp_path) -> None:
    hf = _save_hf(arch, str(tmp_path))
    assert not os.path.exists(tmp_path / "tokenizer.json")
    prompts = _prompts()
    want = [_hf_greedy(hf, p) for p in prompts]

    (got,), steps, _ = _run_ours(str(tmp_path), prompts)
    first_batch = [s[1:3] for s in steps[:len(prompts)]]  # all prompts prefilled together
    assert first_batch == [(i, n - 1) for i, n in enumerate(PROMPT_LENS)]
    assert got == want
    _check_logits(hf, prompts, got, steps)

    # paged KV (page 4) + chunked prefill (8 tokens per step), then the same batch again over the radix cache
    runs, steps, cached = _run_ours(str(tmp_path), prompts, rounds=2, page_size=4, chunked_prefill_size=8)
    assert runs == [want, want]
    _check_logits(hf, prompts, want, steps)
    assert len([s for s in steps if s[0] == 0]) > len(prompts) * NEW_TOKENS  # chunking split long prompts
    # round 2 reuses whole pages of each prompt but its last token: 0 + 8 + 20 + 36
    assert cached == [0, sum((n - 1) // 4 * 4 for n in PROMPT_LENS)]


def test_sharded_checkpoint(tmp_path) -> None:
    hf = _save_hf("qwen2", str(tmp_path), max_shard_size="40KB")
    shards = [f for f in os.listdir(tmp_path) if f.endswith(".safetensors")]
    assert len(shards) > 2 and os.path.exists(tmp_path / "model.safetensors.index.json")
    prompts = _prompts()
    (got,), steps, _ = _run_ours(str(tmp_path), prompts)
    assert got == [_hf_greedy(hf, p) for p in prompts]
    _check_logits(hf, prompts, got, steps)


def test_torch_compile_matches_transformers(tmp_path) -> None:
    """--enable-torch-compile: every decode step (batch 4 <= --torch-compile-max-bs) runs the Inductor
    graph, with attention as one opaque op; logits and tokens must still match HF."""
    from torch._dynamo.utils import counters

    hf = _save_hf("qwen3", str(tmp_path))
    prompts = _prompts()
    torch._dynamo.reset()
    counters.clear()
    (got,), steps, _ = _run_ours(str(tmp_path), prompts, enable_torch_compile=True, torch_compile_max_bs=4)
    assert got == [_hf_greedy(hf, p) for p in prompts]
    _check_logits(hf, prompts, got, steps)
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"], dict(counters)
