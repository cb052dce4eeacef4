"""The HTTP server: OpenAI-compatible endpoints over one engine (``create_app(config) -> FastAPI``).

    GET  /v1/models               the one model this worker serves
    POST /v1/completions          text (or token ids) in, continuation out; "stream": true for SSE
    POST /v1/chat/completions     messages in (impl/sft's chat template), the assistant's turn out
    GET  /health                  the process answers (liveness)
    GET  /ready                   the model is loaded and the engine thread runs (readiness)
    GET  /metrics                 Prometheus text (impl/serving/metrics.py)

The model loads on a background thread after the server starts listening, so ``/health`` answers at once and
``/ready`` says when generation can start (generation before that: 503). A request's life: validate (400 with
the field named), tokenize, ``AsyncEngine.add`` (``QueueFull`` -> 429 with ``Retry-After``), then read its
outputs, detokenizing incrementally; a stop string ends it (and aborts it in the engine). The client going
away or ``request_timeout_s`` passing aborts it too, so its KV blocks return to the pool at once.

This file is the HTTP side (routes, error shapes, SSE framing); ``server.py`` holds the worker's state and the
generation steps, ``middleware.py`` request ids, the API key, the body limit and the per-request log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from impl.engine.request import SamplingParams
from impl.serving.async_engine import EngineError, EngineStats
from impl.serving.detokenize import IncrementalDetokenizer
from impl.serving.metrics import ServerMetrics
from impl.serving.middleware import ENDPOINTS, RequestContext
from impl.serving.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    chat_body,
    chat_chunk,
    completion_body,
    completion_chunk,
    usage_chunk,
)
from impl.serving.server import Server, ServerConfig, load_model

__all__ = ["ENDPOINTS", "Server", "ServerConfig", "create_app", "load_model"]
log = logging.getLogger("impl.serving")


def _sse(data: Any) -> bytes:
    """One SSE event. The JSON stays ASCII (\\u escapes): clients split the stream into lines, and Python's
    line splitting (httpx ``iter_lines``) also breaks on U+0085, U+2028 and U+2029, which a token may hold."""
    return f"data: {json.dumps(data)}\n\n".encode()


async def _abort_on_disconnect(request: Request, stream) -> None:
    """Wait for the client to go away and abort its request (non-streaming answers: nothing else would
    notice until the whole answer was generated)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            stream.abort()
            return


