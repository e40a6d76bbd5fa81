"""`scripts/serve_local.sh` (what `scripts/demo.sh` ends in, after setting up `.venv` and writing the demo model)
prints a curl once the service is ready, stops on Ctrl-C typed into its terminal (a real pseudo-terminal
here) and on SIGTERM, and in both cases lets 16 requests that are in flight at the signal finish with their
correct scores before it exits."""

from __future__ import annotations

import asyncio
import os
import pty
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.integration.test_serve_cli import _free_ports, _pids_in_session

REPO = Path(__file__).resolve().parents[2]
VENV = Path(sys.executable).parent.parent
READY_TIMEOUT_S = 300
IN_FLIGHT = 16
# The router drains within its graceful timeout (20 s); Serve's shutdown then waits for each replica's graceful
# shutdown (the model deployment's is 60 s). Alone this stop takes ~7 s here; inside the full suite on the shared
# 2-core machine it took over 60 s twice (2026-12-01), so the bound is those timeouts plus a margin.
STOP_TIMEOUT_S = 150


def _conversation(i: int) -> dict:
    text = " ".join(f"token{i}x{j} and some more words" for j in range(120))  # ~1k tokens
    return {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": f"Answer {i}."}]}


def _config(path: Path, checkpoint: Path, port: int) -> Path:
    config = yaml.safe_load((REPO / "configs/local.yaml").read_text())
    config["http_options"]["port"] = port
    (app,) = config["applications"]
    app["args"]["checkpoint_path"] = str(checkpoint)
    app["args"]["runtime"]["cpus_per_worker"] = 0.5
    path.write_text(yaml.safe_dump(config))
    return path


class Output:
    """Collects a child's output from a file descriptor in a thread (a full pty would block the child)."""

    def __init__(self, fd: int):
        self.fd, self.text = fd, ""
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        while True:
            try:
                ready, _, _ = select.select([self.fd], [], [], 0.5)
                if ready:
                    data = os.read(self.fd, 65536)
                    if not data:
                        return
                    self.text += data.decode(errors="replace")
            except OSError:
                return

    def wait_for(self, needle: str, timeout_s: float, alive) -> None:
        deadline = time.monotonic() + timeout_s
        while needle not in self.text:
            assert alive(), f"the script exited before printing {needle!r}:\n{self.text[-4000:]}"
            assert time.monotonic() < deadline, f"no {needle!r} within {timeout_s}s:\n{self.text[-4000:]}"
            time.sleep(0.5)


async def _score_all(url: str, all_sent: threading.Event) -> list[tuple[float, dict]]:
    """Posts IN_FLIGHT requests at once; sets `all_sent` when every body has been written to its socket."""
    sent = 0

    async def trace(event: str, info: dict) -> None:
        nonlocal sent
        if event == "http11.send_request_body.complete":
            sent += 1
            if sent == IN_FLIGHT:
                all_sent.set()

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=IN_FLIGHT)) as client:
        async def one(i: int) -> tuple[float, dict]:
            response = await client.post(f"{url}/v1/score", json={"conversations": [_conversation(i)]},
                                         extensions={"trace": trace})
            assert response.status_code == 200, response.text
            return time.monotonic(), response.json()["results"][0]

        return await asyncio.gather(*(one(i) for i in range(IN_FLIGHT)))


def _in_flight_at_signal(url: str, send_signal) -> tuple[float, list[tuple[float, dict]]]:
    """Starts IN_FLIGHT requests, sends the signal once they are all on their way, returns (signal time, results).

    No timer decides when: the signal goes once every request body has been written (httpx's trace event) and
    a request sent after them through the same proxy and router has been answered (the barrier: the proxy
    took the earlier requests off their sockets before this one). Each request needs the model for far longer
    than the barrier takes, so all are in flight at the signal (`_check` asserts that each ends after it)."""
    box: dict = {}
    all_sent = threading.Event()

    def run() -> None:
        try:
            box["results"] = asyncio.run(_score_all(url, all_sent))
        except Exception as exc:  # reported below
            box["error"] = repr(exc)
            all_sent.set()

    thread = threading.Thread(target=run)
    thread.start()
    assert all_sent.wait(timeout=120) and "error" not in box, f"the requests were not all sent: {box.get('error')}"
    assert httpx.get(f"{url}/v2/health/live", timeout=60).status_code == 200  # the barrier
    signalled_at = time.monotonic()
    send_signal()
    thread.join(timeout=STOP_TIMEOUT_S + 60)
    assert "results" in box, f"the requests did not all succeed: {box.get('error')}"
    return signalled_at, box["results"]


