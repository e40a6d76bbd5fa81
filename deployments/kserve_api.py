"""The KServe v2 / Triton HTTP protocol of NeMo-Aligner's reward server (PyTriton, `serve_reward_model.py`), model
`reward_model`: request decoding, response encoding and metadata, with the binary tensor data extension.

Inputs (batched, B rows): `sentences` BYTES [B,1] (already formatted prompt strings, tokenized as they
are, no template), or `tokens` INT64 [B,S] + `sequence_lengths` INT64 [B,1]; optional `add_EOS` BOOL [B,1]
(appends the tokenizer's end-of-sequence id, as the reference server does; its annotator always sends it).
Outputs: `rewards` FP32 [B,num_attributes], `exceeded` INT32 [B,1].

Binary tensor data: the body is the JSON header (`Inference-Header-Content-Length` bytes) followed by the
raw tensors of the inputs that carry `parameters.binary_data_size`, in input order; BYTES elements are a
4-byte little-endian length and the bytes. Outputs are binary when `outputs[i].parameters.binary_data`
says so, else when the request's `parameters.binary_data_output` does (tritonclient sets it when it asks
for no particular outputs); the response then carries the same header.
"""

from __future__ import annotations

import json
import math
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import Field, StrictBool, StrictInt, StrictStr, ValidationError

from deployments.errors import InvalidRequestError, NotFoundError, RequestTooLargeError
from deployments.schemas import StrictBody, invalid_request_from_errors

SERVED_MODEL_NAME = "reward_model"
MODEL_VERSION = "1"
PLATFORM = "ray_serve"
HEADER_LENGTH = "Inference-Header-Content-Length"
INPUTS = {"sentences": ("BYTES", [-1, 1]), "tokens": ("INT64", [-1, -1]),
          "sequence_lengths": ("INT64", [-1, 1]), "add_EOS": ("BOOL", [-1, 1])}
OUTPUT_NAMES = ("rewards", "exceeded")
_NUMPY_TYPES = {"INT64": np.dtype("<i8"), "INT32": np.dtype("<i4"), "FP32": np.dtype("<f4"), "BOOL": np.dtype("?")}
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_JSON_TYPES = {"BYTES": (str,), "INT64": (int,), "BOOL": (bool,)}


class TensorParameters(StrictBody):
    binary_data_size: StrictInt | None = Field(
        default=None, ge=0, description="Bytes of this tensor in the binary section after the JSON header."
    )


class InputTensor(StrictBody):
    name: StrictStr = Field(description="`sentences`, `tokens`, `sequence_lengths` or `add_EOS`.")
    shape: list[StrictInt] = Field(description="Tensor shape, e.g. [B, 1].")
    datatype: StrictStr = Field(description="KServe datatype: BYTES, INT64 or BOOL.")
    data: list[Any] | None = Field(default=None, description="Row-major values when sent as JSON.")
    parameters: TensorParameters | None = Field(default=None, description="Binary data size, if binary.")


class OutputParameters(StrictBody):
    binary_data: StrictBool | None = Field(default=None, description="Return this output as binary data.")


class RequestedOutput(StrictBody):
    name: StrictStr = Field(description="`rewards` or `exceeded`.")
    parameters: OutputParameters | None = Field(default=None, description="Output options.")


class RequestParameters(StrictBody):
    binary_data_output: StrictBool | None = Field(
        default=None, description="Return outputs as binary data unless an output says otherwise."
    )


class InferRequestHeader(StrictBody):
    id: StrictStr | None = Field(default=None, description="Request id, echoed in the response.")
    inputs: list[InputTensor] = Field(min_length=1, description="The input tensors.")
    outputs: list[RequestedOutput] | None = Field(default=None, description="Outputs to return; null: all.")
    parameters: RequestParameters | None = Field(default=None, description="Request options.")


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    tensors: dict[str, np.ndarray]  # decoded inputs by name; BYTES as an object array of bytes
    outputs: list[tuple[str, bool]]  # (name, binary) in the order to answer


