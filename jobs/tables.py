"""Row tables in and out for the batch jobs: JSONL or Parquet, one file or a directory of shards, on any
filesystem pyarrow opens (a local path, `s3://...`, `gs://...`, `hf://...` where its filesystem is installed).

Reading streams: Parquet by record batch, JSONL line by line; every row arrives as a plain dict with the
place it came from (`file:line` for JSONL, `file:row N` for Parquet) for error reports. A JSONL line that
is not a JSON object comes through as a `BadRow` instead of stopping the job.

Writing is a directory of shards, `part-NNNNN.parquet` or `part-NNNNN.jsonl`, each written to a temporary
name and renamed when complete, so a job killed mid-write leaves only whole shards; `errors.jsonl` beside
them lists the rows of the last run that failed, with the reason. A rerun reads the id column of the shards
already there (`done_ids`) and skips those rows; its shards continue the numbering.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

FORMATS = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl"}
SHARD_PREFIX = "part-"
ERRORS_FILE = "errors.jsonl"


@dataclass(frozen=True)
class BadRow:
    """An input row that could not be read as an object; `reason` says why."""

    where: str
    reason: str


@dataclass(frozen=True)
class InputRow:
    where: str
    row: dict[str, Any]


def open_fs(path: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and in-filesystem path of a local path or a URI pyarrow knows."""
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), posixpath.abspath(path)


def file_format(path: str) -> str:
    for suffix, fmt in FORMATS.items():
        if path.endswith(suffix):
            return fmt
    raise ValueError(f"{path}: cannot tell the format; name files *.parquet or *.jsonl")


def input_files(path: str) -> tuple[pafs.FileSystem, list[str]]:
    """The data files of `path`: the file itself, or a directory's *.parquet / *.jsonl files (recursively,
    sorted by name; hidden files and `_SUCCESS`-style markers skipped). All must share one format."""
    fs, root = open_fs(path)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise ValueError(f"{path}: no such file or directory")
    if info.type == pafs.FileType.File:
        file_format(root)
        return fs, [root]
    found = [i.path for i in fs.get_file_info(pafs.FileSelector(root, recursive=True))
             if i.type == pafs.FileType.File and not posixpath.basename(i.path).startswith(("_", "."))
             and posixpath.splitext(i.path)[1] in FORMATS]
    if not found:
        raise ValueError(f"{path}: no *.parquet or *.jsonl files in the directory")
    if len({file_format(f) for f in found}) > 1:
        raise ValueError(f"{path}: mixes Parquet and JSONL files; give one format")
    return fs, sorted(found)


def count_rows(fs: pafs.FileSystem, files: list[str]) -> int | None:
    """Row count from the Parquet footers (cheap); None for JSONL (it would mean reading everything)."""
    if file_format(files[0]) != "parquet":
        return None
    return sum(pq.ParquetFile(fs.open_input_file(f)).metadata.num_rows for f in files)


def read_rows(fs: pafs.FileSystem, files: list[str], batch_rows: int = 1024) -> Iterator[InputRow | BadRow]:
    """Every row of the files in order, streamed."""
    for path in files:
        name = posixpath.basename(path)
        if file_format(path) == "parquet":
            start = 0
            for batch in pq.ParquetFile(fs.open_input_file(path)).iter_batches(batch_size=batch_rows):
                for offset, row in enumerate(batch.to_pylist()):
                    yield InputRow(f"{name}:row {start + offset + 1}", row)
                start += batch.num_rows
            continue
        with fs.open_input_stream(path) as stream:
            pending = b""
            lineno = 0
            while chunk := stream.read(1 << 20):
                lines = (pending + chunk).split(b"\n")
                pending = lines.pop()
                for raw in lines:
                    lineno += 1
                    if raw.strip():  # blank lines are skipped (as Ray Data's read_text drops them)
                        yield jsonl_row(name, lineno, raw)
            if pending.strip():
                yield jsonl_row(name, lineno + 1, pending)


def jsonl_row(name: str, lineno: int | None, raw: bytes) -> InputRow | BadRow:
    where = name if lineno is None else f"{name}:{lineno}"
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return BadRow(where, f"not a JSON line: {exc}")
    if not isinstance(obj, dict):
        return BadRow(where, "expected a JSON object")
    return InputRow(where, obj)


