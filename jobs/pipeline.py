"""Many requests in flight, results in input order: the concurrency shape the batch jobs share; and
streaming their input records (`read_records`: JSONL or Parquet, a file or a directory of shards, local or
a pyarrow filesystem URI, through `jobs/tables.py`)."""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from jobs.tables import BadRow, InputRow, count_rows, input_files, read_rows

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


@dataclass(frozen=True)
class Record:
    """One input row: `obj` as read (a JSON value, or a Parquet row as a dict), or `problem` saying why there
    is none; `where` names it in reports (`in.jsonl:12`, `part-0.parquet:row 3`)."""

    where: str
    obj: Any = None
    problem: str | None = None


def line_mode(path: str) -> bool:
    """A local file not named *.parquet is read line by line (any name, blank lines reported as malformed;
    the annotate/evaluate behaviour from before Parquet), everything else as a table (`jobs/tables.py`)."""
    return "://" not in path and not path.endswith(".parquet") and Path(path).is_file()


def read_records(path: str) -> Iterator[Record]:
    """Every row of the input in order, streamed: a local JSONL file line by line (`where` = path:line), a
    Parquet file, a directory of shards or a URI through `tables.read_rows` (`where` = shard:line or shard:row N)."""
    if line_mode(path):
        for lineno, text in enumerate(read_lines(Path(path)), start=1):
            try:
                yield Record(f"{path}:{lineno}", json.loads(text))
            except json.JSONDecodeError as exc:
                yield Record(f"{path}:{lineno}", problem=f"not valid JSON: {exc}")
        return
    fs, files = input_files(path)
    for item in read_rows(fs, files):
        yield as_record(item)


def as_record(item: InputRow | BadRow) -> Record:
    return Record(item.where, problem=item.reason) if isinstance(item, BadRow) else Record(item.where, item.row)


def count_records(path: str) -> int | None:
    """The input's row count when it is cheap to know (Parquet footers), else None."""
    return None if line_mode(path) else count_rows(*input_files(path))
