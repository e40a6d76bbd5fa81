"""`python -m jobs annotate --address ... --output DIR`: the annotate job on Ray Data, as `score --address` runs
(`jobs/ray_data.py`): a streaming read (Parquet by row group, JSONL as text lines), a pool of `--consumers`
HandleLabeller actors that skip the ids already in the output, label the rows through the Serve app's handle
(`annotate.label_rows`, the in-process job's code; at most `--in-flight` requests each) and send back one
record per row, and this process writing the shards in input order with errors.jsonl (`tables.ShardWriter`).

Only a directory output runs here: a `.jsonl` or `.parquet` output file is written by one process, so with
`--address` that job calls the handle from this process (`jobs/annotate.py`). On Ray Data a JSONL row is
named by its file only (the line number is not known after the read), as in `score`.
"""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

import pyarrow as pa
from tqdm import tqdm

from jobs.annotate import AnnotateSummary, label_rows
from jobs.annotate_output import unfinished
from jobs.pipeline import as_record
from jobs.ray_data import BoundedClient, actor_dataset, batch_rows_of
from jobs.tables import ShardWriter, count_rows, done_ids, input_files, json_line

OUTCOME_SCHEMA = pa.schema([("where", pa.string()), ("id", pa.string()), ("row", pa.string()),
                            ("error", pa.string()), ("turns", pa.int64()), ("retries", pa.int64())])


class HandleLabeller:
    """A Ray Data actor: a batch of input rows in, one record per row not yet done out (`row` JSON, or `error`)."""

    def __init__(self, app_name: str, done_ref: Any, id_column: str, in_flight: int, max_retry_s: float,
                 round_labels: bool, truncate: str, max_prompts: int, jsonl: bool):
        import ray

        from jobs.client import HandleScoringClient

        handle = HandleScoringClient("auto", app_name=app_name, max_retry_s=max_retry_s)
        self.client = BoundedClient(handle, in_flight)
        self.done = ray.get(done_ref[0])
        self.id_column, self.in_flight, self.jsonl = id_column, in_flight, jsonl
        self.options = dict(round_labels=round_labels, truncate=truncate, max_prompts=max_prompts)

    async def __call__(self, batch: pa.Table) -> pa.Table:
        records = unfinished((as_record(item) for item in batch_rows_of(batch, self.jsonl)), self.done, self.id_column)
        retries_before = self.client.retries
        outcomes = [o async for group in label_rows(records, self.client, concurrency=self.in_flight, **self.options)
                    for o in group]
        retries = [0] * len(outcomes)
        if retries:
            retries[0] = self.client.retries - retries_before
        return pa.table({
            "where": [parsed.where for parsed, _ in outcomes],
            "id": [json.dumps(parsed.obj.get(self.id_column) if isinstance(parsed.obj, dict) else None, default=str)
                   for parsed, _ in outcomes],
            "row": [json_line(parsed.line.obj) if problem is None else None for parsed, problem in outcomes],
            "error": [problem for _, problem in outcomes],
            "turns": [len(parsed.line.labelled) if problem is None else 0 for parsed, problem in outcomes],
            "retries": retries,
        }, schema=OUTCOME_SCHEMA)


def annotate_ray(input_path: str, output: str, *, address: str, app_name: str, output_format: str | None,
                 id_column: str, rows_per_shard: int, consumers: int, batch_rows: int, in_flight: int,
                 max_retry_s: float, round_labels: bool, truncate: str, max_prompts: int, progress: bool = True,
                 log: TextIO = sys.stderr) -> AnnotateSummary:
    import ray

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False)
    fs, files = input_files(input_path)
    done = done_ids(output, id_column)
    total = count_rows(fs, files)
    labelled = actor_dataset(fs, files, HandleLabeller, consumers=consumers, batch_rows=batch_rows,
                             constructor_kwargs=dict(app_name=app_name, done_ref=[ray.put(done)], id_column=id_column,
                                                     in_flight=in_flight, max_retry_s=max_retry_s,
                                                     round_labels=round_labels, truncate=truncate,
                                                     max_prompts=max_prompts))
    summary = AnnotateSummary(already_done=len(done))
    writer = ShardWriter(output, output_format or "parquet", rows_per_shard)
    bar = tqdm(total=None if total is None else total - len(done), unit="line", file=log, disable=not progress,
               dynamic_ncols=True)

    def report(message: str) -> None:
        summary.problems.append(message)
        bar.write(message, file=log)

    if done:
        report(f"{len(done)} rows already in {output}; skipping their ids")
    try:
        for batch in labelled.iter_batches(batch_size=None, batch_format="pyarrow"):
            summary.retries += sum(batch.column("retries").to_pylist())
            columns = (batch.column(c).to_pylist() for c in ("where", "id", "row", "error", "turns"))
            for where, row_id, row, error, turns in zip(*columns):
                if error is None:
                    writer.write(json.loads(row))
                    summary.written += 1
                    summary.turns_scored += turns
                else:
                    kind = "malformed" if error.startswith("malformed") else "rejected"
                    setattr(summary, kind, getattr(summary, kind) + 1)
                    writer.error(where, json.loads(row_id), error)
                    report(f"{where}: {error}; skipped")
                bar.update(1)
            if summary.retries:
                bar.set_postfix(retries=summary.retries, refresh=False)
    finally:
        writer.close()
        bar.close()
    summary.lines = summary.already_done + summary.written + summary.malformed + summary.rejected
    return summary
