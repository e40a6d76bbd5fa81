"""Readiness of the model behind the router: its deployment's `ready` (every worker pinged in its control
concurrency group, so it answers while batches are in flight) must answer within READINESS_TIMEOUT_S. (Serve's
own liveness check, `check_health`, is the same except while a dead rank is restarted alone: alive, not ready.) With no
running model replica (loading, being replaced) the call times out; a dead or hung worker fails the check.
Answers are shared for READINESS_CACHE_S, and probes arriving while a check runs wait for that one check, so
a burst of probes makes one call to the model (which keeps MODEL_CONTROL_CALLS slots per router for them:
`ServiceConfig.model_max_ongoing_calls`)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

READINESS_TIMEOUT_S = 5.0
READINESS_CACHE_S = 1.0


class ModelReadiness:
    def __init__(self, model_handle: Any):
        self._model = model_handle
        self._last: tuple[float, str | None] | None = None  # (monotonic time, why not ready or None)
        self._running: asyncio.Future | None = None  # the check in progress, shared by concurrent probes

    async def not_ready(self) -> str | None:
        """None when the model is ready, else why not."""
        if self._last is not None and time.monotonic() - self._last[0] < READINESS_CACHE_S:
            return self._last[1]
        if self._running is None or self._running.done():
            self._running = asyncio.ensure_future(self._check())
        return await asyncio.shield(self._running)

    async def _check(self) -> str | None:
        try:
            await asyncio.wait_for(self._model.ready.remote(), timeout=READINESS_TIMEOUT_S)
            reason = None
        except asyncio.TimeoutError:
            reason = f"no model replica answered its health check within {READINESS_TIMEOUT_S:g} s (loading?)"
        except Exception as exc:  # the check's own error (a dead worker) or the replica's death
            reason = str(exc).strip().splitlines()[-1] or type(exc).__name__
        self._last = (time.monotonic(), reason)
        return reason
