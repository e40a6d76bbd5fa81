"""Where `python -m jobs annotate` writes, chosen by the output path (the rules are in `jobs/annotate.py`'s
docstring): a local `*.jsonl` file (or `*.json`, or any existing local file: resumed by matching its lines
against the input), a `*.parquet` file (written whole at the end; an existing one is refused), or a
directory of shards as `score` writes them (`tables.ShardWriter`: resumed by the id column, failures in
errors.jsonl).

Each output says which input records are still to do (`start`), takes the labelled rows (`write`) and the
records that failed (`failed`), and finishes (`close`).
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from jobs.pipeline import Record, count_records, read_records
from jobs.tables import ShardWriter, done_ids, open_fs, rows_table

FILE_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}


class Progress(Protocol):
    """The counters of AnnotateSummary that the outputs set."""

    lines: int
    already_done: int
    skipped_earlier: int


class AnnotateOutput(Protocol):
    def start(self, input_path: str, summary: Progress) -> tuple[Iterator[Record], int | None, list[str]]:
        """The input records still to do, how many there are (None: unknown) and messages for the log."""

    def write(self, obj: dict[str, Any]) -> None: ...

    def failed(self, where: str, obj: Any, reason: str) -> None: ...

    def close(self, complete: bool) -> None:
        """`complete`: every input record was taken (False when the job stops early)."""


def open_output(path: str, output_format: str | None, *, id_column: str, rows_per_shard: int) -> AnnotateOutput:
    """The output the path names: `*.jsonl` (or `*.json`, or an existing local file of any name, as before
    Parquet) a JSONL file, `*.parquet` a Parquet file, anything else a directory of shards."""
    kind = output_kind(path)
    if kind != "directory":
        if output_format is not None and output_format != kind:
            raise ValueError(f"--output {path} is a {kind} file; --output-format {output_format} is for a "
                             "directory output (give a path without a .jsonl / .parquet suffix)")
        if kind == "jsonl":
            if "://" in path:
                raise ValueError(f"--output {path}: a .jsonl output file must be local (it is appended to and "
                                 "resumed); for a URI give a directory (shards), e.g. --output-format jsonl")
            return JsonlFileOutput(Path(path))
        return ParquetFileOutput(path, rows_per_shard)
    return ShardOutput(path, output_format or "parquet", id_column, rows_per_shard)


def output_kind(path: str) -> str:
    """`jsonl` or `parquet` (one file), or `directory` (shards), by `open_output`'s rule."""
    suffix = posixpath.splitext(path.rstrip("/"))[1]
    if suffix in FILE_FORMATS:
        return FILE_FORMATS[suffix]
    return "jsonl" if "://" not in path and Path(path).is_file() else "directory"


def unfinished(records: Iterable[Record], done: set[Any], id_column: str,
               skipped: Callable[[], None] = lambda: None) -> Iterator[Record]:
    """The records whose id is not in `done` (`skipped` is called for each other one); a row without the id
    column becomes a failed record."""
    for record in records:
        if isinstance(record.obj, dict):
            if id_column not in record.obj:
                record = Record(record.where, problem=f"no id column {id_column!r} (name one with --id-column)")
            elif _is_done(record.obj[id_column], done):
                skipped()
                continue
        yield record


def line_key(obj: Any) -> str:
    """What identifies a line across input and output: everything but the label texts."""
    if isinstance(obj, dict) and isinstance(obj.get("conversations"), list):
        turns = [{**t, "label": t.get("label") is not None} if isinstance(t, dict) else t for t in obj["conversations"]]
        obj = {**obj, "conversations": turns}
    return json.dumps(obj, sort_keys=True, default=str)


def read_done_keys(output: Path) -> tuple[list[str], bool]:
    """Keys of the output's complete lines; drops a partial last line (returns True when it did)."""
    if not output.exists():
        return [], False
    data = output.read_bytes()
    cut = data.rfind(b"\n") + 1
    if cut < len(data):
        with output.open("r+b") as f:
            f.truncate(cut)
    return [line_key(json.loads(line)) for line in data[:cut].decode("utf-8").splitlines()], cut < len(data)


def resume_point(records: Iterator[Record], done_keys: list[str]) -> tuple[int, int]:
    """(input record count, number of the record after which to resume); raises ValueError when the
    output's lines are not the input's in order."""
    matched, resume_after, count = 0, 0, 0
    for count, record in enumerate(records, start=1):
        if matched < len(done_keys) and record.problem is None and line_key(record.obj) == done_keys[matched]:
            matched += 1
            resume_after = count
    if matched < len(done_keys):
        raise ValueError(
            f"output line {matched + 1} does not come from the input in order; the output was written from "
            "another input or edited: move it away to start over"
        )
    return count, resume_after


