import pickle

import pytest

from deployments.errors import (
    AuthenticationError,
    NotFoundError,
    InputTooLongError,
    OverloadedError,
    InvalidRequestError,
    ServiceError,
    ServiceUnavailableError,
    unwrap_service_error,
)

CASES = [
    ServiceError("boom"),
    InvalidRequestError("bad role", param="conversations[2].messages[0].role"),
    InputTooLongError(3, 5120, 4096),
    InputTooLongError(1, 9000, 4096, detail="truncate=left cannot fit it"),
    InputTooLongError(0, 5000, 4096, field="messages"),
    ServiceUnavailableError("worker 3 died"),
    OverloadedError("the router's queue is full", retry_after_s=7),
    AuthenticationError("missing API key"),
    NotFoundError("no model 'x'", param="model"),
]


@pytest.mark.parametrize("error", CASES, ids=lambda e: type(e).__name__)
def test_pickle_round_trip_keeps_type_and_fields(error):
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert vars(copy) == vars(error)
    assert copy.to_body() == error.to_body()
    assert str(copy) == str(error)


def test_body_shape():
    body = InvalidRequestError("bad role", param="conversations[2].messages[0].role").to_body()
    assert body == {
        "error": {
            "message": "bad role",
            "type": "invalid_request_error",
            "param": "conversations[2].messages[0].role",
            "code": 400,
        }
    }


def test_input_too_long_fields_and_message():
    error = InputTooLongError(3, 5120, 4096)
    assert (error.conversation_index, error.num_tokens, error.limit_tokens) == (3, 5120, 4096)
    assert error.message == "conversations[3] has 5120 tokens; the limit is 4096"
    assert error.param == "conversations[3]"
    assert error.to_body()["error"]["code"] == 400
    assert error.to_body()["error"]["type"] == "input_too_long"
    assert isinstance(error, InvalidRequestError)


def test_unavailable_is_retryable_503():
    error = ServiceUnavailableError("worker died")
    assert error.retryable and error.status_code == 503
    assert error.to_body()["error"] == {
        "message": "worker died",
        "type": "service_unavailable",
        "param": None,
        "code": 503,
    }
    assert not InvalidRequestError("x").retryable


def test_unwrap_finds_the_cause_of_a_wrapper():
    inner = InvalidRequestError("bad", param="weights")

    class Wrapper(Exception):
        def __init__(self, cause):
            self.cause = cause

    assert unwrap_service_error(Wrapper(inner)) is inner
    assert unwrap_service_error(inner) is inner
    assert unwrap_service_error(ValueError("x")) is None
