"""The FastAPI application: routes, --api-key, and errors as OpenAI error bodies.

Endpoints: the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models; openai_api.py) and SGLang's
native API (/generate, /health, /health_generate, /get_model_info, /get_server_info, /flush_cache,
/abort_request; native_api.py), and with --enable-metrics Prometheus' /metrics (metrics.py). Every failure
is `{"error": {"message", "type", "param", "code"}}`, and a refused request costs nothing: it is rejected
here or by Scheduler.validate before it is queued.
"""
from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

from radixserve.args import ServerArgs
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


def create_app(tm: TokenizerManager, args: ServerArgs, pids: dict[str, int]) -> FastAPI:
    openai_api, native = OpenAIApi(tm, args), NativeApi(tm, args, pids)
    app = FastAPI(title="radixserve", version=version())
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
        return await openai_api.chat(body, request)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await openai_api.completions(body, request)

    @app.get("/v1/models")
    async def models() -> Response:
        return json_response(openai_api.models())

    @app.post("/generate")
    async def generate(body: GenerateRequest, request: Request) -> Response:
        return await native.generate(body, request)

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=503 if tm.dead else 200)

    @app.get("/health_generate")
    async def health_generate() -> Response:
        return await native.health_generate()

    @app.get("/get_model_info")
    async def get_model_info() -> Response:
        return json_response(native.model_info())

    @app.get("/get_server_info")
    async def get_server_info() -> Response:
        return json_response(await native.server_info())

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache() -> Response:
        out = await tm.flush_cache()
        return Response(out.message + "\n", status_code=200 if out.success else 400, media_type="text/plain")

    @app.post("/abort_request")
    async def abort_request(body: AbortRequest) -> Response:
        if body.rid is None and not body.abort_all:
            raise RequestError("pass `rid` or `abort_all: true`", param="rid",
                               code="missing_required_parameter")
        return json_response({"aborted": tm.abort(None if body.abort_all else body.rid)})

    if args.enable_metrics:  # not routed at all otherwise: /metrics is a 404 like any unknown path
        metrics = tm.metrics = Metrics(openai_api.model_name)

        @app.get("/metrics")
        async def prometheus_metrics() -> Response:
            return Response(metrics.render(await tm.get_info()), media_type=CONTENT_TYPE_LATEST)

    return app
