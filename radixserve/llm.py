"""Offline API: `LLM(model=None, **server_args).generate(prompts, sampling_params)`."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from radixserve.args import ServerArgs
from radixserve.core import Req, SamplingParams
from radixserve.engine_unit import Engine


@dataclass
class RequestOutput:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    cached_tokens: int
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


class LLM:
    def __init__(self, model: str | None = None, **server_args: Any) -> None:
        self.args = ServerArgs(model=model, **server_args)
        if self.args.dp_size > 1 or self.args.nnodes > 1:
            raise ValueError("the offline LLM API runs one in-process engine: --dp-size and --nnodes are for the "
                             "server (python -m radixserve)")
        self.engine = Engine(self.args)
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: str | list[int] | Sequence[str | list[int]],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        ids = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
        return self._run(ids, sampling_params)

    def chat(self, messages: list[dict] | Sequence[list[dict]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        convs = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        return self._run([self.engine.apply_chat_template(c) for c in convs], sampling_params)

    def _run(self, ids: list[list[int]], sp: SamplingParams | Sequence[SamplingParams] | None) -> list[RequestOutput]:
        params = list(sp) if isinstance(sp, (list, tuple)) else [sp or SamplingParams()] * len(ids)
        if len(params) != len(ids):
            raise ValueError(f"{len(params)} sampling params for {len(ids)} prompts")
        reqs = self.engine.run_to_completion([Req(i, p) for i, p in zip(ids, params)])
        return [RequestOutput(self.engine.output_text(r), list(r.output_ids), r.finish_reason.value,
                              len(r.origin_input_ids), r.cached_tokens,
                              r.output_logprobs or None, r.output_top_logprobs or None) for r in reqs]
