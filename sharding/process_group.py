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


# --- leaving and rejoining the process groups after a batch fault (sharding.engine) ------------------------
# A gloo rank blocked in a receive or a collective is released when its peer's sockets close, and a group's
# sockets close only when nothing references it any more: `ProcessGroup.abort()`/`shutdown()` do not close
# them on gloo (measured, torch 2.13). megatron-core's modules keep their groups (`tp_group`, `pg_collection`),
# so leaving means detaching those references, destroying the groups and collecting them; the peers' pending
# operations then raise "Connection closed by peer" at once, they leave too, and every rank rejoins on a new
# rendezvous port and puts the new groups back where the old ones were (by role: which parallel_state getter
# returned the old group). The weights stay in memory throughout.

_ROLE_GETTERS = (
    "get_tensor_model_parallel_group", "get_pipeline_model_parallel_group", "get_data_parallel_group",
    "get_context_parallel_group", "get_model_parallel_group", "get_embedding_group",
    "get_position_embedding_group", "get_tensor_and_data_parallel_group", "get_tensor_and_context_parallel_group",
    "get_expert_model_parallel_group", "get_expert_tensor_parallel_group", "get_expert_data_parallel_group",
)


def _groups_by_role() -> dict[int, str]:
    out: dict[int, str] = {}
    for name in _ROLE_GETTERS:
        try:
            group = getattr(parallel_state, name)()
        except Exception:  # noqa: BLE001 - a group this layout does not create
            continue
        if group is not None:
            out.setdefault(id(group), name)
    if dist.is_initialized():
        out.setdefault(id(dist.group.WORLD), "world")
    from megatron.core.process_groups_config import ProcessGroupCollection

    collection = ProcessGroupCollection.use_mpu_process_groups()  # megatron's own role names (tp, tp_ep_pp, ...)
    for name, group in vars(collection).items():
        if isinstance(group, dist.ProcessGroup):
            out.setdefault(id(group), f"collection:{name}")
    return out


def _group_of_role(role: str):
    if role == "world":
        return dist.group.WORLD
    if role.startswith("collection:"):
        from megatron.core.process_groups_config import ProcessGroupCollection

        name = role.split(":", 1)[1]
        return getattr(ProcessGroupCollection.use_mpu_process_groups([name]), name)
    return getattr(parallel_state, role)()


def detach_process_groups(model) -> list[tuple[object, str, str]]:
    """Sets every process-group attribute of `model`'s modules (and of their ProcessGroupCollection) to None;
    returns (holder, attribute, role) to put the rebuilt groups back. Raises when a group has no known role."""
    import dataclasses

    roles = _groups_by_role()
    slots: list[tuple[object, str, str]] = []
    holders = []
    for module in model.modules():
        holders.append(module)
        for value in vars(module).values():
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                holders.append(value)
    seen: set[int] = set()
    for holder in holders:
        if id(holder) in seen:
            continue
        seen.add(id(holder))
        for attr, value in list(vars(holder).items()):
            if isinstance(value, dist.ProcessGroup):
                if id(value) not in roles:
                    raise RuntimeError(f"{type(holder).__name__}.{attr} holds a process group of unknown role")
                slots.append((holder, attr, roles[id(value)]))
    for holder, attr, _ in slots:
        setattr(holder, attr, None)
    return slots


def leave_process_groups() -> None:
    """Destroys this rank's process groups (megatron's and torch.distributed's) and collects them, closing their
    sockets; call after `detach_process_groups` and with no other reference to a group left."""
    import gc

    destroy_model_parallel()
    gc.collect()


def reattach_process_groups(slots: list[tuple[object, str, str]]) -> None:
    """Puts the groups of the new process groups (after `init_model_parallel`) where `detach` took the old ones."""
    for holder, attr, role in slots:
        setattr(holder, attr, _group_of_role(role))
