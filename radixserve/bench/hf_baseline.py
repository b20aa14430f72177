"""HF transformers baseline on the same preset and the same kind of workload, measured in the same
run as our engine: eager `generate` at batch 1 and its continuous batching `generate_batch`.

    python -m radixserve.bench.hf_baseline --model llama-3.1-8b --mode generate --output hf_bs1.json
    python -m radixserve.bench.hf_baseline --model llama-3.1-8b --mode cb --num-prompts 64 --output hf_cb.json
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from radixserve.bench.roofline import record
from radixserve.weights.loader import load_hf_config, resolve_model


def build(model: str, dtype: torch.dtype, attn: str):
    from transformers import AutoModelForCausalLM
    cfg = load_hf_config(resolve_model(model))
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation=attn)
    return m.eval()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser("python -m radixserve.bench.hf_baseline")
    p.add_argument("--model", default="llama-3.1-8b")
    p.add_argument("--mode", choices=["generate", "cb"], default="generate")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--num-prompts", type=int, default=64, help="cb mode: requests (inputs uniform in [100, 1024])")
    p.add_argument("--cb-output-len", type=int, default=562, help="cb mode: new tokens per request "
                   "(HF takes one max_new_tokens for all; 562 is the minisgl workload's mean)")
    p.add_argument("--output")
    a = p.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    from transformers import GenerationConfig
    if a.mode == "generate":
        m = build(a.model, torch.bfloat16, "sdpa")
        ids = torch.randint(10, m.config.vocab_size - 10, (1, a.input_len), generator=gen).cuda()
        kw = dict(do_sample=False, min_new_tokens=a.output_len, max_new_tokens=a.output_len, pad_token_id=0)
        m.generate(ids, **{**kw, "min_new_tokens": 4, "max_new_tokens": 4})
        torch.cuda.synchronize()
        t = time.perf_counter()
        m.generate(ids, **kw)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        fig = {"mode": "generate", "batch_size": 1, "input_len": a.input_len, "output_len": a.output_len,
               "output_tok_per_s": a.output_len / dt, "itl_s": dt / a.output_len}
    else:
        attn = "paged|sdpa"
        try:
            m = build(a.model, torch.bfloat16, attn)
        except (ValueError, KeyError):
            attn = "sdpa"
            m = build(a.model, torch.bfloat16, attn)
        lens = torch.randint(100, 1025, (a.num_prompts,), generator=gen).tolist()
        inputs = [torch.randint(10, m.config.vocab_size - 10, (n,), generator=gen).tolist() for n in lens]
        gc = GenerationConfig(max_new_tokens=a.cb_output_len, min_new_tokens=a.cb_output_len, do_sample=False,
                              eos_token_id=-1, pad_token_id=0)
        m.generate_batch(inputs[:4], generation_config=gc, max_new_tokens=8)
        t = time.perf_counter()
        out = m.generate_batch(inputs, generation_config=gc)
        dt = time.perf_counter() - t
        produced = sum(len(o.generated_tokens) for o in out.values())
        fig = {"mode": "continuous_batching", "attn_implementation": attn, "num_prompts": a.num_prompts,
               "input_tokens": sum(lens), "output_tokens": produced, "wall_s": dt,
               "output_tok_per_s": produced / dt}
    out = record(a.output, {"model": a.model, "framework": "transformers", **fig}, "cuda")
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
