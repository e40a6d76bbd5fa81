"""Request limits and the HTTP layer without Ray: the body cap middleware on a tiny Starlette app, the
per-request limits, KServe body decoding failures, overflowing scores and the OpenAPI document."""

from __future__ import annotations

import asyncio
import gzip
import json
import zlib

import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from configs.service import ATTRIBUTE_NAMES, RouterConfig
from deployments.errors import InvalidRequestError, RequestTooLargeError
from deployments.http_body import BodyLimitMiddleware
from deployments.kserve_api import parse_infer_request
from deployments.limits import check_handle_request_size, check_score_request, check_tokens
from deployments.schemas import ScoreRequest
from deployments.scoring import WeightedScorer

LIMIT = 1000


async def echo(request: Request) -> JSONResponse:
    return JSONResponse({"received": len(await request.body())})


def run_asgi(app, chunks: list[bytes], headers: dict[str, str], disconnect_after: int | None = None) -> tuple:
    """Drives one request through the ASGI app; returns (status, body, chunks the app pulled)."""
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    if disconnect_after is not None:
        messages = messages[:disconnect_after] + [{"type": "http.disconnect"}]
    pulled, sent = [0], []

    async def receive():
        if pulled[0] < len(messages):
            pulled[0] += 1
            return messages[pulled[0] - 1]
        await asyncio.sleep(3600)

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/echo", "root_path": "", "query_string": b"",
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    asyncio.run(app(scope, receive, send))
    status = next((m["status"] for m in sent if m["type"] == "http.response.start"), None)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, (json.loads(body) if body else None), pulled[0]


@pytest.fixture
def app():
    inner = Starlette(routes=[Route("/echo", echo, methods=["POST"])])
    return BodyLimitMiddleware(inner, limit_bytes=lambda: LIMIT)


def test_body_within_the_cap_reaches_the_route_whole(app):
    status, body, _ = run_asgi(app, [b"x" * 400, b"y" * 600], {"content-length": "1000"})
    assert (status, body) == (200, {"received": 1000})


def test_declared_length_over_the_cap_is_413_without_reading(app):
    status, body, pulled = run_asgi(app, [b"x" * 10], {"content-length": "5000000"})
    assert status == 413 and pulled == 0
    assert body["error"]["message"] == ("the request body has 5000000 bytes; the limit (router.max_request_bytes) "
                                        "is 1000")
    assert body["error"]["type"] == "request_too_large" and body["error"]["param"] == "router.max_request_bytes"


def test_streamed_body_stops_at_the_cap(app):
    """A server that does not hold the client to its Content-Length: the count still stops at the cap."""
    status, body, pulled = run_asgi(app, [b"x" * 600] * 100, {"content-length": "900"})
    assert status == 413 and pulled == 2  # stopped at the chunk that crossed the cap
    assert "more than 1000 bytes (stopped reading at 1200)" in body["error"]["message"]


def test_chunked_body_without_length_is_411_without_reading(app):
    status, body, pulled = run_asgi(app, [b"x" * 10] * 3, {"transfer-encoding": "chunked"})
    assert status == 411 and pulled == 0
    assert body["error"]["type"] == "length_required" and body["error"]["param"] == "Content-Length"


def test_bad_content_length_is_400(app):
    status, body, _ = run_asgi(app, [b"x"], {"content-length": "-3"})
    assert status == 400 and body["error"]["param"] == "Content-Length"


def test_client_disconnect_mid_body_gets_no_answer_and_no_error(app, caplog):
    status, body, _ = run_asgi(app, [b"x" * 100] * 5, {"content-length": "500"}, disconnect_after=2)
    assert status == 400 and "disconnected after 200 bytes" in body["error"]["message"]  # written to no one
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


def conversation(turns: int) -> dict:
    messages = []
    for t in range(turns):
        messages += [{"role": "user", "content": f"q{t}"}, {"role": "assistant", "content": f"a{t}"}]
    return {"messages": messages}


