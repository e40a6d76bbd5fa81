"""Readiness of the model behind the router: its deployment's `check_health` (every worker pinged) must
answer within READINESS_TIMEOUT_S. With no running model replica (loading, being replaced) the call times
out; a dead worker fails the check. Answers are shared for READINESS_CACHE_S so probes stay cheap."""

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

    async def not_ready(self) -> str | None:
        """None when the model is ready, else why not."""
        if self._last is not None and time.monotonic() - self._last[0] < READINESS_CACHE_S:
            return self._last[1]
        try:
            await asyncio.wait_for(self._model.check_health.remote(), timeout=READINESS_TIMEOUT_S)
            reason = None
        except asyncio.TimeoutError:
            reason = f"no model replica answered its health check within {READINESS_TIMEOUT_S:g} s (loading?)"
        except Exception as exc:  # the check's own error (a dead worker) or the replica's death
            reason = str(exc).strip().splitlines()[-1] or type(exc).__name__
        self._last = (time.monotonic(), reason)
        return reason
