"""torch.distributed + megatron parallel_state set-up for one process of the model-parallel world.

Two timeouts: the groups are created with `runtime.distributed_timeout_s` (the rendezvous of a set-up that
also reads the weights), and `use_steady_state_timeout` lowers every group's to `runtime.collective_timeout_s`
once the weights are loaded, so a rank stuck in a forward makes its peers' collectives and receives raise
within that time instead of the loading timeout."""

from __future__ import annotations

import datetime
import os
import socket

import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel

from configs.service import RuntimeConfig
from sharding import cpu_compat


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def init_model_parallel(runtime: RuntimeConfig, rank: int, world_size: int, master_addr: str, master_port: int,
                        tp: int, pp: int, local_rank: int = 0) -> None:
    if runtime.device == "cuda":
        torch.cuda.set_device(local_rank)
    elif runtime.device == "cpu" or not torch.cuda.is_available():
        cpu_compat.install()  # simulated: nothing computes, the gloo process groups are real (any host)
    if runtime.torch_threads_per_worker:
        torch.set_num_threads(runtime.torch_threads_per_worker)
    os.environ["MASTER_ADDR"] = master_addr
    os.environ["MASTER_PORT"] = str(master_port)
    dist.init_process_group(
        backend=runtime.backend,
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=runtime.distributed_timeout_s),
    )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, distributed_timeout_minutes=max(
            1, int(runtime.distributed_timeout_s // 60))
    )
    # Inference RNG tracker: no CUDA RNG state is forked (nothing here samples).
    tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)


def use_steady_state_timeout(runtime: RuntimeConfig) -> int:
    """Sets `runtime.collective_timeout_s` on every process group of this rank (world, TP, PP, ...); returns
    how many. Called after the weights are loaded: from then on no operation legitimately waits long."""
    timeout = datetime.timedelta(seconds=runtime.collective_timeout_s)
    groups = list(dist.distributed_c10d._world.pg_map)
    for group in groups:
        group.set_timeout(timeout)
    return len(groups)


def destroy_model_parallel() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
