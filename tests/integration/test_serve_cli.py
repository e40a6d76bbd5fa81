"""The documented commands on a `ray start` cluster, as README's "Two GPU nodes" section runs them:
`serve deploy`, `serve status`, `serve shutdown`, each twice, with Ray 2.60's token auth on (the state a
machine is in once any local `ray.init` or `serve run` has written `~/.ray/auth_token`).

It also shows that the weights change live: a second `serve deploy` of `configs/local.yaml` that changes only
the ScoringDeployment's `user_config` keeps every model replica and worker actor (Ray's state API, through
`ray list actors`) and changes the scores.

The cluster is its own: a fresh HOME, its own temp dir and ports, `ray start --head --block` in its own
process session, and at the end only the processes of that session and temp dir are stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from configs.service import DEFAULT_WEIGHTS

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
NEW_WEIGHTS = [0, 0, 0, 0, 1.0, 0, 0, 0, 0]
BODY = {"conversations": [{"messages": [{"role": "user", "content": "What is the capital of France?"},
                                        {"role": "assistant", "content": "Paris."}]}]}
KEPT_CLASSES = ("ModelWorker", "ServeReplica:reward:RewardModelDeployment", "ServeReplica:reward:Router",
                "ServeReplica:reward:ScoringDeployment")
START_TIMEOUT_S = 120
DEPLOY_TIMEOUT_S = 240
# Serve's shutdown waits for each replica's graceful shutdown (the model deployment's is 60 s); inside the full
# suite on the shared 2-core machine a `serve run` stop took over 90 s (2026-12-01), alone far less.
STOP_TIMEOUT_S = 150
STOP_GRACE_S = 3  # a private `ray start` cluster at the end of a test: SIGTERM, then SIGKILL


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class RayStartCluster:
    """`ray start --head --block` with its own HOME, temp dir and ports; token auth as README documents it."""

    def __init__(self, root: Path):
        self.home = root / "home"
        self.home.mkdir()
        # Ray's unix sockets live under the temp dir: keep its path short.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rayops", dir="/tmp"))
        (gcs, dash, client, agent_http, agent_grpc, metrics, node_mgr, obj_mgr, rt_env, self.http_port) = _free_ports(10)
        self.dashboard = f"http://127.0.0.1:{dash}"
        self.log = root / "ray_start.log"
        self.env = {
            **os.environ,
            "HOME": str(self.home),
            "RAY_AUTH_MODE": "token",  # README: the one variable; every ray/serve command of the session sets it
            "PYTHONPATH": str(REPO),
            "RAY_USAGE_STATS_ENABLED": "0",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        self.env.pop("RAY_ADDRESS", None)
        # What a first local ray.init() (serve run, a test) leaves behind; README's fresh-machine step.
        self.run("ray", "get-auth-token", "--generate")
        assert (self.home / ".ray" / "auth_token").is_file()
        self.process = subprocess.Popen(
            ["ray", "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dash}",
             "--dashboard-host=127.0.0.1", f"--ray-client-server-port={client}",
             f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
             f"--metrics-export-port={metrics}", f"--node-manager-port={node_mgr}",
             f"--object-manager-port={obj_mgr}", f"--runtime-env-agent-port={rt_env}",
             f"--temp-dir={self.temp_dir}", "--num-cpus=4", "--num-gpus=0", "--include-dashboard=true"],
            env=self.env, cwd=REPO, stdout=self.log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True,
        )
        # Polls go to the dashboard's REST API (what the serve CLI calls) with the session's token: a CLI
        # process per poll costs seconds of interpreter start on a loaded machine. The documented commands
        # themselves run as commands below.
        self.auth = {"Authorization": f"Bearer {(self.home / '.ray' / 'auth_token').read_text().strip()}"}
        deadline = time.monotonic() + START_TIMEOUT_S
        while self.rest_applications() is None:
            assert self.process.poll() is None, f"ray start exited:\n{self.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "the dashboard did not come up"
            time.sleep(0.5)

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run(list(args), env=self.env, cwd=REPO, capture_output=True, text=True, timeout=300)
        if check and result.returncode != 0:
            raise AssertionError(f"{' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
        return result

    def serve(self, command: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.run("serve", command, *args, "--address", self.dashboard, check=check)

    def app_status(self) -> dict:
        """The app's entry in `serve status` (the command)."""
        return yaml.safe_load(self.serve("status").stdout).get("applications", {}).get("reward", {})

    def rest_applications(self) -> dict | None:
        """GET /api/serve/applications/ (what `serve status` reads), or None while the dashboard is not up."""
        try:
            response = httpx.get(f"{self.dashboard}/api/serve/applications/", headers=self.auth, timeout=30)
        except httpx.TransportError:
            return None
        return response.json().get("applications") or {} if response.status_code == 200 else None

    def wait_running(self, since: float) -> None:
        """Polls until the app, deployed at or after `since` (time.time()), is RUNNING."""
        deadline = time.monotonic() + DEPLOY_TIMEOUT_S
        while True:
            status = (self.rest_applications() or {}).get("reward", {})
            if status.get("last_deployed_time_s", 0) >= since:
                if status.get("status") == "RUNNING":
                    return
                assert status.get("status") != "DEPLOY_FAILED", status
            assert time.monotonic() < deadline, status
            time.sleep(0.5)

    def alive_actors(self) -> dict[str, set[str]]:
        listed = json.loads(self.run("ray", "list", "actors", "--address", self.dashboard, "--format", "json",
                                     "--filter", "state=ALIVE", "--limit", "1000").stdout)
        out: dict[str, set[str]] = {}
        for actor in listed:
            out.setdefault(actor["class_name"], set()).add(actor["actor_id"])
        return out

    def stop(self) -> None:
        """SIGTERM to the `ray start` session, then SIGKILL to whatever of this temp dir is left. The cluster is
        this test's own and nothing of it is kept, so the wait is short: `ray start --block` took 34 s to exit
        on SIGTERM here (2026-12-03), idle time the suite paid at each test's end."""
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=STOP_GRACE_S)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        for pid in _pids_mentioning(str(self.temp_dir)) | _pids_in_session(self.process.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def _pids_in_session(sid: int) -> set[int]:
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getsid(int(entry.name)) == sid:
                    pids.add(int(entry.name))
            except OSError:
                pass
    return pids


def _pids_mentioning(text: str) -> set[int]:
    pids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text.encode() in (entry / "cmdline").read_bytes():
                    pids.add(int(entry.name))
            except OSError:
                pass
    return pids - {os.getpid()}


def _write_config(path: Path, checkpoint: Path, http_port: int, weights: list[float]) -> Path:
    config = yaml.safe_load((REPO / "configs/local.yaml").read_text())
    config["http_options"]["port"] = http_port
    (app,) = config["applications"]
    app["args"]["checkpoint_path"] = str(checkpoint)
    app["args"]["runtime"]["cpus_per_worker"] = 0.5
    (scoring,) = [d for d in app["deployments"] if d["name"] == "ScoringDeployment"]
    scoring["user_config"]["weights"] = weights
    path.write_text(yaml.safe_dump(config))
    return path


def _score(url: str) -> dict:
    return httpx.post(f"{url}/v1/score", json=BODY, timeout=60).raise_for_status().json()["results"][0]


def test_deploy_status_shutdown_twice_with_token_auth_and_live_weights(demo_checkpoint, tmp_path):
    cluster = RayStartCluster(tmp_path)
    try:
        url = f"http://127.0.0.1:{cluster.http_port}"
        first = _write_config(tmp_path / "first.yaml", demo_checkpoint, cluster.http_port, list(DEFAULT_WEIGHTS))
        second = _write_config(tmp_path / "second.yaml", demo_checkpoint, cluster.http_port, NEW_WEIGHTS)

        since = time.time()
        cluster.serve("deploy", str(first))
        cluster.wait_running(since)
        before = _score(url)
        attributes = np.array(list(before["attributes"].values()))
        assert before["score"] == pytest.approx(float(attributes @ np.array(DEFAULT_WEIGHTS)), abs=1e-6)
        actors_before = cluster.alive_actors()
        assert all(actors_before.get(name) for name in KEPT_CLASSES), actors_before

        since = time.time()
        cluster.serve("deploy", str(second))  # only the ScoringDeployment's user_config differs
        deadline = time.monotonic() + 60
        while (after := _score(url))["score"] != pytest.approx(after["attributes"]["helpfulness"], abs=1e-6):
            assert time.monotonic() < deadline, after
            time.sleep(0.2)
        cluster.wait_running(since)
        np.testing.assert_allclose(list(after["attributes"].values()), attributes, atol=1e-6, rtol=0)
        actors_after = cluster.alive_actors()
        for name in KEPT_CLASSES:  # nothing restarted: same model replica, same workers, same router
            assert actors_after.get(name) == actors_before[name], name

        cluster.serve("shutdown", "-y")
        assert cluster.app_status() == {}
        since = time.time()
        cluster.serve("deploy", str(first))  # the same commands a second time
        cluster.wait_running(since)
        assert _score(url)["score"] == pytest.approx(before["score"], abs=1e-6)
        cluster.serve("shutdown", "-y")
        assert cluster.app_status() == {}
    finally:
        cluster.stop()


def _sigint_at_default() -> None:
    """As in a terminal: SIGINT at its default in the child, even where pytest runs with it ignored (a background
    job of a non-interactive shell, which Python and its children inherit); else Ctrl-C would never reach it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_serve_run_twice_in_a_fresh_home_with_token_auth(demo_checkpoint, tmp_path):
    """`serve run CONFIG` as README shows it, on a new local Ray instance, with the documented token-auth
    setting, two times in a row: each comes up and scores, and each stops on Ctrl-C (SIGINT)."""
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "RAY_AUTH_MODE": "token", "PYTHONPATH": str(REPO),
           "RAY_USAGE_STATS_ENABLED": "0", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    subprocess.run(["ray", "get-auth-token", "--generate"], env=env, check=True, capture_output=True, timeout=60)
    (port,) = _free_ports(1)
    config = _write_config(tmp_path / "serve.yaml", demo_checkpoint, port, list(DEFAULT_WEIGHTS))
    url = f"http://127.0.0.1:{port}"
    scores = []
    for _ in range(2):
        log = (tmp_path / f"serve_run_{len(scores)}.log").open("wb")
        process = subprocess.Popen(["serve", "run", "--address", "local", str(config)], cwd=REPO, env=env,
                                   stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                   preexec_fn=_sigint_at_default)
        try:
            deadline = time.monotonic() + DEPLOY_TIMEOUT_S
            while True:
                assert process.poll() is None, "serve run exited"
                assert time.monotonic() < deadline, "serve run did not become ready"
                try:
                    if httpx.get(f"{url}/v2/health/ready", timeout=10).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(1)
            scores.append(_score(url)["score"])
            process.send_signal(signal.SIGINT)
            process.wait(timeout=STOP_TIMEOUT_S)
        finally:
            for pid in _pids_in_session(process.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            log.close()
    assert scores[0] == pytest.approx(scores[1], abs=1e-6)