def test_messages_per_conversation_limit_names_it():
    limits = RouterConfig(max_messages_per_conversation=10)
    check_score_request(ScoreRequest.model_validate({"conversations": [conversation(5)]}), limits)
    with pytest.raises(InvalidRequestError) as info:
        check_score_request(ScoreRequest.model_validate({"conversations": [conversation(1), conversation(6)]}),
                            limits)
    assert info.value.param == "conversations[1].messages"
    assert info.value.message == ("conversations[1].messages has 12 messages; the limit "
                                  "(router.max_messages_per_conversation) is 10")


def test_prompts_count_every_turn_with_turns_all():
    limits = RouterConfig(max_prompts_per_request=20)
    body = {"conversations": [conversation(4)] * 5}
    check_score_request(ScoreRequest.model_validate(body), limits)  # 5 prompts
    check_score_request(ScoreRequest.model_validate({**body, "turns": "all"}), limits)  # 20 prompts
    with pytest.raises(InvalidRequestError) as info:
        check_score_request(ScoreRequest.model_validate({"conversations": [conversation(4)] * 6, "turns": "all"}),
                            limits)
    assert info.value.param == "turns"
    assert info.value.message == ("the request has 24 prompts to score; the limit (router.max_prompts_per_request) "
                                  "is 20")


def test_tokens_per_request_limit():
    check_tokens(100, RouterConfig(max_tokens_per_request=100), None)
    with pytest.raises(InvalidRequestError, match=r"has 101 tokens to score; the limit \(router.max_tokens_per_request"):
        check_tokens(101, RouterConfig(max_tokens_per_request=100), None)


def test_default_limits_fit_256_conversations_of_4096_tokens():
    limits = RouterConfig()
    assert limits.max_conversations_per_request >= 256 and limits.max_prompts_per_request >= 256
    assert limits.max_tokens_per_request >= 256 * 4096
    assert limits.max_request_bytes >= 256 * 4096 * 8 + 4096  # as KServe INT64 tokens, header included


KSERVE_JSON = json.dumps({"inputs": [{"name": "tokens", "shape": [1, 3], "datatype": "INT64", "data": [1, 2, 3]},
                                     {"name": "sequence_lengths", "shape": [1, 1], "datatype": "INT64",
                                      "data": [3]}]}).encode()


def test_gzip_body_is_capped_after_decompression():
    zipped = gzip.compress(KSERVE_JSON)
    assert parse_infer_request(zipped, None, "gzip", max_bytes=len(KSERVE_JSON)).tensors["tokens"].shape == (1, 3)
    bomb = gzip.compress(b" " * 10_000_000)
    with pytest.raises(RequestTooLargeError, match="decompressed body has more than 100000 bytes"):
        parse_infer_request(bomb, None, "gzip", max_bytes=100_000)
    with pytest.raises(RequestTooLargeError):
        parse_infer_request(zlib.compress(b" " * 200_000), None, "deflate", max_bytes=100_000)


@pytest.mark.parametrize("body", [gzip.compress(KSERVE_JSON)[:-9], gzip.compress(KSERVE_JSON) + b"junk", b"nope"],
                         ids=["truncated", "trailing-bytes", "not-gzip"])
def test_broken_gzip_is_400(body):
    with pytest.raises(InvalidRequestError) as info:
        parse_infer_request(body, None, "gzip", max_bytes=10**6)
    assert info.value.status_code == 400 and info.value.param == "Content-Encoding"


@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, 10**30])
def test_int64_out_of_range_is_400(value):
    body = KSERVE_JSON.replace(b"[1, 2, 3]", f"[1, 2, {value}]".encode())
    with pytest.raises(InvalidRequestError, match=r"INT64: integers in \[-2\*\*63, 2\*\*63\)") as info:
        parse_infer_request(body, None, None)
    assert info.value.param == "inputs[0].data"


