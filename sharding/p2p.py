"""Activation transfer between pipeline stages (torch.distributed point-to-point, gloo or NCCL).

Plain: each rank of stage s sends its whole activation [S, B, H] to the rank with the same TP rank in stage
s + 1. Every TP rank of a stage holds the same activation (the block's output is all-reduced over TP), so at
TP > 1 that moves TP copies of it over the inter-node link.

Scatter-gather (megatron's optimisation for pipeline transfers, `parallel.scatter_gather_activations`):
each TP rank sends only its 1/TP slice of the flattened activation; the receiving stage's TP ranks each get
one slice and all-gather them over their TP group (intra-node, NVLink on GPUs). Exact: the slices are
reassembled bit for bit. Needs the activation's element count divisible by TP, which holds because
hidden_size is (ParallelConfig.check_against).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state


def _scatter_gather(enabled: bool) -> bool:
    return enabled and parallel_state.get_tensor_model_parallel_world_size() > 1


def send_activation(activation: torch.Tensor, scatter_gather: bool) -> tuple[torch.Tensor, dist.Work]:
    """Starts the asynchronous send of `activation` to the next stage; returns (the tensor being sent, the
    request). Keep the tensor referenced until `request.wait()` returns."""
    out = activation.contiguous()
    if _scatter_gather(scatter_gather):
        tp = parallel_state.get_tensor_model_parallel_world_size()
        out = out.view(-1).chunk(tp)[parallel_state.get_tensor_model_parallel_rank()].clone()
    return out, dist.isend(out, dst=parallel_state.get_pipeline_model_parallel_next_rank())


def recv_activation(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device,
                    scatter_gather: bool) -> torch.Tensor:
    """Receives the previous stage's activation of `shape` (blocking); all-gathers the slices when the
    sender scattered them."""
    src = parallel_state.get_pipeline_model_parallel_prev_rank()
    full = torch.empty(shape, dtype=dtype, device=device)
    if not _scatter_gather(scatter_gather):
        dist.recv(full, src=src)
        return full
    tp = parallel_state.get_tensor_model_parallel_world_size()
    chunks = list(full.view(-1).chunk(tp))
    mine = torch.empty_like(chunks[parallel_state.get_tensor_model_parallel_rank()])
    dist.recv(mine, src=src)
    dist.all_gather(chunks, mine, group=parallel_state.get_tensor_model_parallel_group())
    return full
