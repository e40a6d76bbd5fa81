"""CPU benchmark: tokens/s and p50/p99 latency against concurrency, for the service and for the engine alone,
at TP1 x PP1 and at PP2, on the demo model. Writes JSON and a PNG plot; also updates bench/results/pipeline.json
with the service-over-engine ratio at PP2 and each stage's busy share under the service.

    python bench/concurrency_sweep.py                       # concurrency 1 4 16 64, 128 conversations
    python bench/concurrency_sweep.py -c 1 8 64 -n 96

Per topology (one Ray instance, PACK placement: this is one machine), in one process:

* service: the real app (`serve_app.build_app`) on Serve, `POST /v1/score` with one conversation per request
  from `c` concurrent HTTP clients (bench/service_vs_engine.py's `http_pass`).
* engine alone: a `MegatronEngine` built in this driver, `c` concurrent callers each submitting one
  conversation to `engine.score` (no router, no batching: what a caller gets by talking to the engine).
* engine, full batches: the same conversations cut into router-budget batches in arrival order and kept
  `max_batches_in_flight` (pipeline depth + 1) at a time: the best the service could do with that config.
  `service_over_engine_full` = service tokens/s at the highest concurrency over this, measured just before
  and after (mean), so the shared machine's drift hits both alike.
* stage busy share: for each model worker process (one per stage at TP1), on-CPU + run-queue-wait share of
  its busiest thread (the one running the forward) over the service pass at the highest concurrency, from
  /proc schedstat: the share of the wall time the stage had work. (On-CPU alone is also recorded: on a
  shared 2-core machine a stage with work often waits for a core.)

Own Ray instance (`/tmp/ray_sweep`, 8 logical CPUs: the PP2 engine and the PP2 service each reserve 2) and
Serve on 127.0.0.1:8101; shuts down what it started.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.request_path import client_at_worker_niceness  # noqa: E402
from bench.service_vs_engine import (  # noqa: E402
    DEFAULT_CHECKPOINT,
    LOCAL_YAML,
    EngineBench,
    _role,
    _thread_schedstats,
    budget_batches,
    build_conversations,
    ensure_demo_model,
    http_pass,
    machine_info,
)
from configs.service import ServiceConfig  # noqa: E402
from deployments.prompt import SentencePieceTokenizer, tokenize_conversation  # noqa: E402
from deployments.schemas import Message  # noqa: E402
from sharding.checkpoints.nemo import NemoCheckpoint  # noqa: E402

HTTP_PORT = 8101
RAY_TEMP_DIR = "/tmp/ray_sweep"
TOPOLOGIES = {"TP1xPP1": (1, 1), "PP2": (1, 2)}


def percentile_ms(latencies: list[float], q: float) -> float:
    latencies = sorted(latencies)
    return round(1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))], 1)


async def engine_pass(engine, token_lists: list[list[int]], concurrency: int) -> dict[str, Any]:
    """`concurrency` callers, each submitting one conversation at a time to `engine.score`."""
    queue = list(range(len(token_lists)))[::-1]
    latencies: list[float] = []

    async def caller() -> None:
        while queue:
            ids = token_lists[queue.pop()]
            t = time.perf_counter()
            await engine.score([ids])
            latencies.append(time.perf_counter() - t)

    t0 = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    tokens = sum(len(t) for t in token_lists)
    return {"concurrency": concurrency, "tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 1), "latency_p50_ms": percentile_ms(latencies, 0.5),
            "latency_p99_ms": percentile_ms(latencies, 0.99)}


async def full_batches_pass(engine, batches: list[list[list[int]]], in_flight: int) -> dict[str, Any]:
    """Budget batches, `in_flight` of them submitted at any time (a new one as soon as one returns)."""
    queue = list(range(len(batches)))[::-1]

    async def feeder() -> None:
        while queue:
            await engine.score(batches[queue.pop()])

    t0 = time.perf_counter()
    await asyncio.gather(*(feeder() for _ in range(in_flight)))
    wall = time.perf_counter() - t0
    tokens = sum(len(t) for b in batches for t in b)
    return {"batches": len(batches), "in_flight": in_flight, "tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 1)}


class StageSampler:
    """Per model-worker process of this Ray instance: its busiest thread's on-CPU and run-queue-wait
    seconds over an interval (/proc schedstat)."""

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil

    def _workers(self) -> dict[int, dict[int, tuple[float, float]]]:
        me = self._psutil.Process(os.getpid())
        out = {}
        for proc in me.children(recursive=True):
            try:
                if _role(proc.cmdline(), proc.name()) == "ModelWorker":
                    out[proc.pid] = _thread_schedstats(proc.pid)
            except (self._psutil.NoSuchProcess, self._psutil.AccessDenied, self._psutil.ZombieProcess):
                pass
        return out

    def start(self) -> None:
        self._start = self._workers()

    def stop(self, wall_s: float, pids: list[int]) -> list[dict[str, float]]:
        """Shares of the workers `pids`, in that order."""
        out = []
        workers = self._workers()
        for pid in pids:
            threads = workers.get(pid, {})
            start = self._start.get(pid, {})
            deltas = [(run - start.get(tid, (0.0, 0.0))[0], wait - start.get(tid, (0.0, 0.0))[1])
                      for tid, (run, wait) in threads.items()]
            run, wait = max(deltas, default=(0.0, 0.0))
            out.append({"cpu_share": round(run / wall_s, 3), "busy_share": round((run + wait) / wall_s, 3)})
        return out


def service_stage_pids() -> list[int]:
    """The service's model workers' pids by rank (stage order at TP1), from Ray's actor table."""
    from ray import serve
    from ray._private.state import actors as gcs_actor_table  # GCS records; the state API needs a dashboard

    workers = serve.get_deployment_handle("RewardModelDeployment", app_name="reward").describe.remote().result()
    return [gcs_actor_table(w["actor_id"])["Pid"] for w in sorted(workers, key=lambda w: w["rank"])]


