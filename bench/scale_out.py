"""SIMULATED scale-out benchmark: model replicas, routers with prefix affinity, and a failover, on the simulated
accelerator (`runtime.device: simulated`; model time from sharding/cost_model.py, not a GPU measurement).

    python bench/scale_out.py          # writes bench/results/scale_out.json and bench/results/scale_out.png

Model: Nemotron-4-340B's architecture at TP 2 x PP 2 per replica on simulated B200s (169.6 GB of bf16 weights
per GPU of 180), on a local `ray.cluster_utils.Cluster` of two nodes with logical GPUs; the service is the real
one (`serve_app.build_app`), HTTP included. Workloads as bench/simulated_service.py (demo tokenizer).
* replicas: tokens/s of HelpSteer2-like conversations at concurrency 32 x N with N = 1, 2, 4 model replicas
  and one router, N x `--conversations` requests (the conversations repeated: the same requests per client at
  every N, so the ramp-up and the tail weigh the same), the router's queue large enough for every client's
  request (`router.max_queued_tokens` 1M tokens); target: N replicas >= 0.9 x N x one replica;
* affinity: a GRPO-like workload (`--grpo-prompts` x 16 responses) sent one request per response at concurrency
  64 to 2 model replicas through 1 and then 2 routers; computed tokens (what the engines computed, summed over
  the routers' batches with the engine's own layout function) through 2 routers over through 1: target <= 1.15;
* failover: 2 model replicas, one router, concurrency 64; one worker of one replica is SIGKILLed mid-run; every
  answer is counted (non-200) and every score compared with the pseudo-rewards of the request's own tokens
  (wrong scores); tokens/s per 2-s bin over time is the plot.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.service_vs_engine import machine_info  # noqa: E402
from bench.simulated_service import (  # noqa: E402
    ARCH_DIR,
    TextMaker,
    arch_tokenizer,
    finish,
    git_commit,
    grpo,
    helpsteer,
    http_pass,
    start_cluster,
    tokenize,
)

HTTP_PORT = 8101
BIN_S = 2.0


def app_args(model_replicas: int, routers: int) -> dict[str, Any]:
    return {
        "checkpoint_path": str(ARCH_DIR), "model_name": "nemotron-4-340b-simulated",
        "parallel": {"tensor_parallel_size": 2, "pipeline_parallel_size": 2, "max_tokens_per_micro_batch": 8192},
        "runtime": {"device": "simulated", "simulated_accelerator": "b200", "dtype": "bfloat16", "gpus_per_node": 8,
                    "cpus_per_worker": 0.25, "torch_threads_per_worker": 1, "replica_cpus": 0.25},
        # 128 clients x up to ~4k tokens: the queue holds them all (the default 256k would refuse some).
        "router": {"max_tokens_per_batch": 16384, "num_replicas": routers, "max_queued_tokens": 1 << 20},
        "model": {"num_replicas": model_replicas},
    }


def deploy(args: dict[str, Any]):
    from ray import serve

    from serve_app import build_app
    from tests.integration.conftest import deploy as deploy_and_wait

    serve.delete("scale")
    return deploy_and_wait(build_app(args), name="scale", route_prefix="/", timeout_s=900)


def router_totals(routers: int) -> list[dict[str, Any]]:
    """Each router replica's totals, reached by probe keys (prefix affinity routes a key to its home)."""
    from ray import serve

    handle = serve.get_deployment_handle("Router", app_name="scale")
    seen: dict[str, dict[str, Any]] = {}
    for probe in range(256):
        totals = handle.routed_requests.remote(affinity_key=f"probe-{probe}").result()
        seen[totals["replica_id"]] = totals
        if len(seen) == routers:
            break
    return list(seen.values())


