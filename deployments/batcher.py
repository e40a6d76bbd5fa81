"""Pull-based token-budget batching of one router replica (no torch, no Ray: unit-testable with any async
model function).

One FIFO queue of tokenized prompts. A batch is formed whenever fewer than `max_batches_in_flight` batches
are in flight: it takes prompts from the head of the queue up to `max_tokens_per_batch` real tokens (always
at least one prompt). So:

* a lone request on an idle model goes out at once; nothing waits for a batch to fill;
* under load every slot is busy, the queue grows, and the batch formed when a slot frees fills to the
  budget (continuous batching: the model is pulled from, never pushed to);
* the prompts of one request enter the queue together, in their order, so they go out contiguously (in one
  batch, or in consecutive batches when they are over the budget), and requests go out in arrival order:
  nothing starves;
* the queue is bounded by `max_queued_tokens`: a request that would go past it is refused at once with
  `OverloadedError` (503 + Retry-After) instead of waiting without bound. A request arriving at an empty
  queue is always accepted, so a request larger than the bound (up to `max_conversations_per_request` x
  the input limit) is still served when the router is otherwise idle.

A batch's model call runs in a context of its own, not the one of the request whose arrival dispatched it,
so a client that leaves cancels its own wait (and its prompts still queued), never a batch other requests
ride in.

Each prompt may carry an opaque `extra` (the router passes the prompt's scoring weights): the model call gets
the batch's token lists and their extras, in the same order.

Retry-After is the time the queue ahead would take to drain at the throughput measured over recent batches
(at least 1 s, at most `MAX_RETRY_AFTER_S`).
"""

from __future__ import annotations

import asyncio
import contextvars
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from deployments.errors import OverloadedError

ModelCall = Callable[[list[list[int]], list[Any]], Awaitable[np.ndarray]]
MAX_RETRY_AFTER_S = 60
THROUGHPUT_SMOOTHING = 0.2  # weight of the newest batch in the tokens/s estimate


@dataclass
class _Request:
    """One caller's prompts; `rows` fills as its batches return."""

    future: asyncio.Future
    rows: list[np.ndarray | None]
    missing: int


@dataclass
class _Prompt:
    token_ids: list[int]
    request: _Request
    index: int
    extra: Any = None


@dataclass
class BatcherStats:
    batches: int = 0
    tokens: int = 0
    batch_sizes: list[int] = field(default_factory=list)


class TokenBatcher:
    """`await score(token_lists, extras)` -> the model call's rows for these prompts, stacked ([N, ...]); batches
    go to `model_call(token_lists, extras)` as described above."""

    def __init__(self, model_call: ModelCall, max_tokens_per_batch: int, max_batches_in_flight: int,
                 max_queued_tokens: int):
        self._model_call = model_call
        self._max_tokens_per_batch = max_tokens_per_batch
        self._max_batches_in_flight = max_batches_in_flight
        self._max_queued_tokens = max_queued_tokens
        self._queue: deque[_Prompt] = deque()
        self._queued_tokens = 0
        self._in_flight = 0
        self._tasks: set[asyncio.Task] = set()
        self._tokens_per_s: float | None = None
        self.stats = BatcherStats()

    @property
    def queued_tokens(self) -> int:
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

    async def score(self, token_lists: Sequence[list[int]], extras: Sequence[Any] | None = None) -> np.ndarray:
        if not token_lists:
            raise ValueError("no prompts to score")
        if extras is not None and len(extras) != len(token_lists):
            raise ValueError(f"{len(extras)} extras for {len(token_lists)} prompts")
        tokens = sum(len(ids) for ids in token_lists)
        if self._queued_tokens and self._queued_tokens + tokens > self._max_queued_tokens:
            retry_after_s = self._retry_after_s()
            raise OverloadedError(
                f"the router's queue is full: {self._queued_tokens} tokens are waiting and this request has "
                f"{tokens}; the limit is {self._max_queued_tokens}; retry after {retry_after_s} s",
                retry_after_s=retry_after_s,
            )
        request = _Request(asyncio.get_running_loop().create_future(), [None] * len(token_lists), len(token_lists))
        extras = [None] * len(token_lists) if extras is None else extras
        prompts = [_Prompt(list(ids), request, i, extra) for i, (ids, extra) in enumerate(zip(token_lists, extras))]
        self._queue.extend(prompts)
        self._queued_tokens += tokens
        self._dispatch()
        try:
            return await asyncio.shield(request.future)
        except asyncio.CancelledError:
            self._drop_queued(request)  # the caller left: its prompts still waiting are not computed
            raise

    def _drop_queued(self, request: _Request) -> None:
        kept = deque(p for p in self._queue if p.request is not request)
        self._queued_tokens -= sum(len(p.token_ids) for p in self._queue if p.request is request)
        self._queue = kept

    def _dispatch(self) -> None:
        """Forms batches from the head of the queue while a slot is free."""
        while self._queue and self._in_flight < self._max_batches_in_flight:
            batch = [self._queue.popleft()]
            tokens = len(batch[0].token_ids)
            while self._queue and tokens + len(self._queue[0].token_ids) <= self._max_tokens_per_batch:
                prompt = self._queue.popleft()
                batch.append(prompt)
                tokens += len(prompt.token_ids)
            self._queued_tokens -= tokens
            self._in_flight += 1
            # A fresh context: the batch belongs to no one request. A task copies the context of whoever
            # dispatched it, and Serve keeps the request context in a contextvar: a model call made in request
            # A's context is a child of A, and Serve cancels it when A's client leaves, failing every other
            # request of the batch with CancelledError.
            task = asyncio.get_running_loop().create_task(self._run(batch, tokens), context=contextvars.Context())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[_Prompt], tokens: int) -> None:
        started_s = time.perf_counter()
        try:
            output = await self._model_call([p.token_ids for p in batch], [p.extra for p in batch])
            if len(output) != len(batch):
                raise RuntimeError(f"the model returned {len(output)} rows for a batch of {len(batch)}")
        except BaseException as exc:  # noqa: BLE001 - every waiting caller gets the batch's error
            for request in {id(p.request): p.request for p in batch}.values():
                if not request.future.done():
                    request.future.set_exception(exc)
                self._drop_queued(request)  # its prompts still waiting would be computed for nobody
            if isinstance(exc, asyncio.CancelledError):
                raise
        else:
            self._observe(tokens, time.perf_counter() - started_s, len(batch))
            for prompt, row in zip(batch, output):
                request = prompt.request
                request.rows[prompt.index] = row
                request.missing -= 1
                if request.missing == 0 and not request.future.done():
                    request.future.set_result(np.stack(request.rows))
        finally:
            self._in_flight -= 1
            self._dispatch()

    def _observe(self, tokens: int, seconds: float, size: int) -> None:
        self.stats.batches += 1
        self.stats.tokens += tokens
        self.stats.batch_sizes.append(size)
        del self.stats.batch_sizes[:-1000]
        # With k batches in flight each batch's wall time covers ~k batches of work.
        rate = tokens * max(1, self._in_flight) / max(seconds, 1e-6)
        self._tokens_per_s = rate if self._tokens_per_s is None else (
            (1 - THROUGHPUT_SMOOTHING) * self._tokens_per_s + THROUGHPUT_SMOOTHING * rate)

    def _retry_after_s(self) -> int:
        if not self._tokens_per_s:
            return 1
        return max(1, min(MAX_RETRY_AFTER_S, math.ceil(self._queued_tokens / self._tokens_per_s)))
