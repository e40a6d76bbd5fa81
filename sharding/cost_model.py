"""What a micro-batch costs one pipeline stage: FLOPs and bytes from the architecture and the real mask, and
the time a simulated accelerator (`runtime.device: simulated`, configs/accelerators.py) spends on it.

numpy only (no torch, no Ray). The simulated workers (`sharding.simulated`) wait these times; the benchmarks
use the same functions to predict a batch's time.

FLOPs of one stage for one micro-batch (2 FLOPs per multiply-add):
* GEMMs: every token row the stage computes (padding included for the padded layout: the GEMMs run on it)
  goes through each of the stage's layers' QKV, output projection and MLP matrices: 2 x that layer's weight
  count per row. The reward head adds 2 x hidden x outputs per scored sequence on the last stage; the
  embedding is a lookup.
* Attention: 4 x heads x head_dim per attended (query, key) pair per layer (QK^T and AV). Pairs come from
  the micro-batch's real mask: in a token-forest row a node attends to its ancestors and itself, i.e.
  position + 1 keys; a padded micro-batch of b rows of s runs causal attention over the padded shape,
  b x s(s+1)/2 pairs.
Bytes per GPU:
* weights: the stage's parameters / TP, read from HBM once per micro-batch (the floor for small ones);
* elementwise: the norms (two per layer, plus the final one on the last stage; computed in float32:
  read the activation, write and read its float32 copy, write the float32 result, read it and write it back
  in the activation dtype: (2 x dtype + 16) bytes per element) and the two residual adds per layer (read two,
  write one: 3 x dtype bytes per element), on every token row at TP without sequence parallelism (every TP
  rank repeats them on the whole activation), on rows / TP with it;
* tensor parallel: two all-reduces per layer (after attention and after the MLP) of rows x hidden
  activations; a ring all-reduce moves 2 (TP-1)/TP of them over one direction of NVLink. Under sequence
  parallelism a reduce-scatter and an all-gather replace each all-reduce: the same bytes (a ring
  all-reduce is exactly those two), and the last stage all-gathers its final hidden states once for the
  readout; the reward head is one row-parallel GEMM per micro-batch (one small all-reduce per micro-batch,
  `head_allreduces`, counted in calls: its bytes are negligible, its latency is not);
* pipeline: the activation (rows x hidden) to the next stage over the inter-node network; with
  `scatter_gather_activations` each TP rank sends 1/TP of it and the next stage all-gathers over NVLink;
  under sequence parallelism each TP rank sends its 1/TP of the tokens and nothing is all-gathered.

Time of a stage = max(FLOPs / (peak x MATMUL_EFFICIENCY), weight bytes / (HBM bandwidth x
MEMORY_EFFICIENCY)) + all-reduce bytes / (NVLink one way x LINK_EFFICIENCY). `StageTime.elementwise_s`
(elementwise bytes / (HBM x MEMORY_EFFICIENCY)) is reported beside it, not added: the calibration below
measured a whole forward, norms included, so MATMUL_EFFICIENCY already carries them at TP 1.
`sequence_parallel_saving` uses it for what sequence parallelism and the one-GEMM head take off a stage. The transfer to the next stage
overlaps the sender's next micro-batch and delays only the receiver.

Assumptions (README "Simulated accelerator" lists them too): one efficiency for all GEMM and attention work,
calibrated on one measured run (below) and assumed to carry over to other shapes and cards; no kernel launch
or host overhead; all-reduces not overlapped with compute (megatron-core's default without sequence
parallelism); links reach LINK_EFFICIENCY of their published bandwidth; flex_attention's 128 x 128 block
granularity is not modelled (exact pairs).

Calibration (MATMUL_EFFICIENCY): on one H100 SXM in bf16, a Nemotron-15B-like decoder (32 layers, hidden
6144, FFN 24576, 48 heads, 8 KV groups, squared ReLU; megatron-core with SDPA) scored 48 sequences of
256-2048 tokens (52,418 tokens; lengths drawn by torch.randint with seed 0) in length-sorted right-padded
micro-batches of 16 at 16.8k tokens/s. Those micro-batches cost 1.682e15 FLOPs by the formulas above
(padding and causal attention over the padded shape included): 3.120 s at 16.8k tokens/s is 5.390e14
FLOP/s achieved, 0.5448 of the 989.4 TFLOP/s dense peak. (The matmul ceiling measured in the same run was
747-769 TFLOP/s, 0.76-0.78 of peak: the decoder reached ~70% of what a large matmul does.) A check that was
not fitted: the same run in arrival order costs 1.431x the FLOPs (more padding), so the model predicts
0.699x the sorted throughput; transformers measured 11.3k vs 15.9k tokens/s, 0.711x.
`tests/unit/test_cost_model.py` reproduces both from these formulas.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from configs.accelerators import AcceleratorSpec
from configs.model import ModelArchConfig
from sharding.forest import ForestRow

ALLREDUCE_LATENCY_S = 20e-6  # one small NCCL all-reduce over an 8-GPU NVLink group (assumed; the head's)
MATMUL_EFFICIENCY = 0.5448  # achieved over dense peak, GEMMs and attention (calibration above)
MEMORY_EFFICIENCY = 0.8  # achieved over peak HBM bandwidth when streaming weights (assumed)
LINK_EFFICIENCY = 0.8  # achieved over published NVLink / network bandwidth (assumed; NCCL bus bandwidth)


@dataclass(frozen=True)
class MicroBatchWork:
    """What one micro-batch asks of every stage, from its layout."""

    rows: int  # token rows computed (forest nodes, or sequences x padded length)
    attention_pairs: int  # attended (query, key) pairs per layer (all heads)
    sequences: int  # scored sequences (reward-head readouts)


def micro_batch_work(micro_batch) -> MicroBatchWork:
    """A ForestRow or a padded `(tokens [b, s], lengths [b])` micro-batch."""
    if isinstance(micro_batch, ForestRow):
        pairs = int((micro_batch.positions + 1).sum())  # ancestors and itself
        return MicroBatchWork(rows=micro_batch.num_tokens, attention_pairs=pairs,
                              sequences=int(micro_batch.readout.shape[0]))
    tokens, _ = micro_batch
    b, s = tokens.shape
    return MicroBatchWork(rows=b * s, attention_pairs=b * s * (s + 1) // 2, sequences=b)


def padded_work(lengths: Sequence[int]) -> MicroBatchWork:
    """The work of one right-padded micro-batch of sequences of these lengths."""
    b, s = len(lengths), max(lengths)
    return MicroBatchWork(rows=b * s, attention_pairs=b * s * (s + 1) // 2, sequences=b)


@dataclass(frozen=True)
class StageCost:
    """One stage's FLOPs (all its TP ranks together) and bytes per GPU for one micro-batch."""

    gemm_flops: float
    attention_flops: float
    weight_bytes_per_gpu: float
    allreduce_bytes_per_gpu: float  # payload of the stage's TP all-reduces (0 at TP 1)
    send_bytes_per_gpu: float  # activation bytes each GPU sends to the next stage (0 on the last)
    allgather_bytes: float  # bytes the next stage all-gathers over NVLink (scatter-gather; else 0)
    elementwise_bytes_per_gpu: float = 0.0  # norms and residual adds (1/TP of the rows under SP)
    head_allreduces: int = 0  # the reward head's TP all-reduces (last stage, TP > 1): one per micro-batch

    @property
    def flops(self) -> float:
        return self.gemm_flops + self.attention_flops


