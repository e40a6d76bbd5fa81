"""`python -m jobs score` on its HTTP path against a small real HTTP server that answers `/v1/score` with
deterministic rewards (the service itself: tests/integration/test_jobs_offline.py): formats, shards, the
column mapping, best-of-N, margins, errors and resume; and the retry budget as a deadline through an outage."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from configs.service import ATTRIBUTE_NAMES
from jobs.__main__ import main
from jobs.client import DEFAULT_MAX_RETRY_S
from jobs.tables import ERRORS_FILE, read_output

WEIGHTS = [0, 0, 0, 0, 0.3, 0.74, 0.46, 0.47, -0.33]


def reward(text: str) -> dict:
    attributes = {name: (len(text) % 7) / 2 + k / 10 for k, name in enumerate(ATTRIBUTE_NAMES)}
    return {"score": sum(w * v for w, v in zip(WEIGHTS, attributes.values())), "attributes": attributes}


class FakeService(BaseHTTPRequestHandler):
    """`POST /v1/score`: rewards from each scored reply's text; 400 in the service's error shape for a reply
    containing TOO LONG; 503 until `server.outage_until`. Counts requests and 503s."""

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests += 1
        if time.monotonic() < self.server.outage_until:
            self.server.unavailable += 1
            key = json.dumps(body, sort_keys=True)
            self.server.failures_by_body[key] = self.server.failures_by_body.get(key, 0) + 1
            return self._answer(503, {"error": {"message": "restarting", "type": "service_unavailable",
                                                "param": None, "code": 503}})
        replies = body["responses"] if "responses" in body else [c["messages"][-1]["content"]
                                                                  for c in body["conversations"]]
        self.server.bodies.append(body)
        if any("TOO LONG" in r for r in replies):
            return self._answer(400, {"error": {"message": "conversations[0] has 5120 tokens; the limit is 4096",
                                                "type": "input_too_long", "param": "conversations[0]", "code": 400}})
        self._answer(200, {"results": [{"index": i, "num_tokens": 3, "truncated": False, **reward(r)}
                                       for i, r in enumerate(replies)]})

    def _answer(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def serve_fake() -> ThreadingHTTPServer:
    """A FakeService on a free port, serving in a thread; `url` is its base URL. Stop it with `stop_fake`."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeService)
    server.requests, server.unavailable, server.outage_until, server.bodies = 0, 0, 0.0, []
    server.failures_by_body = {}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    return server


def stop_fake(server: ThreadingHTTPServer) -> None:
    server.shutdown()
    server.server_close()


@pytest.fixture
def service():
    server = serve_fake()
    yield server
    stop_fake(server)


def pair_rows(n: int, start: int = 0) -> list[dict]:
    return [{"id": i, "prompt": f"question {i}", "chosen": "a" * (i % 11 + 1), "rejected": "b" * (i % 5 + 1),
             "split": "train"} for i in range(start, start + n)]


def score(service, *args: str) -> int:
    return main(["score", *args, "--url", service.url, "--no-progress"])


def test_parquet_pair_scores_margin_and_filter(service, tmp_path):
    rows = pair_rows(50)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    out = tmp_path / "out"
    assert score(service, "--input", str(tmp_path / "in.parquet"), "--output", str(out), "--prompt-column", "prompt",
                 "--response-column", "chosen", "--response-column", "rejected", "--rows-per-shard", "20") == 0
    written = read_output(str(out))
    assert sorted(p.name for p in out.glob("part-*")) == ["part-00000.parquet", "part-00001.parquet",
                                                           "part-00002.parquet"]
    assert [r["id"] for r in written] == list(range(50))
    for source, got in zip(rows, written):
        assert {k: got[k] for k in source} == source
        assert got["chosen_score"] == pytest.approx(reward(source["chosen"])["score"])
        assert got["rejected_attributes"] == pytest.approx(reward(source["rejected"])["attributes"])
        assert got["margin"] == pytest.approx(got["chosen_score"] - got["rejected_score"])
    # The same pairs filtered by margin: only the pairs the reward model separates by >= 0.5 are kept.
    kept = tmp_path / "kept"
    assert score(service, "--input", str(tmp_path / "in.parquet"), "--output", str(kept), "--prompt-column", "prompt",
                 "--response-column", "chosen", "--response-column", "rejected", "--min-margin", "0.5") == 0
    expected = [r["id"] for r in written if r["margin"] >= 0.5]
    assert 0 < len(expected) < 50 and [r["id"] for r in read_output(str(kept))] == expected


def test_jsonl_directory_of_shards_list_column_best_of_n(service, tmp_path):
    shards = tmp_path / "in"
    (shards / "sub").mkdir(parents=True)
    rows = [{"id": f"r{i}", "prompt": f"q{i}", "responses": ["x" * (i + 1), "yy", "z" * (i + 3)]} for i in range(6)]
    (shards / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    (shards / "sub" / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows[4:]) + "\n\n")
    (shards / "_SUCCESS").write_text("")
    out = tmp_path / "out"
    assert score(service, "--input", str(shards), "--output", str(out), "--prompt-column", "prompt",
                 "--response-column", "responses", "--output-format", "jsonl", "--round") == 0
    written = [json.loads(line) for line in (out / "part-00000.jsonl").read_text().splitlines()]
    assert [r["id"] for r in written] == [r["id"] for r in rows]
    best_of_n = [b for b in service.bodies if "responses" in b]
    # One request per row (requests arrive concurrently, in any order).
    assert sorted(b["prompt"][0]["content"] for b in best_of_n) == [f"q{i}" for i in range(6)]
    assert all(len(b["prompt"]) == 1 and len(b["responses"]) == 3 for b in best_of_n)
    for source, got in zip(rows, written):
        assert got["responses_score"] == [round(reward(r)["score"], 2) for r in source["responses"]]
        assert got["responses_attributes"][0] == {k: round(min(4, max(0, v))) for k, v in
                                                  reward(source["responses"][0])["attributes"].items()}


