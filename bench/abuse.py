"""Hostile requests against the real service: the time to answer each and the router replica's peak RSS.

    python bench/abuse.py                      # -> bench/results/abuse.json (~2-3 min on 2 cores)

Starts its own Ray instance (`address="local"`, `_temp_dir=/tmp/ray_bench_abuse`, no dashboard) and Serve on
a free port of 127.0.0.1 (`--port` to choose) with configs/local.yaml's app args (the demo checkpoint, default request limits), sends each
case of `hostile_cases` once, then one ordinary request, and records per case: the status, the seconds to
the answer, the router's RSS before and its peak while the case ran (sampled every 10 ms), and the seconds
the ordinary request took right after. `tests/integration/test_abuse.py` sends the same cases to the test
service and asserts the targets (4xx within 2 s, the next request answered correctly within 1 s, RSS
growth at most 4x the largest accepted body).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RESULT = REPO / "bench" / "results" / "abuse.json"
RAY_TEMP_DIR = "/tmp/ray_bench_abuse"
MiB = 2**20
BIG_BYTES = 200 * MiB


@dataclass
class Case:
    """One hostile request. `body()` gives the bytes (built when sent, so only one big body is in memory), or
    with `chunked` an iterator of chunks sent without a length. `status`: the expected status; `param`: the
    expected error param (None: not checked)."""

    name: str
    path: str
    body: Callable[[], Any]
    status: int
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    method: str = "POST"
    disconnect_after_bytes: int | None = None  # the client goes away mid-body: no answer expected
    chunked: bool = False


def _messages(turns: int, text: str = "x") -> list[dict[str, str]]:
    return [{"role": ("user", "assistant")[t % 2], "content": text} for t in range(turns)]


def _kserve_tokens(ids_per_row: list[list[int]], binary: bool) -> tuple[bytes, dict[str, str]]:
    rows, width = len(ids_per_row), max(map(len, ids_per_row))
    if not binary:
        body = {"inputs": [
            {"name": "tokens", "shape": [rows, width], "datatype": "INT64",
             "data": [ids + [0] * (width - len(ids)) for ids in ids_per_row]},
            {"name": "sequence_lengths", "shape": [rows, 1], "datatype": "INT64", "data": [[len(i)] for i in ids_per_row]}]}
        return json.dumps(body).encode(), {"content-type": "application/json"}
    tokens = b"".join(struct.pack(f"<{width}q", *(ids + [0] * (width - len(ids)))) for ids in ids_per_row)
    lengths = struct.pack(f"<{rows}q", *map(len, ids_per_row))
    header = json.dumps({"inputs": [
        {"name": "tokens", "shape": [rows, width], "datatype": "INT64", "parameters": {"binary_data_size": len(tokens)}},
        {"name": "sequence_lengths", "shape": [rows, 1], "datatype": "INT64",
         "parameters": {"binary_data_size": len(lengths)}}]}).encode()
    return header + tokens + lengths, {"content-type": "application/octet-stream",
                                       "Inference-Header-Content-Length": str(len(header))}


def _chunks(total: int, chunk: int = MiB) -> Iterator[bytes]:
    block = b" " * chunk
    for _ in range(total // chunk):
        yield block


def hostile_cases(turn_marker_id: int, max_conversations: int) -> list[Case]:
    """The issue's reproducers. `turn_marker_id`: the id of `<extra_id_1>`; `max_conversations`: the
    service's `router.max_conversations_per_request` (the prompt-cap case stays within it)."""
    json_h = {"content-type": "application/json"}
    bin_h = {"content-type": "application/octet-stream"}
    infer = "/v2/models/reward_model/infer"
    ok_conversation = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}

    def tokens_32k() -> bytes:
        return _kserve_tokens([[turn_marker_id] * 32_000], binary=False)[0]

    def tokens_1m() -> bytes:
        return _kserve_tokens([[turn_marker_id] * 1_000_000], binary=True)[0]

    conversations = max(2, min(max_conversations, 32))
    return [
        Case("truncate-left-turns-all-100k-messages", "/v1/score",
             lambda: json.dumps({"conversations": [{"messages": _messages(100_000)}], "truncate": "left",
                                 "turns": "all"}).encode(), 400, "conversations[0].messages", json_h),
        Case("turns-all-prompt-flood", "/v1/score",
             lambda: json.dumps({"conversations": [{"messages": _messages(128, "hi")}] * conversations,
                                 "turns": "all"}).encode(), 400, "turns", json_h),
        Case("kserve-32k-turn-markers-json", infer, tokens_32k, 200, None, json_h),
        Case("kserve-1m-turn-markers-binary", infer, tokens_1m, 200, None,
             {**bin_h, "Inference-Header-Content-Length": str(_binary_header_length(1, 1_000_000))}),
        Case("score-200mb-body", "/v1/score",
             lambda: b'{"conversations": [{"messages": [{"role": "user", "content": "' + b"x" * BIG_BYTES + b'"}]}]}',
             413, "router.max_request_bytes", json_h),
        Case("score-200mb-chunked", "/v1/score", lambda: _chunks(BIG_BYTES), 411, "Content-Length",
             json_h, chunked=True),
        Case("kserve-200mb-body", infer, lambda: b"{" + b" " * BIG_BYTES + b"}", 413, "router.max_request_bytes",
             json_h),
        Case("kserve-gzip-bomb", infer, lambda: gzip.compress(b" " * BIG_BYTES, 6), 413, "router.max_request_bytes",
             {**json_h, "content-encoding": "gzip"}),
        Case("kserve-int64-overflow", infer,
             lambda: tokens_32k().replace(b"[[", b"[[" + str(2**63).encode() + b", ", 1), 400, "inputs[0].data",
             json_h),
        Case("kserve-truncated-gzip", infer, lambda: gzip.compress(tokens_32k())[:-20], 400, "Content-Encoding",
             {**json_h, "content-encoding": "gzip"}),
        Case("non-ascii-request-id", "/v1/score", lambda: json.dumps({"conversations": [ok_conversation]}).encode(),
             200, None, {**json_h, "x-request-id": "r\u00e9quest-\u00ff"}),
        Case("disconnect-mid-body", "/v1/score", lambda: b"{" + b" " * (4 * MiB), 0, None, json_h,
             disconnect_after_bytes=MiB),
        Case("weights-overflow", "/v1/score",
             lambda: json.dumps({"conversations": [ok_conversation], "weights": [1e308] * 9}).encode(), 400,
             "weights", json_h),
        Case("chat-stream-true", "/v1/chat/completions",
             lambda: json.dumps({"model": "x", "messages": ok_conversation["messages"], "stream": True}).encode(),
             400, "stream", json_h),
        Case("unknown-route", "/v1/nothing", lambda: b"{}", 404, "path", json_h),
        Case("wrong-method", "/v1/score", lambda: b"", 405, "method", {}, method="GET"),
        Case("body-not-json", "/v1/score", lambda: b"\xff\xfe not json", 400, None, json_h),
    ]


