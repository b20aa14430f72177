"""GPU engine vs HF transformers built from the same preset with the same random weights (bf16).

Checks the whole fast path (Triton attention, CUDA graphs, paged KV) and its torch twin: logits
within bf16 tolerance at every position, and teacher-forced top-1 agreement over a few hundred
decode positions.
"""
from __future__ import annotations

import gc
import os

import pytest
import torch

from radixserve.args import ServerArgs
from radixserve.core import Req, SamplingParams
from radixserve.engine_unit import Engine

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
PRESET = os.environ.get("RADIXSERVE_GPU_TEST_PRESET", "qwen3-0.6b")
PROMPT, FORCED = 128, 256
MODES = {"triton+graphs": {}, "triton+graphs+compile": dict(enable_torch_compile=True, torch_compile_max_bs=4),
         "triton": dict(disable_cuda_graph=True),
         "torch": dict(attention_backend="torch", disable_cuda_graph=True)}


@pytest.fixture(scope="module")
def hf():
    from radixserve.bench.hf_baseline import build
    return build(PRESET, torch.bfloat16, "sdpa")


def make_engine(hf, **changes) -> Engine:
    engine = Engine(ServerArgs(model=PRESET, load_format="dummy", max_total_tokens=32768, page_size=16,
                               cuda_graph_max_bs=16, **changes))
    engine.runner.model.load_weights((k, v) for k, v in hf.state_dict().items())
    return engine


@pytest.mark.parametrize("mode", list(MODES))
def test_logits_and_teacher_forced_top1(hf, mode):
    from torch._dynamo.utils import counters
    counters.clear()
    engine = make_engine(hf, **MODES[mode])
    gen = torch.Generator().manual_seed(0)
    seq = torch.randint(10, hf.config.vocab_size - 10, (PROMPT + FORCED,), generator=gen).tolist()
    with torch.no_grad():  # the reference runs in fp32 on the same (bf16-valued) weights
        ref = hf.float()(torch.tensor([seq], device="cuda")).logits[0].float()  # [L, V]
        hf.bfloat16()
    sched = engine.scheduler
    req = Req(seq[:PROMPT], SamplingParams(temperature=0, max_new_tokens=FORCED + 1, ignore_eos=True))
    sched.add_request(req)
    batch = sched._schedule_prefill()
    # clone: a replayed graph returns a view of its static output buffer, rewritten by the next replay
    ours = [engine.runner.forward(batch, is_decode=False)[0].float().clone()]
    req.kv_len += req.extend_len
    sched.running.append(req)
    for i in range(FORCED):
        req.output_ids.append(seq[PROMPT + i])  # teacher forcing: feed the reference token
        engine.runner.last_token[req.req_pool_idx] = seq[PROMPT + i]
        batch = sched._schedule_decode()
        ours.append(engine.runner.forward(batch, is_decode=True)[0].float().clone())
        req.kv_len += 1
    assert engine.runner.used_graph == ("graphs" in mode)
    assert bool(counters["stats"]["unique_graphs"]) == ("compile" in mode)  # compiled graphs were captured
    sched.abort(req.rid)
    ours_t = torch.stack(ours)  # logits predicting positions PROMPT .. PROMPT+FORCED
    ref_t = ref[PROMPT - 1:PROMPT + FORCED]
    rels = (ours_t - ref_t).norm(dim=-1) / ref_t.norm(dim=-1)
    agree = (ours_t.argmax(-1) == ref_t.argmax(-1)).float().mean().item()
    top2 = ref_t.topk(2, dim=-1).values
    print(f"\n{PRESET} [{mode}]: rel err prefill {rels[0].item():.4f}, decode max {rels[1:].max().item():.4f} "
          f"median {rels[1:].median().item():.4f}; top-1 agreement {agree:.4f}; "
          f"median top-2 margin {(top2[:, 0] - top2[:, 1]).median().item():.4f}, logit std {ref_t.std().item():.3f}")
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    assert rels.max().item() < 0.05
    # Random weights give near-flat logits over a 150k vocab: the reference's top-2 margin is often
    # below bf16 rounding (measured: median margin 0.10, per-logit error ~0.01), so plain top-1
    # agreement tops out near 95% for any bf16 engine. Where the margin exceeds 4x the per-logit RMS
    # error the top-1 choice is decided by the model, not by rounding: require agreement there.
    rms_err = (ours_t - ref_t).pow(2).mean(-1).sqrt()
    decided = (top2[:, 0] - top2[:, 1]) > 4 * rms_err
    decided_agree = (ours_t.argmax(-1) == ref_t.argmax(-1))[decided].float().mean().item()
    print(f"  decided positions {int(decided.sum())}/{len(decided)}: top-1 agreement {decided_agree:.4f}")
    assert decided.float().mean().item() > 0.5
    assert decided_agree >= 0.98
    assert agree >= 0.90


@pytest.mark.parametrize("mode", ["overlap+graphs", "piecewise"])
def test_prompt_logprobs(hf, mode):
    """Prompt logprobs through the scheduler on the GPU (overlap scheduling: the values cross to the host behind
    the next step; decode in CUDA graphs; or extend in piecewise graphs): equal to HF's fp32 log_softmax on
    the same weights within bf16 noise, over a prompt in two chunks, beside a request that asks for none, and
    again from the radix cache."""
    changes = {"overlap+graphs": {}, "piecewise": dict(enable_piecewise_cuda_graph=True,
                                                       piecewise_cuda_graph_max_tokens=128)}[mode]
    engine = make_engine(hf, chunked_prefill_size=64, **changes)
    gen = torch.Generator().manual_seed(1)
    seq = torch.randint(10, hf.config.vocab_size - 10, (PROMPT,), generator=gen).tolist()
    with torch.no_grad():
        lp = torch.log_softmax(hf.float()(torch.tensor([seq], device="cuda")).logits[0, :-1].float(), dim=-1)
        hf.bfloat16()
    ref = lp.gather(1, torch.tensor(seq[1:], device="cuda")[:, None]).squeeze(1).cpu()
    sched = engine.scheduler
    assert sched.overlap
    for _ in range(2):  # the second time the prompt is in the radix cache
        asks = Req(list(seq), SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True, top_logprobs=2,
                                             logprob_start_len=3))
        plain = Req(list(seq), SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True))
        for r in (asks, plain):
            sched.add_request(r)
        while sched.has_work:
            sched.step()
        err = (torch.tensor(asks.input_logprobs) - ref[3:]).abs()
        print(f"\n{PRESET} [{mode}] prompt logprobs: max abs err {err.max().item():.4f}, mean {err.mean().item():.4f}")
        assert len(asks.input_logprobs) == len(asks.input_top_logprobs) == PROMPT - 1 - 3
        assert err.max().item() < 0.1 and err.mean().item() < 0.02  # H200, qwen3-0.6b: 0.025 and 0.007
        assert plain.input_logprobs == [] and asks.cached_tokens <= 3 and len(asks.output_ids) == 4
    if mode == "piecewise":
        assert engine.runner.piecewise.replays > 0
    del engine
    gc.collect()
    torch.cuda.empty_cache()
