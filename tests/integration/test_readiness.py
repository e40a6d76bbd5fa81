"""Readiness (`/health`, `/v2/health/ready`, `/v2/models/{name}/ready`) answers 503 while the model loads
and while it is broken; liveness (`/v2/health/live`) stays 200. The router is what is tested, so the model
deployment gets an engine that takes LOAD_S to construct and fails its health check while a flag file
exists (the real engine's dead-worker case is in test_model_parallel.py)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from ray import serve

from tests.integration.conftest import deploy, service_args

LOAD_S = 12.0
READY_ROUTES = ("/health", "/v2/health/ready", "/v2/models/reward_model/ready")


class SlowEngine:
    """Constructs in LOAD_S; `check_health` raises while `<broken_flag>` exists."""

    def __init__(self, broken_flag: str, num_attributes: int):
        time.sleep(LOAD_S)
        self._flag = Path(broken_flag)
        self._num_attributes = num_attributes

    async def score(self, token_batch):
        return np.zeros((len(token_batch), self._num_attributes), dtype=np.float32)

    async def check_health(self) -> None:
        if self._flag.exists():
            raise RuntimeError("engine broken (test flag)")

    def shutdown(self) -> None:
        pass


def slow_engine_factory(broken_flag: str):
    return lambda config: SlowEngine(broken_flag, len(config.scoring.attribute_names))


def _statuses(client: httpx.Client, prefix: str) -> dict[str, int]:
    return {route: client.get(prefix + route).status_code for route in (*READY_ROUTES, "/v2/health/live")}


def test_ready_is_503_while_loading_and_while_broken(ray_cluster, serve_http, demo_checkpoint, tmp_path):
    from configs.service import ServiceConfig
    from deployments.reward_model import RewardModelDeployment
    from deployments.router import Router
    from deployments.scoring import ScoringDeployment
    from sharding.checkpoints.formats import open_checkpoint, output_names

    config = ServiceConfig.model_validate(service_args(demo_checkpoint))
    config = config.with_output_names(output_names(open_checkpoint(config.checkpoint_path)))
    config_json = config.model_dump(mode="json")
    flag = tmp_path / "broken"
    model = RewardModelDeployment.options(health_check_period_s=60).bind(
        config_json, engine_factory=slow_engine_factory(str(flag)))
    app = Router.bind(model, ScoringDeployment.bind(config_json), config_json)
    prefix = f"{serve_http}/slow"

    serve._run(app, _blocking=False, name="slow", route_prefix="/slow")
    started = time.monotonic()
    seen_loading = False
    try:
        with httpx.Client(timeout=30) as client:
            while time.monotonic() - started < LOAD_S - 2:  # the router is up long before the model
                try:
                    statuses = _statuses(client, prefix)
                except httpx.TransportError:
                    statuses = {}
                if statuses.get("/v2/health/live") == 200:
                    assert all(statuses[route] == 503 for route in READY_ROUTES), statuses
                    body = client.get(prefix + "/health").json()
                    assert body["error"]["type"] == "service_unavailable", body
                    assert "not ready" in body["error"]["message"], body
                    seen_loading = True
                    break
                time.sleep(0.5)
            assert seen_loading, "the router never answered while the model was loading"

            deploy(app, name="slow", route_prefix="/slow")  # polls until RUNNING
            assert _statuses(client, prefix) == {route: 200 for route in (*READY_ROUTES, "/v2/health/live")}

            flag.touch()
            time.sleep(1.5)  # past the router's readiness cache
            statuses = _statuses(client, prefix)
            assert statuses == {**{route: 503 for route in READY_ROUTES}, "/v2/health/live": 200}, statuses
            assert "engine broken" in client.get(prefix + "/health").json()["error"]["message"]

            flag.unlink()
            time.sleep(1.5)
            assert _statuses(client, prefix)["/health"] == 200
    finally:
        serve.delete("slow")
