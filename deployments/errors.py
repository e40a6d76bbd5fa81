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

    def __init__(self, conversation_index: int, num_tokens: int, limit_tokens: int, detail: str | None = None):
        message = f"conversations[{conversation_index}] has {num_tokens} tokens; the limit is {limit_tokens}"
        if detail:
            message = f"{message}; {detail}"
        super().__init__(message, param=f"conversations[{conversation_index}]")
        self.conversation_index = conversation_index
        self.num_tokens = num_tokens
        self.limit_tokens = limit_tokens
        self.detail = detail

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.conversation_index, self.num_tokens, self.limit_tokens, self.detail))


class ServiceUnavailableError(ServiceError):
    """The model cannot compute right now (a worker died, the queue is full); retry later."""

    status_code = 503
    error_type = "service_unavailable"
    retryable = True


def unwrap_service_error(exc: BaseException) -> ServiceError | None:
    """The ServiceError inside `exc` (itself, or the cause Ray wrapped), or None when there is none."""
    cause = getattr(exc, "cause", None)  # ray.exceptions.RayTaskError keeps the original as `cause`
    if isinstance(cause, ServiceError):
        return cause
    if isinstance(exc, ServiceError):
        return exc
    return None
