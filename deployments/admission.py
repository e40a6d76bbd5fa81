"""Admission before work: what a router replica refuses before it reads or tokenizes a request, and the
request's deadline.

Every scoring request passes `AdmissionGate.admit` first (the HTTP middleware, `deployments.http_app`, before
the body is read; the handle's `score` before validation). It is refused at once with 503 + Retry-After when

* the replica already holds `router.max_ongoing_requests` requests (being read, tokenized, queued or
  computed);
* the batch queue is full (`router.max_queued_tokens` computed tokens waiting);
* its deadline is shorter than the queue's estimated wait (`TokenBatcher.estimated_wait_s`).

Retry-After is the time the queue takes to drain at the rate measured over recent batches. A request that
passes carries a `RequestScope` (its tenant, arrival time and deadline) in a context variable to the scoring
path, which hands the batcher what is left of the deadline: the time spent reading and tokenizing counts.

A deadline comes from `timeout_s` in the JSON body, the `X-Request-Timeout` header (seconds), or the
handle's `timeout_s` argument; the shortest wins. No torch here.
"""

from __future__ import annotations

import hashlib
import importlib
import math
import time
from collections.abc import Hashable
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import Any

from deployments.errors import DeadlineExceededError, InvalidRequestError, OverloadedError

TIMEOUT_HEADER = "x-request-timeout"
TIMEOUT_FIELD = "timeout_s"


@dataclass
class RequestScope:
    tenant: Hashable = None
    arrived_s: float = 0.0
    timeout_s: float | None = None

    def with_timeout(self, timeout_s: float | None) -> RequestScope:
        """The scope with the shorter of its deadline and `timeout_s` (from the body)."""
        if timeout_s is None or (self.timeout_s is not None and self.timeout_s <= timeout_s):
            return self
        return RequestScope(self.tenant, self.arrived_s, timeout_s)

    def remaining_s(self) -> float | None:
        """Seconds left until the deadline (None: no deadline); raises the 504 once it has passed."""
        if self.timeout_s is None:
            return None
        waited_s = time.perf_counter() - self.arrived_s
        left = self.timeout_s - waited_s
        if left <= 0:
            raise DeadlineExceededError(self.timeout_s, waited_s)
        return left


class _ScopeVar:
    """The context variable of the current request's scope. Serve pickles the FastAPI app (its middleware
    refers to this object), and a ContextVar does not pickle: this holder pickles as a reference to the one
    instance of the process that unpickles it."""

    def __init__(self) -> None:
        self._var: ContextVar[RequestScope | None] = ContextVar("reward_request_scope", default=None)

    def get(self) -> RequestScope | None:
        return self._var.get()

    def set(self, scope: RequestScope) -> Token:
        return self._var.set(scope)

    def reset(self, token: Token) -> None:
        self._var.reset(token)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_imported, (__name__, "current_scope"))


def _imported(module: str, name: str) -> Any:
    """`module.name` as imported in this process (one scope variable per process, however pickled)."""
    return getattr(importlib.import_module(module), name)


current_scope = _ScopeVar()


def tenant_of(authorization: str | None) -> Hashable:
    """The fair-share tenant of a request: a digest of its API key (None when auth is off or no key is sent)."""
    if not authorization:
        return None
    return hashlib.sha256(authorization.strip().encode("utf-8")).hexdigest()[:16]


def parse_timeout(value: Any, param: str, max_timeout_s: float) -> float | None:
    """A positive finite number of seconds up to `max_timeout_s`, or None; a 400 naming `param` otherwise."""
    if value is None:
        return None
    try:
        seconds = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        seconds = math.nan
    if not math.isfinite(seconds) or seconds <= 0:
        raise InvalidRequestError(f"{param} must be a positive number of seconds; got {value!r}", param=param)
    if seconds > max_timeout_s:
        raise InvalidRequestError(f"{param} is {seconds:g} s; the limit (router.max_timeout_s) is {max_timeout_s:g}",
                                  param=param)
    return seconds


class AdmissionGate:
    """Counts the requests a router replica holds and refuses, at once, those it cannot take."""

    def __init__(self, batcher: Any, max_ongoing_requests: int, max_queued_tokens: int, max_timeout_s: float):
        self._batcher = batcher
        self.max_ongoing_requests = max_ongoing_requests
        self._max_queued_tokens = max_queued_tokens
        self.max_timeout_s = max_timeout_s
        self.ongoing = 0
        self.refused = 0

    def admit(self, tenant: Hashable = None, timeout_s: float | None = None) -> RequestScope:
        """Takes one slot (give it back with `release`) or raises OverloadedError (503 + Retry-After)."""
        problem = None
        if self.ongoing >= self.max_ongoing_requests:
            problem = (f"the router holds {self.ongoing} requests; the limit (router.max_ongoing_requests) is "
                       f"{self.max_ongoing_requests}")
        elif self._batcher.queued_tokens >= self._max_queued_tokens:
            problem = (f"the router's queue is full: {self._batcher.queued_tokens} tokens are waiting; the limit "
                       f"(router.max_queued_tokens) is {self._max_queued_tokens}")
        elif timeout_s is not None and (wait_s := self._batcher.estimated_wait_s()) > timeout_s:
            problem = (f"the request's deadline cannot be met: timeout is {timeout_s:g} s and the queue's estimated "
                       f"wait is {wait_s:.1f} s")
        if problem is not None:
            self.refused += 1
            retry_after_s = self._batcher.retry_after_s()
            raise OverloadedError(f"{problem}; retry after {retry_after_s} s", retry_after_s=retry_after_s)
        self.ongoing += 1
        return RequestScope(tenant, time.perf_counter(), timeout_s)

    def release(self) -> None:
        self.ongoing -= 1