def parse_infer_request(
    body: bytes, header_length: str | None, content_encoding: str | None, max_bytes: int | None = None
) -> InferRequest:
    """Decodes a JSON or binary-extension request; raises InvalidRequestError naming the field, and
    RequestTooLargeError when a compressed body decompresses to more than `max_bytes`."""
    body = _decompress(body, content_encoding, max_bytes)
    json_size = len(body)
    if header_length is not None:
        try:
            json_size = int(header_length)
        except ValueError:
            json_size = -1
        if not 0 < json_size <= len(body):
            raise InvalidRequestError(
                f"{HEADER_LENGTH} {header_length!r} must be a byte count within the body ({len(body)} bytes)",
                param=HEADER_LENGTH,
            )
    try:
        header = InferRequestHeader.model_validate_json(body[:json_size])
    except ValidationError as exc:
        raise invalid_request_from_errors(exc.errors()) from None
    binary = memoryview(body)[json_size:]
    tensors: dict[str, np.ndarray] = {}
    offset = 0
    for index, tensor in enumerate(header.inputs):
        param = f"inputs[{index}]"
        if tensor.name not in INPUTS:
            raise InvalidRequestError(
                f"{param}.name: unknown input {tensor.name!r}; expected one of {', '.join(INPUTS)}",
                param=f"{param}.name",
            )
        if tensor.name in tensors:
            raise InvalidRequestError(f"{param}.name: input {tensor.name!r} is given twice", param=f"{param}.name")
        size = tensor.parameters.binary_data_size if tensor.parameters else None
        raw = None
        if size is not None:
            if offset + size > len(binary):
                raise InvalidRequestError(
                    f"{param}: binary_data_size {size} runs past the end of the body", param=f"{param}.parameters"
                )
            raw = binary[offset:offset + size]  # a view: numpy reads the tensors in place
            offset += size
        tensors[tensor.name] = _decode_tensor(tensor, raw, param)
    if offset != len(binary):
        raise InvalidRequestError(
            f"the body has {len(binary) - offset} bytes after the tensors that binary_data_size accounts for",
            param=HEADER_LENGTH,
        )
    return InferRequest(header.id, tensors, _requested_outputs(header))


