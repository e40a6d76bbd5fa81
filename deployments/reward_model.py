"""The model deployment: owns the placement group's workers through an injected RewardEngine.

Serve reserves the placement group (`placement_group_bundles` from `sharding.placement`) for each replica;
the replica runs in bundle 0 and the engine puts one worker per rank into its stage's bundle. Serve's
health check pings every worker, so a dead worker gets the replica (and its placement group) replaced.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from ray import serve
from ray.util import get_current_placement_group

from configs.service import ServiceConfig
from sharding.protocol import EngineUnavailableError, PartialScores, RewardEngine

EngineFactory = Callable[[ServiceConfig], RewardEngine]


def megatron_engine(config: ServiceConfig) -> RewardEngine:
    from sharding.engine import MegatronEngine  # torch lives only in the worker actors

    return MegatronEngine(config, get_current_placement_group())


@serve.deployment(health_check_period_s=10, health_check_timeout_s=30, graceful_shutdown_timeout_s=60)
class RewardModelDeployment:
    def __init__(self, config: dict, engine_factory: EngineFactory = megatron_engine):
        self.config = ServiceConfig.model_validate(config)
        self.engine = engine_factory(self.config)

    async def score(self, token_batch: Sequence[Sequence[int]]) -> np.ndarray | PartialScores:
        """Rewards float32 [B, num_attributes] for token lists (one per prompt, unpadded), or PartialScores when
        a fault inside a forward was pinned to some prompts (their rows fail, the rest are scored; the router
        maps it with `deployments.prompt_faults`); raises EngineUnavailableError naming this replica, so
        routers retry elsewhere and avoid it."""
        try:
            return await self.engine.score(token_batch)
        except EngineUnavailableError as e:
            raise EngineUnavailableError(e.message, replica_id=serve.get_replica_context().replica_id.unique_id
                                         ) from None

    async def score_tagged(self, token_batch: Sequence[Sequence[int]]) -> tuple[np.ndarray, str]:
        """`score`, with this replica's id (the router reports it in each response's `usage`)."""
        return await self.score(token_batch), serve.get_replica_context().replica_id.unique_id

    def record_routing_stats(self) -> dict:
        """Polled by Serve for every router's request router (deployments.model_routing)."""
        engine = self.engine  # a partial restart (a dead worker being replaced) counts as broken until it is done
        return {"engine_broken": bool(getattr(engine, "broken", None) or getattr(engine, "recovering", None))}

    def describe(self) -> list[dict]:
        """Worker placement (rank, stage, node, actor id), when the engine can tell."""
        describe = getattr(self.engine, "describe", None)
        return describe() if describe else []

    def simulated_stats(self, reset: bool = False) -> list[dict]:
        """Each rank's modelled busy time on a simulated device, pipeline stage by stage (TP rank 0 of each)."""
        stats = self.engine.simulated_stats(reset)
        tp = self.config.parallel.tensor_parallel_size
        return [s for s in stats if s["rank"] % tp == 0]

    async def check_health(self) -> None:
        """Serve's liveness check: fails (and Serve replaces the replica) when the engine is broken. A partial
        restart in progress (`sharding.restart`) is alive: it ends serving again or broken, and its shard read
        may take longer than Serve's failed-check threshold. Readiness (`ready`) is 503 meanwhile."""
        if getattr(self.engine, "recovering", None):
            return
        await self.ready()

    async def ready(self) -> None:
        """Readiness, what the routers' `/health` and `/v2/health/ready` ask: raises while the model is loading
        (the call waits), broken or recovering."""
        try:
            await self.engine.check_health()
        except EngineUnavailableError as e:
            raise RuntimeError(f"model engine unhealthy: {e.message}") from None

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
