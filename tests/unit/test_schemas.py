import pytest
from pydantic import ValidationError

from deployments.errors import InvalidRequestError
from deployments.schemas import ScoreRequest, ScoreResponse, format_loc, invalid_request_from_errors


def body(*messages, **extra):
    return {"conversations": [{"messages": list(messages)}], **extra}


USER = {"role": "user", "content": "Hi"}
ASSISTANT = {"role": "assistant", "content": "Hello!"}
SYSTEM = {"role": "system", "content": "Be brief."}


def rejected(payload) -> InvalidRequestError:
    with pytest.raises(ValidationError) as info:
        ScoreRequest.model_validate(payload)
    error = invalid_request_from_errors(info.value.errors())
    assert error.status_code == 400
    return error


def test_valid_requests():
    request = ScoreRequest.model_validate(body(SYSTEM, USER, ASSISTANT, USER, ASSISTANT))
    assert request.truncate == "none" and request.weights is None
    assert ScoreRequest.model_validate(body(ASSISTANT)).conversations[0].messages[0].role == "assistant"
    # Alternation is not required: consecutive user or assistant turns are fine.
    ScoreRequest.model_validate(body(USER, USER, ASSISTANT, ASSISTANT))
    request = ScoreRequest.model_validate(body(USER, ASSISTANT, weights=[1, 0.5, -2], truncate="left"))
    assert request.weights == [1.0, 0.5, -2.0] and request.truncate == "left"


@pytest.mark.parametrize(
    ("payload", "param", "fragment"),
    [
        (body({"role": "bot", "content": "x"}, ASSISTANT), "conversations[0].messages[0].role", "'user'"),
        (body(USER, {"role": "assistant", "content": ""}), "conversations[0].messages[1].content", "at least 1"),
        (body(USER, ASSISTANT, USER), "conversations[0].messages[2].role", "last message must be from the assistant"),
        (body(USER, SYSTEM, ASSISTANT), "conversations[0].messages[1].role", "system message is only allowed"),
        (body(USER, ASSISTANT, temperature=1), "temperature", "Extra inputs"),
        (body(USER, {"role": "assistant", "content": "x", "name": "bob"}), "conversations[0].messages[1].name",
         "Extra inputs"),
        ({"conversations": [{"messages": [ASSISTANT], "id": 1}]}, "conversations[0].id", "Extra inputs"),
        (body(USER, ASSISTANT, weights=[1.0, "2"]), "weights[1]", "valid number"),
        (body(USER, ASSISTANT, weights=[1.0, True]), "weights[1]", "valid number"),
        (body(USER, ASSISTANT, weights="1,2"), "weights", "valid list"),
        (body(USER, ASSISTANT, truncate="right"), "truncate", "'none' or 'left'"),
        (body(USER, {"role": "assistant", "content": 5}), "conversations[0].messages[1].content", "valid string"),
        ({"conversations": []}, "conversations", "at least 1"),
        ({"conversations": [{"messages": []}]}, "conversations[0].messages", "at least 1"),
        ({}, "conversations", "Field required"),
    ],
)
def test_bad_input_names_the_field(payload, param, fragment):
    error = rejected(payload)
    assert error.param == param
    assert fragment in error.message
    assert error.message.startswith(param)


def test_second_conversation_index_in_path():
    payload = {"conversations": [{"messages": [ASSISTANT]}, {"messages": [USER, SYSTEM, ASSISTANT]}]}
    assert rejected(payload).param == "conversations[1].messages[1].role"


def test_fastapi_style_errors():
    errors = [{"type": "missing", "loc": ("body", "conversations"), "msg": "Field required"}]
    assert invalid_request_from_errors(errors, body_prefix=True).param == "conversations"
    json_error = [{"type": "json_invalid", "loc": ("body", 12), "msg": "JSON decode error",
                   "ctx": {"error": "Expecting value"}}]
    error = invalid_request_from_errors(json_error, body_prefix=True)
    assert error.param is None and "not valid JSON" in error.message and "12" in error.message
    many = errors * 3
    assert "(and 2 more errors)" in invalid_request_from_errors(many, body_prefix=True).message


def test_format_loc():
    assert format_loc(("conversations", 2, "messages", 0, "role")) == "conversations[2].messages[0].role"
    assert format_loc(()) is None


def test_response_model_round_trip():
    payload = {
        "model": "m",
        "device": "cpu",
        "results": [{"index": 0, "score": 1.5, "attributes": {"helpfulness": 2.0}, "num_tokens": 12,
                     "truncated": False}],
        "usage": {"prompt_tokens": 12, "computed_tokens": 12, "queue_ms": 0.5, "compute_ms": 20.25,
                  "batch_tokens": [40], "model_replicas": ["abc"]},
    }
    assert ScoreResponse.model_validate(payload).model_dump(mode="json") == payload


def test_best_of_n_request():
    request = ScoreRequest.model_validate({"prompt": [SYSTEM, USER], "responses": ["A.", "B.", "A."]})
    assert request.best_of_n and request.conversations is None
    conversations = request.scored_conversations
    assert [c.messages[-1].content for c in conversations] == ["A.", "B.", "A."]
    assert all(c.messages[:2] == request.prompt and c.messages[-1].role == "assistant" for c in conversations)
    assert not ScoreRequest.model_validate(body(USER, ASSISTANT)).best_of_n


@pytest.mark.parametrize(
    ("payload", "param", "fragment"),
    [
        ({"prompt": [USER, ASSISTANT], "responses": ["x"]}, "prompt[1].role", "must end with a user message"),
        ({"prompt": [USER, SYSTEM, USER], "responses": ["x"]}, "prompt[1].role", "system message is only allowed"),
        ({"prompt": [USER], "responses": ["x", ""]}, "responses[1]", "must not be empty"),
        ({"prompt": [USER], "responses": []}, "responses", "at least 1"),
        ({"prompt": [USER]}, None, "prompt and responses go together"),
        ({**body(USER, ASSISTANT), "prompt": [USER], "responses": ["x"]}, None, "not both"),
        ({"prompt": [USER], "responses": [3]}, "responses[0]", "valid string"),
        # A lone surrogate is valid JSON and not Unicode text: refused where it is, never at the tokenizer.
        ({"prompt": [USER], "responses": ["ok", "\ud800"]}, "responses[1]", "unicode"),
        ({"prompt": [SYSTEM, {"role": "user", "content": "a\udfffb"}], "responses": ["x"]}, "prompt[1].content",
         "unicode"),
        (body(USER, {"role": "assistant", "content": "\ud800"}), "conversations[0].messages[1].content", "unicode"),
    ],
)
def test_bad_best_of_n_names_the_field(payload, param, fragment):
    error = rejected(payload)
    assert error.param == param
    assert fragment in error.message
