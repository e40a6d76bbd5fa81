"""`ModelReadiness`: ready when the model deployment's `ready` answers in time; the check's error or a timeout
(no running replica) is the reason; answers are shared for READINESS_CACHE_S. The handle here is a stand-in
with the one method a Serve handle offers for this (`ready.remote()`, awaitable). The model deployment's
liveness against its readiness while a dead rank restarts alone: tests/unit/test_model_health.py."""

from __future__ import annotations

import asyncio

from deployments import readiness
from deployments.readiness import ModelReadiness


class Handle:
    def __init__(self, behaviour: str):
        self.behaviour, self.calls = behaviour, 0
        self.ready = self

    def remote(self):
        self.calls += 1
        return self._check()

    async def _check(self) -> None:
        if self.behaviour == "hang":
            await asyncio.sleep(60)
        if self.behaviour == "broken":
            raise RuntimeError("model engine unhealthy: worker rank 3 is dead\nRuntimeError: worker rank 3 is dead")


def test_ready_broken_and_loading(monkeypatch):
    monkeypatch.setattr(readiness, "READINESS_TIMEOUT_S", 0.05)
    assert asyncio.run(ModelReadiness(Handle("ok")).not_ready()) is None
    assert asyncio.run(ModelReadiness(Handle("broken")).not_ready()) == "RuntimeError: worker rank 3 is dead"
    assert "within 0.05 s" in asyncio.run(ModelReadiness(Handle("hang")).not_ready())


def test_answers_are_shared_briefly(monkeypatch):
    handle = Handle("ok")
    probe = ModelReadiness(handle)

    async def twice() -> None:
        assert await probe.not_ready() is None
        handle.behaviour = "broken"
        assert await probe.not_ready() is None  # cached
        monkeypatch.setattr(readiness, "READINESS_CACHE_S", 0.0)
        assert await probe.not_ready() is not None

    asyncio.run(twice())
    assert handle.calls == 2


def test_concurrent_probes_share_one_check():
    handle = Handle("ok")
    probe = ModelReadiness(handle)

    async def burst() -> list:
        return await asyncio.gather(*(probe.not_ready() for _ in range(20)))

    assert asyncio.run(burst()) == [None] * 20
    assert handle.calls == 1
