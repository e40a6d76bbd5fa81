"""`python -m jobs score`: per-row rewards for a table (JSONL or Parquet, a file or a directory of shards,
local or any pyarrow filesystem URI), written as a directory of shards (`jobs/tables.py`), with the column
mapping of `jobs/rows.py`.

Two paths, one output: without `--address`, this process streams the rows, keeps `--concurrency` requests
in flight over HTTP and writes the shards (`score_http`); with `--address`, the job runs on Ray Data
(`jobs/ray_data.py`): reads and scoring run as Ray tasks and actors through the Serve app's handle, and this
process only writes the shards. Both write rows in input order and serialize them the same way, so the same
input gives the same shards (byte for byte with `--round`).

Resuming: rows whose id is already in the output's shards are skipped; rows that fail (malformed, missing
a column, refused by the service) go to errors.jsonl with the reason, and the job goes on.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TextIO

from tqdm import tqdm

from jobs.client import ScoringClient
from jobs.rows import ColumnSpec, Outcome, score_rows
from jobs.tables import BadRow, InputRow, ShardWriter, count_rows, done_ids, input_files, read_rows


@dataclass
class ScoreSummary:
    rows: int = 0
    already_done: int = 0
    written: int = 0
    filtered: int = 0
    errors: int = 0
    retries: int = 0
    seconds: float = 0.0
    first_result_s: float | None = None  # from the start to the first row's outcome (reading, starting up)

    def finish(self, started: float, retries: int) -> ScoreSummary:
        """The totals once the last outcome is taken (`started`: the job's monotonic start)."""
        self.rows = self.already_done + self.written + self.filtered + self.errors
        self.retries = retries
        self.seconds = time.monotonic() - started
        return self

    def text(self) -> str:
        done = self.written + self.filtered + self.errors
        rate = done / self.seconds if self.seconds else 0.0
        steady = ""
        if self.first_result_s is not None and self.seconds > self.first_result_s and done > 1:
            steady = f" ({(done - 1) / (self.seconds - self.first_result_s):.1f} after the first row, " \
                     f"{self.first_result_s:.1f} s in)"
        return (f"score: {self.written} rows written, {self.filtered} dropped by --min-margin, {self.errors} failed "
                f"(see errors.jsonl), {self.already_done} already in the output; {rate:.1f} rows/s{steady}; "
                f"{self.retries} requests retried")


def skip_done(rows: Iterable[InputRow | BadRow], done: set[Any], id_column: str,
              summary: ScoreSummary) -> Iterator[InputRow | BadRow]:
    for item in rows:
        if done and isinstance(item, InputRow) and item.row.get(id_column) in done:
            summary.already_done += 1
            continue
        yield item


class Progress:
    """A bar over the rows to do, showing rows/s and the ETA (tqdm computes both from the total)."""

    def __init__(self, total: int | None, enabled: bool, log: TextIO):
        self.bar = tqdm(total=total, unit="row", file=log, disable=not enabled, dynamic_ncols=True, smoothing=0.05)

    def update(self, n: int, retries: int) -> None:
        self.bar.update(n)
        if retries:
            self.bar.set_postfix(retries=retries, refresh=False)

    def close(self) -> None:
        self.bar.close()


def take_outcome(outcome: Outcome, writer: ShardWriter, summary: ScoreSummary, progress: Progress,
                 retries: int) -> None:
    """One row's outcome into the writer: the row to a shard, a failure to errors.jsonl, a filtered row counted."""
    if outcome.error is not None:
        writer.error(outcome.where, outcome.row_id, outcome.error)
        summary.errors += 1
    elif outcome.row is None:
        summary.filtered += 1
    else:
        writer.write(outcome.row)
        summary.written += 1
    progress.update(1, retries)


async def score_http(input_path: str, output: str, client: ScoringClient, spec: ColumnSpec, *, output_format: str,
                     rows_per_shard: int, concurrency: int, max_conversations: int, progress: bool = True,
                     log: TextIO = sys.stderr) -> ScoreSummary:
    """The single-process path: this process reads, sends `concurrency` requests at a time and writes."""
    started = time.monotonic()
    summary = ScoreSummary()
    fs, files = input_files(input_path)
    done = done_ids(output, spec.id_column)
    total = count_rows(fs, files)
    writer = ShardWriter(output, output_format, rows_per_shard)
    bar = Progress(None if total is None else total - len(done), progress, log)
    try:
        rows = skip_done(read_rows(fs, files), done, spec.id_column, summary)
        outcomes = score_rows(rows, client, spec, concurrency=concurrency, max_conversations=max_conversations)
        async for outcome in outcomes:
            take_outcome(outcome, writer, summary, bar, getattr(client, "retries", 0))
            if summary.first_result_s is None:
                summary.first_result_s = time.monotonic() - started
    finally:
        writer.close()
        bar.close()
    return summary.finish(started, getattr(client, "retries", 0))
