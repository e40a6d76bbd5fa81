"""SIMULATED benchmark: the whole service in front of Nemotron-4-340B's architecture on a simulated
accelerator (`runtime.device: simulated`, cost model `sharding/cost_model.py`). No GPU is involved and no
number here is a GPU measurement: the model's time is the cost model's, everything else (HTTP, router,
batcher, scoring, Serve, the worker actors and their gloo sends) is real and runs on this machine.

    python bench/simulated_service.py                                   # both configs, both workloads
    python bench/simulated_service.py --configs h100 --grpo-prompts 16  # smaller, faster

Configs: configs/simulated_340b.yaml (2 x 8 H100 SXM, TP 8 x PP 2) and configs/simulated_340b_h200.yaml
(1 x 8 H200, TP 8 x PP 1), on a local `ray.cluster_utils.Cluster` of two nodes with logical GPUs.
Workloads (text from demo/corpus.txt, lengths in tokens of the demo tokenizer):
* helpsteer: HelpSteer2-like conversations, a prompt of 50-3000 tokens and a response of 20-1500 (cut so
  the two stay under 4000), one conversation per request;
* grpo: `--grpo-prompts` prompts of 500-3000 tokens x `--grpo-responses` responses of 100-1000 (cut likewise),
  sent as one best-of-N request per prompt (`grpo_best_of_n`) and, separately, one request per response
  (`grpo_per_response`).
Per config and workload:
* engine tokens/s: `sharding.engine.MegatronEngine` driven directly (same workers, same placement) with the
  same token lists, cut in arrival order into batches of `router.max_tokens_per_batch` requested tokens (as
  the router cuts them today), `max_batches_in_flight` at a time;
* service tokens/s over HTTP at each concurrency; `service_over_engine` = the ratio (targets >= 0.95 at 64,
  >= 0.9 at 8); tokens are requested prompt tokens (the responses' `num_tokens`);
* stage busy: each stage's modelled busy time over the pass's wall time (target >= 0.9 at 64);
* c=1 latency (helpsteer, `--c1` conversations): per conversation, its forward on the idle engine alone and its
  HTTP request on the idle service alone (the engine's simulated time is deterministic, so the two need not
  run back to back), median of the per-conversation ratios (target <= 1.15);
* batch vs model: per batch alone on the engine, its wall time over the cost model's pipeline time for its
  micro-batches (`sharding.cost_model.pipeline_seconds`; expected 0.8-1.25).
Writes bench/results/simulated.json with the git commit and the load average.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from bench.request_path import client_at_worker_niceness  # noqa: E402
from bench.service_vs_engine import budget_batches, machine_info  # noqa: E402

ARCH_DIR = REPO / ".demo" / "nemotron4-340b-arch"
CONFIGS = {"h100": REPO / "configs" / "simulated_340b.yaml", "h200": REPO / "configs" / "simulated_340b_h200.yaml"}
HTTP_PORT = 8100
MAX_CONVERSATION_TOKENS = 4000
TARGETS = {"service_over_engine_c64": 0.95, "service_over_engine_c8": 0.9, "latency_c1": 1.15,
           "stage_busy_c64": 0.9, "batch_over_model": (0.8, 1.25)}


class TextMaker:
    """Text of about n tokens: random corpus words, counted with the demo tokenizer word by word."""

    def __init__(self, tokenizer, seed: int):
        words = sorted({w for line in (REPO / "demo" / "corpus.txt").read_text().split("\n") for w in line.split()})
        self.words = [(w, len(tokenizer.encode(" " + w))) for w in words]
        self.rng = random.Random(seed)

    def text(self, tokens: int) -> str:
        out, n = [], 0
        while n < tokens:
            word, cost = self.rng.choice(self.words)
            out.append(word)
            n += cost
        return " ".join(out)


def lengths(rng: random.Random, prompt: tuple[int, int], response: tuple[int, int]) -> tuple[int, int]:
    p = rng.randint(*prompt)
    return p, min(rng.randint(*response), MAX_CONVERSATION_TOKENS - p)


def helpsteer(maker: TextMaker, n: int, seed: int) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p, r = lengths(rng, (50, 3000), (20, 1500))
        out.append([{"role": "user", "content": maker.text(p)}, {"role": "assistant", "content": maker.text(r)}])
    return out


def grpo(maker: TextMaker, prompts: int, responses: int, seed: int) -> list[tuple[list[dict[str, str]], list[str]]]:
    rng = random.Random(seed)
    groups = []
    for _ in range(prompts):
        p = rng.randint(500, 3000)
        prompt = [{"role": "user", "content": maker.text(p)}]
        groups.append((prompt, [maker.text(min(rng.randint(100, 1000), MAX_CONVERSATION_TOKENS - p))
                                for _ in range(responses)]))
    return groups


async def http_pass(bodies: list[dict[str, Any]], concurrency: int, base_url: str) -> dict[str, Any]:
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    latencies, errors, tokens, sequences = [], [], 0, 0
    queue = list(range(len(bodies)))[::-1]
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=1200.0) as client:
        async def worker() -> None:
            nonlocal tokens, sequences
            while queue:
                body = bodies[queue.pop()]
                t = time.perf_counter()
                r = await client.post("/v1/score", json=body)
                latencies.append(time.perf_counter() - t)
                if r.status_code != 200:
                    errors.append(f"{r.status_code}: {r.text[:200]}")
                    continue
                results = r.json()["results"]
                tokens += sum(res["num_tokens"] for res in results)
                sequences += len(results)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed at concurrency {concurrency}; first: {errors[0]}")
    latencies.sort()
    return {"concurrency": concurrency, "requests": len(bodies), "sequences": sequences, "tokens": tokens,
            "wall_s": round(wall, 2), "tokens_per_s": round(tokens / wall, 1),
            "sequences_per_s": round(sequences / wall, 2),
            "latency_p50_s": round(latencies[len(latencies) // 2], 3), "latency_p99_s": round(
                latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 3)}


def stage_busy(workers, wall_s: float) -> list[float]:
    """Per pipeline stage (TP rank 0's record), modelled busy seconds over `wall_s`; resets the records."""
    import ray

    stats = ray.get([w.simulated_stats.remote(reset=True) for w in workers])
    by_stage = {s["pipeline_rank"]: s["busy_s"] for s in sorted(stats, key=lambda s: -s["rank"])}
    return [round(by_stage[s] / wall_s, 3) for s in sorted(by_stage)]


def reset_stats(workers) -> None:
    import ray

    ray.get([w.simulated_stats.remote(reset=True) for w in workers])


async def engine_pass(engine, token_lists: list[list[int]], budget: int, in_flight: int) -> dict[str, Any]:
    batches = budget_batches(token_lists, budget)
    slots = asyncio.Semaphore(in_flight)

    async def one(batch):
        async with slots:
            await engine.score(batch)

    reset_stats(engine.workers)
    t0 = time.perf_counter()
    await asyncio.gather(*(one(b) for b in batches))
    wall = time.perf_counter() - t0
    tokens = sum(len(t) for t in token_lists)
    return {"batches": len(batches), "tokens": tokens, "sequences": len(token_lists), "wall_s": round(wall, 2),
            "tokens_per_s": round(tokens / wall, 1), "sequences_per_s": round(len(token_lists) / wall, 2),
            "stage_busy": stage_busy(engine.workers, wall)}


async def batch_over_model(engine, config, arch, token_lists: list[list[int]], budget: int, count: int
                           ) -> dict[str, Any]:
    """Wall time of single batches on the idle engine over the cost model's pipeline time for them."""
    from configs.accelerators import ACCELERATORS
    from configs.service import DTYPE_BYTES
    from sharding.cost_model import micro_batch_times, pipeline_seconds
    from sharding.micro_batches import plan_micro_batches

    ratios = []
    for batch in budget_batches(token_lists, budget)[:count]:
        micro_batches, _ = plan_micro_batches(batch, config.parallel)
        model_s = pipeline_seconds(micro_batch_times(
            arch, ACCELERATORS[config.runtime.simulated_accelerator], micro_batches,
            tp=config.parallel.tensor_parallel_size, pp=config.parallel.pipeline_parallel_size,
            dtype_bytes=DTYPE_BYTES[config.runtime.dtype], scatter_gather=config.parallel.scatter_gather_activations))
        t0 = time.perf_counter()
        await engine.score(batch)
        ratios.append((time.perf_counter() - t0) / model_s)
    return {"batches": len(ratios), "min": round(min(ratios), 3), "median": round(statistics.median(ratios), 3),
            "max": round(max(ratios), 3)}


async def forward_times(engine, token_lists: list[list[int]]) -> list[float]:
    out = []
    for ids in token_lists:
        t0 = time.perf_counter()
        await engine.score([ids])
        out.append(time.perf_counter() - t0)
    return out


async def http_times(bodies: list[dict[str, Any]], base_url: str) -> list[float]:
    import httpx

    out = []
    async with httpx.AsyncClient(base_url=base_url, timeout=600.0) as client:
        for body in bodies:
            t0 = time.perf_counter()
            (await client.post("/v1/score", json=body)).raise_for_status()
            out.append(time.perf_counter() - t0)
    return out


def arch_tokenizer():
    """The 340B architecture checkpoint (written once, no weights) and its demo tokenizer."""
    from deployments.prompt import SentencePieceTokenizer
    from sharding.checkpoints.nemo import NemoCheckpoint

    subprocess.run([sys.executable, "-m", "demo", "--shape", "nemotron4-340b", "--no-weights", "--if-missing",
                    "--out", str(ARCH_DIR)], cwd=REPO, check=True)
    return SentencePieceTokenizer(NemoCheckpoint.open(ARCH_DIR).tokenizer_path)


def start_cluster(num_cpus: int, num_gpus: int):
    """Two Ray nodes on this machine with logical CPUs and GPUs, connected; the repo on the workers' path."""
    import ray
    from ray.cluster_utils import Cluster

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    node = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    cluster.add_node(**node)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    return cluster


def finish(result: dict[str, Any], out: Path, cluster) -> None:
    """Writes the result with the load average at the end, and stops Serve, Ray and the local cluster."""
    from ray import serve
    import ray

    result["machine"]["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()
    print(f"wrote {out}")


def git_commit() -> str:
    return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()


def tokenize(conversation: list[dict[str, str]], tokenizer) -> list[int]:
    from deployments.prompt import tokenize_conversation
    from deployments.schemas import Message

    return tokenize_conversation([Message(**m) for m in conversation], tokenizer, max_tokens=1 << 30).token_ids


def run_config(name: str, args: argparse.Namespace, workloads: dict[str, Any], base_url: str) -> dict[str, Any]:
    import ray
    from ray import serve
    from ray.util.placement_group import placement_group, remove_placement_group

    from configs.service import ServiceConfig
    from sharding.checkpoints.formats import open_checkpoint
    from sharding.engine import MegatronEngine
    from sharding.placement import placement_for
    from serve_app import build_app
    from tests.integration.conftest import deploy

    app_args = yaml.safe_load(CONFIGS[name].read_text())["applications"][0]["args"]
    app_args["checkpoint_path"] = str(ARCH_DIR)
    config = ServiceConfig.model_validate(app_args)
    arch = open_checkpoint(ARCH_DIR).arch
    budget, in_flight = config.router.max_tokens_per_batch, config.max_batches_in_flight
    out: dict[str, Any] = {"config": str(CONFIGS[name].relative_to(REPO)), "device": config.device_label,
                           "tensor_parallel_size": config.parallel.tensor_parallel_size,
                           "pipeline_parallel_size": config.parallel.pipeline_parallel_size,
                           "gpus": config.parallel.world_size, "engine": {}, "service": {}}
    print(f"[{name}] engine alone", flush=True)
    plan = placement_for(config)
    pg = placement_group(plan.bundles, strategy=plan.strategy)
    ray.get(pg.ready(), timeout=300)
    engine = MegatronEngine(config, pg)
    try:
        for key, (token_lists, _) in workloads.items():
            if key == "grpo_per_response":  # the same token lists, in the same order, as best-of-N
                continue
            out["engine"][key] = asyncio.run(engine_pass(engine, token_lists, budget, in_flight))
            print(f"[{name}] engine {key}: {out['engine'][key]}", flush=True)
        out["engine"]["grpo_per_response"] = out["engine"]["grpo_best_of_n"]
        out["batch_over_model"] = asyncio.run(batch_over_model(
            engine, config, arch, workloads["helpsteer"][0], budget, args.model_batches))
        c1_tokens = workloads["helpsteer"][0][:args.c1]
        engine_c1 = asyncio.run(forward_times(engine, c1_tokens))
    finally:
        engine.shutdown()
        remove_placement_group(pg)
    print(f"[{name}] service", flush=True)
    deploy(build_app(app_args), name="reward", route_prefix="/", timeout_s=600)
    model = serve.get_deployment_handle("RewardModelDeployment", app_name="reward")
    try:
        http_c1 = asyncio.run(http_times(workloads["helpsteer"][1][:args.c1], base_url))
        ratios = [h / e for h, e in zip(http_c1, engine_c1)]
        out["latency_c1"] = {"conversations": len(ratios), "engine_forward_p50_s": round(statistics.median(engine_c1), 3),
                             "http_p50_s": round(statistics.median(http_c1), 3),
                             "http_over_engine_median": round(statistics.median(ratios), 3)}
        for key, (_, bodies) in workloads.items():
            engine_tps = out["engine"][key]["tokens_per_s"]
            passes = []
            for c in args.concurrency:
                model.simulated_stats.remote(reset=True).result()
                r = asyncio.run(http_pass(bodies, c, base_url))
                r["stage_busy"] = [round(s["busy_s"] / r["wall_s"], 3) for s in
                                   model.simulated_stats.remote(reset=True).result()]
                r["service_over_engine"] = round(r["tokens_per_s"] / engine_tps, 3)
                passes.append(r)
                print(f"[{name}] service {key}: {r}", flush=True)
            out["service"][key] = passes
    finally:
        serve.delete("reward")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=["h100", "h200"])
    parser.add_argument("--helpsteer", type=int, default=96, help="HelpSteer2-like conversations per pass.")
    parser.add_argument("--grpo-prompts", type=int, default=64)
    parser.add_argument("--grpo-responses", type=int, default=16)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--c1", type=int, default=12, help="Conversations timed one by one at concurrency 1.")
    parser.add_argument("--model-batches", type=int, default=4, help="Batches timed alone against the model.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "simulated.json")
    args = parser.parse_args()

    from ray import serve

    tokenizer = arch_tokenizer()
    maker = TextMaker(tokenizer, args.seed)
    conversations = helpsteer(maker, args.helpsteer, args.seed)
    groups = grpo(maker, args.grpo_prompts, args.grpo_responses, args.seed + 1)
    per_response = [prompt + [{"role": "assistant", "content": r}] for prompt, responses in groups for r in responses]
    workloads = {
        "helpsteer": ([tokenize(c, tokenizer) for c in conversations],
                      [{"conversations": [{"messages": c}]} for c in conversations]),
        "grpo_best_of_n": ([tokenize(c, tokenizer) for c in per_response],
                           [{"prompt": prompt, "responses": responses} for prompt, responses in groups]),
    }
    workloads["grpo_per_response"] = (workloads["grpo_best_of_n"][0],
                                      [{"conversations": [{"messages": c}]} for c in per_response])
    result: dict[str, Any] = {
        "simulated": True,
        "note": "SIMULATED accelerator: model time from sharding/cost_model.py, not a GPU measurement",
        "git_commit": git_commit(),
        "command": "python bench/simulated_service.py " + " ".join(sys.argv[1:]),
        "machine": machine_info(),
        "targets": TARGETS,
        "workloads": {k: {"requests": len(v[1]), "sequences": len(v[0]), "tokens": sum(map(len, v[0]))}
                      for k, v in workloads.items()},
        "configs": {},
    }
    cluster = start_cluster(num_cpus=32, num_gpus=16)
    try:
        result["client_niceness"] = client_at_worker_niceness()
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": HTTP_PORT})
        for name in args.configs:
            result["configs"][name] = run_config(name, args, workloads, f"http://127.0.0.1:{HTTP_PORT}")
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1) + "\n")
    finally:
        finish(result, args.out, cluster)


if __name__ == "__main__":
    main()
