"""One small interface to the scoring service for the batch jobs: `await client.score(body)` takes the
body of `POST /v1/score` and returns its JSON, raising the typed errors of `deployments.errors`.

* `HttpScoringClient` (`--url`): HTTP with a pooled async client; the API key as a bearer token.
* `HandleScoringClient` (`--address`): a Serve handle from inside the Ray cluster (no HTTP, no proxy).

Both retry what is retryable: the service unavailable (503, a dead worker), transport errors (connection
refused or lost, timeouts), 502 and 504 from a gateway, and the plain-text 500 Ray Serve's proxy answers
while a router replica is dead or being replaced (the service's own errors are JSON and are not retried).
Backoff is exponential with full jitter (a random wait up to 0.5 s, 1 s, 2 s, ... capped at 10 s), and the
retry budget is a deadline: a request is retried until `max_retry_s` seconds have passed since its first
failure (`--max-retry-s`; the default rides out a 340B replica reloading its weights, about 10 minutes);
`retries` counts them all (the jobs show it as progress).
Anything else is raised to the job, which decides per line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from typing import Any, Protocol

import httpx

from deployments.errors import (
    ServiceError,
    ServiceUnavailableError,
    service_error_from_body,
    unavailable_error_from,
    unwrap_service_error,
)

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 600.0
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 10.0
DEFAULT_MAX_RETRY_S = 900.0  # a full 340B replica reload (~10 minutes: restart, placement, weights) and margin
RETRYABLE_STATUS = frozenset({502, 503, 504})


class ScoringClient(Protocol):
    retries: int

    async def score(self, body: dict[str, Any]) -> dict[str, Any]:
        """`POST /v1/score` semantics: the response JSON, or a ServiceError subclass."""

    async def aclose(self) -> None:
        """Releases connections."""


class _Retrying:
    """Retries `_score_once` on retryable errors until `max_retry_s` seconds after the request's first
    failure, with jittered exponential backoff (never sleeping past the deadline)."""

    max_retry_s: float
    first_backoff_s: float = FIRST_BACKOFF_S  # the cap scales with it (MAX_BACKOFF_S at the default)
    retries: int = 0

    async def _score_once(self, body: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    async def score(self, body: dict[str, Any]) -> dict[str, Any]:
        deadline = None
        attempt = 0
        while True:
            try:
                return await self._score_once(body)
            except ServiceError as error:
                now = time.monotonic()
                deadline = now + self.max_retry_s if deadline is None else deadline
                if not error.retryable or now >= deadline:
                    if error.retryable:
                        error.message += f" (still failing after the retry budget, --max-retry-s {self.max_retry_s:g})"
                        error.args = (error.message,)
                    raise
                self.retries += 1
                logger.warning("retrying (%d so far) after: %s", self.retries, error.message)
            cap = MAX_BACKOFF_S * self.first_backoff_s / FIRST_BACKOFF_S
            wait = random.uniform(0, min(cap, self.first_backoff_s * 2**min(attempt, 30)))
            await asyncio.sleep(min(wait, max(0.0, deadline - time.monotonic())))
            attempt += 1


def error_from_response(status_code: int, text: str) -> ServiceError:
    """The typed error of an HTTP error answer; gateway errors and a non-JSON 500 (Ray Serve's proxy while
    the router replica is dead) are retryable, as is a 503."""
    try:
        payload: Any = json.loads(text)
    except ValueError:
        payload = None
    error = service_error_from_body(status_code, payload if payload is not None else text)
    is_ours = isinstance(payload, dict) and isinstance(payload.get("error"), dict)
    if status_code in RETRYABLE_STATUS or (status_code == 500 and not is_ours):
        return ServiceUnavailableError(f"HTTP {status_code}: {text.strip()[:300]}")
    return error


class HttpScoringClient(_Retrying):
    def __init__(self, url: str, *, api_key: str | None = None, max_connections: int = 64,
                 timeout_s: float = DEFAULT_TIMEOUT_S, max_retry_s: float = DEFAULT_MAX_RETRY_S,
                 first_backoff_s: float = FIRST_BACKOFF_S):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            base_url=url.rstrip("/"), headers=headers, timeout=timeout_s,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )
        self.max_retry_s = max_retry_s
        self.first_backoff_s = first_backoff_s

    async def _score_once(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            response = await self._http.post("/v1/score", json=body)
        except httpx.TransportError as exc:  # connection refused or lost, timeouts: worth another try
            raise ServiceUnavailableError(f"{type(exc).__name__}: {exc}") from None
        if response.status_code == 200:
            try:
                return response.json()
            except ValueError:  # cut short by a replica that died while answering
                raise ServiceUnavailableError("HTTP 200 with a body that is not complete JSON") from None
        raise error_from_response(response.status_code, response.text)

    async def aclose(self) -> None:
        await self._http.aclose()


class HandleScoringClient(_Retrying):
    def __init__(self, address: str, *, app_name: str = "reward", max_retry_s: float = DEFAULT_MAX_RETRY_S):
        import ray
        from ray import serve

        if not ray.is_initialized():
            ray.init(address=address, log_to_driver=False)
        self._handle = serve.get_app_handle(app_name)
        self.max_retry_s = max_retry_s

    async def _score_once(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            return await self._handle.score.remote(body)
        except Exception as exc:  # typed errors come back wrapped by Ray; map them as the router does
            error = unwrap_service_error(exc) or unavailable_error_from(exc)
            if error is None:
                raise
            raise error from None

    async def aclose(self) -> None:
        return None


def make_client(url: str | None, address: str | None, *, app_name: str, api_key: str | None,
                concurrency: int, max_retry_s: float = DEFAULT_MAX_RETRY_S) -> ScoringClient:
    """`--url` gives HTTP, `--address` a handle; exactly one of them."""
    if (url is None) == (address is None):
        raise ValueError("give exactly one of --url and --address")
    if url is not None:
        return HttpScoringClient(url, api_key=api_key, max_connections=concurrency, max_retry_s=max_retry_s)
    return HandleScoringClient(address, app_name=app_name, max_retry_s=max_retry_s)
