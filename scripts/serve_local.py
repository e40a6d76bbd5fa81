"""Runs a Serve config file on a new local Ray instance, like `serve run CONFIG`, and stops gracefully.

An application that fails to deploy (`serve_app.build_app` refuses a checkpoint it cannot serve, naming the
reason) ends the run: the reason is printed and the exit status is 1. `serve run` would keep running. Each
app is first built here, before Ray starts (what Serve's controller does next, on the cluster), so a config or
checkpoint it cannot serve fails in seconds; a build that fails only on the cluster ends the run the same way.

On SIGINT (Ctrl-C) or SIGTERM it first drains: the Router refuses new requests with 503 and waits until
the requests in flight have their answers, at most the Router's `graceful_shutdown_timeout_s` (Serve's
default, 20 s, unless the config overrides it); only then does it shut Serve and Ray down. `serve run`
itself kills Serve's HTTP proxy at once on Ctrl-C, which cuts requests in flight, and dies on SIGTERM.

    python scripts/serve_local.py configs/local.yaml
    python scripts/serve_local.py configs/simulated_340b.yaml --simulated-nodes 2 --gpus-per-node 8

`--simulated-nodes N` starts N Ray nodes on this machine (`ray.cluster_utils.Cluster`) with `--gpus-per-node`
logical GPUs each instead of one plain local instance: the shape of a multi-node GPU cluster for configs on
a simulated accelerator (`runtime.device: simulated`), whose placement groups spread stages over nodes.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import traceback
from pathlib import Path

import ray
import yaml
from ray import serve
from ray.serve.schema import ApplicationStatus, ServeDeploySchema

ROUTER = "Router"
SERVE_DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S = 20.0


def router_drain_timeout_s(app) -> float:
    for deployment in app.deployments:
        if deployment.name == ROUTER and "graceful_shutdown_timeout_s" in deployment.model_fields_set:
            return float(deployment.graceful_shutdown_timeout_s)
    return SERVE_DEFAULT_GRACEFUL_SHUTDOWN_TIMEOUT_S


def build_failures(config: ServeDeploySchema) -> dict[str, str]:
    """Builds each app from its import path and args, as Serve's controller will (`serve run` resolves import
    paths from the current directory); the apps that cannot be built, with the reason."""
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.utils import import_attr

    sys.path.insert(0, os.getcwd())
    failed = {}
    for app in config.applications:
        try:
            call_user_app_builder_with_args_if_necessary(import_attr(app.import_path), app.args)
        except Exception:  # noqa: BLE001 - any failure to build is the app's failure to deploy, reported
            failed[app.name] = traceback.format_exc()
    return failed


def main(config_path: str, simulated_nodes: int = 0, gpus_per_node: int = 0, cpus_per_node: int = 16) -> int:
    config = ServeDeploySchema.model_validate(yaml.safe_load(Path(config_path).read_text()))
    failed = build_failures(config)
    if failed:
        for name, message in failed.items():
            print(f"app {name} failed to deploy:\n{message}", file=sys.stderr, flush=True)
        return 1
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    cluster = None
    if simulated_nodes:
        from ray.cluster_utils import Cluster

        repo = str(Path(__file__).resolve().parents[1])
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))
        node = {"num_cpus": cpus_per_node, "num_gpus": gpus_per_node}
        cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
        for _ in range(simulated_nodes - 1):
            cluster.add_node(**node)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, namespace="serve")
    else:
        ray.init(address="local", namespace="serve")
    serve.start(proxy_location=config.proxy_location, http_options=config.http_options.model_dump())
    # What `serve run CONFIG` does: the controller builds each app from its import path and args and applies
    # the config's deployment overrides (user_config included).
    serve.context._get_global_client().deploy_apps(config, _blocking=False)
    print(f"deployed {[app.name for app in config.applications]} from {config_path}; Ctrl-C stops", flush=True)
    while not stop.wait(1.0):
        failed = {name: app.message for name, app in serve.status().applications.items()
                  if app.status == ApplicationStatus.DEPLOY_FAILED}
        if failed:
            for name, message in failed.items():
                print(f"app {name} failed to deploy:\n{message}", file=sys.stderr, flush=True)
            serve.shutdown()
            ray.shutdown()
            if cluster is not None:
                cluster.shutdown()
            return 1
    print("stopping: draining the requests in flight", flush=True)
    for app in config.applications:
        try:
            router = serve.get_deployment_handle(ROUTER, app_name=app.name)
            left = router.drain.remote(router_drain_timeout_s(app)).result()
            print(f"app {app.name}: drained, {left} requests still in flight", flush=True)
        except Exception as exc:  # the app never came up: nothing to drain
            print(f"app {app.name}: not drained ({type(exc).__name__}: {exc})", flush=True)
    serve.shutdown()
    ray.shutdown()
    if cluster is not None:
        cluster.shutdown()
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="A Serve config file.")
    parser.add_argument("--simulated-nodes", type=int, default=0,
                        help="Start this many Ray nodes on this machine (0: one plain local instance).")
    parser.add_argument("--gpus-per-node", type=int, default=0, help="Logical GPUs per simulated node.")
    parser.add_argument("--cpus-per-node", type=int, default=16, help="Logical CPUs per simulated node.")
    args = parser.parse_args()
    sys.exit(main(args.config, args.simulated_nodes, args.gpus_per_node, args.cpus_per_node))
