"""Compile at setup, so that no request pays for it.

Two things in a stage's forward compile on first use: the forest layout's flex attention on CUDA
(`sharding.layers.flex_kernels`: `torch.compile` of `create_block_mask` and `flex_attention`, dynamic shapes),
and megatron-core's `jit_fuser` functions (`squared_relu`: `torch.compile` with automatic dynamic shapes: a
static graph for the first size, recompiled once as a dynamic graph when a second size comes). The compiled
flex kernels also specialise on a row of one 128-token block against several (0/1 specialisation of the
block count). A worker on a device of `WARM_UP_ON` calls `warm_up` in its setup: forwards of micro-batches
of its configured layout, the first max-size, then about half that, then one block (<= 100 tokens) (`max_tokens_per_micro_batch`, padded as sequence parallelism pads it), through its
own stage, with zeros for the activation a non-first stage would receive. After both, a request of any other
size compiles nothing (tests/integration/test_gpu_paths_cpu.py counts the graphs). Stages warm up
independently (no pipeline transfer); a stage's TP ranks run their collectives together, as setup is
collective. CPU workers do not warm up (flex runs eagerly there; CI stays cheap): their first two micro-batch
sizes compile `squared_relu` as before.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from configs.service import ParallelConfig
from sharding.forest import build_forest, pad_row
from sharding.micro_batches import pad_padded, token_multiple

WARM_UP_ON = {"cuda"}  # device types whose workers warm up at setup


def needs_warm_up(device: torch.device) -> bool:
    return device.type in WARM_UP_ON


def warm_up_micro_batches(parallel: ParallelConfig) -> list:
    """Micro-batches of the configured layout: max-size, about half, and one flex block (one sequence of token
    id 0 per row; the padded layout's later ones have two rows). Sizes that coincide are run once."""
    n, m = parallel.max_tokens_per_micro_batch, token_multiple(parallel)
    sizes = list(dict.fromkeys(k for k in (n, n // 2 + 1, min(n, 100)) if k >= 2))
    if parallel.batch_layout == "forest":
        return [pad_row(build_forest([np.zeros(k, dtype=np.int64)], n).rows[0], m) for k in sizes]
    shapes = [(1, sizes[0])] + [(2, k // 2) for k in sizes[1:]]
    return [pad_padded((np.zeros(shape, dtype=np.int64), np.full(shape[0], shape[1], dtype=np.int64)), m)
            for shape in shapes]


def warm_up(stage, parallel: ParallelConfig, first_stage: bool) -> float | None:
    """Runs the warm-up micro-batches through `stage` (a `sharding.worker.ModelStage`) on a device of
    `WARM_UP_ON`; returns the seconds they took (None elsewhere)."""
    if not needs_warm_up(stage.device):
        return None
    start = time.perf_counter()
    with torch.no_grad():
        for micro_batch in warm_up_micro_batches(parallel):
            hidden = None if first_stage else torch.zeros(stage.activation_shape(micro_batch),
                                                          dtype=stage.activation_dtype, device=stage.device)
            stage.run(micro_batch, hidden)
    if stage.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start