def test_messages_column_and_bad_rows_go_to_the_errors_file(service, tmp_path):
    good = [{"id": i, "chat": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a" * i}]}
            for i in range(1, 30)]
    lines = [json.dumps(r) for r in good]
    lines[9] = json.dumps({"id": 10, "chat": [{"role": "user", "content": "q"},
                                              {"role": "assistant", "content": "TOO LONG"}]})
    lines[19] = "{not json"
    lines[24] = json.dumps({"id": 25, "chat": "not a list"})
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert score(service, "--input", str(tmp_path / "in.jsonl"), "--output", str(out), "--messages-column", "chat",
                 "--max-conversations-per-request", "8") == 0
    written = read_output(str(out))
    assert [r["id"] for r in written] == [i for i in range(1, 30) if i not in (10, 20, 25)]
    assert all(r["score"] == pytest.approx(reward(r["chat"][-1]["content"])["score"]) for r in written)
    errors = [json.loads(line) for line in (out / ERRORS_FILE).read_text().splitlines()]
    assert [(e["where"], e["id"]) for e in errors] == [("in.jsonl:10", 10), ("in.jsonl:20", None), ("in.jsonl:25", 25)]
    assert "rejected by the service: conversations[0] has 5120 tokens" in errors[0]["error"]
    assert "not a JSON line" in errors[1]["error"] and "'chat' must be a non-empty list" in errors[2]["error"]


def test_rerun_skips_rows_already_written(service, tmp_path):
    pq.write_table(pa.Table.from_pylist(pair_rows(30)), tmp_path / "in.parquet")
    out = tmp_path / "out"
    args = ["--input", str(tmp_path / "in.parquet"), "--output", str(out), "--prompt-column", "prompt",
            "--response-column", "chosen", "--rows-per-shard", "10"]
    assert score(service, *args) == 0
    (out / "part-00001.parquet").unlink()  # as if killed before the second shard was complete
    (out / ".part-00003.parquet.tmp").write_bytes(b"partial")
    service.bodies.clear()
    assert score(service, *args) == 0
    scored = sorted(int(c["messages"][0]["content"].split()[1]) for b in service.bodies for c in b["conversations"])
    assert scored == list(range(10, 20))
    assert sorted(r["id"] for r in read_output(str(out))) == list(range(30))
    assert sorted(p.name for p in out.glob("part-*")) == ["part-00000.parquet", "part-00002.parquet",
                                                           "part-00003.parquet"]


def test_missing_id_column_is_an_error_per_row(service, tmp_path):
    (tmp_path / "in.jsonl").write_text(json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    out = tmp_path / "out"
    assert score(service, "--input", str(tmp_path / "in.jsonl"), "--output", str(out), "--prompt-column", "prompt",
                 "--response-column", "chosen") == 0
    assert "no id column 'id'" in (out / ERRORS_FILE).read_text() and read_output(str(out)) == []


# The retry budget is a deadline: 75 s, an outage longer than the old 12-retry budget (~70 s), and the client's
# backoff are scaled by the same factor here, so the job meets the same number of 503s in a few seconds.
OUTAGE_S = 75.0
SCALE = 0.04


def test_job_rides_out_an_outage_longer_than_70_s_scaled(service, tmp_path):
    assert DEFAULT_MAX_RETRY_S >= 600  # the default rides out a 340B replica reload (~10 minutes)
    pq.write_table(pa.Table.from_pylist(pair_rows(40)), tmp_path / "in.parquet")
    args = ["--input", str(tmp_path / "in.parquet"), "--prompt-column", "prompt", "--response-column", "chosen",
            "--retry-backoff-s", str(0.5 * SCALE), "--concurrency", "4", "--max-conversations-per-request", "4"]
    service.outage_until = time.monotonic() + OUTAGE_S * SCALE
    started = time.monotonic()
    assert score(service, *args, "--output", str(tmp_path / "out"), "--max-retry-s", str(600 * SCALE)) == 0
    assert time.monotonic() - started >= OUTAGE_S * SCALE
    assert max(service.failures_by_body.values()) > 12  # a request failed more often than the old budget allowed
    assert sorted(r["id"] for r in read_output(str(tmp_path / "out"))) == list(range(40))
    # A budget shorter than the outage: the job stops (exit 1), keeping what it wrote, and says why.
    service.outage_until = time.monotonic() + OUTAGE_S * SCALE
    started = time.monotonic()
    assert score(service, *args, "--output", str(tmp_path / "short"), "--max-retry-s", str(30 * SCALE)) == 1
    assert time.monotonic() - started < OUTAGE_S * SCALE