def stage_cost(arch: ModelArchConfig, work: MicroBatchWork, *, tp: int, pp: int, stage: int, dtype_bytes: int,
               scatter_gather: bool = True, sequence_parallel: bool = False) -> StageCost:
    """The one accounting of a micro-batch's FLOPs and bytes on one stage: the simulated accelerator's times
    (`stage_time`) and the GPU check's MFU (bench/gpu_speed.py) both come from it."""
    layers = arch.num_layers // pp
    gemm = 2.0 * work.rows * layers * arch.layer_matrix_parameters
    if stage == pp - 1:
        gemm += 2.0 * work.sequences * arch.hidden_size * arch.num_attributes
    attention = 4.0 * arch.num_attention_heads * arch.head_dim * work.attention_pairs * layers
    activation = float(work.rows * arch.hidden_size * dtype_bytes)
    last = stage == pp - 1
    sp = sequence_parallel and tp > 1
    split = scatter_gather and tp > 1 and not sp
    norms = 2 * layers + (1 if last else 0)
    elementwise = work.rows * arch.hidden_size * (norms * (2 * dtype_bytes + 16) + 2 * layers * 3 * dtype_bytes)
    readout_gather = activation if (sp and last) else 0.0  # all-gathered once for the readout
    return StageCost(
        gemm_flops=gemm,
        attention_flops=attention,
        weight_bytes_per_gpu=arch.stage_parameters(pp, stage) * dtype_bytes / tp,
        allreduce_bytes_per_gpu=2.0 * layers * activation + readout_gather if tp > 1 else 0.0,
        send_bytes_per_gpu=0.0 if last else (activation / tp if (split or sp) else activation),
        allgather_bytes=activation if (split and not last) else 0.0,
        elementwise_bytes_per_gpu=elementwise / tp if sp else float(elementwise),
        head_allreduces=1 if (last and tp > 1) else 0,
    )