def token_lists(
    request: InferRequest, encode: Callable[[str], list[int]], vocab_size: int, eos_id: int
) -> list[list[int]]:
    """The B token sequences of a decoded request: `sentences` tokenized as they are, or the first
    `sequence_lengths[i]` ids of `tokens[i]`; plus EOS where `add_EOS` is true."""
    t = request.tensors
    if ("sentences" in t) == ("tokens" in t or "sequence_lengths" in t):
        raise InvalidRequestError("give either `sentences` or both `tokens` and `sequence_lengths`", param="inputs")
    if "sentences" in t:
        sequences = []
        for i, raw in enumerate(t["sentences"][:, 0]):
            try:
                ids = encode(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise InvalidRequestError(f"sentences[{i}] is not valid UTF-8", param="sentences") from None
            if not ids:
                raise InvalidRequestError(f"sentences[{i}] is empty", param="sentences")
            sequences.append(ids)
    else:
        if "tokens" not in t or "sequence_lengths" not in t:
            raise InvalidRequestError("`tokens` needs `sequence_lengths` (and the other way round)", param="inputs")
        tokens, lengths = t["tokens"], t["sequence_lengths"][:, 0]
        if len(lengths) != tokens.shape[0]:
            raise InvalidRequestError(
                f"sequence_lengths has {len(lengths)} rows; tokens has {tokens.shape[0]}", param="sequence_lengths"
            )
        bad = [i for i, n in enumerate(lengths) if not 1 <= n <= tokens.shape[1]]
        if bad:
            raise InvalidRequestError(
                f"sequence_lengths[{bad[0]}] is {lengths[bad[0]]}; it must be in [1, {tokens.shape[1]}]",
                param="sequence_lengths",
            )
        sequences = [tokens[i, :n].tolist() for i, n in enumerate(lengths)]
        for i, ids in enumerate(sequences):
            if min(ids) < 0 or max(ids) >= vocab_size:
                raise InvalidRequestError(
                    f"tokens[{i}] has ids outside the vocabulary [0, {vocab_size})", param="tokens"
                )
    if "add_EOS" in t:
        flags = t["add_EOS"][:, 0]
        if len(flags) != len(sequences):
            raise InvalidRequestError(f"add_EOS has {len(flags)} rows; the batch has {len(sequences)}", param="add_EOS")
        sequences = [ids + [eos_id] if flag else ids for ids, flag in zip(sequences, flags)]
    return sequences


def encode_infer_response(
    model_name: str, request: InferRequest, outputs: dict[str, np.ndarray]
) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers; binary outputs follow the JSON header in output order."""
    entries, chunks = [], []
    for name, as_binary in request.outputs:
        array = outputs[name]
        entry: dict[str, Any] = {"name": name, "datatype": _datatype(array), "shape": list(array.shape)}
        if as_binary:
            raw = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = array.reshape(-1).tolist()
        entries.append(entry)
    body: dict[str, Any] = {"model_name": model_name, "model_version": MODEL_VERSION, "outputs": entries}
    if request.id is not None:
        body["id"] = request.id
    header = json.dumps(body).encode("utf-8")
    if not chunks:
        return header, {"content-type": "application/json"}
    return b"".join([header, *chunks]), {"content-type": "application/octet-stream", HEADER_LENGTH: str(len(header))}


def model_metadata(model_name: str, num_attributes: int, device: str) -> dict[str, Any]:
    """`GET /v2/models/{name}`; `device` says what computes the scores (`simulated:<card>` on a simulated
    accelerator)."""
    outputs = {"rewards": ("FP32", [-1, num_attributes]), "exceeded": ("INT32", [-1, 1])}
    return {
        "name": model_name,
        "versions": [MODEL_VERSION],
        "platform": PLATFORM,
        "device": device,
        "inputs": [{"name": n, "datatype": d, "shape": s} for n, (d, s) in INPUTS.items()],
        "outputs": [{"name": n, "datatype": d, "shape": s} for n, (d, s) in outputs.items()],
    }


_CONFIG_TYPES = {"BYTES": "TYPE_STRING", "INT64": "TYPE_INT64", "INT32": "TYPE_INT32", "BOOL": "TYPE_BOOL",
                 "FP32": "TYPE_FP32"}


def model_config(model_name: str, num_attributes: int, max_batch_size: int) -> dict[str, Any]:
    """`GET /v2/models/{name}/config`: Triton's JSON model configuration, what PyTriton's `ModelClient`
    reads before its first inference (`max_batch_size > 0` is what lets it call `infer_batch`). Dims leave
    out the batch dimension, as Triton does for batching models; every input is optional (`sentences` or
    `tokens` + `sequence_lengths`, `add_EOS` optional), checked per request. Dynamic batching has no queue
    delay: the router's batcher sends a batch as soon as the engine can take one (`deployments.batcher`)."""
    outputs = {"rewards": ("FP32", [num_attributes]), "exceeded": ("INT32", [1])}
    return {
        "name": model_name,
        "platform": PLATFORM,
        "max_batch_size": max_batch_size,
        "input": [
            {"name": n, "data_type": _CONFIG_TYPES[d], "dims": s[1:], "optional": True} for n, (d, s) in INPUTS.items()
        ],
        "output": [{"name": n, "data_type": _CONFIG_TYPES[d], "dims": s} for n, (d, s) in outputs.items()],
        "dynamic_batching": {"max_queue_delay_microseconds": 0, "preserve_ordering": True},
        "model_transaction_policy": {"decoupled": False},
    }


def check_model_version(version: str | None) -> None:
    """Versioned routes (`/v2/models/{name}/versions/{version}/...`) serve the one version metadata lists."""
    if version is not None and version != MODEL_VERSION:
        raise NotFoundError(f"model version {version!r} is not served here; the only version is {MODEL_VERSION!r}",
                            param="model_version")


def server_metadata(version: str) -> dict[str, Any]:
    return {"name": "reward-serve", "version": version, "extensions": ["binary_tensor_data"]}


def _decompress(body: bytes, content_encoding: str | None, max_bytes: int | None) -> bytes:
    """gzip or deflate (zlib) bodies, decompressed as a stream that stops at `max_bytes`."""
    encoding = (content_encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise InvalidRequestError(f"Content-Encoding {encoding!r} is not supported", param="Content-Encoding")
    stream = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = stream.decompress(body, 0 if max_bytes is None else max_bytes + 1)
    except zlib.error as exc:
        raise InvalidRequestError(f"the body is not valid {encoding} data: {exc}", param="Content-Encoding") from None
    if max_bytes is not None and len(out) > max_bytes:
        raise RequestTooLargeError(
            f"the decompressed body has more than {max_bytes} bytes; the limit (router.max_request_bytes) is "
            f"{max_bytes}", param="router.max_request_bytes",
        )
    if not stream.eof or stream.unused_data:
        problem = "ends before its end (truncated)" if not stream.eof else "has bytes after its end"
        raise InvalidRequestError(f"the body is not valid {encoding} data: the stream {problem}",
                                  param="Content-Encoding")
    return out


def _requested_outputs(header: InferRequestHeader) -> list[tuple[str, bool]]:
    default_binary = bool(header.parameters and header.parameters.binary_data_output)
    if header.outputs is None:
        return [(name, default_binary) for name in OUTPUT_NAMES]
    requested = []
    for index, output in enumerate(header.outputs):
        if output.name not in OUTPUT_NAMES:
            raise InvalidRequestError(
                f"outputs[{index}].name: unknown output {output.name!r}; expected one of {', '.join(OUTPUT_NAMES)}",
                param=f"outputs[{index}].name",
            )
        binary = output.parameters.binary_data if output.parameters else None
        requested.append((output.name, default_binary if binary is None else binary))
    return requested


def _decode_tensor(tensor: InputTensor, raw: memoryview | None, param: str) -> np.ndarray:
    datatype, spec_shape = INPUTS[tensor.name]
    if tensor.datatype != datatype:
        raise InvalidRequestError(
            f"{param}.datatype: {tensor.name} must be {datatype}, not {tensor.datatype}", param=f"{param}.datatype"
        )
    shape = tensor.shape
    if len(shape) != len(spec_shape) or any(d < 0 or (s > 0 and d != s) for d, s in zip(shape, spec_shape)):
        raise InvalidRequestError(
            f"{param}.shape: {tensor.name} must have shape {_shape_text(spec_shape)}, not {shape}",
            param=f"{param}.shape",
        )
    if shape[0] == 0:
        raise InvalidRequestError(f"{param}.shape: the batch is empty", param=f"{param}.shape")
    count = math.prod(shape)
    if raw is not None and tensor.data is not None:
        raise InvalidRequestError(f"{param}: give `data` or binary data, not both", param=f"{param}.data")
    if raw is None:
        if tensor.data is None:
            raise InvalidRequestError(f"{param}: no `data` and no binary_data_size", param=f"{param}.data")
        values = _flatten(tensor.data)
        if len(values) != count or not all(_json_type_ok(v, datatype) for v in values):
            raise InvalidRequestError(
                f"{param}.data: expected {count} {datatype} values for shape {shape}"
                + (" (INT64: integers in [-2**63, 2**63))" if datatype == "INT64" else ""), param=f"{param}.data"
            )
        if datatype == "BYTES":
            return np.array([v.encode("utf-8") for v in values], dtype=object).reshape(shape)
        return np.array(values, dtype=_NUMPY_TYPES[datatype]).reshape(shape)
    if datatype == "BYTES":
        return np.array(_split_bytes_elements(raw, count, param), dtype=object).reshape(shape)
    dtype = _NUMPY_TYPES[datatype]
    if len(raw) != count * dtype.itemsize:
        raise InvalidRequestError(
            f"{param}: binary_data_size {len(raw)} does not hold {count} {datatype} values", param=f"{param}.parameters"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def _split_bytes_elements(raw: memoryview, count: int, param: str) -> list[bytes]:
    elements, offset = [], 0
    while offset < len(raw):
        if offset + 4 > len(raw):
            break
        (size,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        if offset + size > len(raw):
            break
        elements.append(bytes(raw[offset:offset + size]))
        offset += size
    if offset != len(raw) or len(elements) != count:
        raise InvalidRequestError(
            f"{param}: the binary BYTES data does not hold {count} length-prefixed elements",
            param=f"{param}.parameters",
        )
    return elements


def _flatten(data: Sequence[Any]) -> list[Any]:
    out: list[Any] = []
    for item in data:
        out.extend(_flatten(item) if isinstance(item, list) else [item])
    return out


def _json_type_ok(value: Any, datatype: str) -> bool:
    if datatype == "INT64":
        return isinstance(value, int) and not isinstance(value, bool) and INT64_MIN <= value <= INT64_MAX
    return isinstance(value, _JSON_TYPES[datatype])


def _datatype(array: np.ndarray) -> str:
    return {np.dtype("float32"): "FP32", np.dtype("int32"): "INT32"}[array.dtype]


def _shape_text(spec_shape: Sequence[int]) -> str:
    return "[" + ",".join("B" if i == 0 else ("S" if s < 0 else str(s)) for i, s in enumerate(spec_shape)) + "]"
