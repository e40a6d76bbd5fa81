"""`python -m jobs score --address ...`: the score job on Ray Data, the service as the model stage.

    read (streaming; Parquet by row group, JSONL as text lines)  ->  HandleScorer actors (a pool of
    `--consumers`: parse, skip rows already written, build requests, `--in-flight` requests each through
    the Serve app's handle)  ->  this process writes the shards in input order (`jobs/tables.py`)

Rendering and tokenizing stay in the router: the scorer actors send messages, the handle API the service
has, and the router tokenizes on its own thread pool while batches run on the model (bench/README.md,
section "Offline scoring", has the measurement behind the choice). A row the service refuses, or a
malformed one, comes back as an error record and goes to errors.jsonl; the job goes on. Rows come back in
input order (`preserve_order`), serialized by the same function as the HTTP path's, so both paths write the
same shards. Ray Data's backpressure bounds what is in flight; the driver holds one batch at a time, so its
memory does not grow with the row count. `annotate --address` into a directory (`jobs/annotate_ray.py`) runs
on the same read and actor pool (`actor_dataset`).
"""

from __future__ import annotations

import asyncio
import json
import posixpath
import sys
import time
from typing import Any, TextIO

import pyarrow as pa

from jobs.rows import ColumnSpec, Outcome, score_rows
from jobs.score import Progress, ScoreSummary, take_outcome
from jobs.tables import BadRow, InputRow, ShardWriter, count_rows, done_ids, file_format, input_files, json_line, jsonl_row

SCORER_CPUS = 0.25  # an actor mostly waits on the handle
BLOCKS_PER_ACTOR = 4


class BoundedClient:
    """The actor's client with at most `in_flight` requests out at once, over all the batches it is working on
    (Ray Data runs an async UDF on several batches of a block concurrently and keeps their order)."""

    def __init__(self, client: Any, in_flight: int):
        self.client, self.in_flight, self._slots = client, in_flight, None

    @property
    def retries(self) -> int:
        return self.client.retries

    async def score(self, body: dict[str, Any]) -> dict[str, Any]:
        if self._slots is None:  # made on the actor's event loop
            self._slots = asyncio.Semaphore(self.in_flight)
        async with self._slots:
            return await self.client.score(body)


def batch_rows_of(batch: pa.Table, jsonl: bool) -> list[InputRow | BadRow]:
    """The rows of a batch as read (`path` names the file; JSONL: one `text` line a row)."""
    paths = batch.column("path").to_pylist()
    if jsonl:
        texts = batch.column("text").to_pylist()
        return [jsonl_row(posixpath.basename(p), None, t.encode("utf-8")) for p, t in zip(paths, texts)]
    records = batch.drop_columns(["path"]).to_pylist()
    return [InputRow(posixpath.basename(p), r) for p, r in zip(paths, records)]


