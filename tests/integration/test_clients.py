"""The clients people already use, against the TP1 app at "/": per-turn scoring, the `openai` SDK on
/v1/chat/completions, `tritonclient.http` on /v2 (JSON and binary), request ids and metrics. Each gets the
numbers `POST /v1/score` gives for the same conversations."""

from __future__ import annotations

import time

import httpx
import numpy as np
import openai
import pytest
import tritonclient.http as triton
from ray import serve
from tritonclient.utils import InferenceServerException

from configs.service import ATTRIBUTE_NAMES
from deployments.prompt import render_prompt
from deployments.schemas import ScoreRequest
from tests.integration.test_service import LONG_TEXT, attributes_of, conversation

TOL = 1e-5
TRAINED = ATTRIBUTE_NAMES[-5:]


def score(http, conversations: list[dict], **extra) -> dict:
    return http.post("/v1/score", json={"conversations": conversations, **extra}).raise_for_status().json()


def multi_turn(i: int, turns: int) -> dict:
    return conversation(i, turns=turns, words=3 + 2 * i)


# --- turns: "all" ---------------------------------------------------------------------------------------


def test_turns_all_scores_each_assistant_prefix(http):
    convs = [multi_turn(0, 3), multi_turn(1, 1), multi_turn(2, 2)]  # conversation 0 has a system message
    body = score(http, convs, turns="all")
    prefixes, where = [], []
    for c, conv in enumerate(convs):
        for m, message in enumerate(conv["messages"]):
            if message["role"] == "assistant":
                prefixes.append({"messages": conv["messages"][: m + 1]})
                where.append((c, m))
    expected = score(http, prefixes)["results"]
    got = [(r["index"], t) for r in body["results"] for t in r["turns"]]
    assert [(c, t["message_index"]) for c, t in got] == where  # turn order, indices into messages
    for (_, turn), want in zip(got, expected):
        np.testing.assert_allclose(attributes_of(turn), attributes_of(want), atol=TOL, rtol=0)
        assert turn["score"] == pytest.approx(want["score"], abs=TOL)
        assert turn["num_tokens"] == want["num_tokens"] and turn["truncated"] is False
    last = score(http, convs)["results"]
    for result, plain in zip(body["results"], last):  # the conversation's own fields are the last turn's
        assert {k: v for k, v in result.items() if k != "turns"}.keys() == plain.keys()
        assert result["num_tokens"] == result["turns"][-1]["num_tokens"] == plain["num_tokens"]
        np.testing.assert_allclose(attributes_of(result), attributes_of(plain), atol=TOL, rtol=0)
    assert body["usage"]["prompt_tokens"] == sum(t["num_tokens"] for _, t in got)
    assert "turns" not in last[0]  # "last" keeps the original shape


def test_turns_all_through_the_handle(demo_app):
    handle = serve.get_app_handle("reward")
    response = handle.score.remote({"conversations": [multi_turn(4, 2)], "turns": "all"}).result()
    turns = response["results"][0]["turns"]
    assert [t["message_index"] for t in turns] == [1, 3]
    assert set(turns[0]["attributes"]) == set(ATTRIBUTE_NAMES)


def test_a_handle_request_over_the_size_limit_is_refused_as_http_would_be(demo_app):
    """A handle call with more text than `router.max_request_bytes` (16 MiB) gets the typed 413 error naming the
    limit, as the same request over HTTP would, instead of being tokenized; the next call is scored."""
    from deployments.errors import RequestTooLargeError

    handle = serve.get_app_handle("reward")
    huge = {"conversations": [{"messages": [{"role": "user", "content": "x" * (16 * 2**20 + 1)},
                                            {"role": "assistant", "content": "y"}]}]}
    with pytest.raises(RequestTooLargeError, match=r"more than 16777216 characters of text; the limit "
                                                   r"\(router.max_request_bytes\) is 16777216"):
        handle.score.remote(huge).result()
    assert handle.score.remote({"conversations": [multi_turn(2, 1)]}).result()["results"][0]["num_tokens"] > 0


def test_turns_all_rejects_bad_value(http):
    response = http.post("/v1/score", json={"conversations": [multi_turn(0, 1)], "turns": "every"})
    assert response.status_code == 400 and response.json()["error"]["param"] == "turns"


# --- OpenAI / NIM -----------------------------------------------------------------------------------------


@pytest.fixture
def openai_client(demo_app):
    with openai.OpenAI(base_url=f"{demo_app}/v1", api_key="not-needed-here", max_retries=0) as client:
        yield client


