"""The offline API across processes: `LLM(model, tp_size=2)` and `dp_size=2` spawn rank processes, return the
same tokens and prompt logprobs as `tp_size=1` (greedy, float32), and leave no process behind after shutdown.

The model is test_distributed's tiny random Llama (4 heads, 2 KV heads: divisible by 2; SmolLM2's 9 heads are
not), so three engines load in seconds.
"""
from __future__ import annotations

import multiprocessing as mp

from conftest import alive
from test_distributed import tiny_model  # noqa: F401  (the fixture)

from radixserve import LLM, SamplingParams

PROMPTS = ["The quick brown fox", "Hello, my name is", "Once upon a time, " * 12, "1, 2, 3,"]
COMMON = {"device": "cpu", "max_total_tokens": 2048, "cpu_threads": 1, "chunked_prefill_size": 32}


def test_tp2_and_dp2_equal_tp1(tiny_model: str) -> None:  # noqa: F811
    # prompt logprobs from position 1 (the long prompt's span two chunks): every TP rank runs the LM head on them
    sp = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True, top_logprobs=2, logprob_start_len=1)
    ref = LLM(tiny_model, **COMMON).generate(PROMPTS, sp)
    for layout in ({"tp_size": 2}, {"dp_size": 2}):
        with LLM(tiny_model, **COMMON, **layout) as llm:
            pids = [p.pid for p in llm.ranks.procs]
            assert len(pids) == 2 and all(alive(p) for p in pids)
            out = llm.generate(PROMPTS, sp)
            chat = llm.chat([{"role": "user", "content": "Hi"}], sp)
        assert [o.token_ids for o in out] == [r.token_ids for r in ref], layout
        assert [o.text for o in out] == [r.text for r in ref]
        assert [o.finish_reason for o in out] == [r.finish_reason for r in ref]
        for o, r in zip(out, ref):
            assert len(o.prompt_logprobs) == o.prompt_tokens - 1 and o.prompt_logprobs[0] is None
            assert max(abs(a - b) for a, b in zip(o.prompt_logprobs[1:], r.prompt_logprobs[1:])) < 1e-4, layout
            assert [[t for t, _ in row] for row in o.prompt_top_logprobs[1:]] == \
                [[t for t, _ in row] for row in r.prompt_top_logprobs[1:]]
        assert len(chat[0].token_ids) == 12
        assert not any(alive(p) for p in pids), f"{layout}: rank processes outlived shutdown"
        assert not mp.active_children()
