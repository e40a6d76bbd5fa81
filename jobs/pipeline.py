"""Many requests in flight, results in input order: the concurrency shape both batch jobs share; and\nstreaming their input lines."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")

WINDOW_PER_SLOT = 4  # finished results held back behind a slow head of line, per concurrency slot


async def ordered_map(items: Iterable[T], fn: Callable[[T], Awaitable[R]], concurrency: int) -> AsyncIterator[R]:
    """Yields `await fn(item)` for each item in input order, with up to `concurrency` calls running and at
    most `WINDOW_PER_SLOT * concurrency` started and not yet yielded. An exception from `fn` is raised
    when its item's turn comes (after every earlier result was yielded); pending calls are cancelled."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    slots = asyncio.Semaphore(concurrency)
    window: deque[asyncio.Task[R]] = deque()

    async def run(item: T) -> R:
        async with slots:
            return await fn(item)

    try:
        for item in items:
            while len(window) >= WINDOW_PER_SLOT * concurrency or (window and window[0].done()):
                yield await window.popleft()
            window.append(asyncio.create_task(run(item)))
        while window:
            yield await window.popleft()
    finally:
        for task in window:
            task.cancel()


def check_sendable(text: str, where: str, error: type[ValueError]) -> None:
    """Raises `error` when `text` cannot be sent as UTF-8 (JSON allows lone surrogates such as "\\ud800")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise error(f"{where} has text that cannot be sent as UTF-8 ({exc.reason} at character {exc.start}: "
                    f"{text[exc.start:exc.end]!a})") from None


def read_lines(path: Path) -> Iterator[str]:
    """The lines of a UTF-8 text file without their newlines, streamed. Bytes that are not UTF-8 come through
    as lone surrogates, which `check_sendable` reports for their line instead of stopping the job."""
    with path.open(encoding="utf-8", errors="surrogateescape") as f:
        for text in f:
            yield text.rstrip("\n")
