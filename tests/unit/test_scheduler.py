"""Computed-token budgets, fair shares and deadlines of the router's batcher (`deployments.scheduler`,
`deployments.batcher`) against a fake async model that records its batches (the engine is not what is tested).
`computed_tokens` is checked against an independent count: a dict trie built from the recorded batches."""

from __future__ import annotations

import asyncio
import pickle
import random

import numpy as np
import pytest

from deployments.batcher import TokenBatcher
from deployments.errors import DeadlineExceededError, OverloadedError
from deployments.scheduler import DrrScheduler, Job, unique_token_count


class RecordingModel:
    """Scores each prompt as [len, first token]; each batch takes `delay_s`; records the batches."""

    def __init__(self, delay_s: float = 0.0):
        self.delay_s = delay_s
        self.calls: list[list[list[int]]] = []

    async def __call__(self, token_lists, extras=None):
        self.calls.append(token_lists)
        await asyncio.sleep(self.delay_s)
        return np.array([[len(t), t[0]] for t in token_lists], dtype=np.float32), "replica-a"


def trie_tokens(token_lists) -> int:
    """Nodes of a dict trie of the token lists: the independent count."""
    root: dict = {}
    nodes = 0
    for tokens in token_lists:
        node = root
        for token in tokens:
            if token not in node:
                node[token] = {}
                nodes += 1
            node = node[token]
    return nodes


def text(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(10, 30000) for _ in range(n)]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=60))


def test_unique_token_count_matches_a_trie():
    rng = random.Random(0)
    prefix = text(rng, 50)
    lists = [prefix + text(rng, rng.randrange(1, 20)) for _ in range(30)] + [text(rng, 7), prefix[:10], prefix[:10]]
    assert unique_token_count(lists) == trie_tokens(lists)
    job = Job.of(lists)
    assert job.unique_tokens == trie_tokens(lists) and job.remaining_cost() == job.unique_tokens


def test_best_of_n_with_a_shared_prompt_is_one_batch_when_its_unique_tokens_fit():
    """Best-of-256 on a 3,757-token prompt: 4,781 unique tokens of 0.98M requested go out as one batch."""

    async def main():
        rng = random.Random(1)
        prompt = text(rng, 3757)
        lists = [prompt + text(rng, 4) for _ in range(256)]
        model = RecordingModel()
        batcher = TokenBatcher(model, max_tokens_per_batch=16384, max_batches_in_flight=2, max_queued_tokens=10**6)
        rows, usage = await batcher.submit(batcher.prepare(lists))
        assert len(model.calls) == 1 and rows.shape == (256, 2)
        assert usage.computed_tokens == trie_tokens(lists) == 3757 + 256 * 4
        assert usage.batch_tokens == [usage.computed_tokens] and usage.replicas == ["replica-a"]
        assert usage.queue_ms is not None and usage.compute_ms >= 0

    run(main())


