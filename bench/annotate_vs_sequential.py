"""CPU benchmark: the annotation job vs one-request-at-a-time scoring, on the demo model.

    python bench/annotate_vs_sequential.py                 # 120 SteerLM lines, job concurrency 16
    python bench/annotate_vs_sequential.py -n 60 -c 32

Both sides label the same multi-turn SteerLM lines (every labelled assistant turn scored on its prefix):

* sequential: NeMo-Aligner's annotator pattern, one formatted prompt per request, each request waiting for
  the previous one, through the KServe/Triton route with `tritonclient.http` (`sentences` BYTES [1,1]);
* job: `python -m jobs annotate`'s code (`jobs.annotate.annotate`) over HTTP with `--concurrency` requests
  in flight, each request carrying consecutive lines' labelled turns (up to 32 a request).

conversations/s = input lines / wall seconds; `ratio` = job / sequential. Written to
bench/results/annotate_vs_sequential.json. Own Ray instance (`/tmp/ray_bench5`, 4 logical CPUs, no
dashboard) and Serve on 127.0.0.1:8200; it shuts down only what it started.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import yaml  # noqa: E402

from jobs.annotate import annotate, parse_line  # noqa: E402
from jobs.client import HttpScoringClient  # noqa: E402

DEFAULT_CHECKPOINT = REPO / ".demo" / "nemotron4-tiny-reward"
LOCAL_YAML = REPO / "configs" / "local.yaml"
RESULTS = REPO / "bench" / "results" / "annotate_vs_sequential.json"
HTTP_PORT = 8200
RAY_TEMP_DIR = "/tmp/ray_bench5"
TOPICS = ("the moon", "bread baking", "prime numbers", "Python lists", "the French revolution", "tea", "rain")


def steerlm_lines(n: int) -> list[str]:
    """Deterministic multi-turn lines: 1-3 exchanges, the last assistant turn always labelled, earlier ones
    every other line (as HelpSteer-style data mixes them)."""
    lines = []
    for i in range(n):
        turns = []
        exchanges = 1 + i % 3
        for t in range(exchanges):
            topic = TOPICS[(i + t) % len(TOPICS)]
            answer = " ".join(f"Here is point {k} about {topic}, explained plainly." for k in range(3 + (i * 5 + t) % 12))
            turns += [{"from": "User", "value": f"Question {i}.{t}: what should I know about {topic}?", "label": None},
                      {"from": "Assistant", "value": answer, "label": "" if t == exchanges - 1 or i % 2 else None}]
        lines.append(json.dumps({"conversations": turns, "mask": "User", "id": i}))
    return lines


def sequential(lines: list[str], url: str) -> float:
    """Seconds to score every labelled turn one request at a time through the KServe route."""
    import tritonclient.http as triton

    from deployments.prompt import render_prompt
    from deployments.schemas import Conversation

    prompts = [render_prompt(Conversation.model_validate(c).messages)
               for line in lines for c in parse_line(line).conversations]
    client = triton.InferenceServerClient(url=url, network_timeout=120)
    try:
        started = time.perf_counter()
        for prompt in prompts:
            array = np.array([[prompt.encode("utf-8")]], dtype=np.object_)
            sentence = triton.InferInput("sentences", [1, 1], "BYTES").set_data_from_numpy(array)
            client.infer("reward_model", [sentence]).as_numpy("rewards")
        return time.perf_counter() - started
    finally:
        client.close()


def job(lines: list[str], url: str, concurrency: int, workdir: Path) -> float:
    """Seconds for the annotation job's code to label every line (fresh output file)."""
    source, out = workdir / "in.jsonl", workdir / "out.jsonl"
    source.write_text("\n".join(lines) + "\n")
    out.unlink(missing_ok=True)

    async def go() -> float:
        client = HttpScoringClient(url, max_connections=concurrency)
        try:
            started = time.perf_counter()
            summary = await annotate(source, out, client, concurrency=concurrency, progress=False)
            elapsed = time.perf_counter() - started
        finally:
            await client.aclose()
        assert summary.written == len(lines), summary.text()
        return elapsed

    return asyncio.run(go())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-n", "--lines", type=int, default=120, help="SteerLM lines")
    parser.add_argument("-c", "--concurrency", type=int, default=16, help="the job's requests in flight")
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="demo checkpoint directory")
    args = parser.parse_args()

    checkpoint = Path(args.checkpoint).resolve()
    if not (checkpoint / "model_config.yaml").is_file():
        subprocess.run([sys.executable, "-m", "demo", "--if-missing", "--out", str(checkpoint)],
                       cwd=REPO, check=True)
    cfg = yaml.safe_load(LOCAL_YAML.read_text())["applications"][0]["args"]
    cfg["checkpoint_path"] = str(checkpoint)

    import ray
    from ray import serve

    from serve_app import build_app

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    ray.init(address="local", _temp_dir=RAY_TEMP_DIR, num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": HTTP_PORT})
        serve.run(build_app(cfg), name="reward", route_prefix="/")
        url = f"http://127.0.0.1:{HTTP_PORT}"
        lines = steerlm_lines(args.lines)
        turns = sum(len(parse_line(line).conversations) for line in lines)
        with tempfile.TemporaryDirectory() as tmp:
            job(lines[:8], url, args.concurrency, Path(tmp))  # warm-up: connections, batch queue, model
            sequential(lines[:8], url.removeprefix("http://"))
            sequential_s = sequential(lines, url.removeprefix("http://"))
            job_s = job(lines, url, args.concurrency, Path(tmp))
    finally:
        serve.shutdown()
        ray.shutdown()

    result = {
        "benchmark": "annotate_vs_sequential",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "model": "demo (configs/local.yaml, CPU float32)",
        "lines": len(lines),
        "labelled_turns": turns,
        "sequential": {"pattern": "one prompt per request, one request at a time (KServe route, tritonclient)",
                       "seconds": round(sequential_s, 3), "conversations_per_s": round(len(lines) / sequential_s, 2)},
        "job": {"pattern": "python -m jobs annotate (HTTP /v1/score, up to 32 labelled turns a request)",
                "concurrency": args.concurrency, "seconds": round(job_s, 3),
                "conversations_per_s": round(len(lines) / job_s, 2)},
    }
    result["ratio"] = round(result["job"]["conversations_per_s"] / result["sequential"]["conversations_per_s"], 2)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"lines {len(lines)}, labelled turns {turns}")
    print(f"sequential (one request at a time): {result['sequential']['conversations_per_s']} conversations/s "
          f"({sequential_s:.2f} s)")
    print(f"annotation job (concurrency {args.concurrency}): {result['job']['conversations_per_s']} conversations/s "
          f"({job_s:.2f} s)")
    print(f"ratio job/sequential: {result['ratio']}  -> {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