def _check(signalled_at: float, results: list[tuple[float, dict]], expected: list[dict]) -> None:
    assert len(results) == IN_FLIGHT
    for i, (finished_at, result) in enumerate(results):
        assert finished_at > signalled_at, f"request {i} finished before the signal: not in flight"
        assert result["num_tokens"] > 500
        assert result["score"] == pytest.approx(expected[i]["score"], abs=1e-5)


@pytest.fixture
def script_env(tmp_path) -> dict:
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    return env


def _expected_scores(url: str) -> list[dict]:
    with httpx.Client(timeout=300) as client:
        body = {"conversations": [_conversation(i) for i in range(IN_FLIGHT)]}
        response = client.post(f"{url}/v1/score", json=body)
        assert response.status_code == 200, response.text
        return response.json()["results"]


def _kill_session(sid: int) -> None:
    for pid in _pids_in_session(sid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_ctrl_c_in_a_terminal_stops_the_script_after_draining(demo_checkpoint, tmp_path, script_env):
    (port,) = _free_ports(1)
    config = _config(tmp_path / "serve.yaml", demo_checkpoint, port)
    url = f"http://127.0.0.1:{port}"
    pid, fd = pty.fork()
    if pid == 0:  # the child: a session leader with the pty as its controlling terminal, like a shell's job
        # An interactive shell's job starts with SIGINT at its default even where pytest runs with it ignored
        # (a background job of a non-interactive shell), and bash cannot trap a signal ignored at its start.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.chdir(REPO)
        os.execve("/bin/bash", ["bash", "scripts/serve_local.sh", str(VENV), str(config)], script_env)
    output = Output(fd)
    try:
        alive = lambda: os.waitpid(pid, os.WNOHANG) == (0, 0)  # noqa: E731
        output.wait_for("The service is ready", READY_TIMEOUT_S, alive)
        assert f"curl -s {url}/v1/score" in output.text
        expected = _expected_scores(url)
        signalled_at, results = _in_flight_at_signal(url, lambda: os.write(fd, b"\x03"))  # Ctrl-C
        _check(signalled_at, results, expected)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while (status := os.waitpid(pid, os.WNOHANG)) == (0, 0):
            assert time.monotonic() < deadline, f"still running {STOP_TIMEOUT_S}s after Ctrl-C:\n{output.text[-3000:]}"
            time.sleep(0.5)
        assert os.waitstatus_to_exitcode(status[1]) == 0, output.text[-3000:]
        with pytest.raises(httpx.TransportError):
            httpx.get(f"{url}/v2/health/live", timeout=5)
    finally:
        _kill_session(pid)
        os.close(fd)


def test_sigterm_stops_the_script_after_draining(demo_checkpoint, tmp_path, script_env):
    (port,) = _free_ports(1)
    config = _config(tmp_path / "serve.yaml", demo_checkpoint, port)
    url = f"http://127.0.0.1:{port}"
    read_fd, write_fd = os.pipe()
    process = subprocess.Popen(["bash", "scripts/serve_local.sh", str(VENV), str(config)], cwd=REPO, env=script_env,
                               stdout=write_fd, stderr=subprocess.STDOUT, start_new_session=True)
    os.close(write_fd)
    output = Output(read_fd)
    try:
        output.wait_for("The service is ready", READY_TIMEOUT_S, lambda: process.poll() is None)
        expected = _expected_scores(url)
        signalled_at, results = _in_flight_at_signal(url, lambda: process.send_signal(signal.SIGTERM))
        _check(signalled_at, results, expected)
        assert process.wait(timeout=STOP_TIMEOUT_S) == 0, output.text[-3000:]
    finally:
        _kill_session(process.pid)
        os.close(read_fd)


def test_a_checkpoint_it_cannot_serve_ends_the_script_with_the_reason(demo_checkpoint, tmp_path, script_env):
    """build_app refuses the checkpoint (weights shaped unlike its model_config.yaml): the script exits 1 and
    prints the reason instead of retrying a replica forever."""
    import shutil

    broken = Path(shutil.copytree(demo_checkpoint, tmp_path / "broken"))
    config_path = broken / "model_config.yaml"
    model_config = yaml.safe_load(config_path.read_text())
    model_config["num_layers"] = 2  # the weights hold 4
    config_path.write_text(yaml.safe_dump(model_config))
    (port,) = _free_ports(1)
    config = _config(tmp_path / "serve.yaml", broken, port)
    process = subprocess.run(["bash", "scripts/serve_local.sh", str(VENV), str(config)], cwd=REPO, env=script_env,
                             capture_output=True, text=True, timeout=READY_TIMEOUT_S, start_new_session=True)
    output = process.stdout + process.stderr
    assert process.returncode == 1, output[-3000:]
    assert "failed to deploy" in output
    assert "has shape [4, 384, 256], the model expects [2, 384, 256]" in output
