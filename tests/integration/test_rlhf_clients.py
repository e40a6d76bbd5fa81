"""The RLHF clients teams already run, unchanged, against the TP1 demo app at "/": PyTriton's
`ModelClient`/`FuturesModelClient` (NeMo-Aligner's annotation flow), Triton's model config and versioned
routes, KServe's error shape, OpenRLHF's remote reward model (`/get_reward`), vLLM's `/classify` and
`/pooling` (veRL's reward loop), and OpenAI content parts. Every number equals `POST /v1/score`'s for the
same prompt to 1e-6."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import openai
import pytest
import tritonclient.http as triton
from pytriton.client import AsyncioModelClient, ModelClient
from pytriton.client.exceptions import PyTritonClientTimeoutError
from tritonclient.utils import InferenceServerException

from configs.service import ATTRIBUTE_NAMES
from deployments.prompt import render_prompt
from deployments.schemas import ScoreRequest
from tests.integration.nemo_aligner_annotate import annotate, labelled_prefixes
from tests.integration.openrlhf_remote_rm import remote_rm_fn
from tests.integration.test_service import LONG_TEXT, attributes_of, conversation

TOL = 1e-6
NUM = len(ATTRIBUTE_NAMES)


def native(http, conversations: list[dict], **extra) -> list[dict]:
    body = {"conversations": conversations, **extra}
    return http.post("/v1/score", json=body).raise_for_status().json()["results"]


def rendered(conversations: list[dict]) -> list[str]:
    request = ScoreRequest.model_validate({"conversations": conversations})
    return [render_prompt(c.messages) for c in request.conversations]


def host_port(demo_app: str) -> str:
    return demo_app.removeprefix("http://")


# --- PyTriton / Triton ------------------------------------------------------------------------------------


def test_nemo_aligner_annotation_flow_through_pytriton(http, demo_app):
    lines = [{"mask": "User", "system": "", "conversations": [
                 {"from": "User", "value": f"Question {i}, part {t}?", "label": None} if k == 0 else
                 {"from": "Assistant", "value": f"Answer {i}.{t} " + "in detail. " * (i + t),
                  "label": None if (i, t) == (1, 0) else "quality:4"}
                 for t in range(1 + i) for k in range(2)]} for i in range(3)]
    annotated, raw = annotate(lines, host_port(demo_app))
    # The same per-turn prefixes, each scored by /v1/score on its own, as the annotator sends them.
    convs = [{"messages": [{"role": "user" if c["from"] == "User" else "assistant", "content": c["value"]}
                           for c in line["conversations"]]} for line in lines]
    expected = [attributes_of(native(http, [{"messages": conv["messages"][:k + 1]}])[0])
                for line, conv in zip(lines, convs) for k, c in enumerate(line["conversations"])
                if c["from"] == "Assistant" and c["label"] is not None]
    assert sum(len(labelled_prefixes(line)) for line in lines) == len(raw) == len(expected) == 5
    np.testing.assert_allclose(np.array(raw), np.array(expected), atol=TOL, rtol=0)
    # And as /v1/score's turns="all" scores them in one token forest (its earlier turns shared): equal to the
    # sequences alone within the forest's float32 exactness bound (1e-5, tests/integration/test_forest.py).
    results = native(http, convs, turns="all")
    all_turns = [attributes_of(turn) for line, result in zip(lines, results)
                 for turn, c in zip(result["turns"], [c for c in line["conversations"] if c["from"] == "Assistant"])
                 if c["label"] is not None]
    np.testing.assert_allclose(np.array(raw), np.array(all_turns), atol=1e-5, rtol=0)
    labels = iter(expected)
    for line in annotated:
        for turn in line["conversations"]:
            if turn["label"] is not None:
                values = [round(min(4.0, max(0.0, float(v)))) for v in next(labels)]
                assert turn["label"] == ",".join(f"{n}:{v}" for n, v in zip(ATTRIBUTE_NAMES, values))
    assert annotated[1]["conversations"][1]["label"] is None  # unlabelled turns stay unlabelled


@pytest.mark.parametrize("model_version", [None, "1"], ids=["latest", "version-1"])
def test_pytriton_model_client_reads_the_config_and_infers(http, demo_app, model_version):
    convs = [conversation(i, turns=1 + i % 2) for i in range(3)]
    sentences = np.char.encode(np.array(rendered(convs))[:, np.newaxis], "utf-8")
    with ModelClient(host_port(demo_app), "reward_model", model_version=model_version, init_timeout_s=60) as client:
        config = client.model_config
        assert config.max_batch_size == 32 and config.batching and not config.decoupled
        assert {spec.name: (spec.shape, spec.dtype) for spec in config.inputs} == {
            "sentences": ((1,), np.bytes_), "tokens": ((-1,), np.int64),
            "sequence_lengths": ((1,), np.int64), "add_EOS": ((1,), np.bool_)}
        assert {spec.name: spec.shape for spec in config.outputs} == {"rewards": (NUM,), "exceeded": (1,)}
        assert config.batcher.max_queue_delay_microseconds == 0
        result = client.infer_batch(sentences=sentences)
        single = client.infer_sample(sentences=sentences[0])
    want = np.array([attributes_of(r) for r in native(http, convs)])
    assert result["rewards"].dtype == np.float32 and result["exceeded"].tolist() == [[0]] * 3
    np.testing.assert_allclose(result["rewards"], want, atol=TOL, rtol=0)
    np.testing.assert_allclose(single["rewards"], want[0], atol=TOL, rtol=0)


def test_pytriton_asyncio_client_polls_the_repository_index(http, demo_app):
    convs = [conversation(7), conversation(8)]
    sentences = np.char.encode(np.array(rendered(convs))[:, np.newaxis], "utf-8")

    async def infer():
        async with AsyncioModelClient(host_port(demo_app), "reward_model", init_timeout_s=60) as client:
            return await client.infer_batch(sentences=sentences)

    result = asyncio.run(infer())
    np.testing.assert_allclose(result["rewards"], [attributes_of(r) for r in native(http, convs)], atol=TOL, rtol=0)


def test_pytriton_never_sees_an_unknown_model_or_version_ready(demo_app):
    for name, version in [("no_such_model", None), ("reward_model", "2")]:
        with ModelClient(host_port(demo_app), name, model_version=version, init_timeout_s=2) as client:
            with pytest.raises(PyTritonClientTimeoutError):
                client.infer_batch(sentences=np.array([[b"hi"]]))


def test_triton_config_and_versioned_routes(http, demo_app):
    config = http.get("/v2/models/reward_model/config").raise_for_status().json()
    assert config == http.get("/v2/models/reward_model/versions/1/config").json()
    assert config["name"] == "reward_model" and config["max_batch_size"] == 32
    assert config["output"][0] == {"name": "rewards", "data_type": "TYPE_FP32", "dims": [NUM]}
    client = triton.InferenceServerClient(url=host_port(demo_app), network_timeout=120)
    try:
        assert client.get_model_config("reward_model", "1") == config
        assert client.get_model_metadata("reward_model", "1")["versions"] == ["1"]
        assert client.is_model_ready("reward_model", "1") and not client.is_model_ready("reward_model", "7")
        sentences = np.array([[s.encode()] for s in rendered([conversation(4)])], dtype=np.object_)
        inputs = [triton.InferInput("sentences", [1, 1], "BYTES").set_data_from_numpy(sentences)]
        rewards = client.infer("reward_model", inputs, model_version="1").as_numpy("rewards")
        np.testing.assert_allclose(rewards[0], attributes_of(native(http, [conversation(4)])[0]), atol=TOL, rtol=0)
        assert client.get_model_repository_index() == [
            {"name": "reward_model", "version": "1", "state": "READY"}, {"name": "demo", "version": "1", "state": "READY"}]
    finally:
        client.close()


@pytest.mark.parametrize("method, path, status, fragment", [
    ("GET", "/v2/models/nope/config", 404, "model 'nope' is not served here"),
    ("GET", "/v2/models/reward_model/versions/2", 404, "model version '2' is not served here"),
    ("POST", "/v2/models/reward_model/versions/3/infer", 404, "model version '3'"),
    ("GET", "/v2/models/reward_model/stats", 404, "/v2/models/reward_model/stats is not a route of this service"),
    ("GET", "/v2/models/reward_model/infer", 405, "GET is not allowed on /v2/models/reward_model/infer"),
    ("POST", "/v2/models/reward_model/infer", 400, "inputs: Field required"),
])
def test_v2_errors_are_kserve_shaped(http, method, path, status, fragment):
    response = http.request(method, path, content=b"{}" if method == "POST" else None)
    assert response.status_code == status
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str) and fragment in body["error"], body


def test_tritonclient_reads_the_kserve_error(demo_app):
    client = triton.InferenceServerClient(url=host_port(demo_app), network_timeout=120)
    try:
        bad = triton.InferInput("tokens", [1, 2], "INT32").set_data_from_numpy(np.array([[1, 2]], dtype=np.int32))
        with pytest.raises(InferenceServerException) as info:
            client.infer("reward_model", [bad])
        assert info.value.status() == "400"
        assert info.value.message() == "inputs[0].datatype: tokens must be INT64, not INT32"
    finally:
        client.close()


# --- OpenRLHF /get_reward -----------------------------------------------------------------------------------


def test_openrlhf_remote_rm_fn_gets_the_weighted_rewards(http, demo_app):
    convs = [conversation(i, turns=1 + i % 2) for i in range(4)]
    queries = rendered(convs)
    queries[1] = queries[1].removesuffix("<extra_id_2>")  # appended when missing
    queries[2] = queries[2].removesuffix("\n<extra_id_2>")  # the turn's newline too
    rewards = remote_rm_fn(f"{demo_app}/get_reward", queries, prompts=["p"] * 4, labels=["l"] * 4)
    want = native(http, convs)
    assert rewards.dtype == np.float64 and rewards.shape == (4,)
    np.testing.assert_allclose(rewards, [r["score"] for r in want], atol=TOL, rtol=0)
    body = http.post("/get_reward", json={"query": queries}).raise_for_status().json()
    assert body["scores"] == body["rewards"] and list(body["extra_logs"]) == list(ATTRIBUTE_NAMES)
    np.testing.assert_allclose(np.array([body["extra_logs"][n] for n in ATTRIBUTE_NAMES]).T,
                               [attributes_of(r) for r in want], atol=TOL, rtol=0)


def test_get_reward_fits_an_over_long_query_as_kserve_does(http):
    long_conv = {"messages": [{"role": "user", "content": LONG_TEXT}, {"role": "assistant", "content": "Fine."}]}
    body = http.post("/get_reward", json={"query": rendered([long_conv])}).raise_for_status().json()
    want = native(http, [long_conv], truncate="left")[0]
    assert want["truncated"] is True and body["rewards"][0] == pytest.approx(want["score"], abs=TOL)


@pytest.mark.parametrize("body, param", [({"query": []}, "query"), ({"query": ["  "]}, "query[0]"),
                                         ({"query": ["x"] * 33}, "query"), ({"query": ["x"], "extra": 1}, "extra")])
def test_get_reward_rejects_bad_input_naming_the_field(http, body, param):
    response = http.post("/get_reward", json=body)
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


# --- vLLM /classify and /pooling (veRL) -----------------------------------------------------------------------


def test_verl_style_classify_reads_the_reward_last(http):
    convs = [conversation(i, turns=2) for i in range(3)]
    want = native(http, convs)
    for conv, prompt, expected in zip(convs, rendered(convs), want):
        # veRL's reward loop: {"model", "input": rendered prompt, "activation": False}; reward = data[-1].probs[-1]
        body = http.post("/classify", json={"model": "demo", "input": prompt, "activation": False}).raise_for_status()
        output = body.json()
        assert output["data"][-1]["probs"][-1] == pytest.approx(expected["score"], abs=TOL)
        np.testing.assert_allclose(output["data"][0]["probs"][:NUM], attributes_of(expected), atol=TOL, rtol=0)
        assert output["data"][0]["num_classes"] == NUM + 1 and output["object"] == "list"
        assert output["usage"]["prompt_tokens"] == expected["num_tokens"] == output["usage"]["total_tokens"]
        by_messages = http.post("/classify", json={"messages": conv["messages"]}).raise_for_status().json()
        assert by_messages["data"][0]["probs"] == output["data"][0]["probs"]


def test_pooling_batch_input_matches_v1_score(http):
    convs = [conversation(i) for i in range(3)]
    body = http.post("/pooling", json={"model": "demo", "input": rendered(convs)}).raise_for_status().json()
    want = native(http, convs)
    assert [item["index"] for item in body["data"]] == [0, 1, 2] and body["data"][0]["object"] == "pooling"
    for item, expected in zip(body["data"], want):
        np.testing.assert_allclose(item["data"], [*attributes_of(expected), expected["score"]], atol=TOL, rtol=0)
        assert item["score"] == item["data"][-1] and item["attributes"] == expected["attributes"]
    assert body["usage"]["prompt_tokens"] == sum(r["num_tokens"] for r in want)


@pytest.mark.parametrize("path, body, status, param", [
    ("/classify", {"input": "x", "model": "other"}, 404, "model"),
    ("/classify", {"input": "x", "activation": True}, 400, "activation"),
    ("/classify", {"model": "demo"}, 400, "input"),
    ("/pooling", {"input": ["ok", "<extra_id_1>User\n" + LONG_TEXT]}, 400, "input[1]"),
    ("/pooling", {"messages": [{"role": "user", "content": LONG_TEXT}, {"role": "assistant", "content": "x"}]},
     400, "messages"),
])
def test_classify_and_pooling_errors_name_the_field(http, path, body, status, param):
    response = http.post(path, json=body)
    assert response.status_code == status and response.json()["error"]["param"] == param, response.text
    if param.startswith(("input[", "messages")):
        assert "the limit is 4096" in response.json()["error"]["message"]


@pytest.mark.parametrize("path, body, param", [
    ("/get_reward", {"query": ["ok", "x\ud800"]}, "query[1]"),
    ("/classify", {"input": "\ud800"}, "input[0]"),
    ("/pooling", {"input": ["ok", "\udfff"]}, "input[1]"),
    ("/v1/score", {"prompt": [{"role": "user", "content": "Hi"}], "responses": ["ok", "\ud800"]}, "responses[1]"),
    ("/v1/score", {"prompt": [{"role": "user", "content": "\ud800"}], "responses": ["ok"]}, "prompt[0].content"),
])
def test_a_lone_surrogate_is_a_400_naming_the_field(http, path, body, param):
    # `\ud800` escaped in the JSON: valid JSON, not Unicode text (it reached the tokenizer and gave a 500).
    response = http.post(path, content=json.dumps(body).encode(), headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and "unicode" in error["message"]


# --- OpenAI content parts -----------------------------------------------------------------------------------


def test_openai_sdk_typed_content_parts(http, demo_app):
    conv = conversation(5, turns=1)
    user, assistant = conv["messages"][-2:]
    first, _, rest = assistant["content"].partition(" ")
    parts = [{"type": "text", "text": first}, {"type": "text", "text": rest}]
    messages = [user, {"role": "assistant", "content": parts}]
    joined = {"messages": [user, {"role": "assistant", "content": f"{first}\n{rest}"}]}
    want = native(http, [joined])[0]
    with openai.OpenAI(base_url=f"{demo_app}/v1", api_key="unused", max_retries=0) as client:
        completion = client.chat.completions.create(model="demo", messages=messages)
        values = [float(v) for _, v in (item.split(":") for item in completion.choices[0].message.content.split(","))]
        assert values == [want["attributes"][n] for n in ATTRIBUTE_NAMES[-5:]]
        image = [{"type": "text", "text": "Look:"}, {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="demo", messages=[{"role": "user", "content": image}, assistant])
        assert info.value.body["param"] == "messages[0].content[1]" and "'image_url'" in info.value.message
    scored = native(http, [{"messages": messages}])[0]
    assert scored["attributes"] == want["attributes"] and scored["num_tokens"] == want["num_tokens"]


def test_openapi_documents_the_client_routes(http):
    spec = http.get("/openapi.json").raise_for_status().json()
    for path in ["/get_reward", "/classify", "/pooling", "/v2/models/{model_name}/config",
                 "/v2/models/{model_name}/versions/{model_version}/config",
                 "/v2/models/{model_name}/versions/{model_version}/infer",
                 "/v2/models/{model_name}/versions/{model_version}/ready",
                 "/v2/models/{model_name}/versions/{model_version}"]:
        assert path in spec["paths"], path
    schemas = spec["components"]["schemas"]
    assert {"GetRewardRequest", "GetRewardResponse", "ClassifyRequest", "ClassifyResponse",
            "PoolingRequest", "PoolingResponse"} <= set(schemas)
    assert "array" in json.dumps(schemas["Message"]["properties"]["content"])  # content parts documented
