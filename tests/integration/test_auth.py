"""The optional API key: a second app at /secure whose config names a key file. Every scoring route
answers 401 in the one error shape without the key or with a wrong one; health and metadata stay open."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import httpx
import openai
import pytest
from ray import serve

from tests.integration.conftest import REPO, deploy, service_args
from tests.integration.test_service import conversation

KEY = "s3cret-key-for-tests"
PREFIX = "/secure"
SENTENCE = "<extra_id_0>System\nx\n<extra_id_1>User\nhi\n<extra_id_1>Assistant\nhello\n<extra_id_2>"
SCORING_CALLS = [
    ("/v1/score", {"conversations": [conversation(1)]}),
    ("/v1/chat/completions", {"model": "demo", **conversation(2)}),
    ("/v2/models/reward_model/infer",
     {"inputs": [{"name": "sentences", "shape": [1, 1], "datatype": "BYTES", "data": [SENTENCE]}]}),
    ("/v2/models/reward_model/versions/1/infer",
     {"inputs": [{"name": "sentences", "shape": [1, 1], "datatype": "BYTES", "data": [SENTENCE]}]}),
    ("/get_reward", {"query": [SENTENCE]}),
    ("/classify", {"input": SENTENCE}),
    ("/pooling", {"input": [SENTENCE]}),
]
OPEN_ROUTES = ["/health", "/v2/health/live", "/v2/health/ready", "/v2/models/reward_model/ready",
               "/v2/models/reward_model", "/v1/models", "/v2/models/reward_model/config",
               "/v2/models/reward_model/versions/1/config"]


@pytest.fixture(scope="module")
def secure_url(ray_cluster, serve_http, demo_checkpoint, tmp_path_factory) -> Iterator[str]:
    from serve_app import build_app

    key_file = tmp_path_factory.mktemp("auth") / "api_key"
    key_file.write_text(KEY + "\n")
    app = build_app(service_args(demo_checkpoint, auth={"api_key_file": str(key_file)}))
    deploy(app, name="reward_auth", route_prefix=PREFIX)
    yield serve_http + PREFIX
    serve.delete("reward_auth")


@pytest.fixture
def secure(secure_url) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=secure_url, timeout=120) as client:
        yield client


@pytest.mark.parametrize("path, body", SCORING_CALLS, ids=[p for p, _ in SCORING_CALLS])
@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}],
                         ids=["missing", "wrong", "not-bearer"])
def test_scoring_routes_reject_a_missing_or_wrong_key(secure, path, body, headers):
    response = secure.post(path, json=body, headers={**headers, "X-Request-Id": "auth-1"})
    assert response.status_code == 401, response.text
    if path.startswith("/v2/"):  # KServe's error shape on /v2
        assert set(response.json()) == {"error"} and "API key" in response.json()["error"]
    else:
        assert response.json()["error"]["type"] == "authentication_error"
        assert response.json()["error"]["code"] == 401 and response.json()["error"]["param"] == "Authorization"
    assert response.headers["x-request-id"] == "auth-1"


@pytest.mark.parametrize("path, body", SCORING_CALLS, ids=[p for p, _ in SCORING_CALLS])
def test_scoring_routes_accept_the_key(secure, path, body):
    response = secure.post(path, json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200, response.text


def test_the_key_is_checked_before_the_body(secure):
    response = secure.post("/v1/score", content="{not json", headers={"content-type": "application/json"})
    assert response.status_code == 401


@pytest.mark.parametrize("path", OPEN_ROUTES)
def test_health_and_metadata_stay_open(secure, path):
    assert secure.get(path).status_code == 200


def test_openai_sdk_sends_the_key(secure_url):
    messages = conversation(3)["messages"]
    with openai.OpenAI(base_url=f"{secure_url}/v1", api_key=KEY, max_retries=0) as client:
        assert client.chat.completions.create(model="demo", messages=messages).choices[0].message.content
    with openai.OpenAI(base_url=f"{secure_url}/v1", api_key="wrong", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError):
            client.chat.completions.create(model="demo", messages=messages)


def test_jobs_send_the_key_from_the_environment(secure_url, tmp_path):
    rows = tmp_path / "rb.jsonl"
    rows.write_text(json.dumps({"prompt": "Hi?", "chosen": "Hello there.", "rejected": "Go away.",
                                "subset": "alpacaeval-easy"}) + "\n")
    command = [sys.executable, "-m", "jobs", "evaluate", "--input", str(rows), "--output", str(tmp_path / "m.json"),
               "--url", secure_url, "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k != "REWARD_API_KEY"}
    ok = subprocess.run(command, env={**env, "REWARD_API_KEY": KEY}, capture_output=True, text=True, cwd=REPO,
                        timeout=120)
    assert ok.returncode == 0, ok.stderr[-2000:]
    refused = subprocess.run(command, env=env, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert refused.returncode == 1 and "missing API key" in refused.stderr
