"""Placement as a pure function: (TP, PP, GPUs per node, CPUs per worker) -> the placement group the model
deployment reserves and where each rank goes. No Ray calls here, so it is unit-tested on any machine.

One bundle per pipeline stage: a TP group never crosses a node (NVLink inside, network between), and with
`STRICT_SPREAD` each stage lands on its own node. The replica actor itself runs in bundle 0, so its CPUs
are folded into that bundle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from configs.service import ServiceConfig

PlacementStrategy = Literal["STRICT_SPREAD", "SPREAD", "PACK", "STRICT_PACK"]


@dataclass(frozen=True)
class WorkerSlot:
    rank: int
    pipeline_rank: int
    tensor_rank: int
    bundle_index: int


@dataclass(frozen=True)
class PlacementPlan:
    bundles: list[dict[str, float]]
    strategy: PlacementStrategy
    workers: list[WorkerSlot]
    cpus_per_worker: float
    gpus_per_worker: float


def plan_placement(*, tensor_parallel_size: int, pipeline_parallel_size: int, gpus_per_node: int,
                   cpus_per_worker: float, replica_cpus: float, use_gpus: bool,
                   strategy: PlacementStrategy = "STRICT_SPREAD") -> PlacementPlan:
    tp, pp = tensor_parallel_size, pipeline_parallel_size
    if tp < 1 or pp < 1:
        raise ValueError(f"tensor_parallel_size {tp} and pipeline_parallel_size {pp} must be at least 1")
    if use_gpus and tp > gpus_per_node:
        raise ValueError(
            f"tensor_parallel_size {tp} is larger than gpus_per_node {gpus_per_node}: a TP group must fit in one node"
        )
    gpus_per_worker = 1.0 if use_gpus else 0.0
    bundles: list[dict[str, float]] = []
    for stage in range(pp):
        bundle = {"CPU": tp * cpus_per_worker + (replica_cpus if stage == 0 else 0.0)}
        if use_gpus:
            bundle["GPU"] = tp * gpus_per_worker
        bundles.append(bundle)
    # megatron's rank order with data parallel 1: rank = pipeline_rank * tp + tensor_rank.
    workers = [
        WorkerSlot(rank=stage * tp + t, pipeline_rank=stage, tensor_rank=t, bundle_index=stage)
        for stage in range(pp)
        for t in range(tp)
    ]
    return PlacementPlan(bundles=bundles, strategy=strategy, workers=workers,
                         cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker)


def visible_devices_by_node(gpu_ids: dict[int, tuple[str, list[str]]]) -> dict[int, tuple[str, int]]:
    """rank -> (node id, [GPU ids Ray gave it]) ==> rank -> (CUDA_VISIBLE_DEVICES for its node, local rank).

    Every worker on a node sees all of that node's model GPUs, in one order, and picks its own by local
    rank: NCCL then finds the intra-node peers (NVLink) it would miss with one visible GPU per process.
    """
    per_node: dict[str, list[str]] = {}
    for node, ids in gpu_ids.values():
        per_node.setdefault(node, []).extend(ids)
    ordered = {node: sorted(set(ids), key=int) for node, ids in per_node.items()}
    out: dict[int, tuple[str, int]] = {}
    for rank, (node, ids) in gpu_ids.items():
        if len(ids) != 1:
            raise ValueError(f"rank {rank} holds GPUs {ids}; each worker must hold exactly one")
        out[rank] = (",".join(ordered[node]), ordered[node].index(ids[0]))
    return out


def placement_for(config: ServiceConfig) -> PlacementPlan:
    """The plan for a service config (the model deployment's options and the engine's worker slots)."""
    return plan_placement(
        tensor_parallel_size=config.parallel.tensor_parallel_size,
        pipeline_parallel_size=config.parallel.pipeline_parallel_size,
        gpus_per_node=config.runtime.gpus_per_node,
        cpus_per_worker=config.runtime.cpus_per_worker,
        replica_cpus=config.runtime.replica_cpus,
        use_gpus=config.runtime.gpus_per_node > 0,
        strategy=config.parallel.placement_strategy,
    )
