"""The router's pull-based batching on the real engine (TP1 x PP1): a full queue answers 503 with
Retry-After, a lone request goes to the model alone (there is no batch wait to sit out: at once, as
tests/unit/test_batcher.py shows without a clock), requests batched together keep their own scoring weights,
and two router replicas (each with its own queue) both serve one model.

One app from a config, `batching`: first with a small queue; then its args change (two routers, default
queue), which reloads it: new model replica and workers, the new settings in force."""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest
from ray import serve

from deployments.prompt import tokenize_conversation
from deployments.schemas import ScoreRequest
from tests.integration.conftest import app_config, declare, service_args, undeclare
from tests.integration.test_service import alive_actor_ids, conversation, model_worker_ids

BODY = {"conversations": [conversation(i, words=12) for i in range(4)]}


@pytest.fixture(scope="module")
def queue_tokens(tokenizer) -> int:
    """1.5 x the tokens of BODY: one request fits the queue (and a batch), two do not."""
    request = ScoreRequest.model_validate(BODY)
    tokens = sum(tokenize_conversation(c.messages, tokenizer, max_tokens=4096).num_tokens
                 for c in request.conversations)
    return tokens + tokens // 2


@pytest.fixture(scope="module")
def batching_app(serve_http, demo_checkpoint, queue_tokens):
    """One batch in flight and a queue of 1.5 requests: the third request that arrives while the first
    computes (and the second waits) is over the bound."""
    args = service_args(demo_checkpoint, router={
        "max_tokens_per_batch": queue_tokens, "max_input_tokens": queue_tokens,
        "max_queued_tokens": queue_tokens, "max_batches_in_flight": 1,
    })
    declare(app_config("batching", "/batching", args))
    yield f"{serve_http}/batching"
    undeclare("batching")


@pytest.fixture(scope="module")
def small_queue_app(batching_app):
    assert serve.status().applications["batching"].deployments["Router"].replica_states.get("RUNNING") == 1
    return batching_app


def test_queue_overflow_gives_503_with_retry_after(small_queue_app, queue_tokens):
    body = BODY

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(client.post(f"{small_queue_app}/v1/score", json=body) for _ in range(12)))

    responses = asyncio.run(burst())
    statuses = [r.status_code for r in responses]
    assert set(statuses) == {200, 503}, statuses
    assert statuses.count(200) >= 2  # the one computing and the one queued
    for response in responses:
        if response.status_code == 503:
            assert int(response.headers["retry-after"]) >= 1
            error = response.json()["error"]
            assert error["type"] == "service_unavailable" and error["code"] == 503
            assert f"the limit is {queue_tokens}" in error["message"], error["message"]


def router_totals(app: str) -> dict[str, dict]:
    """Each router replica's `routed_requests` (its model batches' totals), by replica id: probe affinity keys
    until every running router replica has answered (a key's call goes to the key's home router)."""
    running = serve.status().applications[app].deployments["Router"].replica_states.get("RUNNING")
    routers = serve.get_deployment_handle("Router", app_name=app)
    seen: dict[str, dict] = {}
    for probe in range(256):
        answer = routers.routed_requests.remote(affinity_key=f"probe-{probe}").result()
        seen[answer["replica_id"]] = answer
        if len(seen) == running:
            return seen
    raise AssertionError(f"{len(seen)} of {running} router replicas answered 256 probes")


def test_lone_request_goes_to_the_model_alone(demo_app):
    """A lone request is one model batch of its own tokens: the router sends it without waiting for batch
    mates (that it goes at once, with no timer, is shown clock-free in tests/unit/test_batcher.py)."""
    router = serve.get_app_handle("reward")
    request = {"conversations": [conversation(3, words=20)]}
    (before,) = router_totals("reward").values()
    usage = router.score.remote(request).result()["usage"]
    (after,) = router_totals("reward").values()
    assert after["batches"] - before["batches"] == 1
    assert after["requested_tokens"] - before["requested_tokens"] == usage["prompt_tokens"]


