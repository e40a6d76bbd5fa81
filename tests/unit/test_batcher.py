"""The router's pull-based batcher against a fake async model (the engine is not what is tested here)."""

from __future__ import annotations

import asyncio
import contextvars
import pickle

import numpy as np
import pytest

from deployments.batcher import TokenBatcher
from deployments.errors import OverloadedError, ServiceUnavailableError


class FakeModel:
    """Scores a prompt as [len, first token]; each call waits until the test releases it."""

    def __init__(self, auto: bool = False):
        self.calls: list[list[list[int]]] = []
        self.extras: list[list | None] = []
        self.gates: list[asyncio.Event] = []
        self.auto = auto
        self.fail_next: Exception | None = None

    async def __call__(self, token_lists: list[list[int]], extras: list | None = None) -> np.ndarray:
        self.calls.append(token_lists)
        self.extras.append(extras)
        gate = asyncio.Event()
        self.gates.append(gate)
        if not self.auto:
            await gate.wait()
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error
        return np.array([[len(t), t[0]] for t in token_lists], dtype=np.float32)

    def release(self, index: int) -> None:
        self.gates[index].set()


def prompts(*lengths: int, first: int = 1) -> list[list[int]]:
    return [[first + i] * n for i, n in enumerate(lengths)]


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def queue_behind_a_held_slot(batcher: TokenBatcher) -> tuple[FakeModel, asyncio.Future]:
    """Holds the batcher's one slot with a blocked call, so the requests sent next queue; returns the blocker
    (release it with `.release(0)`) and the held request's future."""
    blocker = FakeModel()
    batcher._model_call = blocker
    held = asyncio.ensure_future(batcher.score(prompts(1, first=99)))
    await settle()
    return blocker, held


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=10))


def test_lone_request_goes_at_once():
    async def main():
        model = FakeModel(auto=True)
        batcher = TokenBatcher(model, max_tokens_per_batch=100, max_batches_in_flight=3, max_queued_tokens=1000)
        out = await batcher.score(prompts(5, 7))
        assert model.calls == [prompts(5, 7)]
        np.testing.assert_array_equal(out, [[5, 1], [7, 2]])

    run(main())


def test_batches_fill_to_the_budget_under_load_in_arrival_order():
    async def main():
        model = FakeModel()
        batcher = TokenBatcher(model, max_tokens_per_batch=100, max_batches_in_flight=1, max_queued_tokens=1000)
        first = asyncio.ensure_future(batcher.score(prompts(10)))
        await settle()
        assert len(model.calls) == 1  # the only slot is busy from now on
        later = [asyncio.ensure_future(batcher.score(prompts(30, first=10 * (i + 1)))) for i in range(5)]
        await settle()
        assert len(model.calls) == 1 and batcher.queued_tokens == 150
        model.release(0)
        await settle()
        # The slot freed: the next batch takes the head of the queue up to the 100-token budget.
        assert [len(t) for t in model.calls[1]] == [30, 30, 30]
        assert [t[0] for t in model.calls[1]] == [10, 20, 30]
        model.release(1)
        await settle()
        assert [t[0] for t in model.calls[2]] == [40, 50]
        model.release(2)
        results = await asyncio.gather(first, *later)
        assert [r.tolist() for r in results[1:]] == [[[30, 10 * (i + 1)]] for i in range(5)]

    run(main())


def test_in_flight_is_bounded_and_slots_refill():
    async def main():
        model = FakeModel()
        batcher = TokenBatcher(model, max_tokens_per_batch=10, max_batches_in_flight=3, max_queued_tokens=1000)
        tasks = [asyncio.ensure_future(batcher.score(prompts(10, first=i))) for i in range(6)]
        await settle()
        assert len(model.calls) == 3 and batcher.in_flight == 3  # one prompt each: the budget is one prompt
        model.release(1)
        await settle()
        assert len(model.calls) == 4 and batcher.in_flight == 3
        for i in range(6):
            if i < len(model.gates):
                model.release(i)
            await settle()
        results = await asyncio.gather(*tasks)
        assert [r[0, 1] for r in results] == list(range(6))

    run(main())


def test_request_over_the_budget_is_cut_in_forest_order_and_a_small_one_is_not_stuck_behind_it():
    async def main():
        model = FakeModel(auto=True)
        batcher = TokenBatcher(model, max_tokens_per_batch=20, max_batches_in_flight=1, max_queued_tokens=1000)
        blocker, held = await queue_behind_a_held_slot(batcher)
        big = asyncio.ensure_future(batcher.score(prompts(8, 8, 8, 8, 8)))
        small = asyncio.ensure_future(batcher.score(prompts(3, first=50)))
        await settle()
        batcher._model_call = model
        blocker.release(0)
        big_out, small_out, _ = await asyncio.gather(big, small, held)
        firsts = [[t[0] for t in call] for call in model.calls]
        # The small request (its fair share) rides in the next batch; the big one fills it, cut in forest order.
        assert firsts == [[50, 1, 2], [3, 4], [5]]
        np.testing.assert_array_equal(big_out[:, 1], [1, 2, 3, 4, 5])
        np.testing.assert_array_equal(small_out, [[3, 50]])

    run(main())


