"""Compile at setup, so that no request pays for it.

The forest layout's flex attention is compiled (`sharding.layers.flex_kernels`: `torch.compile` of
`create_block_mask` and `flex_attention`, dynamic shapes) the first time a row goes through it. A worker calls
`warm_up` in its setup: one forward of a max-size row of the configured layout (`max_tokens_per_micro_batch`
nodes, padded as sequence parallelism pads it) through its own stage, with zeros for the activation a
non-first stage would receive. Stages warm up independently (no pipeline transfer); a stage's TP ranks run
their collectives together, as setup is collective. Nothing is warmed up where nothing compiles: the padded
layout, the `branches` and `dense` kernels, and flex on CPU (eager by default).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from configs.service import ParallelConfig, RuntimeConfig
from sharding.forest import ForestRow, build_forest, pad_row
from sharding.layers import COMPILE_FLEX_ON
from sharding.micro_batches import token_multiple
from sharding.model import forest_kernel


def needs_warm_up(parallel: ParallelConfig, runtime: RuntimeConfig, device: torch.device) -> bool:
    """Whether the first forward of this layout compiles: forest rows with compiled flex attention."""
    return (parallel.batch_layout == "forest" and forest_kernel(runtime) == "flex"
            and device.type in COMPILE_FLEX_ON)


def warm_up_row(parallel: ParallelConfig) -> ForestRow:
    """A row of `max_tokens_per_micro_batch` nodes (one sequence of token id 0), padded like a real row."""
    n = parallel.max_tokens_per_micro_batch
    row = build_forest([np.zeros(n, dtype=np.int64)], n).rows[0]
    return pad_row(row, token_multiple(parallel))


def warm_up(stage, parallel: ParallelConfig, runtime: RuntimeConfig, first_stage: bool) -> float | None:
    """Runs one max-size row through `stage` (a `sharding.worker.ModelStage`) if the layout compiles; returns
    the seconds it took (None when there was nothing to compile)."""
    if not needs_warm_up(parallel, runtime, stage.device):
        return None
    row = warm_up_row(parallel)
    start = time.perf_counter()
    with torch.no_grad():
        hidden = None if first_stage else torch.zeros(stage.activation_shape(row), dtype=stage.activation_dtype,
                                                      device=stage.device)
        stage.run(row, hidden)
    if stage.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start
