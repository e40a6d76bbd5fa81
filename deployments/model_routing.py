"""How a router replica picks the model replica for a batch, retries a batch whose replica failed, and sizes
its batches in flight to the model replicas running: Serve's request-router API
(`RequestRouterConfig(request_router_class=HealthyReplicasFirst)` on the model deployment, set by
`serve_app.build_app`). No torch here.

A model replica whose engine failed (a worker died, a forward raised) stays in Serve's list until its health
check fails and Serve replaces it: seconds in which the default router would keep sending it batches that fail
at once. So a broken replica is left out of the choice:
* at once, in this router process: a batch that failed with `EngineUnavailableError` names the replica it ran
  on (`mark_broken`), and the router retries it on another replica (`deployments.router`);
* in every router process: each model replica reports `{"engine_broken": ...}` as its routing stats
  (`RewardModelDeployment.record_routing_stats`), which Serve polls.
Among the healthy replicas, two are drawn at random and Serve sends the batch to the one with the shorter queue
(power of two choices, as Serve's default router). With no healthy replica left, all are candidates: the batch
then fails with the replica's own 503, as with one replica.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import random
import time
from typing import Any

from ray import serve
from ray.serve._private.request_router.request_router import FIFOMixin, RequestRouter

from configs.service import ServiceConfig
from sharding.protocol import EngineUnavailableError

logger = logging.getLogger("ray.serve")

MODEL_REQUEST_ROUTER = "deployments.model_routing.HealthyReplicasFirst"
ROUTING_STATS_PERIOD_S = 2.0  # how often Serve asks each model replica for `record_routing_stats`
BROKEN_FOR_S = 600.0  # a replica marked broken here is avoided this long (Serve replaces it well before)
_broken: dict[str, float] = {}  # replica id -> when this process saw its engine fail


def _marks() -> dict[str, float]:
    """This process's marks. Serve ships the request-router class to the router replicas pickled by value, so
    its functions see a copy of this module's globals; the marks live in the module as imported."""
    return importlib.import_module(__name__)._broken


def mark_broken(replica_id: str | None) -> None:
    """Records that a batch failed on this model replica's broken engine (process-local)."""
    if replica_id:
        _marks()[replica_id] = time.monotonic()


def is_broken(replica: Any) -> bool:
    seen = _marks().get(replica.replica_id.unique_id)
    if seen is not None and time.monotonic() - seen < BROKEN_FOR_S:
        return True
    return bool((replica.routing_stats or {}).get("engine_broken", False))


class HealthyReplicasFirst(FIFOMixin, RequestRouter):
    async def choose_replicas(self, candidate_replicas: list, pending_request: Any = None) -> list[list]:
        healthy = [r for r in candidate_replicas if not is_broken(r)] or list(candidate_replicas)
        if len(healthy) <= 2:
            return [healthy]
        return [random.sample(healthy, 2)]


MODEL_DEPLOYMENT = "RewardModelDeployment"  # its name in the app (serve_app.build_app)
FAILOVER_ATTEMPTS = 3  # a batch is sent at most this often when a model replica fails under it
FAILOVER_BACKOFF_S = 0.2  # times the attempt number, before sending it again
REPLICA_POLL_INTERVAL_S = 2.0


def batches_in_flight_for(config: ServiceConfig, running_model_replicas: int | None) -> int:
    """The router's cap on batches in flight: `max_batches_in_flight` per running model replica. Fixed replicas:
    all of them. Autoscaling: those running (the minimum before the first count), plus one replica's share
    while below the maximum, so that load beyond the running replicas queues at them and Serve scales up."""
    per_replica = config.max_batches_in_flight
    scaling = config.model.autoscaling
    if scaling is None:
        return per_replica * config.model.num_replicas
    running = max(1, scaling.min_replicas if running_model_replicas is None else running_model_replicas)
    return per_replica * (running + (1 if running < scaling.max_replicas else 0))


def fails_over(config: ServiceConfig, exc: BaseException, attempt: int) -> bool:
    """Whether a batch that failed on a model replica is sent again (to another replica): only with more than
    one model replica configured, only for a dead replica or a broken engine (scoring is idempotent), at most
    FAILOVER_ATTEMPTS times in all. With one replica the 503 goes to the client at once, as it always did."""
    from ray.exceptions import RayActorError

    if config.model.max_replicas < 2 or attempt + 1 >= FAILOVER_ATTEMPTS:
        return False
    if not isinstance(exc, (EngineUnavailableError, RayActorError)):
        return False
    replica_id = getattr(getattr(exc, "cause", None) or exc, "replica_id", None)
    mark_broken(replica_id)
    logger.warning("a model batch failed on model replica %s (%s); sending it to another one", replica_id,
                   str(exc).strip().splitlines()[-1][:200])
    return True


async def follow_model_replicas(config: ServiceConfig, batcher: Any) -> None:
    """Every REPLICA_POLL_INTERVAL_S, sets the batcher's cap from the model replicas Serve reports running."""
    context = serve.get_replica_context()
    while True:
        try:
            status = await asyncio.get_running_loop().run_in_executor(None, serve.status)
            deployment = status.applications[context.app_name].deployments[MODEL_DEPLOYMENT]
            running = deployment.replica_states.get("RUNNING", 0)
            batcher.set_max_batches_in_flight(batches_in_flight_for(config, running))
        except Exception as exc:  # noqa: BLE001 - keep the last cap; the controller may be restarting
            logger.info("model replica count not read: %s", exc)
        await asyncio.sleep(REPLICA_POLL_INTERVAL_S)
