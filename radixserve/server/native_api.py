"""SGLang's native API: /generate, and the control endpoints behind /health_generate, /get_model_info and
/get_server_info.

Logprobs on /generate follow SGLang: `return_logprob` gives `meta_info.output_token_logprobs` and
`input_token_logprobs`, entries `[logprob, token_id, text or None]` (`return_text_in_logprobs`), and with
`top_logprobs_num` > 0 `output_top_logprobs` / `input_top_logprobs`. The input entries cover the prompt from
`logprob_start_len` on; the first of them has no logprob (None), the others the logprob of their token given
the tokens before it. The default -1 means output logprobs only: the input list then holds just the last prompt
token, with None. On a PD decode server (a request carrying bootstrap fields) input_token_logprobs is empty:
the prefill server returns it and the gateway merges it into the decode server's response, as with SGLang's
servers. The gateway merges nothing else, so PD refuses input top logprobs (logprob_start_len with
top_logprobs_num) with a 400.
"""
from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from radixserve.args import ServerArgs
from radixserve.core import SamplingParams
from radixserve.server.base import ApiBase, Choice, PromptPart, chain, json_response, prompt_parts, sse, version
from radixserve.server.protocol import GenerateRequest, stop_list
from radixserve.server.structured import Structured, log_request
from radixserve.server.tokenizer_manager import RequestError, TokenizerManager

HEALTH_TIMEOUT_S = 20.0


