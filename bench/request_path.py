"""Two views of one request's path through the service, for the CPU benchmarks (bench/service_vs_engine.py).

* `split_cores`: the accelerator stand-in. On a GPU host the model computes on GPUs and the router, proxy and
  HTTP clients use the host's CPUs; on this CPU-only machine the model worker computes on the same cores the
  service's processes use, so every request's HTTP and routing work takes CPU time from the model. With
  `--model-worker-cores N` the model worker processes of this Ray instance get the last N cores to themselves
  and every other process of the instance (driver and HTTP client, proxy, router, scoring and model replicas,
  Ray's daemons) the others. It pins every thread of each process (Linux affinity is per thread; threads
  started later inherit it), so it is re-applied before each pass, after new processes appeared.
* `client_at_worker_niceness`: Ray starts every worker process (the model workers, the proxy, the router and
  the other replicas) at niceness 15 (`RAY_worker_niceness`) and leaves the driver at its own (0 here). A
  benchmark's HTTP client runs in the driver, so on a CPU-only machine it would preempt the model worker it
  is measuring whenever both want a core (a CFS weight of 1024 against 36). On a real deployment the clients
  are on other machines. The benchmarks therefore put the driver at the workers' niceness: client and
  service compete as equals. Ray's daemons (raylet, GCS) keep their niceness, as in production.
* `paired_latency`: at concurrency 1, for each conversation, one `engine.score` call and one `POST /v1/score`
  back to back (which goes first alternates), and the median over conversations of the ratio of the two:
  "within 1.3x of one engine forward of the same prompt" measured prompt by prompt, so the machine's drift
  between two blocks of measurements (minutes apart on a shared machine) does not enter the ratio.
* `hop_latencies`: at concurrency 1, the p50 of each prefix of the request path on the same conversations:
  one `engine.score` call from the driver, one call through a handle to the model deployment (+ the Serve
  hop to the model replica), one `Router.score` handle call (+ validation, tokenizing, the batcher, the
  scoring deployment), one `POST /v1/score` (+ the HTTP proxy and the app's middleware and JSON), and a
  `GET /v1/models` (the HTTP round trip through the proxy and the router with no work). The differences are
  what each layer adds.
"""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Any

MODEL_WORKER_ROLE = "ModelWorker"
MACHINE_CORES = tuple(sorted(os.sched_getaffinity(0)))  # read before any pinning: the driver is pinned too


def split_cores(model_worker_cores: int, role_of) -> dict[str, Any]:
    """Pins this driver's process tree: `role_of(psutil.Process) -> str` names each process's role; the
    `MODEL_WORKER_ROLE` ones get the last `model_worker_cores` of the cores this process could use at import, all others
    the rest. Returns the split and how many processes and threads each side has."""
    import psutil

    cores = MACHINE_CORES
    if not 0 < model_worker_cores < len(cores):
        raise ValueError(f"--model-worker-cores {model_worker_cores}: this machine has {len(cores)} cores; "
                         f"the model workers need at least one and the rest of the service at least one")
    model_cores, service_cores = set(cores[-model_worker_cores:]), set(cores[:-model_worker_cores])
    me = psutil.Process(os.getpid())
    counts = {"model_worker_processes": 0, "service_processes": 0, "threads": 0}
    for proc in [me, *me.children(recursive=True)]:
        try:
            is_worker = proc.pid != me.pid and role_of(proc) == MODEL_WORKER_ROLE
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        target = model_cores if is_worker else service_cores
        counts["model_worker_processes" if is_worker else "service_processes"] += 1
        for task in Path(f"/proc/{proc.pid}/task").glob("*"):
            try:
                os.sched_setaffinity(int(task.name), target)
                counts["threads"] += 1
            except (OSError, ValueError):  # the thread ended meanwhile
                continue
    return {"model_worker_cores": sorted(model_cores), "service_cores": sorted(service_cores), **counts}


