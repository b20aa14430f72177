"""HTTP endpoints: the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models) and SGLang's native
API (/generate, /health, /health_generate, /get_model_info, /get_server_info, /flush_cache, /abort_request).

Every failure is an OpenAI error body, `{"error": {"message", "type", "param", "code"}}`, and a request
that is refused costs nothing: it is rejected here or by Scheduler.validate before it is queued.
Streamed and non-streamed responses are built from the same detokenizer deltas, so greedy streamed
text concatenates to exactly the non-streamed text.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import importlib.metadata
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from jinja2 import TemplateError
from starlette.exceptions import HTTPException as StarletteHTTPException

from radixserve.args import ServerArgs
from radixserve.core import SamplingParams
from radixserve.server.messages import StrOut
from radixserve.server.protocol import (
    AbortRequest,
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    stop_list,
)
from radixserve.server.tokenizer_manager import RequestError, TokenizerManager

T = TypeVar("T")
DISCONNECT_POLL_S = 0.5
HEALTH_TIMEOUT_S = 20.0
_UNION_TAGS = {"str", "int", "float", "bool"}


# ---- responses and errors -------------------------------------------------------------------------------
def json_response(obj: Any, status: int = 200) -> Response:
    return Response(msgspec.json.encode(obj), status_code=status, media_type="application/json")


def error_response(e: RequestError) -> Response:
    return json_response({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}},
                         e.status)


def from_validation_error(exc: RequestValidationError) -> RequestError:
    """The first pydantic error as a sentence that names the parameter, with OpenAI's codes."""
    err = exc.errors()[0]
    loc = [str(p) for p in err["loc"][1:] if not (isinstance(p, str) and ("[" in p or p in _UNION_TAGS))]
    path = ".".join(loc)
    param, kind = (loc[0] if loc else None), err["type"]
    if kind == "json_invalid":
        return RequestError(f"Invalid JSON body: {err.get('ctx', {}).get('error', err['msg'])}.", code="invalid_json")
    if kind == "missing":
        if not loc:
            return RequestError("A JSON request body is required.", code="missing_required_parameter")
        return RequestError(f"Missing required parameter: '{path}'.", param=param, code="missing_required_parameter")
    if kind == "extra_forbidden":
        return RequestError(f"Unsupported parameter: '{path}' is not supported by radixserve.", param=param,
                            code="unsupported_parameter")
    code = "invalid_type" if kind.endswith("_type") or kind.startswith("model_") else "invalid_value"
    return RequestError(f"Invalid value for '{path or 'body'}': {err['msg']}.", param=param, code=code)


def from_value_error(e: ValueError, renames: dict[str, str] | None = None) -> RequestError:
    """SamplingParams.validate names the field first ("top_p must be in (0, 1], got 2")."""
    word = str(e).split(" ", 1)[0]
    param = (renames or {}).get(word, word) if word.isidentifier() else None
    return RequestError(str(e), param=param, code="invalid_value")