def create_app(config: ServerConfig, loader: Callable[[ServerConfig], tuple[Any, Any]] = load_model,
               detokenizer: type = IncrementalDetokenizer) -> FastAPI:
    """The FastAPI app serving ``config.model``; ``loader`` and ``detokenizer`` are seams for tests (a model
    already in memory, a broken detokenizer for the spec's mutants)."""
    server = Server(config, loader, detokenizer)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        server.start()
        yield
        server.stop()

    app = FastAPI(title="impl.serving", version="1.0",
                  description="OpenAI-compatible completions and chat completions served by impl.engine",
                  lifespan=lifespan)
    app.state.server = server
    server.metrics = ServerMetrics(_LazyEngine(server), server.model_id)
    app.add_middleware(RequestContext, server=server)

    def openapi() -> dict[str, Any]:
        """FastAPI's document with ``model`` pinned to the one id this worker serves (clients and schemathesis
        then send requests that reach the engine instead of a 404)."""
        if app.openapi_schema is None:
            schema = FastAPI.openapi(app)
            for name in ("CompletionRequest", "ChatCompletionRequest"):
                schema["components"]["schemas"][name]["properties"]["model"] = {
                    "type": "string", "enum": [server.model_id], "title": "Model"}
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        """Starlette's own refusals (unknown path, wrong method, body too large) in OpenAI's shape too."""
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        code = "body_too_large" if e.status_code == 413 else None
        return JSONResponse(APIError(e.status_code, str(e.detail), kind, code=code).body(), e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception) -> JSONResponse:
        log.exception("%s: unexpected error", request.scope.get("request_id"))
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}", "server_error").body(), 500)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        errors = e.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return JSONResponse(APIError(400, f"the body is not valid JSON: {first.get('msg')}").body(), 400)
        loc = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = "; ".join(f"{'.'.join(str(p) for p in err.get('loc', ())[1:]) or 'body'}: {err.get('msg')}"
                            for err in errors[:3])
        return JSONResponse(APIError(400, f"invalid request: {message}", param=loc).body(), 400)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if server.ready:
            return JSONResponse({"status": "ready", "model": server.model_id})
        reason = server.load_error or ("loading" if server.engine is None else "engine failing")
        return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": server.model_id, "object": "model", "created": 0,
                                            "owned_by": "impl.serving"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        server.require_ready()
        server.check_model(body.model)
        prompt = server.encode(body.prompt)
        params = server.sampling(body, body.max_tokens)
        return await respond(request, body, prompt, params, "/v1/completions")

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        from impl.sft.templates import render_chat

        server.require_ready()
        server.check_model(body.model)
        try:
            text = render_chat([m.model_dump() for m in body.messages], add_generation_prompt=True)
        except ValueError as e:
            raise APIError(400, str(e), param="messages") from e
        prompt = server.encode(text)
        max_tokens = body.max_tokens or server.context - len(prompt)
        return await respond(request, body, prompt, server.sampling(body, max_tokens), "/v1/chat/completions")

    async def respond(request: Request, body, prompt: list[int], params: SamplingParams, endpoint: str):
        started = time.perf_counter()
        stream = await server.submit(prompt, params)
        request_id = ("chatcmpl-" if endpoint.endswith("chat/completions") else "cmpl-") + \
            request.scope["request_id"].removeprefix("req-")
        counts = {"prompt": len(prompt), "completion": 0}
        chat_mode = endpoint == "/v1/chat/completions"
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            events = _events(server, stream, body.stop, endpoint, started, counts, request_id, chat_mode,
                             include_usage)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        server.metrics.in_flight.inc()
        watcher = asyncio.create_task(_abort_on_disconnect(request, stream))
        try:
            text, reason = await server.collect(stream, body.stop, endpoint, started, counts)
        finally:
            watcher.cancel()
            server.metrics.in_flight.dec()
            server.finished(endpoint, started, counts)
        make = chat_body if chat_mode else completion_body
        return JSONResponse(make(request_id, server.model_id, text, reason, counts["prompt"], counts["completion"]))

    return app


async def _events(server: Server, stream, stop: list[str], endpoint: str, started: float, counts: dict[str, int],
                  request_id: str, chat_mode: bool, include_usage: bool) -> AsyncIterator[bytes]:
    """The SSE body: OpenAI chunks, then ``data: [DONE]``. A timeout or an engine failure mid-stream ends it
    with an error event (the status line is long gone)."""
    model = server.model_id
    server.metrics.in_flight.inc()
    try:
        if chat_mode:
            yield _sse(chat_chunk(request_id, model, {"role": "assistant", "content": ""}, None))
        async with asyncio.timeout(server.config.request_timeout_s):
            async for text, reason in server.pieces(stream, stop, endpoint, started, counts):
                if chat_mode:
                    if text:
                        yield _sse(chat_chunk(request_id, model, {"content": text}, None))
                    if reason is not None:
                        yield _sse(chat_chunk(request_id, model, {}, reason))
                else:
                    yield _sse(completion_chunk(request_id, model, text, reason))
        if include_usage:
            yield _sse(usage_chunk(request_id, model, "chat.completion.chunk" if chat_mode else "text_completion",
                                   counts["prompt"], counts["completion"]))
    except TimeoutError:
        stream.abort()
        yield _sse(APIError(504, f"the request took longer than the server's timeout of "
                                 f"{server.config.request_timeout_s} s", "timeout_error", code="timeout").body())
    except EngineError as e:
        yield _sse(APIError(500, str(e), "server_error", code="engine_error").body())
    finally:
        stream.abort()  # no-op when finished; a disconnect (this generator cancelled) frees the blocks here
        server.metrics.in_flight.dec()
        server.finished(endpoint, started, counts)
    yield b"data: [DONE]\n\n"


class _LazyEngine:
    """Stands in for the ``AsyncEngine`` in metrics until the model has loaded (zeros, unhealthy)."""

    def __init__(self, server: Server):
        self.server = server

    @property
    def stats(self):
        return self.server.engine.stats if self.server.engine is not None else EngineStats()

    @property
    def healthy(self) -> bool:
        return self.server.ready
