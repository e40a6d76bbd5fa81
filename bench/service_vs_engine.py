"""CPU benchmark: the reward service over HTTP vs. the engine it wraps, on the demo model.

    python bench/service_vs_engine.py                         # 192 conversations, concurrency 1 8 64
    python bench/service_vs_engine.py --profile               # + where the time goes
    python bench/service_vs_engine.py --batch-layout padded  # padded micro-batches instead of the forest
    python bench/service_vs_engine.py --model-worker-cores 1  # the model worker on a core of its own

Config: configs/local.yaml's app args (the forest batch layout), with the overrides below.

What it measures (tokens are real prompt tokens, exactly what the router scores; padding never counts):

* engine tokens/s: `sharding.engine.MegatronEngine` built directly in this driver (same worker actors,
  same placement-group bundles, same micro-batching) fed the pre-tokenized conversations, grouped in
  arrival order into batches by the router's token budget (`router.max_tokens_per_batch`), kept
  `max_batches_in_flight` at a time (the engine streams). This is the best the service could do with that
  config: no HTTP, no per-request work, full batches. The engine
  stays up beside the service and is re-timed before and after every HTTP pass.
* service tokens/s: the real app (`serve_app.build_app`) on Serve, `POST /v1/score` with one
  conversation per request, a bounded httpx client at each concurrency level; tokens counted from the
  responses' `num_tokens` (checked against the pre-tokenized total).
* ratio = service tokens/s / mean of the engine passes just before and after that HTTP pass (the
  machine is shared, so its free CPU drifts); `service_over_engine` is the ratio at the highest level
  (64 by default); targets >= 0.9 at concurrency 64 and >= 0.85 at 8.
* latency at concurrency 1: the HTTP p50 over the p50 of one engine forward per conversation, alone
  (target <= 1.3); and what each layer of the request path adds at c=1 (bench/request_path.py).
* `--model-worker-cores N`: the model workers on N cores of their own, everything else on the rest (the
  accelerator stand-in, bench/request_path.py); recorded as `model_worker_cores` in the JSON.

`--profile` adds, per HTTP pass: CPU seconds of each process role of this Ray instance (worker,
router, proxy, scoring, ...; the HTTP client is this driver), the worker compute thread's on-CPU /
run-queue-wait / idle shares (from /proc schedstat), real tokens per worker CPU-second relative to the
engine's, and the model calls the router made (from the model replica's Serve access log); then a pass
through a Serve handle (`Router.score`, no HTTP) and an engine pass on the service's batch shape, so
HTTP cost, batching cost and CPU contention can be told apart.

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
from sharding.micro_batches import computed_tokens  # noqa: E402
from sharding.checkpoints.nemo import NemoCheckpoint  # noqa: E402
from bench.request_path import client_at_worker_niceness, hop_latencies, paired_latency, split_cores  # noqa: E402

DEFAULT_CHECKPOINT = REPO / ".demo" / "nemotron4-tiny-reward"
CORPUS = REPO / "demo" / "corpus.txt"
LOCAL_YAML = REPO / "configs" / "local.yaml"
HTTP_PORT = 8100
RAY_TEMP_DIR = "/tmp/ray_bench"
TARGETS = {"64": 0.9, "8": 0.85}  # service_over_engine by concurrency
LATENCY_C1_TARGET = 1.3  # p50 latency at concurrency 1 over one engine forward
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
    if args.batch_layout is not None:
        cfg.setdefault("parallel", {})["batch_layout"] = args.batch_layout
    if args.max_tokens_per_micro_batch is not None:
        cfg.setdefault("parallel", {})["max_tokens_per_micro_batch"] = args.max_tokens_per_micro_batch
    if args.max_tokens_per_batch is not None:
        cfg.setdefault("router", {})["max_tokens_per_batch"] = args.max_tokens_per_batch
    if args.max_batches_in_flight is not None:
        cfg.setdefault("router", {})["max_batches_in_flight"] = args.max_batches_in_flight
    if args.torch_threads is not None:
        cfg.setdefault("runtime", {})["torch_threads_per_worker"] = args.torch_threads
    if args.cpus_per_worker is not None:
        cfg.setdefault("runtime", {})["cpus_per_worker"] = args.cpus_per_worker
    return cfg


def ensure_demo_model(path: Path) -> None:
    if (path / "model_config.yaml").is_file() and (path / "model_weights").is_dir():
        return
    print(f"writing the demo model to {path} ...", flush=True)
    subprocess.run([sys.executable, "-m", "demo", "--if-missing", "--out", str(path)],
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


def _thread_schedstats(pid: int) -> dict[int, tuple[float, float]]:
    """tid -> (on-CPU seconds, runnable-but-waiting-for-a-CPU seconds) for each thread of a process."""
    out = {}
    for stat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
        try:
            r, w, _ = stat.read_text().split()
            out[int(stat.parent.name)] = (int(r) / 1e9, int(w) / 1e9)
        except (OSError, ValueError):
            continue
    return out


class CpuSampler:
    """Over an interval, for the driver and its descendants (this Ray instance only), from /proc schedstat:
    CPU seconds per process role, and for the model worker's busiest thread (the one running the
    forward) its CPU seconds and its run-queue wait (runnable, but no CPU free: contention)."""

    def __init__(self) -> None:
        import psutil

        self._psutil = psutil
        self._start: dict[int, tuple[str, dict[int, tuple[float, float]]]] = {}

    def _snapshot(self) -> dict[int, tuple[str, dict[int, tuple[float, float]]]]:
        psutil = self._psutil
        me = psutil.Process(os.getpid())
        out = {}
        for proc in [me, *me.children(recursive=True)]:
            try:
                role = "driver (HTTP client)" if proc.pid == me.pid else _role(proc.cmdline(), proc.name())
                out[proc.pid] = (role, _thread_schedstats(proc.pid))
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                pass
        return out

    def start(self) -> None:
        self._start = self._snapshot()

    def stop(self) -> dict[str, float]:
        """CPU seconds by role; the worker's busiest thread is in `self.worker_thread` (cpu_s, wait_s)."""
        end = self._snapshot()
        cpu: dict[str, float] = defaultdict(float)
        self.worker_thread = (0.0, 0.0)
        for pid, (role, threads) in end.items():
            role0, threads0 = self._start.get(pid, (role, {}))
            if role0.startswith("IDLE") or role0.startswith("other"):
                role0 = role
            for tid, (run, wait) in threads.items():
                run0, wait0 = threads0.get(tid, (0.0, 0.0))
                cpu[role0] += run - run0
                if role0 == "ModelWorker" and run - run0 > self.worker_thread[0]:
                    self.worker_thread = (run - run0, wait - wait0)
        return {k: round(v, 3) for k, v in sorted(cpu.items(), key=lambda kv: -kv[1]) if v >= 0.005}


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


