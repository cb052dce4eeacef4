"""The ASGI middleware in front of every route: request ids, the API key, the body size limit, per-request
metrics and one log line per request (never the key).

Plain ASGI rather than ``@app.middleware("http")``: Starlette's ``BaseHTTPMiddleware`` re-wraps a streamed
body and its ``receive``, which delays or hides a client's disconnect from the endpoint, and the disconnect
is what aborts a request in the engine.
"""

from __future__ import annotations

import hmac
import logging
import time
import uuid

from fastapi import HTTPException
from fastapi.responses import JSONResponse

from impl.serving.protocol import APIError

log = logging.getLogger("impl.serving")
OPEN_PATHS = ("/health", "/ready", "/metrics", "/docs", "/openapi.json", "/redoc")  # no API key needed


ENDPOINTS = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/ready", "/metrics"}


class RequestContext:
    """ASGI middleware for one worker's app: ``server`` gives its config (key, body limit) and metrics."""

    def __init__(self, app, server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        request_id = headers.get("x-request-id", "")[:64] or f"req-{uuid.uuid4().hex[:16]}"
        scope["request_id"] = request_id
        path, started, status = scope["path"], time.perf_counter(), [500]

        async def send_with_id(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = dict(message, headers=[*message.get("headers", []),
                                                 (b"x-request-id", request_id.encode("latin-1"))])
            await send(message)

        key, limit = self.server.config.api_key, self.server.config.max_body_bytes
        try:
            error = None
            if key and path not in OPEN_PATHS and not _authorized(headers.get("authorization", ""), key):
                error = APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                                 "authentication_error", code="invalid_api_key")
            elif int(headers.get("content-length", "0") or 0) > limit:
                error = _too_large(limit)
            if error is not None:
                await JSONResponse(error.body(), error.status)(scope, receive, send_with_id)
            else:
                await self.app(scope, _limited(receive, limit), send_with_id)
        finally:
            endpoint = path if path in ENDPOINTS else "other"
            self.server.metrics.requests.labels(endpoint, str(status[0])).inc()
            log.info("%s %s %s -> %d in %.1f ms", request_id, scope["method"], path, status[0],
                     1000 * (time.perf_counter() - started))


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than this server's limit of {limit} bytes",
                    code="body_too_large")


def _limited(receive, limit: int):
    """``receive`` that refuses (413) once a chunked body without a Content-Length passes ``limit`` bytes."""
    seen = 0

    async def receive_limited():
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:  # FastAPI passes an HTTPException through its body parsing (anything else: 400)
                raise HTTPException(413, _too_large(limit).message)
        return message

    return receive_limited


def _authorized(header: str, key: str) -> bool:
    """``Authorization: Bearer <key>``, compared in constant time (no timing hint about the key)."""
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())