def json_line(row: dict[str, Any]) -> str:
    """The one serialization of an output row (both job paths write the same bytes)."""
    return json.dumps(row, ensure_ascii=False, default=str) + "\n"


def rows_table(rows: list[dict[str, Any]]) -> pa.Table:
    """Rows as an Arrow table with every key of every row as a column, in first-seen order, null where a row
    lacks it (`Table.from_pylist` takes the columns of the first row only and drops the others' extra keys)."""
    names = list(dict.fromkeys(name for row in rows for name in row))
    return pa.table({name: [row.get(name) for row in rows] for name in names})


def _shards(fs: pafs.FileSystem, root: str) -> list[str]:
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.NotFound:
        return []
    if info.type != pafs.FileType.Directory:
        raise ValueError(f"{root}: the output must be a directory (the job writes shards into it)")
    return sorted(i.path for i in fs.get_file_info(pafs.FileSelector(root))
                  if posixpath.basename(i.path).startswith(SHARD_PREFIX) and posixpath.splitext(i.path)[1] in FORMATS)


def done_ids(output: str, id_column: str) -> set[Any]:
    """Ids of the rows already in the output's shards (reads only the id column of Parquet shards)."""
    fs, root = open_fs(output)
    ids: set[Any] = set()
    for path in _shards(fs, root):
        if file_format(path) == "parquet":
            table = pq.read_table(fs.open_input_file(path), columns=[id_column])
            ids.update(table.column(id_column).to_pylist())
        else:
            with fs.open_input_stream(path) as stream:
                ids.update(json.loads(line)[id_column] for line in stream.read().decode("utf-8").splitlines())
    return ids


class ShardWriter:
    """Output rows into whole shards of `rows_per_shard` rows, numbered after the shards already there;
    failed rows into errors.jsonl (rewritten per run: a rerun tries them again)."""

    def __init__(self, output: str, fmt: str, rows_per_shard: int = 10_000):
        if fmt not in ("parquet", "jsonl"):
            raise ValueError(f"output format must be parquet or jsonl, not {fmt!r}")
        self.fs, self.root = open_fs(output)
        self.fmt = fmt
        self.rows_per_shard = rows_per_shard
        existing = _shards(self.fs, self.root)
        self.fs.create_dir(self.root, recursive=True)
        self.next_shard = 1 + max((int(posixpath.basename(p)[len(SHARD_PREFIX):].split(".")[0]) for p in existing),
                                  default=-1)
        self.pending: list[dict[str, Any]] = []
        self.written = 0
        self.errors = 0
        self._errors = self.fs.open_output_stream(posixpath.join(self.root, ERRORS_FILE))

    def write(self, row: dict[str, Any]) -> None:
        self.pending.append(row)
        if len(self.pending) >= self.rows_per_shard:
            self.flush()

    def error(self, where: str, row_id: Any, reason: str) -> None:
        self._errors.write(json_line({"where": where, "id": row_id, "error": reason}).encode("utf-8"))
        self._errors.flush()
        self.errors += 1

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"{SHARD_PREFIX}{self.next_shard:05d}.{self.fmt}"
        final = posixpath.join(self.root, name)
        tmp = posixpath.join(self.root, f".{name}.tmp")
        if self.fmt == "parquet":
            with self.fs.open_output_stream(tmp) as f:
                pq.write_table(rows_table(self.pending), f)
        else:
            with self.fs.open_output_stream(tmp) as f:
                f.write("".join(json_line(r) for r in self.pending).encode("utf-8"))
        self.fs.move(tmp, final)
        self.written += len(self.pending)
        self.next_shard += 1
        self.pending = []

    def close(self) -> None:
        self.flush()
        self._errors.close()


def read_output(output: str) -> list[dict[str, Any]]:
    """Every row of an output directory's shards, in shard order (for tests and the benchmark)."""
    fs, root = open_fs(output)
    return [r.row for r in read_rows(fs, _shards(fs, root)) if isinstance(r, InputRow)]