def test_a_request_over_the_budget_is_cut_along_its_forest():
    """Two groups of prompts (two shared prefixes) over the budget: each batch holds contiguous runs of the
    sorted prompts, so a prefix is computed once per batch it spans; computed_tokens is what the batches
    computed for the request, counted independently per batch."""

    async def main():
        rng = random.Random(2)
        a, b = text(rng, 600), text(rng, 900)
        lists = [a + text(rng, rng.randrange(50, 200)) for _ in range(20)] + \
                [b + text(rng, rng.randrange(50, 200)) for _ in range(20)]
        rng.shuffle(lists)
        model = RecordingModel()
        batcher = TokenBatcher(model, max_tokens_per_batch=2048, max_batches_in_flight=1, max_queued_tokens=10**6)
        rows, usage = await batcher.submit(batcher.prepare(lists))
        per_batch = [trie_tokens(call) for call in model.calls]
        assert all(n <= 2048 for n in per_batch)
        assert usage.computed_tokens == sum(per_batch) and usage.batch_tokens == per_batch
        unique = trie_tokens(lists)
        # The least any cut can do: each batch past the first of a group repeats at most one prefix.
        assert len(model.calls) <= -(-unique // 2048) + 2
        assert usage.computed_tokens <= unique + (len(model.calls) - 1) * 900
        np.testing.assert_array_equal(rows[:, 0], [len(t) for t in lists])  # rows back in request order

    run(main())


def test_requests_sharing_a_prefix_ride_in_one_batch():
    """A GRPO group sent as 16 per-response requests, queued behind a busy slot with unrelated requests in
    between: the 16 go out in one batch that computes their prompt once."""

    async def main():
        rng = random.Random(3)
        prompt = text(rng, 1500)
        group = [[prompt + text(rng, rng.randrange(100, 300))] for _ in range(16)]
        others = [[text(rng, 400)] for _ in range(4)]
        model = RecordingModel(delay_s=0.01)
        batcher = TokenBatcher(model, max_tokens_per_batch=8192, max_batches_in_flight=1, max_queued_tokens=10**6)
        held = asyncio.ensure_future(batcher.score([text(rng, 10)]))
        await asyncio.sleep(0)
        sent = [asyncio.ensure_future(batcher.submit(batcher.prepare(g))) for g in group[:8]]
        sent += [asyncio.ensure_future(batcher.submit(batcher.prepare(o))) for o in others]
        sent += [asyncio.ensure_future(batcher.submit(batcher.prepare(g))) for g in group[8:]]
        results = await asyncio.gather(held, *sent)
        with_prompt = [i for i, call in enumerate(model.calls) if any(t[:1500] == prompt for t in call)]
        assert len(with_prompt) == 1, [len(c) for c in model.calls]
        batch = model.calls[with_prompt[0]]
        assert trie_tokens(batch) <= 8192
        total_computed = sum(trie_tokens(call) for call in model.calls)
        requested_unique = trie_tokens([t for g in group + others for t in g]) + 10
        assert total_computed == requested_unique
        # Each request is charged what its own prompt cost in its batch (as it would alone).
        for g, (_, usage) in zip(group[:8], results[1:9]):
            assert usage.computed_tokens == len(g[0])

    run(main())


def test_small_request_behind_a_maximal_one_is_answered_within_two_batch_times():
    """256 x 4096 tokens queued (64 batches at a 16,384 budget), then a 1,000-token request: it is answered
    within the next two batches the model computes."""

    async def main():
        rng = np.random.default_rng(4)
        big = [rng.integers(10, 30000, 4096).tolist() for _ in range(256)]
        model = RecordingModel(delay_s=0.005)
        batcher = TokenBatcher(model, max_tokens_per_batch=16384, max_batches_in_flight=2,
                               max_queued_tokens=2 * 256 * 4096)
        big_task = asyncio.ensure_future(batcher.score(big))
        while len(model.calls) < 5:
            await asyncio.sleep(0.001)
        before = len(model.calls)
        small = rng.integers(10, 30000, 1000).tolist()
        await batcher.score([small])
        carrying = [i for i, call in enumerate(model.calls) if small in call]
        # The first batch formed after it arrived carries it: it waits for one of the two batches in flight
        # to finish, then for its own batch (at most two max-size batch times). A batch formed just before it
        # arrived may start its model call just after, hence `before + 1`.
        assert len(carrying) == 1 and carrying[0] <= before + 1, (carrying, before, len(model.calls))
        assert trie_tokens(model.calls[before]) <= 16384
        big_task.cancel()

    run(main())


def test_a_long_request_adds_at_most_its_cap_to_each_batch():
    """`long_request_tokens_per_batch`: a request of 64 distinct 1,000-token prompts (over the 16,384 budget)
    goes out 4 prompts per batch under a 4,096 cap, 16 without it; a small request arriving behind it rides in
    a batch of at most the cap plus its own tokens, not a full one."""

    def batches(cap):
        rng = np.random.default_rng(5)
        scheduler = DrrScheduler(16384, cap)
        scheduler.add(Job.of([rng.integers(10, 30000, 1000) for _ in range(64)]))
        first = scheduler.form_batch()
        small = Job.of([rng.integers(10, 30000, 700)])
        scheduler.add(small)
        rest = []
        while len(scheduler):
            rest.append(scheduler.form_batch())
        return first, rest, small

    first, rest, small = batches(None)
    assert len(first) == 16 and sum(p.cost for p in first) == 16000
    assert sum(p.cost for p in next(b for b in rest if any(p.job is small for p in b))) > 15000
    first, rest, small = batches(4096)
    assert len(first) == 4 and all(sum(p.cost for p in b) <= 4096 + 700 for b in rest)
    carrying = next(b for b in rest if any(p.job is small for p in b))
    assert sum(p.cost for p in carrying) == 4000 + 700
    assert sum(len(b) for b in rest) == 64 + 1 - 4


def test_the_cap_never_cuts_inside_a_shared_prefix():
    """A long best-of-N (a 3,700-token prompt x 1,000 responses of 100 tokens, 103,700 unique tokens): a cut
    inside the shared prompt would compute it once more, so the cap does not apply there and the batches are
    the same as without it (the prompt computed once per batch, 8 batches)."""
    rng = np.random.default_rng(6)
    prompt = rng.integers(10, 30000, 3700)
    lists = [np.concatenate([prompt, rng.integers(10, 30000, 100)]) for _ in range(1000)]
    layouts = []
    for cap in (None, 4096):
        scheduler = DrrScheduler(16384, cap)
        scheduler.add(Job.of(lists))
        layouts.append([])
        while len(scheduler):
            layouts[-1].append([p.index for p in scheduler.form_batch()])
    assert layouts[0] == layouts[1] and len(layouts[1]) == 8
    computed = sum(unique_token_count([lists[i] for i in batch]) for batch in layouts[1])
    assert computed == unique_token_count(lists) + 7 * 3700


def test_drr_shares_are_per_tenant():
    """Two tenants (API keys): one with nine requests queued, one with one request as large as the nine
    together. By the time the nine are done, the lone request has had about as many computed tokens: the
    shares are per tenant, not per request."""
    rng = random.Random(5)
    scheduler = DrrScheduler(budget_tokens=4000)
    for _ in range(9):
        scheduler.add(Job.of([text(rng, 100) for _ in range(20)], tenant="many"))
    scheduler.add(Job.of([text(rng, 100) for _ in range(360)], tenant="one"))
    totals = {"many": 0, "one": 0}
    while totals["many"] < 9 * 20 * 100:
        batch = scheduler.form_batch()
        assert batch and sum(p.cost for p in batch) <= 4000
        for pick in batch:
            totals[pick.job.tenant] += pick.cost
    assert 0.8 < totals["one"] / totals["many"] < 1.25, totals


def test_queued_prompts_are_dropped_at_the_deadline_with_a_504():
    async def main():
        gate = asyncio.Event()

        async def blocked(token_lists, extras):
            await gate.wait()
            return np.zeros((len(token_lists), 2), dtype=np.float32)

        batcher = TokenBatcher(blocked, max_tokens_per_batch=100, max_batches_in_flight=1, max_queued_tokens=1000)
        held = asyncio.ensure_future(batcher.score([[1] * 50]))
        await asyncio.sleep(0)
        with pytest.raises(DeadlineExceededError) as info:
            await batcher.score([[2] * 30, [3] * 30], timeout_s=0.2)
        error = info.value
        assert error.status_code == 504 and error.param == "timeout_s"
        assert "deadline of 0.2 s" in error.message and "2 of its 2 prompts were still queued" in error.message
        assert 0.2 <= error.waited_s < 1.0
        assert batcher.queued_tokens == 0
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is DeadlineExceededError and copy.message == error.message
        gate.set()
        await held

    run(main())


def test_no_batch_computes_an_expired_request():
    """Requests whose deadline passed while the only slot was busy are failed when it frees, not computed."""

    async def main():
        model = RecordingModel(delay_s=0.15)
        batcher = TokenBatcher(model, max_tokens_per_batch=10, max_batches_in_flight=1, max_queued_tokens=1000)
        held = asyncio.ensure_future(batcher.score([[1] * 10]))
        await asyncio.sleep(0)
        doomed = [asyncio.ensure_future(batcher.score([[7 + i] * 10], timeout_s=0.05)) for i in range(5)]
        outcomes = await asyncio.gather(*doomed, return_exceptions=True)
        assert all(isinstance(o, DeadlineExceededError) for o in outcomes)
        await held
        assert [call[0][0] for call in model.calls] == [1]

    run(main())


def test_a_deadline_the_queue_cannot_meet_is_refused_at_once():
    async def main():
        model = RecordingModel(delay_s=0.05)
        batcher = TokenBatcher(model, max_tokens_per_batch=100, max_batches_in_flight=1, max_queued_tokens=10**6)
        await batcher.score([[1] * 100])  # measures the rate: ~100 tokens per 0.05 s
        backlog = [asyncio.ensure_future(batcher.score([[2 + i] * 100])) for i in range(20)]
        await asyncio.sleep(0)
        assert batcher.estimated_wait_s(100) > 0.1
        with pytest.raises(OverloadedError, match="deadline cannot be met") as info:
            await batcher.score([[9] * 100], timeout_s=0.1)
        assert info.value.status_code == 503 and info.value.retry_after_s >= 1
        for task in backlog:
            task.cancel()
        await asyncio.gather(*backlog, return_exceptions=True)

    run(main())