class JsonlFileOutput:
    """One local JSONL file, appended to: a rerun drops a partial last line, matches the output's lines in
    order against the input's and resumes after the last match."""

    def __init__(self, path: Path):
        self.path = path
        self.file = None

    def start(self, input_path: str, summary: Progress) -> tuple[Iterator[Record], int | None, list[str]]:
        done_keys, dropped_partial = read_done_keys(self.path)
        summary.lines, resume_after = resume_point(read_records(input_path), done_keys)
        summary.already_done = len(done_keys)
        summary.skipped_earlier = resume_after - len(done_keys)  # malformed or rejected lines before the resume point
        messages = []
        if dropped_partial:
            messages.append(f"{self.path}: dropped a partial last line left by an interrupted run")
        if resume_after:
            messages.append(f"resuming after input line {resume_after} ({len(done_keys)} lines already in {self.path})")
        self.file = self.path.open("a", encoding="utf-8")
        todo = (r for n, r in enumerate(read_records(input_path), start=1) if n > resume_after)
        return todo, summary.lines - resume_after, messages

    def write(self, obj: dict[str, Any]) -> None:
        self.file.write(json.dumps(obj, default=str) + "\n")
        self.file.flush()

    def failed(self, where: str, obj: Any, reason: str) -> None:
        pass  # reported on stderr only, as before

    def close(self, complete: bool) -> None:
        if self.file is not None:
            self.file.close()


class ParquetFileOutput:
    """One Parquet file, written (to a temporary name, then renamed) when the job has taken every input row;
    the rows wait in memory as Arrow tables until then. It is not resumed: an existing file is refused."""

    def __init__(self, path: str, rows_per_chunk: int):
        self.fs, self.target = open_fs(path)
        if self.fs.get_file_info(self.target).type != pafs.FileType.NotFound:
            raise ValueError(f"--output {path} exists: a .parquet output file is written whole when the job ends "
                             "and is not resumed; move it away, or give a directory (shards, resumed by --id-column)")
        self.rows_per_chunk = rows_per_chunk
        self.pending: list[dict[str, Any]] = []
        self.chunks: list[pa.Table] = []

    def start(self, input_path: str, summary: Progress) -> tuple[Iterator[Record], int | None, list[str]]:
        return read_records(input_path), count_records(input_path), []

    def write(self, obj: dict[str, Any]) -> None:
        self.pending.append(obj)
        if len(self.pending) >= self.rows_per_chunk:
            self.chunks.append(rows_table(self.pending))
            self.pending = []

    def failed(self, where: str, obj: Any, reason: str) -> None:
        pass

    def close(self, complete: bool) -> None:
        if not complete:
            return
        if self.pending:
            self.chunks.append(rows_table(self.pending))
        try:
            table = pa.concat_tables(self.chunks, promote_options="permissive") if self.chunks else pa.table({})
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise ValueError(f"the labelled rows do not fit one Parquet schema ({exc}); give a directory output "
                             "(each shard has its own schema) or make the input's column types consistent") from None
        self.fs.create_dir(posixpath.dirname(self.target), recursive=True)
        tmp = posixpath.join(posixpath.dirname(self.target), f".{posixpath.basename(self.target)}.tmp")
        with self.fs.open_output_stream(tmp) as f:
            pq.write_table(table, f)
        self.fs.move(tmp, self.target)


class ShardOutput:
    """A directory of shards, as `score` writes it: rows whose id is already in a shard are skipped, a row
    without the id column fails, failures go to errors.jsonl (rewritten per run)."""

    def __init__(self, path: str, fmt: str, id_column: str, rows_per_shard: int):
        self.path, self.fmt, self.id_column, self.rows_per_shard = path, fmt, id_column, rows_per_shard
        self.writer: ShardWriter | None = None

    def start(self, input_path: str, summary: Progress) -> tuple[Iterator[Record], int | None, list[str]]:
        done = done_ids(self.path, self.id_column)
        total = count_records(input_path)
        self.writer = ShardWriter(self.path, self.fmt, self.rows_per_shard)
        messages = [f"{len(done)} rows already in {self.path}; skipping their ids"] if done else []

        def skipped() -> None:
            summary.already_done += 1

        todo = unfinished(read_records(input_path), done, self.id_column, skipped)
        return todo, None if total is None else total - len(done), messages

    def write(self, obj: dict[str, Any]) -> None:
        self.writer.write(obj)

    def failed(self, where: str, obj: Any, reason: str) -> None:
        row_id = obj.get(self.id_column) if isinstance(obj, dict) else None
        self.writer.error(where, row_id, reason)

    def close(self, complete: bool) -> None:
        if self.writer is not None:
            self.writer.close()


def _is_done(row_id: Any, done: set[Any]) -> bool:
    try:
        return row_id in done
    except TypeError:  # an unhashable id (a list, a struct) cannot have been written as done
        return False
