"""One simulated two-node Ray cluster per test session (head + worker, logical GPUs), Serve on a free port,
and the demo checkpoint written once. Apps are deployed per module on top of that cluster."""

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
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = serve.status().applications.get(name)
        if status is not None and status.status == ApplicationStatus.RUNNING:
            return serve.get_app_handle(name)
        if status is not None and status.status == ApplicationStatus.DEPLOY_FAILED:
            raise RuntimeError(f"app {name} failed to deploy: {status.message}")
        time.sleep(1)
    raise TimeoutError(f"app {name} not RUNNING after {timeout_s}s: {serve.status().applications.get(name)}")


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


@pytest.fixture(scope="session")
def demo_app(ray_cluster, serve_http, demo_checkpoint) -> str:
    """The TP1 x PP1 app at route prefix / (the shape `serve run configs/local.yaml` deploys)."""
    from serve_app import build_app

    deploy(build_app(service_args(demo_checkpoint)), name="reward", route_prefix="/")
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
