"""Scheduling on the real service (demo model, TP1 x PP1): computed-token budgets and `usage.computed_tokens`
against the engine-layout count the router's metrics keep, admission before work (503 + Retry-After), deadlines
(504 in the error shape; 503 when the queue cannot meet one), and a small request not stuck behind a big one.

One app with a small batch budget (so requests are cut and batches shared), one batch in flight and a small
request gate."""

from __future__ import annotations

import asyncio
import random
import time

import httpx
import pytest
from ray import serve

from tests.integration.conftest import deploy, service_args
from tests.integration.test_forest import WORDS, best_of_n_body, token_ids

BUDGET = 1024
MAX_ONGOING = 6


@pytest.fixture(scope="module")
def sched_app(serve_http, demo_checkpoint):
    from serve_app import build_app

    args = service_args(demo_checkpoint, router={
        "max_tokens_per_batch": BUDGET, "max_input_tokens": BUDGET, "max_batches_in_flight": 1,
        "max_conversations_per_request": 128, "max_ongoing_requests": MAX_ONGOING,
    })
    deploy(build_app(args), name="sched", route_prefix="/sched")
    yield f"{serve_http}/sched"
    serve.delete("sched")


def totals() -> dict:
    return serve.get_deployment_handle("Router", app_name="sched").routed_requests.remote().result()


