"""The FastAPI application: routes, --api-key, and errors as OpenAI error bodies.

Endpoints: the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models; openai_api.py) and SGLang's
native API (/generate, /health, /health_generate, /get_model_info, /get_server_info, /flush_cache,
/abort_request; native_api.py), and with --enable-metrics Prometheus' /metrics (metrics.py). Every failure
is `{"error": {"message", "type", "param", "code"}}`, and a refused request costs nothing: it is rejected
here or by Scheduler.validate before it is queued.
"""
from __future__ import annotations

import hmac
import json
from collections.abc import Callable
from typing import Any

import msgspec
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from radixserve.args import ServerArgs
from radixserve.request_timing import RequestClockMiddleware
from radixserve.server.base import error_response, from_validation_error, json_response, version
from radixserve.server.metrics import Metrics
from radixserve.server.native_api import NativeApi
from radixserve.server.openai_api import OpenAIApi
from radixserve.server.protocol import AbortRequest, ChatCompletionRequest, CompletionRequest, GenerateRequest
from radixserve.server.tokenizer_manager import RequestError, TokenizerManager


class ApiKeyMiddleware:
    """`Authorization: Bearer KEY` on every path but /health. A plain ASGI middleware (not
    BaseHTTPMiddleware) so streaming responses and disconnect detection pass through untouched."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app, self.expected = app, b"Bearer " + api_key.encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            auth = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(auth, self.expected):
                err = RequestError("Incorrect API key provided. Pass it as `Authorization: Bearer <key>`.",
                                   401, None, "invalid_api_key")
                await error_response(err)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimitMiddleware:
    """413 for a request body over --max-request-body-mb, before it is read (by its Content-Length) or as
    soon as a chunked body passes the limit; parsing an unbounded body would stall the event loop."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        messages, size = [], 0  # chunked: read it here, within the limit, then hand it on
        while True:
            msg = await receive()
            messages.append(msg)
            size += len(msg.get("body", b""))
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            if msg["type"] != "http.request" or not msg.get("more_body"):
                break

        async def replay() -> dict:
            return messages.pop(0) if messages else await receive()
        await self.app(scope, replay, send)

    async def _refuse(self, scope: dict, receive: Callable, send: Callable) -> None:
        mb = self.max_bytes / 1e6
        err = RequestError(f"The request body is larger than {mb:g} MB; send less, or start the server with a "
                           f"larger --max-request-body-mb.", 413, None, "request_too_large")
        await error_response(err)(scope, receive, send)


class _FastJsonRequest(Request):
    """Bodies parsed by msgspec (several times faster than json.loads, which holds the event loop for ~100 ms
    on a 10 MB body). Input msgspec refuses (NaN, lone surrogates, broken JSON) is parsed again by json.loads,
    so its error, or the validator's, names what is wrong the way it always did."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            try:
                self._json = msgspec.json.decode(body)
            except msgspec.DecodeError:
                self._json = json.loads(body)
        return self._json


class JsonRoute(APIRoute):
    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def parse_fast(request: Request) -> Response:
            return await handler(_FastJsonRequest(request.scope, request.receive))
        return parse_fast


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """What every failure answers, OpenAI's shape."""
    error: ErrorDetail


def _error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    why = {400: "Invalid request: the message names the parameter.", 401: "Missing or wrong API key.",
           404: "Unknown model or path.", 413: "Request body over --max-request-body-mb.",
           503: "Shutting down, or a server process died."}
    return {s: {"model": ErrorBody, "description": why[s]} for s in statuses}


GENERATION_ERRORS = _error_responses(400, 404, 413, 503)
CONTROL_ERRORS = _error_responses(503)
JSON_OR_SSE = {200: {"content": {"application/json": {}, "text/event-stream": {}},
                     "description": "The result; with `stream: true` server-sent events ending in `data: [DONE]`."}}


def _openapi(app: FastAPI, api_key: bool) -> Callable[[], dict[str, Any]]:
    """FastAPI documents a 422 for every body it validates; radixserve answers those with 400 (OpenAI's
    status) in ErrorBody's shape, so the schema says 400 instead, and 401 everywhere with --api-key."""
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for path, ops in schema.get("paths", {}).items():
                for op in ops.values():
                    op["responses"].pop("422", None)
                    if api_key and path != "/health":
                        op["responses"]["401"] = {"description": "Missing or wrong API key.",
                                                  "content": {"application/json": {
                                                      "schema": {"$ref": "#/components/schemas/ErrorBody"}}}}
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema
    return openapi


