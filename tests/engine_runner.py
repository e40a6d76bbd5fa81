"""Runs the real MegatronEngine outside Serve: a placement group from the config's plan, the engine's worker
actors inside it, one scoring call; everything released afterwards. Needs a connected Ray cluster."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import numpy as np
import ray
from ray.util.placement_group import placement_group, remove_placement_group

from configs.service import ServiceConfig


def score_with_engine(config: ServiceConfig, token_batch: Sequence[Sequence[int]],
                      inspect: Callable[[object], None] | None = None) -> np.ndarray:
    """Scores `token_batch`; `inspect(engine)` runs while the workers are still alive."""
    return score_batches_with_engine(config, [token_batch], inspect)[0]


def score_batches_with_engine(config: ServiceConfig, token_batches: Sequence[Sequence[Sequence[int]]],
                              inspect: Callable[[object], None] | None = None, worker_class: type | None = None
                              ) -> list[np.ndarray]:
    """Scores all `token_batches` at once (every batch in flight together, none awaited before the last is
    submitted); `inspect(engine)` runs while the workers are still alive; `worker_class`: a fault-injecting
    `ModelWorker` subclass (tests/fault_workers.py)."""
    from sharding.engine import MegatronEngine
    from sharding.placement import placement_for

    plan = placement_for(config)
    pg = placement_group(plan.bundles, strategy=plan.strategy)
    ray.get(pg.ready(), timeout=60)
    try:
        engine = MegatronEngine(config, pg, **({"worker_class": worker_class} if worker_class else {}))
        try:
            async def all_batches():
                return await asyncio.gather(*(engine.score(batch) for batch in token_batches))

            rewards = asyncio.run(all_batches())
            if inspect is not None:
                inspect(engine)
            return rewards
        finally:
            engine.shutdown()
    finally:
        remove_placement_group(pg)
