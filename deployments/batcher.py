"""Pull-based batching of one router replica on computed tokens, with deadlines and per-request timings (no
torch, no Ray: unit-testable with any async model function).

Requests wait as jobs of `deployments.scheduler` (deficit round robin on the tokens the engine computes after
prefix sharing). A batch is formed whenever fewer than `max_batches_in_flight` batches are in flight; it holds
up to `max_tokens_per_batch` computed tokens (always at least one prompt). So:

* a lone request on an idle model goes out at once; nothing waits for a batch to fill;
* under load every slot is busy, the queue grows, and the batch formed when a slot frees fills to the
  budget (continuous batching: the model is pulled from, never pushed to);
* a best-of-N or per-turn request, or requests sharing a prefix, ride in one batch when their unique tokens
  fit; a request larger than the budget is cut along its forest; small requests are not stuck behind big
  ones (the scheduler's fair shares);
* the queue is bounded by `max_queued_tokens` (computed tokens): a request that would go past it is refused
  at once with `OverloadedError` (503 + Retry-After). A request arriving at an empty queue is always
  accepted, so a request larger than the bound is still served when the router is otherwise idle;
* a request with a deadline whose estimated wait (`estimated_wait_s`) is past it is refused at once (503);
  one still waiting at its deadline gets `DeadlineExceededError` (504) then, and its queued prompts are
  dropped: no batch formed after the deadline computes them.

A batch's model call runs in a context of its own, not the one of the request whose arrival dispatched it,
so a client that leaves cancels its own wait (and its prompts still queued), never a batch other requests
ride in.

Each prompt may carry an opaque `extra` (the router passes the prompt's scoring weights): the model call gets
the batch's token lists and their extras, in the same order. It returns the rows, or `(rows, replica)` to
name the model replica that computed them.

Retry-After and the wait estimate come from the computed tokens per second measured over recent batches.
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import time
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deployments.errors import DeadlineExceededError, OverloadedError
from deployments.scheduler import DrrScheduler, Job, Pick

ModelCall = Callable[[list[list[int]], list[Any]], Awaitable[Any]]
MAX_RETRY_AFTER_S = 60
THROUGHPUT_SMOOTHING = 0.2  # weight of the newest batch in the tokens/s and latency estimates


@dataclass
class RequestUsage:
    """What one request cost: computed tokens over the batches it rode in, the time from its arrival to its
    first batch (`queue_ms`), the wall time of its batches (`compute_ms`, overlapping batches counted once),
    each batch's computed tokens, and the model replicas that computed it."""

    computed_tokens: int = 0
    queue_ms: float | None = None
    compute_ms: float = 0.0
    batch_tokens: list[int] = field(default_factory=list)
    replicas: list[str] = field(default_factory=list)


@dataclass
class _Request:
    future: asyncio.Future
    rows: list[Any]
    missing: int
    extras: Sequence[Any]
    arrived_s: float
    deadline_s: float | None = None
    timeout_s: float | None = None
    usage: RequestUsage = field(default_factory=RequestUsage)
    spans: list[tuple[float, float]] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None


@dataclass
class BatcherStats:
    batches: int = 0
    tokens: int = 0
    computed_tokens: int = 0
    batch_sizes: list[int] = field(default_factory=list)