def test_overflowing_score_is_an_error_never_null():
    scorer = WeightedScorer(ATTRIBUTE_NAMES, [0.0] * 9)
    attributes = np.full((2, 9), 3.0)
    with pytest.raises(InvalidRequestError, match="the score of prompt 0 overflows to inf") as info:
        scorer.score(attributes, [1e308] * 9)
    assert info.value.param == "weights"
    with pytest.raises(ValueError, match="not finite"):
        scorer.score(np.full((1, 9), np.nan))


def test_openapi_documents_the_error_statuses_and_kserve_bodies():
    from deployments.router import app

    spec = app.openapi()
    for path in ("/v1/score", "/v1/chat/completions", "/get_reward", "/classify", "/pooling",
                 "/v2/models/{model_name}/infer"):
        responses = spec["paths"][path]["post"]["responses"]
        assert {"400", "401", "404", "413", "503"} <= set(responses) and "422" not in responses
        body = "/KServeErrorBody" if path.startswith("/v2") else "/ErrorBody"  # KServe's {"error": message}
        for status in ("400", "401", "413", "503"):
            assert responses[status]["content"]["application/json"]["schema"]["$ref"].endswith(body), (path, status)
    # The open routes answer no 401 (no API key asked); the body limits and the drain's 503 apply to every route.
    for path, body in [("/health", "/ErrorBody"), ("/v2/models/{model_name}/config", "/KServeErrorBody"),
                       ("/v2/models/{model_name}/versions/{model_version}/config", "/KServeErrorBody")]:
        responses = spec["paths"][path]["get"]["responses"]
        assert {"400", "413", "503"} <= set(responses) and not {"401", "422"} & set(responses), path
        for status in ("400", "413", "503"):
            assert responses[status]["content"]["application/json"]["schema"]["$ref"].endswith(body), (path, status)
    assert "404" in spec["paths"]["/v2/models/{model_name}/config"]["get"]["responses"]  # an unknown model
    infer = spec["paths"]["/v2/models/{model_name}/infer"]["post"]
    assert set(infer["requestBody"]["content"]) == {"application/json", "application/octet-stream"}
    schemas = spec["components"]["schemas"]
    assert {"InferRequestHeader", "InputTensor", "InferResponseBody", "ErrorBody", "KServeErrorBody"} <= set(schemas)
    assert "HTTPValidationError" not in schemas


def test_a_handle_request_is_bounded_by_its_characters_before_validation():
    """A handle call has no body to count: its text is counted against `max_request_bytes` (one character is at
    least one byte of the same request as JSON), keys and nested models included, before it is validated."""
    limits = RouterConfig(max_request_bytes=1000)

    def request(content: str) -> dict:
        return {"conversations": [{"messages": [{"role": "user", "content": "q"},
                                                {"role": "assistant", "content": content}]}]}

    keys = len("conversations") + len("messages") + 2 * (len("role") + len("content"))
    others = keys + len("user") + len("q") + len("assistant")
    fits = request("a" * (1000 - others))  # exactly 1000 characters
    check_handle_request_size(fits, limits)
    assert len(json.dumps(fits).encode()) >= 1000  # the same request as a body: at least as many bytes
    over = request("é" * (1000 - others + 1))
    with pytest.raises(RequestTooLargeError, match=r"more than 1000 characters of text; the limit "
                                                   r"\(router.max_request_bytes\) is 1000") as refused:
        check_handle_request_size(over, limits)
    assert refused.value.param == "router.max_request_bytes" and refused.value.status_code == 413
    with pytest.raises(RequestTooLargeError):
        check_handle_request_size(ScoreRequest.model_validate(over), limits)  # a validated request
    with pytest.raises(RequestTooLargeError):  # models inside a dict
        check_handle_request_size({"conversations": [ScoreRequest.model_validate(over).conversations[0]]}, limits)
