"""Typed service errors: one JSON error shape for HTTP and the same types for handle callers.

The errors cross Ray process boundaries (scoring replica -> router -> handle caller), so each one pickles
with all its fields through `__reduce__`. Ray delivers a remote error as a subclass of both `RayTaskError`
and the original type, so `except InvalidRequestError` works in a handle caller; `unwrap_service_error`
gives back the original object.
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Base of the errors a client is meant to see; `to_body()` is the one error JSON shape."""

    status_code: int = 500
    error_type: str = "internal_error"
    retryable: bool = False

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message, self.param))

    def to_body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.status_code,
            }
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(message={self.message!r}, param={self.param!r})"


class InvalidRequestError(ServiceError):
    """The request is malformed or breaks a rule; retrying it unchanged fails again."""

    status_code = 400
    error_type = "invalid_request_error"


class InputTooLongError(InvalidRequestError):
    """One conversation renders to more tokens than the per-conversation limit."""

    error_type = "input_too_long"

    def __init__(
        self,
        conversation_index: int,
        num_tokens: int,
        limit_tokens: int,
        detail: str | None = None,
        field: str | None = None,
    ):
        """`field` names the input in another API's terms (e.g. `messages`); default `conversations[i]`."""
        param = field or f"conversations[{conversation_index}]"
        message = f"{param} has {num_tokens} tokens; the limit is {limit_tokens}"
        if detail:
            message = f"{message}; {detail}"
        super().__init__(message, param=param)
        self.conversation_index = conversation_index
        self.num_tokens = num_tokens
        self.limit_tokens = limit_tokens
        self.detail = detail
        self.field = field

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.conversation_index, self.num_tokens, self.limit_tokens, self.detail, self.field))


class RequestTooLargeError(ServiceError):
    """The request body is over `router.max_request_bytes` (as sent or decompressed)."""

    status_code = 413
    error_type = "request_too_large"


class LengthRequiredError(ServiceError):
    """A request body sent without `Content-Length` (chunked): its size cannot be checked before it is read."""

    status_code = 411
    error_type = "length_required"


class AuthenticationError(ServiceError):
    """The API key is missing or wrong (`Authorization: Bearer <key>`)."""

    status_code = 401
    error_type = "authentication_error"


class NotFoundError(ServiceError):
    """The request names a model (or other resource) this service does not have."""

    status_code = 404
    error_type = "not_found_error"


class MethodNotAllowedError(ServiceError):
    """The route exists but does not take this HTTP method."""

    status_code = 405
    error_type = "method_not_allowed"


class ServiceUnavailableError(ServiceError):
    """The model cannot compute right now (a worker died, the queue is full); retry later."""

    status_code = 503
    error_type = "service_unavailable"
    retryable = True


class OverloadedError(ServiceUnavailableError):
    """The router's queue is full (`router.max_queued_tokens`); retry after `retry_after_s` seconds (sent as
    the `Retry-After` header over HTTP)."""

    def __init__(self, message: str, retry_after_s: int = 1, param: str | None = None):
        super().__init__(message, param=param)
        self.retry_after_s = retry_after_s

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message, self.retry_after_s, self.param))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(message={self.message!r}, retry_after_s={self.retry_after_s!r})"


class DeadlineExceededError(ServiceError):
    """The request's deadline (`timeout_s`, `X-Request-Timeout`, or the handle's `timeout_s`) passed before it
    was answered; its prompts still queued were dropped (504)."""

    status_code = 504
    error_type = "deadline_exceeded"
    retryable = True

    def __init__(self, timeout_s: float, waited_s: float, dropped_prompts: int = 0, total_prompts: int = 0,
                 param: str | None = "timeout_s"):
        dropped = (f"; {dropped_prompts} of its {total_prompts} prompts were still queued and were dropped"
                   if total_prompts else "")
        super().__init__(f"the request's deadline of {timeout_s:g} s (timeout_s) passed after it waited "
                         f"{waited_s:.2f} s{dropped}", param=param)
        self.timeout_s = timeout_s
        self.waited_s = waited_s
        self.dropped_prompts = dropped_prompts
        self.total_prompts = total_prompts

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.timeout_s, self.waited_s, self.dropped_prompts, self.total_prompts, self.param))


def service_error_from_body(status_code: int, body: Any) -> ServiceError:
    """Rebuilds the typed error from an HTTP error response (the one error shape), for HTTP clients."""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return ServiceError(f"HTTP {status_code}: {str(body)[:500]}")
    types = {cls.status_code: cls for cls in (InvalidRequestError, AuthenticationError, NotFoundError,
                                              LengthRequiredError, RequestTooLargeError, ServiceUnavailableError)}
    cls = types.get(status_code, ServiceError)
    return cls(str(error.get("message", f"HTTP {status_code}")), param=error.get("param"))


def error_body(error: ServiceError, path: str) -> dict[str, Any]:
    """The JSON body of an error answered on `path` (below the route prefix): the single place that
    decides the error shape of every route and status (404, 405, 413, body-parse errors included). Under
    `/v2` it is KServe's `{"error": message}` (what Triton and KServe clients parse); elsewhere the
    service's `{"error": {"message", "type", "param", "code"}}`."""
    if path == "/v2" or path.startswith("/v2/"):
        return {"error": error.message}
    return error.to_body()


def unwrap_service_error(exc: BaseException) -> ServiceError | None:
    """The ServiceError inside `exc` (itself, or the cause Ray wrapped), or None when there is none."""
    cause = getattr(exc, "cause", None)  # ray.exceptions.RayTaskError keeps the original as `cause`
    if isinstance(cause, ServiceError):
        return cause
    if isinstance(exc, ServiceError):
        return exc
    return None


def unavailable_error_from(exc: BaseException) -> ServiceUnavailableError | None:
    """Ray's and the engine's ways of saying "the model or a replica is gone or full", as the retryable 503
    a client should see; None for anything else. Ray is imported here, not at module level, so HTTP clients
    (`jobs`) import this module without Ray or Serve."""
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    from sharding.protocol import EngineUnavailableError

    if not isinstance(exc, (EngineUnavailableError, RayActorError, BackPressureError, DeploymentUnavailableError)):
        return None
    cause = getattr(exc, "cause", None) or exc
    message = getattr(cause, "message", None) or str(cause).strip().splitlines()[-1]
    return ServiceUnavailableError(f"the model is unavailable, retry later: {message}")
