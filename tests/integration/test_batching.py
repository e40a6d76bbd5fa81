"""The router's pull-based batching on the real engine (TP1 x PP1): a full queue answers 503 with
Retry-After, a lone request goes to the model at once (there is no batch wait to sit out), requests batched
together keep their own scoring weights, and two router replicas (each with its own queue) serve one model."""

from __future__ import annotations

import asyncio
import time

import httpx
import numpy as np
import pytest
from ray import serve

from deployments.prompt import tokenize_conversation
from deployments.schemas import ScoreRequest
from tests.integration.conftest import deploy, service_args
from tests.integration.test_service import conversation

BODY = {"conversations": [conversation(i, words=12) for i in range(4)]}


@pytest.fixture(scope="module")
def queue_tokens(tokenizer) -> int:
    """1.5 x the tokens of BODY: one request fits the queue (and a batch), two do not."""
    request = ScoreRequest.model_validate(BODY)
    tokens = sum(tokenize_conversation(c.messages, tokenizer, max_tokens=4096).num_tokens
                 for c in request.conversations)
    return tokens + tokens // 2


@pytest.fixture(scope="module")
def small_queue_app(serve_http, demo_checkpoint, queue_tokens):
    """One batch in flight and a queue of 1.5 requests: the third request that arrives while the first
    computes (and the second waits) is over the bound."""
    from serve_app import build_app

    args = service_args(demo_checkpoint, router={
        "max_tokens_per_batch": queue_tokens, "max_input_tokens": queue_tokens,
        "max_queued_tokens": queue_tokens, "max_batches_in_flight": 1,
    })
    deploy(build_app(args), name="queue", route_prefix="/queue")
    yield f"{serve_http}/queue"
    serve.delete("queue")


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


def test_lone_request_is_not_delayed(demo_app):
    """A lone request through the router costs about what one direct model call costs: no batch wait. The
    margin covers tokenization and the scoring deployment's call (best of 5, on a shared machine)."""
    router = serve.get_app_handle("reward")
    model = serve.get_deployment_handle("RewardModelDeployment", app_name="reward")
    request = {"conversations": [conversation(3, words=20)]}
    tokens = [list(range(4, 4 + router.score.remote(request).result()["usage"]["prompt_tokens"]))]

    def best_of_5(call) -> float:
        times = []
        for _ in range(5):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
        return min(times)

    model_s = best_of_5(lambda: np.asarray(model.score.remote(tokens).result()))
    router_s = best_of_5(lambda: router.score.remote(request).result())
    assert router_s < model_s + 0.1, f"router {router_s * 1e3:.0f} ms vs one model call {model_s * 1e3:.0f} ms"


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
def two_router_app(serve_http, demo_checkpoint):
    from serve_app import build_app

    args = service_args(demo_checkpoint, router={"num_replicas": 2, "max_batches_in_flight": 1})
    deploy(build_app(args), name="tworouters", route_prefix="/tworouters")
    yield f"{serve_http}/tworouters"
    serve.delete("tworouters")


def test_two_router_replicas_serve_one_model(two_router_app, demo_app):
    """`router.num_replicas: 2`: two Router replicas, each with its own queue, feed the one model replica;
    a burst spread over both gets every score right (as the one-router app scores each request alone)."""
    bodies = [{"conversations": [conversation(i, words=8 + 3 * i)]} for i in range(16)]

    async def burst(base: str, concurrently: bool) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=base, timeout=120) as client:
            if concurrently:
                return await asyncio.gather(*(client.post("/v1/score", json=body) for body in bodies))
            return [await client.post("/v1/score", json=body) for body in bodies]

    status = serve.status().applications["tworouters"].deployments["Router"]
    assert status.replica_states.get("RUNNING") == 2, status
    got, alone = asyncio.run(burst(two_router_app, True)), asyncio.run(burst(demo_app, False))
    for body, response, reference in zip(bodies, got, alone):
        assert response.status_code == 200 and reference.status_code == 200, (response.text, reference.text)
        # Batch mates change raw floats by ~1e-6 (the forest layout); the weights are the same.
        assert response.json()["results"][0]["score"] == pytest.approx(reference.json()["results"][0]["score"],
                                                                      abs=1e-5)
        timing = {"queue_ms", "compute_ms", "batch_tokens", "model_replicas"}  # depend on the batch mates
        assert ({k: v for k, v in response.json()["usage"].items() if k not in timing}
                == {k: v for k, v in reference.json()["usage"].items() if k not in timing})
