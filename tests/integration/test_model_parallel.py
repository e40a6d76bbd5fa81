"""TP x PP across the simulated two-node cluster (gloo, logical GPUs): same numbers as one process, stages
on distinct nodes, the HTTP app on that topology, and recovery from a killed worker."""

from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import numpy as np
import pytest
from ray import serve
from ray.util.placement_group import placement_group_table
from ray._private.state import actors as gcs_actor_table  # GCS records; the state API needs a dashboard

from configs.service import ServiceConfig
from tests.engine_runner import score_with_engine
from tests.integration.conftest import NODE_GPUS, deploy, service_args
from tests.integration.test_service import reference_attributes

TOL = 1e-5
PROMPTS = [
    "Hello there.",
    "Explain why the sky is blue in two sentences, then give an example.",
    "List three prime numbers. " * 5,
    "Write a haiku about bread. " * 20,
    "What is 2 + 2?",
    "Describe the French revolution in detail, with dates and causes. " * 12,
    "ok",
]


@pytest.fixture(scope="module")
def token_batch(tokenizer) -> list[list[int]]:
    return [tokenizer.encode(f"<extra_id_1>User\n{p}\n<extra_id_1>Assistant\nSure.\n<extra_id_2>") for p in PROMPTS]


def parallel_config(checkpoint, tp: int, pp: int, **parallel) -> dict:
    return service_args(
        checkpoint,
        parallel={"tensor_parallel_size": tp, "pipeline_parallel_size": pp, **parallel},
        runtime={"gpus_per_node": NODE_GPUS, "cpus_per_worker": 0.5},
    )


def assert_stages_on_distinct_nodes(workers: list[dict], pg_id: str, pp: int) -> None:
    """From Ray's own records: each worker actor's node (GCS actor table) and each bundle's node (placement-group
    table) agree with what the worker reports, and the stages land on distinct nodes."""
    bundle_nodes = placement_group_table()[pg_id]["bundles_to_node_id"]
    stage_nodes: dict[int, set[str]] = {}
    for w in workers:
        node = gcs_actor_table(w["actor_id"])["Address"]["NodeID"]
        assert node == bundle_nodes[w["bundle_index"]] == w["node_id"]
        assert w["placement_group_id"] == pg_id
        stage_nodes.setdefault(w["pipeline_rank"], set()).add(node)
    assert all(len(nodes) == 1 for nodes in stage_nodes.values()), stage_nodes  # a TP group stays in a node
    assert len(set().union(*stage_nodes.values())) == pp  # one node per stage


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2), (2, 2)], ids=["tp2pp1", "tp1pp2", "tp2pp2"])
def test_engine_matches_single_process(ray_cluster, demo_checkpoint, reference_scorer, token_batch, tp, pp):
    # Padded micro-batches of two longest sequences (the forest layout: tests/integration/test_forest.py).
    budget = 2 * max(len(t) for t in token_batch)
    config = ServiceConfig.model_validate(parallel_config(demo_checkpoint, tp, pp, batch_layout="padded",
                                                         max_tokens_per_micro_batch=budget))
    placements = []
    rewards = score_with_engine(config, token_batch, inspect=lambda engine: placements.append(
        (engine.describe(), engine.describe()[0]["placement_group_id"])))
    assert rewards.dtype == np.float32 and rewards.shape == (len(token_batch), 9)
    np.testing.assert_allclose(rewards, reference_scorer.score(token_batch), atol=TOL, rtol=0)
    workers, pg_id = placements[0]
    assert_stages_on_distinct_nodes(workers, pg_id, pp)


@pytest.fixture(scope="module")
def tp2pp2_app(serve_http, demo_checkpoint):
    from serve_app import build_app

    deploy(build_app(parallel_config(demo_checkpoint, 2, 2)), name="mp", route_prefix="/mp")
    yield f"{serve_http}/mp"
    serve.delete("mp")


def model_handle():
    return serve.get_deployment_handle("RewardModelDeployment", app_name="mp")


def score_body(prompts: list[str]) -> dict:
    return {"conversations": [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": "Sure."}]}
                              for p in prompts]}


