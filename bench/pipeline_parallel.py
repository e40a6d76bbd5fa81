"""Pipeline parallelism on this machine: tokens/s of the engine at TP1 x PP1 and at PP2 with micro-batching
on (the stages overlap) and off (one micro-batch: stage 2 waits for stage 1).

    python bench/pipeline_parallel.py [--sequences 64] [--repeats 3]

Runs the real MegatronEngine (Ray worker actors, gloo, CPU) on the demo model, one Ray node, placement
strategy PACK (a single node cannot STRICT_SPREAD). Every worker gets `--threads` torch threads so the runs
differ only in how the work is split. Writes its keys into bench/results/pipeline.json
(`pipelined_over_unpipelined`, ...), keeping the keys other benchmarks write there (`concurrency_sweep.py`:
`service_pp2*`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import ray
from ray.util.placement_group import placement_group, remove_placement_group

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs.service import ServiceConfig  # noqa: E402
from sharding.engine import MegatronEngine  # noqa: E402
from sharding.placement import placement_for  # noqa: E402

CHECKPOINT = REPO / ".demo" / "nemotron4-tiny-reward"
MAX_LENGTH = 512  # the batch's longest sequence (lengths 64..512)


def run(label: str, tp: int, pp: int, micro_batch_size: int, batch: list[list[int]], repeats: int,
        threads: int) -> dict:
    config = ServiceConfig.model_validate({
        "checkpoint_path": str(CHECKPOINT),
        # padded micro-batches of `micro_batch_size` sequences: the token budget of that many longest (512)
        "parallel": {"tensor_parallel_size": tp, "pipeline_parallel_size": pp, "batch_layout": "padded",
                     "max_tokens_per_micro_batch": micro_batch_size * MAX_LENGTH, "placement_strategy": "PACK"},
        "runtime": {"cpus_per_worker": 1, "torch_threads_per_worker": threads},
    })
    plan = placement_for(config)
    pg = placement_group(plan.bundles, strategy=plan.strategy)
    ray.get(pg.ready(), timeout=120)
    engine = MegatronEngine(config, pg)
    try:
        asyncio.run(engine.score(batch[:8]))  # warm-up
        tokens = sum(len(t) for t in batch)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            asyncio.run(engine.score(batch))
            times.append(time.perf_counter() - start)
    finally:
        engine.shutdown()
        remove_placement_group(pg)
    best = min(times)
    result = {"label": label, "tp": tp, "pp": pp, "micro_batch_size": micro_batch_size,
              "seconds": times, "tokens": tokens, "tokens_per_s": tokens / best}
    print(f"{label:<28} {tokens / best:10.0f} tokens/s  (best of {repeats}: {best:.2f}s)", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "pipeline.json")
    args = parser.parse_args()

    if not (CHECKPOINT / "model_config.yaml").is_file():
        subprocess.run([sys.executable, "-m", "demo", "--out", str(CHECKPOINT)], check=True, cwd=REPO)
    rng = np.random.default_rng(0)
    batch = [rng.integers(4, 2000, size=int(n)).tolist() for n in rng.integers(64, 513, size=args.sequences)]

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _temp_dir="/tmp/ray_pipeline_bench",
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    try:
        runs = [
            run("TP1xPP1", 1, 1, args.micro_batch_size, batch, args.repeats, args.threads),
            run("PP2, micro-batching off", 1, 2, len(batch), batch, args.repeats, args.threads),
            run("PP2, micro-batching on", 1, 2, args.micro_batch_size, batch, args.repeats, args.threads),
        ]
    finally:
        ray.shutdown()
    single, off, on = (r["tokens_per_s"] for r in runs)
    result = {
        "runs": runs,
        "pipelined_over_unpipelined": on / off,
        "pipelined_over_tp1pp1": on / single,
        "notes": ("micro-batching off = the whole batch as one padded micro-batch, so it also pays padding to the "
                  "longest sequence; TP1xPP1 uses the same length-sorted micro-batches as the pipelined run, so "
                  "pipelined_over_tp1pp1 isolates the overlap of the two stages (one thread each)"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch_threads_per_worker": args.threads},
        "sequences": args.sequences,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    kept = json.loads(args.out.read_text()) if args.out.is_file() else {}
    args.out.write_text(json.dumps({**kept, **result}, indent=2) + "\n")
    print(f"pipelined_over_unpipelined = {on / off:.2f}   pipelined_over_tp1pp1 = {on / single:.2f}   -> {args.out}")


if __name__ == "__main__":
    main()
