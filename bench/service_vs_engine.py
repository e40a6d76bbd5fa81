"""CPU benchmark: the reward service over HTTP vs. the engine it wraps, on the demo model.

    python bench/service_vs_engine.py                      # defaults: 192 conversations, concurrency 1 8 64
    python bench/service_vs_engine.py -n 96 -c 1 8 64 --profile

What it measures (tokens are real prompt tokens, exactly what the router scores; no padding counted):

* engine tokens/s: `sharding.engine.MegatronEngine` built directly in this driver (same worker actors,
  same placement-group bundles, same micro-batching) and fed the pre-tokenized conversations, grouped
  in arrival order into batches by the router's token budget (`router.max_tokens_per_batch`). This is
  the best the service could do with that config: no HTTP, no per-request work, full batches.
* service tokens/s: the real app (`serve_app.build_app`) on Serve, `POST /v1/score` with one
  conversation per request, a bounded httpx client at each concurrency level; tokens counted from the
  responses' `num_tokens`.
* ratio = service / engine per concurrency; `service_over_engine` is the ratio at the highest level
  (64 by default; target >= 0.8).

`--profile` adds, for each HTTP pass, the CPU seconds each process role of this Ray instance used
(model worker, router, proxy, ...; the HTTP client is this driver), the model worker's forward count
(= model batches), tokens per forward and busy share (from Ray's task events), and a pass through a
Serve handle (`Router.score`, no HTTP) at the highest concurrency, so HTTP cost and batching cost can be
told apart.

Own Ray instance (`/tmp/ray_bench`, 4 logical CPUs, no dashboard) and Serve on 127.0.0.1:8100, so it
does not touch a service on :8000 or another Ray cluster on the machine. It shuts down only what it
started (`serve.shutdown(); ray.shutdown()`).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import random
import re
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from configs.service import ServiceConfig  # noqa: E402
from deployments.prompt import SentencePieceTokenizer, tokenize_conversation  # noqa: E402
from deployments.schemas import Message  # noqa: E402
from sharding.nemo_archive import NemoCheckpoint  # noqa: E402

DEFAULT_CHECKPOINT = REPO / ".demo" / "nemotron4-tiny-reward"
CORPUS = REPO / "sharding" / "demo_corpus.txt"
LOCAL_YAML = REPO / "configs" / "local.yaml"
HTTP_PORT = 8100
RAY_TEMP_DIR = "/tmp/ray_bench"
SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You are a concise assistant that answers in plain language.",
    "You are a careful assistant. Check facts before answering and say when you are unsure.",
)


# ----------------------------------------------------------------------------------------------------
# Config


def service_args(args: argparse.Namespace) -> dict[str, Any]:
    """The `args` of configs/local.yaml's app, with an absolute checkpoint path and this run's overrides."""
    app = yaml.safe_load(LOCAL_YAML.read_text())["applications"][0]
    cfg = json.loads(json.dumps(app["args"]))
    cfg["checkpoint_path"] = str(Path(args.checkpoint).resolve())
    if args.micro_batch_size is not None:
        cfg.setdefault("parallel", {})["micro_batch_size"] = args.micro_batch_size
    if args.max_tokens_per_batch is not None:
        cfg.setdefault("router", {})["max_tokens_per_batch"] = args.max_tokens_per_batch
    if args.batch_wait_timeout_s is not None:
        cfg.setdefault("router", {})["batch_wait_timeout_s"] = args.batch_wait_timeout_s
    if args.torch_threads is not None:
        cfg.setdefault("runtime", {})["torch_threads_per_worker"] = args.torch_threads
    if args.cpus_per_worker is not None:
        cfg.setdefault("runtime", {})["cpus_per_worker"] = args.cpus_per_worker
    return cfg


def ensure_demo_model(path: Path) -> None:
    if (path / "model_config.yaml").is_file() and (path / "model_weights").is_dir():
        return
    print(f"writing the demo model to {path} ...", flush=True)
    subprocess.run([sys.executable, "-m", "sharding.demo_model", "--if-missing", "--out", str(path)],
                   cwd=REPO, check=True)


# ----------------------------------------------------------------------------------------------------
# Workload: deterministic conversations of realistic lengths


def _corpus() -> tuple[list[tuple[str, str]], list[str]]:
    pairs, other = [], []
    for line in CORPUS.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        m = re.match(r"^User:\s*(.+?)\s*Assistant:\s*(.+)$", line)
        if m:
            pairs.append((m.group(1), m.group(2)))
        else:
            other.append(line)
    return pairs, other


def _num_tokens(messages: list[dict[str, str]], tokenizer: SentencePieceTokenizer) -> int:
    msgs = [Message(**m) for m in messages]
    return tokenize_conversation(msgs, tokenizer, max_tokens=1 << 30).num_tokens


def build_conversations(n: int, seed: int, tokenizer: SentencePieceTokenizer, lo: int, hi: int
                        ) -> list[list[dict[str, str]]]:
    """`n` conversations whose prompt lengths are drawn uniformly in [lo, hi] tokens (the shortest
    possible prompt caps the low end): an optional system message, then user/assistant turns drawn from
    the demo corpus (Q&A pairs; user turns sometimes quote a note or a foreign-language line), the last
    assistant turn cut word by word to land on the drawn length."""
    rng = random.Random(seed)
    pairs, other = _corpus()
    conversations = []
    for _ in range(n):
        target = rng.randint(lo, hi)
        messages: list[dict[str, str]] = []
        if rng.random() < 0.3:
            messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        while True:
            user, assistant = rng.choice(pairs)
            if rng.random() < 0.25:
                user = f"{rng.choice(other)}\n\n{user}"
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
            if _num_tokens(messages, tokenizer) >= target:
                break
        words = messages[-1]["content"].split(" ")
        lo_w, hi_w = 1, len(words)  # the largest word count whose prompt is <= target (at least one word)
        while lo_w < hi_w:
            mid = (lo_w + hi_w + 1) // 2
            messages[-1]["content"] = " ".join(words[:mid])
            if _num_tokens(messages, tokenizer) <= target:
                lo_w = mid
            else:
                hi_w = mid - 1
        messages[-1]["content"] = " ".join(words[:lo_w])
        conversations.append(messages)
    return conversations


def budget_batches(token_lists: list[list[int]], budget: int) -> list[list[list[int]]]:
    """Arrival-order batches under a token budget, filled the way the router's queue fills them."""
    batches: list[list[list[int]]] = []
    current: list[list[int]] = []
    size = 0
    for ids in token_lists:
        if current and size + len(ids) > budget:
            batches.append(current)
            current, size = [], 0
        current.append(ids)
        size += len(ids)
    if current:
        batches.append(current)
    return batches