def test_openai_sdk_chat_completion_matches_v1_score(http, openai_client):
    conv = multi_turn(5, 2)
    completion = openai_client.chat.completions.create(model="demo", messages=conv["messages"])
    native = score(http, [conv])["results"][0]
    choice = completion.choices[0]
    assert choice.finish_reason == "length" and choice.index == 0 and choice.message.role == "assistant"
    pairs = [item.split(":") for item in choice.message.content.split(",")]
    assert [name for name, _ in pairs] == list(TRAINED)
    assert [float(value) for _, value in pairs] == [native["attributes"][name] for name in TRAINED]
    assert [(t.token, t.logprob, t.top_logprobs) for t in choice.logprobs.content] == [
        (name, native["attributes"][name], []) for name in TRAINED
    ]
    assert completion.usage.prompt_tokens == native["num_tokens"]
    assert (completion.usage.completion_tokens, completion.usage.total_tokens) == (1, native["num_tokens"] + 1)
    assert completion.model == "demo" and completion.object == "chat.completion"


def test_chat_completion_body_is_the_hosted_shape(http):
    conv = multi_turn(6, 1)
    response = http.post("/v1/chat/completions", json={"model": "demo", **conv}, headers={"X-Request-Id": "nim-1"})
    body = response.raise_for_status().json()
    assert response.headers["x-request-id"] == "nim-1"
    assert set(body) == {"id", "object", "model", "choices", "usage"}
    assert set(body["choices"][0]) == {"index", "finish_reason", "message", "logprobs"}
    assert set(body["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}


def test_openai_sdk_lists_the_model(openai_client):
    assert [m.id for m in openai_client.models.list().data] == ["demo"]


def test_openai_sdk_errors_name_the_field(openai_client):
    messages = multi_turn(7, 1)["messages"]
    with pytest.raises(openai.NotFoundError) as info:
        openai_client.chat.completions.create(model="nvidia/other", messages=messages)
    assert "nvidia/other" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        openai_client.chat.completions.create(model="demo", messages=messages[:-1])
    assert info.value.body["param"] == f"messages[{len(messages) - 2}].role"
    long = [{"role": "user", "content": LONG_TEXT}, {"role": "assistant", "content": "ok"}]
    with pytest.raises(openai.BadRequestError) as info:
        openai_client.chat.completions.create(model="demo", messages=long)
    assert info.value.body["param"] == "messages" and "the limit is 4096" in info.value.message


# --- KServe v2 / Triton -----------------------------------------------------------------------------------


@pytest.fixture
def triton_client(demo_app):
    client = triton.InferenceServerClient(url=demo_app.removeprefix("http://"), network_timeout=120)
    yield client
    client.close()


def sentences_input(prompts: list[str], binary: bool) -> triton.InferInput:
    array = np.array([[p.encode("utf-8")] for p in prompts], dtype=np.object_)
    return triton.InferInput("sentences", list(array.shape), "BYTES").set_data_from_numpy(array, binary_data=binary)


@pytest.mark.parametrize("binary", [False, True], ids=["json", "binary"])
def test_tritonclient_sentences_match_v1_score(http, triton_client, binary):
    convs = [multi_turn(i, 1 + i % 2) for i in range(4)]
    prompts = [render_prompt(c.messages) for c in ScoreRequest.model_validate({"conversations": convs}).conversations]
    outputs = [triton.InferRequestedOutput("rewards", binary_data=binary),
               triton.InferRequestedOutput("exceeded", binary_data=binary)]
    result = triton_client.infer("reward_model", [sentences_input(prompts, binary)], outputs=outputs)
    rewards, exceeded = result.as_numpy("rewards"), result.as_numpy("exceeded")
    assert rewards.dtype == np.float32 and rewards.shape == (4, len(ATTRIBUTE_NAMES))
    assert exceeded.dtype == np.int32 and exceeded.tolist() == [[0]] * 4
    native = score(http, convs)["results"]
    np.testing.assert_allclose(rewards, [attributes_of(r) for r in native], atol=TOL, rtol=0)


def test_tritonclient_tokens_and_default_binary_outputs(http, triton_client, tokenizer):
    convs = [multi_turn(i, 2) for i in range(3)]
    prompts = [render_prompt(c.messages) for c in ScoreRequest.model_validate({"conversations": convs}).conversations]
    ids = [tokenizer.encode(p) for p in prompts]
    tokens = np.zeros((3, max(map(len, ids)) + 5), dtype=np.int64)
    for row, seq in enumerate(ids):
        tokens[row, : len(seq)] = seq
    lengths = np.array([[len(seq)] for seq in ids], dtype=np.int64)
    inputs = [triton.InferInput("tokens", list(tokens.shape), "INT64").set_data_from_numpy(tokens),
              triton.InferInput("sequence_lengths", [3, 1], "INT64").set_data_from_numpy(lengths, binary_data=False)]
    result = triton_client.infer("reward_model", inputs)  # no outputs named: all, binary
    native = score(http, convs)["results"]
    np.testing.assert_allclose(result.as_numpy("rewards"), [attributes_of(r) for r in native], atol=TOL, rtol=0)
    assert result.get_response()["outputs"][0]["parameters"]["binary_data_size"] == 3 * len(ATTRIBUTE_NAMES) * 4


def test_tritonclient_over_long_input_keeps_the_end_and_sets_exceeded(http, triton_client):
    long_conv = {"messages": [{"role": "user", "content": LONG_TEXT}, {"role": "assistant", "content": "Fine."}]}
    short = multi_turn(1, 1)
    prompts = [render_prompt(ScoreRequest.model_validate({"conversations": [c]}).conversations[0].messages)
               for c in (long_conv, short)]
    result = triton_client.infer("reward_model", [sentences_input(prompts, True)])
    assert result.as_numpy("exceeded").tolist() == [[1], [0]]
    # Keeping the system segment and the last tokens is what `truncate: left` does to the same conversation.
    native = score(http, [long_conv, short], truncate="left")["results"]
    assert native[0]["truncated"] is True
    np.testing.assert_allclose(result.as_numpy("rewards"), [attributes_of(r) for r in native], atol=TOL, rtol=0)


def test_tritonclient_health_and_metadata(triton_client):
    assert triton_client.is_server_live() and triton_client.is_server_ready()
    assert triton_client.is_model_ready("reward_model")
    metadata = triton_client.get_model_metadata("reward_model")
    assert metadata["name"] == "reward_model" and metadata["platform"]
    assert {i["name"]: (i["datatype"], i["shape"]) for i in metadata["inputs"]} == {
        "sentences": ("BYTES", [-1, 1]), "tokens": ("INT64", [-1, -1]),
        "sequence_lengths": ("INT64", [-1, 1]), "add_EOS": ("BOOL", [-1, 1])}
    assert {o["name"]: (o["datatype"], o["shape"]) for o in metadata["outputs"]} == {
        "rewards": ("FP32", [-1, len(ATTRIBUTE_NAMES)]), "exceeded": ("INT32", [-1, 1])}
    assert "binary_tensor_data" in triton_client.get_server_metadata()["extensions"]
    with pytest.raises(InferenceServerException) as info:
        triton_client.get_model_metadata("no_such_model")
    assert info.value.status() == "404"


def test_tritonclient_bad_input_is_a_400_naming_the_field(triton_client):
    array = np.array([[1, 2]], dtype=np.int32)
    bad = triton.InferInput("tokens", [1, 2], "INT32").set_data_from_numpy(array)
    with pytest.raises(InferenceServerException) as info:
        triton_client.infer("reward_model", [bad])
    assert info.value.status() == "400"
    assert info.value.message().startswith("inputs[0].datatype: ")  # KServe's {"error": "<message>"}


def test_kserve_request_id_is_echoed(http):
    body = {"id": "req-7", "inputs": [{"name": "sentences", "shape": [1, 1], "datatype": "BYTES",
                                       "data": ["<extra_id_0>System\nx\n<extra_id_1>User\nhi\n<extra_id_1>Assistant\nyo\n<extra_id_2>"]}]}
    response = http.post("/v2/models/reward_model/infer", json=body, headers={"X-Request-Id": "kserve-1"})
    assert response.raise_for_status().headers["x-request-id"] == "kserve-1"
    assert response.json()["id"] == "req-7"
    assert [o["name"] for o in response.json()["outputs"]] == ["rewards", "exceeded"]


# --- metrics ----------------------------------------------------------------------------------------------


def test_router_exports_prometheus_metrics(http, ray_cluster):
    score(http, [multi_turn(2, 2)])
    http.post("/v1/score", json={"conversations": [{"messages": [{"role": "user", "content": LONG_TEXT},
                                                                   {"role": "assistant", "content": "ok"}]}]})
    ports = [node.metrics_export_port for node in [ray_cluster.head_node, *ray_cluster.worker_nodes]]
    wanted = ["ray_reward_requests_total", "ray_reward_rejected_too_long_total", "ray_reward_batch_tokens_bucket",
              "ray_reward_batch_padding_share_bucket", "ray_reward_batch_latency_seconds_bucket"]
    deadline, text = time.monotonic() + 90, ""
    while time.monotonic() < deadline:
        text = "".join(httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text for port in ports)
        if all(name in text for name in wanted):
            break
        time.sleep(2)
    missing = [name for name in wanted if name not in text]
    assert not missing, f"not exported: {missing}"
    assert 'route="/v1/score"' in text and 'status="400"' in text
