"""MegatronEngine: the RewardEngine that runs the model in worker actors inside a placement group.

The engine owns the batch layout (`parallel.batch_layout`, `sharding.micro_batches`): token-forest rows
(shared prefixes computed once, no padding) or length-sorted right-padded micro-batches, each within
`parallel.max_tokens_per_micro_batch` tokens. It sends the micro-batches (token ids, positions, masks'
metadata) to every rank through the object store and returns the last stage's rewards in the caller's
order. Forwards are serialized (one at a time) so collectives from two batches never interleave.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np
import ray
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from configs.model import ModelArchConfig
from configs.service import ServiceConfig
from sharding.checkpoints.formats import open_checkpoint
from sharding.placement import placement_for, visible_devices_by_node
from sharding.protocol import EngineUnavailableError
from sharding.micro_batches import plan_micro_batches
from sharding.worker import ModelWorker


class MegatronEngine:
    def __init__(self, config: ServiceConfig, placement_group: PlacementGroup | None):
        self.config = config
        checkpoint = open_checkpoint(config.checkpoint_path)
        self.arch: ModelArchConfig = checkpoint.arch
        config.parallel.check_against(self.arch)
        self.plan = placement_for(config)
        self._lock = asyncio.Lock()
        self._broken: str | None = None
        options = {"num_cpus": self.plan.cpus_per_worker, "num_gpus": self.plan.gpus_per_worker,
                   "runtime_env": {"env_vars": dict(config.runtime.worker_env)}}
        self.workers = []
        for slot in self.plan.workers:
            strategy = None
            if placement_group is not None:
                strategy = PlacementGroupSchedulingStrategy(
                    placement_group, placement_group_bundle_index=slot.bundle_index,
                    placement_group_capture_child_tasks=True,
                )
            self.workers.append(
                ModelWorker.options(scheduling_strategy=strategy, **options).remote(
                    slot.rank, self.arch, config.parallel, config.runtime, config.checkpoint_path
                )
            )
        self.node_info = ray.get([w.node_info.remote() for w in self.workers])
        if self.plan.gpus_per_worker > 0:
            visible = visible_devices_by_node({r: (info[1], info[2]) for r, info in enumerate(self.node_info)})
        else:
            visible = {r: (None, 0) for r in range(len(self.workers))}
        master_addr = self.node_info[0][0]
        master_port = ray.get(self.workers[0].free_port.remote())
        ray.get([w.setup.remote(master_addr, master_port, *visible[r]) for r, w in enumerate(self.workers)])
        # The last stage's TP rank 0 returns the rewards.
        self._output_rank = (config.parallel.pipeline_parallel_size - 1) * config.parallel.tensor_parallel_size

    async def score(self, token_batch: Sequence[Sequence[int]]) -> np.ndarray:
        if self._broken:
            raise EngineUnavailableError(self._broken)
        micro_batches, order = plan_micro_batches(token_batch, self.config.parallel)
        async with self._lock:
            ref = ray.put(micro_batches)
            futures = [asyncio.ensure_future(_as_future(w.forward.remote(ref))) for w in self.workers]
            try:
                done, pending = await asyncio.wait(futures, return_when=asyncio.FIRST_EXCEPTION)
                for f in done:
                    f.result()
                sorted_rewards = await futures[self._output_rank]
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                self._broken = f"a model worker died: {type(e).__name__}"
                for f in futures:
                    f.cancel()
                raise EngineUnavailableError(self._broken) from None
        rewards = np.empty_like(sorted_rewards)
        rewards[order] = sorted_rewards
        return rewards

    def describe(self) -> list[dict]:
        """Where each rank runs: rank, stage, TP rank, bundle, node, placement group and Ray actor id."""
        return [
            {"rank": slot.rank, "pipeline_rank": slot.pipeline_rank, "tensor_rank": slot.tensor_rank,
             "bundle_index": slot.bundle_index, "node_id": info[1], "placement_group_id": info[3],
             "actor_id": worker._actor_id.hex()}
            for slot, worker, info in zip(self.plan.workers, self.workers, self.node_info)
        ]

    async def check_health(self) -> None:
        if self._broken:
            raise EngineUnavailableError(self._broken)
        refs = [w.ping.remote() for w in self.workers]
        try:
            await asyncio.wait_for(asyncio.gather(*refs), timeout=self.config.runtime.health_check_timeout_s)
        except (ray.exceptions.RayError, asyncio.TimeoutError) as e:
            self._broken = f"a model worker failed its health check: {type(e).__name__}"
            raise EngineUnavailableError(self._broken) from None

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w, no_restart=True)
        self.workers = []


async def _as_future(ref):
    return await ref