def usage(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def sse(obj: Any) -> bytes:
    return b"data: " + msgspec.json.encode(obj) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class Choice:
    """One choice's output, accumulated from its StrOut deltas."""
    text: str = ""
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None
    matched: int | str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0

    def add(self, o: StrOut) -> None:
        self.text += o.text
        self.ids += o.new_ids
        self.logprobs += o.logprobs or []
        self.top_logprobs += o.top_logprobs or []
        self.finish_reason, self.matched = o.finish_reason, o.matched
        self.prompt_tokens, self.cached_tokens = o.prompt_tokens, o.cached_tokens


Gen = AsyncIterator[tuple[int, StrOut]]


async def prime(gen: Gen, n: int) -> list[tuple[int, StrOut]]:
    """Wait for every choice's first output before a stream starts: a request the scheduler refuses must
    still get a 400 status, which cannot be sent once SSE headers are out."""
    first: list[tuple[int, StrOut]] = []
    while len({i for i, _ in first}) < n:
        first.append(await gen.__anext__())
    return first


async def collect(gen: Gen, n: int) -> list[Choice]:
    choices = [Choice() for _ in range(n)]
    async for i, out in gen:
        choices[i].add(out)
    return choices


async def unless_disconnected(coro: Coroutine[Any, Any, T], request: Request) -> T:
    """Await `coro`, cancelling it if the client goes away meanwhile. A handler is not cancelled on
    disconnect the way a streaming response is, so without this a non-streamed request (or a stream still
    waiting for its first token) would run to the end for nobody. Cancelling the generator inside `coro`
    aborts its requests."""
    task = asyncio.ensure_future(coro)
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and await request.is_disconnected():
                raise RequestError("client disconnected", 499, None, "client_closed_request")
        return task.result()
    finally:
        task.cancel()


class ApiKeyMiddleware:
    """`Authorization: Bearer KEY` on every path but /health. A plain ASGI middleware (not
    BaseHTTPMiddleware) so streaming responses and disconnect detection pass through untouched."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app, self.expected = app, b"Bearer " + api_key.encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            auth = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(auth, self.expected):
                err = RequestError("Incorrect API key provided. Pass it as `Authorization: Bearer <key>`.", 401,
                                   None, "invalid_api_key")
                await error_response(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


# ---- the application -----------------------------------------------------------------------------------
class Api:
    def __init__(self, tm: TokenizerManager, args: ServerArgs, pids: dict[str, int]) -> None:
        assert tm.ready is not None
        self.tm, self.args, self.info, self.pids = tm, args, tm.ready.info, pids
        self.tokenizer = tm.tokenizer
        self.model_name = tm.ready.model_name
        self.model_names = {n for n in (self.model_name, args.served_model_name, args.model) if n}
        self.max_len = min(self.info["context_len"], self.info["max_total_num_tokens"])
        self.created = int(time.time())
        self._tok_str: dict[int, str] = {}

    # ---- shared helpers ----
    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.model_names:
            raise RequestError(f"The model `{model}` does not exist. This server serves `{self.model_name}`.", 404,
                               "model", "model_not_found")

    def token_str(self, tid: int) -> str:
        s = self._tok_str.get(tid)
        if s is None:
            s = self._tok_str[tid] = self.tokenizer.decode([tid])
        return s

    def check_ids(self, ids: list[int], param: str) -> list[int]:
        vocab = self.info["vocab_size"]
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError(f"token id {bad} is out of range [0, {vocab})", param=param, code="invalid_value")
        return ids

    def default_max_tokens(self, prompt_len: int) -> int:
        return max(self.max_len - prompt_len, 1)

    def params(self, make: Callable[[int], SamplingParams], n: int, renames: dict[str, str]) -> list[SamplingParams]:
        try:
            return [make(i) for i in range(n)]
        except ValueError as e:
            raise from_value_error(e, renames) from None

    async def submit(self, rid: str, prompts: list[list[int]], params: list[SamplingParams], stream: bool,
                     request: Request, param: str) -> tuple[Gen, list[tuple[int, StrOut]]] | list[Choice]:
        """Start the requests; for a stream return the generator and its primed first outputs, else the
        finished choices. Scheduler refusals surface here as RequestError naming `param`."""
        gen = self.tm.generate(rid, prompts, params)
        try:
            if stream:
                return gen, await unless_disconnected(prime(gen, len(prompts)), request)
            return await unless_disconnected(collect(gen, len(prompts)), request)
        except RequestError as e:
            e.param = e.param or (param if e.status == 400 else None)
            raise

    # ---- logprobs ----
    def chat_logprobs(self, ids: list[int], lps: list[float], tops: list[list[tuple[int, float]]]) -> dict:
        def entry(t: int, lp: float) -> dict:
            s = self.token_str(t)
            return {"token": s, "logprob": lp, "bytes": list(s.encode())}
        return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, b) for a, b in (tops[k] if k < len(tops) else [])]}
                            for k, (t, lp) in enumerate(zip(ids, lps))]}

    def completion_logprobs(self, ids: list[int], lps: list[float], tops: list[list[tuple[int, float]]],
                            offset: int) -> dict:
        toks = [self.token_str(t) for t in ids[:len(lps)]]
        offsets = []
        for s in toks:
            offsets.append(offset)
            offset += len(s)
        top = [{self.token_str(a): b for a, b in row} for row in tops] if tops else None
        return {"tokens": toks, "token_logprobs": lps, "top_logprobs": top, "text_offset": offsets}

    # ---- /v1/chat/completions ----
    async def chat(self, body: ChatCompletionRequest, request: Request) -> Response:
        self.check_model(body.model)
        if body.top_logprobs and not body.logprobs:
            raise RequestError("top_logprobs requires logprobs=true", param="top_logprobs", code="invalid_value")
        try:
            out = self.tokenizer.apply_chat_template([msg.as_dict() for msg in body.messages],
                                                     add_generation_prompt=True, tokenize=True)
        except (TemplateError, ValueError, TypeError, KeyError) as e:  # e.g. roles out of order
            raise RequestError(f"the chat template rejected the messages: {e}", param="messages") from None
        ids = list(out["input_ids"] if hasattr(out, "keys") else out)
        max_new = body.max_completion_tokens or body.max_tokens or self.default_max_tokens(len(ids))
        top = body.top_logprobs or 0
        params = self.params(lambda i: body.sampling_params(max_new, body.logprobs, top, i), body.n,
                             {"max_new_tokens": "max_tokens"})
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        res = await self.submit(rid, [ids] * body.n, params, body.stream, request, "messages")
        head = {"id": rid, "created": created, "model": self.model_name}
        if not body.stream:
            choices = [{"index": i, "message": {"role": "assistant", "content": c.text},
                        "logprobs": self.chat_logprobs(c.ids, c.logprobs, c.top_logprobs) if body.logprobs else None,
                        "finish_reason": c.finish_reason, "matched_stop": c.matched} for i, c in enumerate(res)]
            return json_response({**head, "object": "chat.completion", "choices": choices,
                                  "usage": usage(len(ids), sum(len(c.ids) for c in res), res[0].cached_tokens)})
        gen, first = res
        head["object"] = "chat.completion.chunk"
        extra = {"usage": None} if body.include_usage else {}

        def chunk(i: int, delta: dict, o: StrOut | None = None) -> bytes:
            lp = self.chat_logprobs(o.new_ids, o.logprobs or [], o.top_logprobs or []) if o and body.logprobs else None
            return sse({**head, "choices": [{"index": i, "delta": delta, "logprobs": lp,
                                             "finish_reason": o.finish_reason if o else None}], **extra})

        async def events() -> AsyncIterator[bytes]:
            for i in range(body.n):
                yield chunk(i, {"role": "assistant", "content": ""})
            completion, cached = 0, 0
            async for i, o in _chain(first, gen):
                if o.text or o.finish_reason or (body.logprobs and o.new_ids):
                    yield chunk(i, {"content": o.text} if o.text else {}, o)
                if o.finish_reason:
                    completion += o.completion_tokens
                    cached = o.cached_tokens if i == 0 else cached
            if body.include_usage:
                yield sse({**head, "choices": [], "usage": usage(len(ids), completion, cached)})

        return self.stream(events())

    # ---- /v1/completions ----
    def completion_prompts(self, prompt: Any) -> list[list[int]]:
        if isinstance(prompt, str):
            prompts = [self.tokenizer.encode(prompt)]
        elif prompt and all(isinstance(p, int) for p in prompt):
            prompts = [self.check_ids(prompt, "prompt")]
        elif prompt and all(isinstance(p, str) for p in prompt):
            prompts = [self.tokenizer.encode(p) for p in prompt]
        else:
            prompts = [self.check_ids(p, "prompt") for p in prompt]
        if not prompts or any(not p for p in prompts):
            raise RequestError("prompt must not be empty", param="prompt", code="invalid_value")
        return prompts

    async def completions(self, body: CompletionRequest, request: Request) -> Response:
        self.check_model(body.model)
        if body.best_of is not None and body.best_of != body.n:
            raise RequestError("best_of other than n is not supported", param="best_of", code="unsupported_parameter")
        if body.echo and body.logprobs is not None:
            raise RequestError("echo with logprobs needs prompt logprobs, which radixserve does not compute",
                               param="echo", code="unsupported_parameter")
        prompts = self.completion_prompts(body.prompt)
        n, want_lp = body.n, body.logprobs is not None
        params = self.params(lambda i: body.sampling_params(body.max_tokens, want_lp, body.logprobs or 0, i % n),
                             n * len(prompts), {"max_new_tokens": "max_tokens", "top_logprobs": "logprobs"})
        flat = [p for p in prompts for _ in range(n)]
        echo = [self.tokenizer.decode(p) if body.echo else "" for p in flat]
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        res = await self.submit(rid, flat, params, body.stream, request, "prompt")
        head = {"id": rid, "object": "text_completion", "created": created, "model": self.model_name}
        n_prompt = sum(map(len, prompts))
        if not body.stream:
            choices = [{"index": i, "text": echo[i] + c.text, "finish_reason": c.finish_reason,
                        "logprobs": self.completion_logprobs(c.ids, c.logprobs, c.top_logprobs, 0) if want_lp
                        else None, "matched_stop": c.matched} for i, c in enumerate(res)]
            cached = sum(c.cached_tokens for i, c in enumerate(res) if i % n == 0)
            return json_response({**head, "choices": choices,
                                  "usage": usage(n_prompt, sum(len(c.ids) for c in res), cached)})
        gen, first = res
        extra = {"usage": None} if body.include_usage else {}

        async def events() -> AsyncIterator[bytes]:
            offsets = [len(e) for e in echo]
            for i, e in enumerate(echo):
                if e:
                    yield sse({**head, "choices": [{"index": i, "text": e, "logprobs": None, "finish_reason": None}],
                               **extra})
            completion, cached = 0, 0
            async for i, o in _chain(first, gen):
                if not (o.text or o.finish_reason or (want_lp and o.new_ids)):
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

    # ---- /generate (SGLang native) ----
    async def generate(self, body: GenerateRequest, request: Request) -> Response:
        if (body.text is None) == (body.input_ids is None):
            raise RequestError("pass exactly one of `text` and `input_ids`", param="text", code="invalid_value")
        src = body.text if body.text is not None else body.input_ids
        batch = isinstance(src, list) and (body.text is not None or (bool(src) and isinstance(src[0], list)))
        if body.text is not None:
            prompts = [self.tokenizer.encode(t) for t in (src if batch else [src])]
        else:
            prompts = [self.check_ids(p, "input_ids") for p in (src if batch else [src])]
        if not prompts or any(not p for p in prompts):
            raise RequestError("the prompt is empty", param="text" if body.text is not None else "input_ids",
                               code="invalid_value")
        sp, n = body.sampling_params, body.sampling_params.n
        fields = {f: getattr(sp, f) for f in sp.model_fields if f not in ("n", "stop", "stop_token_ids")}

        def make(i: int) -> SamplingParams:
            return SamplingParams(**{**fields, "seed": None if sp.seed is None else sp.seed + i % n},
                                  stop=stop_list(sp.stop), stop_token_ids=sp.stop_token_ids or [],
                                  logprobs=body.return_logprob,
                                  top_logprobs=body.top_logprobs_num if body.return_logprob else 0)

        params = self.params(make, n * len(prompts), {})
        flat = [p for p in prompts for _ in range(n)]
        rid, start = body.rid or uuid.uuid4().hex, time.perf_counter()
        res = await self.submit(rid, flat, params, body.stream, request, "text")
        rids = [rid] if len(flat) == 1 else [f"{rid}-{i}" for i in range(len(flat))]

        def result(i: int, c: Choice) -> dict:
            meta: dict[str, Any] = {"id": rids[i], "finish_reason": self.native_finish(c, params[i]),
                                    "prompt_tokens": len(flat[i]), "completion_tokens": len(c.ids),
                                    "cached_tokens": c.cached_tokens, "e2e_latency": time.perf_counter() - start}
            if body.return_logprob:
                meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(c.logprobs, c.ids)]
                meta["output_top_logprobs"] = [[[lp, t, None] for t, lp in row] for row in c.top_logprobs]
            return {"text": c.text, "output_ids": c.ids, "meta_info": meta}

        if not body.stream:
            out = [result(i, c) for i, c in enumerate(res)]
            return json_response(out if len(out) > 1 or batch else out[0])
        gen, first = res

        async def events() -> AsyncIterator[bytes]:
            acc = [Choice() for _ in flat]
            async for i, o in _chain(first, gen):
                acc[i].add(o)
                yield sse({**result(i, acc[i]), "index": i} if len(flat) > 1 else result(i, acc[i]))

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

    def stream(self, events: AsyncIterator[bytes]) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            try:
                async for e in events:
                    yield e
            except RequestError as e:  # the server is going down mid-stream
                yield sse({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}})
            yield SSE_DONE
        return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)

    # ---- native control endpoints ----
    async def health_generate(self) -> Response:
        ids = self.tokenizer.encode("Hi") or [0]
        gen = self.tm.generate(f"health-{uuid.uuid4().hex}", [ids], [SamplingParams(max_new_tokens=1, temperature=0)])

        async def drain() -> None:
            async for _ in gen:
                pass
        try:
            await asyncio.wait_for(drain(), HEALTH_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise RequestError(f"no token generated within {HEALTH_TIMEOUT_S:.0f} s", 503, None, "server_error",
                               "server_error") from None
        return Response(status_code=200)

    def model_info(self) -> dict:
        return {"model_path": self.info["model_path"], "tokenizer_path": self.args.tokenizer_path or
                self.info["model_path"], "served_model_name": self.model_name, "is_generation": True,
                "context_length": self.info["context_len"], "vocab_size": self.info["vocab_size"]}

    async def server_info(self) -> dict:
        live = await self.tm.get_info()
        return {**dataclasses.asdict(self.args), **self.info, "served_model_name": self.model_name,
                "version": _version(), "pids": self.pids, "internal_states": [live]}


async def _chain(first: list[tuple[int, StrOut]], gen: Gen) -> Gen:
    for item in first:
        yield item
    async for item in gen:
        yield item


def _version() -> str:
    try:
        return importlib.metadata.version("radixserve")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


def create_app(tm: TokenizerManager, args: ServerArgs, pids: dict[str, int]) -> FastAPI:
    """`pids`: the server's processes by role, reported by /get_server_info (operators and tests find the
    scheduler there)."""
    api = Api(tm, args, pids)
    app = FastAPI(title="radixserve", version=_version())
    if args.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=args.api_key)

    @app.exception_handler(RequestError)
    async def _request_error(_: Request, e: RequestError) -> Response:
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError) -> Response:
        return error_response(from_validation_error(e))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException) -> Response:
        code = "not_found" if e.status_code == 404 else None
        return error_response(RequestError(str(e.detail), e.status_code, None, code))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await api.chat(body, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await api.completions(body, request)

    @app.get("/v1/models")
    async def models() -> Response:
        return json_response({"object": "list", "data": [
            {"id": api.model_name, "object": "model", "created": api.created, "owned_by": "radixserve",
             "root": api.info["model_path"], "max_model_len": api.info["context_len"]}]})

    @app.post("/generate")
    async def generate(body: GenerateRequest, request: Request) -> Response:
        return await api.generate(body, request)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=503 if tm.dead else 200)

    @app.get("/health_generate")
    async def health_generate() -> Response:
        return await api.health_generate()

    @app.get("/get_model_info")
    async def get_model_info() -> Response:
        return json_response(api.model_info())

    @app.get("/get_server_info")
    async def get_server_info() -> Response:
        return json_response(await api.server_info())

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache() -> Response:
        out = await tm.flush_cache()
        return Response(out.message + "\n", status_code=200 if out.success else 400, media_type="text/plain")

    @app.post("/abort_request")
    async def abort_request(body: AbortRequest) -> Response:
        if body.rid is None and not body.abort_all:
            raise RequestError("pass `rid` or `abort_all: true`", param="rid", code="missing_required_parameter")
        return json_response({"aborted": tm.abort(None if body.abort_all else body.rid)})

    return app