def failover_run(conversations, token_lists, seconds: float, kill_at_s: float, concurrency: int) -> dict[str, Any]:
    """Streams conversations at `concurrency` for `seconds`; kills one model worker at `kill_at_s`."""
    import httpx
    import numpy as np
    from ray import serve
    from ray._private.state import actors as gcs_actor_table

    from sharding.simulated import pseudo_rewards

    model = serve.get_deployment_handle("RewardModelDeployment", app_name="scale")
    victim = model.describe.remote().result()[-1]
    log: list[tuple[float, int, int, bool]] = []  # (finish s, status, tokens, right)
    stop = threading.Event()
    start = time.monotonic()

    def client(offset: int) -> None:
        i = offset
        with httpx.Client(base_url=f"http://127.0.0.1:{HTTP_PORT}", timeout=300) as http:
            while not stop.is_set():
                k = i % len(conversations)
                r = http.post("/v1/score", json={"conversations": [{"messages": conversations[k]}]})
                right = False
                tokens = 0
                if r.status_code == 200:
                    result = r.json()["results"][0]
                    tokens = result["num_tokens"]
                    got = np.array(list(result["attributes"].values()), dtype=np.float32)
                    right = bool(np.array_equal(got, pseudo_rewards(token_lists[k], len(got))))
                log.append((time.monotonic() - start, r.status_code, tokens, right))
                i += concurrency

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(concurrency)]
    for t in threads:
        t.start()
    time.sleep(kill_at_s)
    killed_s = time.monotonic() - start
    os.kill(gcs_actor_table(victim["actor_id"])["Pid"], signal.SIGKILL)
    time.sleep(max(0.0, seconds - kill_at_s))
    stop.set()
    for t in threads:
        t.join(timeout=300)
    bins: dict[int, int] = {}
    for done_s, status, tokens, _ in log:
        if status == 200:
            bins[int(done_s // BIN_S)] = bins.get(int(done_s // BIN_S), 0) + tokens
    series = [[round(b * BIN_S, 1), round(bins.get(b, 0) / BIN_S, 1)] for b in range(int(seconds // BIN_S) + 1)]
    return {"killed_at_s": round(killed_s, 2), "victim_rank": victim["rank"], "requests": len(log),
            "non_200": sum(status != 200 for _, status, _, _ in log),
            "wrong_scores": sum(status == 200 and not right for _, status, _, right in log),
            "statuses": sorted({status for _, status, _, _ in log}), "tokens_per_s_by_time": series}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    rows = result["replicas"]
    n = [r["model_replicas"] for r in rows]
    left.plot(n, [r["tokens_per_s"] for r in rows], "o-", label="measured (simulated B200, TP2 x PP2)")
    left.plot(n, [rows[0]["tokens_per_s"] * k for k in n], "--", color="grey", label="N x one replica")
    left.set_xlabel("model replicas")
    left.set_ylabel("tokens/s")
    left.set_title("Throughput by model replicas (SIMULATED)")
    left.legend()
    series = result["failover"]["tokens_per_s_by_time"]
    right.plot([s[0] for s in series], [s[1] for s in series])
    right.axvline(result["failover"]["killed_at_s"], color="red", linestyle=":", label="worker killed")
    right.set_xlabel("seconds")
    right.set_ylabel("tokens/s (2-s bins)")
    right.set_title(f"2 replicas, one loses a worker: {result['failover']['non_200']} non-200, "
                    f"{result['failover']['wrong_scores']} wrong")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--conversations", type=int, default=192)
    parser.add_argument("--grpo-prompts", type=int, default=16)
    parser.add_argument("--failover-s", type=float, default=45.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "scale_out.json")
    args = parser.parse_args()

    from ray import serve

    tokenizer = arch_tokenizer()
    maker = TextMaker(tokenizer, args.seed)
    conversations = helpsteer(maker, args.conversations, args.seed)
    token_lists = [tokenize(c, tokenizer) for c in conversations]
    per_response = [prompt + [{"role": "assistant", "content": r}]
                    for prompt, responses in grpo(maker, args.grpo_prompts, 16, args.seed + 1) for r in responses]
    result: dict[str, Any] = {
        "simulated": True,
        "note": "SIMULATED accelerator (B200 cost model, sharding/cost_model.py): not a GPU measurement",
        "git_commit": git_commit(),
        "command": "python bench/scale_out.py " + " ".join(sys.argv[1:]), "machine": machine_info(),
        "targets": {"replicas_tokens_per_s_over_n_x_one": 0.9, "grpo_two_routers_over_one_computed": 1.15,
                    "failover_non_200": 0, "failover_wrong_scores": 0},
        "replicas": [], "affinity": {},
    }
    cluster = start_cluster(num_cpus=64, num_gpus=8)
    url = f"http://127.0.0.1:{HTTP_PORT}"
    try:
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": HTTP_PORT})
        bodies = [{"conversations": [{"messages": c}]} for c in conversations]
        for n in args.replicas:
            deploy(app_args(n, 1))
            asyncio.run(http_pass(bodies[:8], 8, url))  # warm the request path
            r = asyncio.run(http_pass(bodies * n, 32 * n, url))
            result["replicas"].append({"model_replicas": n, **r})
            print(f"replicas {n}: {r}", flush=True)
        one = result["replicas"][0]["tokens_per_s"]
        for row in result["replicas"]:
            row["over_n_x_one"] = round(row["tokens_per_s"] / (row["model_replicas"] * one), 3)
        grpo_bodies = [{"conversations": [{"messages": c}]} for c in per_response]
        for routers in (1, 2):
            deploy(app_args(2, routers))
            r = asyncio.run(http_pass(grpo_bodies, 64, url))
            totals = router_totals(routers)
            r["computed_tokens"] = sum(t["computed_tokens"] for t in totals)
            r["routers_computed_tokens"] = [t["computed_tokens"] for t in totals]
            result["affinity"][f"routers_{routers}"] = r
            print(f"GRPO per response, {routers} router(s): {r}", flush=True)
        result["affinity"]["two_over_one_computed"] = round(
            result["affinity"]["routers_2"]["computed_tokens"] / result["affinity"]["routers_1"]["computed_tokens"], 3)
        deploy(app_args(2, 1))
        asyncio.run(http_pass(bodies[:8], 8, url))
        result["failover"] = failover_run(conversations, token_lists, args.failover_s, args.failover_s / 3, 64)
        print(f"failover: { {k: v for k, v in result['failover'].items() if k != 'tokens_per_s_by_time'} }", flush=True)
        plot(result, args.out.with_suffix(".png"))
    finally:
        finish(result, args.out, cluster)


if __name__ == "__main__":
    main()
