"""What every endpoint shares: OpenAI error bodies, SSE framing, and submitting a request to the
TokenizerManager so that a refusal is a 400 (even for a stream) and a vanished client aborts its work.

Streamed and non-streamed responses are built from the same detokenizer deltas, so greedy streamed text
concatenates to exactly the non-streamed text.
"""
from __future__ import annotations

import asyncio
import importlib.metadata
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import msgspec
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse

from radixserve.args import ServerArgs
from radixserve.core import SamplingParams
from radixserve.disaggregation.types import BootstrapInfo
from radixserve.server.messages import StrOut
from radixserve.server.protocol import unserved_flag
from radixserve.server.tokenizer_manager import RequestError, TokenizerManager

T = TypeVar("T")
OFF_LOOP_CHARS = 16384  # inputs this long are tokenized / templated on a worker thread
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
    loc = [str(p) for p in err["loc"][1:]
           if not (isinstance(p, str) and ("[" in p or p in _UNION_TAGS or p.startswith("constrained-")))]
    path = ".".join(loc)
    param, kind = (loc[0] if loc else None), err["type"]
    if kind == "json_invalid":
        reason = err.get("ctx", {}).get("error", err["msg"])
        return RequestError(f"Invalid JSON body: {reason}.", code="invalid_json")
    if kind == "missing":
        if not loc:
            return RequestError("A JSON request body is required.", code="missing_required_parameter")
        return RequestError(f"Missing required parameter: '{path}'.", param=param,
                            code="missing_required_parameter")
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
    input_logprobs: list[float] | None = None  # prompt logprobs, from the first output (StrOut.input_logprobs)
    input_top_logprobs: list[list[tuple[int, float]]] | None = None

    def add(self, o: StrOut) -> None:
        self.text += o.text
        self.ids += o.new_ids
        self.logprobs += o.logprobs or []
        self.top_logprobs += o.top_logprobs or []
        self.finish_reason, self.matched = o.finish_reason, o.matched
        self.prompt_tokens, self.cached_tokens = o.prompt_tokens, o.cached_tokens
        if o.input_logprobs is not None:
            self.input_logprobs, self.input_top_logprobs = o.input_logprobs, o.input_top_logprobs


PromptPart = tuple[list[float], list[list[tuple[int, float]]] | None]


