"""SIMULATED: where the Ray Data score job's time goes before its first row and once running (issue 24).

The set-up of bench/offline.py (the 340B's architecture on simulated H200s, TP 8, 2 model replicas on a local
two-node Ray cluster; the same HelpSteer2-like rows, 16 a request), with the job run through
bench/offline_timed_job.py (the same job, timestamps added) on one or more input sizes and job settings, and
the service's saturated rows/s measured before and after the jobs (the same rows, the job's own requests,
`POST /v1/score` at `--service-concurrency`).

    python bench/offline_timeline.py --rows 1000 --sizes 1000 2000     # writes bench/results/offline_firstrow.json
    python bench/offline_timeline.py --variant "in64:--in-flight 64"   # a job setting against the default

Per job run, the timeline (seconds from the job's process start): driver imports, `ray.init`, dataset built,
each actor's process creation, `__init__` (serve imported, handle made), first block, first request sent,
first answer, first outcome in the driver, first shard written, last answer, end; and the service phase
(first request sent to last answer: the job's rows over it, against the service's rows/s), the requests in
flight over that phase (time-weighted mean), the blocks each actor got and when.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.offline import (HTTP_PORT, add_workload_args, bodies_of, result_header, rows,  # noqa: E402
                           serve_simulated, write_shards)
from bench.simulated_service import TextMaker, arch_tokenizer, finish, http_pass, start_cluster  # noqa: E402


BIN_S = 5


def in_flight_mean(sent: list[float], answered: list[float], start: float, end: float) -> float:
    """Time-weighted mean of requests in flight over [start, end]."""
    changes = sorted([(t, 1) for t in sent] + [(t, -1) for t in answered])
    level, area, last = 0, 0.0, start
    for t, step in changes:
        t = min(max(t, start), end)
        area += level * (t - last)
        level, last = level + step, t
    area += level * (end - last)
    return area / (end - start) if end > start else 0.0


def timeline(events: list[dict[str, Any]], t0: float, total_rows: int) -> dict[str, Any]:
    def rel(t: float) -> float:
        return round(t - t0, 2)

    driver = {e["event"]: e for e in events if e["who"] == "driver"}
    out: dict[str, Any] = {name: rel(driver[name]["t"]) for name in
                           ("main_entered", "imports_done", "ray_init_done", "ray_data_imported", "dataset_built",
                            "job_done") if name in driver}
    outcomes = driver.get("job_done", {}).get("outcome_times", [])
    if outcomes:
        out["first_outcome_in_driver"] = rel(outcomes[0])
        out["outcomes_at_fraction"] = {f"{int(q * 100)}%": rel(outcomes[min(len(outcomes) - 1, int(q * len(outcomes)))])
                                       for q in (0.1, 0.25, 0.5, 0.75, 1.0)}
    flushes = [e for e in events if e["who"] == "driver" and e["event"] == "shard_flushed"]
    if flushes:
        out["first_shard_written"] = rel(flushes[0]["t"])
    actors: dict[str, Any] = {}
    for who in sorted({e["who"] for e in events if e["who"].startswith("actor-")}):
        mine = [e for e in events if e["who"] == who]
        first = {}
        for e in mine:
            first.setdefault(e["event"], e["t"])
        calls = [(rel(e["t"]), e["rows"]) for e in mine if e["event"] == "call_start"]
        actors[who] = {**{k: rel(v) for k, v in first.items()}, "blocks": len(calls), "block_starts_s_rows": calls}
    out["actors"] = actors
    sent = [e["t"] for e in events if e["event"] == "request_sent"]
    answered = [e for e in events if e["event"] == "response"]
    if sent and answered:
        start, end = min(sent), max(e["t"] for e in answered)
        rows_answered = sum(e["rows"] for e in answered)
        out["first_request_sent"], out["first_answer"], out["last_answer"] = rel(start), rel(min(e["t"] for e in answered)), rel(end)
        out["service_phase"] = {"seconds": round(end - start, 2), "rows": rows_answered,
                                "rows_per_s": round(rows_answered / (end - start), 2),
                                "requests": len(answered),
                                "requests_in_flight_mean": round(in_flight_mean(sent, [e["t"] for e in answered], start, end), 1)}
        bins: dict[int, int] = {}
        for e in answered:
            bins[int((e["t"] - start) // BIN_S)] = bins.get(int((e["t"] - start) // BIN_S), 0) + e["rows"]
        out["service_phase"][f"rows_answered_per_{BIN_S}s_bin"] = [bins.get(i, 0) for i in range(max(bins) + 1)]
        out["service_phase"][f"requests_in_flight_per_{BIN_S}s_bin"] = [
            round(in_flight_mean(sent, [e["t"] for e in answered], start + i * BIN_S, start + (i + 1) * BIN_S), 1)
            for i in range(max(bins) + 1)]
        if outcomes:
            out["rows_answered_before_first_outcome"] = sum(e["rows"] for e in answered if e["t"] <= outcomes[0])
    if "job_done" in driver:
        out["rows_per_s_whole_job"] = round(total_rows / (driver["job_done"]["t"] - t0), 2)
    return out


def run_job(args: argparse.Namespace, name: str, source: Path, out: Path, address: str, extra: list[str],
            total_rows: int) -> dict[str, Any]:
    events = out.parent / f"{out.name}.events.jsonl"
    cmd = [sys.executable, "-m", "bench.offline_timed_job", str(events), "score", "--input", str(source),
           "--output", str(out), "--address", address, "--prompt-column", "prompt", "--response-column", "response",
           "--no-progress", "--max-conversations-per-request", str(args.rows_per_request), "--rows-per-shard", "1000",
           *extra]  # bench/offline.py's job settings (the CLI's defaults but --rows-per-shard); `extra` overrides
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"job {name} failed: {proc.stderr[-3000:]}")
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    summary = next((line for line in proc.stderr.splitlines() if line.startswith("score:")), None)
    stats = next((e["text"] for e in lines if e["event"] == "ray_data_stats"), "")
    return {"name": name, "rows": total_rows, "job_args": extra, "wall_s": round(wall, 2), "summary": summary,
            "timeline_s": timeline(lines, t0, total_rows), "ray_data_stats": stats.splitlines()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1000, help="rows of the service passes")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000], help="input sizes of the default job runs")
    parser.add_argument("--variant", action="append", default=[],
                        help='"NAME:JOB ARGS": one more job run on --rows rows with these `jobs score` arguments')
    add_workload_args(parser)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "offline_firstrow.json")
    args = parser.parse_args()

    work = Path("/tmp") / f"offline-timeline-{int(time.time())}"
    work.mkdir()
    maker = TextMaker(arch_tokenizer(), seed=0)
    biggest = max([args.rows, *args.sizes])
    all_rows = rows(maker, biggest, tuple(args.prompt_tokens), tuple(args.response_tokens), seed=1)
    for n in sorted({args.rows, *args.sizes}):
        write_shards(work / f"in{n}", all_rows[:n])  # 1,000-row Parquet shards, as bench/offline.py writes

    cluster = start_cluster(num_cpus=16, num_gpus=8)
    result = result_header(args)
    try:
        t = time.time()
        serve_simulated(args.model_replicas)
        result["deploy_s"] = round(time.time() - t, 1)
        url = f"http://127.0.0.1:{HTTP_PORT}"
        small = all_rows[:args.rows]
        asyncio.run(http_pass(bodies_of(small[:64], args.rows_per_request), args.service_concurrency, url))

        def service_pass() -> dict[str, Any]:
            s = asyncio.run(http_pass(bodies_of(small, args.rows_per_request), args.service_concurrency, url))
            return {**s, "rows_per_s": round(s["sequences"] / s["wall_s"], 2)}

        result["service_before"] = service_pass()
        print(f"service: {result['service_before']['rows_per_s']} rows/s", flush=True)
        runs = [(f"default_{n}", n, []) for n in args.sizes]
        runs += [(spec.split(":", 1)[0], args.rows, shlex.split(spec.split(":", 1)[1])) for spec in args.variant]
        result["jobs"] = []
        for name, n, extra in runs:
            run = run_job(args, name, work / f"in{n}", work / f"out-{name}", cluster.address, extra, n)
            result["jobs"].append(run)
            print(json.dumps({k: v for k, v in run.items() if k != "ray_data_stats"}), flush=True)
        result["service_after"] = service_pass()
        service = (result["service_before"]["rows_per_s"] + result["service_after"]["rows_per_s"]) / 2
        result["service_rows_per_s_mean"] = round(service, 2)
        for run in result["jobs"]:
            tl = run["timeline_s"]
            run["over_service"] = {"whole_job": round(tl["rows_per_s_whole_job"] / service, 3),
                                   "service_phase": round(tl["service_phase"]["rows_per_s"] / service, 3)}
        print(json.dumps({r["name"]: r["over_service"] for r in result["jobs"]}), flush=True)
    finally:
        finish(result, args.out, cluster)


if __name__ == "__main__":
    main()
