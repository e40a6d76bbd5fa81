"""SIMULATED benchmark of the router's scheduling (computed-token budgets, fair shares, admission, deadlines)
in front of Nemotron-4-340B's architecture on a simulated accelerator (configs/simulated_340b.yaml: 2 x 8
H100 SXM, TP 8 x PP 2; model time from sharding/cost_model.py, not a GPU measurement). One command:

    python bench/scheduling.py                       # every scenario, writes bench/results/scheduling.json
    python bench/scheduling.py --grpo-prompts 16     # smaller

Scenarios, in this order on one deployment (helpers shared with bench/simulated_service.py):
* best_of_256: one best-of-256 request on a 3,757-token prompt with ~5-token responses; computed tokens (the
  engine-layout count of its batches, `Router.routed_requests`: micro-batch rows with their repeated prefixes
  and sequence-parallel pads) over the unique tokens of its prompts (target <= 1.1); `usage_computed_tokens_sum`
  is the router's own count (the tries of each batch, before the engine cuts them into rows);
* grpo_best_of_n / grpo_per_response: 64 prompts of 500-3000 tokens x 16 responses, as one best-of-N request
  per prompt (concurrency 64), then as one request per response (concurrency 256); computed over unique
  tokens of the whole workload (each group's prompt once; target <= 1.15 each);
* mix: one maximal request (256 x 4096 tokens) in flight, and small requests (~1,000 tokens) sent every
  0.5 s; the small requests' latency p99 (target <= 3 s);
* deadlines: a backlog saturates the service, then 200 requests with `timeout_s: 2`; how many are answered
  (200) after 2.5 s (target 0) and how they ended (200, 503, 504);
* flood: 1024 concurrent tiny requests; each one's time to its answer or its 503, p99 (target <= 1 s);
* flood_floor: the same client sending 1024 concurrent `GET /v1/models` (Serve's proxy and the ingress replica,
  no admission, tokenizer, router queue or model): the floor this machine puts under the flood's p99.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from bench.service_vs_engine import machine_info  # noqa: E402
from bench.simulated_service import (  # noqa: E402
    ARCH_DIR, CONFIGS, HTTP_PORT, TextMaker, arch_tokenizer, finish, git_commit, grpo, start_cluster, tokenize)

TARGETS = {"best_of_256_computed_over_unique": 1.1, "grpo_computed_over_unique": 1.15, "mix_small_p99_s": 3.0,
           "deadline_answered_after_2_5_s": 0, "flood_p99_s": 1.0}


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 3) if values else float("nan")


def totals(router) -> dict[str, int]:
    return router.routed_requests.remote().result()


async def send(client, body: dict[str, Any]) -> tuple[int, float, dict[str, Any]]:
    start = time.perf_counter()
    response = await client.post("/v1/score", json=body)
    try:
        payload = response.json()
    except ValueError:
        payload = {}
    return response.status_code, time.perf_counter() - start, payload


async def pool(bodies: list[dict[str, Any]], concurrency: int, base_url: str) -> list[tuple[int, float, dict]]:
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    out: list[Any] = [None] * len(bodies)
    queue = list(range(len(bodies)))[::-1]
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=1200.0) as client:
        async def worker() -> None:
            while queue:
                i = queue.pop()
                out[i] = await send(client, bodies[i])

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


def computed_pass(name: str, router, bodies, token_groups, concurrency: int, base_url: str) -> dict[str, Any]:
    from sharding.forest import unique_tokens

    before = totals(router)
    t0 = time.perf_counter()
    results = asyncio.run(pool(bodies, concurrency, base_url))
    wall = time.perf_counter() - t0
    after = totals(router)
    unique = sum(unique_tokens(group) for group in token_groups)
    computed = after["computed_tokens"] - before["computed_tokens"]
    statuses = [s for s, _, _ in results]
    out = {"requests": len(bodies), "concurrency": concurrency, "statuses": {str(s): statuses.count(s) for s in set(statuses)},
           "unique_tokens": unique, "computed_tokens": computed, "requested_tokens":
           after["requested_tokens"] - before["requested_tokens"], "batches": after["batches"] - before["batches"],
           "computed_over_unique": round(computed / unique, 4), "wall_s": round(wall, 2),
           "usage_computed_tokens_sum": sum(p.get("usage", {}).get("computed_tokens", 0) for _, _, p in results)}
    print(f"[{name}] {out}", flush=True)
    return out


def conversation(maker: TextMaker, rng: random.Random, prompt: int, response: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": maker.text(prompt)}, {"role": "assistant", "content": maker.text(response)}]


async def mix(maker: TextMaker, rng: random.Random, base_url: str, smalls: int) -> dict[str, Any]:
    import httpx

    big = {"conversations": [{"messages": conversation(maker, rng, 1950, 1900)} for _ in range(256)]}
    small_bodies = [{"conversations": [{"messages": conversation(maker, rng, 600, 350)}]} for _ in range(smalls)]
    async with httpx.AsyncClient(base_url=base_url, timeout=1200.0) as client:
        hog = asyncio.ensure_future(send(client, big))
        await asyncio.sleep(3.0)
        tasks = []
        for body in small_bodies:
            tasks.append(asyncio.ensure_future(send(client, body)))
            await asyncio.sleep(0.5)
        small = await asyncio.gather(*tasks)
        big_status, big_s, big_payload = await hog
    latencies = [t for s, t, _ in small if s == 200]
    return {"big": {"status": big_status, "latency_s": round(big_s, 2),
                    "prompt_tokens": big_payload.get("usage", {}).get("prompt_tokens")},
            "small_requests": len(small), "small_ok": len(latencies),
            "small_tokens_each": [p.get("usage", {}).get("prompt_tokens") for _, _, p in small[:3]],
            "small_p50_s": percentile(latencies, 0.5), "small_p99_s": percentile(latencies, 0.99),
            "small_max_s": round(max(latencies), 3) if latencies else None,
            # Where each small request's time went, from its own `usage` (ms): queued at the router, then the
            # wall time of the batches it rode in; the rest is HTTP, admission and tokenizing.
            "small_usage_ms": [{k: p.get("usage", {}).get(k) for k in ("queue_ms", "compute_ms", "batch_tokens")}
                               | {"total_ms": round(1000 * t)} for s, t, p in small if s == 200]}


async def deadlines(maker: TextMaker, rng: random.Random, base_url: str, count: int) -> dict[str, Any]:
    import httpx

    backlog = [{"conversations": [{"messages": conversation(maker, rng, 1500, 500)} for _ in range(32)]}
               for _ in range(4)]
    timed = [{"conversations": [{"messages": conversation(maker, rng, 300, 200)}], "timeout_s": 2}
             for _ in range(count)]
    limits = httpx.Limits(max_connections=count + 8, max_keepalive_connections=count + 8)
    async with httpx.AsyncClient(base_url=base_url, timeout=1200.0, limits=limits) as client:
        hogs = [asyncio.ensure_future(send(client, b)) for b in backlog]
        await asyncio.sleep(2.0)
        results = await asyncio.gather(*(send(client, b) for b in timed))
        await asyncio.gather(*hogs)
    statuses = [s for s, _, _ in results]
    answered_late = sum(1 for s, t, _ in results if s == 200 and t > 2.5)
    return {"requests": count, "statuses": {str(s): statuses.count(s) for s in set(statuses)},
            "answered_after_2_5_s": answered_late, "max_s": round(max(t for _, t, _ in results), 3),
            "p99_s": percentile([t for _, t, _ in results], 0.99),
            "error_types": sorted({p.get("error", {}).get("type") for s, _, p in results if s != 200} - {None})}


async def flood(base_url: str, count: int, floor: bool = False) -> dict[str, Any]:
    """`count` tiny scoring requests at once; with `floor`, `GET /v1/models` instead (no scoring path).

    The client is aiohttp, not httpx: at 1,024 concurrent connections httpx's pool is itself the bottleneck.
    Against a bare Starlette app under uvicorn on this 2-core machine (2026-12-03), 1,024 concurrent GETs took
    p99 6.0 s with httpx (160 requests/s) and 0.24-0.43 s with aiohttp (1,900-3,100 requests/s)."""
    import aiohttp

    body = {"conversations": [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}]}

    async def one(session: aiohttp.ClientSession) -> tuple[int, float, dict[str, Any]]:
        start = time.perf_counter()
        request = session.get(f"{base_url}/v1/models") if floor else session.post(f"{base_url}/v1/score", json=body)
        async with request as response:
            await response.read()
            return response.status, time.perf_counter() - start, {}

    timeout = aiohttp.ClientTimeout(total=1200.0)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=count), timeout=timeout) as session:
        started = time.perf_counter()
        results = await asyncio.gather(*(one(session) for _ in range(count)))
        wall_s = time.perf_counter() - started
    statuses = [s for s, _, _ in results]
    times = [t for _, t, _ in results]
    return {"requests": count, "statuses": {str(s): statuses.count(s) for s in set(statuses)},
            "p50_s": percentile(times, 0.5), "p99_s": percentile(times, 0.99), "max_s": round(max(times), 3),
            "p99_s_of_503": percentile([t for s, t, _ in results if s == 503], 0.99),
            "p50_s_of_200": percentile([t for s, t, _ in results if s == 200], 0.5),
            "p99_s_of_200": percentile([t for s, t, _ in results if s == 200], 0.99),
            "wall_s": round(wall_s, 3), "requests_per_s": round(count / wall_s, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grpo-prompts", type=int, default=64)
    parser.add_argument("--grpo-responses", type=int, default=16)
    parser.add_argument("--mix-smalls", type=int, default=20)
    parser.add_argument("--deadline-requests", type=int, default=200)
    parser.add_argument("--flood-requests", type=int, default=1024)
    parser.add_argument("--scenarios", nargs="+",
                        default=["best_of_256", "grpo", "mix", "deadlines", "flood", "flood_floor"])
    parser.add_argument("--micro-batch-tokens", type=int, default=None,
                        help="parallel.max_tokens_per_micro_batch (default: the config's, 16384). The engine cuts a "
                        "batch's tries into rows of this many tokens, repeating a prefix at each cut; at "
                        "router.max_tokens_per_batch every batch is one row and computes exactly its tries.")
    parser.add_argument("--batches-in-flight", type=int, default=None,
                        help="router.max_batches_in_flight (default: the config's, 3 = pipeline depth + 1): fewer "
                        "batches ahead of a small request in the pipeline, less overlap between batches")
    parser.add_argument("--batch-tokens", type=int, default=None,
                        help="router.max_tokens_per_batch (default: the config's, 16384)")
    parser.add_argument("--long-request-tokens", type=int, default=None,
                        help="router.long_request_tokens_per_batch (default: the config's, 4096; 0: no cap): what a "
                        "request over the batch budget adds to one batch")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "scheduling.json")
    args = parser.parse_args()

    from ray import serve

    from serve_app import build_app
    from tests.integration.conftest import deploy

    tokenizer = arch_tokenizer()
    maker = TextMaker(tokenizer, args.seed)
    rng = random.Random(args.seed)
    app_args = yaml.safe_load(CONFIGS["h100"].read_text())["applications"][0]["args"]
    app_args["checkpoint_path"] = str(ARCH_DIR)
    if args.batches_in_flight is not None:
        app_args["router"]["max_batches_in_flight"] = args.batches_in_flight
    if args.batch_tokens is not None:
        app_args["router"]["max_tokens_per_batch"] = args.batch_tokens
    if args.long_request_tokens is not None:
        app_args["router"]["long_request_tokens_per_batch"] = args.long_request_tokens or None
    if args.micro_batch_tokens is not None:
        app_args["parallel"]["max_tokens_per_micro_batch"] = args.micro_batch_tokens
    result: dict[str, Any] = {
        "simulated": True,
        "note": "SIMULATED accelerator: model time from sharding/cost_model.py, not a GPU measurement",
        "git_commit": git_commit(), "command": "python bench/scheduling.py " + " ".join(sys.argv[1:]),
        "config": str(CONFIGS["h100"].relative_to(REPO)), "router": app_args["router"],
        "parallel": app_args["parallel"],
        "machine": machine_info(), "targets": TARGETS, "scenarios": {},
    }
    base_url = f"http://127.0.0.1:{HTTP_PORT}"
    cluster = start_cluster(num_cpus=32, num_gpus=16)

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(__import__("json").dumps(result, indent=1) + "\n")

    try:
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": HTTP_PORT})
        deploy(build_app(app_args), name="reward", route_prefix="/", timeout_s=600)
        router = serve.get_deployment_handle("Router", app_name="reward")
        scenarios = result["scenarios"]
        if "best_of_256" in args.scenarios:
            prompt = [{"role": "user", "content": maker.text(3700)}]
            responses = [maker.text(4) for _ in range(256)]
            ids = [tokenize(prompt + [{"role": "assistant", "content": r}], tokenizer) for r in responses]
            scenarios["best_of_256"] = computed_pass("best_of_256", router, [{"prompt": prompt, "responses": responses}],
                                                     [ids], 1, base_url)
            scenarios["best_of_256"]["prompt_tokens_each"] = len(ids[0])
            save()
        if "grpo" in args.scenarios:
            groups = grpo(maker, args.grpo_prompts, args.grpo_responses, args.seed + 1)
            token_groups = [[tokenize(p + [{"role": "assistant", "content": r}], tokenizer) for r in rs] for p, rs in groups]
            scenarios["grpo_best_of_n"] = computed_pass(
                "grpo_best_of_n", router, [{"prompt": p, "responses": rs} for p, rs in groups], token_groups, 64, base_url)
            save()
            per_response = [{"conversations": [{"messages": p + [{"role": "assistant", "content": r}]}]}
                            for p, rs in groups for r in rs]
            scenarios["grpo_per_response"] = computed_pass("grpo_per_response", router, per_response, token_groups,
                                                           256, base_url)
            save()
        if "mix" in args.scenarios:
            scenarios["mix"] = asyncio.run(mix(maker, rng, base_url, args.mix_smalls))
            print(f"[mix] {scenarios['mix']}", flush=True)
            save()
        if "deadlines" in args.scenarios:
            scenarios["deadlines"] = asyncio.run(deadlines(maker, rng, base_url, args.deadline_requests))
            print(f"[deadlines] {scenarios['deadlines']}", flush=True)
            save()
        if "flood" in args.scenarios:
            scenarios["flood"] = asyncio.run(flood(base_url, args.flood_requests))
            print(f"[flood] {scenarios['flood']}", flush=True)
            save()
        if "flood_floor" in args.scenarios:
            scenarios["flood_floor"] = asyncio.run(flood(base_url, args.flood_requests, floor=True))
            print(f"[flood_floor] {scenarios['flood_floor']}", flush=True)
        result["met"] = {
            "best_of_256": scenarios.get("best_of_256", {}).get("computed_over_unique", 9) <= 1.1,
            "grpo_best_of_n": scenarios.get("grpo_best_of_n", {}).get("computed_over_unique", 9) <= 1.15,
            "grpo_per_response": scenarios.get("grpo_per_response", {}).get("computed_over_unique", 9) <= 1.15,
            "mix": (scenarios.get("mix", {}).get("small_p99_s") or 99) <= 3.0,
            "deadlines": scenarios.get("deadlines", {}).get("answered_after_2_5_s", 1) == 0,
            "flood": scenarios.get("flood", {}).get("p99_s", 99) <= 1.0,
        }
    finally:
        finish(result, args.out, cluster)


if __name__ == "__main__":
    main()