class EngineBench:
    """A MegatronEngine built directly in this driver (its own placement group, same bundles as the
    model deployment's), kept alive beside the service so engine passes can be interleaved with the HTTP
    passes: each service number is compared with engine passes run just before and after it, which
    keeps a busy shared machine from biasing the ratio."""

    def __init__(self, config: ServiceConfig):
        import ray
        from ray.util.placement_group import placement_group

        from sharding.engine import MegatronEngine
        from sharding.placement import placement_for

        self.config = config
        plan = placement_for(config)
        self.pg = placement_group(plan.bundles, strategy=plan.strategy)
        ray.get(self.pg.ready(), timeout=120)
        t0 = time.perf_counter()
        self.engine = MegatronEngine(config, self.pg)
        self.setup_s = time.perf_counter() - t0

        def torch_threads(_actor) -> dict[str, Any]:  # nested: pickled by value, runs in the worker
            import os

            import torch

            return {"torch_threads": torch.get_num_threads(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}

        self.worker = ray.get(self.engine.workers[0].__ray_call__.remote(torch_threads))

    def run(self, batches: list[list[list[int]]], profile: bool = False) -> dict[str, Any]:
        """One timed pass over `batches`, `max_batches_in_flight` of them submitted at a time (the engine
        streams, as the router feeds it); tokens/s of real tokens."""
        num_attributes = len(self.config.scoring.attribute_names)
        queue = list(range(len(batches)))[::-1]

        async def feeder() -> None:
            while queue:
                batch = batches[queue.pop()]
                out = await self.engine.score(batch)
                assert out.shape == (len(batch), num_attributes), out.shape

        async def go() -> float:
            t = time.perf_counter()
            await asyncio.gather(*(feeder() for _ in range(self.config.max_batches_in_flight)))
            return time.perf_counter() - t

        sampler = CpuSampler() if profile else None
        if sampler:
            sampler.start()
        load = os.getloadavg()[0]
        wall = asyncio.run(go())
        tokens = sum(len(t) for b in batches for t in b)
        out = {"tokens": tokens, "batches": len(batches), "wall_s": round(wall, 3),
               "tokens_per_s": round(tokens / wall, 1), "loadavg_1m": round(load, 2)}
        if sampler:
            sampler.stop()
            out["worker_cpu_share"] = round(sampler.worker_thread[0] / wall, 3)
            out["worker_runqueue_wait_share"] = round(sampler.worker_thread[1] / wall, 3)
            run = sampler.worker_thread[0]
            out["tokens_per_worker_cpu_s"] = round(tokens / run, 1) if run else None
        return out

    def single_forwards_ms(self, token_lists: list[list[int]]) -> list[float]:
        """Wall time of one engine forward per conversation, alone (one call at a time)."""

        async def go() -> list[float]:
            times = []
            for ids in token_lists:
                t = time.perf_counter()
                await self.engine.score([ids])
                times.append(1000 * (time.perf_counter() - t))
            return times

        return asyncio.run(go())

    def close(self) -> None:
        from ray.util.placement_group import remove_placement_group

        self.engine.shutdown()
        remove_placement_group(self.pg)


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
    latencies: list[float] = []
    tokens = 0

    async def worker() -> None:
        nonlocal tokens
        while queue:
            i = queue.pop()
            t = time.perf_counter()
            out = await handle.score.remote({"conversations": [{"messages": conversations[i]}]})
            latencies.append(time.perf_counter() - t)
            tokens += sum(res["num_tokens"] for res in out["results"])

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - t0
    latencies.sort()
    return {"concurrency": concurrency, "requests": len(conversations), "tokens": tokens,
            "wall_s": round(wall, 3), "tokens_per_s": round(tokens / wall, 1),
            "requests_per_s": round(len(conversations) / wall, 2),
            "latency_p50_ms": round(1000 * latencies[len(latencies) // 2], 1),
            "latency_p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 1)}


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
    run, wait = sampler.worker_thread
    result["worker_cpu_share"] = round(run / wall, 3)
    result["worker_runqueue_wait_share"] = round(wait / wall, 3)
    result["worker_idle_share"] = round(max(0.0, 1 - (run + wait) / wall), 3)
    result["tokens_per_worker_cpu_s"] = round(result["tokens"] / run, 1) if run else None
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


def print_table(engine_tps: float, service: list[dict[str, Any]], handle: dict[str, Any] | None) -> None:
    print()
    print(f"{'path':<28}{'tokens/s':>11}{'ratio':>8}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'convs/batch':>13}")
    print(f"{'engine (direct, median)':<28}{engine_tps:>11,.1f}{1.0:>8.2f}")
    for r in [*service, *([handle] if handle else [])]:
        name = ("handle (no HTTP) c=" if r is handle else "service HTTP c=") + str(r["concurrency"])
        print(f"{name:<28}{r['tokens_per_s']:>11,.1f}{r['ratio']:>8.2f}{r['requests_per_s']:>8.2f}"
              f"{r['latency_p50_ms']:>9.1f}{r['latency_p99_ms']:>9.1f}"
              f"{r.get('conversations_per_model_call', float('nan')):>13.2f}")
    print("ratio = service tokens/s / mean of the engine passes run just before and after it")
    print()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--num-conversations", type=int, default=192)
    p.add_argument("-c", "--concurrency", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-tokens", type=int, default=50)
    p.add_argument("--max-tokens", type=int, default=600)
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "service_vs_engine.json"))
    p.add_argument("--profile", action="store_true",
                   help="Per pass: CPU by process role, the worker's on-CPU/run-queue/idle shares, model calls "
                        "and batch sizes; plus a handle (no HTTP) pass and an engine pass on the service's batch shape.")
    p.add_argument("--model-worker-cores", type=int, default=0,
                   help="Pin the model workers to the last N cores and every other process of this Ray instance "
                        "(HTTP client included) to the others: the accelerator stand-in (bench/request_path.py). "
                        "0 (default): everything shares every core.")
    g = p.add_argument_group("config: configs/local.yaml's app args with these overrides")
    g.add_argument("--batch-layout", choices=["forest", "padded"], help="parallel.batch_layout")
    g.add_argument("--max-tokens-per-micro-batch", type=int, help="parallel.max_tokens_per_micro_batch")
    g.add_argument("--max-tokens-per-batch", type=int)
    g.add_argument("--max-batches-in-flight", type=int, help="router.max_batches_in_flight")
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
    info["niceness"] = client_at_worker_niceness()
    batches = budget_batches(token_lists, config.router.max_tokens_per_batch)
    padded = sum(computed_tokens(b, config.parallel) for b in batches)
    engine_passes: list[dict[str, Any]] = []
    service: list[dict[str, Any]] = []
    handle = None
    small_batches = None
    bench = None

    core_split = None

    def pin() -> None:
        nonlocal core_split
        if args.model_worker_cores:
            core_split = split_cores(args.model_worker_cores, lambda proc: _role(proc.cmdline(), proc.name()))

    def engine_pass(label: str) -> dict[str, Any]:
        pin()
        r = {"label": label, **bench.run(batches, profile=args.profile)}
        engine_passes.append(r)
        print(f"engine pass ({label}): {r['tokens_per_s']:,.1f} tokens/s in {r['wall_s']:.2f}s"
              + (f", worker CPU share {r['worker_cpu_share']}, run-queue wait share "
                 f"{r['worker_runqueue_wait_share']}" if "worker_cpu_share" in r else "")
              + f" (load {r['loadavg_1m']})", flush=True)
        return r

    def compare(r: dict[str, Any], before: dict[str, Any], after: dict[str, Any]) -> None:
        ref = (before["tokens_per_s"] + after["tokens_per_s"]) / 2
        r["engine_tokens_per_s_adjacent"] = round(ref, 1)
        r["ratio"] = round(r["tokens_per_s"] / ref, 3)
        cpu_eff = [x.get("tokens_per_worker_cpu_s") for x in (r, before, after)]
        if all(cpu_eff):
            # Contention-free view: real tokens per CPU-second of the worker's compute thread, service over
            # engine. Below 1 = the service's batches cost more compute per token (shape, padding, calls);
            # the rest of the gap is the worker getting less CPU (run-queue wait) or idling.
            r["ratio_per_worker_cpu_s"] = round(cpu_eff[0] / ((cpu_eff[1] + cpu_eff[2]) / 2), 3)

    try:
        print(f"engine: building workers ({len(batches)} budget batches of "
              f"<= {config.router.max_tokens_per_batch} tokens; {config.parallel.batch_layout} micro-batches of "
              f"<= {config.parallel.max_tokens_per_micro_batch} tokens compute {padded - total_tokens:+d} tokens, "
              f"+{100 * (padded / total_tokens - 1):.1f}%) ...", flush=True)
        bench = EngineBench(config)
        bench.run(batches[:2])  # warm-up
        print(f"engine: ready in {bench.setup_s:.1f}s, worker {bench.worker}", flush=True)

        from serve_app import build_app

        serve.start(http_options={"host": "127.0.0.1", "port": HTTP_PORT})
        t = time.perf_counter()
        serve.run(build_app(cfg_args), name="reward", route_prefix="/")
        print(f"service: deployed in {time.perf_counter() - t:.1f}s", flush=True)
        base_url = f"http://127.0.0.1:{HTTP_PORT}"
        asyncio.run(http_pass(conversations[: min(len(conversations), 32)], 8, base_url))  # warm-up

        pin()
        forwards_ms = bench.single_forwards_ms(token_lists)
        single_forward_p50_ms = round(statistics.median(forwards_ms), 1)
        print(f"engine: one forward per conversation, alone: p50 {single_forward_p50_ms} ms", flush=True)
        hops = asyncio.run(hop_latencies(conversations[:64], token_lists[:64], bench.engine, base_url))
        print(f"request path at c=1 (p50 ms, first 64 conversations): {json.dumps(hops)}", flush=True)
        paired = asyncio.run(paired_latency(conversations[:64], token_lists[:64], bench.engine, base_url))
        print(f"c=1, engine forward and HTTP request per conversation, back to back: {json.dumps(paired)}", flush=True)
        before = engine_pass("start")
        for c in args.concurrency:
            pin()
            r = profiled(http_pass, conversations, c, base_url, profile=args.profile)
            if r["tokens"] != total_tokens:
                raise RuntimeError(f"service scored {r['tokens']} tokens; the pre-tokenized set has "
                                   f"{total_tokens}: tokenization differs")
            after = engine_pass(f"after c={c}")
            compare(r, before, after)
            before = after
            extra = {k: v for k, v in r.items() if k not in ("concurrency", "tokens", "requests", "ratio")}
            print(f"service c={c}: {r['tokens_per_s']:,.1f} tokens/s, ratio {r['ratio']:.3f} "
                  f"{json.dumps(extra)}", flush=True)
            service.append(r)
        if args.profile:
            c = max(args.concurrency)
            pin()
            handle = profiled(handle_pass, conversations, c, profile=True)
            compare(handle, before, engine_pass("after handle pass"))
            print(f"handle (no HTTP) c={c}: {json.dumps(handle)}", flush=True)
            top = max(service, key=lambda s: s["concurrency"])
            k = max(1, round(top.get("conversations_per_model_call", 1)))
            chunks = [token_lists[i:i + k] for i in range(0, len(token_lists), k)]
            r = bench.run(chunks, profile=True)
            small_batches = {"conversations_per_batch": k, **r,
                             "padded_tokens": sum(computed_tokens(b, config.parallel) for b in chunks),
                             "vs_budget_batches": round(r["tokens_per_s"] / engine_passes[-1]["tokens_per_s"], 3)}
            print(f"engine on the service's batch shape ({k} conversations a batch, as at c={c}): "
                  f"{json.dumps(small_batches)}", flush=True)
    finally:
        try:
            if bench is not None:
                bench.close()
            serve.shutdown()
        finally:
            ray.shutdown()

    if not service:
        raise SystemExit("no service pass completed")
    engine_tps = round(statistics.median(p["tokens_per_s"] for p in engine_passes), 1)
    print_table(engine_tps, service, handle)
    top = max(service, key=lambda s: s["concurrency"])
    ratios = {str(s["concurrency"]): s["ratio"] for s in service}
    c1 = next((s for s in service if s["concurrency"] == 1), None)
    result = {
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "engine_tokens_per_s": engine_tps,
        "service_tokens_per_s": {str(s["concurrency"]): s["tokens_per_s"] for s in service},
        "ratio_service_over_engine": {str(s["concurrency"]): s["ratio"] for s in service},
        "ratio_vs_median_engine": {str(s["concurrency"]): round(s["tokens_per_s"] / engine_tps, 3) for s in service},
        "service_over_engine": top["ratio"],
        "service_over_engine_concurrency": top["concurrency"],
        "targets": TARGETS,
        "meets_targets": {c: ratios.get(c, 0.0) >= t for c, t in TARGETS.items()},
        "ratio_method": ("service tokens/s over the mean of the engine passes run just before and after it; an "
                         "engine pass keeps router.max_batches_in_flight budget batches in flight"),
        "engine_single_forward_p50_ms": single_forward_p50_ms,
        "latency_c1_p50_ms": c1["latency_p50_ms"] if c1 else None,
        "latency_c1_p50_over_engine_forward": round(c1["latency_p50_ms"] / single_forward_p50_ms, 3) if c1 else None,
        "latency_c1_target": LATENCY_C1_TARGET,
        "latency_method": ("p50 of the HTTP request latency at concurrency 1 over the p50 of one engine.score call "
                           "per conversation (the same conversations, alone, from this driver)"),
        "latency_c1_paired": paired,
        "latency_c1_paired_method": ("per conversation (the first 64), one engine.score call and one POST /v1/score "
                                     "back to back, alternating which goes first; median of the per-conversation "
                                     "ratios (no drift between two blocks of measurements)"),
        "request_path_c1": hops,
        "model_worker_cores": core_split,
        "engine": {
            "passes": engine_passes,
            "batches": len(batches),
            "mean_tokens_per_batch": round(total_tokens / len(batches), 1),
            "padded_tokens": padded,
            "padding_overhead": round(padded / total_tokens - 1, 4),
            "setup_s": round(bench.setup_s, 2),
            "worker": bench.worker,
        },
        "service": service,
        "handle_no_http": handle,
        "engine_on_service_batch_shape": small_batches,
        "workload": {
            "conversations": len(conversations), "seed": args.seed, "tokens": total_tokens,
            "length_min": min(lengths), "length_median": statistics.median(lengths), "length_max": max(lengths),
            "length_range_requested": [args.min_tokens, args.max_tokens],
            "router_style_tokenize_ms_per_conversation": round(tokenize_ms, 3),
        },
        "config": cfg_args,
        "config_overrides": {k: getattr(args, k) for k in
                             ("batch_layout", "max_tokens_per_micro_batch", "max_tokens_per_batch", "max_batches_in_flight",
                              "torch_threads", "cpus_per_worker") if getattr(args, k) is not None},
        "machine": {**info, "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
                    "worker_torch_threads": bench.worker["torch_threads"]},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"service_over_engine {ratios} (targets {TARGETS}); c=1 p50 latency over one engine forward "
          f"{result['latency_c1_p50_over_engine_forward']} (target <= {LATENCY_C1_TARGET}); wrote {out}")


if __name__ == "__main__":
    main()
