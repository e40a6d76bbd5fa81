"""One small interface to the scoring service for the batch jobs: `await client.score(body)` takes the
body of `POST /v1/score` and returns its JSON, raising the typed errors of `deployments.errors`.

* `HttpScoringClient` (`--url`): HTTP with a pooled async client; the API key as a bearer token.
* `HandleScoringClient` (`--address`): a Serve handle from inside the Ray cluster (no HTTP, no proxy).

Both retry what is retryable (the service unavailable, a connection lost, a timeout) with exponential
backoff; anything else is raised to the job, which decides per line.
"""

from __future__ import annotations

import asyncio
import logging
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


class ScoringClient(Protocol):
    async def score(self, body: dict[str, Any]) -> dict[str, Any]:
        """`POST /v1/score` semantics: the response JSON, or a ServiceError subclass."""

    async def aclose(self) -> None:
        """Releases connections."""


class _Retrying:
    """Retries `_score_once` on retryable errors: `max_retries` more tries, backoff doubling from 0.5 s."""

    max_retries: int

    async def _score_once(self, body: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    async def score(self, body: dict[str, Any]) -> dict[str, Any]:
        delay_s = FIRST_BACKOFF_S
        for attempt in range(self.max_retries + 1):
            try:
                return await self._score_once(body)
            except ServiceError as error:
                if not error.retryable or attempt == self.max_retries:
                    raise
                logger.warning("retrying after: %s", error.message)
            await asyncio.sleep(delay_s)
            delay_s *= 2
        raise AssertionError("unreachable")


class HttpScoringClient(_Retrying):
    def __init__(self, url: str, *, api_key: str | None = None, max_connections: int = 64,
                 timeout_s: float = DEFAULT_TIMEOUT_S, max_retries: int = 5):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(
            base_url=url.rstrip("/"), headers=headers, timeout=timeout_s,
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        )
        self.max_retries = max_retries

    async def _score_once(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            response = await self._http.post("/v1/score", json=body)
        except httpx.TransportError as exc:  # connection refused or lost, timeouts: worth another try
            raise ServiceUnavailableError(f"{type(exc).__name__}: {exc}") from None
        if response.status_code == 200:
            return response.json()
        try:
            payload = response.json()
        except ValueError:
            payload = response.text
        raise service_error_from_body(response.status_code, payload)

    async def aclose(self) -> None:
        await self._http.aclose()


class HandleScoringClient(_Retrying):
    def __init__(self, address: str, *, app_name: str = "reward", max_retries: int = 5):
        import ray
        from ray import serve

        if not ray.is_initialized():
            ray.init(address=address, log_to_driver=False)
        self._handle = serve.get_app_handle(app_name)
        self.max_retries = max_retries

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
                concurrency: int) -> ScoringClient:
    """`--url` gives HTTP, `--address` a handle; exactly one of them."""
    if (url is None) == (address is None):
        raise ValueError("give exactly one of --url and --address")
    if url is not None:
        return HttpScoringClient(url, api_key=api_key, max_connections=concurrency)
    return HandleScoringClient(address, app_name=app_name)