def test_queue_overflow_is_refused_with_retry_after():
    async def main():
        model = FakeModel()
        batcher = TokenBatcher(model, max_tokens_per_batch=100, max_batches_in_flight=1, max_queued_tokens=100)
        running = asyncio.ensure_future(batcher.score(prompts(50)))
        await settle()
        queued = asyncio.ensure_future(batcher.score(prompts(60)))
        await settle()
        with pytest.raises(OverloadedError) as info:
            await batcher.score(prompts(41))
        error = info.value
        assert isinstance(error, ServiceUnavailableError) and error.status_code == 503
        assert error.retry_after_s >= 1
        assert "60 tokens are waiting" in error.message and "the limit is 100" in error.message
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is OverloadedError and copy.retry_after_s == error.retry_after_s
        model.release(0)
        await settle()
        model.release(1)
        await asyncio.gather(running, queued)

    run(main())


def test_request_larger_than_the_queue_bound_is_served_when_the_queue_is_empty():
    async def main():
        model = FakeModel(auto=True)
        batcher = TokenBatcher(model, max_tokens_per_batch=100, max_batches_in_flight=2, max_queued_tokens=100)
        out = await batcher.score(prompts(90, 90, 90))
        assert out.shape == (3, 2) and len(model.calls) == 3

    run(main())


def test_failed_batch_fails_its_requests_and_drops_their_queued_prompts():
    async def main():
        model = FakeModel()
        batcher = TokenBatcher(model, max_tokens_per_batch=10, max_batches_in_flight=1, max_queued_tokens=1000)
        doomed = asyncio.ensure_future(batcher.score(prompts(10, 10)))
        await settle()
        other = asyncio.ensure_future(batcher.score(prompts(5, first=7)))
        await settle()
        model.fail_next = ServiceUnavailableError("worker died")
        model.release(0)
        with pytest.raises(ServiceUnavailableError):
            await doomed
        await settle()
        assert [t[0] for t in model.calls[1]] == [7]  # doomed's second prompt was not computed
        model.release(1)
        np.testing.assert_array_equal(await other, [[5, 7]])
        assert batcher.queued_tokens == 0 and batcher.in_flight == 0

    run(main())


def test_cancelled_caller_leaves_the_queue():
    async def main():
        model = FakeModel()
        batcher = TokenBatcher(model, max_tokens_per_batch=10, max_batches_in_flight=1, max_queued_tokens=1000)
        running = asyncio.ensure_future(batcher.score(prompts(10)))
        await settle()
        gone = asyncio.ensure_future(batcher.score(prompts(10, 10)))
        await settle()
        assert batcher.queued_tokens == 20
        gone.cancel()
        await settle()
        assert batcher.queued_tokens == 0
        model.release(0)
        await running
        assert len(model.calls) == 1

    run(main())


def test_extras_travel_with_their_prompts_across_batches():
    """The router passes each prompt's scoring weights as its extra: a batch cut through a request, or holding
    several requests, hands the model call each prompt's own extra in the batch's order."""

    async def main():
        model = FakeModel(auto=True)
        batcher = TokenBatcher(model, max_tokens_per_batch=20, max_batches_in_flight=1, max_queued_tokens=1000)
        blocker, held = await queue_behind_a_held_slot(batcher)
        big = asyncio.ensure_future(batcher.score(prompts(8, 8, 8), extras=["a0", "a1", "a2"]))
        small = asyncio.ensure_future(batcher.score(prompts(3, first=50)))  # no extras: None each
        await settle()
        batcher._model_call = model
        blocker.release(0)
        await asyncio.gather(big, small, held)
        assert blocker.extras == [[None]]
        assert model.extras == [[None, "a0", "a1"], ["a2"]]
        with pytest.raises(ValueError, match="2 extras for 3 prompts"):
            await batcher.score(prompts(1, 1, 1), extras=["x", "y"])

    run(main())


REQUEST_CONTEXT = contextvars.ContextVar("request_context", default=None)  # stands in for Serve's


def test_a_batch_is_no_child_of_the_request_that_dispatched_it():
    """Request A (two prompts) dispatches batch 1 (A's first prompt); batch 2 (A's second prompt and C's) is
    dispatched when batch 1 returns. Neither model call may run in A's context: Serve keeps its request
    context in a contextvar and cancels the children of a request whose client left. Cancelling A then
    leaves C's score intact."""

    async def main():
        model = FakeModel()
        seen: list = []

        async def call(token_lists, extras):
            seen.append(REQUEST_CONTEXT.get())
            return await model(token_lists, extras)

        batcher = TokenBatcher(call, max_tokens_per_batch=9, max_batches_in_flight=1, max_queued_tokens=1000)

        async def as_request(name, token_lists):
            REQUEST_CONTEXT.set(name)
            return await batcher.score(token_lists)

        a = asyncio.ensure_future(as_request("A", prompts(8, 2)))
        await settle()
        c = asyncio.ensure_future(as_request("C", prompts(3, first=7)))
        await settle()
        model.release(0)
        await settle()
        assert model.calls[1] == [[2, 2], [7, 7, 7]]  # A's second prompt and C's, in one batch
        a.cancel()
        await settle()
        model.release(1)
        assert (await c).tolist() == [[3, 7]]
        assert seen == [None, None]

    run(main())
