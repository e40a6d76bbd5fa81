import pytest
from pydantic import ValidationError

from configs.service import ATTRIBUTE_NAMES
from deployments.openai_api import ChatCompletionRequest, chat_completion_body, models_body
from deployments.schemas import invalid_request_from_errors

VALUES = dict(zip(ATTRIBUTE_NAMES, [0.1, -0.2, 0.3, 0.4, 0.35, -0.36, 2.98, 0.1, 0.15]))


def test_body_is_the_hosted_shape_with_the_five_trained_attributes():
    body = chat_completion_body("req-1", "m", VALUES, prompt_tokens=60)
    assert body == {
        "id": "req-1", "object": "chat.completion", "model": "m",
        "choices": [{"index": 0, "finish_reason": "length",
                     "message": {"role": "assistant",
                                 "content": "helpfulness:0.35,correctness:-0.36,coherence:2.98,complexity:0.1,"
                                            "verbosity:0.15"},
                     "logprobs": {"content": [{"token": n, "logprob": VALUES[n], "top_logprobs": []}
                                              for n in ATTRIBUTE_NAMES[-5:]]}}],
        "usage": {"prompt_tokens": 60, "completion_tokens": 1, "total_tokens": 61},
    }


def test_content_floats_parse_back_exactly():
    value = 0.3499999940395355  # a float32 value as /v1/score serves it
    content = chat_completion_body("i", "m", {**VALUES, "helpfulness": value}, 1)["choices"][0]["message"]["content"]
    assert float(content.split(",")[0].split(":")[1]) == value


def test_models_body():
    assert models_body("m", "cpu")["data"][0]["id"] == "m"
    assert models_body("m", "simulated:h200")["data"][0]["device"] == "simulated:h200"


@pytest.mark.parametrize("payload, param", [
    ({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, "messages[0].role"),
    ({"model": "m", "messages": [{"role": "assistant", "content": "x"}], "temprature": 0}, "temprature"),
    ({"model": "m", "messages": [{"role": "assistant", "content": "x"}], "stream": True}, "stream"),
    ({"messages": [{"role": "assistant", "content": "x"}]}, "model"),
])
def test_request_validation_names_the_field(payload, param):
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate(payload)
    assert invalid_request_from_errors(info.value.errors()).param == param


def test_generation_parameters_are_accepted_and_ignored():
    """SDKs send these by default; the hosted API ignores them, and so does the service (issue: a 400 before)."""
    params = {"n": 1, "temperature": 0.7, "top_p": 0.9, "max_tokens": 16, "max_completion_tokens": 16,
              "stop": ["\n"], "seed": 3, "presence_penalty": 0, "frequency_penalty": 0, "logprobs": True,
              "top_logprobs": 0, "user": "u", "stream": False, "logit_bias": {}, "stream_options": None}
    request = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "assistant", "content": "x"}], **params})
    assert [m.content for m in request.messages] == ["x"]


def test_stream_true_is_a_clear_error():
    with pytest.raises(ValidationError) as info:
        ChatCompletionRequest.model_validate(
            {"model": "m", "messages": [{"role": "assistant", "content": "x"}], "stream": True})
    error = invalid_request_from_errors(info.value.errors())
    assert error.param == "stream" and "streaming is not supported" in error.message