def run_topology(name: str, tp: int, pp: int, base_cfg: dict[str, Any], conversations, token_lists,
                 concurrency: list[int]) -> dict[str, Any]:
    from ray import serve

    from serve_app import build_app

    cfg_args = json.loads(json.dumps(base_cfg))
    cfg_args["parallel"] = {**cfg_args.get("parallel", {}), "tensor_parallel_size": tp,
                            "pipeline_parallel_size": pp, "placement_strategy": "PACK"}
    config = ServiceConfig.model_validate(cfg_args)
    batches = budget_batches(token_lists, config.router.max_tokens_per_batch)
    in_flight = config.max_batches_in_flight
    bench = EngineBench(config)
    result: dict[str, Any] = {"topology": name, "tp": tp, "pp": pp, "max_batches_in_flight": in_flight,
                              "service": [], "engine_alone": [], "engine_full_batches": []}
    try:
        asyncio.run(full_batches_pass(bench.engine, batches[:2], in_flight))  # warm-up
        serve.start(http_options={"host": "127.0.0.1", "port": HTTP_PORT})
        serve.run(build_app(cfg_args), name="reward", route_prefix="/")
        base_url = f"http://127.0.0.1:{HTTP_PORT}"
        asyncio.run(http_pass(conversations[:16], 8, base_url))  # warm-up
        pids = service_stage_pids()

        def full(label: str) -> dict[str, Any]:
            r = {"label": label, **asyncio.run(full_batches_pass(bench.engine, batches, in_flight))}
            result["engine_full_batches"].append(r)
            print(f"{name} engine full batches ({label}): {r['tokens_per_s']:,.0f} tokens/s", flush=True)
            return r

        before = full("start")
        for c in concurrency:
            sampler = StageSampler()
            sampler.start()
            s = asyncio.run(http_pass(conversations, c, base_url))
            s["stage_busy"] = sampler.stop(s["wall_s"], pids)
            e = asyncio.run(engine_pass(bench.engine, token_lists, c))
            after = full(f"after c={c}")
            ref = (before["tokens_per_s"] + after["tokens_per_s"]) / 2
            s["over_engine_full_batches"] = round(s["tokens_per_s"] / ref, 3)
            e["over_engine_full_batches"] = round(e["tokens_per_s"] / ref, 3)
            before = after
            result["service"].append(s)
            result["engine_alone"].append(e)
            print(f"{name} c={c}: service {s['tokens_per_s']:,.0f} tok/s p50 {s['latency_p50_ms']} ms p99 "
                  f"{s['latency_p99_ms']} ms (x{s['over_engine_full_batches']} of full batches), stages "
                  f"{s['stage_busy']}; engine alone {e['tokens_per_s']:,.0f} tok/s p50 {e['latency_p50_ms']} ms "
                  f"p99 {e['latency_p99_ms']} ms", flush=True)
    finally:
        serve.shutdown()
        bench.close()
    return result


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in results:
        for kind, style in (("service", "-o"), ("engine_alone", "--s")):
            xs = [p["concurrency"] for p in r[kind]]
            label = f"{r['topology']} {'service' if kind == 'service' else 'engine alone'}"
            axes[0].plot(xs, [p["tokens_per_s"] for p in r[kind]], style, label=label)
            axes[1].plot(xs, [p["latency_p50_ms"] for p in r[kind]], style, label=label + " p50")
            axes[1].plot(xs, [p["latency_p99_ms"] for p in r[kind]], style, alpha=0.35, label=label + " p99")
        full = statistics.median(p["tokens_per_s"] for p in r["engine_full_batches"])
        axes[0].axhline(full, linestyle=":", color="gray")
        axes[0].annotate(f"{r['topology']} engine, full batches", (1, full), fontsize=7, color="gray")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients (one conversation per request)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("tokens/s")
    axes[1].set_ylabel("latency (ms)")
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=6, ncol=2)
    fig.suptitle("demo model on a shared 2-core CPU machine (noisy; see bench/README.md)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def update_pipeline_json(path: Path, pp2: dict[str, Any], length_range: list[int], key_suffix: str = "") -> None:
    top = max(pp2["service"], key=lambda s: s["concurrency"])
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[f"service_pp2_over_engine_pp2{key_suffix}"] = top["over_engine_full_batches"]
    data[f"service_pp2{key_suffix}"] = {
        "concurrency": top["concurrency"],
        "prompt_length_range": length_range,
        "service_tokens_per_s": top["tokens_per_s"],
        "engine_full_batches_tokens_per_s": [p["tokens_per_s"] for p in pp2["engine_full_batches"]],
        "stage_busy_share": [s["busy_share"] for s in top["stage_busy"]],
        "stage_cpu_share": [s["cpu_share"] for s in top["stage_busy"]],
        "method": ("service at the highest concurrency over the engine fed router-budget batches with "
                   "max_batches_in_flight in flight (mean of the passes just before and after); stage busy share "
                   "= busiest thread's on-CPU + run-queue-wait seconds over the service pass's wall time, one "
                   "worker per stage; written by bench/concurrency_sweep.py"),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    path.write_text(json.dumps(data, indent=2) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--num-conversations", type=int, default=128)
    p.add_argument("-c", "--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--topologies", nargs="+", default=list(TOPOLOGIES), choices=list(TOPOLOGIES))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-tokens", type=int, default=50)
    p.add_argument("--max-tokens", type=int, default=600)
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "concurrency_sweep.json")
    p.add_argument("--plot", type=Path, default=REPO / "bench" / "results" / "concurrency_sweep.png")
    p.add_argument("--pipeline-json", type=Path, default=REPO / "bench" / "results" / "pipeline.json")
    p.add_argument("--pipeline-key-suffix", default="",
                   help="written as service_pp2_over_engine_pp2<suffix> and service_pp2<suffix> (another workload)")
    args = p.parse_args()

    import ray
    import yaml

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.pop("RAY_ADDRESS", None)
    ensure_demo_model(Path(args.checkpoint))
    base_cfg = yaml.safe_load(LOCAL_YAML.read_text())["applications"][0]["args"]
    base_cfg["checkpoint_path"] = str(Path(args.checkpoint).resolve())
    checkpoint = NemoCheckpoint.open(base_cfg["checkpoint_path"])
    tokenizer = SentencePieceTokenizer(checkpoint.tokenizer_path)
    conversations = build_conversations(args.num_conversations, args.seed, tokenizer, args.min_tokens,
                                        args.max_tokens)
    token_lists = [tokenize_conversation([Message(**m) for m in c], tokenizer, max_tokens=4096).token_ids
                   for c in conversations]
    info = machine_info()
    ray.init(address="local", _temp_dir=RAY_TEMP_DIR, num_cpus=8, include_dashboard=False,
             logging_level="ERROR", log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    info["niceness"] = client_at_worker_niceness()  # the HTTP client in this driver does not preempt the service
    results = []
    try:
        for name in args.topologies:
            results.append(run_topology(name, *TOPOLOGIES[name], base_cfg, conversations, token_lists,
                                        args.concurrency))
    finally:
        ray.shutdown()
    out = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "workload": {"conversations": len(conversations), "tokens": sum(len(t) for t in token_lists),
                     "length_range": [args.min_tokens, args.max_tokens], "seed": args.seed},
        "config": base_cfg,
        "topologies": results,
        "machine": {**info, "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    plot(results, args.plot)
    pp2 = next((r for r in results if r["pp"] == 2), None)
    if pp2 is not None:
        update_pipeline_json(args.pipeline_json, pp2, [args.min_tokens, args.max_tokens], args.pipeline_key_suffix)
    print(f"wrote {args.out}, {args.plot}" + (f", {args.pipeline_json}" if pp2 else ""))


if __name__ == "__main__":
    main()
