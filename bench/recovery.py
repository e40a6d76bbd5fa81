"""What a failure costs, against a cold start of the replica (issue 22).

    python bench/recovery.py [--out bench/results/recovery.json]

Demo model at TP 2 x PP 2 on a local two-node Ray cluster (logical GPUs, gloo, CPU), measured:

  cold_start_s         MegatronEngine built (workers placed, process groups joined, weights read) and its
                       first batch scored
  batch_fault_s        one batch holding a poison prompt (rank 3 raises inside its forward on it; the test
                       worker of tests/fault_workers.py): the ranks leave and rejoin their process groups with
                       their weights, the batch is bisected until the poison prompt alone fails; the other
                       prompts are scored. `rejoins` counts the process-group rebuilds it took.
  clean_batch_s        the same batch without the poison prompt, for comparison
  worker_kill_s        one worker (rank 1) killed with SIGKILL; from the kill to the first batch scored again:
                       the partial restart (`sharding.restart`): detection, a new actor for that rank alone
                       reading its shard, every rank rejoining new process groups. Batches tried meanwhile get
                       EngineUnavailableError ("recovering"); the loop retries every 50 ms. `restarted_ranks`
                       and `survivors_kept_actors` check that only the dead rank was replaced.

Simulated 340B (configs/simulated_340b.yaml's TP 8 x PP 2, bfloat16): MODELLED, not run (the simulated device
reads no weights). Assumption: READ_BYTES_PER_S_PER_NODE = 1 GB/s of checkpoint read bandwidth per node,
shared by the ranks of the node. A full reload reads every stage's shards on its node in parallel (the slowest
node's bytes / bandwidth); a one-rank reload reads that rank's shard alone at the node's bandwidth.
Ratios compare times measured within one run of this script; the machine is shared, so absolute times are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

READ_BYTES_PER_S_PER_NODE = 1e9  # assumption (issue 22: "at least 6 minutes at 1 GB/s per node")
PROMPTS = ["Hello there.", "What is 2 + 2?", "List three prime numbers. " * 5, "ok",
           "Write a haiku about bread. " * 6, "Explain why the sky is blue in two sentences."]


def modelled_340b() -> dict:
    import yaml

    from sharding.checkpoints.nemo import arch_from_nemo_config
    from demo.checkpoint import NEMOTRON4_340B_SHAPE, demo_model_config

    arch = arch_from_nemo_config(demo_model_config("tokenizer.model", NEMOTRON4_340B_SHAPE), vocab_size=256000)
    service = yaml.safe_load((REPO / "configs/simulated_340b.yaml").read_text())["applications"][0]["args"]
    tp, pp = service["parallel"]["tensor_parallel_size"], service["parallel"]["pipeline_parallel_size"]
    dtype_bytes = 2  # bfloat16
    stage_bytes = [arch.stage_parameters(pp, s) * dtype_bytes for s in range(pp)]
    rank_bytes = max(stage_bytes) / tp
    full_s = max(stage_bytes) / READ_BYTES_PER_S_PER_NODE
    one_rank_s = rank_bytes / READ_BYTES_PER_S_PER_NODE
    return {"label": "MODELLED (simulated 340B; no weights are read)", "tensor_parallel_size": tp,
            "pipeline_parallel_size": pp, "dtype": "bfloat16",
            "read_bytes_per_s_per_node": READ_BYTES_PER_S_PER_NODE,
            "stage_bytes": stage_bytes, "largest_rank_shard_bytes": rank_bytes,
            "full_reload_s": full_s, "one_rank_reload_s": one_rank_s, "ratio": one_rank_s / full_s,
            "note": "one_rank_reload_s is what a partial restart reads (the dead rank's shard alone); a full "
                    "replica replacement (a hung worker, or a failed partial restart) reads full_reload_s"}


def measure_demo(checkpoint: Path) -> dict:
    import os
    import signal

    import numpy as np
    import ray
    from ray._private.state import actors as gcs_actor_table  # GCS records; the state API needs a dashboard
    from ray.util.placement_group import placement_group, remove_placement_group

    from configs.service import ServiceConfig
    from deployments.prompt import SentencePieceTokenizer
    from sharding.checkpoints.nemo import NemoCheckpoint
    from sharding.engine import MegatronEngine
    from sharding.placement import placement_for
    from sharding.protocol import EngineUnavailableError, PartialScores
    from tests.fault_workers import PoisonPromptWorker

    tokenizer = SentencePieceTokenizer(NemoCheckpoint.open(checkpoint).tokenizer_path)
    clean = [tokenizer.encode(f"<extra_id_1>User\n{p}\n<extra_id_1>Assistant\nSure.\n<extra_id_2>") for p in PROMPTS]
    poisoned = clean[:3] + [clean[2][:PoisonPromptWorker.POISON_LENGTH]] + clean[3:]
    config = ServiceConfig.model_validate({
        "checkpoint_path": str(checkpoint), "model_name": "demo",
        "parallel": {"tensor_parallel_size": 2, "pipeline_parallel_size": 2, "batch_layout": "padded",
                     "max_tokens_per_micro_batch": 2 * max(len(t) for t in poisoned)},
        "runtime": {"device": "cpu", "dtype": "float32", "backend": "gloo", "gpus_per_node": 2,
                    "cpus_per_worker": 0.5},
    })
    plan = placement_for(config)
    pg = placement_group(plan.bundles, strategy=plan.strategy)
    ray.get(pg.ready(), timeout=120)
    out: dict = {"label": "measured, CPU (gloo), demo model", "tensor_parallel_size": 2, "pipeline_parallel_size": 2}
    try:
        started = time.monotonic()
        engine = MegatronEngine(config, pg, worker_class=PoisonPromptWorker)
        clean_scores = asyncio.run(engine.score(clean))
        out["cold_start_s"] = time.monotonic() - started
        started = time.monotonic()
        asyncio.run(engine.score(clean))
        out["clean_batch_s"] = time.monotonic() - started
        started = time.monotonic()
        result = asyncio.run(engine.score(poisoned))
        out["batch_fault_s"] = time.monotonic() - started
        out["rejoins"] = engine.rejoins
        out["batch_fault_failed_rows"] = sorted(result.failures) if isinstance(result, PartialScores) else []
        out["batch_fault_ratio_to_cold_start"] = out["batch_fault_s"] / out["cold_start_s"]

        before = [w["actor_id"] for w in engine.describe()]
        pid = gcs_actor_table(before[1])["Pid"]
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        unavailable = 0
        while True:
            try:
                scores = asyncio.run(engine.score(clean))
                break
            except EngineUnavailableError:
                unavailable += 1
                if engine.broken or time.monotonic() - killed > 600:
                    raise
                time.sleep(0.05)
        out["worker_kill_s"] = time.monotonic() - killed
        after = [w["actor_id"] for w in engine.describe()]
        out["restarted_ranks"] = [rank for rank, (a, b) in enumerate(zip(before, after)) if a != b]
        out["survivors_kept_actors"] = all(a == b for rank, (a, b) in enumerate(zip(before, after)) if rank != 1)
        out["worker_kill_unavailable_batches"] = unavailable
        out["worker_kill_scores_equal_before"] = bool(np.allclose(scores, clean_scores, atol=1e-5, rtol=0))
        out["worker_kill_ratio_to_cold_start"] = out["worker_kill_s"] / out["cold_start_s"]
        out["worker_kill_target_ratio"] = 0.5
        out["worker_kill_note"] = ("partial restart: only the dead rank is restarted and reads its shard; the "
                                   "survivors keep their weights and rejoin new process groups")
        engine.shutdown()
    finally:
        remove_placement_group(pg)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "bench/results/recovery.json"))
    args = parser.parse_args()
    import os

    import ray
    from ray.cluster_utils import Cluster

    from demo import write_demo_model

    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    result = {"machine": platform.node(), "simulated_340b": modelled_340b()}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "num_gpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=4, num_gpus=2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            result["demo_tp2_pp2"] = measure_demo(write_demo_model(Path(tmp) / "demo-reward", seed=0))
    finally:
        ray.shutdown()
        cluster.shutdown()
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