@dataclass(frozen=True)
class StageTime:
    compute_s: float  # roofline of the GEMMs and attention
    allreduce_s: float  # TP all-reduces, not overlapped
    transfer_s: float  # from this stage's end until the next stage has the activation
    elementwise_s: float = 0.0  # norms and residual adds at HBM speed: inside compute_s's calibration, not added

    @property
    def busy_s(self) -> float:
        return self.compute_s + self.allreduce_s


def stage_time(cost: StageCost, card: AcceleratorSpec, tp: int) -> StageTime:
    flops_per_gpu = cost.flops / tp
    compute = max(flops_per_gpu / (card.bf16_dense_flop_per_s * MATMUL_EFFICIENCY),
                  cost.weight_bytes_per_gpu / (card.hbm_bytes_per_s * MEMORY_EFFICIENCY))
    one_way = card.nvlink_bytes_per_s / 2 * LINK_EFFICIENCY
    allreduce = 2.0 * (tp - 1) / tp * cost.allreduce_bytes_per_gpu / one_way if tp > 1 else 0.0
    transfer = cost.send_bytes_per_gpu / (card.inter_node_bytes_per_s * LINK_EFFICIENCY)
    if cost.allgather_bytes:
        transfer += (tp - 1) / tp * cost.allgather_bytes / one_way
    elementwise = cost.elementwise_bytes_per_gpu / (card.hbm_bytes_per_s * MEMORY_EFFICIENCY)
    return StageTime(compute_s=compute, allreduce_s=allreduce, transfer_s=transfer, elementwise_s=elementwise)


def sequence_parallel_saving(arch: ModelArchConfig, card: AcceleratorSpec, work: MicroBatchWork, *, tp: int,
                             pp: int, stage: int, dtype_bytes: int) -> dict[str, float]:
    """Seconds one micro-batch's stage time loses with sequence parallelism (norms and residual adds on 1/TP of
    the tokens) and with one head GEMM per micro-batch instead of one per sequence (each with its TP
    all-reduce), against the stage time without them (`busy_s` + the per-sequence head all-reduces)."""
    off = stage_time(stage_cost(arch, work, tp=tp, pp=pp, stage=stage, dtype_bytes=dtype_bytes), card, tp)
    on = stage_time(stage_cost(arch, work, tp=tp, pp=pp, stage=stage, dtype_bytes=dtype_bytes,
                               sequence_parallel=True), card, tp)
    head = (work.sequences - 1) * ALLREDUCE_LATENCY_S if (stage == pp - 1 and tp > 1) else 0.0
    before = off.busy_s + head
    norms = off.elementwise_s - on.elementwise_s
    readout_gather = on.allreduce_s - off.allreduce_s  # the last stage's one all-gather for the readout
    saved = norms - readout_gather + head
    return {"stage_s_before": before, "elementwise_saved_s": norms, "readout_gather_s": readout_gather,
            "head_allreduces_saved_s": head, "saved_s": saved, "saved_share": saved / before}


def micro_batch_times(arch: ModelArchConfig, card: AcceleratorSpec, micro_batches, *, tp: int, pp: int,
                      dtype_bytes: int, scatter_gather: bool = True) -> list[list[StageTime]]:
    """times[stage][i] of each micro-batch (ForestRow or padded) on each stage."""
    works = [micro_batch_work(mb) for mb in micro_batches]
    return [[stage_time(stage_cost(arch, w, tp=tp, pp=pp, stage=s, dtype_bytes=dtype_bytes,
                                   scatter_gather=scatter_gather), card, tp) for w in works]
            for s in range(pp)]


def pipeline_seconds(times: list[list[StageTime]]) -> float:
    """Wall time of one batch alone on an idle pipeline: stage s starts micro-batch i when it has finished
    i - 1 and micro-batch i has arrived from stage s - 1."""
    pp, n = len(times), len(times[0])
    finish = np.zeros((pp, n))
    for s in range(pp):
        for i in range(n):
            ready = finish[s - 1, i] + times[s - 1][i].transfer_s if s else 0.0
            start = max(ready, finish[s, i - 1] if i else 0.0)
            finish[s, i] = start + times[s][i].busy_s
    return float(finish[-1, -1])
