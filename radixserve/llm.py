"""Offline API: `LLM(model=None, **server_args).generate(prompts, sampling_params)`.

At tp_size = dp_size = 1 the engine runs in this process. `LLM(model, tp_size=N, dp_size=D)` spawns D x N rank
processes (llm_ranks.py) that live until `shutdown()` (or the end of a `with` block); this process then holds
only the tokenizer.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from radixserve.args import ServerArgs
from radixserve.core import Req, SamplingParams
from radixserve.engine_unit import Engine
from radixserve.llm_ranks import RankPool
from radixserve.weights.loader import load_tokenizer, resolve_model


@dataclass
class RequestOutput:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    cached_tokens: int
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    # SamplingParams.logprob_start_len = s >= 0: one entry per prompt token from s, None for the first (nothing
    # before it is computed), then the logprob of each token given the ones before it; top rows likewise
    prompt_logprobs: list[float | None] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None


def prompt_logprobs(req: Req) -> tuple[list[float | None] | None, list[list[tuple[int, float]] | None] | None]:
    """RequestOutput's prompt fields of a finished request (rank processes build them too)."""
    if req.sampling_params.logprob_start_len < 0:
        return None, None
    tops = [None, *req.input_top_logprobs] if req.sampling_params.top_logprobs else None
    return [None, *req.input_logprobs], tops


class LLM:
    def __init__(self, model: str | None = None, **server_args: Any) -> None:
        self.args = ServerArgs(model=model, **server_args)
        self.ranks: RankPool | None = None
        self.engine: Engine | None = None
        if self.args.tp_size > 1 or self.args.dp_size > 1 or self.args.nnodes > 1:
            self.ranks = RankPool(self.args)
            self.tokenizer = load_tokenizer(resolve_model(self.args.model), self.args.tokenizer_path)
        else:
            self.engine = Engine(self.args)
            self.tokenizer = self.engine.tokenizer

    def shutdown(self) -> None:
        """Stop the rank processes (tp_size or dp_size > 1); a no-op for the in-process engine."""
        if self.ranks is not None:
            self.ranks.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def generate(self, prompts: str | list[int] | Sequence[str | list[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        ids = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        return self._run(ids, sampling_params)

    def chat(self, messages: list[dict] | Sequence[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        return self._run([self._chat_ids(c) for c in convs], sampling_params)

    def _chat_ids(self, messages: list[dict]) -> list[int]:
        if self.engine is not None:
            return self.engine.apply_chat_template(messages)
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)

    def _run(self, ids: list[list[int]], sp: SamplingParams | Sequence[SamplingParams] | None) -> list[RequestOutput]:
        params = list(sp) if isinstance(sp, (list, tuple)) else [sp or SamplingParams()] * len(ids)
        if len(params) != len(ids):
            raise ValueError(f"{len(params)} sampling params for {len(ids)} prompts")
        if self.ranks is not None:
            return [RequestOutput(*r) for r in self.ranks.run(list(zip(ids, params)))]
        reqs = self.engine.run_to_completion([Req(i, p) for i, p in zip(ids, params)])
        return [RequestOutput(self.engine.output_text(r), list(r.output_ids), r.finish_reason.value,
                              len(r.origin_input_ids), r.cached_tokens,
                              r.output_logprobs or None, r.output_top_logprobs or None, *prompt_logprobs(r))
                for r in reqs]
