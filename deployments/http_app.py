"""The router's FastAPI app and what runs around every route: the request gate (drain gate of a graceful
stop, request id, API key, admission before work (`deployments.admission`), request counter), the body-size limit (`deployments.http_body`), the one error shape for every
status (`deployments.errors.error_body`), and the mapping of any raised error onto the typed error a client
should see. The routes themselves are methods of `deployments.router.Router` and its mixins
(`deployments.kserve_routes`, `deployments.rlhf_routes`), all registered on this `app`. No torch here.
"""

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.admission import TIMEOUT_HEADER, AdmissionGate, current_scope, parse_timeout, tenant_of
from deployments.errors import (
    ServiceError,
    ServiceUnavailableError,
    unavailable_error_from,
    unwrap_service_error,
)
from deployments.http_body import (
    REQUEST_ID_HEADER,
    BodyLimitMiddleware,
    error_response,
    install_error_handlers,
    route_path,
)
from deployments.http_body import request_id as _request_id
from deployments.openapi_docs import install_openapi
from deployments.schemas import invalid_request_from_errors

logger = logging.getLogger("ray.serve")

DEVICE_HEADER = b"x-reward-device"  # on every answer: cpu, cuda, or simulated:<card>
SCORING_PATHS = frozenset({"/v1/score", "/v1/chat/completions", "/get_reward", "/classify", "/pooling"})

app = FastAPI(title="Reward scoring service")
# Inside the RequestGate below (added later = outer).
app.add_middleware(BodyLimitMiddleware, limit_bytes=lambda: getattr(app.state, "max_request_bytes", None))
install_error_handlers(app)
install_openapi(app)


def as_service_error(exc: BaseException) -> ServiceError | None:
    """Maps an error from our code or a downstream handle onto the typed error a client should see;
    None when it is not the client's business (it then becomes a 500 / is re-raised)."""
    service_error = unwrap_service_error(exc)
    if service_error is not None:
        return service_error
    if isinstance(exc, ValidationError):
        return invalid_request_from_errors(exc.errors())
    return unavailable_error_from(exc)


def error_response_for(error: ServiceError, request: Request) -> JSONResponse:
    return error_response(error, request.scope)


def requires_api_key(path: str) -> bool:
    """The scoring routes; health, metadata and model listing stay open."""
    return path in SCORING_PATHS or (path.startswith("/v2/models/") and path.endswith("/infer"))


class RequestGate:
    """Pure ASGI middleware around every route (no task and stream pair per request, as Starlette's
    `BaseHTTPMiddleware` spends): the drain gate of a graceful stop (once `Router.drain` was called, new
    requests get a 503; the requests in flight are counted in `app.state.in_flight`), the request id, the API
    key (checked before any body is read, so a keyless request always gets 401), and the per-route request
    counter."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        state = request.app.state
        device = getattr(state, "device_label", None)
        if device is not None:
            send = _with_header(send, DEVICE_HEADER, device.encode())
        if getattr(state, "draining", False):
            await error_response_for(ServiceUnavailableError("the service is shutting down"), request)(
                scope, receive, send)
            return
        state.in_flight = getattr(state, "in_flight", 0) + 1
        try:
            await self._gated(request, receive, send)
        finally:
            state.in_flight -= 1

    async def _gated(self, request: Request, receive: Receive, send: Send) -> None:
        scope = request.scope
        request_id = _request_id(request)
        # Serve's proxy already echoes X-Request-Id on every response; set it only when nobody else will.
        echo_id = REQUEST_ID_HEADER not in request.headers
        status = [500]

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                headers = message.get("headers", [])
                if echo_id and not any(name.lower() == REQUEST_ID_HEADER.encode() for name, _ in headers):
                    message = {**message, "headers": [*headers, (REQUEST_ID_HEADER.encode(), request_id.encode())]}
            await send(message)

        rejection = self._key_rejection(request, request_id)
        gate, admitted = None, None
        if rejection is None and requires_api_key(route_path(scope)):
            gate = getattr(request.app.state, "admission", None)
            rejection, admitted = self._admission(request, gate)
        try:
            await (rejection or self.app)(scope, receive, send_with_id)
        finally:  # an error escaping the app is counted as the 500 Starlette answers for it
            if admitted is not None:
                gate.release()
                current_scope.reset(admitted)
            metrics = getattr(request.app.state, "metrics", None)
            if metrics is not None:
                metrics.request(route_name(request), status[0])

    @staticmethod
    def _admission(request: Request, gate: AdmissionGate | None) -> tuple[JSONResponse | None, Any]:
        """Admission before the body is read (`deployments.admission`): the 503 to answer, or the context
        token of the admitted request's scope (tenant, arrival, the `X-Request-Timeout` deadline)."""
        if gate is None:
            return None, None
        try:
            timeout_s = parse_timeout(request.headers.get(TIMEOUT_HEADER), "X-Request-Timeout", gate.max_timeout_s)
            keyed = request.app.state.api_key_check.enabled
            admitted = gate.admit(tenant_of(request.headers.get("authorization")) if keyed else None, timeout_s)
        except ServiceError as error:
            return error_response_for(error, request), None
        return None, current_scope.set(admitted)

    @staticmethod
    def _key_rejection(request: Request, request_id: str) -> JSONResponse | None:
        if not requires_api_key(route_path(request.scope)):
            return None
        try:
            request.app.state.api_key_check.check(request.headers.get("authorization"))
        except AttributeError:  # the router has not finished starting: never serve unchecked
            return error_response_for(ServiceUnavailableError("the service is starting, retry later"), request)
        except ServiceError as error:
            logger.info("request %s rejected: %s", request_id, error.message)
            return error_response_for(error, request)
        return None


def _with_header(send: Send, name: bytes, value: bytes) -> Send:
    async def send_with_header(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", []), (name, value)]}
        await send(message)

    return send_with_header


# Outermost (added last): the gate, then the body limit, so a keyless request gets 401 before its body is read.
app.add_middleware(RequestGate)


def route_name(request: Request) -> str:
    route = request.scope.get("route")
    return getattr(route, "path", None) or "unmatched"
