"""The router's FastAPI app and what runs around every route: the request-id and API-key middleware, the
drain gate of a graceful stop, the body-size limit (`deployments.http_body`), the one error shape for every
status (`deployments.errors.error_body`), and the mapping of any raised error onto the typed error a client
should see. The routes themselves are methods of `deployments.router.Router` and its mixins
(`deployments.kserve_routes`, `deployments.rlhf_routes`), all registered on this `app`. No torch here.
"""

import logging

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

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

SCORING_PATHS = frozenset({"/v1/score", "/v1/chat/completions", "/get_reward", "/classify", "/pooling"})

app = FastAPI(title="Reward scoring service")
# Inside the request middleware below (added later = outer), so a keyless request gets 401 before its body is read.
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


@app.middleware("http")
async def _request_middleware(request: Request, call_next):
    """Request id, API key (before any body parsing, so a keyless request always gets 401), and the
    per-route request counter."""
    request_id = _request_id(request)
    if requires_api_key(route_path(request.scope)):
        try:
            request.app.state.api_key_check.check(request.headers.get("authorization"))
        except AttributeError:  # the router has not finished starting: never serve unchecked
            response = error_response_for(ServiceUnavailableError("the service is starting, retry later"), request)
        except ServiceError as error:
            logger.info("request %s rejected: %s", request_id, error.message)
            response = error_response_for(error, request)
        else:
            response = await call_next(request)
    else:
        response = await call_next(request)
    # Serve's proxy already echoes X-Request-Id on every response; set it only when nobody else will.
    if REQUEST_ID_HEADER not in request.headers and REQUEST_ID_HEADER not in response.headers:
        response.headers[REQUEST_ID_HEADER] = request_id
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.request(route_name(request), response.status_code)
    return response


@app.middleware("http")
async def _drain_middleware(request: Request, call_next):
    """Counts the HTTP requests in flight; once `Router.drain` was called, new ones get a 503."""
    state = request.app.state
    if getattr(state, "draining", False):
        return error_response_for(ServiceUnavailableError("the service is shutting down"), request)
    state.in_flight = getattr(state, "in_flight", 0) + 1
    try:
        return await call_next(request)
    finally:
        state.in_flight -= 1


def route_name(request: Request) -> str:
    route = request.scope.get("route")
    return getattr(route, "path", None) or "unmatched"