def long_conversation(rng: random.Random, words: int) -> dict:
    return {"messages": [{"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(words))},
                         {"role": "assistant", "content": " ".join(rng.choice(WORDS) for _ in range(words))}]}


def test_computed_tokens_match_what_the_engine_layout_computed(sched_app, tokenizer):
    """A best-of-N over the budget (cut along its forest) and concurrent unrelated requests: each request's
    `computed_tokens` is the sum of its own unique tokens per batch; alone, the request's batches hold only it,
    so its `computed_tokens` equals the engine-layout count of those batches (`routed_requests`, counted from
    the batch token lists with `sharding.micro_batches.computed_tokens`), and the prompt is computed once per
    batch it spans, never once per budget of requested tokens."""
    rng = random.Random(7)
    body = best_of_n_body(rng, 40)
    body["prompt"] = [{"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(120))}]
    ids = token_ids(tokenizer, body)
    before = totals()
    with httpx.Client(base_url=sched_app, timeout=300) as client:
        response = client.post("/v1/score", json=body)
        assert response.status_code == 200, response.text
        usage = response.json()["usage"]
    after = totals()
    assert usage["computed_tokens"] == after["computed_tokens"] - before["computed_tokens"]
    assert usage["batch_tokens"] and sum(usage["batch_tokens"]) == usage["computed_tokens"]
    batches = after["batches"] - before["batches"]
    assert batches == len(usage["batch_tokens"]) >= 2
    prompt_tokens = len(ids[0]) - max(len(a) - len(b) for a, b in zip(ids, ids))  # bound below
    from sharding.forest import unique_tokens

    unique = unique_tokens(ids)
    assert unique < usage["computed_tokens"] <= unique + (batches - 1) * len(ids[0]), (usage, unique)
    assert usage["computed_tokens"] < 0.5 * usage["prompt_tokens"]  # the requested-token cut recomputed it each time
    assert prompt_tokens > 0

    # Concurrent requests share batches. Each is charged its own prompts' unique tokens per batch it rode in
    # (the default system prompt they all start with is computed once per batch, and charged to each).
    bodies = [{"conversations": [long_conversation(rng, rng.randint(20, 60)) for _ in range(3)]} for _ in range(5)]

    async def burst() -> list[dict]:
        async with httpx.AsyncClient(base_url=sched_app, timeout=300) as client:
            responses = await asyncio.gather(*(client.post("/v1/score", json=b) for b in bodies))
        return [r.raise_for_status().json()["usage"] for r in responses]

    before = totals()
    usages = asyncio.run(burst())
    after = totals()
    engine = after["computed_tokens"] - before["computed_tokens"]
    assert sum(u["computed_tokens"] for u in usages) >= engine
    for b, u in zip(bodies, usages):
        own = token_ids(tokenizer, b)
        assert u["computed_tokens"] >= unique_tokens(own)
        if len(u["batch_tokens"]) == 1:  # all its prompts in one batch: their tries, counted once
            assert u["computed_tokens"] == unique_tokens(own) < u["prompt_tokens"]
        assert u["computed_tokens"] <= u["prompt_tokens"]


def test_a_flood_past_the_gate_is_refused_at_once_with_retry_after(sched_app):
    """Past `router.max_ongoing_requests` a request gets 503 + Retry-After from the gate, before its body is
    read or tokenized; every request is answered or refused."""
    rng = random.Random(8)
    big = {"conversations": [long_conversation(rng, 60) for _ in range(24)]}
    tiny = {"conversations": [long_conversation(rng, 3)]}

    async def flood() -> list[tuple[int, float, httpx.Response]]:
        async with httpx.AsyncClient(base_url=sched_app, timeout=300) as client:
            async def one(body) -> tuple[int, float, httpx.Response]:
                start = time.perf_counter()
                response = await client.post("/v1/score", json=body)
                return response.status_code, time.perf_counter() - start, response

            slow = [asyncio.ensure_future(one(big)) for _ in range(MAX_ONGOING)]
            await asyncio.sleep(1.0)  # the gate is full with the slow ones
            fast = await asyncio.gather(*(one(tiny) for _ in range(30)))
            return list(fast) + list(await asyncio.gather(*slow))

    results = asyncio.run(flood())
    refused = [(s, t, r) for s, t, r in results if s == 503]
    assert refused and {s for s, _, _ in results} <= {200, 503}
    for _, seconds, response in refused:
        assert int(response.headers.get("retry-after", 0)) >= 1, (response.headers, response.text)
        assert "router.max_ongoing_requests" in response.json()["error"]["message"]
    # Refusals come straight from the gate: far quicker than the big requests ahead of them.
    assert sorted(t for _, t, _ in refused)[len(refused) // 2] < 0.5 * max(t for s, t, _ in results if s == 200)


def test_deadlines_give_504_and_unmeetable_ones_503(sched_app):
    rng = random.Random(9)
    big = {"conversations": [long_conversation(rng, 60) for _ in range(40)]}
    small = {"conversations": [long_conversation(rng, 20)]}

    async def scenario() -> tuple[list[httpx.Response], list[float]]:
        async with httpx.AsyncClient(base_url=sched_app, timeout=300) as client:
            warm = await client.post("/v1/score", json=small)  # a measured drain rate
            assert warm.status_code == 200
            hog = asyncio.ensure_future(client.post("/v1/score", json=big))
            await asyncio.sleep(0.5)
            starts, timed = [], []
            for body, kwargs in ((dict(big, timeout_s=0.3), {}),
                                 (big, {"headers": {"X-Request-Timeout": "0.3"}})):
                starts.append(time.perf_counter())
                timed.append(await client.post("/v1/score", json=body, **kwargs))
                starts[-1] = time.perf_counter() - starts[-1]
            bad = await client.post("/v1/score", json=dict(small, timeout_s=-1))
            await hog
            return [*timed, bad], starts

    (body_timeout, header_timeout, bad), seconds = asyncio.run(scenario())
    for response, took in zip((body_timeout, header_timeout), seconds):
        assert response.status_code in (503, 504), response.text
        error = response.json()["error"]
        if response.status_code == 504:
            assert error["type"] == "deadline_exceeded" and "deadline of 0.3 s" in error["message"]
        else:
            assert "deadline cannot be met" in error["message"] and int(response.headers["retry-after"]) >= 1
        assert took < 5.0
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "timeout_s"


def test_a_small_request_is_not_stuck_behind_a_big_one(sched_app):
    """With a big request queued (many batches at this budget), a small one is answered long before it."""
    rng = random.Random(10)
    big = {"conversations": [long_conversation(rng, 60) for _ in range(60)]}
    small = {"conversations": [long_conversation(rng, 10)]}

    async def scenario() -> tuple[float, float]:
        async with httpx.AsyncClient(base_url=sched_app, timeout=600) as client:
            start = time.perf_counter()
            hog = asyncio.ensure_future(client.post("/v1/score", json=big))
            await asyncio.sleep(1.0)
            assert (await client.post("/v1/score", json=small)).status_code == 200
            small_done = time.perf_counter() - start
            assert (await hog).status_code == 200
            return small_done, time.perf_counter() - start

    small_done, big_done = asyncio.run(scenario())
    assert small_done < 0.5 * big_done, (small_done, big_done)


def test_handle_takes_a_timeout(sched_app):
    from deployments.errors import InvalidRequestError

    handle = serve.get_app_handle("sched")
    got = handle.score.remote({"conversations": [long_conversation(random.Random(11), 5)]}, timeout_s=60).result()
    assert got["usage"]["computed_tokens"] == got["usage"]["prompt_tokens"]
    with pytest.raises(InvalidRequestError, match="timeout_s is 99999 s; the limit"):
        handle.score.remote({"conversations": [long_conversation(random.Random(11), 5)]}, timeout_s=99999).result()
