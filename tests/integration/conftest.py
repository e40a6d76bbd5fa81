"""One simulated two-node Ray cluster per test session (head + worker, logical GPUs), Serve on a free port,
and the demo checkpoint written once. Apps are deployed per module on top of that cluster: with `deploy`
(an Application object, as `serve.run`: every redeploy restarts every replica) or, where a test changes a
running app's config, with `declare` (a config, as `serve deploy`: only a changed `import_path`/`args`
restarts replicas; a changed `user_config` reconfigures them in place)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import ray
from ray import serve
from ray.cluster_utils import Cluster
from ray.serve.schema import ApplicationStatus

from configs.service import DEFAULT_WEIGHTS

REPO = Path(__file__).resolve().parents[2]
NODE_CPUS = 4
NODE_GPUS = 2  # logical: placement groups reserve them, no CUDA behind them
APP_DEPLOY_TIMEOUT_S = 240


@pytest.fixture(scope="session")
def demo_checkpoint(tmp_path_factory) -> Path:
    from demo import write_demo_model

    return write_demo_model(tmp_path_factory.mktemp("ckpt") / "demo-reward", seed=0)


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[Cluster]:
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": NODE_CPUS, "num_gpus": NODE_GPUS, "include_dashboard": False},
    )
    cluster.add_node(num_cpus=NODE_CPUS, num_gpus=NODE_GPUS)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    yield cluster
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def serve_http(ray_cluster) -> str:
    from sharding.process_group import free_port

    port = free_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    return f"http://127.0.0.1:{port}"


def deploy(app, name: str, route_prefix: str, timeout_s: float = APP_DEPLOY_TIMEOUT_S):
    """Deploys without blocking (an unplaceable placement group would hang serve.run) and polls."""
    serve._run(app, _blocking=False, name=name, route_prefix=route_prefix)
    return wait_running(name, since=0.0, timeout_s=timeout_s)


def wait_running(name: str, since: float, timeout_s: float = APP_DEPLOY_TIMEOUT_S):
    """Polls until app `name`, deployed at or after `since` (time.time()), is RUNNING; its handle."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = serve.status().applications.get(name)
        if status is not None and status.last_deployed_time_s >= since:
            if status.status == ApplicationStatus.RUNNING:
                return serve.get_app_handle(name)
            if status.status == ApplicationStatus.DEPLOY_FAILED:
                raise RuntimeError(f"app {name} failed to deploy: {status.message}")
        time.sleep(0.5)
    raise TimeoutError(f"app {name} not RUNNING after {timeout_s}s: {serve.status().applications.get(name)}")


# The apps deployed from a config, by name: every apply names them all (Serve deletes a config-deployed app
# that a new config leaves out), as one `serve deploy` file would.
_DECLARED: dict[str, dict] = {}


def app_config(name: str, route_prefix: str, args: dict, weights=None) -> dict:
    """One application of a Serve config file, as configs/local.yaml writes it: `serve_app:build_app` with
    `args`, and the scoring weights (when given) as the ScoringDeployment's `user_config`."""
    config = {"name": name, "route_prefix": route_prefix, "import_path": "serve_app:build_app", "args": args}
    if weights is not None:
        config["deployments"] = [{"name": "ScoringDeployment", "user_config": {"weights": list(weights)}}]
    return config


def declare(config: dict, wait: bool = True, timeout_s: float = APP_DEPLOY_TIMEOUT_S):
    """Applies the declared apps with `config` (an `app_config`) added or replaced, as `serve deploy` of one
    file holding them all; with `wait`, polls until that app is RUNNING again and returns its handle."""
    from ray.serve.schema import ServeDeploySchema

    _DECLARED[config["name"]] = config
    since = time.time()
    serve.context._get_global_client().deploy_apps(
        ServeDeploySchema.model_validate({"applications": list(_DECLARED.values())}))
    return wait_running(config["name"], since, timeout_s) if wait else None


def undeclare(name: str) -> None:
    _DECLARED.pop(name, None)
    serve.delete(name)


def service_args(checkpoint: Path, **overrides) -> dict:
    args = {
        "checkpoint_path": str(checkpoint),
        "model_name": "demo",
        # The forest layout, as configs/local.yaml (tests/integration/test_forest.py checks it against
        # each sequence scored alone; the padded layout is checked there too).
        "parallel": {"tensor_parallel_size": 1, "pipeline_parallel_size": 1, "max_tokens_per_micro_batch": 8192},
        "runtime": {"device": "cpu", "dtype": "float32", "backend": "gloo", "cpus_per_worker": 0.5},
        "router": {"max_tokens_per_batch": 8192, "max_conversations_per_request": 32},
    }
    for key, value in overrides.items():
        args[key] = {**args.get(key, {}), **value} if isinstance(value, dict) else value
    return args


def demo_app_config(checkpoint: Path, weights=DEFAULT_WEIGHTS) -> dict:
    return app_config("reward", "/", service_args(checkpoint), weights=weights)


@pytest.fixture(scope="session")
def demo_app(ray_cluster, serve_http, demo_checkpoint) -> str:
    """The TP1 x PP1 app at route prefix / from a config, as `serve run configs/local.yaml` deploys it (the
    weights in the ScoringDeployment's user_config)."""
    declare(demo_app_config(demo_checkpoint))
    return serve_http


@pytest.fixture
def http(demo_app) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=demo_app, timeout=120) as client:
        yield client


@pytest.fixture(scope="module")
def reference_scorer(demo_checkpoint):
    """The same checkpoint, forwarded in this process at one rank (no Ray, no Serve). Module-scoped: it holds
    this process's one torch.distributed group, which other modules' in-process models need in turn."""
    from sharding.local import LocalScorer

    scorer = LocalScorer(str(demo_checkpoint))
    yield scorer
    scorer.close()


@pytest.fixture(scope="session")
def tokenizer(demo_checkpoint):
    from deployments.prompt import SentencePieceTokenizer
    from sharding.checkpoints.nemo import NemoCheckpoint

    return SentencePieceTokenizer(NemoCheckpoint.open(demo_checkpoint).tokenizer_path)
