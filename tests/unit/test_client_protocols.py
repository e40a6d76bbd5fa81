"""The client protocols' pure parts: Triton's model config as PyTriton parses it, versioned-route checks,
OpenAI content parts, rendered prompts (OpenRLHF `query`, vLLM `input`), and the `/get_reward`,
`/classify` and `/pooling` bodies."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError
from pytriton.model_config.parser import ModelConfigParser

from configs.service import ATTRIBUTE_NAMES
from deployments.errors import InputTooLongError, InvalidRequestError, NotFoundError, error_body
from deployments.kserve_api import check_model_version, model_config
from deployments.openai_api import ChatCompletionRequest
from deployments.openrlhf_api import GetRewardRequest, get_reward_body
from deployments.prompt import END_MARKER, SteerLMPrompt, render_prompt
from deployments.rendered_prompts import tokenize_rendered
from deployments.schemas import Message, invalid_request_from_errors
from deployments.vllm_api import ClassifyRequest, PoolingRequest, classify_body, pooling_body

NAMES = list(ATTRIBUTE_NAMES)


def scored(rows: list[list[float]], weights: list[float]) -> list[dict]:
    return [{"score": float(np.dot(row, weights)), "attributes": dict(zip(NAMES, row))} for row in rows]


def error_of(model, body) -> InvalidRequestError:
    with pytest.raises(ValidationError) as info:
        model.model_validate(body)
    return invalid_request_from_errors(info.value.errors())


# --- Triton / KServe --------------------------------------------------------------------------------------


def test_model_config_parses_as_pytriton_reads_it():
    config = ModelConfigParser.from_dict(model_config("reward_model", 9, max_batch_size=64))
    assert config.model_name == "reward_model" and config.batching and config.max_batch_size == 64
    assert not config.decoupled and config.batcher.max_queue_delay_microseconds == 0
    assert [(s.name, s.shape, s.dtype, s.optional) for s in config.inputs] == [
        ("sentences", (1,), np.bytes_, True), ("tokens", (-1,), np.int64, True),
        ("sequence_lengths", (1,), np.int64, True), ("add_EOS", (1,), np.bool_, True)]
    assert [(s.name, s.shape, s.dtype) for s in config.outputs] == [
        ("rewards", (9,), np.float32), ("exceeded", (1,), np.int32)]


def test_versioned_routes_serve_version_1_only():
    check_model_version(None)
    check_model_version("1")
    with pytest.raises(NotFoundError, match="model version '2' is not served here; the only version is '1'"):
        check_model_version("2")
    error = InvalidRequestError("inputs[0].name: unknown input", param="inputs[0].name")
    assert error_body(error, "/v2/models/reward_model/infer") == {"error": "inputs[0].name: unknown input"}
    assert error_body(error, "/v1/score") == error.to_body()


# --- OpenAI content parts ---------------------------------------------------------------------------------


def test_text_parts_are_joined_in_order():
    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    request = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": "ok"}]})
    assert request.messages[0].content == "first\nsecond"
    plain = [Message(role="user", content="first\nsecond"), Message(role="assistant", content="ok")]
    assert render_prompt(request.messages) == render_prompt(plain)


@pytest.mark.parametrize("content, param, fragment", [
    ([{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "x"}}], "messages[1].content[1]",
     "a part of type 'image_url' cannot be scored"),
    ([{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}], "messages[1].content[0]",
     "'input_audio'"),
    (["just a string"], "messages[1].content[0]", "not a content part"),
    ([{"type": "text", "text": "a", "cache": 1}], "messages[1].content[0]", "unexpected key 'cache'"),
    ([{"type": "text", "text": 3}], "messages[1].content[0]", "`text` must be a string"),
    ([], "messages[1].content", "content has no parts"),
    ([{"type": "text", "text": ""}], "messages[1].content", "at least 1 character"),
    (7, "messages[1].content", "valid string"),
])
def test_other_parts_are_rejected_naming_the_part(content, param, fragment):
    error = error_of(ChatCompletionRequest, {"model": "m", "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": content}]})
    assert error.param == param and fragment in error.message, error.message


# --- rendered prompts ---------------------------------------------------------------------------------------


def test_rendered_prompts_get_the_end_marker_when_missing(demo_tokenizer):
    prompt_format = SteerLMPrompt(demo_tokenizer)
    full = render_prompt([Message(role="user", content="Hi"), Message(role="assistant", content="Hello there")])
    assert full.endswith("\n" + END_MARKER)
    variants = [full, full.removesuffix(END_MARKER), full.removesuffix("\n" + END_MARKER)]
    prompts = tokenize_rendered(prompt_format, variants, max_tokens=4096, field="query", truncate=False)
    assert [p.token_ids for p in prompts] == [demo_tokenizer.encode(full)] * 3
    assert not any(p.truncated for p in prompts)


def test_rendered_prompt_limit_policies(demo_tokenizer):
    prompt_format = SteerLMPrompt(demo_tokenizer)
    long = render_prompt([Message(role="user", content="word " * 300), Message(role="assistant", content="ok")])
    total = len(demo_tokenizer.encode(long))
    fitted = tokenize_rendered(prompt_format, ["short", long], max_tokens=64, field="query", truncate=True)
    assert fitted[1].truncated and fitted[1].num_tokens <= 64 < total
    assert fitted[1].token_ids == prompt_format.fit_token_ids(demo_tokenizer.encode(long), max_tokens=64).token_ids
    assert fitted[1].token_ids[-1] == demo_tokenizer.piece_id(END_MARKER)
    with pytest.raises(InputTooLongError) as info:
        tokenize_rendered(prompt_format, ["short", long], max_tokens=64, field="input", truncate=False)
    assert info.value.param == "input[1]" and info.value.message == f"input[1] has {total} tokens; the limit is 64"
    with pytest.raises(InvalidRequestError, match=r"query\[0\] is empty"):
        tokenize_rendered(prompt_format, [" \n"], max_tokens=64, field="query", truncate=True)


# --- /get_reward, /classify, /pooling bodies ----------------------------------------------------------------


def test_get_reward_request_and_body():
    request = GetRewardRequest.model_validate({"query": ["a", "b"], "prompts": ["p", None], "labels": [1, "x"]})
    assert request.query == ["a", "b"]
    assert error_of(GetRewardRequest, {"query": "a"}).param == "query"
    surrogate = error_of(GetRewardRequest, {"query": ["ok", "x\ud800"]})
    assert surrogate.param == "query[1]" and "unicode" in surrogate.message
    rows = [[float(i + j) for j in range(9)] for i in range(2)]
    body = get_reward_body(scored(rows, [1.0] * 9), NAMES).model_dump()
    assert body["rewards"] == body["scores"] == [36.0, 45.0]
    assert list(body["extra_logs"]) == NAMES and body["extra_logs"]["humor"] == [2.0, 3.0]


@pytest.mark.parametrize("body, param, fragment", [
    ({}, "input", "give either `input` or `messages`"),
    ({"input": "x", "messages": [{"role": "assistant", "content": "y"}]}, "input", "either"),
    ({"input": []}, "input", "empty list"),
    ({"input": "x", "use_activation": True}, "use_activation", "true is not supported"),
    ({"input": "x", "truncate_prompt_tokens": 10}, "truncate_prompt_tokens", "Extra inputs"),
    ({"messages": [{"role": "user", "content": "x"}]}, "messages[0].role", "last message"),
    ({"input": 3}, "input", "give a string or a list of strings"),
    ({"input": ["x", 3]}, "input[1]", "valid string"),
    # A lone surrogate is valid JSON and not Unicode text: a 400 naming the prompt, not a tokenizer 500.
    ({"input": "\ud800"}, "input[0]", "unicode"),
    ({"input": ["ok", "a\udc00"]}, "input[1]", "unicode"),
    ({"messages": [{"role": "assistant", "content": "\ud800"}]}, "messages[0].content", "unicode"),
])
def test_classify_request_rules(body, param, fragment):
    error = error_of(ClassifyRequest, body)
    assert error.param == param and fragment in error.message, error.message


def test_classify_and_pooling_bodies_end_with_the_reward():
    assert ClassifyRequest.model_validate({"input": "x", "activation": False, "add_special_tokens": False}).texts == ["x"]
    assert PoolingRequest.model_validate({"input": ["x", "y"]}).texts == ["x", "y"]
    rows = [[0.5, -1.0, 0.0, 0.0, 2.0, 1.0, 3.5, 0.25, 0.75]]
    weights = [0, 0, 0, 0, 0.3, 0.74, 0.46, 0.47, -0.33]
    items = scored(rows, weights)
    classify = classify_body("r1", "demo", items, NAMES, prompt_tokens=12).model_dump()
    data = classify["data"][0]
    assert data["probs"] == rows[0] + [items[0]["score"]] and data["num_classes"] == 10
    assert data["label"] == "coherence" and data["score"] == data["probs"][-1]
    assert classify["id"] == "classify-r1" and classify["usage"]["prompt_tokens"] == 12
    pooling = pooling_body("r1", "demo", items, NAMES, prompt_tokens=12).model_dump()
    assert pooling["data"][0]["data"] == data["probs"] and pooling["data"][0]["object"] == "pooling"
    assert pooling["data"][0]["attributes"] == dict(zip(NAMES, rows[0]))