def padded_tokens(batch: list[list[int]], micro_batch_size: int) -> int:
    """Tokens the model computes for a batch after the engine's length sort and per-micro-batch padding."""
    lengths = sorted((len(t) for t in batch), reverse=True)
    return sum(max(lengths[i:i + micro_batch_size]) * len(lengths[i:i + micro_batch_size])
               for i in range(0, len(lengths), micro_batch_size))


# ----------------------------------------------------------------------------------------------------
# Profiling helpers (this Ray instance's processes only: the driver's process tree)


def _role(cmdline: list[str], name: str) -> str:
    title = cmdline[0] if cmdline else name
    if title.startswith("ray::"):
        title = title[5:]
        if title.startswith("ServeReplica:"):
            return "replica:" + title.split(":")[-1].split(".")[0]
        return title.split(".")[0]
    if "gcs_server" in name or "gcs_server" in title:
        return "gcs_server"
    if "raylet" in name or "raylet" in title:
        return "raylet"
    return "other:" + name


class CpuSampler:
    """CPU seconds (user+system) per role over an interval, for the driver and its descendants."""

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self._start: dict[int, tuple[str, float]] = {}

    def _snapshot(self) -> dict[int, tuple[str, float]]:
        psutil = self._psutil
        me = psutil.Process(os.getpid())
        out = {}
        for proc in [me, *me.children(recursive=True)]:
            try:
                role = "driver (HTTP client)" if proc.pid == me.pid else _role(proc.cmdline(), proc.name())
                t = proc.cpu_times()
                out[proc.pid] = (role, t.user + t.system)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        return out

    def start(self) -> None:
        self._start = self._snapshot()

    def stop(self) -> dict[str, float]:
        end = self._snapshot()
        by_role: dict[str, float] = defaultdict(float)
        for pid, (role, cpu) in end.items():
            role0, cpu0 = self._start.get(pid, (role, 0.0))
            if role0.startswith("IDLE") or role0.startswith("other"):
                role0 = role
            by_role[role0] += cpu - cpu0
        return {k: round(v, 3) for k, v in sorted(by_role.items(), key=lambda kv: -kv[1]) if v >= 0.005}


_ACCESS_LINE = re.compile(r"^INFO (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .* CALL score OK ([\d.]+)ms")