def create_app(tm: TokenizerManager, args: ServerArgs, pids: dict[str, int]) -> FastAPI:
    openai_api, native = OpenAIApi(tm, args), NativeApi(tm, args, pids)
    app = FastAPI(title="radixserve", version=version())
    app.router.route_class = JsonRoute
    app.openapi = _openapi(app, bool(args.api_key))  # type: ignore[method-assign]
    app.add_middleware(BodyLimitMiddleware, max_bytes=int(args.max_request_body_mb * 1e6))
    if args.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=args.api_key)
    if args.enable_request_time_stats_logging:  # added last: the outermost, so it stamps the arrival first
        app.add_middleware(RequestClockMiddleware)

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

    @app.post("/v1/chat/completions", responses={**JSON_OR_SSE, **GENERATION_ERRORS})
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await openai_api.chat(body, request)

    @app.post("/v1/completions", responses={**JSON_OR_SSE, **GENERATION_ERRORS})
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await openai_api.completions(body, request)

    @app.get("/v1/models")
    async def models() -> Response:
        return json_response(openai_api.models())

    # :path: hub ids have a slash (meta-llama/Llama-3.1-8B)
    @app.get("/v1/models/{model_id:path}", responses=_error_responses(404))
    async def model(model_id: str) -> Response:
        return json_response(openai_api.model_card(model_id))

    @app.post("/generate", responses={**JSON_OR_SSE, **GENERATION_ERRORS})
    async def generate(body: GenerateRequest, request: Request) -> Response:
        return await native.generate(body, request)

    @app.get("/health", response_class=Response, responses={200: {"description": "Serving."},
                                   503: {"description": "Shutting down, or a server process died."}})
    async def health() -> Response:
        return Response(status_code=503 if tm.dead or tm.draining else 200)

    @app.get("/health_generate", response_class=Response,
             responses={200: {"description": "A token was generated."}, **CONTROL_ERRORS})
    async def health_generate() -> Response:
        return await native.health_generate()

    async def get_model_info() -> Response:
        return json_response(native.model_info())

    async def get_server_info() -> Response:
        return json_response(await native.server_info())

    async def get_load() -> Response:
        return json_response(await native.load())

    # SGLang's current names (the gateway asks /server_info and /model_info first) beside the older /get_* ones
    for path, fn in (("/model_info", get_model_info), ("/get_model_info", get_model_info),
                     ("/server_info", get_server_info), ("/get_server_info", get_server_info),
                     ("/get_load", get_load)):
        app.get(path, operation_id=path[1:], responses=CONTROL_ERRORS)(fn)

    flush_doc = {200: {"content": {"text/plain": {}}, "description": "Flushed (SGLang's plain-text answer)."},
                 400: {"content": {"text/plain": {}}, "description": "Not flushed: requests are running."},
                 **CONTROL_ERRORS}

    async def flush_cache() -> Response:
        out = await tm.flush_cache()
        return Response(out.message + "\n", status_code=200 if out.success else 400, media_type="text/plain")

    # GET and POST as two routes: one route with both methods gives both operations one operation id
    app.get("/flush_cache", responses=flush_doc, operation_id="flush_cache_get")(flush_cache)
    app.post("/flush_cache", responses=flush_doc, operation_id="flush_cache_post")(flush_cache)

    @app.post("/abort_request", responses=_error_responses(400))
    async def abort_request(body: AbortRequest) -> Response:
        if body.rid is None and not body.abort_all:
            raise RequestError("pass `rid` or `abort_all: true`", param="rid",
                               code="missing_required_parameter")
        return json_response({"aborted": tm.abort(None if body.abort_all else body.rid)})

    if args.enable_metrics or args.enable_request_time_stats_logging:  # the hop log lines need the timers
        tm.metrics = Metrics(openai_api.model_name, hop_stats=args.enable_request_time_stats_logging)
    if args.enable_metrics:  # not routed at all otherwise: /metrics is a 404 like any unknown path
        metrics = tm.metrics

        @app.get("/metrics", response_class=Response, responses={200: {
            "content": {"text/plain": {}}, "description": "Prometheus' text exposition format."}})
        async def prometheus_metrics() -> Response:
            return Response(metrics.render(await tm.get_info()), media_type=CONTENT_TYPE_LATEST)

    return app
