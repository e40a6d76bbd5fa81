"""A Ray instance of its own with Serve's HTTP timeouts set short, for `test_slow_clients.py` (the session's
Serve runs with fixed `http_options`, and a Serve instance takes them only at start).

The app is the service's HTTP layer without a model: the router's body reading and error handlers
(`deployments.http_body`: a body is read, counted, by `BodyLimitMiddleware`, and an unknown path gets the
404 in the error shape) in front of one route that answers with the body's size. Serve's proxy, where the
timeouts live, is the one the service runs behind.

    python -m tests.integration.short_timeouts_serve KEEP_ALIVE_S REQUEST_TIMEOUT_S

prints `READY <port>` once it answers, then serves until its stdin closes.
"""

import socket
import sys

import ray
from fastapi import FastAPI, Request
from ray import serve

from deployments.http_body import BodyLimitMiddleware, install_error_handlers

MAX_REQUEST_BYTES = 1024

app = FastAPI()
app.add_middleware(BodyLimitMiddleware, limit_bytes=lambda: MAX_REQUEST_BYTES)
install_error_handlers(app)


# As many requests at once as the Router takes: a request whose body is still arriving holds one of them.
@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0})
@serve.ingress(app)
class BodySize:
    @app.post("/size")
    async def size(self, request: Request) -> dict[str, int]:
        return {"bytes": len(await request.body())}


def free_port() -> int:
    with socket.socket() as sock:  # not sharding.process_group's: that module imports torch and megatron
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main(keep_alive_s: int, request_timeout_s: float) -> None:
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port, "keep_alive_timeout_s": keep_alive_s,
                              "request_timeout_s": request_timeout_s})
    serve.run(BodySize.bind(), name="slow", route_prefix="/")
    print(f"READY {port}", flush=True)
    sys.stdin.read()  # until the test closes the pipe
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), float(sys.argv[2]))