def model_calls(since_s: float, until_s: float) -> list[tuple[float, float]] | None:
    """(start, end) wall times of `RewardModelDeployment.score` calls (= model batches) that ended in
    [since_s, until_s], read from the model replica's Serve access log in this Ray instance's session
    (no dashboard or state API needed). None when the log is not there."""
    logs = sorted(Path(RAY_TEMP_DIR, "session_latest", "logs", "serve").glob("replica_reward_RewardModelDeployment_*.log"))
    if not logs:
        return None
    spans = []
    for log in logs:
        for line in log.read_text(errors="replace").splitlines():
            m = _ACCESS_LINE.match(line)
            if not m:
                continue
            end = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            if since_s <= end <= until_s + 0.5:
                spans.append((end - float(m.group(2)) / 1000.0, end))
    return sorted(spans)


def _union_s(spans: list[tuple[float, float]]) -> float:
    total, cur_s, cur_e = 0.0, None, None
    for s, e in spans:
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    return total + ((cur_e - cur_s) if cur_e is not None else 0.0)


# ----------------------------------------------------------------------------------------------------
# Engine measurement


def _torch_threads(_actor) -> dict[str, Any]:
    import torch

    return {"torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}


def measure_engine(config: ServiceConfig, token_lists: list[list[int]], reps: int, profile: bool = False
                   ) -> dict[str, Any]:
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from sharding.engine import MegatronEngine
    from sharding.placement import placement_for

    plan = placement_for(config)
    pg = placement_group(plan.bundles, strategy=plan.strategy)
    ray.get(pg.ready(), timeout=120)
    t0 = time.perf_counter()
    engine = MegatronEngine(config, pg)
    setup_s = time.perf_counter() - t0
    worker_threads = ray.get(engine.workers[0].__ray_call__.remote(_torch_threads))
    batches = budget_batches(token_lists, config.router.max_tokens_per_batch)
    total = sum(len(t) for t in token_lists)
    padded = sum(padded_tokens(b, config.parallel.micro_batch_size) for b in batches)

    async def run() -> list[float]:
        for batch in batches[: max(1, min(2, len(batches)))]:  # warm-up
            await engine.score(batch)
        if sampler:
            sampler.start()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            for batch in batches:
                out = await engine.score(batch)
                assert out.shape == (len(batch), len(config.scoring.attribute_names)), out.shape
            times.append(time.perf_counter() - t)
        return times

    sampler = CpuSampler() if profile else None
    try:
        times = asyncio.run(run())
        cpu = sampler.stop() if sampler else None
    finally:
        engine.shutdown()
        remove_placement_group(pg)
    best, median = min(times), statistics.median(times)
    return {
        "tokens": total,
        "padded_tokens": padded,
        "padding_overhead": round(padded / total - 1, 4),
        "batches": len(batches),
        "mean_tokens_per_batch": round(total / len(batches), 1),
        "reps_s": [round(t, 3) for t in times],
        "tokens_per_s": round(total / median, 1),
        "tokens_per_s_best": round(total / best, 1),
        "setup_s": round(setup_s, 2),
        "worker": worker_threads,
        **({"cpu_s_by_role": cpu, "worker_cpu_share": round(cpu.get("ModelWorker", 0.0) / sum(times), 3)}
           if cpu else {}),
    }


# ----------------------------------------------------------------------------------------------------
# Service measurement


async def http_pass(conversations: list[list[dict[str, str]]], concurrency: int, base_url: str
                    ) -> dict[str, Any]:
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    latencies: list[float] = []
    tokens = 0
    errors: list[str] = []
    queue = list(range(len(conversations)))[::-1]

    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=600.0) as client:
        async def worker() -> None:
            nonlocal tokens
            while queue:
                i = queue.pop()
                t = time.perf_counter()
                r = await client.post("/v1/score", json={"conversations": [{"messages": conversations[i]}]})
                latencies.append(time.perf_counter() - t)
                if r.status_code != 200:
                    errors.append(f"{r.status_code}: {r.text[:200]}")
                    continue
                tokens += sum(res["num_tokens"] for res in r.json()["results"])

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed at concurrency {concurrency}; first: {errors[0]}")
    latencies.sort()
    return {
        "concurrency": concurrency,
        "requests": len(conversations),
        "tokens": tokens,
        "wall_s": round(wall, 3),
        "tokens_per_s": round(tokens / wall, 1),
        "requests_per_s": round(len(conversations) / wall, 2),
        "latency_p50_ms": round(1000 * latencies[len(latencies) // 2], 1),
        "latency_p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 1),
    }


async def handle_pass(conversations: list[list[dict[str, str]]], concurrency: int) -> dict[str, Any]:
    """Same as http_pass, through a Serve handle to `Router.score` (no proxy, no HTTP/JSON)."""
    from ray import serve

    handle = serve.get_app_handle("reward")
    queue = list(range(len(conversations)))[::-1]
    tokens = 0

    async def worker() -> None:
        nonlocal tokens
        while queue:
            i = queue.pop()
            out = await handle.score.remote({"conversations": [{"messages": conversations[i]}]})
            tokens += sum(res["num_tokens"] for res in out["results"])

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    return {"concurrency": concurrency, "tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 1)}


def profiled(fn, *a, profile: bool) -> dict[str, Any]:
    """Runs `fn(*a)` (a coroutine function); with `profile`, adds the CPU seconds per process role, the
    model worker's busy share (its CPU seconds / wall: it computes on one thread), and the model calls
    (batches) the router made, from the model replica's access log."""
    sampler = CpuSampler() if profile else None
    if sampler:
        sampler.start()
    t0 = time.time()
    result = asyncio.run(fn(*a))
    t1 = time.time()
    if not sampler:
        return result
    wall = result["wall_s"]
    cpu = sampler.stop()
    result["cpu_s_by_role"] = cpu
    result["cpu_cores_used"] = round(sum(cpu.values()) / wall, 2)
    result["worker_cpu_share"] = round(cpu.get("ModelWorker", 0.0) / wall, 3)
    time.sleep(1.0)  # access-log lines are written asynchronously
    spans = model_calls(t0, t1)
    if spans:
        result["model_calls"] = len(spans)
        result["tokens_per_model_call"] = round(result["tokens"] / len(spans), 1)
        result["conversations_per_model_call"] = round(len(a[0]) / len(spans), 2)
        result["model_replica_busy_share"] = round(_union_s(spans) / wall, 3)
    return result


# ----------------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "sched_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["driver_torch_threads"] = torch.get_num_threads()
    except Exception:  # noqa: BLE001
        pass
    import ray

    info["ray"] = ray.__version__
    return info


def print_table(engine: dict[str, Any], service: list[dict[str, Any]]) -> None:
    e = engine["tokens_per_s"]
    print()
    print(f"{'path':<26}{'tokens/s':>12}{'ratio':>8}{'req/s':>9}{'p50 ms':>10}{'p99 ms':>10}")
    print(f"{'engine (direct, batched)':<26}{e:>12,.1f}{1.0:>8.2f}{'':>9}{'':>10}{'':>10}")
    for s in service:
        print(f"{'service HTTP c=' + str(s['concurrency']):<26}{s['tokens_per_s']:>12,.1f}"
              f"{s['tokens_per_s'] / e:>8.2f}{s['requests_per_s']:>9.2f}{s['latency_p50_ms']:>10.1f}"
              f"{s['latency_p99_ms']:>10.1f}")
    print()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--num-conversations", type=int, default=192)
    p.add_argument("-c", "--concurrency", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-tokens", type=int, default=50)
    p.add_argument("--max-tokens", type=int, default=600)
    p.add_argument("--engine-reps", type=int, default=3, help="Timed passes over all batches (median used).")
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "service_vs_engine.json"))
    p.add_argument("--profile", action="store_true",
                   help="CPU by process role, forward count/busy share per pass, and a handle (no HTTP) pass.")
    g = p.add_argument_group("config overrides (default: configs/local.yaml)")
    g.add_argument("--micro-batch-size", type=int)
    g.add_argument("--max-tokens-per-batch", type=int)
    g.add_argument("--batch-wait-timeout-s", type=float)
    g.add_argument("--torch-threads", type=int, help="runtime.torch_threads_per_worker")
    g.add_argument("--cpus-per-worker", type=float, help="runtime.cpus_per_worker")
    args = p.parse_args()

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.pop("RAY_ADDRESS", None)
    ensure_demo_model(Path(args.checkpoint))
    cfg_args = service_args(args)
    config = ServiceConfig.model_validate(cfg_args)
    checkpoint = NemoCheckpoint.open(config.checkpoint_path)
    config.check_against(checkpoint.arch)
    tokenizer = SentencePieceTokenizer(checkpoint.tokenizer_path)
    limit = config.max_input_tokens(checkpoint.arch)

    t = time.perf_counter()
    conversations = build_conversations(args.num_conversations, args.seed, tokenizer, args.min_tokens,
                                        args.max_tokens)
    build_s = time.perf_counter() - t
    t = time.perf_counter()
    token_lists = [tokenize_conversation([Message(**m) for m in conv], tokenizer, max_tokens=limit).token_ids
                   for conv in conversations]
    tokenize_ms = 1000 * (time.perf_counter() - t) / len(conversations)
    lengths = [len(t) for t in token_lists]
    total_tokens = sum(lengths)
    print(f"{len(conversations)} conversations, {total_tokens} tokens, length min/median/max "
          f"{min(lengths)}/{int(statistics.median(lengths))}/{max(lengths)} (built in {build_s:.1f}s; "
          f"router-style tokenization {tokenize_ms:.2f} ms/conversation in this process)", flush=True)

    import ray
    from ray import serve

    info = machine_info()
    ray.init(address="local", _temp_dir=RAY_TEMP_DIR, num_cpus=4, include_dashboard=False,
             logging_level="ERROR", log_to_driver=False)
    result: dict[str, Any] = {}
    try:
        print("engine: building workers and timing ...", flush=True)
        engine = measure_engine(config, token_lists, args.engine_reps, profile=args.profile)
        print(f"engine: {engine['tokens_per_s']:,.1f} tokens/s over {engine['batches']} batches "
              f"(passes {engine['reps_s']} s; padding +{100 * engine['padding_overhead']:.1f}%; "
              f"worker {engine['worker']})", flush=True)

        from serve_app import build_app

        serve.start(http_options={"host": "127.0.0.1", "port": HTTP_PORT})
        t = time.perf_counter()
        serve.run(build_app(cfg_args), name="reward", route_prefix="/")
        print(f"service: deployed in {time.perf_counter() - t:.1f}s", flush=True)
        base_url = f"http://127.0.0.1:{HTTP_PORT}"
        warm = conversations[: min(len(conversations), 32)]
        asyncio.run(http_pass(warm, 8, base_url))  # warm-up: connections, worker allocations

        service = []
        for c in args.concurrency:
            r = profiled(http_pass, conversations, c, base_url, profile=args.profile)
            if r["tokens"] != total_tokens:
                raise RuntimeError(f"service scored {r['tokens']} tokens; the pre-tokenized set has "
                                   f"{total_tokens}: tokenization differs")
            r["ratio"] = round(r["tokens_per_s"] / engine["tokens_per_s"], 3)
            print(f"service c={c}: {r['tokens_per_s']:,.1f} tokens/s (ratio {r['ratio']:.2f})"
                  + (f" {json.dumps({k: v for k, v in r.items() if k not in ('concurrency', 'tokens')})}"
                     if args.profile else ""), flush=True)
            service.append(r)
        handle = None
        if args.profile:
            c = max(args.concurrency)
            handle = profiled(handle_pass, conversations, c, profile=True)
            handle["ratio"] = round(handle["tokens_per_s"] / engine["tokens_per_s"], 3)
            print(f"handle (no HTTP) c={c}: {json.dumps(handle)}", flush=True)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()

    print_table(engine, service)
    top = max(service, key=lambda s: s["concurrency"])
    result = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "engine_tokens_per_s": engine["tokens_per_s"],
        "service_tokens_per_s": {str(s["concurrency"]): s["tokens_per_s"] for s in service},
        "ratio_service_over_engine": {str(s["concurrency"]): s["ratio"] for s in service},
        "service_over_engine": top["ratio"],
        "service_over_engine_concurrency": top["concurrency"],
        "target": 0.8,
        "meets_target": top["ratio"] >= 0.8,
        "engine": engine,
        "service": service,
        "handle_no_http": handle,
        "workload": {
            "conversations": len(conversations), "seed": args.seed, "tokens": total_tokens,
            "length_min": min(lengths), "length_median": statistics.median(lengths), "length_max": max(lengths),
            "length_range_requested": [args.min_tokens, args.max_tokens],
            "router_style_tokenize_ms_per_conversation": round(tokenize_ms, 3),
        },
        "config": cfg_args,
        "config_overrides": {k: getattr(args, k) for k in
                             ("micro_batch_size", "max_tokens_per_batch", "batch_wait_timeout_s",
                              "torch_threads", "cpus_per_worker") if getattr(args, k) is not None},
        "machine": {**info, "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
                    "worker_torch_threads": engine["worker"]["torch_threads"]},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"service_over_engine (c={top['concurrency']}) = {top['ratio']:.3f} (target >= 0.8); wrote {out}")


if __name__ == "__main__":
    main()
