"""The model deployment's two health answers: Serve's liveness (`check_health`: fails only when the engine is
broken, and Serve then replaces the replica) and readiness (`ready`, what the routers' `/health` asks: 503 while
loading, broken or recovering). A dead rank restarted alone (`sharding.restart`) is alive but not ready: the
restart may take longer than Serve's failed-check threshold (one 340B rank's shard), and it ends serving again
or broken."""

from __future__ import annotations

import asyncio

import pytest

from deployments.reward_model import RewardModelDeployment
from sharding.protocol import EngineUnavailableError


class RecoveringEngine:
    """An engine restarting a dead rank alone: its health check fails with "recovering" until it is done."""

    def __init__(self):
        self.recovering: str | None = "worker rank 1 died"
        self.broken: str | None = None

    async def check_health(self) -> None:
        if self.recovering or self.broken:
            raise EngineUnavailableError(f"recovering: {self.recovering}" if self.recovering else self.broken)


def test_a_replica_restarting_one_rank_is_alive_but_not_ready():
    model = object.__new__(RewardModelDeployment.func_or_class)
    model.engine = RecoveringEngine()
    asyncio.run(model.check_health())  # alive: Serve keeps the replica
    with pytest.raises(RuntimeError, match="recovering: worker rank 1 died"):
        asyncio.run(model.ready())
    model.engine.recovering = None  # restarted: ready and alive
    asyncio.run(model.ready())
    asyncio.run(model.check_health())
    model.engine.broken = "the partial restart failed"  # broken: neither
    for check in (model.ready, model.check_health):
        with pytest.raises(RuntimeError, match="the partial restart failed"):
            asyncio.run(check())
