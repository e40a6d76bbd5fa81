"""Runs a Serve config file on a new local Ray instance, like `serve run CONFIG`, and stops gracefully.

An application that fails to deploy (`serve_app.build_app` refuses a checkpoint it cannot serve, naming the
reason) ends the run: the reason is printed and the exit status is 1. `serve run` would keep running.

On SIGINT (Ctrl-C) or SIGTERM it first drains: the Router refuses new requests with 503 and waits until
the requests in flight have their answers, at most the Router's `graceful_shutdown_timeout_s` (Serve's
default, 20 s, unless the config overrides it); only then does it shut Serve and Ray down. `serve run`
itself kills Serve's HTTP proxy at once on Ctrl-C, which cuts requests in flight, and dies on SIGTERM.

    python scripts/serve_local.py configs/local.yaml
"""

from __future__ import annotations

import signal
import sys
import threading
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


def main(config_path: str) -> int:
    config = ServeDeploySchema.model_validate(yaml.safe_load(Path(config_path).read_text()))
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
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
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
