"""Paper model: pipeline-stage utilisation and tokens/s of the 340B reward config on 2 nodes x 8 H100 (TP8 x PP2),
from FLOP estimates (no GPU measurement behind it), at saturation (the router's queue never empties).

    python bench/pipeline_model.py            # -> bench/results/pipeline_model.json, table on stdout

Model (all numbers are inputs printed in the JSON):

* Shape (configs/nemotron4_340b.yaml's checkpoint): 96 layers, hidden 18432, 96 heads, 8 KV groups of 192,
  ffn 73728 (squared ReLU, not gated). Linear FLOPs per token per layer = 2 x (h(h + 2 kv) + h^2 + 2 h ffn);
  attention FLOPs per sequence of padded length s per layer = 2 h s^2 (the same accounting as the GPU
  benchmark's FLOP formula). 48 layers per stage.
* A stage is 8 H100 SXM (989 dense bf16 TFLOP/s each) at an assumed 45% MFU for TP8 forwards (one GPU
  reaches ~56% on a 15B shape; TP8 all-reduces cost the rest).
* Workload: conversation lengths uniform in [200, 4000] tokens (the issue's HelpSteer2-like mix), and a
  skewed mix (log-normal, median 700, capped at 4096) as a check. The router cuts arrival-order batches of
  <= 16,384 tokens; the engine sorts each batch by length into micro-batches of 4 sequences, each padded to
  its longest (today's layout).
* Pipeline: every stage runs its batches in one global order. Stage 1 starts micro-batch i once it is
  received; a send is a rendezvous (it completes once the receiver has posted its recv, i.e. finished the
  previous micro-batch) and a stage's forward call returns only when its sends completed. Transfer = the
  activation (s x b x h x 2 bytes) over one 400 Gb/s NIC per GPU: each TP rank sends the whole activation
  (scatter-gather off) or its 1/8 (on; the all-gather over NVLink is charged at 400 GB/s). A forward call
  costs `call_overhead_s` on each stage (Ray dispatch, fetching the micro-batch object, the rewards' copy back).
* Receive prefetch (`sharding.p2p.ActivationReceiver`): a stage posts the receives of all its call's
  micro-batches when the call starts, so the previous stage's sends complete as soon as the data has moved
  and never wait for this stage's compute; without it, each receive is posted after the previous
  micro-batch's compute (a rendezvous per micro-batch: the stages then run in lock step and every change
  in micro-batch time between consecutive micro-batches idles one of them).
* Router/engine: a new batch is submitted when fewer than `max_batches_in_flight` are in flight; 1 is the
  old engine (one batch at a time under a lock) plus the router's hop.

Stage utilisation = the stage's compute time / wall time over the whole run (fill and drain included once).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHAPE = {"layers": 96, "hidden": 18432, "kv_dim": 8 * 192, "ffn": 73728}
GPU_TFLOPS = 989.0
GPUS_PER_STAGE = 8
MFU = 0.45
NIC_BYTES_PER_S = 50e9  # 400 Gb/s per GPU
NVLINK_BYTES_PER_S = 400e9
CALL_OVERHEAD_S = 0.004
ROUTER_HOP_S = 0.003
BUDGET_TOKENS = 16384
MICRO_BATCH = 4
PACKED_TOKENS = 8192
STAGES = 2


def lengths_uniform(rng, n):
    return rng.integers(200, 4001, size=n)


def lengths_skewed(rng, n):
    return np.clip(rng.lognormal(np.log(700), 0.8, size=n).astype(int), 50, 4096)


def batches_of(lengths):
    out, cur, size = [], [], 0
    for n in lengths:
        if cur and size + n > BUDGET_TOKENS:
            out.append(cur)
            cur, size = [], 0
        cur.append(int(n))
        size += int(n)
    return out + ([cur] if cur else [])


def micro_batches(batch, layout):
    """Per micro-batch, the computed length of each sequence. `padded`: length-sorted groups of MICRO_BATCH,
    each padded to its longest. `packed`: sequences packed in arrival order into rows of at most
    PACKED_TOKENS tokens, no padding (the token-forest layout without shared prefixes)."""
    if layout == "padded":
        s = sorted(batch, reverse=True)
        return [[group[0]] * len(group) for group in (s[i:i + MICRO_BATCH] for i in range(0, len(s), MICRO_BATCH))]
    rows, row = [], []
    for n in batch:
        if row and sum(row) + n > PACKED_TOKENS:
            rows.append(row)
            row = []
        row.append(n)
    return rows + ([row] if row else [])


def stage_seconds(seqs):
    h, layers = SHAPE["hidden"], SHAPE["layers"] // STAGES
    linear = 2 * (h * (h + 2 * SHAPE["kv_dim"]) + h * h + 2 * h * SHAPE["ffn"])
    flops = layers * sum(linear * n + 2 * h * n ** 2 for n in seqs)
    return flops / (GPUS_PER_STAGE * GPU_TFLOPS * 1e12 * MFU)


def transfer_seconds(seqs, scatter_gather):
    nbytes = sum(seqs) * SHAPE["hidden"] * 2
    if scatter_gather:
        return nbytes / GPUS_PER_STAGE / NIC_BYTES_PER_S + nbytes / NVLINK_BYTES_PER_S
    return nbytes / NIC_BYTES_PER_S


def simulate(lengths, in_flight, scatter_gather, layout, prefetch):
    batches = batches_of(lengths)
    done = []  # completion time of each batch
    free0 = free1 = 0.0
    busy0 = busy1 = 0.0
    for k, batch in enumerate(batches):
        submit = 0.0 if k < in_flight else done[k - in_flight] + ROUTER_HOP_S
        mbs = micro_batches(batch, layout)
        t0 = max(free0, submit) + CALL_OVERHEAD_S
        t1 = max(free1, submit) + CALL_OVERHEAD_S
        recv_posted = t1
        last_send = t0
        for seqs in mbs:
            compute = stage_seconds(seqs)
            t0 += compute
            busy0 += compute
            arrived = max(t0, recv_posted) + transfer_seconds(seqs, scatter_gather)
            last_send = arrived
            start1 = max(arrived, t1)
            t1 = start1 + compute
            busy1 += compute
            # With prefetch every recv of the call is posted when the call starts; without, each recv is
            # posted when the previous micro-batch's compute ends.
            recv_posted = recv_posted if prefetch else t1
        free0 = max(t0, last_send)
        free1 = t1
        done.append(t1 + ROUTER_HOP_S)
    wall = done[-1]
    real = int(np.sum(lengths))
    padded = sum(sum(seqs) for b in batches for seqs in micro_batches(b, layout))
    return {"layout": layout, "max_batches_in_flight": in_flight, "scatter_gather": scatter_gather,
            "recv_prefetch": prefetch, "batches": len(batches),
            "micro_batches_per_batch": round(sum(len(micro_batches(b, layout)) for b in batches) / len(batches), 2),
            "stage_utilisation": [round(busy0 / wall, 3), round(busy1 / wall, 3)],
            "tokens_per_s": round(real / wall, 1), "padding_share": round(1 - real / padded, 3)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--conversations", type=int, default=4000)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "pipeline_model.json")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    mixes = {"uniform_200_4000": lengths_uniform(rng, args.conversations),
             "lognormal_median_700": lengths_skewed(rng, args.conversations)}
    ideal = 1 / stage_seconds([1])  # tokens/s of one stage on linear work only, no attention
    runs = []
    cases = [("padded", 1, True, False), ("padded", 3, True, False), ("padded", 3, True, True),
             ("packed", 1, True, False), ("packed", 3, True, False), ("packed", 3, False, True),
             ("packed", 2, True, True), ("packed", 3, True, True), ("packed", 4, True, True)]
    for mix, lengths in mixes.items():
        for layout, in_flight, sg, prefetch in cases:
            r = {"mix": mix, **simulate(lengths, in_flight, sg, layout, prefetch)}
            runs.append(r)
            print(f"{mix:<21} {layout:<7} in_flight {in_flight} scatter_gather {str(sg):<5} prefetch "
                  f"{str(prefetch):<5} stage utilisation {r['stage_utilisation']}  {r['tokens_per_s']:>7,.0f} "
                  f"tokens/s  padding {r['padding_share']}")
    result = {
        "assumptions": {"shape": SHAPE, "gpu_dense_bf16_tflops": GPU_TFLOPS, "gpus_per_stage": GPUS_PER_STAGE,
                        "mfu": MFU, "nic_bytes_per_s": NIC_BYTES_PER_S, "nvlink_bytes_per_s": NVLINK_BYTES_PER_S,
                        "call_overhead_s": CALL_OVERHEAD_S, "router_hop_s": ROUTER_HOP_S,
                        "max_tokens_per_batch": BUDGET_TOKENS, "micro_batch_size": MICRO_BATCH,
                        "packed_tokens_per_micro_batch": PACKED_TOKENS,
                        "conversations": args.conversations},
        "stage_linear_only_tokens_per_s": round(ideal, 1),
        "runs": runs,
        "note": "FLOP estimates, not measurements; written by bench/pipeline_model.py",
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
