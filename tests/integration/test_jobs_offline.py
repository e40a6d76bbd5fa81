"""`python -m jobs score` on Ray Data (`--address`) against the TP1 app: the same shards as the HTTP path
(byte for byte with --round), a bad row reported among 10,000 while the others are written, and a run killed
midway then rerun, which ends with every row once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from jobs.tables import ERRORS_FILE, read_output
from tests.integration.conftest import REPO
from tests.integration.test_service import LONG_TEXT, TOPICS

PAIR_ROWS = 240
MANY_ROWS = 10_000
BAD_ROW = 4_321
PAIR_ARGS = ["--prompt-column", "prompt", "--response-column", "chosen", "--response-column", "rejected"]


def pair_row(i: int) -> dict:
    topic = TOPICS[i % len(TOPICS)]
    return {"id": i, "prompt": f"Question {i}: tell me about {topic}.",
            "chosen": " ".join(f"{topic} fact {k}." for k in range(2 + i % 9)),
            "rejected": " ".join(f"{topic} idea {k}!" for k in range(1 + (i * 5) % 7)), "source": "fixture"}


def run_score(*args: str, timeout_s: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jobs", "score", *args, "--no-progress"], capture_output=True,
                          text=True, timeout=timeout_s, cwd=REPO, env={**os.environ})


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    """Two Parquet shards of pair rows (a directory of shards)."""
    root = tmp_path_factory.mktemp("offline") / "pairs"
    root.mkdir()
    rows = [pair_row(i) for i in range(PAIR_ROWS)]
    pq.write_table(pa.Table.from_pylist(rows[:100]), root / "shard-0.parquet")
    pq.write_table(pa.Table.from_pylist(rows[100:]), root / "shard-1.parquet")
    return root


def test_ray_data_writes_the_http_paths_bytes_with_round(demo_app, ray_cluster, pairs, tmp_path):
    raw = tmp_path / "raw"
    done = run_score("--input", str(pairs), "--output", str(raw), *PAIR_ARGS, "--url", demo_app)
    assert done.returncode == 0, done.stderr[-3000:]
    written = read_output(str(raw))
    assert [r["id"] for r in written] == list(range(PAIR_ROWS))
    # Byte identity needs every raw value clear of a rounding boundary by much more than the float32 noise
    # between batchings (~3e-6): attributes at k + 0.5, scores and margins at 0.005 + k / 100.
    attributes = np.array([v for r in written for c in ("chosen", "rejected") for v in r[f"{c}_attributes"].values()])
    inside = attributes[(attributes > 0) & (attributes < 4)]
    assert inside.size > 100 and np.abs(inside - np.floor(inside) - 0.5).min() > 2e-5
    scalars = np.array([r[k] for r in written for k in ("chosen_score", "rejected_score", "margin")])
    assert np.abs(scalars * 100 - np.floor(scalars * 100) - 0.5).min() > 2e-3

    outputs = {}
    for path, target in (("http", ["--url", demo_app]), ("ray", ["--address", ray_cluster.address])):
        out = tmp_path / path
        done = run_score("--input", str(pairs), "--output", str(out), *PAIR_ARGS, *target, "--round",
                         "--output-format", "jsonl", "--rows-per-shard", "64", "--batch-rows", "32")
        assert done.returncode == 0, done.stderr[-3000:]
        assert f"{PAIR_ROWS} rows written" in done.stderr, done.stderr[-3000:]
        outputs[path] = {p.name: p.read_bytes() for p in sorted(out.glob("part-*"))}
    assert list(outputs["ray"]) == [f"part-0000{i}.jsonl" for i in range(4)]
    assert outputs["ray"] == outputs["http"]


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> Path:
    """10,000 short rows in one Parquet file; row BAD_ROW's response is over the token limit."""
    path = tmp_path_factory.mktemp("offline") / "many.parquet"
    rows = [{"id": i, "prompt": f"Q{i}?", "response": f"{TOPICS[i % len(TOPICS)]} {i % 97}."} for i in range(MANY_ROWS)]
    rows[BAD_ROW]["response"] = LONG_TEXT
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=1000)
    return path


def test_ray_data_killed_midway_and_rerun_writes_every_row_once_and_reports_the_bad_one(
        demo_app, ray_cluster, many, tmp_path):
    out = tmp_path / "out"
    args = ["--input", str(many), "--output", str(out), "--prompt-column", "prompt", "--response-column", "response",
            "--address", ray_cluster.address, "--max-conversations-per-request", "32",
            "--rows-per-shard", "500", "--batch-rows", "250"]
    proc = subprocess.Popen([sys.executable, "-m", "jobs", "score", *args, "--no-progress"], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 500
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list(out.glob("part-*"))) >= MANY_ROWS // 500 // 2:  # half the shards: kill the driver
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
        assert proc.wait(timeout=30) == -signal.SIGKILL, "the job ended before it could be killed"
    finally:
        if proc.poll() is None:
            proc.kill()
    first = {r["id"] for r in read_output(str(out))}
    assert MANY_ROWS // 2 - 500 <= len(first) < MANY_ROWS - 1
    done = run_score(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{len(first)} already in the output" in done.stderr
    ids = [r["id"] for r in read_output(str(out))]
    assert len(ids) == len(set(ids)) == MANY_ROWS - 1 and BAD_ROW not in ids
    errors = [json.loads(line) for line in (out / ERRORS_FILE).read_text().splitlines()]
    assert [e["id"] for e in errors] == [BAD_ROW]
    assert "rejected by the service" in errors[0]["error"] and "the limit is" in errors[0]["error"]
