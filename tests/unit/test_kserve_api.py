"""The KServe v2 codec against tritonclient's own request encoder and response decoder (no server)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.http._infer_result import InferResult
from tritonclient.http._utils import _get_inference_request

from deployments.errors import InvalidRequestError
from deployments.kserve_api import HEADER_LENGTH, encode_infer_response, parse_infer_request, token_lists

VOCAB = 100
EOS = 3


def client_request(inputs, outputs=None, request_id=""):
    body, json_size = _get_inference_request(inputs=inputs, request_id=request_id, outputs=outputs, sequence_id=0,
                                             sequence_start=False, sequence_end=False, priority=0, timeout=None,
                                             custom_parameters=None)
    return parse_infer_request(body, None if json_size is None else str(json_size), None)


def sentences(texts, binary):
    array = np.array([[t.encode()] for t in texts], dtype=np.object_)
    return triton.InferInput("sentences", list(array.shape), "BYTES").set_data_from_numpy(array, binary_data=binary)


def encode(text: str) -> list[int]:
    return [ord(c) % VOCAB for c in text]


@pytest.mark.parametrize("binary", [False, True])
def test_sentences_round_trip(binary):
    request = client_request([sentences(["héllo", "ab"], binary)], request_id="r1")
    assert request.id == "r1" and request.tensors["sentences"].tolist() == [["héllo".encode()], [b"ab"]]
    assert request.outputs == [("rewards", True), ("exceeded", True)]  # no outputs named: binary, all
    assert token_lists(request, encode, VOCAB, EOS) == [encode("héllo"), encode("ab")]


@pytest.mark.parametrize("binary", [False, True])
def test_tokens_with_lengths_and_add_eos(binary):
    tokens = np.array([[5, 6, 7, 0], [8, 9, 0, 0]], dtype=np.int64)
    inputs = [triton.InferInput("tokens", [2, 4], "INT64").set_data_from_numpy(tokens, binary_data=binary),
              triton.InferInput("sequence_lengths", [2, 1], "INT64").set_data_from_numpy(
                  np.array([[3], [2]], dtype=np.int64), binary_data=binary),
              triton.InferInput("add_EOS", [2, 1], "BOOL").set_data_from_numpy(
                  np.array([[True], [False]]), binary_data=binary)]
    request = client_request(inputs, outputs=[triton.InferRequestedOutput("exceeded", binary_data=False)])
    assert token_lists(request, encode, VOCAB, EOS) == [[5, 6, 7, EOS], [8, 9]]
    assert request.outputs == [("exceeded", False)]


@pytest.mark.parametrize("binary", [False, True])
def test_response_decodes_with_tritonclient(binary):
    rewards = np.arange(18, dtype=np.float32).reshape(2, 9) / 7
    exceeded = np.array([[0], [1]], dtype=np.int32)
    outputs = [triton.InferRequestedOutput("rewards", binary_data=binary),
               triton.InferRequestedOutput("exceeded", binary_data=binary)]
    request = client_request([sentences(["a", "b"], True)], outputs=outputs, request_id="x")
    body, headers = encode_infer_response("reward_model", request, {"rewards": rewards, "exceeded": exceeded})
    result = InferResult.from_response_body(body, header_length=headers.get(HEADER_LENGTH) and int(headers[HEADER_LENGTH]))
    np.testing.assert_array_equal(result.as_numpy("rewards"), rewards)
    np.testing.assert_array_equal(result.as_numpy("exceeded"), exceeded)
    assert result.get_response()["id"] == "x" and (HEADER_LENGTH in headers) == binary


def raw(body: dict, binary: bytes = b"") -> tuple[bytes, str | None]:
    header = json.dumps(body).encode()
    return header + binary, (str(len(header)) if binary else None)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"inputs": [{"name": "text", "shape": [1, 1], "datatype": "BYTES", "data": ["x"]}]}, "inputs[0].name"),
        ({"inputs": [{"name": "sentences", "shape": [1, 1], "datatype": "STRING", "data": ["x"]}]},
         "inputs[0].datatype"),
        ({"inputs": [{"name": "sentences", "shape": [1], "datatype": "BYTES", "data": ["x"]}]}, "inputs[0].shape"),
        ({"inputs": [{"name": "sentences", "shape": [2, 1], "datatype": "BYTES", "data": ["x"]}]}, "inputs[0].data"),
        ({"inputs": [{"name": "sentences", "shape": [1, 1], "datatype": "BYTES"}]}, "inputs[0].data"),
        ({"inputs": []}, "inputs"),
        ({"inputs": [{"name": "sentences", "shape": [1, 1], "datatype": "BYTES", "data": ["x"]}],
          "outputs": [{"name": "logits"}]}, "outputs[0].name"),
        ({"inputs": [{"name": "sentences", "shape": [1, 1], "datatype": "BYTES", "data": ["x"]}],
          "parameters": {"priority": 1}}, "parameters.priority"),
    ],
    ids=["unknown-input", "wrong-datatype", "wrong-shape", "short-data", "no-data", "no-inputs", "unknown-output",
         "unknown-parameter"],
)
def test_bad_requests_name_the_field(body, param):
    with pytest.raises(InvalidRequestError) as info:
        parse_infer_request(*raw(body), None)
    assert info.value.param == param


def test_binary_sizes_must_add_up():
    body = {"inputs": [{"name": "tokens", "shape": [1, 2], "datatype": "INT64", "parameters": {"binary_data_size": 16}}]}
    with pytest.raises(InvalidRequestError, match="past the end"):
        parse_infer_request(*raw(body, b"\0" * 8), None)
    with pytest.raises(InvalidRequestError, match="after the tensors"):
        parse_infer_request(*raw(body, b"\0" * 24), None)


def test_token_rules():
    def tokens_request(tokens, lengths):
        t = np.array(tokens, dtype=np.int64)
        return client_request([triton.InferInput("tokens", list(t.shape), "INT64").set_data_from_numpy(t),
                               triton.InferInput("sequence_lengths", [len(lengths), 1], "INT64").set_data_from_numpy(
                                   np.array([[n] for n in lengths], dtype=np.int64))])

    with pytest.raises(InvalidRequestError) as info:
        token_lists(tokens_request([[1, 2]], [3]), encode, VOCAB, EOS)
    assert info.value.param == "sequence_lengths"
    with pytest.raises(InvalidRequestError) as info:
        token_lists(tokens_request([[1, VOCAB]], [2]), encode, VOCAB, EOS)
    assert info.value.param == "tokens"
    with pytest.raises(InvalidRequestError) as info:
        token_lists(client_request([sentences([""], True)]), encode, VOCAB, EOS)
    assert info.value.param == "sentences"
