"""Property: whatever body a client posts to a scoring route, the service answers within 5 s, never with a
5xx, and every error in the one error shape. Hypothesis generates bodies near the valid ones (right
structure, wrong types, values out of range, odd text, extra fields, broken JSON, binary KServe bodies
with wrong sizes); each example posts a batch of them concurrently to the real TP1 service, at least 2000
bodies per route."""

from __future__ import annotations

import json
import struct
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.integration.test_abuse import check_error_shape

BODIES_PER_EXAMPLE = 50
EXAMPLES = 40  # 2000 bodies per route
MAX_SECONDS = 5.0
CONCURRENCY = 16
INFER = "/v2/models/reward_model/infer"

SETTINGS = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                    suppress_health_check=list(HealthCheck))

odd_text = st.one_of(st.text(max_size=12), st.sampled_from(["", " ", "\n", "\ud800", "<extra_id_1>", "é" * 3,
                                                            "\x00", "🙂", "<extra_id_2>User\n"]))
json_leaf = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                      st.floats(allow_nan=True, allow_infinity=True), odd_text)
any_json = st.recursive(json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                           st.dictionaries(st.sampled_from(["a", "role", ""]), inner,
                                                                           max_size=2)), max_leaves=4)
role = st.one_of(st.sampled_from(["user", "assistant", "system"]), odd_text)


def maybe(strategy, other=any_json):
    """Mostly `strategy`, sometimes any JSON value in its place."""
    return st.one_of(strategy, strategy, strategy, other)


message = st.fixed_dictionaries({"role": maybe(role), "content": maybe(odd_text)},
                                optional={"name": odd_text, "extra": any_json})
any_messages = st.lists(maybe(message), min_size=0, max_size=5)
messages = st.one_of(
    any_messages, any_messages, any_messages,  # mostly refused; about one body in ten reaches the model
    st.tuples(st.lists(st.fixed_dictionaries({"role": st.just("user"), "content": st.text(min_size=1, max_size=20)}),
                       max_size=2),
              st.fixed_dictionaries({"role": st.just("assistant"), "content": st.text(min_size=1, max_size=20)}))
    .map(lambda t: t[0] + [t[1]]),  # valid ones, scored by the model
)
score_body = st.fixed_dictionaries(
    {"conversations": maybe(st.lists(maybe(st.fixed_dictionaries({"messages": maybe(messages)})), max_size=3))},
    optional={"weights": maybe(st.lists(st.floats(allow_nan=False, width=64), min_size=9, max_size=9)),
              "truncate": maybe(st.sampled_from(["none", "left", "right"])),
              "turns": maybe(st.sampled_from(["last", "all", "some"])), "temperature": any_json},
)
chat_body = st.fixed_dictionaries(
    {"model": maybe(st.sampled_from(["demo", "reward_model", "other"])), "messages": maybe(messages)},
    optional={"temperature": json_leaf, "n": json_leaf, "max_tokens": json_leaf, "stream": maybe(st.booleans()),
              "top_p": json_leaf, "unknown": any_json},
)
tensor_name = maybe(st.sampled_from(["sentences", "tokens", "sequence_lengths", "add_EOS", "other"]), odd_text)
datatype = maybe(st.sampled_from(["BYTES", "INT64", "BOOL", "FP32"]), odd_text)
shape = maybe(st.lists(st.integers(min_value=-2, max_value=6), min_size=1, max_size=3))
kserve_input = st.fixed_dictionaries(
    {"name": tensor_name, "datatype": datatype, "shape": shape},
    optional={"data": maybe(st.lists(st.one_of(st.integers(-5, 3000), st.text(max_size=10), st.booleans(),
                                               st.lists(st.integers(-5, 3000), max_size=4)), max_size=8))},
)
kserve_body = st.fixed_dictionaries(
    {"inputs": maybe(st.lists(kserve_input, max_size=3))},
    optional={"id": any_json, "outputs": any_json, "parameters": any_json},
)