def prompt_parts(outs: Iterable[tuple[int, StrOut | Choice]], n: int, num_prompts: int) -> list[PromptPart | None]:
    """Each prompt's logprobs (values, top rows), from the first of its n choices: only that one computes them
    (ApiBase.prompt_logprob_starts), the others share its prompt. `outs`: (index, output) of every sequence,
    the finished choices or a stream's primed first outputs (a choice's first output carries them)."""
    parts: list[PromptPart | None] = [None] * num_prompts
    for i, o in outs:
        if i % n == 0 and o.input_logprobs is not None:
            parts[i // n] = (o.input_logprobs, o.input_top_logprobs)
    return parts


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


async def _disconnected(request: Request) -> None:
    """Return when the client goes away: once the body is read, the ASGI receive channel yields nothing
    but the http.disconnect message (what starlette's StreamingResponse listens for)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(coro: Coroutine[Any, Any, T], request: Request) -> T:
    """Await `coro`, cancelling it if the client goes away meanwhile. A handler is not cancelled on
    disconnect the way a streaming response is, so without this a non-streamed request (or a stream still
    waiting for its first token) would run to the end for nobody. Cancelling the generator inside `coro`
    aborts its requests.

    The disconnect is awaited, not polled: polling `request.is_disconnected()` twice a second per waiting
    request took a quarter of the API server's CPU time with 512 streams queued on the CPU (py-spy)."""
    task = asyncio.ensure_future(coro)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            raise RequestError("client disconnected", 499, None, "client_closed_request")
        return task.result()
    finally:
        task.cancel()
        gone.cancel()


async def chain(first: list[tuple[int, StrOut]], gen: Gen) -> Gen:
    for item in first:
        yield item
    async for item in gen:
        yield item


CHARS_PER_TOKEN_BOUND = 4  # margin for normalizers that shrink input (NFKC ligatures) before matching


def max_token_bytes(tokenizer: Any) -> int:
    """The most input bytes one token can stand for: the longest vocabulary entry in UTF-8 (an over-estimate
    for byte-level and SentencePiece vocabularies alike, which keeps the prompt-length bound safe)."""
    vocab = tokenizer.get_vocab() if tokenizer is not None else {}
    return max((len(t.encode("utf-8", "replace")) for t in vocab), default=64)


def version() -> str:
    try:
        return importlib.metadata.version("radixserve")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


class ApiBase:
    """State and helpers shared by the OpenAI and the native endpoints."""

    def __init__(self, tm: TokenizerManager, args: ServerArgs) -> None:
        assert tm.ready is not None
        self.tm, self.args, self.info = tm, args, tm.ready.info
        self.tokenizer = tm.tokenizer
        self.model_name = tm.ready.model_name
        # "default" always names the one served model, as in SGLang/vLLM examples and our README
        self.model_names = {n for n in (self.model_name, args.served_model_name, args.model, "default") if n}
        self.max_len = min(self.info["context_len"], self.info["max_total_num_tokens"])
        self.created = int(time.time())
        self._tok_str: dict[int, str] = {}
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="tokenize")
        self.max_prompt_chars = self.info["context_len"] * CHARS_PER_TOKEN_BOUND * max_token_bytes(self.tokenizer)

    async def off_loop(self, size: int, fn: Callable[..., T], *args: Any, param: str | None = None) -> T:
        """Run `fn(*args)` (tokenize, apply a chat template) on a worker thread when its input is large, so one
        10 MB prompt never stalls every other request and /health: the Rust tokenizer releases the GIL while it
        works. Small inputs run inline; the thread hop would cost more than the work. With `param`, `size`
        characters of prompt text that cannot fit the context whatever the tokenizer does (no token covers
        more than max_token_bytes of input) are refused without tokenizing them at all."""
        if param is not None and size > self.max_prompt_chars:
            ctx = self.info["context_len"]
            raise RequestError(f"This model's maximum context length is {ctx} tokens. However, your prompt has "
                               f"{size} characters, which is more than {ctx} tokens whatever the text. Please "
                               f"reduce the prompt.", param=param, code="context_length_exceeded")
        if size < OFF_LOOP_CHARS:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self._worker, lambda: fn(*args))

    def check_prompt_len(self, prompts: list[list[int]], param: str) -> None:
        """A prompt longer than the context is refused here, before megabytes of ids cross to the scheduler."""
        ctx = self.info["context_len"]
        longest = max(map(len, prompts), default=0)
        if longest >= ctx:
            raise RequestError(f"This model's maximum context length is {ctx} tokens. However, your prompt has "
                               f"{longest} tokens. Please reduce the prompt.", param=param,
                               code="context_length_exceeded")

    # ---- shared helpers ----
    def check_gateway_fields(self, body: Any) -> None:
        """SGLang's gateway sends some flags on every request; those whose feature radixserve lacks are served
        only at their default (false)."""
        name = unserved_flag(body)
        if name is not None:
            raise RequestError(f"'{name}': true is not supported by radixserve; leave it false", param=name,
                               code="unsupported_parameter")

    def prompt_logprob_starts(self, starts: list[int], prompts: list[list[int]], n: int, param: str,
                              bootstraps: list[BootstrapInfo] | None) -> list[int]:
        """SamplingParams.logprob_start_len of each of the n * len(prompts) sequences: a prompt's start for its
        first choice, -1 (none) for the others, which reuse the first's (prompt_parts). A start at or past the
        end of its prompt is a 400; so are prompt logprobs on a PD decode server, which never sees the
        prompt's logits (its prefill ran on another server)."""
        for s, p in zip(starts, prompts):
            if s >= len(p):
                raise RequestError(f"logprob_start_len ({s}) must be less than the prompt length ({len(p)})",
                                   param=param)
        if bootstraps is not None and self.args.disaggregation_mode == "decode":
            return [-1] * (n * len(prompts))
        return [s if i % n == 0 else -1 for s in starts for i in range(n)]

    def pd_bootstraps(self, body: Any, count: int) -> list[BootstrapInfo] | None:
        """The PD fields the gateway adds, one per sequence; refused by a server that is not in PD mode (it
        would neither send nor wait for the KV)."""
        try:
            out = body.bootstraps(count)
        except ValueError as e:
            raise RequestError(str(e), param="bootstrap_room") from None
        if out is not None and self.args.disaggregation_mode == "null":
            raise RequestError("bootstrap_room is for PD disaggregation, but this server runs without "
                               "--disaggregation-mode prefill|decode", param="bootstrap_room",
                               code="unsupported_parameter")
        return out

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.model_names:
            raise RequestError(f"The model `{model}` does not exist. This server serves `{self.model_name}`.",
                               404, "model", "model_not_found")

    def token_str(self, tid: int) -> str:
        s = self._tok_str.get(tid)
        if s is None:
            s = self._tok_str[tid] = self.tokenizer.decode([tid])
        return s

    def check_ids(self, ids: list[int], param: str) -> list[int]:
        vocab = self.info["vocab_size"]
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise RequestError(f"token id {bad} is out of range [0, {vocab})", param=param)
        return ids

    def default_max_tokens(self, prompt_len: int) -> int:
        return max(self.max_len - prompt_len, 1)

    def params(self, make: Callable[[int], SamplingParams], n: int, renames: dict[str, str]
               ) -> list[SamplingParams]:
        try:
            out = [make(i) for i in range(n)]
        except ValueError as e:
            raise from_value_error(e, renames) from None
        for sp in out[:1]:  # every choice shares the request's stop ids
            self.check_ids(sp.stop_token_ids, "stop_token_ids")
        return out

    async def submit(self, rid: str, prompts: list[list[int]], params: list[SamplingParams], stream: bool,
                     request: Request, param: str, bootstraps: list[BootstrapInfo] | None = None
                     ) -> tuple[Gen, list[tuple[int, StrOut]]] | list[Choice]:
        """Start the requests; for a stream return the generator and its primed first outputs, else the
        finished choices. Scheduler refusals surface here as RequestError naming `param`."""
        gen = self.tm.generate(rid, prompts, params, bootstraps)
        try:
            if stream:
                return gen, await unless_disconnected(prime(gen, len(prompts)), request)
            return await unless_disconnected(collect(gen, len(prompts)), request)
        except RequestError as e:
            e.param = e.param or (param if e.status == 400 else None)
            raise

    def stream(self, events: AsyncIterator[bytes]) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            try:
                async for e in events:
                    yield e
            except RequestError as e:  # the server is going down mid-stream
                yield sse({"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}})
            yield SSE_DONE
        return StreamingResponse(body(), media_type="text/event-stream", headers=SSE_HEADERS)

