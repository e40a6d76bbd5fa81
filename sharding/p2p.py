"""Activation transfer between pipeline stages (torch.distributed point-to-point, gloo or NCCL).

Receives are posted ahead (`ActivationReceiver`), sends are asynchronous (`send_activation`).

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


class ActivationReceiver:
    """Receives the previous stage's activations of one forward call, in order. Every receive is posted when
    the receiver is built (the call's start), so the previous stage's sends complete as soon as the data
    has moved instead of waiting, micro-batch by micro-batch, for this stage to finish the one before: the
    stages do not run in lock step, and a change in micro-batch cost idles neither (bench/pipeline_model.py:
    this is what lifts stage utilisation from ~0.65 to ~0.99 at saturation). Memory: one batch of
    activations, at most max_tokens_per_batch x hidden_size x dtype bytes (604 MB at 16k tokens, hidden
    18432, bf16)."""

    def __init__(self, shapes: list[tuple[int, ...]], dtype: torch.dtype, device: torch.device,
                 scatter_gather: bool):
        src = parallel_state.get_pipeline_model_parallel_prev_rank()
        self._scatter_gather = _scatter_gather(scatter_gather)
        self._pending = []
        for shape in shapes:
            full = torch.empty(shape, dtype=dtype, device=device)
            if self._scatter_gather:
                tp = parallel_state.get_tensor_model_parallel_world_size()
                target = torch.empty_like(full.view(-1).chunk(tp)[parallel_state.get_tensor_model_parallel_rank()])
            else:
                target = full
            self._pending.append((full, target, dist.irecv(target, src=src)))
        self._pending.reverse()

    def next(self) -> torch.Tensor:
        """The next micro-batch's activation (blocks until it has arrived; all-gathers the slices)."""
        full, target, request = self._pending.pop()
        request.wait()
        if self._scatter_gather:
            tp = parallel_state.get_tensor_model_parallel_world_size()
            dist.all_gather(list(full.view(-1).chunk(tp)), target,
                            group=parallel_state.get_tensor_model_parallel_group())
        return full