def _binary_header_length(rows: int, width: int) -> int:
    tokens, lengths = rows * width * 8, rows * 8
    return len(json.dumps({"inputs": [
        {"name": "tokens", "shape": [rows, width], "datatype": "INT64", "parameters": {"binary_data_size": tokens}},
        {"name": "sequence_lengths", "shape": [rows, 1], "datatype": "INT64",
         "parameters": {"binary_data_size": lengths}}]}).encode())


def send(base_url: str, case: Case, timeout_s: float = 120.0) -> tuple[int, dict[str, Any] | None, float]:
    """Sends over a raw socket (the body in a thread, so an early answer is read while the body still
    goes out, as a real client would see it); returns (status, JSON body or None, seconds). Status 0: the
    client went away as planned, or no answer."""
    host, port = base_url.rsplit("//", 1)[1].split(":")
    chunked = case.chunked
    body = case.body()
    head = [f"{case.method} {case.path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
    head += [f"{k}: {v}" for k, v in case.headers.items()]
    head.append("Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(body)}")
    sock = socket.create_connection((host, int(port)), timeout=timeout_s)
    started = time.perf_counter()

    def body_chunks() -> Iterator[bytes]:
        if chunked:
            for chunk in body:
                yield f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
            yield b"0\r\n\r\n"
        else:
            for offset in range(0, len(body), MiB):
                yield body[offset:offset + MiB]

    def send_body() -> None:
        sent = 0
        try:
            sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("utf-8"))
            for chunk in body_chunks():
                if case.disconnect_after_bytes is not None and sent >= case.disconnect_after_bytes:
                    sock.shutdown(socket.SHUT_RDWR)
                    return
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:  # the server answered and closed early: fine
            pass

    sender = threading.Thread(target=send_body, daemon=True)
    sender.start()
    if case.disconnect_after_bytes is not None:
        sender.join(timeout_s)
        sock.close()
        return 0, None, time.perf_counter() - started
    data = b""
    try:
        while b"\r\n\r\n" not in data or len(data) < _expected_length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except OSError:
        pass
    elapsed = time.perf_counter() - started
    sock.close()
    sender.join(timeout_s)  # our own sending must not compete with what is measured next
    if not data:
        return 0, None, elapsed
    status = int(data.split(b" ", 2)[1])
    payload = data.split(b"\r\n\r\n", 1)[1]
    try:
        return status, json.loads(payload), elapsed
    except ValueError:
        return status, None, elapsed


def _expected_length(data: bytes) -> int:
    head, _, _ = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(head) + 4 + int(value)
    return 1 << 62  # read to the end


