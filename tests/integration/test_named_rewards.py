"""Named rewards end to end (real Serve, the demo model on CPU): `weights` as an object of named vectors on
`POST /v1/score` and the handle (the routes that take `weights`), and `scoring.named_weights` in the service
config. Every named reward is checked against a dot product computed here from the returned attributes."""

from __future__ import annotations

import asyncio
import math

import httpx
import numpy as np
import pytest
from ray import serve

from configs.service import ATTRIBUTE_NAMES
from deployments.errors import InvalidRequestError
from tests.integration.conftest import deploy, service_args
from tests.integration.test_service import conversation

NAMED = {"helpful": [0.0, 0, 0, 0, 1.0, 0.5, 0, 0, 0], "concise": [0.0, 0, 0, 0, 0, 0, 0, 0.25, -1.0],
         "mixed": [0.1, -0.2, 0.3, -0.4, 0.5, -0.6, 0.7, -0.8, 0.9]}
SERVICE_NAMED = {"safe": [0.0, -1.0, 0, 0, 0, 0, 0, 0, 0], "quality": [1.0, 0, 0, 0, 0, 0, 0, 0, 0]}


def dot(result: dict, vector) -> float:
    """The reward computed here, independently: float64 products of the returned attributes, summed exactly."""
    return math.fsum(result["attributes"][name] * w for name, w in zip(ATTRIBUTE_NAMES, vector, strict=True))


def check_rewards(result: dict, named: dict, scalar) -> None:
    assert list(result["rewards"]) == list(named)  # the names, in the request's order
    for name, vector in named.items():
        assert result["rewards"][name] == pytest.approx(dot(result, vector), rel=1e-12, abs=1e-12), name
    assert result["score"] == pytest.approx(dot(result, scalar), rel=1e-12, abs=1e-12)


@pytest.fixture(scope="module")
def service_weights(demo_app) -> list[float]:
    return serve.get_deployment_handle("ScoringDeployment", app_name="reward").current_weights.remote().result()


def test_http_named_rewards_beside_the_default_score(http, service_weights):
    body = {"conversations": [conversation(1, turns=2), conversation(2)], "weights": NAMED, "turns": "all"}
    response = http.post("/v1/score", json=body).raise_for_status().json()
    for result in response["results"]:
        check_rewards(result, NAMED, service_weights)
        for turn in result["turns"]:
            check_rewards(turn, NAMED, service_weights)
        assert result["rewards"] == result["turns"][-1]["rewards"]
    plain = http.post("/v1/score", json={"conversations": [conversation(1)]}).raise_for_status().json()
    assert "rewards" not in plain["results"][0]  # no named weights: the original shape


def test_http_best_of_n_named_rewards(http, service_weights):
    prompt = conversation(5)["messages"][:-1]
    body = {"prompt": prompt, "responses": ["Short.", "A longer answer about tea and rain."], "weights": NAMED}
    results = http.post("/v1/score", json=body).raise_for_status().json()["results"]
    assert len(results) == 2
    for result in results:
        check_rewards(result, NAMED, service_weights)


def test_handle_named_rewards_and_typed_errors(demo_app, service_weights):
    handle = serve.get_app_handle("reward")
    out = handle.score.remote({"conversations": [conversation(3)], "weights": NAMED}).result()
    check_rewards(out["results"][0], NAMED, service_weights)
    with pytest.raises(InvalidRequestError) as info:
        handle.score.remote({"conversations": [conversation(3)], "weights": {"helpful": [1.0, 2.0]}}).result()
    assert info.value.param == "weights.helpful" and "2 values; the model has 9 attributes" in info.value.message


@pytest.mark.parametrize("weights, param, fragment", [
    ({"helpful": [1.0, 2.0]}, "weights.helpful", "weights.helpful has 2 values; the model has 9 attributes"),
    ({"ok": [0.0] * 9, "bad": [0.0] * 8 + ["x"]}, "weights.bad[8]", "valid number"),
    ({f"n{i}": [0.0] * 9 for i in range(17)}, "weights", "17 names; the limit is 16"),
    ({"n" * 65: [0.0] * 9}, "weights", "65 characters; the limit is 64"),
    ({}, "weights", "no names"),
], ids=["length", "not-a-number", "too-many-names", "long-name", "empty"])
def test_bad_named_weights_get_400_naming_the_field(http, weights, param, fragment):
    response = http.post("/v1/score", json={"conversations": [conversation(0)], "weights": weights})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and fragment in error["message"], error