class TokenBatcher:
    """`await score(token_lists, extras)` -> the model call's rows for these prompts, stacked ([N, ...]);
    `await submit(job, ...)` -> `(rows, RequestUsage)`."""

    def __init__(self, model_call: ModelCall, max_tokens_per_batch: int, max_batches_in_flight: int,
                 max_queued_tokens: int, long_request_tokens_per_batch: int | None = None):
        self._model_call = model_call
        self._max_batches_in_flight = max_batches_in_flight
        self._max_queued_tokens = max_queued_tokens
        self._scheduler = DrrScheduler(max_tokens_per_batch, long_request_tokens_per_batch)
        self._queued_tokens = 0
        self._in_flight = 0
        self._tasks: set[asyncio.Task] = set()
        self._tokens_per_s: float | None = None
        self._latency_s: float | None = None
        self.stats = BatcherStats()

    @property
    def max_tokens_per_batch(self) -> int:
        return self._scheduler.budget

    @property
    def queued_tokens(self) -> int:
        """Computed tokens waiting (each request's unique tokens, as queued)."""
        return self._queued_tokens

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @property
    def max_batches_in_flight(self) -> int:
        return self._max_batches_in_flight

    def set_max_batches_in_flight(self, count: int) -> None:
        """Changes the cap (model replicas came or went); a raised cap dispatches what is queued at once."""
        self._max_batches_in_flight = max(1, count)
        self._dispatch()

    @staticmethod
    def prepare(token_lists: Sequence[Sequence[int]], tenant: Hashable = None) -> Job:
        """The job of a request's prompts (sorts them into forest order: run it off the event loop)."""
        if not token_lists:
            raise ValueError("no prompts to score")
        return Job.of(token_lists, tenant)

    async def score(self, token_lists: Sequence[list[int]], extras: Sequence[Any] | None = None, *,
                    tenant: Hashable = None, timeout_s: float | None = None) -> np.ndarray:
        rows, _ = await self.submit(self.prepare(token_lists, tenant), extras, timeout_s=timeout_s)
        return rows

    # --- estimates --------------------------------------------------------------------------------------

    def estimated_wait_s(self, tokens: int = 0) -> float:
        """Seconds until a new request of `tokens` computed tokens has its answer: its fair share of the
        queue's drain (all of it at most) at the measured rate, plus one batch's latency. 0 before any batch
        was measured."""
        if not self._tokens_per_s:
            return 0.0
        flows = len(self._scheduler)
        ahead = min(self._queued_tokens + tokens, max(tokens, 1) * (flows + 1))
        slot_wait = 0.0 if self._in_flight < self._max_batches_in_flight else self._latency_s / self._max_batches_in_flight
        return ahead / self._tokens_per_s + slot_wait + self._latency_s

    def retry_after_s(self) -> int:
        """Seconds for the queue ahead to drain at the measured rate (1 to MAX_RETRY_AFTER_S)."""
        if not self._tokens_per_s:
            return 1
        return max(1, min(MAX_RETRY_AFTER_S, math.ceil(self._queued_tokens / self._tokens_per_s)))

    # --- admission and waiting --------------------------------------------------------------------------

    async def submit(self, job: Job, extras: Sequence[Any] | None = None, *,
                     timeout_s: float | None = None) -> tuple[np.ndarray, RequestUsage]:
        """Queues a prepared job and waits for its rows; `timeout_s` is its deadline from now."""
        count = len(job.seqs)
        if extras is not None and len(extras) != count:
            raise ValueError(f"{len(extras)} extras for {count} prompts")
        tokens = job.unique_tokens
        if self._queued_tokens and self._queued_tokens + tokens > self._max_queued_tokens:
            retry_after_s = self.retry_after_s()
            raise OverloadedError(
                f"the router's queue is full: {self._queued_tokens} tokens are waiting and this request has "
                f"{tokens}; the limit is {self._max_queued_tokens}; retry after {retry_after_s} s",
                retry_after_s=retry_after_s,
            )
        if timeout_s is not None:
            wait_s = self.estimated_wait_s(tokens)
            if wait_s > timeout_s:
                retry_after_s = self.retry_after_s()
                raise OverloadedError(
                    f"the request's deadline cannot be met: timeout_s is {timeout_s:g} s and its estimated wait "
                    f"is {wait_s:.1f} s ({self._queued_tokens} tokens queued ahead, this request has {tokens}); "
                    f"retry after {retry_after_s} s", retry_after_s=retry_after_s)
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        request = _Request(loop.create_future(), [None] * count, count,
                           [None] * count if extras is None else extras, arrived_s=now, timeout_s=timeout_s)
        job.payload = request
        if timeout_s is not None:
            request.deadline_s = now + timeout_s
            request.timer = loop.call_later(timeout_s, self._expire, job)
        self._scheduler.add(job)
        job.queued_cost = tokens
        self._queued_tokens += tokens
        self._dispatch()
        try:
            rows = await asyncio.shield(request.future)
        except asyncio.CancelledError:
            self._drop(job)  # the caller left: its prompts still waiting are not computed
            raise
        finally:
            if request.timer is not None:
                request.timer.cancel()
        return rows, request.usage

    def _drop(self, job: Job) -> int:
        """Takes the job's queued prompts off the queue; returns how many there were."""
        dropped = self._scheduler.remove(job)
        self._queued_tokens -= job.queued_cost
        job.queued_cost = 0
        return dropped

    def _expire(self, job: Job) -> None:
        request: _Request = job.payload
        if request.future.done():
            return
        total = len(job.seqs)
        dropped = self._drop(job)
        waited_s = time.perf_counter() - request.arrived_s
        request.future.set_exception(DeadlineExceededError(request.timeout_s, waited_s, dropped, total))

    # --- batches ----------------------------------------------------------------------------------------

    def _expired(self, job: Job, now: float) -> bool:
        request: _Request = job.payload
        return request.deadline_s is not None and now >= request.deadline_s

    def _dispatch(self) -> None:
        """Forms batches while a slot is free; expired requests are failed first, so no batch computes them."""
        while self._in_flight < self._max_batches_in_flight and len(self._scheduler):
            now = time.perf_counter()
            for job in self._scheduler.jobs:
                if self._expired(job, now):
                    self._expire(job)
            picks = self._scheduler.form_batch()
            if not picks:
                break
            tokens = sum(p.cost for p in picks)
            for job in {id(p.job): p.job for p in picks}.values():
                left = job.remaining_cost()
                self._queued_tokens -= job.queued_cost - left
                job.queued_cost = left
            self._in_flight += 1
            # A fresh context: the batch belongs to no one request. A task copies the context of whoever
            # dispatched it, and Serve keeps the request context in a contextvar: a model call made in request
            # A's context is a child of A, and Serve cancels it when A's client leaves, failing every other
            # request of the batch with CancelledError.
            task = asyncio.get_running_loop().create_task(self._run(picks, tokens), context=contextvars.Context())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, picks: list[Pick], tokens: int) -> None:
        started_s = time.perf_counter()
        requests = {id(p.job): p.job for p in picks}
        for job in requests.values():
            request: _Request = job.payload
            if request.usage.queue_ms is None:
                request.usage.queue_ms = round((started_s - request.arrived_s) * 1e3, 3)
        try:
            output = await self._model_call([p.job.seqs[p.index].tolist() for p in picks],
                                            [p.job.payload.extras[p.index] for p in picks])
            rows, replica = output if isinstance(output, tuple) else (output, None)
            if len(rows) != len(picks):
                raise RuntimeError(f"the model returned {len(rows)} rows for a batch of {len(picks)}")
        except BaseException as exc:  # noqa: BLE001 - every waiting caller gets the batch's error
            for job in requests.values():
                if not job.payload.future.done():
                    job.payload.future.set_exception(exc)
                self._drop(job)  # its prompts still waiting would be computed for nobody
            if isinstance(exc, asyncio.CancelledError):
                raise
        else:
            finished_s = time.perf_counter()
            self._observe(tokens, sum(len(p.job.seqs[p.index]) for p in picks), finished_s - started_s, len(picks))
            costs: dict[int, int] = {}
            for pick in picks:  # a job's picks are contiguous in forest order: their costs add to its unique tokens
                shared = pick.job.lcp[pick.position] if id(pick.job) in costs else 0
                costs[id(pick.job)] = costs.get(id(pick.job), 0) + len(pick.job.seqs[pick.index]) - shared
            for key, job in requests.items():
                request = job.payload
                usage = request.usage
                usage.computed_tokens += costs[key]
                usage.batch_tokens.append(tokens)
                request.spans.append((started_s, finished_s))
                usage.compute_ms = round(_union_s(request.spans) * 1e3, 3)
                if replica is not None and replica not in usage.replicas:
                    usage.replicas.append(replica)
            for pick, row in zip(picks, rows):
                request = pick.job.payload
                request.rows[pick.index] = row
                request.missing -= 1
                if request.missing == 0 and not request.future.done():
                    request.future.set_result(np.stack(request.rows))
        finally:
            self._in_flight -= 1
            self._dispatch()

    def _observe(self, computed: int, requested: int, seconds: float, size: int) -> None:
        self.stats.batches += 1
        self.stats.tokens += requested
        self.stats.computed_tokens += computed
        self.stats.batch_sizes.append(size)
        del self.stats.batch_sizes[:-1000]
        # With k batches in flight each batch's wall time covers ~k batches of work.
        rate = computed * max(1, self._in_flight) / max(seconds, 1e-6)
        self._tokens_per_s = rate if self._tokens_per_s is None else (
            (1 - THROUGHPUT_SMOOTHING) * self._tokens_per_s + THROUGHPUT_SMOOTHING * rate)
        self._latency_s = seconds if self._latency_s is None else (
            (1 - THROUGHPUT_SMOOTHING) * self._latency_s + THROUGHPUT_SMOOTHING * seconds)


def _union_s(spans: list[tuple[float, float]]) -> float:
    total, end = 0.0, -math.inf
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total