def test_co_batched_requests_keep_their_own_weights(demo_app):
    """The scoring deployment weighs a whole batch at once, each prompt with its request's weights: concurrent
    requests with different weights (and none) each get their own dot product."""
    names = ("helpfulness", "correctness", "coherence", "complexity", "verbosity")
    custom = [[0.0] * 4 + [1.0, 0, 0, 0, 0], None, [0.0] * 4 + [0, 0, 0, 0, -2.0], [0.5] * 9]
    bodies = [{"conversations": [conversation(i, words=10 + i), conversation(i + 7, words=5)],
               **({} if w is None else {"weights": w})} for i, w in enumerate(custom * 3)]

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=demo_app, timeout=120) as client:
            return await asyncio.gather(*(client.post("/v1/score", json=body) for body in bodies))

    default = np.asarray(serve.get_deployment_handle("ScoringDeployment", app_name="reward")
                         .current_weights.remote().result())
    for body, response in zip(bodies, asyncio.run(burst())):
        assert response.status_code == 200, response.text
        weights = np.asarray(body.get("weights", default), dtype=np.float64)
        for result in response.json()["results"]:
            attributes = np.asarray(list(result["attributes"].values()), dtype=np.float64)
            assert list(result["attributes"])[-5:] == list(names)
            assert result["score"] == pytest.approx(float(attributes @ weights), rel=1e-12, abs=1e-12)


@pytest.fixture(scope="module")
def two_router_app(batching_app, demo_checkpoint) -> tuple[str, dict[str, set[str]], set[str]]:
    """The same app with changed args: two router replicas, one batch in flight each, the default queue.
    Returns its URL and the replica and worker actor ids it had before."""
    replicas, workers = alive_actor_ids("batching"), model_worker_ids("batching")
    args = service_args(demo_checkpoint, router={"num_replicas": 2, "max_batches_in_flight": 1})
    declare(app_config("batching", "/batching", args))
    return batching_app, replicas, workers


def test_changed_args_reload_the_app(two_router_app):
    """Changing the app's args (not a user_config) is a reload: Serve rebuilds the app, starts a new model
    replica with new workers, and the new settings hold (two routers now)."""
    _, replicas, workers = two_router_app
    now = alive_actor_ids("batching")
    assert now["RewardModelDeployment"].isdisjoint(replicas["RewardModelDeployment"]), (now, replicas)
    assert model_worker_ids("batching").isdisjoint(workers)
    assert len(now["Router"]) == 2
    assert serve.status().applications["batching"].deployments["Router"].replica_states.get("RUNNING") == 2


def test_two_router_replicas_serve_one_model(two_router_app, demo_app):
    """`router.num_replicas: 2`: two Router replicas, each with its own queue, feed the one model replica;
    a burst spread over both gets every score right (as the one-router app scores each request alone), and
    both routers sent model batches for it (their own counts, `Router.routed_requests`)."""
    url, _, _ = two_router_app
    bodies = [{"conversations": [conversation(i, words=8 + 3 * i)]} for i in range(16)]

    async def burst(base: str, concurrently: bool) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=base, timeout=120) as client:
            if concurrently:
                return await asyncio.gather(*(client.post("/v1/score", json=body) for body in bodies))
            return [await client.post("/v1/score", json=body) for body in bodies]

    status = serve.status().applications["batching"].deployments["Router"]
    assert status.replica_states.get("RUNNING") == 2, status
    before = router_totals("batching")
    got, alone = asyncio.run(burst(url, True)), asyncio.run(burst(demo_app, False))
    after = router_totals("batching")
    for body, response, reference in zip(bodies, got, alone):
        assert response.status_code == 200 and reference.status_code == 200, (response.text, reference.text)
        # Batch mates change raw floats by ~1e-6 (the forest layout); the weights are the same.
        assert response.json()["results"][0]["score"] == pytest.approx(reference.json()["results"][0]["score"],
                                                                      abs=1e-5)
        timing = {"queue_ms", "compute_ms", "batch_tokens", "model_replicas"}  # depend on the batch mates
        assert ({k: v for k, v in response.json()["usage"].items() if k not in timing}
                == {k: v for k, v in reference.json()["usage"].items() if k not in timing})
    assert set(after) == set(before) and len(after) == 2
    served = {rid: after[rid]["requested_tokens"] - before[rid]["requested_tokens"] for rid in after}
    assert all(tokens > 0 for tokens in served.values()), served  # both routers sent batches
    assert sum(served.values()) == sum(r.json()["usage"]["prompt_tokens"] for r in got)