class NativeApi(ApiBase):
    def __init__(self, tm: TokenizerManager, args: ServerArgs, pids: dict[str, int]) -> None:
        """`pids`: the server's processes by role, reported by /get_server_info (operators and tests find
        the scheduler there)."""
        super().__init__(tm, args)
        self.pids = pids
        self.structured = Structured(args, self.tokenizer, self.info["vocab_size"])

    # ---- /generate (SGLang native) ----
    async def generate(self, body: GenerateRequest, request: Request) -> Response:
        if (body.text is None) == (body.input_ids is None):
            raise RequestError("pass exactly one of `text` and `input_ids`", param="text")
        self.check_model(body.model)
        self.check_gateway_fields(body)
        src = body.text if body.text is not None else body.input_ids
        batch = isinstance(src, list) and (body.text is not None or (bool(src) and isinstance(src[0], list)))
        if body.text is not None:
            prompts = [await self.off_loop(len(t), self.tokenizer.encode, t, param="text")
                       for t in (src if batch else [src])]
        else:
            prompts = [self.check_ids(p, "input_ids") for p in (src if batch else [src])]
        if not prompts or any(not p for p in prompts):
            raise RequestError("the prompt is empty", param="text" if body.text is not None else "input_ids",
                               code="invalid_value")
        self.check_prompt_len(prompts, "text" if body.text is not None else "input_ids")
        sp, n = body.sampling_params, body.sampling_params.n
        bootstraps = self.pd_bootstraps(body, n * len(prompts))
        starts = body.logprob_start_len if isinstance(body.logprob_start_len, list) else \
            [body.logprob_start_len] * len(prompts)
        if len(starts) != len(prompts):
            raise RequestError(f"logprob_start_len has {len(starts)} entries for {len(prompts)} prompts",
                               param="logprob_start_len")
        if not body.return_logprob:
            starts = [-1] * len(prompts)
        if bootstraps is not None and body.top_logprobs_num and any(s >= 0 for s in starts):
            raise RequestError("input_top_logprobs are not served under PD disaggregation: the gateway takes only "
                               "input_token_logprobs from the prefill server; ask with top_logprobs_num 0, or "
                               "without logprob_start_len", param="logprob_start_len", code="unsupported_parameter")
        lp_starts = self.prompt_logprob_starts(starts, prompts, n, "logprob_start_len", bootstraps)
        pd_decode = bootstraps is not None and self.args.disaggregation_mode == "decode"
        fields = {f: getattr(sp, f) for f in sp.model_fields
                  if f not in ("n", "stop", "stop_token_ids", "regex", "ebnf", "json_schema", "logit_bias")}
        grammar, bias = self.structured.request_grammar(sp), self.structured.logit_bias(sp.logit_bias)

        def make(i: int) -> SamplingParams:
            return SamplingParams(**{**fields, "seed": None if sp.seed is None else sp.seed + i % n},
                                  stop=stop_list(sp.stop), stop_token_ids=sp.stop_token_ids or [],
                                  logprobs=body.return_logprob, grammar=grammar, logit_bias=bias,
                                  top_logprobs=body.top_logprobs_num if body.return_logprob else 0,
                                  logprob_start_len=lp_starts[i])

        params = self.params(make, n * len(prompts), {})
        flat = [p for p in prompts for _ in range(n)]
        rid, start = body.rid or uuid.uuid4().hex, time.perf_counter()
        if self.args.log_requests:
            log_request("generate", rid, flat, params)
        res = await self.submit(rid, flat, params, body.stream, request, "text", bootstraps=bootstraps)
        rids = [rid] if len(flat) == 1 else [f"{rid}-{i}" for i in range(len(flat))]
        text = self.token_str if body.return_text_in_logprobs else lambda _: None

        def input_logprobs(i: int, part: PromptPart | None) -> dict:
            if pd_decode:  # the gateway merges in the prefill server's list (top rows: only the default, [None])
                return {"input_token_logprobs": [], **({"input_top_logprobs": [None]} if body.top_logprobs_num else {})}
            ids, s = flat[i], starts[i // n]
            s = len(ids) - 1 if s < 0 else s
            vals, tops = part or ([], None)
            out: dict[str, Any] = {"input_token_logprobs": [[None, ids[s], text(ids[s])]] + [
                [lp, t, text(t)] for lp, t in zip(vals, ids[s + 1:])]}
            if body.top_logprobs_num:
                out["input_top_logprobs"] = [None] + [[[lp, t, text(t)] for t, lp in row] for row in tops or []]
            return out

        def result(i: int, c: Choice, part: PromptPart | None = None) -> dict:
            meta: dict[str, Any] = {
                "id": rids[i], "finish_reason": self.native_finish(c, params[i]),
                "prompt_tokens": len(flat[i]), "completion_tokens": len(c.ids),
                "cached_tokens": c.cached_tokens, "e2e_latency": time.perf_counter() - start}
            if body.return_logprob:
                meta.update(input_logprobs(i, part))
                meta["output_token_logprobs"] = [[lp, t, text(t)] for lp, t in zip(c.logprobs, c.ids)]
                meta["output_top_logprobs"] = [[[lp, t, text(t)] for t, lp in row] for row in c.top_logprobs]
            return {"text": c.text, "output_ids": c.ids, "meta_info": meta}

        if not body.stream:
            parts = prompt_parts(enumerate(res), n, len(prompts))
            out = [result(i, c, parts[i // n]) for i, c in enumerate(res)]
            return json_response(out if len(out) > 1 or batch else out[0])
        gen, first = res
        parts = prompt_parts(first, n, len(prompts))

        async def events() -> AsyncIterator[bytes]:
            acc = [Choice() for _ in flat]
            async for i, o in chain(first, gen):
                acc[i].add(o)
                r = result(i, acc[i], parts[i // n])
                yield sse({**r, "index": i} if len(flat) > 1 else r)

        return self.stream(events())

    @staticmethod
    def native_finish(c: Choice, sp: SamplingParams) -> dict | None:
        if c.finish_reason is None:
            return None
        if c.finish_reason == "length":
            return {"type": "length", "length": sp.max_new_tokens}
        if c.finish_reason == "abort":
            return {"type": "abort", "message": "aborted"}
        return {"type": "stop", "matched": c.matched}

    # ---- native control endpoints ----
    async def health_generate(self) -> Response:
        ids = self.tokenizer.encode("Hi") or [0]
        sp = SamplingParams(max_new_tokens=1, temperature=0)
        gen = self.tm.generate(f"health-{uuid.uuid4().hex}", [ids], [sp])

        async def drain() -> None:
            async for _ in gen:
                pass
        try:
            await asyncio.wait_for(drain(), HEALTH_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise RequestError.server(f"no token generated within {HEALTH_TIMEOUT_S:.0f} s", 503) from None
        return Response(status_code=200)

    def model_info(self) -> dict:
        # tokenizer_path: the HF tokenizer directory this server saved (a .gguf model has none of its own), so the
        # gateway and clients on this host load it in a fraction of a second
        return {"model_path": self.info["model_path"], "tokenizer_path": self.args.tokenizer_path or
                self.tm.ready.tokenizer_dir, "served_model_name": self.model_name, "is_generation": True,
                "context_length": self.info["context_len"], "vocab_size": self.info["vocab_size"],
                "model_type": self.info.get("model_type"), "architectures": self.info.get("architectures")}

    async def load(self) -> list[dict]:
        """SGLang's /get_load, one entry per DP replica: what the gateway's power_of_two policy compares
        (it sums num_tokens: the KV tokens held by running requests)."""
        return [{"dp_rank": i.get("dp_rank", d), "num_reqs": i["num_running_reqs"] + i["num_queue_reqs"],
                 "num_waiting_reqs": i["num_queue_reqs"], "num_tokens": i["kv_used_tokens"]}
                for d, i in enumerate(await self.tm.get_infos())]

    async def server_info(self) -> dict:
        live = await self.tm.get_infos()  # one entry per DP replica
        return {**dataclasses.asdict(self.args), **self.info, "served_model_name": self.model_name,
                "version": version(), "pids": self.pids, "internal_states": live}