def router_actor(app_name: str = "reward") -> Any:
    """The live Router replica actor of the app (Serve names replicas `SERVE_REPLICA::<app>#Router#<id>`);
    no dashboard needed."""
    import ray

    prefix = f"SERVE_REPLICA::{app_name}#Router#"
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == "serve" and a["name"].startswith(prefix)]
    if len(names) != 1:
        raise RuntimeError(f"expected one Router replica of app {app_name}, found {names}")
    return ray.get_actor(names[0], namespace="serve")


def router_pid(app_name: str = "reward") -> int:
    import os

    import ray

    return ray.get(router_actor(app_name).__ray_call__.remote(lambda _: os.getpid()))


class RssSampler:
    """Peak RSS of one process, sampled every `interval_s` in a thread; `with` starts and stops it."""

    def __init__(self, pid: int, interval_s: float = 0.01):
        import psutil

        self._process = psutil.Process(pid)
        self._interval_s = interval_s
        self.start_bytes = self.peak_bytes = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss)
            time.sleep(self._interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_bytes = max(self.peak_bytes, self._process.memory_info().rss)


NORMAL_BODY = {"conversations": [{"messages": [{"role": "user", "content": "What is tea?"},
                                               {"role": "assistant", "content": "A drink made from leaves."}]}]}


def run_cases(base_url: str, cases: list[Case], pid: int) -> list[dict[str, Any]]:
    import httpx

    with httpx.Client(base_url=base_url, timeout=600) as http:  # the first request warms the model up
        reference = http.post("/v1/score", json=NORMAL_BODY).raise_for_status().json()["results"][0]
        rows = []
        for case in cases:
            with RssSampler(pid) as rss:
                status, body, seconds = send(base_url, case)
            started = time.perf_counter()
            after = http.post("/v1/score", json=NORMAL_BODY)
            after_s = time.perf_counter() - started
            same = after.status_code == 200 and after.json()["results"][0]["attributes"] == reference["attributes"]
            error = body.get("error") if isinstance(body, dict) else None
            rows.append({"case": case.name, "status": status, "expected_status": case.status,
                         "param": error.get("param") if isinstance(error, dict) else None,
                         "seconds": round(seconds, 3), "request_bytes": _size(case),
                         "router_rss_start_mib": round(rss.start_bytes / MiB, 1),
                         "router_rss_peak_mib": round(rss.peak_bytes / MiB, 1),
                         "next_request_s": round(after_s, 3), "next_request_correct": same})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _size(case: Case) -> int:
    return BIG_BYTES if case.chunked else len(case.body())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(REPO / ".demo" / "nemotron4-tiny-reward"))
    parser.add_argument("--out", type=Path, default=RESULT)
    parser.add_argument("--port", type=int, default=0, help="HTTP port of Serve's proxy (0: a free one)")
    args = parser.parse_args()

    import subprocess

    import ray
    import yaml
    from ray import serve

    from deployments.prompt import SentencePieceTokenizer
    from sharding.checkpoints.nemo import NemoCheckpoint

    port = args.port or _free_port()
    checkpoint = Path(args.checkpoint).resolve()
    subprocess.run([sys.executable, "-m", "demo", "--if-missing", "--out", str(checkpoint)],
                   cwd=REPO, check=True)
    app_args = yaml.safe_load((REPO / "configs" / "local.yaml").read_text())["applications"][0]["args"]
    app_args["checkpoint_path"] = str(checkpoint)
    tokenizer = SentencePieceTokenizer(NemoCheckpoint.open(checkpoint).tokenizer_path)
    ray.init(address="local", _temp_dir=RAY_TEMP_DIR, num_cpus=4, include_dashboard=False, logging_level="ERROR",
             log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        from configs.service import RouterConfig
        from serve_app import build_app

        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(app_args), name="reward", route_prefix="/")
        limits = RouterConfig.model_validate(app_args.get("router", {}))
        cases = hostile_cases(tokenizer.piece_id("<extra_id_1>"), limits.max_conversations_per_request)
        rows = run_cases(f"http://127.0.0.1:{port}", cases, router_pid())
    finally:
        serve.shutdown()
        ray.shutdown()
    result = {
        "command": "python bench/abuse.py",
        "config": "configs/local.yaml app args (demo checkpoint), default request limits",
        "max_request_bytes": limits.max_request_bytes,
        "cases": rows,
        "all_answered_within_2_s": all(r["seconds"] < 2 for r in rows),
        "rejections_answered_within_2_s": all(r["seconds"] < 2 for r in rows if r["status"] >= 400),
        "slowest_scored_case_s": max([r["seconds"] for r in rows if r["status"] == 200] or [0.0]),
        "loadavg_1m_at_end": round(os.getloadavg()[0], 1),
        "peak_router_rss_mib": max(r["router_rss_peak_mib"] for r in rows),
        "all_statuses_as_expected": all(r["status"] == r["expected_status"] for r in rows),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
