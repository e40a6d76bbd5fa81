"""`python -m jobs score --address ...` with a timeline: the same job (jobs/ray_data.py's `score_ray`, its
dataset, its actors and its writer), with timestamps written to an events file (JSON lines, wall-clock
`time.time()`, one process per line's `who`), for bench/offline_timeline.py.

    python -m bench.offline_timed_job EVENTS.jsonl score --input ... --address ...   # the job's own arguments

`--ray-data-v2-read` among them: the job reads Parquet as it did before jobs/ray_data.py turned Ray Data's V2
Parquet read off (its footer-reading actor pool) and set the read's block count, to measure both in one run.
`--ray-data-default-queue` among them: the actor pool queues as many blocks per actor as Ray Data's default
(2x its concurrent calls), as before jobs/ray_data.py capped it at the blocks an actor works on.

What is recorded (nothing else changes):
* the driver: its imports, `ray.init`, the dataset built (lazy: Ray Data plans and starts on the first
  `iter_batches` pull), every outcome taken (its time, in the driver's memory, written at the end), each
  shard flushed, the end; then Ray Data's own stats of the run (`Dataset.stats()`).
* each scorer actor (`TimedScorer`, a subclass of `HandleScorer`): its process's creation time, `__init__`
  entered (after the worker unpickled the class: imports of jobs/ray_data.py done), `ray.serve` imported,
  `__init__` done (handle made, done ids fetched); every call (a block: rows in, rows out); every request
  sent through the handle and its answer (rows each).
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

T_MAIN = time.time()


def emit(path: str, who: str, event: str, t: float | None = None, **extra: Any) -> None:
    line = json.dumps({"t": time.time() if t is None else t, "who": who, "event": event, **extra}) + "\n"
    with open(path, "a", encoding="utf-8") as f:  # one short append per event: lines do not interleave
        f.write(line)


from jobs.ray_data import HandleScorer  # noqa: E402  (the actor's base; importing it is part of the job's cost)


class TimedClient:
    """The actor's handle client, each request's send and answer recorded."""

    def __init__(self, inner: Any, events: str, who: str):
        self.inner, self.events, self.who = inner, events, who

    @property
    def retries(self) -> int:
        return self.inner.retries

    async def score(self, body: dict[str, Any]) -> dict[str, Any]:
        n = len(body.get("conversations") or body.get("responses") or [])
        emit(self.events, self.who, "request_sent", rows=n)
        result = await self.inner.score(body)
        emit(self.events, self.who, "response", rows=n)
        return result


class TimedScorer(HandleScorer):
    def __init__(self, *args: Any, events: str, **kwargs: Any):
        import psutil

        who = f"actor-{os.getpid()}"
        emit(events, who, "actor_process_created", t=psutil.Process().create_time())
        emit(events, who, "actor_init_start")
        import ray.serve  # noqa: F401  (HandleScoringClient imports it; timed apart)

        emit(events, who, "serve_imported")
        super().__init__(*args, **kwargs)
        self.client.client = TimedClient(self.client.client, events, who)
        self.events, self.who = events, who
        emit(events, who, "actor_init_done")

    async def __call__(self, batch: Any) -> Any:
        emit(self.events, self.who, "call_start", rows=batch.num_rows)
        out = await super().__call__(batch)
        emit(self.events, self.who, "call_end", rows=out.num_rows)
        return out


def main(argv: list[str]) -> int:
    events = argv[0]
    old_read = "--ray-data-v2-read" in argv  # the read as before the fix: Ray Data's V2 Parquet read (footer actors)
    default_queue = "--ray-data-default-queue" in argv  # Ray Data's own blocks-per-actor queue, as before the cap
    argv = [a for a in argv if a not in ("--ray-data-v2-read", "--ray-data-default-queue")]
    emit(events, "driver", "main_entered", t=T_MAIN)
    import jobs.__main__ as cli
    import jobs.ray_data as ray_data
    import ray

    emit(events, "driver", "imports_done")
    args = cli._parser().parse_args(argv[1:])
    ray.init(address=args.address, log_to_driver=False)
    emit(events, "driver", "ray_init_done")
    import ray.data  # noqa: F401

    emit(events, "driver", "ray_data_imported")
    built: list[Any] = []
    outcome_times: list[float] = []

    def actor_dataset(fs, files, actor, *, consumers, batch_rows, constructor_kwargs):
        ds = original_actor_dataset(fs, files, TimedScorer, consumers=consumers, batch_rows=batch_rows,
                                    constructor_kwargs={**constructor_kwargs, "events": events})
        emit(events, "driver", "dataset_built")
        built.append(ds)
        return ds

    def take_outcome(*a: Any, **k: Any) -> None:
        outcome_times.append(time.time())
        original_take_outcome(*a, **k)

    class TimedShardWriter(ray_data.ShardWriter):
        def flush(self) -> None:
            rows = len(self.pending)
            super().flush()
            if rows:
                emit(events, "driver", "shard_flushed", rows=rows)

    if old_read:
        original_read_parquet = ray.data.read_parquet

        def read_parquet(*a: Any, **k: Any) -> Any:
            ray.data.DataContext.get_current().use_datasource_v2 = True
            k.pop("override_num_blocks", None)  # the read's own default, as before
            return original_read_parquet(*a, **k)

        ray.data.read_parquet = read_parquet
    if default_queue:
        original_strategy = ray.data.ActorPoolStrategy

        def strategy(**k: Any) -> Any:
            k.pop("max_tasks_in_flight_per_actor", None)
            return original_strategy(**k)

        ray.data.ActorPoolStrategy = strategy
    original_actor_dataset, original_take_outcome = ray_data.actor_dataset, ray_data.take_outcome
    ray_data.actor_dataset, ray_data.take_outcome, ray_data.ShardWriter = actor_dataset, take_outcome, TimedShardWriter
    code = cli.main(argv[1:])
    emit(events, "driver", "job_done", returncode=code, outcome_times=outcome_times)
    try:
        emit(events, "driver", "ray_data_stats", text=built[0].stats() if built else "")
    except Exception as exc:  # stats are a nicety; the timeline stands without them
        emit(events, "driver", "ray_data_stats", text=f"unavailable: {exc!r}")
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