def client_at_worker_niceness() -> dict[str, int]:
    """Sets the niceness of every thread of this driver (Linux niceness is per thread) to that of a Ray
    worker process of the connected instance; returns both."""
    import ray

    @ray.remote(num_cpus=0)
    def niceness() -> int:
        return os.getpriority(os.PRIO_PROCESS, 0)

    driver = os.getpriority(os.PRIO_PROCESS, 0)
    worker = ray.get(niceness.remote())
    if worker > driver:  # raising niceness needs no privilege; lowering it would
        for task in Path("/proc/self/task").glob("*"):
            try:
                os.setpriority(os.PRIO_PROCESS, int(task.name), worker)
            except OSError:  # the thread ended meanwhile
                continue
    return {"ray_worker_niceness": worker, "driver_niceness_before": driver,
            "driver_niceness": os.getpriority(os.PRIO_PROCESS, 0)}


def _p50_ms(times_s: list[float]) -> float:
    return round(1000 * statistics.median(times_s), 1)


async def paired_latency(conversations: list[list[dict[str, str]]], token_lists: list[list[int]], engine: Any,
                         base_url: str) -> dict[str, Any]:
    """Per conversation, one engine forward and one HTTP request back to back (alternating which goes first);
    p50 of each and the median of the per-conversation ratios (see the module docstring)."""
    import httpx

    engine_s, http_s, ratios = [], [], []
    async with httpx.AsyncClient(base_url=base_url, timeout=600.0) as client:
        async def forward(ids) -> float:
            start = time.perf_counter()
            await engine.score([ids])
            return time.perf_counter() - start

        async def post(conversation) -> float:
            start = time.perf_counter()
            response = await client.post("/v1/score", json={"conversations": [{"messages": conversation}]})
            response.raise_for_status()
            return time.perf_counter() - start

        for i, (conversation, ids) in enumerate(zip(conversations, token_lists)):
            if i % 2:
                e = await forward(ids)
                h = await post(conversation)
            else:
                h = await post(conversation)
                e = await forward(ids)
            engine_s.append(e)
            http_s.append(h)
            ratios.append(h / e)
    return {"engine_forward_p50_ms": _p50_ms(engine_s), "http_score_p50_ms": _p50_ms(http_s),
            "http_over_engine_median": round(statistics.median(ratios), 3), "conversations": len(ratios)}


async def hop_latencies(conversations: list[list[dict[str, str]]], token_lists: list[list[int]], engine: Any,
                        base_url: str, app_name: str = "reward") -> dict[str, Any]:
    """p50 ms of each prefix of the request path at concurrency 1 (see the module docstring), and the
    difference each layer adds."""
    import httpx
    from ray import serve

    model = serve.get_deployment_handle("RewardModelDeployment", app_name=app_name)
    router = serve.get_app_handle(app_name)
    bodies = [{"conversations": [{"messages": c}]} for c in conversations]

    async def timed(call, items) -> float:
        times = []
        for item in items:
            start = time.perf_counter()
            await call(item)
            times.append(time.perf_counter() - start)
        return _p50_ms(times)

    async with httpx.AsyncClient(base_url=base_url, timeout=600.0) as client:
        async def post(body):
            response = await client.post("/v1/score", json=body)
            response.raise_for_status()

        p50 = {
            "engine_score": await timed(lambda ids: engine.score([ids]), token_lists),
            "model_deployment_handle": await timed(lambda ids: model.score.remote([ids]), token_lists),
            "router_handle": await timed(lambda body: router.score.remote(body), bodies),
            "http_score": await timed(post, bodies),
            "http_get_models": await timed(lambda _: client.get("/v1/models"), bodies),
        }
    return {
        "p50_ms": p50,
        "added_ms": {
            "serve_hop_to_the_model_replica": round(p50["model_deployment_handle"] - p50["engine_score"], 1),
            "router_work_and_scoring_hop": round(p50["router_handle"] - p50["model_deployment_handle"], 1),
            "http_proxy_and_app": round(p50["http_score"] - p50["router_handle"], 1),
        },
        "conversations": len(conversations),
    }