def test_an_overflowing_named_reward_is_a_400_naming_it(http):
    first = http.post("/v1/score", json={"conversations": [conversation(6)]}).raise_for_status().json()["results"][0]
    attributes = [first["attributes"][name] for name in ATTRIBUTE_NAMES]
    assert sum(abs(a) for a in attributes) > 1.0  # so the largest finite weights overflow float64 below
    huge = [math.copysign(np.finfo(np.float64).max, a) for a in attributes]
    response = http.post("/v1/score", json={"conversations": [conversation(6)], "weights": {"ok": [1.0] * 9,
                                                                                              "huge": huge}})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "weights.huge" and "the reward 'huge' of prompt 0 overflows to inf" in error["message"]


def test_co_batched_requests_keep_their_own_named_weights(demo_app, service_weights):
    """One `weigh` call per batch: concurrent requests with named, plain and no weights each get their own."""
    variants = [NAMED, None, [0.0] * 4 + [1.0, 0, 0, 0, 0], {"only": NAMED["mixed"]}]
    bodies = [{"conversations": [conversation(i, words=6 + i), conversation(i + 4)],
               **({} if w is None else {"weights": w})} for i, w in enumerate(variants * 3)]

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=demo_app, timeout=120) as client:
            return await asyncio.gather(*(client.post("/v1/score", json=body) for body in bodies))

    for body, response in zip(bodies, asyncio.run(burst())):
        assert response.status_code == 200, response.text
        weights = body.get("weights")
        for result in response.json()["results"]:
            if isinstance(weights, dict):
                check_rewards(result, weights, service_weights)
            else:
                assert "rewards" not in result
                assert result["score"] == pytest.approx(dot(result, weights or service_weights), rel=1e-12, abs=1e-12)


@pytest.fixture(scope="module")
def named_app(serve_http, demo_checkpoint):
    """`scoring.named_weights` in the service config (sent as the scoring user_config), two routers (so a
    request takes the affinity hop to its home router, which re-validates the weights object from JSON)."""
    from serve_app import build_app

    args = service_args(demo_checkpoint, scoring={"named_weights": SERVICE_NAMED}, router={"num_replicas": 2})
    deploy(build_app(args), name="named", route_prefix="/named")
    yield f"{serve_http}/named"
    serve.delete("named")


def test_service_named_weights(named_app):
    scoring = serve.get_deployment_handle("ScoringDeployment", app_name="named")
    assert scoring.current_named_weights.remote().result() == SERVICE_NAMED
    default = scoring.current_weights.remote().result()
    plain_vector = [1.0] + [0.0] * 8
    with httpx.Client(base_url=named_app, timeout=120) as client:
        def score(**extra) -> dict:
            body = {"conversations": [conversation(2), conversation(4, turns=2)], **extra}
            return client.post("/v1/score", json=body).raise_for_status().json()

        for result in score()["results"]:  # the service's named rewards on every result
            check_rewards(result, SERVICE_NAMED, default)
        for result in score(weights=plain_vector)["results"]:  # a plain vector replaces only the scalar's weights
            check_rewards(result, SERVICE_NAMED, plain_vector)
        for result in score(weights=NAMED)["results"]:  # the request's named weights replace the service's
            check_rewards(result, NAMED, default)
        # The other scoring routes keep their protocol's shape.
        reward = client.post("/get_reward", json={"query": ["<extra_id_0>System\n\n<extra_id_1>User\nHi\n"
                                                            "<extra_id_1>Assistant\nHello"]})
        assert reward.status_code == 200 and set(reward.json()) == {"rewards", "scores", "extra_logs"}, reward.text
    handle = serve.get_app_handle("named")
    out = handle.score.remote({"conversations": [conversation(8)], "weights": NAMED}).result()
    check_rewards(out["results"][0], NAMED, default)
