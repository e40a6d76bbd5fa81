"""What `/openapi.json` says beyond the route signatures: the error body under every error status each route
answers (400, 401, 404, 411, 413, 503 on the scoring routes; no 401 on the open ones; KServe's `{"error":
message}` under `/v2`; FastAPI's default 422 is never answered, so it is removed), and the
KServe v2 infer request and response bodies, which that route reads and writes itself (JSON, or the binary
tensor data extension: `Inference-Header-Content-Length` bytes of JSON header, then raw tensors)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel, Field

from deployments.kserve_api import HEADER_LENGTH, InferRequestHeader


class ErrorDetail(BaseModel):
    message: str = Field(description="What is wrong, with the numbers (e.g. `has 5120 tokens; the limit is 4096`).")
    type: str = Field(description="invalid_request_error, input_too_long, authentication_error, not_found_error, "
                                  "method_not_allowed, length_required, request_too_large, service_unavailable or internal_error.")
    param: str | None = Field(description="The field, header or limit at fault, e.g. `conversations[1]`.")
    code: int = Field(description="The HTTP status.")


class ErrorBody(BaseModel):
    error: ErrorDetail


class KServeErrorBody(BaseModel):
    error: str = Field(description="What is wrong, with the numbers (KServe v2's error shape, read by Triton clients).")


class OutputTensor(BaseModel):
    name: str = Field(description="`rewards` (FP32 [B, num_attributes]) or `exceeded` (INT32 [B, 1]).")
    datatype: str = Field(description="FP32 or INT32.")
    shape: list[int]
    data: list[float] | None = Field(default=None, description="Row-major values, unless sent as binary.")
    parameters: dict[str, int] | None = Field(default=None, description="`binary_data_size` when sent as binary.")


class InferResponseBody(BaseModel):
    model_name: str
    model_version: str
    id: str | None = Field(default=None, description="The request's id, when it gave one.")
    outputs: list[OutputTensor]


_ERRORS = {
    400: "The request breaks a rule or a limit; the message names the field and the numbers.",
    401: "The API key is missing or wrong (only when the service is configured with one).",
    404: "No such route or model.",
    411: "A body without `Content-Length` (chunked): its size must be known before it is read.",
    413: "The body (or its decompressed size) is over `router.max_request_bytes`.",
    503: "The model is unavailable or the service is starting; retry later.",
}


def error_responses(*statuses: int, kserve: bool = False) -> dict[int | str, dict[str, Any]]:
    """The `responses` of a route that answers these error statuses: the service's error body, or KServe's
    (`kserve`, the `/v2` routes)."""
    body = KServeErrorBody if kserve else ErrorBody
    return {status: {"model": body, "description": _ERRORS[status]} for status in statuses}


# Every error of the scoring routes: the body limits and the drain's 503 apply to every route, the API key
# (401) only to the scoring routes (`deployments.http_app.requires_api_key`).
ERROR_RESPONSES = error_responses(400, 401, 404, 411, 413, 503)
KSERVE_ERROR_RESPONSES = error_responses(400, 401, 404, 411, 413, 503, kserve=True)
OPEN_ERROR_RESPONSES = error_responses(400, 411, 413, 503)  # /health: no key, no model named
KSERVE_OPEN_ERROR_RESPONSES = error_responses(400, 404, 411, 413, 503, kserve=True)  # /v2 metadata of a model

_REF = "#/components/schemas/{model}"
_BINARY = {"type": "string", "format": "binary",
           "description": f"JSON header of `{HEADER_LENGTH}` bytes, then the binary tensors in input order."}
KSERVE_INFER_DOCS: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": _REF.format(model="InferRequestHeader")}},
            "application/octet-stream": {"schema": _BINARY},
        },
    },
    "responses": {
        "200": {
            "description": "The rewards and exceeded flags (binary when asked for, with the same header).",
            "content": {
                "application/json": {"schema": {"$ref": _REF.format(model="InferResponseBody")}},
                "application/octet-stream": {"schema": _BINARY},
            },
        }
    },
}


_BODY_MODELS: list[type[BaseModel]] = [InferRequestHeader, InferResponseBody]


def json_body_docs(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` of a route that reads its JSON body itself (to check limits on the raw JSON first)."""
    _BODY_MODELS.append(model)
    return {"requestBody": {"required": True,
                            "content": {"application/json": {"schema": {"$ref": _REF.format(model=model.__name__)}}}}}


def install_openapi(app: FastAPI) -> None:
    """Makes `app.openapi()` drop the 422s and carry the KServe body schemas."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            components.pop(name, None)
        for model in _BODY_MODELS:
            body = model.model_json_schema(ref_template=_REF)
            components.update(body.pop("$defs", {}))
            components[model.__name__] = body
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
