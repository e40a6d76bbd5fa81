"""Slow clients and over-long paths against Serve's HTTP proxy, in a Ray instance of its own whose Serve has
short timeouts (`short_timeouts_serve.py`; the shipped configs set `keep_alive_timeout_s` 5 and
`request_timeout_s` 300, `tests/unit/test_configs.py`).

What is pinned, five connections of each kind at once:
* a body that stops arriving: Serve's 408 (plain text, from its proxy) after `request_timeout_s`, and the
  connection closed a keep-alive timeout later;
* an idle connection after an answer: closed after `keep_alive_timeout_s`;
* headers that never finish: no Serve setting closes the connection (uvicorn starts its keep-alive timer only
  after a first answer, and `request_timeout_s` only once the headers are in); it is still open after both
  timeouts. The README says so; a proxy with a header timeout in front is the remedy.
* a URL of 65536 bytes or more: uvicorn in Serve's proxy refuses it with a plain-text 400 before any app sees
  it (httptools' URL parser stops at 65535 bytes); one byte shorter reaches the app, whose 404 has the error
  shape.
"""

from __future__ import annotations

import json
import os
import selectors
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.integration.test_abuse import check_error_shape

REPO = Path(__file__).resolve().parents[2]
KEEP_ALIVE_S = 1
REQUEST_TIMEOUT_S = 2.0
MARGIN_S = 3.0  # scheduling on a loaded machine
CONNECTIONS = 5
START_TIMEOUT_S = 180
MAX_URL_BYTES = 65535  # httptools.parse_url's limit, which uvicorn applies to every request line


@pytest.fixture(scope="module")
def port(tmp_path_factory) -> Iterator[int]:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    env.pop("RAY_ADDRESS", None)
    log = tmp_path_factory.mktemp("short_timeouts_serve") / "stderr.log"
    with log.open("w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "tests.integration.short_timeouts_serve", str(KEEP_ALIVE_S),
                                 str(REQUEST_TIMEOUT_S)], cwd=REPO, env=env, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=stderr, text=True)
    try:
        yield _ready_port(proc, log)
    finally:
        proc.stdin.close()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _ready_port(proc: subprocess.Popen, log: Path) -> int:
    selector = selectors.DefaultSelector()
    selector.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if selector.select(timeout=1.0):
            line = proc.stdout.readline()
            if line.startswith("READY "):
                return int(line.split()[1])
            if not line and proc.poll() is not None:
                raise RuntimeError(f"the short-timeouts Serve exited with {proc.returncode} before it was ready:\n"
                                   f"{log.read_text()[-3000:]}")
    raise TimeoutError(f"the short-timeouts Serve was not ready after {START_TIMEOUT_S} s")


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def until_closed(sock: socket.socket, started: float, wait_s: float) -> tuple[float | None, bytes]:
    """Reads until the server closes the connection: (seconds from `started` to the close, or None when it was
    still open after `wait_s`; the bytes received)."""
    data = b""
    deadline = started + wait_s
    try:
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            chunk = sock.recv(65536)
            if not chunk:
                return time.monotonic() - started, data
            data += chunk
    except (socket.timeout, TimeoutError):
        pass
    except ConnectionResetError:
        return time.monotonic() - started, data
    finally:
        sock.close()
    return None, data


def response_parts(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


def slow_body(port: int) -> tuple[float | None, bytes]:
    sock = connect(port)
    sock.sendall(b"POST /size HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                 b'{"a": ')  # 6 of the 100 bytes, then nothing
    return until_closed(sock, time.monotonic(), REQUEST_TIMEOUT_S + KEEP_ALIVE_S + MARGIN_S)


def slow_headers(port: int) -> tuple[float | None, bytes]:
    sock = connect(port)
    sock.sendall(b"POST /size HTTP/1.1\r\nHost: t\r\n")  # the headers never end
    return until_closed(sock, time.monotonic(), REQUEST_TIMEOUT_S + KEEP_ALIVE_S + MARGIN_S)


def idle_after_an_answer(port: int) -> tuple[float | None, bytes]:
    sock = connect(port)
    sock.sendall(b"POST /size HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}")
    data = b""
    while b'{"bytes":2}' not in data:  # the answer (Content-Length framed, the connection kept alive)
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    return until_closed(sock, time.monotonic(), KEEP_ALIVE_S + MARGIN_S)


def test_slow_bodies_and_idle_connections_are_closed_slow_headers_are_not(port):
    kinds = {"slow body": slow_body, "slow headers": slow_headers, "idle": idle_after_an_answer}
    with ThreadPoolExecutor(len(kinds) * CONNECTIONS) as pool:
        futures = {kind: [pool.submit(fn, port) for _ in range(CONNECTIONS)] for kind, fn in kinds.items()}
        results = {kind: [f.result() for f in fs] for kind, fs in futures.items()}

    for closed_s, data in results["slow body"]:
        assert closed_s is not None, f"a slow body's connection was open after {REQUEST_TIMEOUT_S + KEEP_ALIVE_S + MARGIN_S} s"
        assert closed_s >= REQUEST_TIMEOUT_S, closed_s
        status, headers, body = response_parts(data)
        # Serve's proxy answers the timeout itself, in plain text, not in the service's error shape.
        assert status == 408 and headers["content-type"].startswith("text/plain"), data
        assert f"timed out after {REQUEST_TIMEOUT_S}s" in body.decode(), data
    for closed_s, data in results["idle"]:
        assert data == b"" and closed_s is not None and KEEP_ALIVE_S / 2 <= closed_s <= KEEP_ALIVE_S + MARGIN_S, closed_s
    for closed_s, data in results["slow headers"]:
        # Not closed by either timeout: no Serve setting bounds a request whose headers never finish.
        assert closed_s is None and data == b"", (closed_s, data)


def raw_get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    sock = connect(port)
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
    closed_s, data = until_closed(sock, time.monotonic(), 30)
    assert closed_s is not None, "no answer in 30 s"
    return response_parts(data)


def test_an_over_long_url_is_refused_by_serves_proxy_before_the_app(port):
    status, headers, body = raw_get(port, "/" + "a" * (MAX_URL_BYTES - 1))
    assert status == 404 and headers["content-type"] == "application/json", body[:200]
    check_error_shape("/", status, json.loads(body))
    assert json.loads(body)["error"]["param"] == "path"
    for length in (MAX_URL_BYTES + 1, 100_000):
        status, headers, body = raw_get(port, "/" + "a" * (length - 1))
        assert (status, body) == (400, b"Invalid HTTP request received."), (length, status, body[:200])
        assert headers["content-type"].startswith("text/plain")