def test_http_app_on_two_nodes(tp2pp2_app, reference_scorer, tokenizer):
    body = httpx.post(f"{tp2pp2_app}/v1/score", json=score_body(PROMPTS), timeout=120).raise_for_status().json()
    got = np.array([list(r["attributes"].values()) for r in body["results"]])
    want = reference_attributes(reference_scorer, tokenizer, score_body(PROMPTS)["conversations"])
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    workers = model_handle().describe.remote().result()
    assert len(workers) == 4
    (pg_id,) = {w["placement_group_id"] for w in workers}
    assert placement_group_table()[pg_id]["strategy"] == "STRICT_SPREAD"
    assert_stages_on_distinct_nodes(workers, pg_id, pp=2)


def _stream(url: str, stop: threading.Event, log: list[tuple[float, int]]) -> None:
    """One client sending requests back to back until `stop`; logs (finish time, status)."""
    with httpx.Client(timeout=120) as client:
        while not stop.is_set():
            status = client.post(f"{url}/v1/score", json=score_body(PROMPTS[:3])).status_code
            log.append((time.monotonic(), status))
            if status != 200:
                time.sleep(0.2)


def test_killed_worker_mid_stream_gives_503_then_recovers(tp2pp2_app, reference_scorer, tokenizer):
    """A worker killed while batches stream: the requests in flight end in 503 within the health deadline
    (the engine is "recovering" from the first failure on), then the dead rank alone is restarted (partial
    restart, `sharding.restart`: the other ranks keep their actors and weights) and scores are right again."""
    workers = model_handle().describe.remote().result()
    victim = next(w for w in workers if w["pipeline_rank"] == 1 and w["tensor_rank"] == 1)
    stop, logs = threading.Event(), [[] for _ in range(3)]
    streams = [threading.Thread(target=_stream, args=(tp2pp2_app, stop, log), daemon=True) for log in logs]
    for thread in streams:
        thread.start()
    deadline = time.monotonic() + 120
    while not all(logs):  # every stream has had a batch through: the pipeline is busy
        assert time.monotonic() < deadline, "no traffic"
        time.sleep(0.1)
    killed_at = time.monotonic()
    os.kill(gcs_actor_table(victim["actor_id"])["Pid"], signal.SIGKILL)
    health_deadline_s = ServiceConfig.model_validate(parallel_config("x", 2, 2)).runtime.health_check_timeout_s
    # Until every stream has had its 503 (or past the health deadline, which the checks below then report).
    deadline = killed_at + health_deadline_s + 5
    while not all(any(t > killed_at and status == 503 for t, status in log) for log in logs):
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    stop.set()
    for thread in streams:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in streams), "a request hung after the worker died"
    for log in logs:
        after = [(t, status) for t, status in log if t > killed_at]
        assert after and all(status in (200, 503) for _, status in after), after
        first_503 = next(t for t, status in after if status == 503)
        assert first_503 - killed_at < health_deadline_s, f"first 503 after {first_503 - killed_at:.1f}s"

    statuses: list[int] = []
    deadline = time.monotonic() + 240
    with httpx.Client(timeout=60) as client:
        while time.monotonic() < deadline:
            response = client.post(f"{tp2pp2_app}/v1/score", json=score_body(PROMPTS))
            statuses.append(response.status_code)
            assert client.get(f"{tp2pp2_app}/v2/health/live").status_code == 200
            if response.status_code == 200:
                break
            error = response.json()["error"]
            assert response.status_code == 503 and error["code"] == 503 and error["type"] == "service_unavailable"
            time.sleep(0.5)
    assert statuses[-1] == 200, f"no recovery within the deadline: {statuses[-5:]}"
    deadline = time.monotonic() + 60  # readiness follows once the engine answers its health check again
    while (health := httpx.get(f"{tp2pp2_app}/health", timeout=30)).status_code != 200:
        assert time.monotonic() < deadline, health.text
        time.sleep(1)
    got = np.array([list(r["attributes"].values()) for r in response.json()["results"]])
    want = reference_attributes(reference_scorer, tokenizer, score_body(PROMPTS)["conversations"])
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    new_workers = model_handle().describe.remote().result()
    changed = {w["rank"] for w, old in zip(new_workers, workers) if w["actor_id"] != old["actor_id"]}
    assert changed == {victim["rank"]}, (changed, victim["rank"])  # only the dead rank was restarted
