"""Token-forest vs padded micro-batches on the demo model, in one process (fp32 CPU), and batch invariance.

Three workloads, each scored both ways in one run (interleaved repeats, best time of each), through the
engine's own layout code (`sharding.micro_batches.plan_micro_batches`) and the model forward the workers
run (`sharding.local.LocalScorer.score_micro_batches`, TP1 x PP1, no Ray):

  (a) single-turn: lengths uniform in 100..3000 tokens, nothing shared;
  (b) 4-turn conversations scored with `turns: "all"`: one prefix per assistant turn, each ending in the
      end-of-turn token the next turn does not continue (the SteerLM template's `<extra_id_2>`);
  (c) best-of-8: a 1000-token prompt and 8 responses of 300 tokens.

Token ids are synthetic (uniform over the vocabulary, with the template's shape); what the layouts compute
depends only on lengths and shared prefixes. Requests are grouped into model batches of at most
`--max-tokens-per-batch` requested tokens (the router's budget) and every batch is cut into micro-batches
of at most `--max-tokens-per-micro-batch` tokens. Per workload: `computed_over_requested_tokens` (forest),
the padded layout's share, throughput in requested tokens/s both ways and `forest_over_padded_throughput`.
Batch invariance: one 4-turn conversation scored inside 20 different co-batchings (its own turns, best-of-N
siblings, unrelated sequences), max abs diff of its scalar score and attributes across them and vs alone.

    PYTHONPATH=$PWD nice -n 5 python bench/forest_vs_padded.py     # writes bench/results/forest.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs.service import DEFAULT_WEIGHTS, ParallelConfig, RuntimeConfig  # noqa: E402
from sharding.micro_batches import computed_tokens  # noqa: E402

CHECKPOINT = REPO / ".demo" / "nemotron4-tiny-reward"
END = 3  # stands in for <extra_id_2>: ends every scored prefix, never continued by the next turn


def tokens(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(10, vocab) for _ in range(n)]


def single_turn(rng: random.Random, vocab: int, n: int) -> list[list[list[int]]]:
    return [[tokens(rng, rng.randint(100, 3000), vocab)] for _ in range(n)]


def four_turn_all(rng: random.Random, vocab: int, n: int) -> list[list[list[int]]]:
    requests = []
    for _ in range(n):
        context, prefixes = tokens(rng, rng.randint(20, 60), vocab), []  # system segment
        for _ in range(4):
            context += tokens(rng, rng.randint(80, 250), vocab) + tokens(rng, rng.randint(150, 400), vocab)
            prefixes.append(context + [END])
        requests.append(prefixes)
    return requests


def best_of_8(rng: random.Random, vocab: int, n: int) -> list[list[list[int]]]:
    requests = []
    for _ in range(n):
        prompt = tokens(rng, 1000, vocab)
        requests.append([prompt + tokens(rng, 300, vocab) + [END] for _ in range(8)])
    return requests


def model_batches(requests: list[list[list[int]]], max_tokens_per_batch: int) -> list[list[list[int]]]:
    """Whole requests into batches of at most `max_tokens_per_batch` requested tokens (the router's budget)."""
    batches, size = [], 0
    for request in requests:
        n = sum(map(len, request))
        if batches and size + n <= max_tokens_per_batch:
            batches[-1].extend(request)
            size += n
        else:
            batches.append(list(request))
            size = n
    return batches


def timed(scorer, batches, parallel) -> tuple[float, list[np.ndarray]]:
    start = time.perf_counter()
    out = [scorer.score_micro_batches(b, parallel) for b in batches]
    return time.perf_counter() - start, out


def run_workload(scorer, name: str, requests, args) -> dict:
    batches = model_batches(requests, args.max_tokens_per_batch)
    layouts = {layout: ParallelConfig(max_tokens_per_micro_batch=args.max_tokens_per_micro_batch,
                                      batch_layout=layout) for layout in ("forest", "padded")}
    requested = sum(len(t) for b in batches for t in b)
    computed = {k: sum(computed_tokens(b, p) for b in batches) for k, p in layouts.items()}
    times = {k: [] for k in layouts}
    outputs = {}
    for _ in range(args.repeats):
        for k, p in layouts.items():
            seconds, outputs[k] = timed(scorer, batches, p)
            times[k].append(seconds)
    best = {k: min(v) for k, v in times.items()}
    diff = max(float(np.abs(f - p).max()) for f, p in zip(outputs["forest"], outputs["padded"]))
    result = {
        "sequences": sum(len(b) for b in batches), "model_batches": len(batches), "requested_tokens": requested,
        "forest_computed_tokens": computed["forest"], "padded_computed_tokens": computed["padded"],
        "computed_over_requested_tokens": round(computed["forest"] / requested, 4),
        "padded_computed_over_requested_tokens": round(computed["padded"] / requested, 4),
        "forest_seconds": [round(t, 3) for t in times["forest"]],
        "padded_seconds": [round(t, 3) for t in times["padded"]],
        "forest_tokens_per_s": round(requested / best["forest"], 1),
        "padded_tokens_per_s": round(requested / best["padded"], 1),
        "forest_over_padded_throughput": round(best["padded"] / best["forest"], 3),
        "max_abs_diff_forest_vs_padded": diff,
    }
    print(f"{name}: {json.dumps(result)}", flush=True)
    return result


def batch_invariance(scorer, vocab: int, args) -> dict:
    rng = random.Random(args.seed + 1)
    parallel = ParallelConfig(max_tokens_per_micro_batch=args.max_tokens_per_micro_batch)
    turns = four_turn_all(rng, vocab, 1)[0]
    target = turns[-1]
    weights = np.array(DEFAULT_WEIGHTS, dtype=np.float64)
    alone = scorer.score([target])[0]
    seen = []
    for _ in range(args.cobatchings):
        mates = []
        if rng.random() < 0.7:
            mates += rng.sample(turns[:-1], rng.randint(1, 3))  # its own earlier turns
        if rng.random() < 0.5:  # best-of-N siblings: the same context, another last reply
            cut = len(target) - rng.randint(50, 400)
            mates += [target[:cut] + tokens(rng, rng.randint(10, 300), vocab) + [END] for _ in range(rng.randint(1, 4))]
        mates += [tokens(rng, rng.randint(20, 2000), vocab) for _ in range(rng.randint(0, 5))]
        if rng.random() < 0.2:
            mates.append(list(target))  # a duplicate
        batch = mates + [target]
        rng.shuffle(batch)
        rewards = scorer.score_micro_batches(batch, parallel)
        seen.append(rewards[batch.index(target)])
    seen = np.stack(seen)
    scores = seen.astype(np.float64) @ weights
    return {
        "cobatchings": args.cobatchings,
        "target_tokens": len(target),
        "max_abs_diff_score_across_cobatchings": float(scores.max() - scores.min()),
        "max_abs_diff_attributes_across_cobatchings": float((seen.max(0) - seen.min(0)).max()),
        "max_abs_diff_attributes_vs_alone": float(np.abs(seen - alone).max()),
        "max_abs_diff_score_vs_alone": float(np.abs(scores - float(alone.astype(np.float64) @ weights)).max()),
        "bitwise_identical_across_cobatchings": bool((seen == seen[0]).all()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=CHECKPOINT)
    parser.add_argument("--requests", type=int, nargs=3, default=[12, 8, 4], metavar=("A", "B", "C"),
                        help="requests per workload (a) (b) (c)")
    parser.add_argument("--max-tokens-per-batch", type=int, default=16384, help="router.max_tokens_per_batch")
    parser.add_argument("--max-tokens-per-micro-batch", type=int, default=8192,
                        help="parallel.max_tokens_per_micro_batch (both layouts)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cobatchings", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "forest.json")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if not (args.checkpoint / "model_config.yaml").is_file():
        subprocess.run([sys.executable, "-m", "demo", "--out", str(args.checkpoint)], check=True,
                       cwd=REPO)
    from sharding.local import LocalScorer

    scorer = LocalScorer(str(args.checkpoint), RuntimeConfig())
    try:
        vocab = scorer.arch.padded_vocab_size
        rng = random.Random(args.seed)
        workloads = {
            "a_single_turn_100_3000": single_turn(rng, vocab, args.requests[0]),
            "b_4_turns_all": four_turn_all(rng, vocab, args.requests[1]),
            "c_best_of_8": best_of_8(rng, vocab, args.requests[2]),
        }
        scorer.score_micro_batches([[11, 12, 13]], ParallelConfig())  # warm-up
        results = {name: run_workload(scorer, name, requests, args) for name, requests in workloads.items()}
        invariance = batch_invariance(scorer, vocab, args)
        print(f"batch invariance: {json.dumps(invariance)}", flush=True)
    finally:
        scorer.close()
    out = {
        "command": "PYTHONPATH=$PWD nice -n 5 python bench/forest_vs_padded.py",
        "workloads": results,
        "batch_invariance": invariance,
        "config": {"max_tokens_per_batch": args.max_tokens_per_batch,
                   "max_tokens_per_micro_batch": args.max_tokens_per_micro_batch, "repeats": args.repeats,
                   "requests": args.requests, "seed": args.seed, "forest_attention": "branches (auto on cpu)",
                   "dtype": "float32", "device": "cpu", "torch_threads": args.threads},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
