"""The HTTP layer under every route: request bodies read with a size cap before any route sees them, the
request id, and the one way an error becomes an HTTP response.

`BodyLimitMiddleware` (pure ASGI) answers 413 from `Content-Length` alone when it declares more than
`router.max_request_bytes`, and 411 to a body sent without `Content-Length` (chunked); otherwise it reads
the body as a stream, counting, and stops at the cap with a 413, so a route never holds more than the cap (gzip/deflate bodies are capped again after decompression by
the route that decompresses them, `deployments.kserve_api`). A client that disconnects while sending leaves one INFO
line, not an ERROR with a traceback (the 400 written after it goes nowhere). The body read in full is handed to the
app as one message.

Ray Serve's HTTP proxy and the replica's receive loop pull the body eagerly, whatever the app reads: a
chunked body of unknown size would flow into the router's memory while it is being counted (a 200 MB one
grew the replica by ~500 MB under load), so only bodies that declare their size are read; an answer given
before reading (411, 413) ends the request and its reading at once.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.errors import (
    InvalidRequestError,
    LengthRequiredError,
    MethodNotAllowedError,
    NotFoundError,
    RequestTooLargeError,
    ServiceError,
    error_body,
)
from deployments.schemas import invalid_request_from_errors

logger = logging.getLogger("ray.serve")

LIMIT_NAME = "router.max_request_bytes"
REQUEST_ID_HEADER = "x-request-id"
MAX_REQUEST_ID_CHARS = 128


def route_path(scope: Scope) -> str:
    """The request path below the app's route prefix (Serve passes the prefix as `root_path`)."""
    path, root = scope.get("path", "/"), scope.get("root_path", "")
    return (path[len(root):] or "/") if root and path.startswith(root) else path


def request_id(request: Request) -> str:
    """The caller's X-Request-Id (Serve's proxy adds one when missing) when it is printable ASCII, else a new
    one; cached."""
    cached = getattr(request.state, "request_id", None)
    if cached:
        return cached
    given = request.headers.get(REQUEST_ID_HEADER, "").strip()[:MAX_REQUEST_ID_CHARS]
    request.state.request_id = given if given and given.isascii() and given.isprintable() else uuid.uuid4().hex
    return request.state.request_id


def error_response(error: ServiceError, scope: Scope, headers: dict[str, str] | None = None) -> JSONResponse:
    """Every error answer of the service, whatever raised it: status and body from `errors.error_body`, and
    `Retry-After` when the error carries one (a full queue)."""
    retry_after_s = getattr(error, "retry_after_s", None)
    if retry_after_s is not None:
        headers = {**(headers or {}), "Retry-After": str(retry_after_s)}
    return JSONResponse(status_code=error.status_code, content=error_body(error, route_path(scope)), headers=headers)


def too_large(size: int, limit: int, *, what: str = "the request body", exact: bool = True) -> RequestTooLargeError:
    amount = f"{size} bytes" if exact else f"more than {limit} bytes (stopped reading at {size})"
    return RequestTooLargeError(f"{what} has {amount}; the limit ({LIMIT_NAME}) is {limit}", param=LIMIT_NAME)


class BodyLimitMiddleware:
    """Reads each request body up to `limit_bytes()` (None: the router has not started; pass through)."""

    def __init__(self, app: ASGIApp, limit_bytes: Callable[[], int | None]):
        self.app = app
        self._limit_bytes = limit_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self._limit_bytes() if scope["type"] == "http" else None
        if limit is None:
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and not declared.isdigit():
            error: ServiceError = InvalidRequestError(f"Content-Length {declared!r} is not a byte count",
                                                      param="Content-Length")
            await error_response(error, scope)(scope, receive, send)
            return
        if declared is not None and int(declared) > limit:
            await error_response(too_large(int(declared), limit), scope)(scope, receive, send)
            return
        if declared is None and _header(scope, b"transfer-encoding") is not None:
            error = LengthRequiredError(
                "send the body with a Content-Length header: a body streamed without one is refused, because "
                f"its size cannot be checked against the limit ({LIMIT_NAME} {limit}) before it is read",
                param="Content-Length")
            await error_response(error, scope)(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":  # nobody reads the answer; it only closes the request
                logger.info("client disconnected after sending %d bytes of the body of %s %s",
                            size, scope.get("method"), route_path(scope))
                gone = InvalidRequestError(f"the client disconnected after {size} bytes of the body")
                await error_response(gone, scope)(scope, receive, _ignore_errors(send))
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await error_response(too_large(size, limit, exact=False), scope)(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        chunks.clear()  # the body is held once from here on
        await self.app(scope, _replay(body, receive), send)


def _ignore_errors(send: Send) -> Send:
    async def send_or_drop(message: Message) -> None:
        try:
            await send(message)
        except Exception:  # noqa: BLE001 - the connection is gone; there is no one to tell
            pass

    return send_or_drop


def _content_length(scope: Scope) -> str | None:
    return _header(scope, b"content-length")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1").strip()
    return None


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives the body read in full as one message, then defers to the real one (which
    reports a disconnect)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def install_error_handlers(app: FastAPI) -> None:
    """Every error FastAPI or Starlette raise outside the routes' own handling, in the one shape: a
    ServiceError, a request that does not match a route's parameters (400), no route (404), a wrong method
    (405), a body FastAPI could not read (400)."""

    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        error = invalid_request_from_errors(exc.errors(), body_prefix=True)
        logger.info("request %s rejected: %s", request_id(request), error.message)
        return error_response(error, request.scope)

    async def on_service_error(request: Request, exc: ServiceError) -> JSONResponse:
        return error_response(exc, request.scope)

    async def on_http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(http_exception_error(exc.status_code, exc.detail, request.scope), request.scope,
                              headers=getattr(exc, "headers", None))

    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(ServiceError, on_service_error)
    app.add_exception_handler(StarletteHTTPException, on_http_exception)


def http_exception_error(status_code: int, detail: Any, scope: Scope) -> ServiceError:
    """The service error for what Starlette or FastAPI answer themselves: no route (404), a method the route
    does not take (405), a body FastAPI could not read (400)."""
    path, method = route_path(scope), scope.get("method", "")
    if status_code == 404:
        return NotFoundError(f"{path} is not a route of this service", param="path")
    if status_code == 405:
        return MethodNotAllowedError(f"{method} is not allowed on {path}", param="method")
    if status_code == 400:
        return InvalidRequestError(f"request body: {detail}")
    error = ServiceError(str(detail))
    error.status_code = status_code
    return error
