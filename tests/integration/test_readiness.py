"""Readiness (`/health`, `/v2/health/ready`, `/v2/models/{name}/ready`) answers 503 while the model loads
and while it is broken; liveness (`/v2/health/live`) stays 200. The router is what is tested, so the model
deployment gets an engine whose construction ends only when the test creates a flag file (the model "loads"
for as long as the test looks at the router) and whose health check fails while another flag file exists
(the real engine's dead-worker case is in test_model_parallel.py)."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np
from ray import serve

from tests.integration.conftest import service_args, wait_running

LOAD_TIMEOUT_S = 300  # the engine gives up waiting for the test's "loaded" flag (a test that failed early)
READY_ROUTES = ("/health", "/v2/health/ready", "/v2/models/reward_model/ready")


class SlowEngine:
    """Constructs once `<loaded_flag>` exists; `check_health` raises while `<broken_flag>` exists."""

    def __init__(self, loaded_flag: str, broken_flag: str, num_attributes: int):
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while not Path(loaded_flag).exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        self._flag = Path(broken_flag)
        self._num_attributes = num_attributes

    async def score(self, token_batch):
        return np.zeros((len(token_batch), self._num_attributes), dtype=np.float32)

    async def check_health(self) -> None:
        if self._flag.exists():
            raise RuntimeError("engine broken (test flag)")

    def shutdown(self) -> None:
        pass


def slow_engine_factory(loaded_flag: str, broken_flag: str):
    return lambda config: SlowEngine(loaded_flag, broken_flag, len(config.scoring.attribute_names))


def _statuses(client: httpx.Client, prefix: str) -> dict[str, int]:
    return {route: client.get(prefix + route).status_code for route in (*READY_ROUTES, "/v2/health/live")}


def _poll_statuses(client: httpx.Client, prefix: str, want: dict[str, int], timeout_s: float = 30) -> dict[str, int]:
    """The routes' statuses once they equal `want`, or the last ones seen when `timeout_s` has passed."""
    deadline = time.monotonic() + timeout_s
    while (statuses := _statuses(client, prefix)) != want and time.monotonic() < deadline:
        time.sleep(0.2)
    return statuses


def test_ready_is_503_while_loading_and_while_broken(ray_cluster, serve_http, demo_checkpoint, tmp_path):
    from configs.service import ServiceConfig
    from deployments.reward_model import RewardModelDeployment
    from deployments.router import Router
    from deployments.scoring import ScoringDeployment
    from sharding.checkpoints.formats import open_checkpoint, output_names

    config = ServiceConfig.model_validate(service_args(demo_checkpoint))
    config = config.with_output_names(output_names(open_checkpoint(config.checkpoint_path)))
    config_json = config.model_dump(mode="json")
    flag, loaded = tmp_path / "broken", tmp_path / "loaded"
    model = RewardModelDeployment.options(health_check_period_s=60).bind(
        config_json, engine_factory=slow_engine_factory(str(loaded), str(flag)))
    app = Router.bind(model, ScoringDeployment.bind(config_json), config_json)
    prefix = f"{serve_http}/slow"

    serve._run(app, _blocking=False, name="slow", route_prefix="/slow")
    try:
        with httpx.Client(timeout=30) as client:
            deadline = time.monotonic() + 240  # the router starts; the model stays loading until `loaded` exists
            while True:
                try:
                    statuses = _statuses(client, prefix)
                except httpx.TransportError:
                    statuses = {}
                if statuses.get("/v2/health/live") == 200:
                    break
                assert time.monotonic() < deadline, "the router never answered while the model was loading"
                time.sleep(0.5)
            assert all(statuses[route] == 503 for route in READY_ROUTES), statuses
            body = client.get(prefix + "/health").json()
            assert body["error"]["type"] == "service_unavailable", body
            assert "not ready" in body["error"]["message"], body

            loaded.touch()  # the model finishes loading
            wait_running("slow", since=0.0)  # the model has loaded
            ready = {route: 200 for route in (*READY_ROUTES, "/v2/health/live")}
            assert _poll_statuses(client, prefix, ready) == ready

            flag.touch()  # the router's readiness cache answers from the last check until it expires
            broken = {**{route: 503 for route in READY_ROUTES}, "/v2/health/live": 200}
            statuses = _poll_statuses(client, prefix, broken)
            assert statuses == broken, statuses
            assert "engine broken" in client.get(prefix + "/health").json()["error"]["message"]

            flag.unlink()
            assert _poll_statuses(client, prefix, ready) == ready
    finally:
        loaded.touch()
        serve.delete("slow")
