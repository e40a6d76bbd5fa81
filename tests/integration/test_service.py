"""The TP1 x PP1 service end to end: real Ray Serve, real megatron-core on CPU, the demo checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from ray import serve

from configs.service import ATTRIBUTE_NAMES, DEFAULT_WEIGHTS
from deployments.prompt import tokenize_conversation
from deployments.schemas import ScoreRequest
from tests.integration.conftest import REPO

TOL = 1e-5
TOPICS = ["the moon", "bread baking", "prime numbers", "Python lists", "the French revolution", "tea", "rain"]


def conversation(i: int, turns: int = 1, words: int = 8) -> dict:
    messages = []
    if i % 3 == 0:
        messages.append({"role": "system", "content": f"You are assistant number {i}."})
    for t in range(turns):
        topic = TOPICS[(i + t) % len(TOPICS)]
        messages.append({"role": "user", "content": f"Tell me about {topic}, part {t}. " + "Please. " * (i % 4)})
        messages.append({"role": "assistant", "content": " ".join([f"{topic} fact {k}." for k in range(words + i)])})
    return {"messages": messages}


def reference_attributes(reference_scorer, tokenizer, conversations: list[dict]) -> np.ndarray:
    request = ScoreRequest.model_validate({"conversations": conversations})
    ids = [tokenize_conversation(c.messages, tokenizer, max_tokens=4096).token_ids for c in request.conversations]
    return reference_scorer.score(ids)


def attributes_of(result: dict) -> np.ndarray:
    return np.array([result["attributes"][name] for name in ATTRIBUTE_NAMES])


def test_http_scores_equal_single_process_forward(http, reference_scorer, tokenizer):
    conversations = [conversation(i, turns=1 + i % 3, words=4 + 7 * i) for i in range(7)]
    body = http.post("/v1/score", json={"conversations": conversations}).raise_for_status().json()
    expected = reference_attributes(reference_scorer, tokenizer, conversations)
    assert [r["index"] for r in body["results"]] == list(range(7))
    for result, want in zip(body["results"], expected):
        np.testing.assert_allclose(attributes_of(result), want, atol=TOL, rtol=0)
        assert result["score"] == pytest.approx(float(np.dot(DEFAULT_WEIGHTS, want)), abs=TOL)
        assert result["truncated"] is False
    assert body["usage"]["prompt_tokens"] == sum(r["num_tokens"] for r in body["results"])
    assert len({r["num_tokens"] for r in body["results"]}) > 3  # really mixed lengths


def test_scores_do_not_depend_on_batch_mates(http):
    target = conversation(5, turns=2)
    alone = http.post("/v1/score", json={"conversations": [target]}).raise_for_status().json()["results"][0]

    def post(i: int) -> dict:
        convs = [conversation(10 + i * 3 + k, turns=1 + k % 3, words=3 + 11 * k) for k in range(3)]
        if i % 2 == 0:
            convs.insert(i % 3, target)
        return http.post("/v1/score", json={"conversations": convs}).raise_for_status().json()

    with ThreadPoolExecutor(max_workers=12) as pool:
        bodies = list(pool.map(post, range(12)))
    crowded = [r for i, b in enumerate(bodies) if i % 2 == 0 for r in b["results"] if r["index"] == i % 3]
    assert len(crowded) == 6
    for result in crowded:
        np.testing.assert_allclose(attributes_of(result), attributes_of(alone), atol=TOL, rtol=0)
        assert result["num_tokens"] == alone["num_tokens"]


def test_per_request_weights(http):
    weights = [1.0, 0, 0, 0, 0, 0, 0, 0, 2.0]
    body = http.post("/v1/score", json={"conversations": [conversation(1)], "weights": weights}).raise_for_status().json()
    result = body["results"][0]
    assert result["score"] == pytest.approx(result["attributes"]["quality"] + 2 * result["attributes"]["verbosity"], abs=TOL)


LONG_TEXT = "The quick brown fox jumps over the lazy dog again and again. " * 600


@pytest.mark.parametrize(
    "body, param, fragment",
    [
        ("{not json", None, "JSON"),
        ({"conversations": [{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}]},
         "conversations[0].messages[0].role", "role"),
        ({"conversations": [{"messages": [{"role": "user", "content": ""}, {"role": "assistant", "content": "y"}]}]},
         "conversations[0].messages[0].content", "content"),
        ({"conversations": [{"messages": [{"role": "assistant", "content": "y"}, {"role": "user", "content": "x"}]}]},
         "conversations[0].messages[1].role", "assistant"),
        ({"conversations": [conversation(0)], "temperature": 0.5}, "temperature", "temperature"),
        ({"conversations": [{"messages": conversation(0)["messages"], "id": 3}]}, "conversations[0].id", "id"),
        ({"conversations": [conversation(i) for i in range(33)]}, "conversations", "33"),
        ({"conversations": []}, "conversations", "conversations"),
        ({"conversations": [conversation(0)], "weights": ["a"] * 9}, "weights[0]", "weights"),
        ({"conversations": [conversation(0)], "weights": [1.0, 2.0]}, "weights", "2"),
        ({"conversations": [conversation(0), {"messages": [{"role": "user", "content": LONG_TEXT},
                                                           {"role": "assistant", "content": "ok"}]}]},
         "conversations[1]", "the limit is 4096"),
    ],
    ids=["malformed-json", "wrong-role", "empty-content", "last-not-assistant", "unknown-field",
         "unknown-nested-field", "too-many-conversations", "no-conversations", "non-numeric-weights",
         "weights-wrong-length", "too-long"],
)
def test_bad_input_gets_400_naming_the_field(http, body, param, fragment):
    if isinstance(body, str):
        response = http.post("/v1/score", content=body, headers={"content-type": "application/json"})
    else:
        response = http.post("/v1/score", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == 400
    assert error["param"] == param
    assert fragment.lower() in error["message"].lower()


def test_too_long_message_states_the_numbers(http, tokenizer):
    long_conv = {"messages": [{"role": "user", "content": LONG_TEXT}, {"role": "assistant", "content": "ok"}]}
    request = ScoreRequest.model_validate({"conversations": [long_conv]})
    rendered = tokenize_conversation(request.conversations[0].messages, tokenizer, max_tokens=10**6).num_tokens
    error = http.post("/v1/score", json={"conversations": [long_conv]}).json()["error"]
    assert rendered > 4096
    assert error["message"] == f"conversations[0] has {rendered} tokens; the limit is 4096"
    assert error["type"] == "input_too_long" and error["param"] == "conversations[0]"


def test_truncate_left_keeps_system_and_scored_end(http, reference_scorer, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}]
    for t in range(40):
        messages += [{"role": "user", "content": f"Question {t}: " + "why is the sky blue? " * 20},
                     {"role": "assistant", "content": f"Answer {t}: " + "because of scattering. " * 20}]
    body = http.post("/v1/score", json={"conversations": [{"messages": messages}], "truncate": "left"})
    result = body.raise_for_status().json()["results"][0]
    assert result["truncated"] is True and result["num_tokens"] <= 4096
    request = ScoreRequest.model_validate({"conversations": [{"messages": messages}]})
    ids = tokenize_conversation(request.conversations[0].messages, tokenizer, max_tokens=4096, truncate="left").token_ids
    assert len(ids) == result["num_tokens"]
    np.testing.assert_allclose(attributes_of(result), reference_scorer.score([ids])[0], atol=TOL, rtol=0)


def test_request_id_is_echoed(http):
    response = http.post("/v1/score", json={"conversations": [conversation(2)]}, headers={"X-Request-Id": "abc-123"})
    assert response.headers["x-request-id"] == "abc-123"


def test_handle_from_a_separate_ray_job(demo_app, ray_cluster):
    out = subprocess.run(
        [sys.executable, str(REPO / "examples" / "score_with_handle.py"), "--address", ray_cluster.address],
        capture_output=True, text=True, timeout=180, cwd=REPO,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    ok, too_long, invalid = lines
    assert len(ok["ok"]["results"]) == 2 and all(set(r["attributes"]) == set(ATTRIBUTE_NAMES) for r in ok["ok"]["results"])
    assert too_long["too_long"]["limit"] == 4096 and too_long["too_long"]["tokens"] > 4096
    assert invalid["invalid"]["param"] == "conversations[0].messages[0].role"


def alive_actor_ids(app: str) -> dict[str, set[str]]:
    """Every live replica actor of `app` by deployment, from the GCS actor table."""
    from ray._private.state import actors as gcs_actor_table  # GCS records; the state API needs a dashboard

    prefix = f"ServeReplica:{app}:"
    out: dict[str, set[str]] = {}
    for actor_id, actor in gcs_actor_table().items():
        if actor["State"] == "ALIVE" and actor["ActorClassName"].startswith(prefix):
            out.setdefault(actor["ActorClassName"].removeprefix(prefix), set()).add(actor_id)
    return out


def model_worker_ids(app: str) -> set[str]:
    return {w["actor_id"] for w in serve.get_deployment_handle("RewardModelDeployment", app_name=app)
            .describe.remote().result()}


def test_weights_change_live_through_user_config(http, demo_app, demo_checkpoint):
    """A config that differs only in the ScoringDeployment's user_config (what `serve deploy` of
    configs/local.yaml with new weights sends) reconfigures the scoring replica in place: the scores follow
    the new weights while every replica actor (model, router, scoring) and every worker actor stays the same.
    (Changing the app's args reloads it instead: tests/integration/test_batching.py.)"""
    from tests.integration.conftest import declare, demo_app_config

    before = http.post("/v1/score", json={"conversations": [conversation(4)]}).raise_for_status().json()["results"][0]
    replicas, workers = alive_actor_ids("reward"), model_worker_ids("reward")
    assert set(replicas) == {"Router", "ScoringDeployment", "RewardModelDeployment"} and workers, replicas
    weights = [0, 0, 0, 0, 1.0, 0, 0, 0, 0]
    scoring = serve.get_deployment_handle("ScoringDeployment", app_name="reward")
    try:
        declare(demo_app_config(demo_checkpoint, weights=weights))
        deadline = time.monotonic() + 60  # reconfigure runs on the replica after the controller applied it
        while list(scoring.current_weights.remote().result()) != weights:
            assert time.monotonic() < deadline, "the new user_config never reached the scoring replica"
            time.sleep(0.2)
        after = http.post("/v1/score", json={"conversations": [conversation(4)]}).raise_for_status().json()["results"][0]
        assert after["score"] == pytest.approx(after["attributes"]["helpfulness"], abs=TOL)
        np.testing.assert_allclose(attributes_of(after), attributes_of(before), atol=TOL, rtol=0)
        assert alive_actor_ids("reward") == replicas  # nothing restarted
        assert model_worker_ids("reward") == workers
    finally:
        declare(demo_app_config(demo_checkpoint))
        deadline = time.monotonic() + 60
        while list(scoring.current_weights.remote().result()) != list(DEFAULT_WEIGHTS):
            assert time.monotonic() < deadline, "the default weights never came back"
            time.sleep(0.2)
    assert alive_actor_ids("reward") == replicas