def actor_dataset(fs: Any, files: list[str], actor: type, *, consumers: int, batch_rows: int,
                  constructor_kwargs: dict[str, Any]) -> Any:
    """The streaming read of `files` mapped by a pool of `consumers` `actor`s, in input order; the actor
    gets `jsonl` (how to read a batch: `batch_rows_of`) among its constructor arguments."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # shards in input order, as the HTTP path writes them
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    # Few processes before the first row (bench/README.md, "Offline scoring", has the timeline): Ray Data's V2
    # Parquet read lists the files on a pool of 32 footer-reading actors per read, whatever the file count, and
    # the default read parallelism splits a file into 2x-the-cluster's-CPUs blocks, each re-blocked by a task of
    # its own; every one of those is a worker process to start. Here: the V1 read (footers read by the driver,
    # or by tasks for many files) and one read task per file, re-blocked by one streaming task each.
    context.use_datasource_v2 = False
    jsonl = file_format(files[0]) == "jsonl"
    read = ray.data.read_text if jsonl else ray.data.read_parquet
    ds = read(files, filesystem=fs, include_paths=True, num_cpus=SCORER_CPUS, override_num_blocks=len(files))
    # Streaming re-blocking: a large file is one block as read; smaller blocks spread it over the actor pool.
    return ds.repartition(target_num_rows_per_block=batch_rows).map_batches(
        actor, batch_size=batch_rows, batch_format="pyarrow", zero_copy_batch=True,
        # Several blocks at once per actor (an async UDF: they share the actor's loop and its in-flight bound), so
        # a batch's slowest request does not leave the actor idle. No more queued on one actor than it works on:
        # Ray Data's default (2x the calls) let the actor ready first take every block of a small job.
        compute=ray.data.ActorPoolStrategy(size=consumers, max_concurrent_calls_per_actor=BLOCKS_PER_ACTOR,
                                           max_tasks_in_flight_per_actor=BLOCKS_PER_ACTOR),
        num_cpus=SCORER_CPUS, fn_constructor_kwargs={**constructor_kwargs, "jsonl": jsonl},
    )


class HandleScorer:
    """A Ray Data actor: a batch of input rows in, one record per row out (`row` JSON, or `error`)."""

    def __init__(self, app_name: str, spec: ColumnSpec, done_ref: Any, in_flight: int, max_conversations: int,
                 max_retry_s: float, jsonl: bool):
        import ray

        from jobs.client import HandleScoringClient

        handle = HandleScoringClient("auto", app_name=app_name, max_retry_s=max_retry_s)
        self.client = BoundedClient(handle, in_flight)
        self.done = ray.get(done_ref[0])
        self.spec, self.in_flight, self.max_conversations, self.jsonl = spec, in_flight, max_conversations, jsonl

    async def __call__(self, batch: pa.Table) -> pa.Table:
        id_column = self.spec.id_column
        items = [i for i in batch_rows_of(batch, self.jsonl)
                 if not (isinstance(i, InputRow) and i.row.get(id_column) in self.done)]
        retries_before = self.client.retries
        outcomes = [o async for o in score_rows(items, self.client, self.spec, concurrency=self.in_flight,
                                                max_conversations=self.max_conversations)]
        retries = [0] * len(outcomes)
        if retries:
            retries[0] = self.client.retries - retries_before
        return pa.table({
            "where": [o.where for o in outcomes],
            "id": [json.dumps(o.row_id, default=str) for o in outcomes],
            "row": [None if o.row is None else json_line(o.row) for o in outcomes],
            "error": [o.error for o in outcomes],
            "retries": retries,
        }, schema=pa.schema([("where", pa.string()), ("id", pa.string()), ("row", pa.string()),
                             ("error", pa.string()), ("retries", pa.int64())]))


def score_ray(input_path: str, output: str, spec: ColumnSpec, *, address: str, app_name: str, output_format: str,
              rows_per_shard: int, consumers: int, batch_rows: int, in_flight: int, max_conversations: int,
              max_retry_s: float, progress: bool = True, log: TextIO = sys.stderr) -> ScoreSummary:
    import ray

    started = time.monotonic()
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    fs, files = input_files(input_path)
    done = done_ids(output, spec.id_column)
    total = count_rows(fs, files)
    scored = actor_dataset(fs, files, HandleScorer, consumers=consumers, batch_rows=batch_rows,
                           constructor_kwargs=dict(app_name=app_name, spec=spec, done_ref=[ray.put(done)],
                                                   in_flight=in_flight, max_conversations=max_conversations,
                                                   max_retry_s=max_retry_s))
    summary = ScoreSummary(already_done=len(done))
    writer = ShardWriter(output, output_format, rows_per_shard)
    bar = Progress(None if total is None else total - len(done), progress, log)
    retries = 0
    try:
        for batch in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
            retries += sum(batch.column("retries").to_pylist())
            for where, row_id, row, error in zip(*(batch.column(c).to_pylist() for c in ("where", "id", "row", "error"))):
                outcome = Outcome(where, json.loads(row_id), row=None if row is None else json.loads(row), error=error)
                take_outcome(outcome, writer, summary, bar, retries)
                if summary.first_result_s is None:
                    summary.first_result_s = time.monotonic() - started
    finally:
        writer.close()
        bar.close()
    return summary.finish(started, retries)
