"""OpenAI API: /v1/chat/completions and /v1/completions (streamed or not, n choices, logprobs, echo,
usage with cached tokens), plus SGLang's extra sampling fields.

`echo` with `logprobs` on /v1/completions returns the prompt's logprobs before the output's, in OpenAI's
layout: the prompt's tokens, their logprobs (null for the first, which nothing predicts) and top_logprobs
(null there too), text offsets into the echoed text. A stream sends the prompt part with the echoed text, in
each choice's first chunk (as vLLM does). Under PD disaggregation it is refused: no one server has both the
prompt's logits and the output.
"""
from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from jinja2 import TemplateError

from radixserve.args import ServerArgs
from radixserve.core import SamplingParams
from radixserve.server.base import ApiBase, Choice, PromptPart, chain, json_response, prompt_parts, sse, usage
from radixserve.server.messages import StrOut
from radixserve.server.protocol import ChatCompletionRequest, CompletionRequest, unserved_field
from radixserve.server.structured import ChoiceStream, Structured, finish_reason, log_request
from radixserve.server.tokenizer_manager import RequestError, TokenizerManager


class OpenAIApi(ApiBase):
    def __init__(self, tm: TokenizerManager, args: ServerArgs) -> None:
        super().__init__(tm, args)
        self.structured = Structured(args, self.tokenizer, self.info["vocab_size"])

    def check_unserved(self, body: Any) -> None:
        bad = unserved_field(body)
        if bad is not None:
            raise RequestError(f"'{bad[0]}' is not supported by radixserve: {bad[1]}.", param=bad[0],
                               code="unsupported_parameter")

    # ---- logprobs ----
    def chat_logprobs(self, ids: list[int], lps: list[float], tops: list[list[tuple[int, float]]]) -> dict:
        def entry(t: int, lp: float) -> dict:
            s = self.token_str(t)
            return {"token": s, "logprob": lp, "bytes": list(s.encode())}
        tops = tops + [[]] * (len(ids) - len(tops))
        return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, b) for a, b in top]}
                            for t, lp, top in zip(ids, lps, tops)]}

    def completion_logprobs(self, ids: list[int], lps: list[float], tops: list[list[tuple[int, float]]],
                            offset: int) -> dict:
        toks = [self.token_str(t) for t in ids[:len(lps)]]
        offsets = []
        for s in toks:
            offsets.append(offset)
            offset += len(s)
        top = [{self.token_str(a): b for a, b in row} for row in tops] if tops else None
        return {"tokens": toks, "token_logprobs": lps, "top_logprobs": top, "text_offset": offsets}

    def echo_logprobs(self, ids: list[int], part: PromptPart | None, want_top: bool, out: dict | None = None) -> dict:
        """The prompt's entries (`part`: its logprobs from the engine), followed by those of `out` (the
        output's completion_logprobs, whose offsets continue after the echoed text)."""
        vals, tops = part or ([], None)
        toks = [self.token_str(t) for t in ids]
        offsets, at = [], 0
        for s in toks:
            offsets.append(at)
            at += len(s)
        lps = [None, *vals] + [None] * (len(ids) - 1 - len(vals))  # (short only if aborted mid-prefill)
        top = None
        if want_top:
            rows: list[dict | None] = [{self.token_str(a): b for a, b in row} for row in tops or []]
            top = [None, *rows] + [None] * (len(ids) - 1 - len(rows))
        lp = {"tokens": toks, "token_logprobs": lps, "top_logprobs": top, "text_offset": offsets}
        if out is not None:
            lp["tokens"] = toks + out["tokens"]
            lp["token_logprobs"] = lps + out["token_logprobs"]
            lp["text_offset"] = offsets + out["text_offset"]
            if top is not None or out["top_logprobs"] is not None:
                lp["top_logprobs"] = (top or [None] * len(ids)) + (out["top_logprobs"] or [None] * len(out["tokens"]))
        return lp

    # ---- /v1/chat/completions ----
    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        self.check_model(body.model)
        self.check_unserved(body)
        self.check_gateway_fields(body)
        cont = body.continue_final_message  # extend the last assistant message: no new generation prompt
        if body.top_logprobs and not body.logprobs:
            raise RequestError("top_logprobs requires logprobs=true", param="top_logprobs")
        try:
            plan = self.structured.chat_plan(body)  # tools, grammar, logit_bias: 400s before the template runs
            msgs = plan.messages
            out = await self.off_loop(sum(len(str(m_.get("content") or "")) for m_ in msgs),
                                      lambda: self.tokenizer.apply_chat_template(
                                          msgs, add_generation_prompt=not cont, continue_final_message=cont,
                                          **plan.template_kwargs,
                                          tokenize=True), param="messages")
        except (TemplateError, ValueError, TypeError, KeyError) as e:  # e.g. roles out of order
            raise RequestError(f"the chat template rejected the messages: {e}", param="messages") from None
        ids = list(out["input_ids"] if hasattr(out, "keys") else out)
        self.check_prompt_len([ids], "messages")
        max_new = body.max_completion_tokens or body.max_tokens or self.default_max_tokens(len(ids))
        top = body.top_logprobs or 0
        params = self.params(lambda i: plan.constrain(body.sampling_params(max_new, body.logprobs, top, i)), body.n,
                             {"max_new_tokens": "max_tokens"})
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if self.args.log_requests:
            log_request("chat", rid, [ids], params)
        res = await self.submit(rid, [ids] * body.n, params, body.stream, request, "messages",
                                bootstraps=self.pd_bootstraps(body, body.n))
        head = {"id": rid, "created": created, "model": self.model_name}
        if not body.stream:
            choices = []
            for i, c in enumerate(res):
                message, called = plan.message(c.text)
                choices.append({"index": i, "message": message, "logprobs": self.chat_logprobs(
                    c.ids, c.logprobs, c.top_logprobs) if body.logprobs else None,
                    "finish_reason": finish_reason(c.finish_reason, called), "matched_stop": c.matched})
            total = usage(len(ids), sum(len(c.ids) for c in res), res[0].cached_tokens)
            return json_response({**head, "object": "chat.completion", "choices": choices, "usage": total})
        gen, first = res
        head["object"] = "chat.completion.chunk"
        extra = {"usage": None} if body.include_usage else {}
        streams = [ChoiceStream(plan) for _ in range(body.n)]  # reasoning and tool calls read from the deltas

        def chunk(i: int, delta: dict, o: StrOut | None = None) -> bytes:
            lp = None
            if o is not None and body.logprobs:
                lp = self.chat_logprobs(o.new_ids, o.logprobs or [], o.top_logprobs or [])
            reason = finish_reason(o.finish_reason, streams[i].called) if o else None
            return sse({**head, "choices": [{"index": i, "delta": delta, "logprobs": lp,
                                             "finish_reason": reason}], **extra})

        async def events() -> AsyncIterator[bytes]:
            for i in range(body.n):
                yield chunk(i, {"role": "assistant", "content": ""})
            completion, cached = 0, 0
            async for i, o in chain(first, gen):
                if o.text or o.new_ids or o.finish_reason:  # one chunk per output: per token by default
                    deltas = streams[i].feed(o.text, o.finish_reason is not None)
                    if not deltas and streams[i].parsing and not (o.finish_reason or body.logprobs):
                        continue  # text held back by a parser (a tool call may be opening): nothing to send
                    deltas = deltas or [{"content": ""} if o.new_ids and not o.finish_reason else {}]
                    for d in deltas[:-1]:
                        yield chunk(i, d)
                    yield chunk(i, deltas[-1], o)  # logprobs and finish_reason on the output's last chunk
                if o.finish_reason:
                    completion += o.completion_tokens
                    cached = o.cached_tokens if i == 0 else cached
            if body.include_usage:
                yield sse({**head, "choices": [], "usage": usage(len(ids), completion, cached)})

        return self.stream(events())

    # ---- /v1/completions ----
    async def completion_prompts(self, prompt: Any) -> list[list[int]]:
        if isinstance(prompt, str):
            prompts = [await self.off_loop(len(prompt), self.tokenizer.encode, prompt, param="prompt")]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [self.check_ids(prompt, "prompt")]
        elif prompt and all(isinstance(p, str) for p in prompt):
            prompts = [await self.off_loop(len(p), self.tokenizer.encode, p, param="prompt") for p in prompt]
        else:
            prompts = [self.check_ids(p, "prompt") for p in prompt]
        if not prompts or any(not p for p in prompts):
            raise RequestError("prompt must not be empty", param="prompt", code="invalid_value")
        return prompts

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        self.check_model(body.model)
        self.check_unserved(body)
        grammar = self.structured.request_grammar(body)
        bias = self.structured.logit_bias(body.logit_bias)
        self.check_gateway_fields(body)
        if body.best_of is not None and body.best_of != body.n:
            raise RequestError("best_of other than n is not supported", param="best_of",
                               code="unsupported_parameter")
        prompts = await self.completion_prompts(body.prompt)
        self.check_prompt_len(prompts, "prompt")
        n, want_lp = body.n, body.logprobs is not None
        top = body.logprobs or 0
        flat = [p for p in prompts for _ in range(n)]
        bootstraps = self.pd_bootstraps(body, len(flat))
        echo_lp = body.echo and want_lp
        if echo_lp and bootstraps is not None:
            raise RequestError("echo with logprobs needs the prompt's logprobs, which no server computes under PD "
                               "disaggregation (the decode server never runs the prompt through the model); send "
                               "the request to a server without PD, or use /generate with return_logprob and "
                               "logprob_start_len, whose input_token_logprobs the gateway takes from the prefill "
                               "server", param="echo", code="unsupported_parameter")
        starts = self.prompt_logprob_starts([0 if echo_lp else -1] * len(prompts), prompts, n, "prompt", None)

        def make(i: int) -> SamplingParams:
            sp = constrained(body.sampling_params(body.max_tokens, want_lp, top, i % n), grammar, bias)
            sp.logprob_start_len = starts[i]
            return sp

        params = self.params(make, n * len(prompts), {"max_new_tokens": "max_tokens", "top_logprobs": "logprobs"})
        echo = [self.tokenizer.decode(p) if body.echo else "" for p in flat]
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if self.args.log_requests:
            log_request("completion", rid, prompts, params)
        res = await self.submit(rid, flat, params, body.stream, request, "prompt", bootstraps=bootstraps)
        head = {"id": rid, "object": "text_completion", "created": created, "model": self.model_name}
        n_prompt = sum(map(len, prompts))
        if not body.stream:
            parts = prompt_parts(enumerate(res), n, len(prompts))

            def logprobs(i: int, c: Choice) -> dict | None:
                if not want_lp:
                    return None
                out = self.completion_logprobs(c.ids, c.logprobs, c.top_logprobs, len(echo[i]))
                return self.echo_logprobs(flat[i], parts[i // n], top > 0, out) if echo_lp else out

            choices = [{"index": i, "text": echo[i] + c.text, "finish_reason": c.finish_reason,
                        "logprobs": logprobs(i, c), "matched_stop": c.matched} for i, c in enumerate(res)]
            cached = sum(c.cached_tokens for i, c in enumerate(res) if i % n == 0)
            return json_response({**head, "choices": choices,
                                  "usage": usage(n_prompt, sum(len(c.ids) for c in res), cached)})
        gen, first = res
        extra = {"usage": None} if body.include_usage else {}
        parts = prompt_parts(first, n, len(prompts))

        async def events() -> AsyncIterator[bytes]:
            offsets = [len(e) for e in echo]
            for i, e in enumerate(echo):
                if e:
                    lp = self.echo_logprobs(flat[i], parts[i // n], top > 0) if echo_lp else None
                    choice = {"index": i, "text": e, "logprobs": lp, "finish_reason": None}
                    yield sse({**head, "choices": [choice], **extra})
            completion, cached = 0, 0
            async for i, o in chain(first, gen):
                if not (o.text or o.new_ids or o.finish_reason):  # one chunk per output: per token by default
                    continue
                lp = self.completion_logprobs(o.new_ids, o.logprobs or [], o.top_logprobs or [], offsets[i]) \
                    if want_lp else None
                offsets[i] += len(o.text)
                yield sse({**head, "choices": [{"index": i, "text": o.text, "logprobs": lp,
                                                "finish_reason": o.finish_reason}], **extra})
                if o.finish_reason:
                    completion += o.completion_tokens
                    cached += o.cached_tokens if i % n == 0 else 0
            if body.include_usage:
                yield sse({**head, "choices": [], "usage": usage(n_prompt, completion, cached)})

        return self.stream(events())

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [self.model_card()]}

    def model_card(self, model_id: str | None = None) -> dict[str, Any]:
        """GET /v1/models/{id}: the served model under any name it answers to, else a 404."""
        if model_id is not None:
            self.check_model(model_id)
        return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "radixserve",
                "root": self.info["model_path"], "max_model_len": self.info["context_len"]}


def constrained(sp: SamplingParams, grammar: tuple[str, str] | None, bias: dict[int, float] | None
                ) -> SamplingParams:
    sp.grammar, sp.logit_bias = grammar, bias
    return sp