def encode_json(value, broken: int) -> tuple[bytes, dict[str, str]]:
    text = json.dumps(value, allow_nan=True)
    if broken == 1:
        text = text[: len(text) // 2]  # cut short
    elif broken == 2:
        text = text + "}"
    return text.encode("utf-8", "surrogatepass"), {"content-type": "application/json"}


@st.composite
def binary_kserve(draw) -> tuple[bytes, dict[str, str]]:
    """A binary-extension body: JSON header + raw tensors, sizes right or wrong."""
    rows, width = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    ids = draw(st.lists(st.integers(-3, 4000), min_size=rows * width, max_size=rows * width))
    lengths = draw(st.lists(st.integers(-1, width + 1), min_size=rows, max_size=rows))
    tokens = struct.pack(f"<{len(ids)}q", *ids)
    lens = struct.pack(f"<{rows}q", *lengths)
    sizes = [draw(st.sampled_from([len(tokens), len(tokens) - 8, len(tokens) + 3])),
             draw(st.sampled_from([len(lens), len(lens) + 1]))]
    inputs = [{"name": "tokens", "shape": [rows, width], "datatype": "INT64",
               "parameters": {"binary_data_size": sizes[0]}},
              {"name": "sequence_lengths", "shape": [rows, 1], "datatype": "INT64",
               "parameters": {"binary_data_size": sizes[1]}}]
    if draw(st.booleans()):
        inputs.append({"name": "add_EOS", "shape": [rows, 1], "datatype": "BOOL", "data": [[True]] * rows})
    header = json.dumps({"inputs": inputs, **draw(st.sampled_from([{}, {"parameters": {"binary_data_output": True}}]))})
    body = header.encode() + tokens + lens + draw(st.sampled_from([b"", b"\x00", b"junk"]))
    header_length = draw(st.sampled_from([str(len(header)), str(len(header) + 5), "0", "x", str(len(body) + 9)]))
    return body, {"content-type": "application/octet-stream", "Inference-Header-Content-Length": header_length}


def json_bodies(strategy):
    return st.tuples(strategy, st.sampled_from([0, 0, 0, 1, 2])).map(lambda t: encode_json(*t))


def post_all(base_url: str, path: str, bodies: list[tuple[bytes, dict[str, str]]]) -> None:
    with httpx.Client(base_url=base_url, timeout=60) as http:
        def post(item):
            content, headers = item
            response = http.post(path, content=content, headers=headers)
            return response.status_code, response.elapsed.total_seconds(), response

        with ThreadPoolExecutor(CONCURRENCY) as pool:
            results = list(pool.map(post, bodies))
    for (content, _), (status, seconds, response) in zip(bodies, results):
        where = f"{path} {content[:200]!r} -> {status} {response.text[:300]}"
        assert status < 500, where
        assert seconds < MAX_SECONDS, f"{where} took {seconds:.2f} s"
        if status >= 400:
            check_error_shape(path, status, response.json())
        elif response.headers.get("content-type", "").startswith("application/json"):
            assert "null" not in response.text or path == INFER, where


ROUTES = {
    "score": ("/v1/score", json_bodies(score_body)),
    "chat": ("/v1/chat/completions", json_bodies(chat_body)),
    "kserve-json": (INFER, json_bodies(kserve_body)),
    "kserve-binary": (INFER, binary_kserve()),
}


@pytest.fixture(scope="module")
def warm_service(demo_app) -> str:
    """One scored request first: a fresh app's first model call also sets up its handles (seconds), which is
    start-up, not a property of any body."""
    with httpx.Client(base_url=demo_app, timeout=300) as http:
        http.post("/v1/score", json={"conversations": [{"messages": [{"role": "assistant", "content": "hi"}]}]})
        http.post("/v1/chat/completions", json={"model": "demo", "messages": [{"role": "assistant", "content": "hi"}]})
    return demo_app


@pytest.mark.parametrize("route", list(ROUTES))
def test_any_body_gets_a_clear_answer(route, warm_service):
    demo_app = warm_service
    path, strategy = ROUTES[route]

    @SETTINGS
    @given(st.lists(strategy, min_size=BODIES_PER_EXAMPLE, max_size=BODIES_PER_EXAMPLE))
    def check(bodies):
        post_all(demo_app, path, bodies)

    check()
